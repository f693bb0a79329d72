"""Request facts: one normalised, immutable description of an outbound request."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from proxy.hosts import Host


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
