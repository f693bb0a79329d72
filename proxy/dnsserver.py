"""The policy-aware DNS listener (`run --dns H:P`): the only resolver an agent in a sidecar
deployment can reach, so DNS can neither leak a name nor open a way around the policy.

Every question is decided by the gate's dry run (the same steps as a live request, no holding):
an allowed name is answered with the address the proxy itself resolved (the one it would dial),
a denied or invalid name is answered REFUSED, and a name no rule knows (`ask`) is answered from a
synthetic pool (`SyntheticPool`) without any upstream query: the connection that follows is
redirected to the transparent listener, which maps the synthetic address back to the name and
holds it for approval like any other request. Each question is one decision event
(`network.transport.protocol=dns`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
from collections import OrderedDict
from dataclasses import dataclass, replace

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import structlog

from proxy.config import Endpoint
from proxy.facts import RequestFacts, Transport
from proxy.gate import Gate
from proxy.hosts import Host, InvalidHost, IPAddress, canonicalize_host
from proxy.resolve import ResolutionError
from proxy.telemetry import DecisionEvent
from proxy.verdicts import Decision, Reason, Tier, Verdict

log = structlog.get_logger("egress-warden")

# RFC 2544's benchmarking range: never routed on the internet, so a synthetic answer can only
# lead back to this proxy (netguard classifies it as reserved: unmapped, it is refused).
SYNTHETIC_NETWORK = ipaddress.IPv4Network("198.18.0.0/15")
SYNTHETIC_TTL = 60  # seconds; the mapping outlives it (see SyntheticPool)
ANSWER_TTL = 5  # real answers: as short as the resolver's cache, the address is re-checked anyway
DECISION_PORT = 443  # DNS carries no port: a name is decided as the HTTPS destination it names
MAX_TCP_MESSAGE = 65535
TCP_IDLE = 10.0  # seconds a DNS-over-TCP client may stay silent
ANSWERED_ENTRIES = 65536  # real answers remembered (address -> name), oldest forgotten first


class SyntheticPool:
    """Name <-> synthetic address, both ways. Addresses are handed out in order and recycled
    least-recently-used first once the pool is full (a /15 holds 131070 names)."""

    def __init__(self, network: ipaddress.IPv4Network = SYNTHETIC_NETWORK) -> None:
        self.network = network
        self._hosts = network.hosts()
        self._by_name: OrderedDict[str, ipaddress.IPv4Address] = OrderedDict()
        self._by_address: dict[ipaddress.IPv4Address, str] = {}

    def address_for(self, name: str) -> ipaddress.IPv4Address:
        """The synthetic address of `name` (a new one on first use)."""
        address = self._by_name.get(name)
        if address is not None:
            self._by_name.move_to_end(name)
            return address
        address = next(self._hosts, None)
        if address is None:  # full: recycle the least recently used
            _old, address = self._by_name.popitem(last=False)
            del self._by_address[address]
        self._by_name[name] = address
        self._by_address[address] = name
        return address

    def name_for(self, address: IPAddress | str) -> str | None:
        """The name a synthetic address stands for, or None."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        if not isinstance(ip, ipaddress.IPv4Address):
            return None
        return self._by_address.get(ip)


@dataclass(frozen=True, slots=True)
class _Answer:
    rcode: dns.rcode.Rcode
    address: IPAddress | None = None
    ttl: int = ANSWER_TTL


_ids = itertools.count(1)
_RANK = {Verdict.DENY: 0, Verdict.HOLD: 1, Verdict.ALLOW: 2}


