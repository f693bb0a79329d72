"""The egress-warden mitmproxy addon: translates flows into facts for the core's gate, and the
gate's admissions back into responses, pinned upstreams and tunnels. It decides nothing."""

from __future__ import annotations

import asyncio
import base64
import random
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

if __name__.startswith("__mitmproxy_script__"):
    # `mitmdump -s addons/warden.py` runs this file as a module it never registers, and
    # dataclasses look their module up by name: the package's own copy stands in for it. It is
    # imported without this directory on sys.path (mitmproxy puts it first), or `addons/socks.py`
    # would pass for the PySocks module a dependency looks for.
    import importlib
    import os

    _here = os.path.dirname(os.path.abspath(__file__))
    _saved_path = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    try:
        sys.modules.setdefault(__name__, importlib.import_module("addons.warden"))
    finally:
        sys.path[:] = _saved_path

from mitmproxy import connection, http
from mitmproxy.proxy import commands, events, layer, server_hooks
from mitmproxy.proxy.layers.modes import Socks5AuthData
from mitmproxy.proxy.layers.tls import parse_client_hello

from addons.credentials import CredentialGuard
from addons.relay import MeteredTunnel, RelayedTunnel, RelaySettings, abort_all
from addons.socks import SocksConnectData
from proxy.auth import INVALID_CREDENTIALS, Caller
from proxy.facts import RequestFacts, Transport
from proxy.gate import Admission, Gate
from proxy.hosts import Host, InvalidHost, canonicalize_host
from proxy.identity import Identity, parse_proxy_authorization
from proxy.policy.model import EffectivePolicy, InspectRule
from proxy.render import is_http_token
from proxy.responses import JUSTIFICATION_HEADER, render_refusal
from proxy.telemetry import ConnectionCloseEvent
from proxy.verdicts import Decision, Reason

_STRIPPED_PREFIX = "x-egress-warden-"
RECHECK_INTERVAL = 0.5  # seconds: how soon a revocation reaches the tunnels it admitted
_TLS_HANDSHAKE = 0x16


@dataclass(frozen=True, slots=True)
class _Pin:
    """An admitted upstream: the address checked by the gate, which is the one dialled."""

    address: str
    port: int


@dataclass(slots=True)
class _Meter:
    """Bytes each way and duration of one admitted connection or exchange."""

    facts: RequestFacts
    started: float = field(default_factory=time.monotonic)
    sent: int = 0  # client -> upstream
    received: int = 0  # upstream -> client

    def count_sent(self, chunk: bytes) -> bytes:
        self.sent += len(chunk)
        return chunk

    def count_received(self, chunk: bytes) -> bytes:
        self.received += len(chunk)
        return chunk

    def close_event(self) -> ConnectionCloseEvent:
        f = self.facts
        return ConnectionCloseEvent(
            request_id=f.request_id,
            host=f.host.name if f.host is not None else f.raw_host,
            port=f.port,
            bytes_sent=self.sent,
            bytes_received=self.received,
            duration_ms=int((time.monotonic() - self.started) * 1000),
            transport=f.transport.value,
            agent=f.agent,
            session=f.session,
            traceparent=f.traceparent,
        )


@dataclass(slots=True)
class _Tunnel(_Meter):
    """An admitted CONNECT: the server connection it opened, the checked address that
    connection may dial, the bytes it carries, and its `inspect:` rule if TLS is intercepted.

    One flat record per tunnel, kept by client connection (an HTTP/1 client connection carries
    at most one tunnel): each idle tunnel costs this object and one dict entry, nothing more."""

    server_id: str = ""
    pin: _Pin = _Pin("", 0)
    inspect: InspectRule | None = None
    admitted: Decision | None = None  # what let it in: re-checked when the rules change


