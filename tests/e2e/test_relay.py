"""The raw-tunnel relay (addons/relay.py) against the real proxy and real sockets, on the
splice path and on the portable copy path: bytes arrive intact both ways, half-closes pass
through each way, a slow reader holds the proxy's memory bounded, resets on either side end
the other, a thousand tunnels open and close, and every tunnel's close event counts exactly
the bytes it carried. Revocation and shutdown still end relayed tunnels.

The upstream is a small asyncio server on the allowed address; the first line a client sends
picks what it does (echo, sink, source, ...)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import resource
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import ALLOWED_IP, resolve_args
from tests.support.control import TOKEN_ENV, api
from tests.support.proxy import ProxyProcess, free_port, start_proxy
from tests.support.tunnel import open_tunnel

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
# A fixed pseudo-random block the source repeats: bytes that compress or repeat trivially
# could hide an offset error; a block of 1 MiB + 7 makes every repetition land misaligned.
_BLOCK = random.Random(17).randbytes(MiB + 7)


def _pattern(size: int) -> Iterator[bytes]:
    sent = 0
    while sent < size:
        chunk = _BLOCK[: min(len(_BLOCK), size - sent)]
        sent += len(chunk)
        yield chunk


def _pattern_digest(size: int) -> str:
    digest = hashlib.sha256()
    for chunk in _pattern(size):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Upstream:
    """The test upstream, run on its own event loop thread. Modes (first line):
    `ECHO` echo until EOF, then close; `SINK` read to EOF, answer `<sha256> <count>`, close;
    `SOURCE n` send n pattern bytes, half-close, read to EOF, close;
    `HALF n` send n bytes, half-close, then read to EOF and record the digest in `received`;
    `RST n` send n bytes, then reset the connection (SO_LINGER 0)."""

    port: int = 0
    sent: dict[str, int] = field(default_factory=dict)  # mode line -> bytes written so far
    received: list[tuple[str, int]] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)  # mode lines of connections that ended
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        line = ""
        try:
            line = (await reader.readline()).decode().strip()
            mode, _, arg = line.partition(" ")
            if mode == "ECHO":
                while data := await reader.read(256 * 1024):
                    writer.write(data)
                    await writer.drain()
            elif mode == "SINK":
                digest, count = hashlib.sha256(), 0
                while data := await reader.read(1024 * 1024):
                    digest.update(data)
                    count += len(data)
                writer.write(f"{digest.hexdigest()} {count}\n".encode())
                await writer.drain()
            elif mode in ("SOURCE", "HALF", "RST"):
                self.sent[line] = 0
                for chunk in _pattern(int(arg.split()[0])):  # words after n name the test
                    writer.write(chunk)
                    await writer.drain()
                    self.sent[line] += len(chunk)
                if mode == "RST":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                writer.write_eof()
                digest, count = hashlib.sha256(), 0
                while data := await reader.read(1024 * 1024):
                    digest.update(data)
                    count += len(data)
                if mode == "HALF":
                    self.received.append((digest.hexdigest(), count))
        except OSError:
            pass
        finally:
            self.ended.append(line)
            writer.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    server: asyncio.Server | None = None

    async def serve() -> None:
        nonlocal server
        server = await asyncio.start_server(up.handle, ALLOWED_IP, 0, backlog=2048)
        up.port = server.sockets[0].getsockname()[1]
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    started.wait(10)
    yield up
    assert server is not None
    loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)


SOCKS_PORTS: dict[int, int] = {}  # a relay proxy's HTTP port -> its SOCKS5 port


def _policy(path: Path, upstream: Upstream) -> Path:
    path.write_text(
        f"version: 1\ndefault: deny\nallow: [allowed.test, {ALLOWED_IP}/32]\n"
        f"network: {{ports: [{upstream.port}]}}\n"
    )
    return path


@pytest.fixture(scope="module", params=["splice", "copy"])
def relay_proxy(
    request: pytest.FixtureRequest, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp(f"relay-{request.param}")
    policy = _policy(tmp / "policy.yaml", upstream)
    socks_port = free_port()
    extra = [*resolve_args(), "--resolve", f"revocable.test:{ALLOWED_IP}", "--drain", "1s"]
    extra += ["--socks", f"127.0.0.1:{socks_port}"]
    env = {**TOKEN_ENV, "EGRESS_WARDEN_RELAY": request.param}
    proc = start_proxy(tmp / "state", [policy], *extra, env=env)
    SOCKS_PORTS[proc.proxy_port] = socks_port
    yield proc
    proc.stop()


def _target(upstream: Upstream, host: str = "allowed.test") -> str:
    return f"{host}:{upstream.port}"


def _closes(proxy: ProxyProcess) -> list[dict[str, Any]]:
    return [line for line in list(proxy.lines) if line.get("event") == "egress.connection.close"]


def _new_closes(
    proxy: ProxyProcess, before: int, count: int = 1, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Exactly `count` close events logged after the first `before`."""
    deadline = time.monotonic() + timeout
    while len(_closes(proxy)) < before + count and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # a duplicate would show up now
    lines = _closes(proxy)[before:]
    assert len(lines) == count, f"expected {count} close events, got {len(lines)}: {lines[:3]}"
    return lines


