"""Claimed identities against the real proxy: a name in the credentials selects a per-agent
policy only with that agent's token, a refusal does not tell which agent ids exist, and an
approval "for the agent" needs an agent."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.agents import AgentRegistry
from tests.conftest import ALLOWED_IP, Upstreams, resolve_args
from tests.support.clients import RawResponse, curl, raw_request
from tests.support.control import TOKEN_ENV, api, wait_pending
from tests.support.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

AGENT = "trusted-bot"
LOOSE = "loose.identity.test"  # allowed for trusted-bot only; everyone else is asked
NAMES = [LOOSE, *(f"h{i}.identity.test" for i in range(6))]


def _policy(path: Path, upstreams: Upstreams, auth: str = "", agents: bool = True) -> Path:
    ports = sorted({80, 443, upstreams.http.port, upstreams.https.port})
    per_agent = f"agents:\n  {AGENT}: {{allow: [{LOOSE}]}}\n" if agents else ""
    path.write_text(
        f"version: 1\ndefault: ask\nallow: [allowed.test, {ALLOWED_IP}/32]\n"
        f"network: {{ports: {ports}}}\napproval: {{wait: 1s}}\n{auth}{per_agent}"
    )
    return path


def _start(tmp: Path, policy: Path, *extra: str) -> ProxyProcess:
    args = resolve_args()
    for name in NAMES:
        args += ["--resolve", f"{name}:{ALLOWED_IP}"]
    return start_proxy(tmp / "state", [policy], *args, *extra, env=TOKEN_ENV)


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("agents") / "agents.yaml"
    token = AgentRegistry(path).add(AGENT)
    return path, token


@pytest.fixture(scope="module")
def guarded(
    upstreams: Upstreams, agents: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A registry and per-agent policy; credentials required (the default with a registry)."""
    tmp = tmp_path_factory.mktemp("guarded")
    proc = _start(tmp, _policy(tmp / "policy.yaml", upstreams), "--agents", str(agents[0]))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def optional(
    upstreams: Upstreams, agents: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """The same, with `auth.required: false`: callers without credentials are anonymous."""
    tmp = tmp_path_factory.mktemp("optional")
    policy = _policy(tmp / "policy.yaml", upstreams, auth="auth: {required: false}\n")
    proc = _start(tmp, policy, "--agents", str(agents[0]))
    yield proc
    proc.stop()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _raw_get(proxy: ProxyProcess, url_host: str, port: int, authorization: str) -> RawResponse:
    return raw_request(
        proxy.proxy_port,
        f"GET http://{url_host}:{port}/who HTTP/1.1\r\nHost: {url_host}:{port}\r\n"
        f"Proxy-Authorization: {authorization}\r\n\r\n",
    )


def _raw_connect(proxy: ProxyProcess, url_host: str, port: int, authorization: str) -> RawResponse:
    target = f"{url_host}:{port}"
    return raw_request(
        proxy.proxy_port,
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        f"Proxy-Authorization: {authorization}\r\n\r\n",
    )


def _curl_through(proxy: ProxyProcess, user: str, url: str) -> str:
    """curl -i through the proxy with `user` (AGENT:TOKEN) in the proxy URL: status line,
    headers and body as curl printed them."""
    result = curl("-i", "-x", f"http://{user}@127.0.0.1:{proxy.proxy_port}", url)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _without_request_id(text: str) -> str:
    """`text` minus the lines that carry the request id (the header and the body line)."""
    return "\n".join(
        line
        for line in text.splitlines()
        if "request-id" not in line.lower() and "request id" not in line.lower()
    )


def test_trusted_bot_with_its_token_gets_its_policy(
    guarded: ProxyProcess, agents: tuple[Path, str], upstreams: Upstreams
) -> None:
    _, token = agents
    url = f"http://{LOOSE}:{upstreams.http.port}/mine"
    assert _curl_through(guarded, f"{AGENT}:{token}", url).startswith("HTTP/1.1 200")
    line = guarded.wait_decision(**{"url.path": "/mine"})
    assert line["egress.agent.id"] == AGENT and line["egress.decision"] == "allow"


def test_wrong_token_and_unknown_agent_get_byte_identical_407s(
    guarded: ProxyProcess, upstreams: Upstreams
) -> None:
    url = f"http://{LOOSE}:{upstreams.http.port}/probe"
    wrong = _curl_through(guarded, f"{AGENT}:wrong", url)
    unknown = _curl_through(guarded, "unknown-bot:x", url)
    assert wrong.startswith("HTTP/1.1 407") and unknown.startswith("HTTP/1.1 407")
    assert "invalid proxy credentials" in wrong
    assert wrong.count("\n") == unknown.count("\n") and len(wrong) == len(unknown)
    assert _without_request_id(wrong) == _without_request_id(unknown)
    assert wrong != unknown  # the request id lines differ, and only they

    connects = [
        _raw_connect(guarded, LOOSE, upstreams.https.port, _basic(user, password))
        for user, password in ((AGENT, "wrong"), ("unknown-bot", "x"))
    ]
    assert [c.status for c in connects] == [407, 407]
    first, second = (
        {k: v for k, v in c.headers.items() if "request-id" not in k} for c in connects
    )
    assert first == second and connects[0].reason == connects[1].reason
    bodies = [_without_request_id(c.body.decode()) for c in connects]
    assert bodies[0] == bodies[1]


def test_refused_credentials_are_logged_alike(guarded: ProxyProcess, upstreams: Upstreams) -> None:
    lines = []
    for path, user in (("/log-wrong", f"{AGENT}:wrong"), ("/log-unknown", "unknown-bot:x")):
        _curl_through(guarded, user, f"http://{LOOSE}:{upstreams.http.port}{path}")
        lines.append(guarded.wait_decision(**{"url.path": path}))
    varying = {"url.path", "egress.request_id", "timestamp", "client.port", "duration_ms"}
    first, second = ({k: v for k, v in line.items() if k not in varying} for line in lines)
    assert first["egress.reason"] == "auth_required" and "egress.agent.id" not in first
    assert first["egress.detail"] == "invalid proxy credentials"
    assert first == second


@pytest.mark.parametrize("user", [f"{AGENT}\n", f"{AGENT}\n/s1", f"{AGENT}/s1\n", f"{AGENT}\r\n"])
def test_id_with_a_trailing_newline_is_not_the_agent(
    guarded: ProxyProcess,
    optional: ProxyProcess,
    agents: tuple[Path, str],
    upstreams: Upstreams,
    user: str,
) -> None:
    _, token = agents
    http, https = upstreams.http.port, upstreams.https.port
    # the same requests with the exact id pass: the credentials are right but for the id
    assert _raw_get(guarded, LOOSE, http, _basic(AGENT, token)).status == 200
    assert _raw_connect(guarded, LOOSE, https, _basic(AGENT, token)).status == 200

    assert _raw_get(guarded, LOOSE, http, _basic(user, token)).status == 407
    assert _raw_connect(guarded, LOOSE, https, _basic(user, token)).status == 407
    # with credentials optional it is no credential at all: the anonymous policy asks
    for response in (
        _raw_get(optional, LOOSE, http, _basic(user, token)),
        _raw_connect(optional, LOOSE, https, _basic(user, token)),
    ):
        assert response.status == 403, response
        assert response.headers["x-egress-warden-reason"] == "approval_pending"
    with api(optional) as client:
        items = client.get("/v1/pending").json()
    assert {(i["port"], i["agent"]) for i in items if i["host"] == LOOSE} == {
        (http, None),
        (https, None),
    }


def test_for_agent_on_a_held_item_without_agent_answers_422(
    optional: ProxyProcess, upstreams: Upstreams
) -> None:
    url = f"http://{NAMES[1]}:{upstreams.http.port}/anon"
    with httpx.Client(proxy=optional.url, trust_env=False, timeout=30) as client:
        first = client.get(url)
    assert first.headers["x-egress-warden-reason"] == "approval_pending"
    item_id = first.headers["x-egress-warden-pending-id"]
    with api(optional) as control:
        for scope in ("once", "session", "always"):
            refused = control.post(
                f"/v1/pending/{item_id}/approve", json={"scope": scope, "for": "agent"}
            )
            assert refused.status_code == 422, refused.text
            assert refused.headers["content-type"].startswith("application/json")
            body = refused.json()
            assert body["error"] == "for_agent_without_agent"
            assert item_id in body["detail"] and '"for": "all"' in body["detail"]
        denied = control.post(
            f"/v1/pending/{item_id}/deny", json={"scope": "always", "for": "agent"}
        )
        assert denied.status_code == 422 and denied.json()["error"] == "for_agent_without_agent"
        assert not control.get("/v1/grants").json()
        assert any(i["id"] == item_id for i in control.get("/v1/pending").json())
        ok = control.post(f"/v1/pending/{item_id}/approve", json={"scope": "once", "for": "all"})
        assert ok.status_code == 200 and ok.json()["for"] == "all"
    with httpx.Client(proxy=optional.url, trust_env=False, timeout=30) as client:
        assert client.get(url).status_code == 200


def test_for_agent_on_a_held_item_with_an_agent_grants_that_agent(
    optional: ProxyProcess, agents: tuple[Path, str], upstreams: Upstreams
) -> None:
    _, token = agents
    url = f"http://{NAMES[2]}:{upstreams.http.port}/bot"
    authed = httpx.Proxy(optional.url, auth=(AGENT, token))
    with httpx.Client(proxy=authed, trust_env=False, timeout=30) as client:
        item_id = client.get(url).headers["x-egress-warden-pending-id"]
    with api(optional) as control:
        answer = control.post(
            f"/v1/pending/{item_id}/approve", json={"scope": "always", "for": "agent"}
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["grant"]["agent"] == AGENT
    with httpx.Client(proxy=authed, trust_env=False, timeout=30) as client:
        assert client.get(url).status_code == 200
    with httpx.Client(proxy=optional.url, trust_env=False, timeout=30) as client:
        assert client.get(url).headers["x-egress-warden-reason"] == "approval_pending"


def test_without_a_registry_a_claimed_id_is_anonymous(upstreams: Upstreams, tmp_path: Path) -> None:
    proxy = _start(tmp_path, _policy(tmp_path / "policy.yaml", upstreams, agents=False))
    try:
        url = f"http://{NAMES[3]}:{upstreams.http.port}/claimed"
        claimed = httpx.Proxy(proxy.url, auth=(AGENT, "anything"))
        with httpx.Client(proxy=claimed, trust_env=False, timeout=30) as client:
            response = client.get(url)
        assert response.headers["x-egress-warden-reason"] == "approval_pending"
        item = wait_pending(proxy, NAMES[3], agent=None, waiting=0)
        assert item["agent"] is None and item["session"] is None
        line = proxy.wait_decision(**{"url.path": "/claimed"})
        assert line.get("egress.agent.id") is None
    finally:
        proxy.stop()
