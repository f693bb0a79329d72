"""docker/sidecar-init.sh: the init container's nftables rules, installed for real in a network
namespace the test creates and shared (as in a pod) by the proxy (root here, so the script is
told uid 0) and an agent running as `nobody` with no proxy settings: its TCP reaches exactly
what the policy allows, its DNS is answered by the policy, and anything else is dropped."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.conftest import ALLOWED_IP
from tests.support.dns import DnsServer
from tests.support.netns import in_namespace, require_tools
from tests.support.proxy import REPO, ProxyProcess, start_proxy
from tests.support.upstream import Upstream, start_upstream

pytestmark = pytest.mark.e2e

SCRIPT = REPO / "docker" / "sidecar-init.sh"
PROXY_PORT, TRANSPARENT_PORT, DNS_PORT = 18080, 15001, 15053
OUT_THERE = "10.78.9.9"  # routed out of the namespace's veth (whose peer is inside it too)
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def _script_env() -> dict[str, str]:
    return {
        **os.environ,
        "EGRESS_WARDEN_UID": "0",
        "EGRESS_WARDEN_PROXY_PORT": str(PROXY_PORT),
        "EGRESS_WARDEN_TRANSPARENT_PORT": str(TRANSPARENT_PORT),
        "EGRESS_WARDEN_DNS_PORT": str(DNS_PORT),
    }


def test_printed_rules_redirect_tcp_and_dns_and_drop_the_rest() -> None:
    rules = subprocess.run(
        ["sh", str(SCRIPT), "--print"], env=_script_env(), capture_output=True, text=True
    ).stdout
    assert "meta skuid 0 return" in rules
    assert f"udp dport 53 redirect to :{DNS_PORT}" in rules
    assert f"tcp dport 53 redirect to :{DNS_PORT}" in rules
    assert f"meta l4proto tcp redirect to :{TRANSPARENT_PORT}" in rules
    assert "policy drop;" in rules
    bad = subprocess.run(
        ["sh", str(SCRIPT), "--print"],
        env={**_script_env(), "EGRESS_WARDEN_DNS_PORT": "53; flush ruleset"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "flush" not in bad.stdout


@dataclass
class Pod:
    ns: str
    proc: ProxyProcess
    https: Upstream
    ca_file: Path


@pytest.fixture(scope="module")
def pod(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    require_tools("curl", "dig", "setpriv")
    tmp = tmp_path_factory.mktemp("sidecar-init")
    public = Path(tempfile.mkdtemp(prefix="ew-sidecar-"))  # readable by the agent (nobody)
    public.chmod(0o755)
    ca_file = public / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca_file.chmod(0o644)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("allowed.test", "evil.test").configure_cert(server_ctx)
    ns = f"ewinit{os.getpid()}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, timeout=10)

    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        ip("link", "set", "lo", "up")
        ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ip("addr", "add", "10.78.0.1/24", "dev", "d0")
        ip("link", "set", "d0", "up")
        ip("link", "set", "d1", "up")
        ip("route", "add", "default", "via", "10.78.0.2")
        https = in_namespace(ns, lambda: start_upstream(ALLOWED_IP, server_ctx))
        policy = tmp / "policy.yaml"
        policy.write_text(
            f"version: 1\ndefault: deny\nallow: [allowed.test, {ALLOWED_IP}/32]\n"
            f"deny: [evil.test]\nnetwork: {{ports: [{https.port}]}}\n"
        )
        proc = start_proxy(
            tmp / "state",
            [policy],
            "--resolve",
            f"allowed.test:{ALLOWED_IP}",
            "--resolve",
            f"evil.test:{ALLOWED_IP}",
            "--transparent",
            f"127.0.0.1:{TRANSPARENT_PORT}",
            "--dns",
            f"127.0.0.1:{DNS_PORT}",
            listen=f"127.0.0.1:{PROXY_PORT}",
            prefix=("ip", "netns", "exec", ns),
        )
        try:
            subprocess.run(
                ["ip", "netns", "exec", ns, "sh", str(SCRIPT)],
                env=_script_env(),
                check=True,
                capture_output=True,
                timeout=10,
            )
            yield Pod(ns, proc, https, ca_file)
        finally:
            proc.stop()
            in_namespace(ns, https.close)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False, timeout=10)
        shutil.rmtree(public, ignore_errors=True)


def _agent(pod: Pod, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # no proxy variables at all
    return subprocess.run(
        ["ip", "netns", "exec", pod.ns, *NOBODY, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )


def _curl(pod: Pod, name: str) -> subprocess.CompletedProcess[str]:
    port = pod.https.port
    return _agent(
        pod,
        *("curl", "-q", "-sS", "--max-time", "10", "--cacert", str(pod.ca_file)),
        *("--resolve", f"{name}:{port}:{OUT_THERE}", f"https://{name}:{port}/pod"),
    )


def test_agent_reaches_exactly_what_the_policy_allows(pod: Pod) -> None:
    allowed = _curl(pod, "allowed.test")
    assert allowed.returncode == 0, allowed.stderr
    assert "hello from upstream GET /pod" in allowed.stdout
    hits = len(pod.https.hits)
    assert _curl(pod, "evil.test").returncode != 0
    assert len(pod.https.hits) == hits
    pod.proc.wait_decision(server__address="evil.test", network__transport__protocol="transparent")


def test_agent_dns_is_answered_by_the_policy(pod: Pod) -> None:
    allowed = _agent(pod, "dig", "+short", "+time=3", "+tries=1", f"@{OUT_THERE}", "allowed.test")
    assert allowed.stdout.strip() == ALLOWED_IP
    denied = _agent(pod, "dig", "+time=3", "+tries=1", f"@{OUT_THERE}", "evil.test")
    assert "status: REFUSED" in denied.stdout


def test_other_udp_is_dropped(pod: Pod) -> None:
    # DNS to another port is neither redirected nor accepted: the packet never leaves.
    other = _agent(pod, "dig", "+time=2", "+tries=1", "-p", "5353", f"@{OUT_THERE}", "allowed.test")
    assert other.returncode != 0
    assert "status:" not in other.stdout


def test_agent_cannot_reach_the_control_api(pod: Pod) -> None:
    # The control port is not exempt: the connection lands on the transparent listener, which
    # refuses a loopback destination, so /healthz (no token needed) never answers the agent.
    url = f"http://127.0.0.1:{pod.proc.control_port}/healthz"
    result = _agent(pod, "curl", "-q", "-sS", "--max-time", "10", "-w", "%{http_code}", url)
    assert '"status":"ok"' not in result.stdout.replace(" ", "")
    assert result.stdout.strip().endswith("403") or result.returncode != 0, result


def test_agent_dns_beats_another_dnat_of_port_53(pod: Pod) -> None:
    # Docker's embedded DNS DNATs 127.0.0.11:53 in the container's namespace at the usual NAT
    # priority (-100). The init's redirect must map the agent's query first, so a resolver there
    # (standing in for Docker's, which forwards to the host's) never sees it.
    upstream = in_namespace(pod.ns, lambda: DnsServer({"allowed.test": "10.9.9.9"}))
    table = "docker_like"
    rules = (
        f"table ip {table} {{\n chain output {{\n type nat hook output priority -100;\n"
        f" ip daddr 127.0.0.11 udp dport 53 dnat to 127.0.0.1:{upstream.port}\n"
        f" ip daddr 127.0.0.11 tcp dport 53 dnat to 127.0.0.1:{upstream.port}\n }}\n}}\n"
    )
    nft = ["ip", "netns", "exec", pod.ns, "nft"]
    subprocess.run([*nft, "-f", "-"], input=rules, text=True, check=True, timeout=10)
    try:
        # The proxy's own user (root here) is spared by the init, so it does reach it.
        dig = ("dig", "+short", "+time=3", "+tries=1", "@127.0.0.11", "allowed.test")
        direct = subprocess.run(
            ["ip", "netns", "exec", pod.ns, *dig],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert direct.stdout.strip() == "10.9.9.9"
        upstream.clear()
        for tcp in ([], ["+tcp"]):
            answer = _agent(
                pod, "dig", "+short", "+time=3", "+tries=1", *tcp, "@127.0.0.11", "allowed.test"
            )
            assert answer.stdout.strip() == ALLOWED_IP, answer
            refused = _agent(pod, "dig", "+time=3", "+tries=1", *tcp, "@127.0.0.11", "evil.test")
            assert "status: REFUSED" in refused.stdout
        assert upstream.queries == []
    finally:
        subprocess.run([*nft, "delete", "table", "ip", table], check=False, timeout=10)
        in_namespace(pod.ns, upstream.close)
