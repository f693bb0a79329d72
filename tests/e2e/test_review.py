"""The auto-review tier through the real proxy: rule and webhook reviewers decide routine and
risky destinations, humans see only escalations, agents can say why, nothing leaks upstream."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.agents import AgentRegistry
from proxy.hosts import canonicalize_host
from tests.conftest import ALLOWED_IP, Upstreams
from tests.support.clients import raw_request
from tests.support.control import TOKEN, TOKEN_ENV, api, approve
from tests.support.dns import DnsServer
from tests.support.proxy import REPO, ProxyProcess, start_proxy
from tests.support.review_servers import ReviewServer, start_chat_completions, start_webhook

pytestmark = pytest.mark.e2e

JUSTIFICATION = "installing the docs toolchain for the build"
HEX = secrets.token_hex(16)
B32 = base64.b32encode(secrets.token_bytes(40)).decode().lower().rstrip("=")[:60]
NAMES = [
    "docs.trusted.test",
    "pkg.trusted.test",
    "again.trusted.test",
    "cap.trusted.test",
    "anon.trusted.test",
    f"{HEX}.exfil.test",
    f"{B32}.exfil.test",
    "snippets.paste.test",
    "odd.unknown.test",
    "other.unknown.test",
    "why.unknown.test",
    "connect-why.unknown.test",
    "approve.hook.test",
    "deny.hook.test",
    "slow.hook.test",
    "garbage.hook.test",
    "once.hook.test",
    "fwd.trusted.test",
]


@pytest.fixture(scope="module")
def webhook() -> Iterator[ReviewServer]:
    server = start_webhook()
    server.slow = 3.0
    yield server
    server.close()


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    server = DnsServer(dict.fromkeys(NAMES, ALLOWED_IP))
    yield server
    server.close()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("agents") / "agents.yaml"
    registry = AgentRegistry(path)
    return path, {agent: registry.add(agent) for agent in ("alice", "bob")}


@pytest.fixture(scope="module")
def reviewed(
    upstreams: Upstreams,
    tmp_path_factory: pytest.TempPathFactory,
    webhook: ReviewServer,
    dns: DnsServer,
    tokens: tuple[Path, dict[str, str]],
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("review")
    port = upstreams.http.port
    policy = tmp / "policy.yaml"
    policy.write_text(
        f"""\
version: 1
default: ask
allow: [allowed.test, {ALLOWED_IP}/32]
network: {{ports: [80, 443, {port}]}}
approval:
  wait: 1s
  review:
    - kind: rules
      trusted: ["**.trusted.test"]
      standard_ports: [80, 443, {port}]
      categories: {{paste: ["**.paste.test"]}}
      rate: {{max_new: 100, window: 1m}}
    - kind: webhook
      url: {webhook.url}/review
      timeout: 500ms
