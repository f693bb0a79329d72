"""Hosts under `inspect:`: TLS is intercepted with the proxy's CA so method/path rules apply."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ALLOWED_IP, Upstreams, resolve_args, write_policy
from tests.support.clients import curl
from tests.support.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def inspecting(
    upstreams: Upstreams, ca_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("inspect")
    ports = sorted({80, 443, upstreams.https.port})
    policy = write_policy(
        tmp / "policy.yaml",
        upstreams,
        body=f"""\
version: 1
default: deny
allow: [allowed.test, api.allowed.test, {ALLOWED_IP}/32]
network: {{ports: {ports}}}
inspect:
  - host: api.allowed.test
    methods: [GET, HEAD]
    deny_paths: ["/repos/*/*/git/refs*"]
""",
    )
    proc = start_proxy(tmp / "state", [policy], *resolve_args(), "--upstream-ca", str(ca_file))
    yield proc
    proc.stop()


def _via(proxy: ProxyProcess, *args: str) -> tuple[str, str]:
    proxy_ca = proxy.state_dir / "ca" / "mitmproxy-ca-cert.pem"
    result = curl(
        "-x", proxy.url, "--cacert", str(proxy_ca), "-o", "-", "-w", "\n%{http_code}", *args
    )
    body, _, code = result.stdout.rpartition("\n")
    return code, body


def test_inspected_host_allows_listed_methods_and_paths(
    inspecting: ProxyProcess, upstreams: Upstreams
) -> None:
    code, body = _via(inspecting, f"https://api.allowed.test:{upstreams.https.port}/repos/a/b")
    assert code == "200" and "GET /repos/a/b" in body
    line = inspecting.wait_decision(**{"url.path": "/repos/a/b"})
    assert line["network.transport.protocol"] == "https_inspected"
    assert line["server.address"] == "api.allowed.test"


def test_inspected_host_denies_other_methods_and_denied_paths(
    inspecting: ProxyProcess, upstreams: Upstreams
) -> None:
    base = f"https://api.allowed.test:{upstreams.https.port}"
    code, body = _via(inspecting, "-X", "POST", "--data", "x", f"{base}/repos/a/b")
    assert code == "403" and "method POST not allowed" in body
    code, body = _via(inspecting, f"{base}/repos/a/b/git/refs/heads/main")
    assert code == "403" and "/repos/*/*/git/refs*" in body
    line = inspecting.wait_decision(**{"url.path": "/repos/a/b/git/refs/heads/main"})
    assert line["egress.reason"] == "deny_rule"
    assert line["egress.rule.source"].endswith("policy.yaml:6")


def test_hosts_not_under_inspect_stay_plain_tunnels(
    inspecting: ProxyProcess, upstreams: Upstreams, ca_file: Path
) -> None:
    result = curl(
        "-x",
        inspecting.url,
        "--cacert",
        str(ca_file),
        f"https://allowed.test:{upstreams.https.port}/plain",
    )
    assert result.returncode == 0 and "GET /plain" in result.stdout
