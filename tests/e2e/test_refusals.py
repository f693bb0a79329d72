"""What an agent reads when it is refused, through a running proxy with curl, requests and pip;
and what an admin reads from the CLI (docs/refusals.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from proxy.agents import AgentRegistry
from tests.conftest import ALLOWED_IP, Upstreams
from tests.support.clients import curl, raw_request
from tests.support.control import TOKEN_ENV, api, wait_pending
from tests.support.proxy import REPO, ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

CONTACT = "#egress-help (Platform team)"
HELP_URL = "https://wiki.example/egress"
HELD = [f"r{i}.held.test" for i in range(6)]
JSON_FIELDS = {
    "reason",
    "message",
    "destination",
    "rule",
    "source",
    "pending_id",
    "request_id",
    "retry_after",
    "help",
    "contact",
    "help_url",
}


def _policy_text(upstreams: Upstreams, approval: str) -> str:
    ports = sorted({80, 443, upstreams.http.port})
    return f"""\
version: 1
default: ask
allow:
  - allowed.test
  - {ALLOWED_IP}/32
deny:
  - evil.test
network:
  ports: {ports}
approval: {approval}
auth:
  required: false
agents:
  alice: {{default: deny}}
refusal:
  contact: "{CONTACT}"
  help_url: {HELP_URL}
