"""The control API bearer token: from the environment, or generated once into the state dir."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from proxy.statedir import secure_state_dir, tighten_private_file

TOKEN_ENV = "EGRESS_WARDEN_CONTROL_TOKEN"


def load_or_create_token(state_dir: Path) -> str:
    """Return the token from EGRESS_WARDEN_CONTROL_TOKEN, else `<state>/control-token` (0600)."""
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    if from_env:
        return from_env
    secure_state_dir(state_dir)
    path = state_dir / "control-token"
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
