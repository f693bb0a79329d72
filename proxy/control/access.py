"""Who is calling the control API: a bearer token becomes a `Caller` with a role.

The bootstrap token is role admin; named admins with personal tokens and their own role
(proxy/admins.py) are another `TokenVerifier`, and `first_of` asks both. The routes ask for a
role, not a token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

APPROVER_HEADER = b"x-egress-warden-approver"
MAX_APPROVER_LABEL = 64
# Names the proxy itself records as the approver: a caller may not pass as one of them
# (the gate treats an item resolved by "policy" as released by a rule change).
_RESERVED_LABELS = frozenset({"policy", "auto", "webhook", "human", "unknown", "system"})
_LABEL_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ._@+-")


class Role(StrEnum):
    """What a caller may do; each role includes the ones before it."""

    VIEWER = "viewer"
    APPROVER = "approver"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        return _RANK[self] >= _RANK[needed]


_RANK = {Role.VIEWER: 0, Role.APPROVER: 1, Role.ADMIN: 2}


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated control API caller: the name recorded on what it decides, its role."""

    name: str
    role: Role


class AccessDenied(Exception):
    """A refused control API request, answered as `{"error": code, "detail": text}`."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


# (presented token, the caller's approver label or None) -> the caller, or None if unknown.
TokenVerifier = Callable[[bytes, str | None], Caller | None]


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class BootstrapToken:
    """The instance's control token (env or `<state>/control-token`): role admin. Whoever holds
    it may say who they are with the approver header; without one they are `admin`."""

    def __init__(self, token: str) -> None:
        self._digest = _digest(token.encode())

    def __call__(self, presented: bytes, label: str | None) -> Caller | None:
        # Digests of equal length: compare_digest then leaks neither content nor length.
        if not hmac.compare_digest(_digest(presented), self._digest):
            return None
        return Caller(label or Role.ADMIN.value, Role.ADMIN)


def first_of(*verifiers: TokenVerifier) -> TokenVerifier:
    """A verifier asking each of `verifiers` in turn; every one is asked whatever the earlier
    ones said, so how long a check takes does not tell which kind of token matched."""

    def verify(presented: bytes, label: str | None) -> Caller | None:
        answers = [check(presented, label) for check in verifiers]
        return next((caller for caller in answers if caller is not None), None)

    return verify


def approver_label(raw: bytes) -> str | None:
    """The approver header as a safe, bounded name: letters, digits and ` ._@+-` kept, any
    other byte percent-escaped, at most 64 characters; None when empty or reserved."""
    text = raw.strip()
    parts: list[str] = []
    length = 0
    for byte in text:
        char = chr(byte)
        piece = char if char in _LABEL_SAFE else f"%{byte:02X}"
        if length + len(piece) > MAX_APPROVER_LABEL:
            break
        parts.append(piece)
        length += len(piece)
    label = "".join(parts).strip()
    if not label or label.lower() in _RESERVED_LABELS:
        return None
    return label


def authenticate(headers: Iterable[tuple[bytes, bytes]], verify: TokenVerifier) -> Caller:
    """The caller a request's `Authorization: Bearer` header names; raise AccessDenied (401 for
    no usable credentials, 403 for a token no one holds)."""
    authorization: list[bytes] = []
    label: bytes = b""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"authorization":
            authorization.append(value)
        elif lowered == APPROVER_HEADER:
            label = value
    if len(authorization) > 1:
        raise AccessDenied(401, "unauthorized", "send exactly one Authorization header")
    scheme, _, token = (authorization[0] if authorization else b"").strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        raise AccessDenied(
            401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)"
        )
    caller = verify(token, approver_label(label))
    if caller is None:
        raise AccessDenied(403, "forbidden", "invalid token")
    return caller
