"""Named approvers, the control API's Host check and agent sessions, through the real proxy."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from proxy.admins import AdminRegistry, admins_path
from proxy.agents import AgentRegistry
from proxy.control.access import Role
from proxy.identity import proxy_url
from tests.conftest import ALLOWED_IP, Upstreams, resolve_args, write_policy
from tests.support.control import TOKEN, TOKEN_ENV
from tests.support.proxy import REPO, ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

NAMES = [f"s{i}.sessions.test" for i in range(8)]
CONSOLE_NAME = "console.example"


@dataclass
class Setup:
    proxy: ProxyProcess
    state: Path
    agent_token: str
    viewer: str
    approver: str


@pytest.fixture(scope="module")
def setup(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("admins")
    ports = sorted({80, 443, upstreams.http.port})
    policy = write_policy(
        tmp / "policy.yaml",
        upstreams,
        body=f"version: 1\ndefault: ask\nallow: [allowed.test, {ALLOWED_IP}/32]\n"
        f"network: {{ports: {ports}}}\napproval: {{wait: 1s, pending_ttl: 1h}}\n"
        "auth: {required: false}\n",
    )
    agents = tmp / "agents.yaml"
    agent_token = AgentRegistry(agents).add("alice")
    state = tmp / "state"
    registry = AdminRegistry.load(admins_path(state))
    viewer = registry.add("vera", Role.VIEWER)
    approver = registry.add("abe", Role.APPROVER)
    extra = [*resolve_args(), "--agents", str(agents), "--control-host", CONSOLE_NAME]
    for name in NAMES:
        extra += ["--resolve", f"{name}:{ALLOWED_IP}"]
    proc = start_proxy(state, [policy], *extra, env=TOKEN_ENV)
    yield Setup(proc, state, agent_token, viewer, approver)
    proc.stop()


def _control(setup: Setup, token: str, **headers: str) -> httpx.Client:
    return httpx.Client(
        base_url=setup.proxy.control_url,
        headers={"Authorization": f"Bearer {token}", **headers},
        trust_env=False,
        timeout=30,
    )


def _get(setup: Setup, url: str, session: str | None = None) -> httpx.Response:
    """GET through the proxy as agent alice (in `session`), or anonymously."""
    target = setup.proxy.url
    if session is not None:
        target = proxy_url(target, "alice", session, setup.agent_token)
    with httpx.Client(proxy=target, trust_env=False, timeout=30) as client:
        return client.get(url)


def _held_id(setup: Setup, url: str, session: str | None = None) -> str:
    response = _get(setup, url, session)
    assert response.headers["x-egress-warden-reason"] == "approval_pending", response.text
    return response.headers["x-egress-warden-pending-id"]


def test_a_viewer_reads_but_decides_nothing(setup: Setup, upstreams: Upstreams) -> None:
    item_id = _held_id(setup, f"http://{NAMES[0]}:{upstreams.http.port}/v")
    with _control(setup, setup.viewer) as viewer:
        assert viewer.get("/v1/pending").status_code == 200
        assert viewer.get("/v1/grants").status_code == 200
        assert viewer.get("/v1/sessions").status_code == 200
        assert viewer.get("/v1/decisions").status_code == 200
        refused = [
            viewer.post(f"/v1/pending/{item_id}/approve", json={"scope": "once"}),
            viewer.post(f"/v1/pending/{item_id}/deny", json={}),
            viewer.post("/v1/grants", json={"pattern": "viewer.example"}),
            viewer.delete("/v1/grants/g-000000000000"),
            viewer.post("/v1/policy/reload"),
            viewer.post("/v1/sessions/alice/s/end"),
        ]
    for response in refused:
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "approver_role_required"
    with _control(setup, TOKEN) as admin:
        assert item_id in {i["id"] for i in admin.get("/v1/pending").json()}
        assert all(g["pattern"] != "viewer.example" for g in admin.get("/v1/grants").json())


def test_an_approver_is_recorded_by_name(setup: Setup, upstreams: Upstreams) -> None:
    url = f"http://{NAMES[1]}:{upstreams.http.port}/a"
    item_id = _held_id(setup, url)
    with _control(setup, setup.approver, **{"X-Egress-Warden-Approver": "someone-else"}) as abe:
        answer = abe.post(f"/v1/pending/{item_id}/approve", json={"scope": "always"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["by"] == "abe"
        assert answer.json()["grant"]["created_by"] == "abe"
        assert _get(setup, url).status_code == 200
        made = abe.post("/v1/grants", json={"pattern": "abe.example"})
        assert made.status_code == 201 and made.json()["created_by"] == "abe"
        revoked = abe.delete(f"/v1/grants/{made.json()['id']}")
        assert revoked.json() == {"id": made.json()["id"], "revoked": True, "by": "abe"}
        reloaded = abe.post("/v1/policy/reload")
        assert reloaded.status_code == 200 and reloaded.json()["by"] == "abe"
        # a private grant stays the admin role's
        private = abe.post("/v1/grants", json={"pattern": "127.0.0.9", "private": True})
        assert private.status_code == 403
        assert private.json()["error"] == "admin_role_required"


def test_an_admin_added_or_revoked_while_running_counts_at_once(setup: Setup) -> None:
    with _control(setup, "ewa_not-issued") as stranger:
        assert stranger.get("/v1/pending").status_code == 403
    registry = AdminRegistry.load(admins_path(setup.state))
    token = registry.add("late", Role.VIEWER)
    with _control(setup, token) as late:
        assert late.get("/v1/pending").status_code == 200
        registry.revoke("late")
        refused = late.get("/v1/pending")
        assert refused.status_code == 403 and refused.json()["error"] == "forbidden"


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:{port}", 200),
        ("localhost:{port}", 200),
        (CONSOLE_NAME + ":{port}", 200),
        (CONSOLE_NAME, 200),
        ("rebound.example:{port}", 421),
        ("127.0.0.1", 200),
        ("127.0.0.1:1", 421),
        ("127.0.0.2:{port}", 421),
    ],
)
def test_the_control_api_answers_only_its_own_host_names(
    setup: Setup, host: str, status: int
) -> None:
    with _control(setup, TOKEN, Host=host.format(port=setup.proxy.control_port)) as client:
        response = client.get("/v1/pending")
        health = client.get("/healthz")
    assert response.status_code == status, response.text
    if status == 421:
        assert response.json()["error"] == "misdirected_request"
    assert health.status_code == 200  # a probe may use any name


def test_ending_a_session_ends_its_session_grants(setup: Setup, upstreams: Upstreams) -> None:
    url = f"http://{NAMES[2]}:{upstreams.http.port}/s"
    item_id = _held_id(setup, url, "s1")
    with _control(setup, setup.approver) as abe:
        answer = abe.post(
            f"/v1/pending/{item_id}/approve", json={"scope": "session", "for": "agent"}
        )
        assert answer.status_code == 200, answer.text
        grant = answer.json()["grant"]
        assert (grant["session"], grant["agent"]) == ("s1", "alice")
        assert grant["expires_at"] is not None  # approval.session_idle
        assert _get(setup, url, "s1").status_code == 200
        # another session of the same agent asks on its own
        assert _get(setup, url, "s2").headers["x-egress-warden-reason"] == "approval_pending"
        sessions = {(s["agent"], s["session"]): s for s in abe.get("/v1/sessions").json()}
        s1 = sessions[("alice", "s1")]
        assert [g["id"] for g in s1["grants"]] == [grant["id"]]
        assert s1["requests"] >= 2 and s1["first_seen"] <= s1["last_seen"]
        assert ("alice", "s2") in sessions
        ended = abe.post("/v1/sessions/alice/s1/end")
        assert ended.status_code == 200, ended.text
        assert ended.json()["revoked"] == [grant["id"]] and ended.json()["by"] == "abe"
        assert all(g["id"] != grant["id"] for g in abe.get("/v1/grants").json())
        again = abe.post("/v1/sessions/alice/s1/end")
        assert again.json()["revoked"] == []
    assert _get(setup, url, "s1").headers["x-egress-warden-reason"] == "approval_pending"


def test_sessions_cli(setup: Setup, upstreams: Upstreams, tmp_path: Path) -> None:
    url = f"http://{NAMES[3]}:{upstreams.http.port}/c"
    item_id = _held_id(setup, url, "cli")
    token_file = tmp_path / "token"
    token_file.write_text(setup.approver)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy.cli",
                *args,
                *("--control", setup.proxy.control_url, "--token-file", str(token_file)),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )

    approved = cli("approve", item_id, "--scope", "session", "--for", "agent")
    assert approved.returncode == 0, approved.stderr
    assert _get(setup, url, "cli").status_code == 200
    listing = cli("sessions")
    assert listing.returncode == 0, listing.stderr
    assert "cli" in listing.stdout and NAMES[3] in listing.stdout
    ended = cli("sessions", "end", "alice", "cli")
    assert ended.returncode == 0, ended.stderr
    assert "1 session grant(s) revoked" in ended.stdout
    assert _get(setup, url, "cli").headers["x-egress-warden-reason"] == "approval_pending"
    token_file.write_text(setup.viewer)
    refused = cli("sessions", "end", "alice", "cli")
    assert refused.returncode == 1 and "role" in refused.stderr