auth: {{required: false}}
"""
    )
    proc = start_proxy(
        tmp / "state",
        [policy],
        "--agents",
        str(tokens[0]),
        "--nameserver",
        f"{dns.host}:{dns.port}",
        env=TOKEN_ENV,
    )
    yield proc
    proc.stop()


def _get(
    proxy: ProxyProcess,
    url: str,
    auth: tuple[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    target = httpx.Proxy(proxy.url, auth=auth) if auth else proxy.url
    with httpx.Client(proxy=target, trust_env=False, timeout=30) as client:
        return client.get(url, headers=headers)


def _url(upstreams: Upstreams, name: str) -> str:
    return f"http://{name}:{upstreams.http.port}/"


def _pending(proxy: ProxyProcess) -> list[dict[str, Any]]:
    with api(proxy) as client:
        items: list[dict[str, Any]] = client.get("/v1/pending").json()
    return items


def _grants(proxy: ProxyProcess) -> list[dict[str, Any]]:
    with api(proxy) as client:
        items: list[dict[str, Any]] = client.get("/v1/grants").json()
    return items


def _decision_rows(proxy: ProxyProcess, host: str) -> list[dict[str, Any]]:
    with api(proxy) as client:
        rows: list[dict[str, Any]] = client.get("/v1/decisions", params={"host": host}).json()
    return rows


def _approval_events(proxy: ProxyProcess, host: str, wait: float = 5.0) -> list[dict[str, Any]]:
    """The `egress.approval` log lines for `host` (waits up to `wait` for the first)."""
    deadline = time.monotonic() + wait
    while True:
        found = [
            line
            for line in list(proxy.lines)
            if line.get("event") == "egress.approval" and line.get("server.address") == host
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def _alice(tokens: tuple[Path, dict[str, str]]) -> tuple[str, str]:
    return ("alice", tokens[1]["alice"])


def test_trusted_destination_is_approved_automatically_with_a_session_grant(
    reviewed: ProxyProcess, upstreams: Upstreams, tokens: tuple[Path, dict[str, str]]
) -> None:
    host = "docs.trusted.test"
    response = _get(reviewed, _url(upstreams, host), _alice(tokens))
    assert response.status_code == 200, response.text
    assert host not in {i["host"] for i in _pending(reviewed)}
    grant = next(g for g in _grants(reviewed) if g["pattern"].startswith(host))
    # at most the configured cap: a session grant for this agent only
    assert grant["scope"] == "session" and grant["agent"] == "alice"
    assert grant["created_by"] == "auto:rules" and "**.trusted.test" in grant["note"]
    event = _approval_events(reviewed, host)[-1]
    assert event["egress.approval.state"] == "approved"
    assert event["egress.approval.reviewer"] == "rules"
    assert "trusted" in event["egress.approval.signals"]
    assert "**.trusted.test" in event["egress.approval.rationale"]
    row = _decision_rows(reviewed, host)[0]
    assert row["decision"] == "allow" and row["review"]["reviewer"] == "rules"
    assert row["review"]["signals"] == ["trusted"]
    # the grant lets the next request through without another review
    assert _get(reviewed, _url(upstreams, host), _alice(tokens)).status_code == 200
    assert len(_approval_events(reviewed, host)) == 1


def test_anonymous_caller_gets_a_once_approval_and_no_grant(
    reviewed: ProxyProcess, upstreams: Upstreams
) -> None:
    host = "anon.trusted.test"
    assert _get(reviewed, _url(upstreams, host)).status_code == 200
    assert not [g for g in _grants(reviewed) if g["pattern"].startswith(host)]
    event = _approval_events(reviewed, host)[-1]
    assert event["egress.approval.scope"] == "once"


@pytest.mark.parametrize(
    ("host", "signal"),
    [
        (f"{HEX}.exfil.test", "encoded_label"),
        (f"{B32}.exfil.test", "encoded_label"),
        ("snippets.paste.test", "category:paste"),
    ],
)
def test_risky_destination_is_denied_once_without_dns_or_human(
    reviewed: ProxyProcess,
    upstreams: Upstreams,
    dns: DnsServer,
    tokens: tuple[Path, dict[str, str]],
    host: str,
    signal: str,
) -> None:
    hits = len(upstreams.http.hits)
    response = _get(reviewed, _url(upstreams, host), _alice(tokens))
    assert response.status_code == 403
    assert response.headers["x-egress-warden-reason"] == "approval_denied"
    text = " ".join(response.text.split())  # the body is wrapped for terminals
    assert "denied by the rules reviewer" in text and signal in text
    assert len(upstreams.http.hits) == hits
    assert not dns.queried(host)  # the rule reviewer never resolves a name
    assert host not in {i["host"] for i in _pending(reviewed)}
    # a `once` denial: no deny grant, so a human can still allow it later
    assert not [g for g in _grants(reviewed) if g["pattern"].startswith(host)]
    row = _decision_rows(reviewed, host)[0]
    assert row["reason"] == "approval_denied"
    assert row["review"]["reviewer"] == "rules" and signal in row["review"]["signals"]
    event = _approval_events(reviewed, host)[-1]
    assert event["egress.approval.state"] == "denied" and event["egress.approval.scope"] == "once"


def test_webhook_decides_what_the_rules_escalate(
    reviewed: ProxyProcess,
    upstreams: Upstreams,
    webhook: ReviewServer,
    tokens: tuple[Path, dict[str, str]],
) -> None:
    approved = _get(reviewed, _url(upstreams, "approve.hook.test"), _alice(tokens))
    assert approved.status_code == 200
    denied = _get(reviewed, _url(upstreams, "deny.hook.test"), _alice(tokens))
    assert denied.status_code == 403 and "webhook says deny" in " ".join(denied.text.split())
    sent = [r["body"]["review"] for r in webhook.received]
    asked = next(r for r in sent if r["host"] == "approve.hook.test")
    assert asked["agent"] == "alice" and asked["method"] == "GET" and asked["path"] == "/"
    assert asked["signals"] == []  # the rules found nothing either way
    event = _approval_events(reviewed, "approve.hook.test")[-1]
    assert event["egress.approval.reviewer"] == "webhook"
    # a webhook asking for `once` gets no grant
    assert _get(reviewed, _url(upstreams, "once.hook.test"), _alice(tokens)).status_code == 200
    assert not [g for g in _grants(reviewed) if g["pattern"].startswith("once.hook.test")]


def test_human_queue_sees_exactly_the_escalations(
    reviewed: ProxyProcess, upstreams: Upstreams, tokens: tuple[Path, dict[str, str]]
) -> None:
    before = {i["host"] for i in _pending(reviewed)}
    asked = {
        "pkg.trusted.test": 200,  # rules approve
        f"{HEX}.exfil.test": 403,  # rules deny (already denied once: no item either)
        "slow.hook.test": 403,  # webhook timeout: escalated
        "garbage.hook.test": 403,  # webhook garbage: escalated
        "odd.unknown.test": 403,  # nobody decides: escalated
    }
    for host, status in asked.items():
        response = _get(reviewed, _url(upstreams, host), _alice(tokens))
        assert response.status_code == status, (host, response.text)
    queued = {i["host"] for i in _pending(reviewed)} - before
    assert queued == {"slow.hook.test", "garbage.hook.test", "odd.unknown.test"}
    item = next(i for i in _pending(reviewed) if i["host"] == "slow.hook.test")
    trail = item["review"]["trail"]
    assert [t["reviewer"] for t in trail] == ["rules", "webhook"]
    assert all(t["outcome"] == "escalate" for t in trail)
    assert "500ms" in trail[1]["rationale"] or "0.5s" in trail[1]["rationale"]
    # a human approves an escalation as before
    approve(reviewed, item["id"], scope="once", grant_for="agent")
    assert _get(reviewed, _url(upstreams, "slow.hook.test"), _alice(tokens)).status_code == 200


def test_justification_is_stored_shown_and_never_forwarded(
    reviewed: ProxyProcess, upstreams: Upstreams, tokens: tuple[Path, dict[str, str]]
) -> None:
    header = {"X-Egress-Warden-Justification": JUSTIFICATION}
    held = _get(reviewed, _url(upstreams, "why.unknown.test"), _alice(tokens), header)
    assert held.status_code == 403
    assert "X-Egress-Warden-Justification" in held.text  # the refusal says how to add one
    item = next(i for i in _pending(reviewed) if i["host"] == "why.unknown.test")
    assert item["justification"] == JUSTIFICATION
    # shown in the CLI's pending table
    shown = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "pending", "--control", reviewed.control_url],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "EGRESS_WARDEN_CONTROL_TOKEN": TOKEN},
        check=False,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"why: {JUSTIFICATION}" in shown.stdout
    # an approved request with the header: the upstream never sees it
    hits = len(upstreams.http.hits)
    ok = _get(reviewed, _url(upstreams, "fwd.trusted.test"), _alice(tokens), header)
    assert ok.status_code == 200
    new = upstreams.http.hits[hits:]
    assert new and all("x-egress-warden-justification" not in h.headers for h in new)


def test_justification_on_connect_is_stored(
    reviewed: ProxyProcess, tokens: tuple[Path, dict[str, str]]
) -> None:
    user, token = _alice(tokens)
    credentials = base64.b64encode(f"{user}:{token}".encode()).decode()
    head = (
        "CONNECT connect-why.unknown.test:443 HTTP/1.1\r\n"
        "Host: connect-why.unknown.test:443\r\n"
        f"Proxy-Authorization: Basic {credentials}\r\n"
        f"X-Egress-Warden-Justification: {JUSTIFICATION} (tls)\r\n\r\n"
    )
    response = raw_request(reviewed.proxy_port, head, timeout=15)
    assert response.status == 403
    item = next(i for i in _pending(reviewed) if i["host"] == "connect-why.unknown.test")
    assert item["justification"] == f"{JUSTIFICATION} (tls)"
    assert item["agent"] == "alice"


def test_rate_signal_escalates_a_flood_of_new_destinations(
    upstreams: Upstreams, tmp_path: Path, dns: DnsServer
) -> None:
    port = upstreams.http.port
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"""\
version: 1
default: ask
allow: [{ALLOWED_IP}/32]
network: {{ports: [{port}]}}
approval:
  wait: 200ms
  auto: {{for: all, scope: once}}
  review:
    - kind: rules
      trusted: ["**.trusted.test"]
      standard_ports: [{port}]
      rate: {{max_new: 2, window: 1m}}