def _counts(line: dict[str, Any]) -> tuple[int, int]:
    return line["egress.bytes.sent"], line["egress.bytes.received"]


def _recv_all(sock: socket.socket, digest: Any | None = None) -> tuple[bytes, int]:
    """Read to EOF; returns the bytes (or b"" when hashing into `digest`) and the count."""
    buf = bytearray(1024 * 1024)
    view = memoryview(buf)
    kept = bytearray()
    count = 0
    while n := sock.recv_into(view):
        count += n
        if digest is None:
            kept += view[:n]
        else:
            digest.update(view[:n])
    return bytes(kept), count


def _sink(sock: socket.socket, size: int) -> tuple[int, bytes]:
    """Upload `size` pattern bytes to the SINK upstream through `sock`, half-close, and read
    its answer; returns the bytes sent (header included) and the answer, checked."""
    header = b"SINK\n"
    sock.sendall(header)
    for chunk in _pattern(size):
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    answer, _ = _recv_all(sock)
    assert answer == f"{_pattern_digest(size)} {size}\n".encode()
    return len(header) + size, answer


SIZES = [0, 1, 64 * 1024, MiB, 200 * MiB]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}B")
def test_upload_arrives_byte_exact_and_is_counted(
    relay_proxy: ProxyProcess, upstream: Upstream, size: int
) -> None:
    before = len(_closes(relay_proxy))
    with open_tunnel(relay_proxy.proxy_port, _target(upstream), timeout=30) as sock:
        sent, answer = _sink(sock, size)
    (line,) = _new_closes(relay_proxy, before)
    assert _counts(line) == (sent, len(answer))
    assert line["network.transport.protocol"] == "https_connect"


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}B")
def test_download_arrives_byte_exact_and_is_counted(
    relay_proxy: ProxyProcess, upstream: Upstream, size: int
) -> None:
    before = len(_closes(relay_proxy))
    header = f"SOURCE {size}\n".encode()
    digest = hashlib.sha256()
    with open_tunnel(relay_proxy.proxy_port, _target(upstream), timeout=30) as sock:
        sock.sendall(header)
        _, count = _recv_all(sock, digest)
        sock.shutdown(socket.SHUT_WR)
    assert count == size
    assert digest.hexdigest() == _pattern_digest(size)
    (line,) = _new_closes(relay_proxy, before)
    assert _counts(line) == (len(header), size)


