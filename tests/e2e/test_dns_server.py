"""The policy-aware DNS listener (`run --dns`), queried with `dig` from an agent namespace whose
DNS (UDP and TCP 53, to any address) is redirected to it. A local DNS server stands in for the
upstream (`--nameserver`) and records every name it is asked: allowed names are resolved there,
denied and unknown names never reach it."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ALLOWED_IP
from tests.support.dns import DnsServer
from tests.support.netns import ELSEWHERE_IP, SidecarNet, in_namespace, require_tools, sidecar_net
from tests.support.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

TRANSPARENT_PORT = 15001
DNS_PORT = 15053
SYNTHETIC = ipaddress.ip_network("198.18.0.0/15")


@dataclass
class DnsSidecar:
    net: SidecarNet
    proc: ProxyProcess
    upstream: DnsServer


@pytest.fixture(scope="module")
def dns_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsSidecar]:
    require_tools("dig")
    tmp: Path = tmp_path_factory.mktemp("dns-server")
    with sidecar_net("dn") as net:
        names = ("allowed.test", "evil.test", "unknown.test", "c2VjcmV0.unknown.test")
        upstream = in_namespace(net.proxy_ns, lambda: DnsServer(dict.fromkeys(names, ALLOWED_IP)))
        policy = tmp / "policy.yaml"
        policy.write_text(
            f"version: 1\ndefault: ask\nallow: [allowed.test, {ALLOWED_IP}/32]\n"
            "deny: [evil.test]\nauth: {required: false}\n"
        )
        proc = start_proxy(
            tmp / "state",
            [policy],
            "--nameserver",
            f"{upstream.host}:{upstream.port}",
            "--transparent",
            f"0.0.0.0:{TRANSPARENT_PORT}",
            "--dns",
            f"0.0.0.0:{DNS_PORT}",
            prefix=net.proxy_prefix,
        )
        try:
            net.redirect(TRANSPARENT_PORT, DNS_PORT)
            yield DnsSidecar(net, proc, upstream)
        finally:
            proc.stop()
            upstream.close()


def _dig(sc: DnsSidecar, name: str, *args: str) -> tuple[str, list[str]]:
    """(status, answer addresses) of a dig from the agent namespace to an address 'out there'
    (the redirect delivers it to the proxy's DNS listener)."""
    result = sc.net.client(
        "dig", "+time=3", "+tries=1", "+noall", "+comments", "+answer", f"@{ELSEWHERE_IP}",
        name, *args,
    )  # fmt: skip
    status = ""
    answers = []
    for line in result.stdout.splitlines():
        if "status:" in line:
            status = line.split("status:")[1].split(",")[0].strip()
        elif line and not line.startswith(";"):
            answers.append(line.split()[-1])
    assert status, result.stdout + result.stderr
    return status, answers


def test_allowed_name_is_answered_with_its_real_address(dns_sidecar: DnsSidecar) -> None:
    assert _dig(dns_sidecar, "allowed.test", "A") == ("NOERROR", [ALLOWED_IP])
    assert dns_sidecar.upstream.queried("allowed.test")  # resolved by the proxy, upstream
    assert _dig(dns_sidecar, "allowed.test", "A", "+tcp") == ("NOERROR", [ALLOWED_IP])
    line = dns_sidecar.proc.wait_decision(server__address="allowed.test", egress__decision="allow")
    assert line["network.transport.protocol"] == "dns"


def test_denied_name_is_refused_and_never_asked_upstream(dns_sidecar: DnsSidecar) -> None:
    assert _dig(dns_sidecar, "evil.test", "A") == ("REFUSED", [])
    assert _dig(dns_sidecar, "evil.test", "AAAA", "+tcp") == ("REFUSED", [])
    assert not dns_sidecar.upstream.queried("evil.test")
    line = dns_sidecar.proc.wait_decision(server__address="evil.test", egress__decision="deny")
    assert line["network.transport.protocol"] == "dns"
    assert line["egress.reason"] == "deny_rule"


def test_unknown_name_gets_a_stable_synthetic_address_and_no_upstream_query(
    dns_sidecar: DnsSidecar,
) -> None:
    status, answers = _dig(dns_sidecar, "unknown.test", "A")
    assert status == "NOERROR"
    assert len(answers) == 1 and ipaddress.ip_address(answers[0]) in SYNTHETIC
    assert _dig(dns_sidecar, "unknown.test", "A") == (status, answers)  # the same address again
    # Data smuggled in a label of an unknown name goes nowhere either, whatever the type.
    assert _dig(dns_sidecar, "c2VjcmV0.unknown.test", "TXT")[1] == []
    assert not dns_sidecar.upstream.queried("unknown.test")
    dns_sidecar.proc.wait_decision(server__address="unknown.test", egress__decision="hold")


def test_ip_literal_names_are_refused(dns_sidecar: DnsSidecar) -> None:
    assert _dig(dns_sidecar, "127.0.0.2", "A")[0] == "REFUSED"
    assert dns_sidecar.upstream.packets == len(dns_sidecar.upstream.questions)