"""
    )
    proc = start_proxy(
        tmp_path / "state", [policy], "--nameserver", f"{dns.host}:{dns.port}", env=TOKEN_ENV
    )
    try:
        statuses = [
            _get(proc, _url(upstreams, name)).status_code
            for name in ("docs.trusted.test", "pkg.trusted.test", "again.trusted.test")
        ]
        assert statuses == [200, 200, 403]
        item = next(i for i in _pending(proc) if i["host"] == "again.trusted.test")
        assert "rate" in item["review"]["signals"]
    finally:
        proc.stop()


def test_requirements_forbidding_auto_approval_send_everything_else_to_humans(
    upstreams: Upstreams, tmp_path: Path, dns: DnsServer
) -> None:
    port = upstreams.http.port
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"""\
version: 1
default: ask
allow: [{ALLOWED_IP}/32]
network: {{ports: [{port}]}}
approval:
  wait: 200ms
  auto: {{for: all}}
  review: [{{kind: rules, trusted: ["**.trusted.test"], standard_ports: [{port}]}}]
"""
    )
    requirements = tmp_path / "requirements.yaml"
    requirements.write_text("version: 1\napproval:\n  auto: {enabled: false}\n")
    proc = start_proxy(
        tmp_path / "state",
        [policy],
        "--requirements",
        str(requirements),
        "--nameserver",
        f"{dns.host}:{dns.port}",
        env=TOKEN_ENV,
    )
    try:
        assert _get(proc, _url(upstreams, "cap.trusted.test")).status_code == 403
        item = next(i for i in _pending(proc) if i["host"] == "cap.trusted.test")
        assert item["review"]["trail"][-1]["reviewer"] == "policy"
        denied = _get(proc, _url(upstreams, f"{HEX}.exfil.test"))
        assert denied.headers["x-egress-warden-reason"] == "approval_denied"
    finally:
        proc.stop()


def test_concurrent_requests_share_one_review(
    reviewed: ProxyProcess, upstreams: Upstreams, webhook: ReviewServer
) -> None:
    before = sum(1 for r in webhook.received if r["body"]["review"]["host"] == "other.unknown.test")
    results: list[int] = []
    start = threading.Barrier(3)  # all three in flight together, also on a busy machine

    def one() -> None:
        start.wait(10)
        results.append(_get(reviewed, _url(upstreams, "other.unknown.test")).status_code)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [403, 403, 403]
    asked = sum(1 for r in webhook.received if r["body"]["review"]["host"] == "other.unknown.test")
    assert asked - before <= 2  # shared while in flight (a late one may join the pending item)
    assert [i["host"] for i in _pending(reviewed)].count("other.unknown.test") == 1


# -- a scripted agent session with the shipped example policy ----------------------------------

SHIPPED = REPO / "policies" / "examples" / "auto-review.yaml"
ROUTINE = [
    "crates.io",
    "static.crates.io",
    "index.crates.io",
    "proxy.golang.org",
    "sum.golang.org",
    "rubygems.org",
    "repo.maven.apache.org",
    "registry-1.docker.io",
    "auth.docker.io",
    "ghcr.io",
    "docs.rs",
    "docs.python.org",
    "developer.mozilla.org",
    "myproject.readthedocs.io",
    "raw.githubusercontent.com",
]
ODD = ["api.vendor-sdk.example", "status.vendor-sdk.example"]
BAD = [
    "g\u0456thub.com",
    f"{HEX}.d.attacker.example",
    f"{B32}.dns.attacker.example",
    "pastebin.com",
    "quiet-river-1234.trycloudflare.com",
    "webhook.site",
    "update-checker.zip",
]


def _connect(proxy: ProxyProcess, host: str, auth: tuple[str, str], port: int = 443) -> int:
    name = canonicalize_host(host).name
    credentials = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    head = (
        f"CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n"
        f"Proxy-Authorization: Basic {credentials}\r\n\r\n"
    )
    return raw_request(proxy.proxy_port, head, timeout=20).status


def test_typical_agent_session_with_the_shipped_policy(
    tmp_path: Path, tokens: tuple[Path, dict[str, str]]
) -> None:
    names = [canonicalize_host(n).name for n in [*ROUTINE, *ODD, *BAD]]
    overlay = tmp_path / "local.yaml"
    # the local overlay: short holds for the test, and the test's upstream address allowed
    overlay.write_text(f"version: 1\nallow: [{ALLOWED_IP}/32]\napproval: {{wait: 300ms}}\n")
    with DnsServer(dict.fromkeys(names, ALLOWED_IP)) as dns:
        proc = start_proxy(
            tmp_path / "state",
            [SHIPPED, overlay],
            "--agents",
            str(tokens[0]),
            "--nameserver",
            f"{dns.host}:{dns.port}",
            env=TOKEN_ENV,
        )
        try:
            alice = _alice(tokens)
            for host in [*ROUTINE, *ODD, *BAD, *ROUTINE[:3]]:  # a few repeats, as installs do
                _connect(proc, host, alice)
            outcome: dict[str, str] = {}
            for host in [*ROUTINE, *ODD, *BAD]:
                name = canonicalize_host(host).name
                rows = _decision_rows(proc, name)
                assert rows, host
                oldest = rows[-1]  # held requests log `hold` first, then their answer
                outcome[host] = (
                    rows[-2]["reason"] if oldest["decision"] == "hold" else oldest["reason"]
                )
                if oldest["reason"] in ("approved", "approval_denied"):
                    # every automatic decision states its reason
                    assert oldest["review"]["reviewer"] == "rules", (host, oldest)
                    assert oldest["review"]["rationale"], (host, oldest)
            assert {h: outcome[h] for h in ROUTINE} == dict.fromkeys(ROUTINE, "approved")
            assert {h: outcome[h] for h in BAD} == dict.fromkeys(BAD, "approval_denied")
            assert {h: outcome[h] for h in ODD} == dict.fromkeys(ODD, "approval_pending")
            # the admin sees only the few that deserve a look
            assert sorted(i["host"] for i in _pending(proc)) == sorted(ODD)
            # routine hosts got session grants for alice, nothing wider
            grants = [g for g in _grants(proc) if g["created_by"] == "auto:rules"]
            assert len(grants) == len(ROUTINE)
            assert {(g["scope"], g["agent"]) for g in grants} == {("session", "alice")}
            # nothing exfiltration-shaped was ever resolved
            for host in BAD:
                assert not dns.queried(canonicalize_host(host).name), host
        finally:
            proc.stop()


def test_llm_reviewer_through_the_proxy(
    upstreams: Upstreams, tmp_path: Path, tokens: tuple[Path, dict[str, str]]
) -> None:
    chat = start_chat_completions()
    chat.slow = 3.0
    names = ["approve.llm.test", "deny.llm.test", "garbage.llm.test", "refuse.llm.test"]
    port = upstreams.http.port
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"""\
version: 1
default: ask
allow: [{ALLOWED_IP}/32]
network: {{ports: [{port}]}}
approval:
  wait: 200ms
  review:
    - {{kind: rules, standard_ports: [{port}]}}
    - {{kind: llm, url: "{chat.url}/v1", model: local-test, timeout: 1s}}
"""
    )
    with DnsServer(dict.fromkeys(names, ALLOWED_IP)) as dns:
        proc = start_proxy(
            tmp_path / "state",
            [policy],
            "--agents",
            str(tokens[0]),
            "--nameserver",
            f"{dns.host}:{dns.port}",
            env=TOKEN_ENV,
        )
        try:
            alice = _alice(tokens)
            assert _get(proc, _url(upstreams, "approve.llm.test"), alice).status_code == 200
            denied = _get(proc, _url(upstreams, "deny.llm.test"), alice)
            assert denied.headers["x-egress-warden-reason"] == "approval_denied"
            for host in ("garbage.llm.test", "refuse.llm.test"):
                assert _get(proc, _url(upstreams, host), alice).status_code == 403
            assert sorted(i["host"] for i in _pending(proc)) == [
                "garbage.llm.test",
                "refuse.llm.test",
            ]
            event = _approval_events(proc, "approve.llm.test")[-1]
            assert event["egress.approval.reviewer"] == "llm"
            assert event["egress.approval.state"] == "approved"
            asked = [r["body"]["model"] for r in chat.received]
            assert asked and set(asked) == {"local-test"}
        finally:
            proc.stop()
            chat.close()
