"""The transparent edge (`run --transparent H:P`): connections the kernel redirected to the proxy
(nftables/iptables REDIRECT in a sidecar's network namespace), decided by the same gate as
CONNECT before anything is dialled.

mitmproxy's own transparent layer dials the client's original destination at once; this one
first reads what the client sends: the TLS ClientHello's server name or the HTTP Host header
names the destination, and the gate resolves that name itself, so the address the client chose
is never dialled (a forged SNI towards an attacker's address reaches only the named host's real
address). A connection that names nothing (raw TCP, or a server-speaks-first protocol that sends
nothing within `FIRST_BYTES_WAIT`) is decided by the name the policy-aware DNS
(`proxy/dnsserver.py`) handed its address out for (a synthetic address for an `ask` name, or an
allowed name's real address), else on the original destination address, an IP literal that only
an IP/CIDR rule can allow. Identity comes from the source address
(`run --source-agent CIDR=AGENT`). Admitted, the connection is a tunnel like a CONNECT one:
pinned, SNI-checked, metered, re-checked on rule changes (the warden's tunnel path); plain HTTP
and hosts under `inspect:` are read request by request (the warden's inspected path), so a
kept-alive connection cannot switch to another Host.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from mitmproxy import connection
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy import commands, events, layer, mode_servers
from mitmproxy.proxy.commands import StartHook
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tls import parse_client_hello

from addons import warden as warden_module
from addons.warden import EgressWarden
from proxy.auth import Caller
from proxy.facts import RequestFacts, Transport
from proxy.hosts import Host, InvalidHost, canonicalize_host
from proxy.policy.model import InspectRule
from proxy.verdicts import Reason

FIRST_BYTES_WAIT = 1.0  # seconds: a client that sends nothing by then is decided as raw TCP
MAX_SNIFF = 16 * 1024  # bytes read before deciding: a ClientHello or an HTTP head fits
_TLS_HANDSHAKE = 0x16
_HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")


@dataclass(frozen=True, slots=True)
class Sniffed:
    """What the first bytes say: how the destination is named (None: not named) and by what."""

    name: str | None
    scheme: str  # https (a ClientHello), http (a request head) or tcp
    complete: bool  # False: wait for more bytes
    malformed: bool = False


def sniff(data: bytes) -> Sniffed:
    """Name the destination from a connection's first bytes, without consuming them."""
    if not data:
        return Sniffed(None, "tcp", False)
    if data[0] == _TLS_HANDSHAKE:
        try:
            hello = parse_client_hello(data)
        except ValueError:
            return Sniffed(None, "https", True, malformed=True)
        if hello is None:
            return Sniffed(None, "https", len(data) >= MAX_SNIFF, malformed=len(data) >= MAX_SNIFF)
        return Sniffed(hello.sni, "https", True)
    if any(m.startswith(data[: len(m)]) or data.startswith(m) for m in _HTTP_METHODS):
        head, sep, _ = data.partition(b"\r\n\r\n")
        if not sep:
            return Sniffed(None, "http", len(data) >= MAX_SNIFF)
        for line in head.split(b"\r\n")[1:]:
            field, colon, value = line.partition(b":")
            if colon and field.strip().lower() == b"host":
                text = value.strip().decode("ascii", "backslashreplace")
                return Sniffed(_strip_port(text), "http", True)
        return Sniffed(None, "http", True)
    return Sniffed(None, "tcp", True)


def _strip_port(authority: str) -> str:
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else authority
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() else authority


@dataclass
class TransparentConnectData:
    """One redirected connection: where it was going and what its first bytes named; the
    warden sets `allowed` (and `refusal`, bytes to send before closing a refused one)."""

    client: connection.Client
    server: connection.Server
    original: tuple[str, int]  # the destination the client dialled (SO_ORIGINAL_DST)
    sniffed: Sniffed
    allowed: bool = False
    dial_host: str = ""  # the admitted name (or IP literal): the server address
    refusal: bytes = b""


@dataclass
class EgressTransparentConnectHook(StartHook):
    """A redirected connection named its destination (or did not): admit it or not."""

    data: TransparentConnectData


class WardenTransparentProxy(layer.Layer):
    """mitmproxy's TransparentProxy, deciding before it dials (see the module docstring)."""

    child_layer: layer.Layer | None

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.child_layer = None
        self._buf = b""
        self._wakeup: commands.RequestWakeup | None = None
        self._deciding = False

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup) and event.command is self._wakeup:
            self._wakeup = None
            if self.child_layer is None and not self._deciding:
                yield from self._decide(sniff(self._buf))
            return
        if self.child_layer is not None:
            yield from self.child_layer.handle_event(event)
            return
        if isinstance(event, events.Start):
            self._wakeup = commands.RequestWakeup(FIRST_BYTES_WAIT)
            yield self._wakeup
        elif isinstance(event, events.DataReceived) and event.connection is self.context.client:
            self._buf += event.data
            sniffed = sniff(self._buf)
            if sniffed.complete and not self._deciding:
                yield from self._decide(sniffed)
        elif isinstance(event, events.ConnectionClosed):
            yield commands.CloseConnection(self.context.client)
            self._deciding = True  # nothing left to decide

    def _decide(self, sniffed: Sniffed) -> layer.CommandGenerator[None]:
        self._deciding = True
        original = self.context.server.address
        assert original is not None
        data = TransparentConnectData(
            self.context.client, self.context.server, (str(original[0]), original[1]), sniffed
        )
        yield EgressTransparentConnectHook(data)
        if not data.allowed:
            if data.refusal:
                yield commands.SendData(self.context.client, data.refusal)
            yield commands.CloseConnection(self.context.client)
            return
        # The warden pins the dialled address in `server_connect`; this is the admitted name.
        self.context.server.address = (data.dial_host, original[1])
        self.child_layer = child = layer.NextLayer(self.context)
        err = yield commands.OpenConnection(self.context.server)
        if err:
            yield commands.CloseConnection(self.context.client)
            self.child_layer = _Closed(self.context)
            return
        yield from child.handle_event(events.Start())
        if self._buf:
            data_, self._buf = self._buf, b""
            yield from child.handle_event(events.DataReceived(self.context.client, data_))


