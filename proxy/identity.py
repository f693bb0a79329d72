"""Agent identity from `Proxy-Authorization: Basic` (username `AGENT` or `AGENT/SESSION`)."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

# Used with fullmatch: `$` would also accept a trailing newline ("trusted-bot\n").
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")


@dataclass(frozen=True, slots=True)
class Identity:
    agent: str
    session: str | None
    secret: str  # the password part: the agent's token (verified by the agents registry)


def parse_proxy_authorization(header: str | None) -> Identity | None:
    """Parse a Basic credential; None when absent or malformed (ids are a safe charset)."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, secret = decoded.partition(":")
    if not sep:
        return None
    agent, _, session = user.partition("/")
    if not _ID.fullmatch(agent) or (session and not _ID.fullmatch(session)):
        return None
    return Identity(agent, session or None, secret)
