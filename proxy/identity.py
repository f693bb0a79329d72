"""Agent identity from `Proxy-Authorization: Basic` (username `AGENT` or `AGENT~SESSION`).

The session separator is `~`: an RFC 3986 *unreserved* character, so it stands unencoded in a
proxy URL's userinfo (`http://AGENT~SESSION:TOKEN@host:port`) and no client escapes it (curl,
git, pip, requests, httpx and Node's WHATWG URL all keep it), and it is not in the id charset.
The older `/` is still accepted: it only arrives when the client was given `%2F` (a raw `/` ends
the URL's authority). Ids may contain `@` (kept for existing agents files); in a URL it must be
written `%40`, which `proxy_url` and the printed examples do.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import quote

# Used with fullmatch: `$` would also accept a trailing newline ("trusted-bot\n").
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
SESSION_SEPARATOR = "~"
_SEPARATORS = re.compile(r"[~/]")


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
    agent, *rest = _SEPARATORS.split(user, maxsplit=1)
    session = rest[0] if rest else ""
    if not _ID.fullmatch(agent) or (rest and not _ID.fullmatch(session)):
        return None
    return Identity(agent, session or None, secret)


def valid_id(text: str) -> bool:
    """Is `text` a well-formed agent or session id?"""
    return _ID.fullmatch(text) is not None


def proxy_userinfo(agent: str, session: str | None = None, token: str | None = None) -> str:
    """`AGENT[~SESSION][:TOKEN]` as it goes into a proxy URL, each part percent-encoded where
    needed (an `@` in an id becomes `%40`; `~` needs nothing)."""
    user = quote(agent, safe="") + (SESSION_SEPARATOR + quote(session, safe="") if session else "")
    return user if token is None else f"{user}:{quote(token, safe='')}"


def proxy_url(proxy: str, agent: str | None, session: str | None, token: str | None) -> str:
    """`proxy` (scheme://host:port) with the agent's credentials in its userinfo, if an agent."""
    if not agent:
        return proxy
    scheme, sep, rest = proxy.partition("://")
    if not sep:
        scheme, rest = "http", proxy
    return f"{scheme}://{proxy_userinfo(agent, session, token)}@{rest}"