def test_client_half_close_right_after_its_data_still_gets_the_answer(
    relay_proxy: ProxyProcess, upstream: Upstream
) -> None:
    """The client writes and shuts its side at once: the upstream sees the FIN only after the
    bytes, and its whole answer comes back (through mitmproxy, inside CONNECT, its HTTP layer
    made the half-close a full close: the answer met a reset)."""
    before = len(_closes(relay_proxy))
    payload = b"ECHO\n" + _BLOCK[:300_000]
    with open_tunnel(relay_proxy.proxy_port, _target(upstream)) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        echoed, _ = _recv_all(sock)
    assert echoed == payload[len(b"ECHO\n") :]
    (line,) = _new_closes(relay_proxy, before)
    assert _counts(line) == (len(payload), len(echoed))


def test_upstream_half_close_leaves_the_client_direction_open(
    relay_proxy: ProxyProcess, upstream: Upstream
) -> None:
    before = len(_closes(relay_proxy))
    received_before = len(upstream.received)
    header = b"HALF 5000\n"
    with open_tunnel(relay_proxy.proxy_port, _target(upstream)) as sock:
        sock.sendall(header)
        data, _ = _recv_all(sock)  # the upstream's bytes, then its FIN
        assert data == _BLOCK[:5000]
        later = _BLOCK[:700_000]
        sock.sendall(later)  # the client's direction still carries bytes
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    deadline = time.monotonic() + 5
    while len(upstream.received) == received_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.received[received_before:] == [(hashlib.sha256(later).hexdigest(), len(later))]
    (line,) = _new_closes(relay_proxy, before)
    assert _counts(line) == (len(header) + len(later), 5000)


def test_slow_reader_holds_the_proxy_memory_bounded(
    relay_proxy: ProxyProcess, upstream: Upstream
) -> None:
    """The upstream sends 200 MB while the client reads nothing for a while: the proxy stops
    reading the upstream (back-pressure) instead of buffering."""
    size = 200 * MiB
    proc = psutil.Process(relay_proxy.process.pid)
    header = f"SOURCE {size} slow\n".encode()
    with open_tunnel(relay_proxy.proxy_port, _target(upstream), timeout=30) as sock:
        rss_before = proc.memory_info().rss
        sock.sendall(header)
        time.sleep(1.5)  # the client reads nothing
        in_flight = upstream.sent[header.decode().strip()]
        rss_stalled = proc.memory_info().rss
        digest = hashlib.sha256()
        _, count = _recv_all(sock, digest)
    # Socket buffers on loopback autotune to a few MB each way; the relay adds one pipe.
    assert MiB < in_flight < 48 * MiB, f"the upstream got {in_flight} bytes out to a stalled reader"
    assert rss_stalled - rss_before < 24 * MiB, (rss_before, rss_stalled)
    assert count == size and digest.hexdigest() == _pattern_digest(size)


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_client_reset_ends_the_upstream_connection(
    relay_proxy: ProxyProcess, upstream: Upstream
) -> None:
    before = len(_closes(relay_proxy))
    header = b"SOURCE 104857600 reset\n"
    sock = open_tunnel(relay_proxy.proxy_port, _target(upstream))
    sock.sendall(header)
    got = 0
    while got < 2 * MiB:
        got += len(sock.recv(1024 * 1024))
    _reset(sock)
    deadline = time.monotonic() + 5
    while header.decode().strip() not in upstream.ended and time.monotonic() < deadline:
        time.sleep(0.02)
    assert header.decode().strip() in upstream.ended, "the upstream connection stayed open"
    assert upstream.sent[header.decode().strip()] < 100 * MiB
    (line,) = _new_closes(relay_proxy, before)
    assert line["egress.bytes.sent"] == len(header)
    assert got <= line["egress.bytes.received"] < 100 * MiB