class _Closed(layer.Layer):
    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from ()


def install() -> None:
    """Make mitmproxy's `transparent` mode use this layer (as `addons.socks.install`)."""

    def make_top_layer(self: mode_servers.TransparentInstance, context: Context) -> layer.Layer:
        return WardenTransparentProxy(context)

    mode_servers.TransparentInstance.make_top_layer = make_top_layer  # type: ignore[method-assign]


class SourceAgents:
    """Identity in transparent mode: the agent whose source network a connection comes from
    (most specific network first); unmapped sources are anonymous callers."""

    def __init__(self, mapping: Sequence[tuple[str, str]]) -> None:
        nets = [(ipaddress.ip_network(net), agent) for net, agent in mapping]
        self._nets = sorted(nets, key=lambda item: item[0].prefixlen, reverse=True)

    def agent_for(self, address: str | None) -> str | None:
        if address is None or not self._nets:
            return None
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for net, agent in self._nets:
            if ip.version == net.version and ip in net:
                return agent
        return None


def _host_or_none(raw: str) -> Host | None:
    try:
        return canonicalize_host(raw)
    except InvalidHost:
        return None


class TransparentEdge:
    """Turns redirected connections into facts for the gate; admitted ones become the warden's
    tunnels (the same relay, SNI check, metering and revocation as CONNECT)."""

    def __init__(
        self,
        warden: EgressWarden,
        sources: SourceAgents,
        name_for_address: Callable[[str], str | None] = lambda _address: None,
    ) -> None:
        self._warden = warden
        self._sources = sources
        # From the policy-aware DNS: the name a (synthetic or real) address was handed out for.
        self._name_for_address = name_for_address

    def _caller(self, client: connection.Client) -> Caller:
        gate = self._warden.gate
        agent = self._sources.agent_for(warden_module._client_address(client))
        if agent is None:
            return gate.identify(None)  # anonymous: refused when the proxy requires identity
        registry = gate.snapshot.auth.registry
        if registry is None or agent not in registry:
            return Caller(failure=f"source address mapped to unregistered agent {agent!r}")
        return Caller(agent)

    async def egress_transparent_connect(self, data: TransparentConnectData) -> None:
        gate = self._warden.gate
        sniffed = data.sniffed
        original = data.original[0]
        raw_host = sniffed.name or self._name_for_address(original) or original
        caller = self._caller(data.client)
        invalid: Reason | None = None
        detail = ""
        if sniffed.malformed:
            invalid, detail = Reason.INVALID_REQUEST, "malformed first bytes (TLS or HTTP)"
        if caller.failure:
            invalid, detail = Reason.AUTH_REQUIRED, caller.failure
        facts = RequestFacts(
            request_id=warden_module._new_request_id(),
            raw_host=raw_host,
            host=_host_or_none(raw_host),
            port=data.original[1],
            transport=Transport.TRANSPARENT,
            method="CONNECT",
            scheme=sniffed.scheme,
            agent=caller.agent,
            session=caller.session,
            invalid=invalid,
            invalid_detail=detail,
            client_address=warden_module._client_address(data.client),
        )
        admission = await gate.admit(facts, warden_module._client_gone(data.client))
        if not admission.allowed:
            if sniffed.scheme == "http":
                response = warden_module._refusal_response(admission, facts, None, gate.policy)
                data.refusal = assemble_response(response)
            return
        assert facts.host is not None and admission.address is not None
        # The gate names `inspect:` rules for CONNECT and SOCKS5 only; a redirected connection
        # to such a host is intercepted too, so its method and path rules still apply.
        inspect = admission.inspect or gate.policy.inspect_rule(facts.host, facts.port)
        if inspect is None and sniffed.scheme == "http":
            # Plain HTTP is read request by request, never relayed blind: each request's Host
            # must name the admitted host (no switching to another tenant of the same address
            # on a kept-alive connection), client headers are stripped, credentials scanned.
            inspect = InspectRule(facts.host.name, None, (), source="transparent:http")
        self._warden.adopt_tunnel(
            data.client, data.server, facts, replace(admission, inspect=inspect)
        )
        data.dial_host = facts.host.name
        data.allowed = True
