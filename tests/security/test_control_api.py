"""Attacks on the control API of a real running proxy: grants that would open the network
guard, catch-all grants, bodies sent without a token, oversized bodies, connection floods."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from proxy.control.listener import HEAD_TIMEOUT_SECONDS, MAX_CONNECTIONS_PER_CLIENT
from tests.conftest import CANARY_IP, Upstreams, resolve_args, write_policy
from tests.support.clients import raw_request
from tests.support.control import TOKEN, TOKEN_ENV, api
from tests.support.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

TEN_MB = 10_000_000
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def warden(
    upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("control-api")
    policy = write_policy(tmp / "policy.yaml", upstreams)
    proc = start_proxy(tmp / "state", [policy], *resolve_args(), env=TOKEN_ENV)
    yield proc
    proc.stop()


def _canary_status(warden: ProxyProcess, upstreams: Upstreams) -> int:
    target = f"{CANARY_IP}:{upstreams.canary.port}"
    response = raw_request(
        warden.proxy_port, f"GET http://{target}/grant-probe HTTP/1.1\r\nHost: {target}\r\n\r\n"
    )
    return response.status


def _grant(
    client: httpx.Client, pattern: str, headers: dict[str, str] | None = None, **extra: Any
) -> httpx.Response:
    return client.post("/v1/grants", json={"pattern": pattern, **extra}, headers=headers)


def _patterns(client: httpx.Client) -> set[str]:
    return {g["pattern"] for g in client.get("/v1/grants").json()}


# -- grants that would open the network guard -----------------------------------------------

GUARDED = [
    "127.0.0.0/8",
    "127.0.0.1",
    f"{CANARY_IP}:80",
    "169.254.169.254/32",
    "169.254.169.254",
    "10.0.0.0/8",
    "172.0.0.0/8",  # public around it, 172.16.0.0/12 inside
    "192.168.0.0/16",
    "100.64.0.0/10",
    "0.0.0.0/8",
    "[::ffff:127.0.0.1]",
    "::ffff:127.0.0.1",
    "::ffff:a9fe:a9fe",
    "64:ff9b::7f00:1",
    "2002:7f00:1::/48",
    "::1",
    "fe80::/64",
    "fd00::/48",
]


@pytest.mark.parametrize("pattern", GUARDED)
def test_guarded_allow_grant_without_private_flag_is_refused(
    warden: ProxyProcess, upstreams: Upstreams, pattern: str
) -> None:
    before = len(upstreams.canary.hits)
    with api(warden) as client:
        response = _grant(client, pattern)
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "private_grant_needs_flag"
        assert '"private": true' in response.json()["detail"]
        assert pattern not in _patterns(client)
    assert _canary_status(warden, upstreams) == 403
    assert len(upstreams.canary.hits) == before


@pytest.mark.parametrize(
    "pattern",
    ["0.0.0.0/0", "0.0.0.0/1", "64.0.0.0/2", "8.0.0.0/7", "::/0", "2000::/3", "::ffff:0:0/96"],
)
@pytest.mark.parametrize("private", [False, True])
def test_very_broad_cidr_allow_grants_are_refused(
    warden: ProxyProcess, upstreams: Upstreams, pattern: str, private: bool
) -> None:
    before = len(upstreams.canary.hits)
    with api(warden) as client:
        response = _grant(client, pattern, private=private)
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "grant_too_broad"
        assert pattern not in _patterns(client)
    assert _canary_status(warden, upstreams) == 403
    assert len(upstreams.canary.hits) == before


@pytest.mark.parametrize(
    "pattern", ["*", "**", "*:443", "**.com", "*.test", "**.test", "api.*.test"]
)
def test_catch_all_host_allow_grants_are_refused(warden: ProxyProcess, pattern: str) -> None:
    with api(warden) as client:
        response = _grant(client, pattern)
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "grant_too_broad"
        assert pattern not in _patterns(client)


@pytest.mark.parametrize(
    ("pattern", "opens_canary"),
    [
        ("127.0.0.0/8", True),
        (f"{CANARY_IP}", True),
        ("169.254.169.254/32", False),
        ("[::ffff:127.0.0.1]", False),  # an IPv6 rule; the canary is dialled over IPv4
        ("10.0.0.0/8", False),
    ],
)
def test_private_flag_with_admin_token_grants_exactly_what_it_names(
    warden: ProxyProcess, upstreams: Upstreams, pattern: str, opens_canary: bool
) -> None:
    before = len(upstreams.canary.hits)
    assert _canary_status(warden, upstreams) == 403
    with api(warden) as client:
        response = _grant(client, pattern, private=True, note="security test")
        assert response.status_code == 201, response.text
        grant = response.json()
        assert grant["created_by"] == "admin"
        try:
            status = _canary_status(warden, upstreams)
            if opens_canary:
                assert status == 200
                assert len(upstreams.canary.hits) == before + 1
                assert upstreams.canary.hits[-1].path == "/grant-probe"
            else:
                assert status == 403
                assert len(upstreams.canary.hits) == before
        finally:
            assert client.delete(f"/v1/grants/{grant['id']}").status_code == 200
    assert _canary_status(warden, upstreams) == 403
    assert len(upstreams.canary.hits) == before + (1 if opens_canary else 0)


def test_deny_grants_need_no_flag_and_may_be_broad(warden: ProxyProcess) -> None:
    with api(warden) as client:
        created = []
        try:
            for pattern in ("127.0.0.0/8", "0.0.0.0/0", "::/0"):
                response = _grant(client, pattern, action="deny")
                assert response.status_code == 201, response.text
                created.append(response.json()["id"])
        finally:
            for grant_id in created:
                assert client.delete(f"/v1/grants/{grant_id}").status_code == 200
        # A catch-all is still no valid pattern, for deny too.
        response = _grant(client, "**", action="deny")
        assert response.status_code == 422
        assert response.json()["error"] == "invalid_pattern"


def test_public_and_host_allow_grants_need_no_flag(warden: ProxyProcess) -> None:
    with api(warden) as client:
        for pattern in ("grants.example", "*.grants.example", "8.8.8.0/24", "2606:4700::/32"):
            response = _grant(client, pattern)
            assert response.status_code == 201, response.text
            assert client.delete(f"/v1/grants/{response.json()['id']}").status_code == 200


def test_approver_header_is_escaped_and_bounded(warden: ProxyProcess) -> None:
    cases = {
        "alice@example.test": "alice@example.test",
        "<img src=x>": "%3Cimg src%3Dx%3E",
        "policy": "admin",  # the name the proxy records for rule changes
        "b" * 200: "b" * 64,
        "caf\u00e9".encode(): "caf%C3%A9",
    }
    with api(warden) as client:
        for sent, recorded in cases.items():
            response = client.post(
                "/v1/grants",
                json={"pattern": "approver.example"},
                headers={"X-Egress-Warden-Approver": sent},
            )
            assert response.status_code == 201, response.text
            assert response.json()["created_by"] == recorded
            assert client.delete(f"/v1/grants/{response.json()['id']}").status_code == 200


# -- the token before the body, and a size cap ----------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float  # from the end of the head to the answer
    closed: bool  # the server closed the connection after answering


def _read_answer(sock: socket.socket, started: float, timeout: float = 5.0) -> Answer:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    seconds = time.monotonic() - started
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), data[:200]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    closed = False
    try:
        closed = sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        closed = True
    return Answer(int(lines[0].split(" ")[1]), headers, body[:length], seconds, closed)


def _head(path: str, length: int | None, token: str | None, chunked: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _declared_only(warden: ProxyProcess, path: str, length: int, token: str | None) -> Answer:
    """Send a head that declares `length` body bytes, and none of them."""
    with socket.create_connection(("127.0.0.1", warden.control_port), timeout=10) as sock:
        sock.sendall(_head(path, length, token))
        return _read_answer(sock, time.monotonic())


def _stream_until_answered(
    warden: ProxyProcess, token: str | None, total: int, chunked: bool
) -> tuple[Answer, int]:
    """Send a head and then up to `total` body bytes, stopping as soon as an answer arrives;
    return the answer and how many body bytes were sent by then."""
    block = b"x" * 16384
    sent = 0
    with socket.create_connection(("127.0.0.1", warden.control_port), timeout=10) as sock:
        sock.sendall(_head("/v1/grants", None if chunked else total, token, chunked))
        started = time.monotonic()
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            frame = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(block)
        return _read_answer(sock, started), sent


def _assert_error(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer
    assert json.loads(answer.body)["error"] == code
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["connection"] == "close"
    assert answer.closed


@pytest.mark.parametrize("path", ["/v1/grants", "/v1/check", "/v1/pending/p-1/approve", "/nope"])
def test_no_token_is_refused_before_a_declared_body_arrives(
    warden: ProxyProcess, path: str
) -> None:
    answer = _declared_only(warden, path, TEN_MB, None)
    _assert_error(answer, 401, "unauthorized")
    assert answer.headers["www-authenticate"] == "Bearer"
    assert answer.seconds < 2.0


def test_wrong_token_is_refused_before_a_declared_body_arrives(warden: ProxyProcess) -> None:
    answer = _declared_only(warden, "/v1/grants", TEN_MB, "not-" + TOKEN)
    _assert_error(answer, 403, "forbidden")
    assert answer.seconds < 2.0


def test_no_token_is_answered_while_a_ten_megabyte_body_is_still_being_sent(
    warden: ProxyProcess,
) -> None:
    answer, sent = _stream_until_answered(warden, None, TEN_MB, chunked=False)
    _assert_error(answer, 401, "unauthorized")
    assert sent < TEN_MB


def test_declared_oversized_body_with_token_is_413_at_once(warden: ProxyProcess) -> None:
    answer = _declared_only(warden, "/v1/grants", TEN_MB, TOKEN)
    _assert_error(answer, 413, "too_large")
    assert answer.seconds < 2.0


def test_chunked_body_growing_past_the_cap_is_413(warden: ProxyProcess) -> None:
    answer, sent = _stream_until_answered(warden, TOKEN, TEN_MB, chunked=True)
    _assert_error(answer, 413, "too_large")
    assert sent < TEN_MB


def test_body_size_cap_is_exact(warden: ProxyProcess) -> None:
    json_type = {"Content-Type": "application/json"}
    # A client each: a refusal on a kept-alive connection needs the listener's graceful close
    # (tests/e2e/test_control_listener.py) to reach the client every time.
    with api(warden) as client:
        at_cap = client.post("/v1/grants", content=b" " * MAX_BODY, headers=json_type)
    with api(warden) as client:
        over = client.post("/v1/grants", content=b" " * (MAX_BODY + 1), headers=json_type)
    assert at_cap.status_code == 422  # read, and refused for what it says
    assert over.status_code == 413
    assert over.json()["error"] == "too_large"


def test_only_healthz_and_the_console_page_are_open_without_a_token(
    warden: ProxyProcess,
) -> None:
    with httpx.Client(base_url=warden.control_url, trust_env=False, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        # The console page holds no data (its API calls carry the token), under a strict CSP.
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for path in ("/openapi.json", "/v1/grants", "/v1/pending", "/docs", "/healthz/"):
            response = client.get(path)
            assert response.status_code == 401, path
            assert response.json()["error"] == "unauthorized"
    with api(warden) as client:
        assert client.get("/openapi.json").status_code == 200


def test_two_authorization_headers_are_refused(warden: ProxyProcess) -> None:
    with socket.create_connection(("127.0.0.1", warden.control_port), timeout=10) as sock:
        sock.sendall(
            b"GET /v1/grants HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer wrong\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
        )
        answer = _read_answer(sock, time.monotonic())
    _assert_error(answer, 401, "unauthorized")


# -- the listener: connections per client, head deadline ------------------------------------


def test_one_client_may_hold_only_so_many_control_connections(warden: ProxyProcess) -> None:
    held = [
        socket.create_connection(("127.0.0.1", warden.control_port), timeout=10)
        for _ in range(MAX_CONNECTIONS_PER_CLIENT)
    ]
    try:
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", warden.control_port), timeout=10) as extra:
            answer = _read_answer(extra, time.monotonic())
        _assert_error(answer, 503, "too_many_connections")
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    with api(warden) as client:
        assert client.get("/v1/grants").status_code == 200


def test_a_control_request_head_trickled_in_is_cut(warden: ProxyProcess) -> None:
    with socket.create_connection(("127.0.0.1", warden.control_port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v1/grants HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = False
        while not closed and time.monotonic() - started < HEAD_TIMEOUT_SECONDS + 3:
            try:
                sock.sendall(b"X-Slow: y\r\n")
                readable, _, _ = select.select([sock], [], [], 0.5)
                closed = bool(readable) and sock.recv(1) == b""
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed
        assert time.monotonic() - started < HEAD_TIMEOUT_SECONDS + 2