"""


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("agents") / "agents.yaml"
    registry = AgentRegistry(path)
    return path, {agent: registry.add(agent) for agent in ("alice", "bob")}


def _start(
    upstreams: Upstreams, tmp: Path, agents_file: Path, approval: str
) -> tuple[ProxyProcess, Path]:
    policy = tmp / "policy.yaml"
    policy.write_text(_policy_text(upstreams, approval))
    extra = ["--agents", str(agents_file)]
    for name in ("allowed.test", "evil.test", *HELD):
        extra += ["--resolve", f"{name}:{ALLOWED_IP}"]
    return start_proxy(tmp / "state", [policy], *extra, env=TOKEN_ENV), policy


@pytest.fixture(scope="module")
def warden(
    upstreams: Upstreams,
    tmp_path_factory: pytest.TempPathFactory,
    agents: tuple[Path, dict[str, str]],
) -> Iterator[tuple[ProxyProcess, Path]]:
    proc, policy = _start(upstreams, tmp_path_factory.mktemp("refusals"), agents[0], "{wait: 1s}")
    yield proc, policy
    proc.stop()


@pytest.fixture(scope="module")
def limited(
    upstreams: Upstreams,
    tmp_path_factory: pytest.TempPathFactory,
    agents: tuple[Path, dict[str, str]],
) -> Iterator[ProxyProcess]:
    proc, _ = _start(
        upstreams, tmp_path_factory.mktemp("limited"), agents[0], "{wait: 1s, max_pending: 1}"
    )
    yield proc
    proc.stop()


def _line_of(policy: Path, text: str) -> int:
    return next(n for n, line in enumerate(policy.read_text().splitlines(), 1) if text in line)


def _get(
    proxy: ProxyProcess, url: str, accept: str | None = None, auth: str | None = None
) -> requests.Response:
    """A plain-HTTP GET through the proxy with `requests` (no environment, no retries)."""
    with requests.Session() as session:
        session.trust_env = False
        proxy_url = proxy.url.replace("http://", f"http://{auth}@") if auth else proxy.url
        headers = {"Accept": accept} if accept else {}
        return session.get(url, proxies={"http": proxy_url}, headers=headers, timeout=30)


def _connect(proxy: ProxyProcess, target: str, accept: str | None = None) -> Any:
    accept_line = f"Accept: {accept}\r\n" if accept else ""
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{accept_line}\r\n"
    return raw_request(proxy.proxy_port, head, host=proxy.proxy_host)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _assert_common_headers(headers: Any, reason: str) -> None:
    assert headers["x-egress-warden-reason"] == reason
    assert len(headers["x-egress-warden-request-id"]) == 16
    assert headers["proxy-status"].startswith("egress-warden; error=")


def _assert_json(
    response: requests.Response, reason: str, destination: str, **expected: Any
) -> dict[str, Any]:
    assert response.headers["Content-Type"] == "application/json"
    document: dict[str, Any] = response.json()
    assert set(document) == JSON_FIELDS
    assert document["reason"] == reason
    assert document["destination"] == destination
    assert document["request_id"] == response.headers["X-Egress-Warden-Request-Id"]
    assert document["contact"] == CONTACT and document["help_url"] == HELP_URL
    for name, value in expected.items():
        assert document[name] == value, name
    return document


def _never_offers_approval(text: str) -> None:
    lowered = text.lower()
    assert "approv" not in lowered and "pending" not in lowered


# -- each reason, text and JSON -------------------------------------------------------------------


def test_deny_rule_text_and_json(warden: tuple[ProxyProcess, Path], upstreams: Upstreams) -> None:
    proxy, policy = warden
    target = f"evil.test:{upstreams.http.port}"
    source = f"{policy}:{_line_of(policy, '- evil.test')}"
    text = _get(proxy, f"http://{target}/")
    assert text.status_code == 403
    assert text.reason == f"Blocked by egress policy: {target} denied by rule 'evil.test'"
    _assert_common_headers(text.headers, "deny_rule")
    assert text.headers["Content-Type"] == "text/plain; charset=utf-8"
    body = _flat(text.text)
    assert f"rule: evil.test ({source})" in body
    assert "A deny rule always wins" in body and f"policy file {policy}" in body
    assert f"Who to ask: {CONTACT}" in body and f"More help: {HELP_URL}" in body
    _never_offers_approval(text.text)
    assert "Retry-After" not in text.headers

    document = _assert_json(
        _get(proxy, f"http://{target}/", accept="application/json"),
        "deny_rule",
        target,
        rule="evil.test",
        source=source,
        pending_id=None,
        retry_after=None,
    )
    _never_offers_approval(document["help"])
    assert not [hit for hit in upstreams.http.hits if "evil.test" in str(hit)]


def test_deny_rule_over_connect_text_and_json(warden: tuple[ProxyProcess, Path]) -> None:
    proxy, _ = warden
    text = _connect(proxy, "evil.test:443")
    assert text.status == 403
    assert text.reason == "Blocked by egress policy: evil.test:443 denied by rule 'evil.test'"
    _assert_common_headers(text.headers, "deny_rule")
    _never_offers_approval(text.body.decode())
    assert f"Who to ask: {CONTACT}" in text.body.decode()
    answer = _connect(proxy, "evil.test:443", accept="application/json")
    assert answer.headers["content-type"] == "application/json"
    document = json.loads(answer.body)
    assert document["reason"] == "deny_rule" and document["destination"] == "evil.test:443"
    assert document["contact"] == CONTACT


def test_port_text_and_json(warden: tuple[ProxyProcess, Path]) -> None:
    proxy, _ = warden
    text = _get(proxy, "http://allowed.test:81/")
    assert text.status_code == 403
    assert text.reason == "Blocked by egress policy: allowed.test:81 denied: port 81 is not allowed"
    _assert_common_headers(text.headers, "port")
    assert "Port 81 is not among the ports the policy (network.ports) allow" in _flat(text.text)
    _never_offers_approval(text.text)
    document = _assert_json(
        _get(proxy, "http://allowed.test:81/", accept="application/json"),
        "port",
        "allowed.test:81",
        rule=None,
        pending_id=None,
        retry_after=None,
    )
    _never_offers_approval(document["help"])


def test_private_network_text_and_json(warden: tuple[ProxyProcess, Path]) -> None:
    proxy, _ = warden
    text = _get(proxy, "http://169.254.169.254/latest/meta-data/")
    assert text.status_code == 403
    assert text.reason.startswith("Blocked by egress policy: 169.254.169.254:80 denied:")
    _assert_common_headers(text.headers, "private_network")
    assert "error=destination_ip_prohibited" in text.headers["Proxy-Status"]
    assert "never reachable through this proxy" in _flat(text.text)
    _never_offers_approval(text.text)
    document = _assert_json(
        _get(proxy, "http://169.254.169.254/", accept="application/json"),
        "private_network",
        "169.254.169.254:80",
        pending_id=None,
        retry_after=None,
    )
    _never_offers_approval(document["help"])


def test_default_deny_text_and_json(
    warden: tuple[ProxyProcess, Path], agents: tuple[Path, dict[str, str]]
) -> None:
    proxy, _ = warden
    alice = f"alice:{agents[1]['alice']}"
    text = _get(proxy, "http://unlisted.test/", auth=alice)
    assert text.status_code == 403
    assert text.reason == "Blocked by egress policy: unlisted.test:80 denied: no rule allows it"
    _assert_common_headers(text.headers, "default_deny")
    body = _flat(text.text)
    assert "No rule allows unlisted.test:80" in body
    assert "Nothing was queued for review, so there is nothing waiting to be decided" in body
    assert "access needs an allow rule added to the policy" in body
    assert "pending id" not in body
    _assert_json(
        _get(proxy, "http://unlisted.test/", accept="application/json", auth=alice),
        "default_deny",
        "unlisted.test:80",
        pending_id=None,
        retry_after=None,
    )


def test_held_request_carries_pending_id_and_retry_after(
    warden: tuple[ProxyProcess, Path], upstreams: Upstreams
) -> None:
    proxy, _ = warden
    target = f"{HELD[0]}:{upstreams.http.port}"
    text = _get(proxy, f"http://{target}/")
    assert text.status_code == 403
    _assert_common_headers(text.headers, "approval_pending")
    pending_id = text.headers["X-Egress-Warden-Pending-Id"]
    assert text.reason == (
        f"Blocked by egress policy: {target} is waiting for approval (pending id {pending_id})"
    )
    assert text.headers["Retry-After"] == "1"  # approval.wait
    body = _flat(text.text)
    assert f"pending id: {pending_id}" in body
    assert f"once an approver approves item {pending_id}, the retry passes" in body
    assert "X-Egress-Warden-Justification" in body
    document = _assert_json(
        _get(proxy, f"http://{target}/", accept="application/json"),
        "approval_pending",
        target,
        pending_id=pending_id,  # the retry joined the same item
        retry_after=1,
    )
    assert pending_id in document["help"]


def test_approval_limit_text_and_json(limited: ProxyProcess, upstreams: Upstreams) -> None:
    first = _get(limited, f"http://{HELD[1]}:{upstreams.http.port}/")
    assert first.headers["X-Egress-Warden-Reason"] == "approval_pending"
    target = f"{HELD[2]}:{upstreams.http.port}"
    text = _get(limited, f"http://{target}/")
    assert text.status_code == 403
    _assert_common_headers(text.headers, "approval_limit")
    assert "X-Egress-Warden-Pending-Id" not in text.headers
    body = _flat(text.text)
    assert f"no pending item was made for {target}" in body
    assert "Retrying now will be refused the same way" in body
    _assert_json(
        _get(limited, f"http://{target}/", accept="application/json"),
        "approval_limit",
        target,
        pending_id=None,
        retry_after=None,
    )


def test_auth_is_407_with_how_to_send_credentials(
    warden: tuple[ProxyProcess, Path], upstreams: Upstreams
) -> None:
    proxy, _ = warden
    url = f"http://allowed.test:{upstreams.http.port}/"
    wrong = proxy.url.replace("http://", "http://alice:wrong-token@")
    shown = curl("-i", "-x", wrong, url)
    head, _, body = shown.stdout.partition("\n\n")  # text mode: CRLF read as LF
    assert head.startswith("HTTP/1.1 407 Proxy authentication required:")
    assert 'Proxy-Authenticate: Basic realm="egress-warden"' in head
    assert "X-Egress-Warden-Reason: auth_required" in head
    assert "HTTPS_PROXY=http://AGENT:TOKEN@PROXY_HOST:PORT" in _flat(body)
    answer = curl("-x", wrong, "-H", "Accept: application/json", url)
    document = json.loads(answer.stdout)
    assert document["reason"] == "auth_required"
    assert "--proxy-user AGENT:TOKEN" in document["help"]
    assert document["contact"] == CONTACT


def test_curl_shows_the_refusal_body(warden: tuple[ProxyProcess, Path]) -> None:
    proxy, _ = warden
    shown = curl("-x", proxy.url, "http://169.254.169.254/")
    assert shown.stdout.startswith("egress-warden: blocked by egress policy: 169.254.169.254:80")
    failed = curl("-x", proxy.url, "https://evil.test/")
    assert failed.returncode != 0
    assert "403" in failed.stderr


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_pip_reports_the_refusal_reason_phrase(
    warden: tuple[ProxyProcess, Path], upstreams: Upstreams, tmp_path: Path, scheme: str
) -> None:
    proxy, _ = warden
    port = upstreams.http.port if scheme == "http" else 443
    index = f"{scheme}://evil.test:{port}/simple/"
    # pip tells a refused index page only at -vv (it skips the page); a refused tunnel it
    # reports in its retry warning.
    shown = ["-vv", "--trusted-host", "evil.test", "--retries", "0"]
    if scheme == "https":
        shown = ["--retries", "1"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--isolated",
            "--no-deps",
            "--no-cache-dir",
            "--disable-pip-version-check",
            *shown,
            "--timeout",
            "10",
            "--dest",
            str(tmp_path),
            "--index-url",
            index,
            "--proxy",
            proxy.url,
            "somepkg",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"Blocked by egress policy: evil.test:{port} denied by rule 'evil.test'" in output


# -- admin output ---------------------------------------------------------------------------------


def _cli(proxy: ProxyProcess, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args, "--control", proxy.control_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", **TOKEN_ENV},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _hold_in_background(
    proxy: ProxyProcess, url: str, auth: str | None = None
) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(_get(proxy, url, auth=auth))
        except Exception as exc:  # surfaced by the assertions on `out`
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _row(table: str, first_cell: str) -> list[str]:
    for line in table.splitlines():
        cells = [cell for cell in line.split("  ") if cell.strip()]
        if cells and cells[0].strip() == first_cell:
            return [cell.strip() for cell in cells]
    raise AssertionError(f"no row {first_cell!r} in:\n{table}")


def test_cli_anonymous_approval_says_it_is_for_all_agents(
    warden: tuple[ProxyProcess, Path], upstreams: Upstreams
) -> None:
    proxy, _ = warden
    host = HELD[3]
    _get(proxy, f"http://{host}:{upstreams.http.port}/")  # answered pending; the item stays
    item = wait_pending(proxy, host, waiting=0)
    header, *_ = _cli(proxy, "pending").splitlines()
    assert header.split()[:3] == ["ID", "AGENT", "SESSION"]
    assert _row(_cli(proxy, "pending"), item["id"])[1:3] == ["(anonymous)", "-"]
    out = _cli(proxy, "approve", item["id"], "--scope", "always").splitlines()
    assert (
        out[0]
        == f"approved {item['id']} {host}:{upstreams.http.port} (scope always, for all agents)"
    )
    assert out[2] == (
        "this is open to every caller: all agents and anonymous clients alike "
        "(it was asked for by an anonymous caller, so it cannot be limited to one)"
    )
    assert out[-1].endswith(f"{host}:{upstreams.http.port} (always, for all agents)")
    # what it says is what it does: another agent is let through too
    bob_answer = _get(proxy, f"http://{host}:{upstreams.http.port}/")
    assert bob_answer.status_code == 200


def test_cli_session_grant_shows_the_session(
    warden: tuple[ProxyProcess, Path],
    upstreams: Upstreams,
    agents: tuple[Path, dict[str, str]],
) -> None:
    proxy, _ = warden
    host = HELD[4]
    bob = f"bob~s-42:{agents[1]['bob']}"
    url = f"http://{host}:{upstreams.http.port}/"
    _get(proxy, url, auth=bob)
    item = wait_pending(proxy, host, agent="bob", waiting=0)
    assert _row(_cli(proxy, "pending"), item["id"])[1:3] == ["bob", "s-42"]
    out = _cli(proxy, "approve", item["id"], "--scope", "session").splitlines()
    assert out[0] == (
        f"approved {item['id']} {host}:{upstreams.http.port} "
        "(scope session, for agent bob, session s-42)"
    )
    assert "every caller" not in "\n".join(out)
    grant_id = out[-1].split()[1].rstrip(":")
    assert out[-1].endswith("(session, for bob, session s-42)")
    grants = _cli(proxy, "grants")
    assert grants.splitlines()[0].split()[:6] == [
        "ID",
        "ACTION",
        "PATTERN",
        "SCOPE",
        "FOR",
        "SESSION",
    ]
    row = _row(grants, grant_id)
    assert row[3:6] == ["session", "bob", "s-42"]
    assert _get(proxy, url, auth=bob).status_code == 200
    other_session = _get(proxy, url, auth=f"bob~s-43:{agents[1]['bob']}")
    assert other_session.headers["X-Egress-Warden-Reason"] == "approval_pending"


def test_cli_decisions_filter_and_show_the_rule_source(
    warden: tuple[ProxyProcess, Path], upstreams: Upstreams, agents: tuple[Path, dict[str, str]]
) -> None:
    proxy, policy = warden
    _get(proxy, f"http://evil.test:{upstreams.http.port}/", auth=f"bob:{agents[1]['bob']}")
    _get(proxy, f"http://evil.test:{upstreams.http.port}/")
    source = f"{policy}:{_line_of(policy, '- evil.test')}"
    deadline = time.monotonic() + 10
    while True:
        table = _cli(proxy, "decisions", "--agent", "bob", "--reason", "deny_rule", "--since", "1h")
        rows = table.splitlines()[1:]
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert table.splitlines()[0].split()[-2:] == ["RULE", "SOURCE"]
    assert rows and all("deny_rule" in r and " bob " in r and r.endswith(source) for r in rows)
    as_json = json.loads(
        _cli(proxy, "decisions", "--reason", "deny_rule", "--since", "1h", "--json")
    )
    assert {row["agent"] for row in as_json} >= {"bob", None}
    assert {row["reason"] for row in as_json} == {"deny_rule"}
    none = json.loads(_cli(proxy, "decisions", "--agent", "nobody", "--json"))
    assert none == []
    with api(proxy) as client:
        future = client.get("/v1/decisions", params={"since": str(time.time() + 3600)})
        assert future.status_code == 200 and future.json() == []
        bad_since = client.get("/v1/decisions", params={"since": "yesterday"})
        assert bad_since.status_code == 422 and bad_since.json()["error"] == "invalid_since"
        assert client.get("/v1/decisions", params={"reason": "bogus"}).status_code == 422
