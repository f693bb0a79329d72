"""The relay loop alone (addons/relay.py), on real loopback TCP sockets: bytes mitmproxy had
read before the handover go first, the idle timeout ends a quiet tunnel, abort is final.
The proxy-level suite is tests/e2e/test_relay.py."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from addons.relay import HAVE_SPLICE, RELAY_ENV, Relay, RelayMode, relay_mode

MODES = [pytest.param(False, id="copy")] + (
    [pytest.param(True, id="splice")] if HAVE_SPLICE else []
)


@dataclass
class Counter:
    sent: int = 0
    received: int = 0


def _ender(ended: list[int], done: asyncio.Event) -> Callable[[], None]:
    def on_end() -> None:
        ended.append(1)
        done.set()

    return on_end


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


@pytest.fixture
def tunnel() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    """agent <-> (proxy_client ... proxy_server) <-> upstream."""
    agent, proxy_client = _tcp_pair()
    proxy_server, upstream = _tcp_pair()
    for sock in (proxy_client, proxy_server):
        sock.setblocking(False)
    yield agent, proxy_client, proxy_server, upstream
    for sock in (agent, proxy_client, proxy_server, upstream):
        sock.close()


async def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await loop.run_in_executor(None, sock.recv, n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return data


@pytest.mark.parametrize("splice", MODES)
def test_bytes_read_before_the_handover_go_first(
    tunnel: tuple[socket.socket, ...], splice: bool
) -> None:
    agent, proxy_client, proxy_server, upstream = tunnel
    counter, ended = Counter(), list[int]()

    async def run() -> None:
        done = asyncio.Event()
        relay = Relay(
            proxy_client,
            proxy_server,
            counter,
            splice=splice,
            idle_timeout=0,
            on_end=_ender(ended, done),
        )
        agent.sendall(b"-later")
        upstream.sendall(b"+later")
        relay.start(b"first", b"FIRST")
        assert await _recv_exactly(upstream, 11) == b"first-later"
        assert await _recv_exactly(agent, 11) == b"FIRST+later"
        agent.shutdown(socket.SHUT_WR)
        upstream.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(done.wait(), 3)

    asyncio.run(run())
    assert ended == [1]
    assert (counter.sent, counter.received) == (11, 11)
    assert agent.recv(1) == b"" and upstream.recv(1) == b""


@pytest.mark.parametrize("splice", MODES)
def test_idle_timeout_ends_a_quiet_tunnel_once(
    tunnel: tuple[socket.socket, ...], splice: bool
) -> None:
    agent, proxy_client, proxy_server, upstream = tunnel
    ended: list[int] = []

    async def run() -> float:
        done = asyncio.Event()
        relay = Relay(
            proxy_client,
            proxy_server,
            Counter(),
            splice=splice,
            idle_timeout=0.3,
            on_end=_ender(ended, done),
        )
        relay.start(b"", b"")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(0.15)
        agent.sendall(b"x")  # activity pushes the deadline back
        assert await _recv_exactly(upstream, 1) == b"x"
        await asyncio.wait_for(done.wait(), 3)
        relay.abort()  # after the end: nothing more happens
        return loop.time() - started

    elapsed = asyncio.run(run())
    assert ended == [1]
    assert 0.4 <= elapsed < 1.5
    agent.settimeout(2)
    assert agent.recv(1) == b""


def test_abort_ends_without_calling_back(tunnel: tuple[socket.socket, ...]) -> None:
    agent, proxy_client, proxy_server, upstream = tunnel
    ended: list[int] = []

    async def run() -> None:
        relay = Relay(
            proxy_client,
            proxy_server,
            Counter(),
            splice=False,
            idle_timeout=0,
            on_end=lambda: ended.append(1),
        )
        relay.start(b"", b"")
        relay.abort()
        relay.abort()

    asyncio.run(run())
    assert ended == []
    agent.settimeout(2)
    upstream.settimeout(2)
    assert agent.recv(1) == b"" and upstream.recv(1) == b""


def test_relay_mode_from_the_environment() -> None:
    default = RelayMode.SPLICE if HAVE_SPLICE else RelayMode.COPY
    assert relay_mode({}) is default
    assert relay_mode({RELAY_ENV: "copy"}) is RelayMode.COPY
    assert relay_mode({RELAY_ENV: " MITMPROXY "}) is RelayMode.MITMPROXY
    with pytest.raises(ValueError, match=RELAY_ENV):
        relay_mode({RELAY_ENV: "teleport"})
