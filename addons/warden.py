"""The egress-warden mitmproxy addon: adapts flows to the core's gate and back."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import connection, http
from mitmproxy.proxy import layer, layers, server_hooks

from proxy.facts import RequestFacts, Transport
from proxy.gate import Admission, Gate
from proxy.hosts import Host, InvalidHost, canonicalize_host
from proxy.identity import Identity, parse_proxy_authorization
from proxy.responses import render_refusal

_STRIPPED_PREFIX = "x-egress-warden-"


@dataclass(frozen=True, slots=True)
class _Pin:
    """An admitted upstream: the address checked by the gate, which is the one dialled."""

    address: str
    port: int


def _new_request_id() -> str:
    return secrets.token_hex(8)


def _host_or_none(raw: str) -> Host | None:
    try:
        return canonicalize_host(raw)
    except InvalidHost:
        return None


def _client_address(client: connection.Client) -> str | None:
    peer = client.peername
    return str(peer[0]) if peer else None


def _identity(request: http.Request) -> Identity | None:
    return parse_proxy_authorization(request.headers.get("proxy-authorization"))


def _client_gone(client: connection.Client) -> Callable[[], bool]:
    # mitmproxy keeps reading while a hook waits: a closed client clears CAN_READ.
    return lambda: not (client.state & connection.ConnectionState.CAN_READ)


def _refusal_response(admission: Admission, facts: RequestFacts) -> http.Response:
    refusal = render_refusal(admission.decision, facts, admission.pending_id)
    response = http.Response.make(
        refusal.status,
        refusal.body.encode(),
        list((k.encode(), v.encode()) for k, v in refusal.headers),
    )
    response.reason = refusal.reason_phrase
    return response


class EgressWarden:
    """Decides CONNECT in `http_connect` and plain HTTP in `requestheaders`; pins upstreams."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        # client id -> (server id or (host, port)) -> pin; dropped with the client connection.
        self._pins: dict[str, dict[object, _Pin]] = {}
        # server ids of admitted CONNECT tunnels that become raw TCP (no interception).
        self._tunnels: set[str] = set()

    def _pin(self, client: connection.Client, key: object, admission: Admission, port: int) -> None:
        assert admission.address is not None
        self._pins.setdefault(client.id, {})[key] = _Pin(str(admission.address), port)

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        identity = _identity(request)
        facts = RequestFacts(
            request_id=_new_request_id(),
            raw_host=request.host,
            host=_host_or_none(request.host),
            port=request.port,
            transport=Transport.HTTPS_CONNECT,
            method="CONNECT",
            scheme="https",
            agent=identity.agent if identity else None,
            session=identity.session if identity else None,
            client_address=_client_address(flow.client_conn),
            traceparent=request.headers.get("traceparent"),
        )
        flow.metadata["egress.request_id"] = facts.request_id
        admission = await self.gate.admit(facts, _client_gone(flow.client_conn))
        if not admission.allowed:
            flow.response = _refusal_response(admission, facts)
            return
        self._pin(flow.client_conn, flow.server_conn.id, admission, request.port)
        self._tunnels.add(flow.server_conn.id)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        # An admitted CONNECT becomes a plain TCP tunnel: the agent sees the real certificate.
        if nextlayer.layer is None and nextlayer.context.server.id in self._tunnels:
            self._tunnels.discard(nextlayer.context.server.id)
            nextlayer.layer = layers.TCPLayer(nextlayer.context, ignore=True)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        identity = _identity(request)
        for name in list(request.headers.keys()):
            if name.lower() == "proxy-authorization" or name.lower().startswith(_STRIPPED_PREFIX):
                del request.headers[name]
        invalid, detail = self._check_host_header(request)
        is_ws = request.headers.get("upgrade", "").lower() == "websocket"
        facts = RequestFacts(
            request_id=_new_request_id(),
            raw_host=request.host,
            host=_host_or_none(request.host),
            port=request.port,
            transport=Transport.WEBSOCKET if is_ws else Transport.HTTP,
            method=request.method,
            scheme=request.scheme,
            path=request.path.partition("?")[0],
            agent=identity.agent if identity else None,
            session=identity.session if identity else None,
            client_address=_client_address(flow.client_conn),
            invalid=invalid,
            invalid_detail=detail,
            traceparent=request.headers.get("traceparent"),
        )
        flow.metadata["egress.request_id"] = facts.request_id
        admission = await self.gate.admit(facts, _client_gone(flow.client_conn))
        if not admission.allowed:
            request.stream = False  # a refused upload is never streamed upstream
            flow.response = _refusal_response(admission, facts)
            return
        assert admission.address is not None
        address = str(admission.address)
        if request.scheme == "http":
            # Dial the checked IP; the Host header is untouched, and keep-alive reuse matches.
            request.data.host = address
            self._pin(flow.client_conn, (address, request.port), admission, request.port)
        else:
            self._pin(flow.client_conn, (request.host, request.port), admission, request.port)

    @staticmethod
    def _check_host_header(request: http.Request) -> tuple[str | None, str]:
        header = request.host_header
        if header is None:
            return None, ""
        target = _host_or_none(request.host)
        host_text, _, port_text = (
            header.rpartition(":") if not header.endswith("]") else (header, "", "")
        )
        if not host_text or (host_text.startswith("[") and not host_text.endswith("]")):
            host_text, port_text = header, ""
        try:
            port = int(port_text) if port_text else (443 if request.scheme == "https" else 80)
        except ValueError:
            return "host_mismatch", f"Host header {header!r} is malformed"
        header_host = _host_or_none(host_text)
        if target is None or header_host is None or header_host != target or port != request.port:
            return "host_mismatch", f"Host header {header!r} does not match the request target"
        return None, ""

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        # Every upstream connection must have been admitted; dial the checked address only.
        pins = self._pins.get(data.client.id, {})
        address = data.server.address
        pin = pins.get(data.server.id)
        if pin is None and address is not None:
            pin = pins.get((address[0], address[1]))
        if pin is None or address is None:
            data.server.error = "egress-warden: upstream connection was not admitted"
            return
        data.server.address = (pin.address, pin.port)

    def client_disconnected(self, client: connection.Client) -> None:
        self._pins.pop(client.id, None)

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._tunnels.discard(data.server.id)
