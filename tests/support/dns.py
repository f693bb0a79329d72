"""A real DNS server on loopback (UDP and TCP, one port) that answers from a table and records
every name it is asked, so tests can prove which names were (never) queried."""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType

import dns.exception
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

TTL = 60
_BIND_ATTEMPTS = 20  # the TCP listener must share the UDP port (resolvers retry truncated answers)


def _normalise(name: str) -> str:
    return name.rstrip(".").lower()


class DnsServer:
    """Answers A (IPv4) or AAAA (IPv6) for the names in `answers`, an empty NOERROR for the other
    type of a known name, NXDOMAIN for every other name; records each question it receives.

    Listens on `host` (127.0.0.1 or ::1), UDP and TCP on one port chosen by the kernel."""

    def __init__(self, answers: Mapping[str, str], host: str = "127.0.0.1", ttl: int = TTL) -> None:
        self._answers = {_normalise(n): ipaddress.ip_address(a) for n, a in answers.items()}
        self._ttl = ttl
        self._lock = threading.Lock()
        self._questions: list[tuple[str, str]] = []
        self._packets = 0
        self._udp, self._tcp = self._bind(host)
        self._threads = [
            threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"dns-{kind}-{self.port}",
                daemon=True,
            )
            for kind, server in (("udp", self._udp), ("tcp", self._tcp))
        ]
        for thread in self._threads:
            thread.start()

    def _bind(self, host: str) -> tuple[socketserver.UDPServer, socketserver.ThreadingTCPServer]:
        udp_handler, tcp_handler = _handlers(self)
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        for _ in range(_BIND_ATTEMPTS):
            udp = _UdpServer(family, (host, 0), udp_handler)
            try:
                tcp = _TcpServer(family, (host, udp.server_address[1]), tcp_handler)
            except OSError:  # the TCP port was taken: pick another UDP port
                udp.server_close()
                continue
            return udp, tcp
        raise OSError(f"no port free for both UDP and TCP on {host} after {_BIND_ATTEMPTS} tries")

    @property
    def host(self) -> str:
        return str(self._udp.server_address[0])

    @property
    def port(self) -> int:
        return int(self._udp.server_address[1])

    @property
    def address(self) -> tuple[str, int]:
        """(IP, port), as `Resolver(nameservers=[...])` takes it."""
        return self.host, self.port

    @property
    def queries(self) -> list[str]:
        """Every name asked, in order: lower-case, no trailing dot (one entry per question)."""
        with self._lock:
            return [name for name, _type in self._questions]

    @property
    def questions(self) -> list[tuple[str, str]]:
        """Every (name, type) asked, in order, e.g. `("api.test", "AAAA")`."""
        with self._lock:
            return list(self._questions)

    @property
    def packets(self) -> int:
        """Messages received, parseable or not (a malformed query still leaks to the network)."""
        with self._lock:
            return self._packets

    def queried(self, name: str) -> bool:
        """The name or any name under it was asked."""
        wanted = _normalise(name)
        return any(q == wanted or q.endswith("." + wanted) for q in self.queries)

    def clear(self) -> None:
        """Forget what was recorded so far."""
        with self._lock:
            self._questions.clear()
            self._packets = 0

    def reply(self, wire: bytes) -> bytes | None:
        """The response to one query message, or None (no reply) if it does not parse."""
        with self._lock:
            self._packets += 1
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        for question in query.question:
            name = _normalise(question.name.to_text())
            with self._lock:
                self._questions.append((name, dns.rdatatype.to_text(question.rdtype)))
            address = self._answers.get(name)
            if address is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                continue
            rdtype = dns.rdatatype.A if address.version == 4 else dns.rdatatype.AAAA
            if question.rdclass == dns.rdataclass.IN and question.rdtype == rdtype:
                response.answer.append(
                    dns.rrset.from_text(
                        question.name, self._ttl, dns.rdataclass.IN, rdtype, str(address)
                    )
                )
        return response.to_wire()

    def close(self) -> None:
        for server in (self._udp, self._tcp):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _UdpServer(socketserver.UDPServer):
    def __init__(
        self,
        family: socket.AddressFamily,
        address: tuple[str, int],
        handler: type[socketserver.BaseRequestHandler],
    ) -> None:
        self.address_family = family  # read by the base class when it creates the socket
        super().__init__(address, handler)


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(
        self,
        family: socket.AddressFamily,
        address: tuple[str, int],
        handler: type[socketserver.BaseRequestHandler],
    ) -> None:
        self.address_family = family
        super().__init__(address, handler)


def _handlers(
    server: DnsServer,
) -> tuple[type[socketserver.BaseRequestHandler], type[socketserver.StreamRequestHandler]]:
    class UdpHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            reply = server.reply(data)
            if reply is not None:
                sock.sendto(reply, self.client_address)

    class TcpHandler(socketserver.StreamRequestHandler):
        timeout = 5

        def handle(self) -> None:
            # Two-byte length prefix per message (RFC 1035 4.2.2); a client may send several.
            while True:
                try:
                    prefix = self.rfile.read(2)
                    if len(prefix) < 2:
                        return
                    wire = self.rfile.read(int.from_bytes(prefix, "big"))
                except OSError:  # includes the read timeout
                    return
                reply = server.reply(wire)
                if reply is None:
                    return
                self.wfile.write(len(reply).to_bytes(2, "big") + reply)

    return UdpHandler, TcpHandler


@pytest.fixture
def dns_server() -> Iterator[Callable[[Mapping[str, str]], DnsServer]]:
    """A factory: `dns_server({"api.test": "127.0.0.2"})` starts one; all stop at teardown."""
    started: list[DnsServer] = []

    def start(answers: Mapping[str, str]) -> DnsServer:
        server = DnsServer(answers)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
