"""Request facts: one normalised, immutable description of an outbound request."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from proxy.hosts import Host, InvalidHost, canonicalize_host


class Transport(StrEnum):
    """How the agent reached the destination (SPEC 6: network.transport.protocol)."""

    HTTP = "http"
    HTTPS_CONNECT = "https_connect"
    HTTPS_INSPECTED = "https_inspected"
    WEBSOCKET = "websocket"


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
    invalid: str | None = None  # reason code when the request itself is malformed
    invalid_detail: str = ""
    traceparent: str | None = None

    @property
    def target(self) -> str:
        """`host:port` as shown to people (IPv6 in brackets)."""
        name = self.host.name if self.host is not None else self.raw_host
        if self.host is not None and self.host.ip is not None and self.host.ip.version == 6:
            name = f"[{name}]"
        return f"{name}:{self.port}"


def facts_from_url(url: str, method: str, agent: str | None) -> RequestFacts:
    """Facts for a dry run: what the proxy would see for `url`."""
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    raw_host = parts.hostname or ""
    try:
        port = parts.port or (443 if scheme in ("https", "wss") else 80)
    except ValueError:
        port = 0
    try:
        host = canonicalize_host(raw_host)
    except InvalidHost:
        host = None
    inspected = scheme in ("http", "ws")
    return RequestFacts(
        request_id="check",
        raw_host=raw_host,
        host=host,
        port=port,
        transport=Transport.HTTP if inspected else Transport.HTTPS_CONNECT,
        method=method.upper(),
        scheme=scheme,
        path=(parts.path or "/") if inspected else None,
        agent=agent,
    )
