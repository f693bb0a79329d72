"""The control listener's connection limits (proxy.control.listener) on a real uvicorn server
over real sockets: per-client connection cap, head deadline, head size, and refusals that reach
the client although its body was never read."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy.control.access import BootstrapToken
from proxy.control.guard import MAX_BODY_BYTES, ControlGuard
from proxy.control.listener import (
    LINGER_BYTES,
    MAX_CONNECTIONS_PER_CLIENT,
    control_server_options,
    limited_h11_protocol,
)

pytestmark = pytest.mark.e2e

TOKEN = "listener-test-token"


async def _echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"length": len(body)})


async def _slow(request: Request) -> JSONResponse:
    await asyncio.sleep(1.0)
    return JSONResponse({"slow": True})


async def _healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def _app() -> Any:
    app = Starlette(
        routes=[
            Route("/echo", _echo, methods=["POST"]),
            Route("/slow", _slow),
            Route("/healthz", _healthz),
        ]
    )
    return ControlGuard(app, verify=BootstrapToken(TOKEN))


@dataclass
class Server:
    port: int
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _serve(**options: Any) -> Iterator[Server]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    config = uvicorn.Config(_app(), log_config=None, access_log=False, lifespan="off", **options)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])))
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield Server(sock.getsockname()[1], server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def limited() -> Iterator[Server]:
    """The options the control listener runs with."""
    yield from _serve(**control_server_options())


@pytest.fixture(scope="module")
def quick_heads() -> Iterator[Server]:
    """As `limited`, with a head deadline short enough to wait for."""
    yield from _serve(
        **{**control_server_options(), "http": limited_h11_protocol(head_timeout=0.5)}
    )


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    """Read one response: status and body (by Content-Length)."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ")[1]), body


# -- refusals reach the client -----------------------------------------------------------------


def test_refusals_mid_body_always_reach_the_client(limited: Server) -> None:
    """Closing with the body unread would reset the connection under the answer; 40 tries."""
    with httpx.Client(base_url=limited.url, trust_env=False, timeout=10) as client:
        for _ in range(20):
            over = client.post(
                "/echo",
                content=b"x" * (MAX_BODY_BYTES + 1),
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert over.status_code == 413
            assert over.json()["error"] == "too_large"
            no_token = client.post("/echo", content=b"x" * (2 << 20))
            assert no_token.status_code == 401
            assert no_token.json()["error"] == "unauthorized"
        ok = client.post(
            "/echo", content=b"x" * MAX_BODY_BYTES, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert ok.json() == {"length": MAX_BODY_BYTES}


def test_a_refusal_on_a_kept_alive_connection_reaches_the_client(limited: Server) -> None:
    """The case plain uvicorn loses about one time in eight: the 413 for a second request on a
    connection is reset away when the socket closes with that request's body unread."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for _ in range(30):
        with httpx.Client(base_url=limited.url, trust_env=False, timeout=10) as client:
            first = client.post("/echo", content=b" " * MAX_BODY_BYTES, headers=auth)
            assert first.status_code == 200
            over = client.post("/echo", content=b" " * (MAX_BODY_BYTES + 1), headers=auth)
            assert over.status_code == 413


def test_a_refused_upload_is_drained_only_so_far(limited: Server) -> None:
    sent = 0
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        block = b"x" * 65536
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while sent < 100_000_000:
                sock.sendall(block)
                sent += len(block)
        status, body = _answer(sock)
    assert status == 401
    assert json.loads(body)["error"] == "unauthorized"
    # What the kernel buffers on both sides, plus what the server dropped while lingering.
    assert sent < LINGER_BYTES + (16 << 20)


# -- per-client connection cap ---------------------------------------------------------------


def test_connections_beyond_the_per_client_cap_are_refused(limited: Server) -> None:
    held = [
        socket.create_connection(("127.0.0.1", limited.port), timeout=10)
        for _ in range(MAX_CONNECTIONS_PER_CLIENT)
    ]
    try:
        time.sleep(0.2)  # let the server accept them all
        with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as extra:
            status, body = _answer(extra)
            assert status == 503
            assert json.loads(body)["error"] == "too_many_connections"
            assert _closed_by_server(extra, 5)
        # The held ones still work.
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answer(held[0])[0] == 200
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    # Once they are gone, the client may connect again.
    with httpx.Client(base_url=limited.url, trust_env=False, timeout=10) as client:
        assert client.get("/healthz").status_code == 200


# -- the head ----------------------------------------------------------------------------------


def test_a_head_trickled_in_is_cut_at_the_deadline(quick_heads: Server) -> None:
    with socket.create_connection(("127.0.0.1", quick_heads.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for i in range(40):  # 4 s of one header line every 0.1 s
            try:
                sock.sendall(f"X-Slow-{i}: y\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.1)
        closed = closed or _closed_by_server(sock, 1)
        assert closed
        assert time.monotonic() - started < 3.0


def test_the_next_head_on_a_kept_alive_connection_has_a_deadline_too(
    quick_heads: Server,
) -> None:
    with socket.create_connection(("127.0.0.1", quick_heads.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answer(sock)[0] == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert _closed_by_server(sock, 3)


def test_a_slow_answer_is_not_cut_by_the_head_deadline(quick_heads: Server) -> None:
    with httpx.Client(base_url=quick_heads.url, trust_env=False, timeout=10) as client:
        response = client.get("/slow", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.json() == {"slow": True}


def test_an_idle_connection_is_closed(quick_heads: Server) -> None:
    with socket.create_connection(("127.0.0.1", quick_heads.port), timeout=10) as sock:
        assert _closed_by_server(sock, 3)


def test_an_oversized_head_is_refused(limited: Server) -> None:
    big = b"X-Big: " + b"a" * (32 << 10) + b"\r\n"
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
        status, body = _answer(sock)
    assert status == 431  # in one read: the guard counts it
    assert json.loads(body)["error"] == "headers_too_large"
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + big)
        time.sleep(0.2)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"\r\n")
        status, _ = _answer(sock)
    assert status == 400  # in pieces: the server stops buffering it