class PolicyDns:
    """Answers DNS questions by the policy; never forwards a question anywhere."""

    def __init__(self, gate: Gate, pool: SyntheticPool | None = None) -> None:
        self.gate = gate
        self.pool = pool or SyntheticPool()
        # Real addresses given out for allowed names, so a connection that names nothing (SSH,
        # a database driver) can still be decided by the name it was looked up as.
        self._answered: OrderedDict[str, str] = OrderedDict()

    def name_for(self, address: str) -> str | None:
        """The name an address was handed out for: a synthetic one, else the last allowed
        name answered with it (the proxy still dials its own resolution of that name)."""
        name = self.pool.name_for(address)
        if name is not None:
            return name
        try:
            key = str(ipaddress.ip_address(address))
        except ValueError:
            return None
        return self._answered.get(key)

    def _remember(self, address: IPAddress, name: str) -> None:
        key = str(address)
        self._answered.pop(key, None)
        self._answered[key] = name
        if len(self._answered) > ANSWERED_ENTRIES:
            self._answered.popitem(last=False)

    async def answer(self, wire: bytes, client: str | None) -> bytes | None:
        """The response to one query message (None: not a query, no reply)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if query.flags & dns.flags.QR:
            return None  # a response, not a question: never answer (no reflection loops)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP if query.question else dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text()
        result = await self._decide(name, question.rdtype, client)
        response.set_rcode(result.rcode)
        address = result.address
        if address is not None and question.rdclass == dns.rdataclass.IN:
            rdtype = dns.rdatatype.A if address.version == 4 else dns.rdatatype.AAAA
            if question.rdtype == rdtype:
                response.answer.append(
                    dns.rrset.from_text(
                        question.name, result.ttl, dns.rdataclass.IN, rdtype, str(address)
                    )
                )
        return response.to_wire()

    async def _decide(self, name: str, rdtype: int, client: str | None) -> _Answer:
        host: Host | None
        try:
            host = canonicalize_host(name)
            invalid, detail = None, ""
        except InvalidHost as exc:
            host, invalid, detail = None, Reason.INVALID_HOST, str(exc)
        if host is not None and host.ip is not None:
            host, invalid, detail = None, Reason.INVALID_HOST, "an IP address is not a DNS name"
        facts = RequestFacts(
            request_id=f"dns-{next(_ids):x}",
            raw_host=name.rstrip("."),
            host=host,
            port=DECISION_PORT,
            transport=Transport.DNS,
            method=dns.rdatatype.to_text(rdtype),  # type: ignore[arg-type]
            scheme="dns",
            client_address=client,
            invalid=invalid,
            invalid_detail=detail,
        )
        decision, facts = await self._decide_ports(facts)
        address: IPAddress | None = None
        answer = _Answer(dns.rcode.REFUSED)
        if decision.verdict is Verdict.ALLOW and host is not None:
            try:
                address = await self.gate.resolver.resolve(host, DECISION_PORT)
            except ResolutionError as exc:
                decision = Decision(
                    Verdict.DENY, Reason.DNS_FAILURE, detail=str(exc), tier=Tier.GUARD
                )
            else:
                answer = _Answer(dns.rcode.NOERROR, address)
                self._remember(address, host.name)
        elif decision.verdict is Verdict.HOLD and host is not None:
            # Never asked upstream: the connection that follows is held by name at the proxy.
            address = self.pool.address_for(host.name)
            answer = _Answer(dns.rcode.NOERROR, address, SYNTHETIC_TTL)
        self.gate.telemetry.emit(DecisionEvent(facts, decision, self.gate.policy.mode, address))
        return answer

    async def _decide_ports(self, facts: RequestFacts) -> tuple[Decision, RequestFacts]:
        """DNS carries no port: a name is answered if the policy lets it through on any port it
        allows (443 first), by the same dry run as a live request (no hold, no event)."""
        ports = [DECISION_PORT, *sorted(self.gate.policy.ports - {DECISION_PORT})]
        best: tuple[Decision, RequestFacts] | None = None
        for port in ports:
            candidate = replace(facts, port=port)
            decision = await self.gate.dry_run(candidate)
            if best is None or _RANK[decision.verdict] > _RANK[best[0].verdict]:
                best = (decision, candidate)
            if decision.verdict is Verdict.ALLOW or facts.host is None:
                break
        assert best is not None
        return best


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: PolicyDns) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self._transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        task = asyncio.ensure_future(self._reply(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        reply = await self._server.answer(data, str(addr[0]))
        if reply is not None and self._transport is not None:
            if len(reply) > 512:  # classic UDP limit: the client retries over TCP
                truncated = dns.message.from_wire(reply)
                truncated.answer.clear()
                truncated.flags |= dns.flags.TC
                reply = truncated.to_wire()
            self._transport.sendto(reply, addr)


class DnsListener:
    """The UDP and TCP listeners of one `PolicyDns`, on one port."""

    def __init__(self, server: PolicyDns) -> None:
        self.server = server
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._udp is not None
        host, port = self._udp.get_extra_info("sockname")[:2]
        return str(host), int(port)

    async def start(self, endpoint: Endpoint) -> None:
        """Bind UDP, then TCP on the same port (port 0: the port UDP got). Raises OSError."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self.server), local_addr=(endpoint.host, endpoint.port)
        )
        self._udp = transport
        try:
            self._tcp = await asyncio.start_server(
                self._serve_tcp, endpoint.host, self.address[1], reuse_address=True
            )
        except OSError:
            transport.close()
            raise
        log.info("egress.dns.listening", dns=f"{endpoint.host}:{self.address[1]}")

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else None
        try:
            while True:  # two-byte length prefix per message (RFC 1035 4.2.2)
                prefix = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                wire = await asyncio.wait_for(
                    reader.readexactly(int.from_bytes(prefix, "big")), TCP_IDLE
                )
                reply = await self.server.answer(wire, client)
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(OSError):
                await asyncio.wait_for(self._tcp.wait_closed(), 2)
