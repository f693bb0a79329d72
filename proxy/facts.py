"""Request facts: one normalised, immutable description of an outbound request."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from proxy.hosts import Host, InvalidHost, canonicalize_host
from proxy.verdicts import Reason


class Transport(StrEnum):
    """How the agent reached the destination (SPEC 6: network.transport.protocol)."""

    HTTP = "http"
    HTTPS_CONNECT = "https_connect"
    HTTPS_INSPECTED = "https_inspected"
    WEBSOCKET = "websocket"
    SOCKS5 = "socks5"  # a SOCKS5 CONNECT (raw TCP, or TLS intercepted for `inspect:` hosts)
    TRANSPARENT = "transparent"  # a kernel-redirected connection, named by its SNI or Host
    DNS = "dns"  # a query to the policy-aware DNS listener


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """Everything the decision needs, parsed once at the edge; nothing downstream re-parses."""

    request_id: str
    raw_host: str  # as the client wrote it, for messages only
    host: Host | None  # None when the host is invalid (see `invalid`)
    port: int
    transport: Transport
    method: str
    scheme: str = "http"
    path: str | None = None  # only for plain HTTP or inspected requests
    agent: str | None = None
    session: str | None = None
    client_address: str | None = None
    invalid: Reason | None = None  # set when the request itself is refused before any rule
    invalid_detail: str = ""
    traceparent: str | None = None
    justification: str | None = None  # X-Egress-Warden-Justification (never forwarded)

    @property
    def target(self) -> str:
        """`host:port` as shown to people (IPv6 in brackets)."""
        name = self.host.name if self.host is not None else self.raw_host
        if self.host is not None and self.host.ip is not None and self.host.ip.version == 6:
            name = f"[{name}]"
        return f"{name}:{self.port}"


class BadURL(ValueError):
    """A dry-run URL that no client could send through the proxy."""


_SCHEMES = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def facts_from_url(url: str, method: str, agent: str | None) -> RequestFacts:
    """Facts for a dry run: what the proxy would see for `url` (http/ws: a plain-HTTP request
    with its path; https/wss or no scheme: a CONNECT). Raises BadURL for a malformed URL."""
    if "://" not in url:
        url = "https://" + url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadURL(f"malformed URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise BadURL(f"unsupported scheme {scheme!r}: use http, https, ws or wss")
    raw_host = parts.hostname or ""
    if not raw_host:
        raise BadURL(f"URL {url!r} names no host")
    if port == 0:
        raise BadURL("port 0 cannot be dialled")
    host: Host | None
    invalid: Reason | None = None
    detail = ""
    try:
        host = canonicalize_host(raw_host)
    except InvalidHost as exc:
        host, invalid, detail = None, Reason.INVALID_HOST, str(exc)
    plain = scheme in ("http", "ws")
    return RequestFacts(
        request_id="check",
        raw_host=raw_host,
        host=host,
        port=port or _SCHEMES[scheme],
        transport=Transport.HTTP if plain else Transport.HTTPS_CONNECT,
        method=method.upper() if plain else "CONNECT",
        scheme="http" if plain else "https",
        path=(parts.path or "/") if plain else None,
        agent=agent,
        invalid=invalid,
        invalid_detail=detail,
    )
