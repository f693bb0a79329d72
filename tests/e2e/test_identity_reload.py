"""Agent identity (407), requirements, and live reload against the real proxy."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ALLOWED_IP, Upstreams, resolve_args, write_policy
from tests.support.clients import raw_request
from tests.support.control import TOKEN_ENV, api, wait_pending
from tests.support.proxy import REPO, ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _policy(upstreams: Upstreams, extra_allow: str = "", default: str = "ask") -> str:
    ports = sorted({80, 443, upstreams.http.port, upstreams.https.port})
    return f"""\
version: 1
default: {default}
allow:
  - allowed.test
  - {ALLOWED_IP}/32
{extra_allow}network:
  ports: {ports}
approval:
  wait: 20s
"""


def _get(proxy: ProxyProcess, url: str, user: str | None = None) -> httpx.Response:
    """GET through the proxy; `user` is "AGENT[/SESSION]:TOKEN" sent as proxy credentials."""
    auth = tuple(user.split(":", 1)) if user else None
    target = httpx.Proxy(proxy.url, auth=auth) if auth else proxy.url  # type: ignore[arg-type]
    with httpx.Client(proxy=target, trust_env=False, timeout=40) as client:
        return client.get(url)


@pytest.fixture(scope="module")
def authed(
    upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, dict[str, str], Path]]:
    tmp = tmp_path_factory.mktemp("auth")
    agents = tmp / "agents.yaml"
    tokens = {}
    for agent in ("alice", "bob", "mallory"):
        result = _cli("agents", "add", agent, "--file", str(agents))
        assert result.returncode == 0, result.stderr
        tokens[agent] = result.stdout.strip().splitlines()[-1]
    assert oct(agents.stat().st_mode & 0o777) == "0o600"
    assert tokens["alice"] not in agents.read_text()
    assert _cli("agents", "revoke", "mallory", "--file", str(agents)).returncode == 0
    policy = write_policy(tmp / "policy.yaml", upstreams, body=_policy(upstreams))
    proc = start_proxy(
        tmp / "state", [policy], *resolve_args(), "--agents", str(agents), env=TOKEN_ENV
    )
    yield proc, tokens, agents
    proc.stop()


def test_missing_credentials_get_407(
    authed: tuple[ProxyProcess, dict[str, str], Path], upstreams: Upstreams
) -> None:
    proxy, _, _ = authed
    response = _get(proxy, f"http://allowed.test:{upstreams.http.port}/")
    assert response.status_code == 407
    assert response.headers["proxy-authenticate"] == 'Basic realm="egress-warden"'
    assert response.headers["x-egress-warden-reason"] == "auth_required"
    line = proxy.wait_decision(**{"egress.reason": "auth_required"})
    assert line["egress.decision"] == "deny"
    connect = raw_request(
        proxy.proxy_port, f"CONNECT allowed.test:{upstreams.https.port} HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert connect.status == 407


@pytest.mark.parametrize("user", ["alice:wrong", "mallory:{mallory}", "nobody:x"])
def test_wrong_or_revoked_credentials_get_407(
    authed: tuple[ProxyProcess, dict[str, str], Path], upstreams: Upstreams, user: str
) -> None:
    proxy, tokens, _ = authed
    response = _get(proxy, f"http://allowed.test:{upstreams.http.port}/", user.format(**tokens))
    assert response.status_code == 407


def test_valid_credentials_pass_and_identity_is_on_lines_and_pending_items(
    authed: tuple[ProxyProcess, dict[str, str], Path], upstreams: Upstreams
) -> None:
    proxy, tokens, _ = authed
    ok = _get(proxy, f"http://allowed.test:{upstreams.http.port}/me", f"alice/s1:{tokens['alice']}")
    assert ok.status_code == 200
    line = proxy.wait_decision(**{"url.path": "/me"})
    assert line["egress.agent.id"] == "alice" and line["session.id"] == "s1"
    held: list[httpx.Response] = []
    url = f"http://unknown.test:{upstreams.http.port}/who"
    thread = threading.Thread(
        target=lambda: held.append(_get(proxy, url, f"bob/s9:{tokens['bob']}")), daemon=True
    )
    thread.start()
    item = wait_pending(proxy, "unknown.test", agent="bob")
    assert item["session"] == "s9"
    with api(proxy) as client:
        client.post(f"/v1/pending/{item['id']}/deny", json={"scope": "once"})
    thread.join(30)
    assert held[0].status_code == 403


def test_requirements_rules_via_check(tmp_path: Path) -> None:
    policy = tmp_path / "user.yaml"
    policy.write_text(
        "version: 1\nmode: audit\ndefault: allow\nallow: [github.com, paste.example.com]\n"
        "approval: {scopes: [once, session, always]}\n"
    )
    floor = tmp_path / "req.yaml"
    floor.write_text(
        "version: 1\nmode: enforce\nmax_default: ask\ndeny: ['**.example.com']\n"
        "approval: {scopes: [once]}\n"
    )

    def check(url: str, req: Path = floor) -> subprocess.CompletedProcess[str]:
        # No DNS here: the names' addresses are not what this test is about.
        return _cli(
            "check", url, "--policy", str(policy), "--requirements", str(req), "--no-resolve"
        )

    denied = check("https://paste.example.com/")
    assert denied.returncode == 1, denied.stdout
    assert f"{floor}:4" in denied.stdout
    # max_default: ask turns the user's default allow into ask; the pinned mode keeps enforce
    unknown = check("https://unknown.example.net/")
    assert unknown.returncode == 3, unknown.stdout
    assert "default 'allow' capped to 'ask'" in unknown.stderr
    assert "mode: pinned to 'enforce'" in unknown.stderr
    managed = tmp_path / "managed.yaml"
    managed.write_text("version: 1\nmanaged_only: true\nallow: [docs.example.org]\n")
    policy.write_text("version: 1\ndefault: ask\nallow: [github.com]\n")
    assert check("https://github.com/", managed).returncode == 1  # user allow ignored
    assert check("https://unknown.example.net/", managed).returncode == 1  # never asks
    assert check("https://docs.example.org/", managed).returncode == 0
    assert _cli("policy", "validate", str(policy)).returncode == 0
    assert _cli("policy", "validate", "--requirements", str(floor)).returncode == 0
    misuse = _cli("policy", "validate", str(floor))
    assert misuse.returncode == 2 and "max_default" in misuse.stderr


def test_requirements_floor_and_mode_pin_in_the_running_proxy(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path / "user.yaml",
        upstreams,
        body=_policy(upstreams, extra_allow="  - evil.test\n").replace(
            "version: 1\n", "version: 1\nmode: audit\n"
        ),
    )
    floor = tmp_path / "req.yaml"
    floor.write_text("version: 1\nmode: enforce\ndeny: [evil.test]\n")
    proxy = start_proxy(
        tmp_path / "state",
        [policy],
        *resolve_args(),
        "--requirements",
        str(floor),
        "--mode",
        "audit",
        env=TOKEN_ENV,
    )
    try:
        response = _get(proxy, f"http://evil.test:{upstreams.http.port}/")
        assert response.status_code == 403
        line = proxy.wait_decision(**{"server.address": "evil.test"})
        assert line["egress.mode"] == "enforce"
        assert line["egress.rule.source"] == f"{floor}:3"
        warnings = [
            line
            for line in proxy.lines
            if line.get("event") == "egress.policy" and line.get("egress.policy.state") == "warning"
        ]
        assert any("mode" in w["error.message"] for w in warnings)
    finally:
        proxy.stop()


def _tunnel(proxy: ProxyProcess, port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.proxy_port), timeout=10)
    sock.sendall(
        f"CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def _through(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: allowed.test\r\n\r\n".encode())
    data = b""
    while b"hello from upstream" not in data or not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_reload_keeps_tunnels_releases_held_and_rejects_bad_yaml(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.yaml", upstreams, body=_policy(upstreams))
    proxy = start_proxy(tmp_path / "state", [policy], *resolve_args(), env=TOKEN_ENV)
    try:
        tunnel = _tunnel(proxy, upstreams.http.port)
        assert b"GET /before" in _through(tunnel, "/before")
        held: list[httpx.Response] = []
        url = f"http://unknown.test:{upstreams.http.port}/released-by-reload"
        thread = threading.Thread(target=lambda: held.append(_get(proxy, url)), daemon=True)
        thread.start()
        wait_pending(proxy, "unknown.test")
        # edit an allow into the watched file
        policy.write_text(_policy(upstreams, extra_allow="  - unknown.test\n"))
        thread.join(30)
        assert held and held[0].status_code == 200, held
        released = proxy.wait_decision(
            **{"url.path": "/released-by-reload", "egress.decision": "allow"}
        )
        assert released["egress.rule"] == "unknown.test"
        assert b"GET /after" in _through(tunnel, "/after")  # the open tunnel survived
        assert _get(proxy, f"http://unknown.test:{upstreams.http.port}/new").status_code == 200
        # invalid YAML: rejected with an error event; the last good policy stays
        policy.write_text("version: 1\nallow: [unclosed\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            line.get("event") == "egress.policy" and line.get("egress.policy.state") == "rejected"
            for line in proxy.lines
        ):
            time.sleep(0.1)
        rejected = [line for line in proxy.lines if line.get("egress.policy.state") == "rejected"]
        assert rejected and "YAML syntax error" in rejected[-1]["error.message"]
        assert _get(proxy, f"http://unknown.test:{upstreams.http.port}/still").status_code == 200
        with api(proxy) as client:
            answer = client.post("/v1/policy/reload")
        assert answer.status_code == 422
        assert b"GET /last" in _through(tunnel, "/last")
        tunnel.close()
    finally:
        proxy.stop()


def test_policy_endpoint_shows_provenance(
    authed: tuple[ProxyProcess, dict[str, str], Path],
) -> None:
    proxy, _, _ = authed
    with api(proxy) as client:
        policy = client.get("/v1/policy").json()
        check = client.post(
            "/v1/check", json={"url": "http://allowed.test/", "agent": "alice"}
        ).json()
    assert any(
        r["pattern"] == "allowed.test" and r["source"].endswith("policy.yaml:4")
        for r in policy["allow"]
    )
    assert check["decision"] == "allow" and check["rule"] == "allowed.test"
