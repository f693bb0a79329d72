"""Holding unfamiliar destinations for approval: real proxy, real clients, real control API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.agents import AgentRegistry
from tests.conftest import ALLOWED_IP, Upstreams, resolve_args, write_policy
from tests.support.clients import curl
from tests.support.control import TOKEN, TOKEN_ENV, api, approve, deny, wait_pending
from tests.support.proxy import REPO, ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

HELD_NAMES = [f"h{i}.held.test" for i in range(12)]


def _policy(upstreams: Upstreams, path: Path, wait: str) -> Path:
    ports = sorted({80, 443, upstreams.http.port, upstreams.https.port})
    return write_policy(
        path,
        upstreams,
        body=f"""\
version: 1
default: ask
allow:
  - allowed.test
  - {ALLOWED_IP}/32
network:
  ports: {ports}
approval:
  wait: {wait}
  pending_ttl: 1h
  once_window: 0s  # `once` is exactly one request here (the window: test_once_exact.py)
auth:
  required: false
""",
    )


def _start(
    upstreams: Upstreams,
    tmp: Path,
    wait: str,
    state: Path | None = None,
    agents: Path | None = None,
) -> ProxyProcess:
    policy = _policy(upstreams, tmp / f"policy-{wait}.yaml", wait)
    extra = resolve_args()
    for name in HELD_NAMES:
        extra += ["--resolve", f"{name}:{ALLOWED_IP}"]
    if agents is not None:
        extra += ["--agents", str(agents)]
    return start_proxy(state or tmp / f"state-{wait}", [policy], *extra, env=TOKEN_ENV)


@pytest.fixture(scope="module")
def held_proxy(
    upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    proc = _start(upstreams, tmp_path_factory.mktemp("held"), "20s")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def agent_tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """An agents file with alice and bob: per-agent approvals need verified agents."""
    path = tmp_path_factory.mktemp("agents") / "agents.yaml"
    registry = AgentRegistry(path)
    return path, {agent: registry.add(agent) for agent in ("alice", "bob")}


@pytest.fixture(scope="module")
def quick_proxy(
    upstreams: Upstreams,
    tmp_path_factory: pytest.TempPathFactory,
    agent_tokens: tuple[Path, dict[str, str]],
) -> Iterator[ProxyProcess]:
    proc = _start(upstreams, tmp_path_factory.mktemp("quick"), "1s", agents=agent_tokens[0])
    yield proc
    proc.stop()


def _get(
    proxy: ProxyProcess, url: str, auth: tuple[str, str] | None = None, timeout: float = 40
) -> httpx.Response:
    """GET through the proxy; `auth` (agent, token) is sent as proxy credentials."""
    target = httpx.Proxy(proxy.url, auth=auth) if auth else proxy.url
    with httpx.Client(proxy=target, trust_env=False, timeout=timeout) as client:
        return client.get(url)


def _in_thread(fn: object, *args: object) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn(*args))  # type: ignore[operator]
        except Exception as exc:  # surfaced by the assertions on `out`
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_held_connect_is_released_by_api_approval(
    held_proxy: ProxyProcess, upstreams: Upstreams, ca_file: Path
) -> None:
    host = HELD_NAMES[0]
    client = subprocess.Popen(
        [
            "curl",
            "-q",
            "-sS",
            "--noproxy",
            "",
            "-x",
            held_proxy.url,
            "--cacert",
            str(ca_file),
            f"https://{host}:{upstreams.https.port}/released",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    item = wait_pending(held_proxy, host)
    assert item["port"] == upstreams.https.port and item["count"] >= 1
    answer = approve(held_proxy, item["id"])
    assert answer["released"] == 1 and answer["resolution"] == "approved"
    out, err = client.communicate(timeout=30)
    assert client.returncode == 0, err
    assert "GET /released" in out
    hold = held_proxy.wait_decision(**{"server.address": host, "egress.decision": "hold"})
    assert hold["egress.approval.id"] == item["id"]
    final = held_proxy.wait_decision(**{"server.address": host, "egress.decision": "allow"})
    assert final["egress.reason"] == "approved"
    approval_lines = [
        line
        for line in held_proxy.lines
        if line.get("event") == "egress.approval" and line.get("egress.approval.id") == item["id"]
    ]
    assert {line["egress.approval.state"] for line in approval_lines} == {"requested", "approved"}


def test_held_plain_http_is_released_by_cli_approval(
    held_proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    host = HELD_NAMES[1]
    thread, out = _in_thread(_get, held_proxy, f"http://{host}:{upstreams.http.port}/cli")
    item = wait_pending(held_proxy, host)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "approve",
            item["id"],
            "--control",
            held_proxy.control_url,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **TOKEN_ENV},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"approved {item['id']}" in result.stdout
    thread.join(30)
    response = out[0]
    assert isinstance(response, httpx.Response) and response.status_code == 200
    assert "GET /cli" in response.text


def test_denial_answers_approval_denied(held_proxy: ProxyProcess, upstreams: Upstreams) -> None:
    host = HELD_NAMES[2]
    thread, out = _in_thread(_get, held_proxy, f"http://{host}:{upstreams.http.port}/no")
    item = wait_pending(held_proxy, host)
    deny(held_proxy, item["id"])
    thread.join(30)
    response = out[0]
    assert isinstance(response, httpx.Response) and response.status_code == 403
    assert response.headers["x-egress-warden-reason"] == "approval_denied"


def test_expiry_answers_pending_and_retry_after_approval_passes(
    quick_proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    url = f"http://{HELD_NAMES[3]}:{upstreams.http.port}/later"
    first = _get(quick_proxy, url)
    assert first.status_code == 403
    assert first.headers["x-egress-warden-reason"] == "approval_pending"
    pending_id = first.headers["x-egress-warden-pending-id"]
    assert pending_id in first.reason_phrase
    with api(quick_proxy) as client:
        listed = client.get("/v1/pending").json()
    assert any(i["id"] == pending_id for i in listed)
    answer = approve(quick_proxy, pending_id)
    assert answer["released"] == 0
    assert _get(quick_proxy, url).status_code == 200


def test_once_does_not_allow_the_next_request(
    quick_proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    url = f"http://{HELD_NAMES[4]}:{upstreams.http.port}/once"
    pending_id = _get(quick_proxy, url).headers["x-egress-warden-pending-id"]
    approve(quick_proxy, pending_id, scope="once")
    assert _get(quick_proxy, url).status_code == 200
    again = _get(quick_proxy, url)
    assert again.status_code == 403
    assert again.headers["x-egress-warden-reason"] == "approval_pending"


def test_session_and_always_grants_survive_kill_9(upstreams: Upstreams, tmp_path: Path) -> None:
    state = tmp_path / "state"
    proxy = _start(upstreams, tmp_path, "1s", state)
    session_url = f"http://{HELD_NAMES[5]}:{upstreams.http.port}/s"
    always_url = f"http://{HELD_NAMES[6]}:{upstreams.http.port}/a"
    pending_url = f"http://{HELD_NAMES[7]}:{upstreams.http.port}/p"
    try:
        approve(
            proxy, _get(proxy, session_url).headers["x-egress-warden-pending-id"], scope="session"
        )
        approve(
            proxy, _get(proxy, always_url).headers["x-egress-warden-pending-id"], scope="always"
        )
        leftover = _get(proxy, pending_url).headers["x-egress-warden-pending-id"]
        for _ in range(2):
            assert _get(proxy, session_url).status_code == 200
            assert _get(proxy, always_url).status_code == 200
        with api(proxy) as client:
            audit = client.get("/v1/decisions", params={"limit": 1000}).json()
    finally:
        proxy.process.send_signal(signal.SIGKILL)
        proxy.process.wait(10)

    restarted = _start(upstreams, tmp_path, "1s", state)
    try:
        assert _get(restarted, always_url).status_code == 200
        # Session grants live in the store too (every worker and replica enforces them); they
        # end when the session does (approval.session_idle), not when one process restarts.
        assert _get(restarted, session_url).status_code == 200
        with api(restarted) as client:
            pending = client.get("/v1/pending").json()
            grants = client.get("/v1/grants").json()
            after = client.get("/v1/decisions", params={"limit": 1000}).json()
        assert any(i["id"] == leftover for i in pending)
        assert sorted(g["scope"] for g in grants) == ["always", "session"]
        session = next(g for g in grants if g["scope"] == "session")
        assert session["expires_at"] is not None
        reported = {row["request_id"] for row in audit}
        assert reported <= {row["request_id"] for row in after}
        # an approval after the restart applies to the retry
        approve(restarted, leftover)
        assert _get(restarted, pending_url).status_code == 200
    finally:
        restarted.stop()


def test_agent_scoped_approval_does_not_leak_to_another_agent(
    quick_proxy: ProxyProcess, upstreams: Upstreams, agent_tokens: tuple[Path, dict[str, str]]
) -> None:
    _, tokens = agent_tokens
    alice, bob_auth = ("alice", tokens["alice"]), ("bob", tokens["bob"])
    url = f"http://{HELD_NAMES[8]}:{upstreams.http.port}/agents"
    first = _get(quick_proxy, url, alice)
    approve(
        quick_proxy, first.headers["x-egress-warden-pending-id"], scope="session", grant_for="agent"
    )
    assert _get(quick_proxy, url, alice).status_code == 200
    assert _get(quick_proxy, url).headers["x-egress-warden-reason"] == "approval_pending"
    bob = _get(quick_proxy, url, bob_auth)
    assert bob.status_code == 403
    assert bob.headers["x-egress-warden-reason"] == "approval_pending"
    with api(quick_proxy) as client:
        items = client.get("/v1/pending").json()
    assert any(i["host"] == HELD_NAMES[8] and i["agent"] == "bob" for i in items)


def test_revoking_an_allow_grant_makes_requests_ask_again(
    quick_proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    url = f"http://{HELD_NAMES[9]}:{upstreams.http.port}/revoke"
    answer = approve(
        quick_proxy,
        _get(quick_proxy, url).headers["x-egress-warden-pending-id"],
        scope="always",
        grant_for="all",
    )
    assert _get(quick_proxy, url).status_code == 200
    with api(quick_proxy) as client:
        assert client.delete(f"/v1/grants/{answer['grant']['id']}").status_code == 200
        assert client.delete(f"/v1/grants/{answer['grant']['id']}").status_code == 404
    assert _get(quick_proxy, url).headers["x-egress-warden-reason"] == "approval_pending"


def test_disconnected_waiter_is_dropped(held_proxy: ProxyProcess, upstreams: Upstreams) -> None:
    host = HELD_NAMES[10]
    client = subprocess.Popen(
        [
            "curl",
            "-q",
            "-sS",
            "--noproxy",
            "",
            "-x",
            held_proxy.url,
            f"http://{host}:{upstreams.http.port}/gone",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    item = wait_pending(held_proxy, host)
    client.kill()
    client.wait(5)
    end = time.monotonic() + 10.0
    waiting = 1
    while time.monotonic() < end and waiting:
        with api(held_proxy) as c:
            waiting = next(
                i["waiting"] for i in c.get("/v1/pending").json() if i["id"] == item["id"]
            )
        time.sleep(0.1)
    assert waiting == 0


def test_control_api_requires_the_token(held_proxy: ProxyProcess) -> None:
    with httpx.Client(base_url=held_proxy.control_url, trust_env=False) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        none = client.get("/v1/pending")
        assert none.status_code == 401 and none.json()["error"] == "unauthorized"
        wrong = client.get("/v1/pending", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and wrong.json()["error"] == "forbidden"
        query = client.get("/v1/pending", params={"token": TOKEN, "access_token": TOKEN})
        assert query.status_code == 401
        assert client.get("/openapi.json").status_code == 401  # only /healthz is open
        authorized = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/openapi.json", headers=authorized).status_code == 200
        bad = client.post(
            "/v1/pending/x/approve",
            json={"scope": "forever"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_request"


def test_proxy_refuses_to_carry_requests_to_the_control_port(held_proxy: ProxyProcess) -> None:
    response = _get(held_proxy, f"{held_proxy.control_url}/v1/pending")
    assert response.status_code == 403
    result = curl(
        "-x",
        held_proxy.url,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        f"Authorization: Bearer {TOKEN}",
        f"http://localhost:{held_proxy.control_port}/v1/pending",
    )
    assert result.stdout == "403"


def test_events_stream_reports_pending_and_resolved(
    held_proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    host = HELD_NAMES[11]
    seen: list[str] = []

    def listen() -> None:
        with api(held_proxy) as client, client.stream("GET", "/v1/events", timeout=30) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    seen.append(line[7:])
                if "resolved" in seen:
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(0.5)
    thread, _ = _in_thread(_get, held_proxy, f"http://{host}:{upstreams.http.port}/sse")
    item = wait_pending(held_proxy, host)
    approve(held_proxy, item["id"])
    thread.join(30)
    listener.join(30)
    assert "pending" in seen and "resolved" in seen and "decision" in seen
