"""Raw clients for CONNECT tunnels: open a tunnel byte by byte, speak HTTP/1.1 over any socket,
and drive a TLS handshake by hand (ssl.MemoryBIO) so a ClientHello can be sent in pieces."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass
class TunnelRefused(Exception):
    """The proxy answered the CONNECT with something other than 200."""

    status: int
    head: bytes


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def _read_head(sock: socket.socket | ssl.SSLSocket) -> bytes:
    # One byte at a time: nothing after the blank line may be consumed (it is the tunnel's).
    data = b""
    while not data.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError(f"closed before the end of the response head: {data!r}")
        data += byte
    return data


def open_tunnel(
    proxy_port: int,
    target: str,
    timeout: float = 10.0,
    host: str = "127.0.0.1",
    early: bytes = b"",
) -> socket.socket:
    """CONNECT `target` (host:port) through the proxy; the socket once the 200 is read.
    `early` bytes go out in the same write as the CONNECT, before its answer."""
    sock = socket.create_connection((host, proxy_port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + early)
        head = _read_head(sock)
    except BaseException:
        sock.close()
        raise
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        sock.close()
        raise TunnelRefused(status, head)
    return sock


@contextlib.contextmanager
def tls_tunnel(
    proxy_port: int, target: str, context: ssl.SSLContext, server_hostname: str | None
) -> Iterator[ssl.SSLSocket]:
    """A TLS session (handshake done) through a CONNECT tunnel to `target`."""
    with (
        open_tunnel(proxy_port, target) as sock,
        context.wrap_socket(sock, server_hostname=server_hostname) as tls,
    ):
        yield tls


def read_reply(sock: socket.socket | ssl.SSLSocket) -> Reply:
    """One HTTP/1.1 response (Content-Length framed, or read to the end)."""
    head = _read_head(sock).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    length = headers.get("content-length")
    while length is None or len(body) < int(length):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Reply(status, headers, body)


def exchange(sock: socket.socket | ssl.SSLSocket, request: bytes) -> Reply:
    """Send raw request bytes and read one response."""
    sock.sendall(request)
    return read_reply(sock)


def get_request(path: str, host: str, *extra: str) -> bytes:
    """A GET with `path` exactly as given (no normalisation) and `Connection: close`."""
    headers = "".join(f"{line}\r\n" for line in (f"Host: {host}", *extra, "Connection: close"))
    return f"GET {path} HTTP/1.1\r\n{headers}\r\n".encode("latin-1")


def peer_closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the other end closes (EOF or reset) without sending a byte; False if it sends
    something or stays open for `timeout`."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class ManualTls:
    """A TLS client over MemoryBIOs: the caller decides how its bytes reach the socket."""

    def __init__(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)

    def client_hello(self) -> bytes:
        """The first flight (the ClientHello records), not yet sent."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    def finish_handshake(self, sock: socket.socket) -> None:
        """Complete the handshake over `sock` after the ClientHello went out by other means."""
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush(sock)
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the TLS handshake") from None
                self.incoming.write(data)
                continue
            self._flush(sock)
            return

    def request(self, sock: socket.socket, request: bytes) -> Reply:
        """Send `request` inside the TLS session and read one response to the end."""
        self.tls.write(request)
        self._flush(sock)
        data = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                received = sock.recv(65536)
                if not received:
                    break
                self.incoming.write(received)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
        }
        return Reply(int(lines[0].split(" ", 2)[1]), headers, body)

    def _flush(self, sock: socket.socket) -> None:
        pending = self.outgoing.read()
        if pending:
            sock.sendall(pending)


def send_in_pieces(sock: socket.socket, data: bytes, cuts: Sequence[int], pause: float) -> None:
    """Send `data` as separate TCP writes split at the offsets `cuts`, pausing between them."""
    start = 0
    for cut in [*cuts, len(data)]:
        sock.sendall(data[start:cut])
        start = cut
        if start < len(data):
            time.sleep(pause)


def refragment_hello(first_flight: bytes, first_part: int) -> bytes:
    """The same ClientHello carried in two TLS records (the first with `first_part` bytes of the
    handshake message): legal TLS that a one-record parser would misread."""
    assert first_flight[0] == 0x16
    length = int.from_bytes(first_flight[3:5], "big")
    message = first_flight[5 : 5 + length]
    rest = first_flight[5 + length :]
    version = first_flight[1:3]
    records = b""
    for part in (message[:first_part], message[first_part:]):
        records += b"\x16" + version + len(part).to_bytes(2, "big") + part
    return records + rest
