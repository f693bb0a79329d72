"""Credential brokering: agents hold placeholders, the proxy holds the values.

A placeholder is `ewph_` + HMAC-SHA256(key, "agent|secret-id") (40 hex digits), the key a
random 32 bytes in the state directory (`secrets.key`, 0600): every worker and replica sharing
the state directory, and `egress-warden env`, compute the same placeholder without storing one,
and a placeholder says nothing about the value or about another agent's placeholder.

On a request to one of the secret's owner hosts the placeholder is swapped for the value where
the secret's `inject` says (a header, or the password of HTTP basic auth, which is how git sends
URL userinfo); a placeholder anywhere else is misuse.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from proxy.hosts import Host
from proxy.policy.match import RuleSet
from proxy.policy.model import Action, Rule, SecretRule
from proxy.secrets import Finding
from proxy.verdicts import Reason

KEY_FILE = "secrets.key"
PREFIX = "ewph_"
PLACEHOLDER = re.compile(r"ewph_[0-9a-f]{40}")
PLACEHOLDER_BYTES = re.compile(rb"ewph_[0-9a-f]{40}")


class SecretUnavailable(Exception):
    """A secret's source could not be read; the message names the secret, not a value."""


def load_or_create_key(state_dir: Path) -> bytes:
    """The placeholder key in `state_dir`, created (0600, exclusively: concurrent workers
    agree on one) when missing."""
    path = Path(state_dir).expanduser() / KEY_FILE
    for _attempt in range(50):
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            text = ""
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
            else:
                with os.fdopen(fd, "w", encoding="ascii") as out:
                    out.write(secrets.token_hex(32) + "\n")
                continue
        if len(text) == 64:
            return bytes.fromhex(text)
        # Another process created the file and is writing it: read again shortly.
        time.sleep(0.01)
    raise OSError(f"{path}: not a valid placeholder key (64 hex digits)")


def placeholder(key: bytes, agent: str | None, secret_id: str) -> str:
    """The placeholder `agent` (None: anonymous callers) holds for the secret `secret_id`."""
    digest = hmac.new(key, f"{agent or ''}|{secret_id}".encode(), hashlib.sha256).hexdigest()
    return PREFIX + digest[:40]


def agent_variables(key: bytes, agent: str | None, rules: Iterable[SecretRule]) -> dict[str, str]:
    """`env_name=placeholder` for every secret that names an `env_name`."""
    return {
        rule.env_name: placeholder(key, agent, rule.id)
        for rule in rules
        if rule.env_name is not None
    }


def read_value(rule: SecretRule) -> str:
    """The secret's real value from its source (the proxy's environment or a file)."""
    if rule.env is not None:
        value = os.environ.get(rule.env)
        if not value:
            raise SecretUnavailable(f"secret {rule.id!r}: ${rule.env} is not set")
        return value
    assert rule.file is not None
    try:
        value = Path(rule.file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecretUnavailable(f"secret {rule.id!r}: cannot read {rule.file}: {exc}") from None
    if not value:
        raise SecretUnavailable(f"secret {rule.id!r}: {rule.file} is empty")
    return value


@lru_cache(maxsize=256)
def _owners(hosts: tuple[str, ...]) -> RuleSet:
    return RuleSet.build(Rule(pattern=h, action=Action.ALLOW, source=h) for h in hosts)


def owns(rule: SecretRule, host: Host | None, port: int) -> bool:
    """Is `host:port` one of the hosts `rule` belongs to?"""
    return host is not None and _owners(rule.hosts).match(host, port) is not None


@dataclass(frozen=True, slots=True)
class AgentSecrets:
    """The secrets as one agent sees them: its placeholders, and whom each belongs to."""

    by_placeholder: Mapping[str, SecretRule]

    @classmethod
    def of(cls, key: bytes, agent: str | None, rules: Iterable[SecretRule]) -> AgentSecrets:
        return cls({placeholder(key, agent, r.id): r for r in rules})

    def misuse(self, text: str, where: str, host: Host | None, port: int) -> Finding | None:
        """A placeholder in `text` that does not belong to `host` (another agent's, an unknown
        one, or this agent's for another host's secret)."""
        for match in PLACEHOLDER.finditer(text):
            rule = self.by_placeholder.get(match.group())
            if rule is None:
                return Finding(Reason.SECRET_MISUSE, "unknown placeholder", where)
            if not owns(rule, host, port):
                return Finding(Reason.SECRET_MISUSE, rule.id, where, rule.source)
        return None

    def misuse_in_headers(
        self, headers: Sequence[tuple[str, str]], host: Host | None, port: int
    ) -> Finding | None:
        """`misuse` over header values, basic-auth credentials decoded."""
        for name, value in headers:
            where = f"header {name.lower()}"
            found = self.misuse(value, where, host, port)
            if found is None and _is_basic(value):
                found = self.misuse(_decode_basic(value) or "", where, host, port)
            if found is not None:
                return found
        return None

    def swap(
        self, headers: Sequence[tuple[str, str]], host: Host | None, port: int
    ) -> tuple[list[tuple[str, str]] | None, list[str]]:
        """Headers with this agent's placeholders swapped for the values of the secrets `host`
        owns, where their `inject` says; None when nothing changed. Also the ids of secrets
        whose value could not be read (their placeholder is left as it is)."""
        mine = {p: r for p, r in self.by_placeholder.items() if owns(r, host, port)}
        if not mine:
            return None, []
        out: list[tuple[str, str]] = []
        changed = False
        unavailable: list[str] = []
        for name, value in headers:
            new = value
            for ph, rule in mine.items():
                try:
                    new = _inject(rule, name, new, ph)
                except SecretUnavailable:
                    unavailable.append(rule.id)
            changed |= new != value
            out.append((name, new))
        return (out if changed else None), unavailable


def _inject(rule: SecretRule, name: str, value: str, ph: str) -> str:
    if rule.header is not None:
        if name.lower() != rule.header.lower() or ph not in value:
            return value
        real = read_value(rule)
        if value.strip() == ph:
            return rule.format.replace("{value}", real)
        return value.replace(ph, real)
    if rule.basic_user is None or name.lower() != "authorization" or not _is_basic(value):
        return value
    decoded = _decode_basic(value)
    if decoded is None or ph not in decoded:
        return value
    user, _, password = decoded.partition(":")
    if ph not in password:
        return value
    real = read_value(rule)
    user = rule.basic_user or user
    token = base64.b64encode(f"{user}:{password.replace(ph, real)}".encode()).decode("ascii")
    return f"Basic {token}"


def _is_basic(value: str) -> bool:
    return value[:6].lower() == "basic "


def _decode_basic(value: str) -> str | None:
    try:
        return base64.b64decode(value[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
