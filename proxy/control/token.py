"""The control API bearer token: from the environment, or generated once into the state dir."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from proxy.statedir import secure_state_dir, tighten_private_file

TOKEN_ENV = "EGRESS_WARDEN_CONTROL_TOKEN"
TOKEN_FILE_NAME = "control-token"
# `openssl rand -hex 32` gives 64 characters and a generated token 43: 32 leaves no room for a
# password someone typed, which a stolen-at-a-glance guess would find.
MIN_TOKEN_CHARS = 32
# Every placeholder the docs and deploy files have ever shown for the control token. A deployment
# that copied one unchanged would otherwise run with a token anyone can read in this repository.
PLACEHOLDER_TOKENS = frozenset(
    {
        "CHANGE-ME-control-token-use-openssl-rand-hex-32",
        "CHANGE-ME",
        "changeme",
        "REPLACE-WITH-A-TOKEN-FROM-openssl-rand-hex-32",
        "$(openssl rand -hex 32)",
    }
)
_PLACEHOLDER_MARKERS = ("change-me", "changeme", "replace-with", "openssl rand")


class WeakTokenError(ValueError):
    """The configured control token is too short or a documented placeholder."""


def token_problem(token: str) -> str | None:
    """Why `token` must not guard the control API, or None when it may."""
    lowered = token.lower()
    if token in PLACEHOLDER_TOKENS or any(m in lowered for m in _PLACEHOLDER_MARKERS):
        return "is a documented placeholder"
    if len(token) < MIN_TOKEN_CHARS:
        return f"is {len(token)} characters long; at least {MIN_TOKEN_CHARS} are required"
    return None


def token_source(state_dir: Path) -> str:
    """Where `load_or_create_token` takes the token from, for messages (never the value)."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return f"${TOKEN_ENV}"
    return str(state_dir / TOKEN_FILE_NAME)


def load_control_token(state_dir: Path) -> str:
    """The token `run` serves with; WeakTokenError (naming its source) when it is unsafe."""
    token = load_or_create_token(state_dir)
    problem = token_problem(token)
    if problem is not None:
        raise WeakTokenError(
            f"the control token from {token_source(state_dir)} {problem}: "
            "set a random one, e.g. `openssl rand -hex 32`, or unset it to have one generated"
        )
    return token


def load_or_create_token(state_dir: Path) -> str:
    """Return the token from EGRESS_WARDEN_CONTROL_TOKEN, else `<state>/control-token` (0600)."""
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    if from_env:
        return from_env
    secure_state_dir(state_dir)
    path = state_dir / TOKEN_FILE_NAME
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
        if token:
            # A token file written before modes were enforced, or copied in loosely.
            tighten_private_file(path)
            return token
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    os.chmod(path, 0o600)
    return token