class RefusedTunnel(layer.Layer):
    """A tunnel the gate refused after it was opened (its ClientHello named another host):
    both connections are closed and no byte is relayed."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield commands.CloseConnection(self.context.client)
        if self.context.server.connected:
            yield commands.CloseConnection(self.context.server)


# Request ids only need to be unique, not secret: a PRNG seeded once from the OS is enough, and
# spares every request a getrandom() system call (3 % of a plain-HTTP request's time in py-spy).
_request_ids = random.Random()


def _new_request_id() -> str:
    return f"{_request_ids.getrandbits(64):016x}"


def _host_or_none(raw: str) -> Host | None:
    try:
        return canonicalize_host(raw)
    except InvalidHost:
        return None


def _client_address(client: connection.Client) -> str | None:
    peer = client.peername
    return str(peer[0]) if peer else None


def _parse_host_header(header: str, default_port: int) -> tuple[Host | None, int]:
    """Host and port of a Host header (`name`, `name:port`, `[v6]:port`); None if malformed."""
    host_text, _, port_text = header.rpartition(":") if not header.endswith("]") else ("", "", "")
    if not host_text or (host_text.startswith("[") and not host_text.endswith("]")):
        host_text, port_text = header, ""
    if port_text and not port_text.isdigit():
        return None, 0
    return _host_or_none(host_text), int(port_text) if port_text else default_port


def strip_client_headers(request: http.Request) -> None:
    """Proxy credentials and X-Egress-Warden-* headers from the client never go upstream.
    One pass over the header list (deleting one by one is quadratic in the header count)."""
    fields = request.headers.fields
    kept = tuple(
        (name, value)
        for name, value in fields
        if not (
            name.lower() == b"proxy-authorization" or name[:16].lower() == _STRIPPED_PREFIX.encode()
        )
    )
    if len(kept) != len(fields):
        request.headers.fields = kept


def _identity(request: http.Request) -> Identity | None:
    return parse_proxy_authorization(request.headers.get("proxy-authorization"))


def _tunnel_facts(
    caller: Caller,
    raw_host: str,
    port: int,
    transport: Transport,
    client: connection.Client,
    *,
    traceparent: str | None = None,
    justification: str | None = None,
) -> RequestFacts:
    """The facts of a tunnel request (an HTTP CONNECT or a SOCKS5 CONNECT) by `caller`."""
    return RequestFacts(
        request_id=_new_request_id(),
        raw_host=raw_host,
        host=_host_or_none(raw_host),
        port=port,
        transport=transport,
        method="CONNECT",
        scheme="socks5" if transport is Transport.SOCKS5 else "https",
        agent=caller.agent,
        session=caller.session,
        invalid=Reason.AUTH_REQUIRED if caller.failure else None,
        invalid_detail=caller.failure or "",
        client_address=_client_address(client),
        traceparent=traceparent,
        justification=justification,
    )


def _client_gone(client: connection.Client) -> Callable[[], bool]:
    # mitmproxy keeps reading while a hook waits: a closed client clears CAN_READ.
    return lambda: not (client.state & connection.ConnectionState.CAN_READ)


def _refusal_response(
    admission: Admission, facts: RequestFacts, accept: str | None, policy: EffectivePolicy
) -> http.Response:
    refusal = render_refusal(
        admission.decision,
        facts,
        admission.pending_id,
        accept=accept,  # `Accept: application/json` gets a JSON body
        settings=policy.refusal,
        approval_wait=policy.approval.wait,
    )
    response = http.Response.make(
        refusal.status,
        refusal.body.encode(),
        list((k.encode(), v.encode()) for k, v in refusal.headers),
    )
    response.reason = refusal.reason_phrase
    return response


def _refuse(
    flow: http.HTTPFlow, admission: Admission, facts: RequestFacts, policy: EffectivePolicy
) -> None:
    flow.request.stream = False  # a refused upload is never streamed upstream
    flow.response = _refusal_response(admission, facts, flow.request.headers.get("accept"), policy)


def _start_meter(flow: http.HTTPFlow, facts: RequestFacts) -> None:
    """Count an admitted exchange's bytes (streamed request bodies are counted in passing)."""
    meter = _Meter(facts)
    flow.metadata["egress.meter"] = meter
    if flow.request.stream:
        flow.request.stream = meter.count_sent


