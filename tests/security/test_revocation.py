"""Revocation reaches open tunnels: revoking a grant or an agent closes the tunnels it admitted
within a second or two, and `network.max_tunnel_lifetime` closes tunnels that outlive it."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ALLOWED_IP, Upstreams, resolve_args
from tests.support.control import TOKEN_ENV, api, approve, wait_pending
from tests.support.proxy import REPO, ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e


def _tunnel(proxy: ProxyProcess, target: str, auth: str | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.proxy_port), timeout=10)
    creds = f"Proxy-Authorization: Basic {auth}\r\n" if auth else ""
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{creds}\r\n".encode())
    head = sock.recv(4096)
    assert b" 200 " in head, head
    return sock


def _alive(sock: socket.socket, target: str) -> bool:
    """One plain-HTTP exchange through the tunnel; False once the proxy has closed it."""
    try:
        sock.sendall(f"GET /alive HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return b" 200 " in sock.recv(4096)
    except OSError:
        return False


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the proxy closes `sock` (reads EOF or a reset)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        raise AssertionError(f"tunnel still open after {seconds}s") from None
    except OSError:
        pass
    return time.monotonic() - started


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for proc in started:
        proc.stop()


def test_revoking_a_grant_closes_the_tunnels_it_admitted(
    tmp_path: Path, upstreams: Upstreams, proxies: list[ProxyProcess]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"version: 1\ndefault: ask\nallow: [allowed.test, {ALLOWED_IP}/32]\n"
        f"network: {{ports: [{upstreams.http.port}]}}\napproval: {{wait: 200ms}}\n"
    )
    proxy = start_proxy(tmp_path / "state", [policy], *resolve_args(), env=TOKEN_ENV)
    proxies.append(proxy)
    target = f"unknown.test:{upstreams.http.port}"
    refused = socket.create_connection(("127.0.0.1", proxy.proxy_port))
    refused.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    assert b" 403 " in refused.recv(4096)
    refused.close()
    grant = approve(proxy, wait_pending(proxy, "unknown.test", waiting=0)["id"], "always", "all")
    granted = _tunnel(proxy, target)
    by_rule = _tunnel(proxy, f"allowed.test:{upstreams.http.port}")
    assert _alive(granted, target)
    with api(proxy) as client:
        assert client.delete(f"/v1/grants/{grant['grant']['id']}").status_code == 200
    assert _closed_within(granted, 3) < 2
    # A tunnel some other rule admitted is untouched.
    assert _alive(by_rule, f"allowed.test:{upstreams.http.port}")
    line = proxy.wait_decision(**{"egress.reason": "revoked"})
    assert line["server.address"] == "unknown.test"
    by_rule.close()


def test_revoking_an_agent_closes_its_tunnels(
    tmp_path: Path, upstreams: Upstreams, proxies: list[ProxyProcess]
) -> None:
    agents = tmp_path / "agents.yaml"
    added = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "agents", "add", "bot", "--file", str(agents)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    token = added.stdout.strip().splitlines()[-1]
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"version: 1\ndefault: deny\nallow: [{ALLOWED_IP}/32]\n"
        f"network: {{ports: [{upstreams.http.port}]}}\nagents: {{bot: {{allow: [allowed.test]}}}}\n"
    )
    proxy = start_proxy(
        tmp_path / "state", [policy], "--agents", str(agents), *resolve_args(), env=TOKEN_ENV
    )
    proxies.append(proxy)
    target = f"allowed.test:{upstreams.http.port}"
    sock = _tunnel(proxy, target, base64.b64encode(f"bot:{token}".encode()).decode())
    assert _alive(sock, target)
    subprocess.run(
        [sys.executable, "-m", "proxy.cli", "agents", "revoke", "bot", "--file", str(agents)],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    assert _closed_within(sock, 6) < 4  # the file watcher polls every second
    assert proxy.wait_decision(**{"egress.reason": "revoked"})["egress.agent.id"] == "bot"


def test_tunnels_are_closed_after_their_maximum_lifetime(
    tmp_path: Path, upstreams: Upstreams, proxies: list[ProxyProcess]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"version: 1\ndefault: deny\nallow: [allowed.test, {ALLOWED_IP}/32]\n"
        f"network: {{ports: [{upstreams.http.port}], max_tunnel_lifetime: 1s}}\n"
    )
    proxy = start_proxy(tmp_path / "state", [policy], *resolve_args(), env=TOKEN_ENV)
    proxies.append(proxy)
    target = f"allowed.test:{upstreams.http.port}"
    sock = _tunnel(proxy, target)
    assert _alive(sock, target)
    waited = _closed_within(sock, 5)
    assert 0.3 < waited < 3