def test_upstream_reset_ends_the_client_connection(
    relay_proxy: ProxyProcess, upstream: Upstream
) -> None:
    before = len(_closes(relay_proxy))
    header = b"RST 200000\n"
    with open_tunnel(relay_proxy.proxy_port, _target(upstream)) as sock:
        sock.sendall(header)
        sock.settimeout(5)
        got = 0
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                got += len(data)
    # Whatever arrived before the reset (a reset may discard bytes still in flight).
    assert got <= 200_000
    (line,) = _new_closes(relay_proxy, before)
    assert line["egress.bytes.sent"] == len(header)
    assert got <= line["egress.bytes.received"] <= 200_000


def test_a_thousand_concurrent_tunnels_open_and_close(
    relay_proxy: ProxyProcess, upstream: Upstream
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    before = len(_closes(relay_proxy))
    tunnels: list[socket.socket] = []
    try:
        for _ in range(1000):
            sock = open_tunnel(relay_proxy.proxy_port, _target(upstream), timeout=30)
            sock.sendall(b"ECHO\nx")
            tunnels.append(sock)
        for sock in tunnels:  # every one is live at once
            assert sock.recv(1) == b"x"
    finally:
        for sock in tunnels:
            sock.close()
    lines = _new_closes(relay_proxy, before, count=len(tunnels), timeout=30)
    assert {_counts(line) for line in lines} == {(6, 1)}


def test_socks5_tunnels_are_relayed_byte_exact_and_counted(
    relay_proxy: ProxyProcess, upstream: Upstream
) -> None:
    before = len(_closes(relay_proxy))
    sock = socket.create_connection(("127.0.0.1", SOCKS_PORTS[relay_proxy.proxy_port]), timeout=10)
    with sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        name = b"allowed.test"
        sock.sendall(
            b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", upstream.port)
        )
        assert sock.recv(10)[:2] == b"\x05\x00"
        sent, answer = _sink(sock, 3 * MiB + 5)
    (line,) = _new_closes(relay_proxy, before)
    assert _counts(line) == (sent, len(answer))
    assert line["network.transport.protocol"] == "socks5"


def test_revocation_closes_a_relayed_tunnel(relay_proxy: ProxyProcess, upstream: Upstream) -> None:
    with api(relay_proxy) as client:
        made = client.post(
            "/v1/grants", json={"pattern": "revocable.test", "action": "allow", "scope": "always"}
        )
        assert made.status_code in (200, 201), made.text
        body = made.json()
        grant_id = body.get("id") or body["grant"]["id"]
        before = len(_closes(relay_proxy))
        with open_tunnel(relay_proxy.proxy_port, _target(upstream, "revocable.test")) as sock:
            sock.sendall(b"ECHO\nping")
            assert sock.recv(4) == b"ping"
            assert client.delete(f"/v1/grants/{grant_id}").status_code == 200
            revoked = time.monotonic()
            sock.settimeout(3)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
            # RECHECK_INTERVAL is 0.5 s; the relay must close at once when told.
            assert time.monotonic() - revoked < 1.0
    (line,) = _new_closes(relay_proxy, before)
    assert _counts(line) == (9, 4)


def test_shutdown_reports_the_bytes_of_open_relayed_tunnels(
    upstream: Upstream, tmp_path: Path
) -> None:
    """SIGTERM with a relayed tunnel still open: after the drain it is closed and reports."""
    policy = _policy(tmp_path / "policy.yaml", upstream)
    proxy = start_proxy(tmp_path / "state", [policy], *resolve_args(), "--drain", "300ms")
    try:
        sock = open_tunnel(proxy.proxy_port, _target(upstream))
        sock.sendall(b"ECHO\nhello")
        assert sock.recv(5) == b"hello"
        proxy.stop()
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
        sock.close()
    finally:
        proxy.stop()
    (line,) = _new_closes(proxy, 0)
    assert _counts(line) == (10, 5)


def test_relay_mode_is_checked_at_start(upstream: Upstream, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefault: deny\n")
    with pytest.raises(RuntimeError, match="EGRESS_WARDEN_RELAY"):
        start_proxy(tmp_path / "state", [policy], env={"EGRESS_WARDEN_RELAY": "teleport"})
