"""`check` (the dry run) and the live proxy take the same path: a property test over generated
URLs under each shipped policy. Every generated destination is on this machine or is held, so
nothing is ever dialled off it: names resolve (via --resolve) to loopback, IP literals are
private, and only explicit test rules could exempt them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.clients import raw_request
from tests.support.control import TOKEN_ENV, api
from tests.support.proxy import REPO, ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

SHIPPED = sorted(p for p in (REPO / "policies").rglob("*.yaml"))
# Names from the shipped policies (allowed and denied ones), their neighbours, and misses.
NAMES = [
    "github.com",
    "api.github.com",
    "raw.githubusercontent.com",
    "githubusercontent.com",
    "x.readthedocs.io",
    "docs.python.org",
    "pastebin.com",
    "a.b.pastebin.com",
    "x.ngrok.io",
    "gist.github.com",
    "unknown.example",
    "data.attacker.example",
]
IPS = ["127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.0.1", "[::1]", "[fd00::1]", "0"]
RESOLVED_TO = "127.0.0.9"  # loopback: a name the policy allows is still refused, never dialled


def _resolve_args() -> list[str]:
    return [arg for name in NAMES for arg in ("--resolve", f"{name}:{RESOLVED_TO}")]


@pytest.fixture(scope="module", params=SHIPPED, ids=lambda p: p.name)
def shipped_proxy(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path, Path]]:
    tmp = tmp_path_factory.mktemp("agree")
    # A second file only shortens the wait for held requests (a later file's scalar wins).
    quick = tmp / "quick.yaml"
    quick.write_text("version: 1\napproval: {wait: 50ms}\n")
    proxy = start_proxy(tmp / "state", [request.param, quick], *_resolve_args(), env=TOKEN_ENV)
    yield proxy, request.param, quick
    proxy.stop()


def _live(proxy: ProxyProcess, scheme: str, host: str, port: int) -> str:
    """The reason the live proxy gives (allow when it let the request through)."""
    target = f"{host}:{port}"
    if scheme == "https":
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
    else:
        head = f"GET http://{target}/x HTTP/1.1\r\nHost: {target}\r\n\r\n"
    response = raw_request(proxy.proxy_port, head, timeout=10)
    return response.headers.get("x-egress-warden-reason", "allow")


def _expected_live(decision: str, reason: str) -> str:
    # A miss is held; held without an answer, the live proxy reports approval_pending.
    if decision == "hold":
        return "approval_pending"
    return "allow" if decision == "allow" else reason


@given(
    scheme=st.sampled_from(["http", "https"]),
    host=st.sampled_from(NAMES + IPS),
    port=st.sampled_from([80, 443, 8443, 22]),
    upper=st.booleans(),
)
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_check_api_and_live_proxy_agree(
    shipped_proxy: tuple[ProxyProcess, Path, Path], scheme: str, host: str, port: int, upper: bool
) -> None:
    proxy, _, _ = shipped_proxy
    spelled = host.upper() if upper else host
    url = f"{scheme}://{spelled}:{port}/x"
    with api(proxy) as client:
        answer = client.post("/v1/check", json={"url": url}).json()
    live = _live(proxy, scheme, spelled, port)
    assert live == _expected_live(answer["decision"], answer["reason"]), (url, answer)
    assert live != "allow", (url, answer)  # every destination here is private or held


def test_check_cli_agrees_with_the_live_proxy(
    shipped_proxy: tuple[ProxyProcess, Path, Path],
) -> None:
    proxy, policy, quick = shipped_proxy
    for scheme, host, port in (
        ("https", "github.com", 443),
        ("http", "169.254.169.254", 80),
        ("https", "a.b.pastebin.com", 443),
        ("https", "data.attacker.example", 443),
    ):
        url = f"{scheme}://{host}:{port}/"
        result = subprocess.run(
            [
                *(sys.executable, "-m", "proxy.cli", "check", url),
                *("--policy", str(policy), "--policy", str(quick)),
                *_resolve_args(),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        fields = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
        decision, reason = fields["decision"].strip(), fields["reason"].strip()
        assert _live(proxy, scheme, host, port) == _expected_live(decision, reason), url
