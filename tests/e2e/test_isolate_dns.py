"""`exec --isolate --dns H:P`: isolated commands resolve names through the proxy's policy-aware
DNS listener (`run --dns`), and only through it. A local DNS server stands in for the upstream
(`--nameserver`) and records every name it is asked: an allowed name is resolved there by the
proxy and answered inside; a denied name fails and an unknown one gets a synthetic address, and
neither is ever asked upstream."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ALLOWED_IP
from tests.support.dns import DnsServer
from tests.support.proxy import REPO, ProxyProcess, free_port, start_proxy

pytestmark = pytest.mark.e2e

SYNTHETIC = ipaddress.ip_network("198.18.0.0/15")
# Run inside the namespace: each name's IPv4 addresses over UDP (getaddrinfo), or the error.
RESOLVE = """
import json, socket, sys
out = {}
for name in sys.argv[1:]:
    try:
        infos = socket.getaddrinfo(name, 443, socket.AF_INET, socket.SOCK_STREAM)
        out[name] = sorted({i[4][0] for i in infos})
    except socket.gaierror as exc:
        out[name] = f"error: {exc}"
out["resolv.conf"] = open("/etc/resolv.conf").read()
print(json.dumps(out))
"""


@dataclass
class Rig:
    proc: ProxyProcess
    upstream: DnsServer
    dns_port: int
    tmp: Path


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("isolate-dns")
    names = ("allowed.test", "evil.test", "unknown.test", "c2VjcmV0.unknown.test")
    upstream = DnsServer(dict.fromkeys(names, ALLOWED_IP))
    policy = tmp / "policy.yaml"
    policy.write_text(
        f"version: 1\ndefault: ask\nallow: [allowed.test, {ALLOWED_IP}/32]\ndeny: [evil.test]\n"
        "auth: {required: false}\n"
    )
    dns_port = free_port()
    proc = start_proxy(
        tmp / "state",
        [policy],
        "--nameserver",
        f"{upstream.host}:{upstream.port}",
        "--dns",
        f"127.0.0.1:{dns_port}",
    )
    try:
        yield Rig(proc, upstream, dns_port, tmp)
    finally:
        proc.stop()
        upstream.close()


def _exec(rig: Rig, *options: str, names: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    argv = [sys.executable, "-m", "addons.cli", "exec", "--proxy", rig.proc.url, "--ca", "never"]
    return subprocess.run(
        [*argv, *options, "--", sys.executable, "-P", "-c", RESOLVE, *names],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_isolated_command_resolves_through_the_policy(rig: Rig) -> None:
    rig.upstream.clear()
    names = ("allowed.test", "evil.test", "unknown.test", "c2VjcmV0.unknown.test")
    result = _exec(rig, "--isolate", "--dns", f"127.0.0.1:{rig.dns_port}", names=names)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["allowed.test"] == [ALLOWED_IP]
    assert str(seen["evil.test"]).startswith("error:")  # REFUSED: the lookup fails
    for unknown in ("unknown.test", "c2VjcmV0.unknown.test"):  # `ask`: a synthetic address
        [address] = seen[unknown]
        assert ipaddress.ip_address(address) in SYNTHETIC, seen
    assert "nameserver 127.0.0.1" in seen["resolv.conf"]
    # Only the allowed name was ever asked upstream, by the proxy.
    assert rig.upstream.queried("allowed.test")
    for name in ("evil.test", "unknown.test", "c2VjcmV0.unknown.test"):
        assert not rig.upstream.queried(name), name
    line = rig.proc.wait_decision(server__address="evil.test", egress__decision="deny")
    assert line["network.transport.protocol"] == "dns"
    # The host's resolv.conf is untouched (the bind mount lives in the command's namespace).
    assert "egress-warden" not in Path("/etc/resolv.conf").read_text()


def test_isolated_dns_over_tcp_reaches_the_same_listener(rig: Rig) -> None:
    rig.upstream.clear()
    script = (
        "import socket, struct, sys\n"
        "q = bytes.fromhex('abcd01000001000000000000') + b''.join(\n"
        "    bytes([len(p)]) + p.encode() for p in sys.argv[1].split('.')) + b'\\0\\0\\1\\0\\1'\n"
        "s = socket.create_connection(('127.0.0.1', 53), timeout=5)\n"
        "s.sendall(struct.pack('!H', len(q)) + q)\n"
        "n = struct.unpack('!H', s.recv(2))[0]\n"
        "a = b''\n"
        "while len(a) < n: a += s.recv(n - len(a))\n"
        "print(a[3] & 15, '.'.join(map(str, a[-4:])))\n"
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    base = [sys.executable, "-m", "addons.cli", "exec", "--proxy", rig.proc.url, "--ca", "never"]
    base += ["--isolate", "--dns", f"127.0.0.1:{rig.dns_port}", "--", sys.executable, "-P", "-c"]
    answers = {}
    for name in ("allowed.test", "evil.test"):
        result = subprocess.run(
            [*base, script, name], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        answers[name] = result.stdout.split()
    assert answers["allowed.test"] == ["0", ALLOWED_IP]  # NOERROR, the real address
    assert answers["evil.test"][0] == "5"  # REFUSED
    assert not rig.upstream.queried("evil.test")


def test_without_dns_nothing_resolves_inside(rig: Rig) -> None:
    rig.upstream.clear()
    result = _exec(rig, "--isolate", names=("allowed.test",))
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert str(seen["allowed.test"]).startswith("error:")
    assert rig.upstream.queries == []


def test_dns_needs_isolate(rig: Rig) -> None:
    result = _exec(rig, "--dns", f"127.0.0.1:{rig.dns_port}", names=("allowed.test",))
    assert result.returncode == 2
    assert "--dns needs --isolate" in result.stderr