class EgressWarden:
    """Turns CONNECT (`http_connect`), plain HTTP and inspected requests (`requestheaders`) and
    raw tunnels' ClientHellos (`next_layer`) into facts for the gate; pins upstreams."""

    keep_websocket_messages = False  # a WebSocket flow keeps only its current message

    def __init__(
        self,
        gate: Gate,
        marker: str = "egress-warden",
        close_client: Callable[[str], None] | None = None,
        relay: RelaySettings | None = None,
    ) -> None:
        self.gate = gate
        # Who moves admitted raw tunnels' bytes (addons/relay.py); None: mitmproxy's TCP layer.
        self._relay = relay
        # Closes a client connection (and its upstream) by client id; set by the runtime.
        self._close_client = close_client or (lambda _client_id: None)
        # Brokered secrets and credential scanning (a hit in a streamed body closes the client).
        self._credentials = CredentialGuard(gate, self._close_client)
        self._checked = gate.version
        self._watcher: asyncio.Task[None] | None = None
        # This instance's token in `Via`: a request that carries it has come round in a loop.
        self._via = f"1.1 {marker}"
        self._marker = marker.lower()
        # client id -> (host, port) -> pin of admitted plain-HTTP and absolute-form requests;
        # dropped with the client connection.
        self._pins: dict[str, dict[tuple[str, int], _Pin]] = {}
        # client id -> its admitted CONNECT tunnel; dropped with either connection.
        self._tunnels: dict[str, _Tunnel] = {}
        # SOCKS5 client connection -> who it authenticated as (one handshake per connection).
        self._socks_callers: weakref.WeakKeyDictionary[connection.Client, Caller] = (
            weakref.WeakKeyDictionary()
        )

    def _pin(
        self, client: connection.Client, key: tuple[str, int], admission: Admission, port: int
    ) -> None:
        assert admission.address is not None
        self._pins.setdefault(client.id, {})[key] = _Pin(str(admission.address), port)

    def _tunnel_of(self, client: connection.Client, server: connection.Server) -> _Tunnel | None:
        tunnel = self._tunnels.get(client.id)
        return tunnel if tunnel is not None and tunnel.server_id == server.id else None

    def running(self) -> None:
        self._watcher = asyncio.ensure_future(self._watch())

    def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def _watch(self) -> None:
        """Revocation reaches open tunnels: when the rules, grants or identities change they are
        re-checked at once (within RECHECK_INTERVAL); tunnels past their lifetime are closed."""
        while True:
            await asyncio.sleep(RECHECK_INTERVAL)
            self.recheck_tunnels()

    def recheck_tunnels(self) -> int:
        """Close the open tunnels the rules in force no longer admit; returns how many."""
        version = self.gate.version
        changed, self._checked = version != self._checked, version
        lifetime = self.gate.policy.max_tunnel_lifetime
        if not changed and lifetime is None:
            return 0
        now = time.monotonic()
        closed = 0
        for client_id, tunnel in list(self._tunnels.items()):
            if lifetime is not None and now - tunnel.started > lifetime:
                self.gate.expire_tunnel(tunnel.facts, lifetime)
            elif (
                not changed
                or tunnel.admitted is None
                or self.gate.recheck(tunnel.facts, tunnel.admitted) is None
            ):
                continue
            self._close_client(client_id)
            closed += 1
        return closed

    def owns(self, nextlayer: layer.NextLayer) -> bool:
        """An admitted raw tunnel: its layer is ours to choose (after its ClientHello)."""
        tunnel = self._tunnel_of(nextlayer.context.client, nextlayer.context.server)
        return tunnel is not None and tunnel.inspect is None

    def _looped(self, request: http.Request) -> bool:
        via = request.headers.get_all("via")
        return any(self._marker in value.lower() for value in via)

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        caller = self.gate.identify(_identity(request))
        facts = _tunnel_facts(
            caller,
            request.host,
            request.port,
            Transport.HTTPS_CONNECT,
            flow.client_conn,
            traceparent=request.headers.get("traceparent"),
            justification=request.headers.get(JUSTIFICATION_HEADER),
        )
        flow.metadata["egress.request_id"] = facts.request_id
        admission = await self.gate.admit(facts, _client_gone(flow.client_conn))
        if not admission.allowed:
            accept = request.headers.get("accept")
            flow.response = _refusal_response(admission, facts, accept, self.gate.policy)
            return
        # TLS to a host under `inspect:` is intercepted (with the proxy's CA) so method and
        # path rules can apply; any other tunnel is relayed untouched after its ClientHello.
        self.adopt_tunnel(flow.client_conn, flow.server_conn, facts, admission)

    async def next_layer(self, nextlayer: layer.NextLayer) -> None:
        # An admitted raw CONNECT: read the ClientHello's server name without intercepting,
        # then relay untouched, or close both ends if it names another host.
        if nextlayer.layer is not None:
            return
        context = nextlayer.context
        tunnel = self._tunnel_of(context.client, context.server)
        if tunnel is None or tunnel.inspect is not None:
            return
        hello = nextlayer.data_client()
        if hello and hello[0] == _TLS_HANDSHAKE:
            try:
                parsed = parse_client_hello(hello)
            except ValueError:
                admission = await self.gate.admit_tls_hello(tunnel.facts, None, malformed=True)
            else:
                if parsed is None:
                    return  # the ClientHello is not complete yet: ask again on more data
                admission = await self.gate.admit_tls_hello(tunnel.facts, parsed.sni)
            if not admission.allowed:
                nextlayer.layer = RefusedTunnel(context)
                self._tunnels.pop(context.client.id, None)
                return
        elif not hello and not nextlayer.data_server():
            return  # nothing seen yet
        if self._relay is None or context.client.transport_protocol != "tcp":
            nextlayer.layer = MeteredTunnel(context, tunnel)
        else:
            nextlayer.layer = RelayedTunnel(context, tunnel, self._relay)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        tunnel = self._tunnel_of(flow.client_conn, flow.server_conn)
        if tunnel is not None and tunnel.inspect is not None:
            await self._inspect(flow, tunnel.facts)
            return
        request = flow.request
        caller = self.gate.identify(_identity(request))
        looped = self._looped(request)
        token = is_http_token(request.method)
        justification = request.headers.get(JUSTIFICATION_HEADER)  # read before stripping
        strip_client_headers(request)
        invalid, detail = self._check_host_header(request)
        if looped:
            invalid, detail = Reason.PRIVATE_NETWORK, "the request came back through this proxy"
        if caller.failure:
            invalid, detail = Reason.AUTH_REQUIRED, caller.failure
        if not token:
            invalid, detail = Reason.INVALID_METHOD, "request method is not an HTTP token"
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
            agent=caller.agent,
            session=caller.session,
            client_address=_client_address(flow.client_conn),
            invalid=invalid,
            invalid_detail=detail,
            traceparent=request.headers.get("traceparent"),
            justification=justification,
        )
        flow.metadata["egress.request_id"] = facts.request_id
        if facts.invalid is None:
            refused = await self._credentials.check_head(flow, facts, inspected=False)
            if refused is not None:
                _refuse(flow, refused, facts, self.gate.policy)
                return
        admission = await self.gate.admit(facts, _client_gone(flow.client_conn))
        if not admission.allowed:
            _refuse(flow, admission, facts, self.gate.policy)
            return
        _start_meter(flow, facts)
        self._credentials.hold_body(flow)
        request.headers.add("Via", self._via)
        assert admission.address is not None
        address = str(admission.address)
        if request.scheme == "http":
            # Dial the checked IP; the Host header is untouched, and keep-alive reuse matches.
            request.data.host = address
            self._pin(flow.client_conn, (address, request.port), admission, request.port)
        else:
            self._pin(flow.client_conn, (request.host, request.port), admission, request.port)

    async def _inspect(self, flow: http.HTTPFlow, tunnel: RequestFacts) -> None:
        """A request inside an intercepted tunnel: the tunnel's host, this method and path."""
        request = flow.request
        strip_client_headers(request)
        invalid: Reason | None = None
        detail = ""
        header = request.host_header
        header_host, header_port = _parse_host_header(header, tunnel.port) if header else (None, 0)
        if header is not None and (header_host != tunnel.host or header_port != tunnel.port):
            invalid, detail = Reason.HOST_MISMATCH, "Host header does not match the tunnel"
        if not is_http_token(request.method):  # HTTP/2 checks :method for NUL/CR/LF only
            invalid, detail = Reason.INVALID_METHOD, "request method is not an HTTP token"
        elif request.authority:
            # An absolute-form target inside the tunnel must name the tunnel's own host.
            target, port = _parse_host_header(request.authority, tunnel.port)
            if target != tunnel.host or port != tunnel.port:
                invalid, detail = Reason.HOST_MISMATCH, "request target does not match the tunnel"
        facts = replace(
            tunnel,
            request_id=_new_request_id(),
            transport=Transport.HTTPS_INSPECTED,
            method=request.method,
            path=request.path.partition("?")[0],  # as sent; the gate matches it normalised
            invalid=invalid,
            invalid_detail=detail,
            traceparent=request.headers.get("traceparent") or tunnel.traceparent,
        )
        if invalid is None:
            refused = await self._credentials.check_head(flow, facts, inspected=True)
            if refused is not None:
                _refuse(flow, refused, facts, self.gate.policy)
                return
        admission = await self.gate.admit_inspected(facts)
        if not admission.allowed:
            _refuse(flow, admission, facts, self.gate.policy)
            return
        self._credentials.swap(flow, facts)
        _start_meter(flow, facts)
        self._credentials.hold_body(flow)

    @staticmethod
    def _check_host_header(request: http.Request) -> tuple[Reason | None, str]:
        header = request.host_header
        if header is None:
            return None, ""
        target = _host_or_none(request.host)
        header_host, port = _parse_host_header(header, 443 if request.scheme == "https" else 80)
        if target is None or header_host is None or header_host != target or port != request.port:
            return Reason.HOST_MISMATCH, f"Host header {header!r} does not match the target"
        return None, ""

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        # Every upstream connection must have been admitted; dial the checked address only.
        address = data.server.address
        tunnel = self._tunnel_of(data.client, data.server)
        pin = tunnel.pin if tunnel is not None else None
        if pin is None and address is not None:
            pin = self._pins.get(data.client.id, {}).get((address[0], address[1]))
        if pin is None or address is None:
            data.server.error = "egress-warden: upstream connection was not admitted"
            return
        if data.server.sni is None and address[0] != pin.address:
            data.server.sni = address[0]  # TLS to the upstream (if any) names the host, not the IP
        data.server.address = (pin.address, pin.port)

    # -- SOCKS5 (the layer is addons/socks.py) ------------------------------------------------

    def socks5_auth(self, data: Socks5AuthData) -> None:
        """SOCKS5 username/password are the proxy credentials (agent[~session] / token),
        verified like `Proxy-Authorization`; a failure ends the handshake (RFC 1929 0x01)."""
        basic = base64.b64encode(f"{data.username}:{data.password}".encode()).decode()
        identity = parse_proxy_authorization(f"Basic {basic}")
        caller = self.gate.identify(identity)
        if identity is None:  # credentials were offered but do not parse: never anonymous
            caller = Caller(failure=INVALID_CREDENTIALS)
        self._socks_callers[data.client_conn] = caller
        data.valid = caller.failure is None

    async def egress_socks_connect(self, data: SocksConnectData) -> None:
        """A SOCKS5 CONNECT, decided like an HTTP CONNECT: a name (socks5h) is resolved by the
        gate only once admitted; an IP literal (the client resolved it) is checked as such.
        Admitted, it is a tunnel like any other: pinned, SNI-checked, metered, re-checked."""
        caller = self._socks_callers.get(data.client) or self.gate.identify(None)
        facts = _tunnel_facts(caller, data.host, data.port, Transport.SOCKS5, data.client)
        admission = await self.gate.admit(facts, _client_gone(data.client))
        if not admission.allowed:
            return
        # A host under `inspect:` is intercepted here as through CONNECT, so its method and
        # path rules cannot be bypassed by asking over SOCKS.
        self.adopt_tunnel(data.client, data.server, facts, admission)
        data.allowed = True

    # -- transparent mode (the layer and its hook are addons/transparent.py) -----------------

    def adopt_tunnel(
        self,
        client: connection.Client,
        server: connection.Server,
        facts: RequestFacts,
        admission: Admission,
    ) -> None:
        """An admitted CONNECT, SOCKS or transparent connection becomes a tunnel: pinned to
        the checked address, SNI-checked, metered, re-checked on rule changes."""
        assert facts.host is not None and admission.address is not None
        self._close_tunnel(self._tunnels.pop(client.id, None))
        self._tunnels[client.id] = _Tunnel(
            facts,
            server_id=server.id,
            pin=_Pin(str(admission.address), facts.port),
            inspect=admission.inspect,
            admitted=admission.decision,
        )

    async def request(self, flow: http.HTTPFlow) -> None:
        refused = await self._credentials.check_body(flow)
        if refused is not None:
            _refuse(flow, refused[0], refused[1], self.gate.policy)
            return
        meter = flow.metadata.get("egress.meter")
        if isinstance(meter, _Meter) and not callable(flow.request.stream):
            meter.sent += len(flow.request.raw_content or b"")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Responses are streamed through, counted on the way; never buffered whole.
        meter = flow.metadata.get("egress.meter")
        if isinstance(meter, _Meter) and flow.response is not None:
            flow.response.stream = meter.count_received

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:  # a WebSocket's meter runs on past the 101, to its end
            self._close_exchange(flow)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        # Payload bytes of each whole message (as for HTTP bodies: no framing or headers).
        meter = flow.metadata.get("egress.meter")
        if isinstance(meter, _Meter) and flow.websocket is not None:
            message = flow.websocket.messages[-1]
            if message.from_client:
                meter.sent += len(message.content)
            else:
                meter.received += len(message.content)
        if flow.websocket is not None and not self.keep_websocket_messages:
            # mitmproxy appends every message to the flow for as long as the connection lives
            # (75 MB relayed: 75 MB more RSS); nothing here reads them after this hook.
            del flow.websocket.messages[:-1]

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._close_exchange(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._close_exchange(flow)

    def _close_exchange(self, flow: http.HTTPFlow) -> None:
        meter = flow.metadata.pop("egress.meter", None)
        if isinstance(meter, _Meter):
            self.gate.telemetry.emit(meter.close_event())

    def client_disconnected(self, client: connection.Client) -> None:
        self._pins.pop(client.id, None)
        self._close_tunnel(self._tunnels.pop(client.id, None))

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if self._tunnel_of(data.client, data.server) is not None:
            self._close_tunnel(self._tunnels.pop(data.client.id))

    def close_all(self) -> None:
        """At shutdown: every tunnel still open stops and reports its bytes."""
        abort_all()  # relayed tunnels stop first, so their counts are final
        for client_id in list(self._tunnels):
            self._close_tunnel(self._tunnels.pop(client_id))

    def _close_tunnel(self, tunnel: _Tunnel | None) -> None:
        # Raw tunnels report their bytes; an inspected one's exchanges each reported their own.
        if tunnel is not None and tunnel.inspect is None:
            self.gate.telemetry.emit(tunnel.close_event())


# -- plain mitmproxy: `mitmdump -s addons/warden.py --set egress_policy=FILE` -----------------


class ScriptWarden(EgressWarden):
    """The warden as a mitmproxy script, for teams that already run mitmdump or mitmweb: the
    same gate over the policy files named by `egress_policy` (reloaded on `--set`), with
    anonymous callers and no approval queue (a miss under `ask` is refused
    `approval_unavailable`; `egress-warden run` has the rest). Raw CONNECT tunnels are
    intercepted by mitmproxy's own layers here: clients must trust mitmproxy's CA."""

    keep_websocket_messages = True  # mitmweb shows them, `-w` saves them

    def __init__(self) -> None:  # the gate is built in `configure`, once the options are known
        self._built = False

    def load(self, loader: Any) -> None:
        loader.add_option(
            "egress_policy", Sequence[str], [], "egress-warden policy files (repeatable)"
        )
        loader.add_option(
            "egress_resolve", Sequence[str], [], "egress-warden HOST:IP resolution overrides"
        )

    def configure(self, updated: set[str]) -> None:
        if not updated & {"egress_policy", "egress_resolve"}:
            return
        from mitmproxy import ctx, exceptions

        from proxy.auth import Authenticator
        from proxy.gate import Snapshot
        from proxy.netguard import NetGuard
        from proxy.policy.load import PolicyErrors
        from proxy.policy.requirements import load_effective
        from proxy.resolve import Resolver, parse_resolve_option
        from proxy.telemetry import Telemetry
        from proxy.telemetry.hub import StructlogSink

        files = list(ctx.options.egress_policy)
        if not files:
            raise exceptions.OptionsError("egress_policy: name at least one policy file")
        try:
            policy, _warnings = load_effective(files)
            resolve = dict(parse_resolve_option(r) for r in ctx.options.egress_resolve)
        except PolicyErrors as errors:
            raise exceptions.OptionsError("; ".join(str(e) for e in errors.errors)) from None
        except ValueError as exc:
            raise exceptions.OptionsError(str(exc)) from None
        snapshot = Snapshot(policy, Authenticator(), NetGuard([]))
        if self._built:
            self.gate.snapshot = snapshot  # a `--set` at run time: the new policy, whole
            return
        gate = Gate(snapshot, Resolver(resolve), Telemetry([StructlogSink()]))
        super().__init__(gate)
        self._built = True


addons = [ScriptWarden()] if __name__.startswith("__mitmproxy_script__") else []
