"""What the transparent edge reads from a redirected connection's first bytes, how a source
address names an agent, and the DNS listener's synthetic address pool (both ways)."""

from __future__ import annotations

import contextlib
import ipaddress
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from addons.transparent import SourceAgents, sniff
from proxy.config import parse_source_agent
from proxy.dnsserver import SyntheticPool


def _client_hello(server_name: str) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):  # no server: the hello is all there is
        tls.do_handshake()
    return outgoing.read()


def test_tls_is_named_by_its_sni_once_the_hello_is_complete() -> None:
    hello = _client_hello("allowed.test")
    assert sniff(hello[:20]).complete is False
    named = sniff(hello)
    assert (named.name, named.scheme, named.complete) == ("allowed.test", "https", True)


def test_tls_garbage_is_malformed() -> None:
    assert sniff(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00").malformed


def test_http_is_named_by_its_host_header_without_port() -> None:
    head = b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHOST: api.test:8080\r\n\r\n"
    assert sniff(head[:10]).complete is False
    assert sniff(head).name == "api.test"
    assert sniff(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n").name == "::1"
    no_host = sniff(b"GET / HTTP/1.0\r\n\r\n")
    assert (no_host.name, no_host.scheme, no_host.complete) == (None, "http", True)


def test_anything_else_is_raw_tcp_named_by_nothing() -> None:
    raw = sniff(b"SSH-2.0-OpenSSH_9.6\r\n")
    assert (raw.name, raw.scheme, raw.complete) == (None, "tcp", True)


def test_most_specific_source_network_names_the_agent() -> None:
    sources = SourceAgents([("10.0.0.0/8", "fleet"), ("10.0.0.5/32", "ci-bot")])
    assert sources.agent_for("10.0.0.5") == "ci-bot"
    assert sources.agent_for("::ffff:10.0.0.5") == "ci-bot"
    assert sources.agent_for("10.9.9.9") == "fleet"
    assert sources.agent_for("192.0.2.1") is None
    assert SourceAgents([]).agent_for("10.0.0.5") is None


def test_synthetic_pool_maps_both_ways_and_recycles_the_least_recent() -> None:
    pool = SyntheticPool(ipaddress.IPv4Network("198.18.0.0/30"))  # two usable addresses
    a = pool.address_for("a.test")
    b = pool.address_for("b.test")
    assert a != b and pool.address_for("a.test") == a  # stable; a is now the most recent
    assert pool.name_for(a) == "a.test" and pool.name_for(str(b)) == "b.test"
    c = pool.address_for("c.test")  # full: b (least recent) is recycled
    assert c == b and pool.name_for(b) == "c.test"
    assert pool.name_for("198.18.0.3") is None and pool.name_for("not an ip") is None


def test_source_agent_option_is_parsed_and_checked() -> None:
    assert parse_source_agent("10.0.0.5=ci-bot") == ("10.0.0.5/32", "ci-bot")
    assert parse_source_agent("10.1.2.3/16=builder") == ("10.1.0.0/16", "builder")
    for bad in ("10.0.0.5", "10.0.0.5=", "not-an-ip=ci-bot"):
        with pytest.raises(ValueError, match="--source-agent"):
            parse_source_agent(bad)


def test_dns_listener_refuses_several_workers(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefault: deny\n")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "proxy.cli", "run", "--policy", str(policy)),
            *("--state-dir", str(tmp_path / "state"), "--dns", "127.0.0.1:0", "--workers", "2"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--dns needs a single worker" in result.stderr
