"""Plain `ws://` through the real proxy is metered until the WebSocket ends: the close event
counts every message's payload bytes each way (no framing, as HTTP exchanges count bodies,
not headers), and is emitted once, at the end, not at the 101 handshake."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trustme

from tests.conftest import ALLOWED_IP, Upstreams, resolve_args, write_policy
from tests.support.clients import raw_request
from tests.support.proxy import ProxyProcess, start_proxy
from tests.support.wsecho import ProxiedWsClient, WsEchoServer, start_ws_echo

pytestmark = pytest.mark.e2e

# Text and binary, empty to multi-frame-sized; the server answers each with its payload twice.
MESSAGES: list[bytes | str] = ["hello", b"", b"\x00", "é" * 1000, bytes(range(256)) * 300]


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[WsEchoServer]:
    server = start_ws_echo(ALLOWED_IP)
    yield server
    server.close()


@pytest.fixture(scope="module")
def ws_proxy(
    upstreams: Upstreams, ws_upstream: WsEchoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("ws")
    policy = write_policy(tmp / "policy.yaml", upstreams, extra_ports=(ws_upstream.port,))
    proc = start_proxy(tmp / "state", [policy], *resolve_args())
    yield proc
    proc.stop()


def _closes(proxy: ProxyProcess, request_id: str) -> list[dict[str, Any]]:
    return [
        line
        for line in list(proxy.lines)
        if line.get("event") == "egress.connection.close"
        and line.get("egress.request_id") == request_id
    ]


def _wait_close(proxy: ProxyProcess, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _closes(proxy, request_id)
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no egress.connection.close for {request_id}")


def _payload_len(message: bytes | str) -> int:
    return len(message.encode() if isinstance(message, str) else message)


def _open(proxy: ProxyProcess, upstream: WsEchoServer, path: str) -> tuple[ProxiedWsClient, str]:
    client = ProxiedWsClient(
        (proxy.proxy_host, proxy.proxy_port), "allowed.test", upstream.port, path
    )
    assert client.status == 101
    decision = proxy.wait_decision(**{"url.path": path})
    assert decision["network.transport.protocol"] == "websocket"
    return client, decision["egress.request_id"]


def test_plain_ws_counts_message_bytes_until_the_close(
    ws_proxy: ProxyProcess, ws_upstream: WsEchoServer
) -> None:
    client, request_id = _open(ws_proxy, ws_upstream, "/ws-counted")
    for message in MESSAGES:
        client.send(message)
        assert client.receive() == message * 2
    time.sleep(0.5)  # the meter must still be open after the 101 and the messages so far
    assert _closes(ws_proxy, request_id) == []
    client.close()
    close = _wait_close(ws_proxy, request_id)
    sent = sum(_payload_len(m) for m in MESSAGES)
    assert close["egress.bytes.sent"] == sent
    assert close["egress.bytes.received"] == 2 * sent
    assert close["network.transport.protocol"] == "websocket"
    time.sleep(0.3)
    assert len(_closes(ws_proxy, request_id)) == 1


def test_plain_ws_dropped_without_close_frame_still_reports_once(
    ws_proxy: ProxyProcess, ws_upstream: WsEchoServer
) -> None:
    client, request_id = _open(ws_proxy, ws_upstream, "/ws-aborted")
    client.send(b"x" * 5000)
    assert client.receive() == b"x" * 10000
    client.abort()
    close = _wait_close(ws_proxy, request_id)
    assert (close["egress.bytes.sent"], close["egress.bytes.received"]) == (5000, 10000)
    time.sleep(0.3)
    assert len(_closes(ws_proxy, request_id)) == 1


def test_plain_http_exchange_still_closes_at_its_response(
    ws_proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    """The WebSocket change keeps ordinary exchanges reporting at their response."""
    response = raw_request(
        ws_proxy.proxy_port,
        f"GET http://allowed.test:{upstreams.http.port}/plain-after-ws HTTP/1.1\r\n"
        f"Host: allowed.test:{upstreams.http.port}\r\nConnection: close\r\n\r\n",
        host=ws_proxy.proxy_host,
    )
    assert response.status == 200
    request_id = ws_proxy.wait_decision(**{"url.path": "/plain-after-ws"})["egress.request_id"]
    close = _wait_close(ws_proxy, request_id)
    assert close["network.transport.protocol"] == "http"


def test_long_websocket_does_not_keep_its_messages(
    ws_proxy: ProxyProcess, ws_upstream: WsEchoServer
) -> None:
    """mitmproxy appends every message to the flow; the warden keeps only the current one, so
    a long-lived WebSocket costs the proxy no memory per message relayed (~75 MB here)."""
    proxy = psutil.Process(ws_proxy.process.pid)
    client, request_id = _open(ws_proxy, ws_upstream, "/ws-long")
    chunk = b"m" * (128 * 1024)
    for _ in range(8):  # warm-up: buffers and allocator pools at their working size
        client.send(chunk)
        assert client.receive() == chunk * 2
    before = proxy.memory_info().rss
    for _ in range(200):  # 25 MB up, 50 MB down
        client.send(chunk)
        assert client.receive() == chunk * 2
    grown = proxy.memory_info().rss - before
    client.close()
    close = _wait_close(ws_proxy, request_id)
    assert close["egress.bytes.sent"] == 208 * len(chunk)
    assert grown < 20 * 2**20, f"proxy RSS grew by {grown / 2**20:.1f} MiB"


@pytest.fixture(scope="module")
def wss_world(
    upstreams: Upstreams,
    ca: trustme.CA,
    ca_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ProxyProcess, WsEchoServer]]:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("api.allowed.test").configure_cert(server_tls)
    server = start_ws_echo(ALLOWED_IP, server_tls)
    tmp = tmp_path_factory.mktemp("wss")
    policy = write_policy(
        tmp / "policy.yaml",
        upstreams,
        body=f"version: 1\ndefault: deny\nallow: [api.allowed.test, {ALLOWED_IP}/32]\n"
        f"network: {{ports: [{server.port}]}}\ninspect:\n  - host: api.allowed.test\n",
    )
    proc = start_proxy(tmp / "state", [policy], *resolve_args(), "--upstream-ca", str(ca_file))
    yield proc, server
    proc.stop()
    server.close()


def test_wss_inside_an_inspected_tunnel_is_metered_the_same_way(
    wss_world: tuple[ProxyProcess, WsEchoServer],
) -> None:
    proxy, server = wss_world
    client_tls = ssl.create_default_context(
        cafile=str(proxy.state_dir / "ca" / "mitmproxy-ca-cert.pem")
    )
    client = ProxiedWsClient(
        (proxy.proxy_host, proxy.proxy_port),
        "api.allowed.test",
        server.port,
        "/wss-counted",
        tls=client_tls,
    )
    assert client.status == 101
    request_id = proxy.wait_decision(**{"url.path": "/wss-counted"})["egress.request_id"]
    for message in MESSAGES:
        client.send(message)
        assert client.receive() == message * 2
    time.sleep(0.3)
    assert _closes(proxy, request_id) == []
    client.close()
    close = _wait_close(proxy, request_id)
    sent = sum(_payload_len(m) for m in MESSAGES)
    assert (close["egress.bytes.sent"], close["egress.bytes.received"]) == (sent, 2 * sent)
    assert close["network.transport.protocol"] == "https_inspected"
