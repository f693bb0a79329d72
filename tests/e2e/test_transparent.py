"""Transparent mode (`run --transparent`): an agent namespace with no proxy settings at all,
whose every TCP connection the kernel redirects to the proxy (nftables REDIRECT in the proxy's
namespace). The same gate decides: by the TLS server name or Host header (dialled at the proxy's
own resolution, never the address the client chose), by the original address for raw TCP, and by
name again for a synthetic address the policy-aware DNS handed out."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.conftest import ALLOWED_IP
from tests.support.control import TOKEN_ENV, approve, wait_pending
from tests.support.netns import (
    CLIENT_IP,
    ELSEWHERE_IP,
    GATEWAY_IP,
    SidecarNet,
    in_namespace,
    require_tools,
    sidecar_net,
)
from tests.support.proxy import ProxyProcess, start_proxy
from tests.support.upstream import Upstream, start_upstream

pytestmark = pytest.mark.e2e

TRANSPARENT_PORT = 15001
DNS_PORT = 15053
RAW_PORT = 9999
SSH_IP = "10.77.7.7"  # ssh.test's real address
NAMES = ("allowed.test", "evil.test", "held.test", "alice.test", "inspected.test")


class _Recorder:
    """A TCP listener that only counts the connections it accepts (the 'attacker')."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(0.2)
        self.accepted = 0
        self._stop = False
        import threading

        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()


class _Echo(_Recorder):
    """A TCP server that speaks first (as SSH does) and echoes one line back."""

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(5)
                conn.sendall(b"SSH-2.0-echo\r\n")
                with contextlib.suppress(OSError):
                    conn.sendall(conn.recv(1024))


@dataclass
class Sidecar:
    net: SidecarNet
    proc: ProxyProcess
    https: Upstream
    http: Upstream
    attacker: _Recorder
    ca_file: Path
    ssh: _Echo


@pytest.fixture(scope="module")
def sidecar(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    require_tools("curl")
    tmp = tmp_path_factory.mktemp("transparent")
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*NAMES).configure_cert(server_ctx)
    with sidecar_net("tp") as net:
        # The real upstreams live in the proxy's namespace, on the address the names resolve to.
        https = in_namespace(net.proxy_ns, lambda: start_upstream(ALLOWED_IP, server_ctx))
        http = in_namespace(net.proxy_ns, lambda: start_upstream(ALLOWED_IP))
        # Where a forged SNI asks to go: the same port, another address.
        attacker = in_namespace(net.proxy_ns, lambda: _Recorder(GATEWAY_IP, https.port))
        # A server-speaks-first service at a real address of its own (ssh.test), in the proxy's
        # namespace, reachable for the agent only through the redirect.
        subprocess.run(
            ["ip", "-n", net.proxy_ns, "addr", "add", f"{SSH_IP}/32", "dev", "lo"], check=True
        )
        ssh = in_namespace(net.proxy_ns, lambda: _Echo(SSH_IP, RAW_PORT))
        agents = tmp / "agents.yaml"
        from proxy.agents import AgentRegistry

        AgentRegistry(agents).add("alice")
        policy = tmp / "policy.yaml"
        policy.write_text(
            f"version: 1\ndefault: ask\nallow: [allowed.test, inspected.test, {ALLOWED_IP}/32,"
            f" 'ssh.test:{RAW_PORT}', {SSH_IP}/32]\n"
            "deny: [evil.test]\n"
            "inspect: [{host: inspected.test, methods: [GET], deny_paths: ['/private*']}]\n"
            f"network: {{ports: [{https.port}, {http.port}, {RAW_PORT}]}}\n"
            "approval: {wait: 20s}\nauth: {required: false}\n"
            "agents:\n  alice: {allow: [alice.test]}\n"
        )
        extra: list[str] = []
        for name in NAMES:
            extra += ["--resolve", f"{name}:{ALLOWED_IP}"]
        extra += ["--resolve", f"ssh.test:{SSH_IP}"]
        proc = start_proxy(
            tmp / "state",
            [policy],
            *extra,
            "--agents",
            str(agents),
            "--transparent",
            f"0.0.0.0:{TRANSPARENT_PORT}",
            "--dns",
            f"0.0.0.0:{DNS_PORT}",
            "--source-agent",
            f"{CLIENT_IP}/32=alice",
            "--upstream-ca",
            str(ca_file),
            prefix=net.proxy_prefix,
            env=TOKEN_ENV,
        )
        try:
            net.redirect(TRANSPARENT_PORT, DNS_PORT)
            yield Sidecar(net, proc, https, http, attacker, ca_file, ssh)
        finally:
            proc.stop()
            for closer in (https.close, http.close, attacker.close, ssh.close):
                in_namespace(net.proxy_ns, closer)


def _curl(sc: Sidecar, url: str, *args: str) -> tuple[int, str, str]:
    """(curl exit code, body, headers) of a curl with no proxy, from the agent's namespace."""
    result = sc.net.client(
        "curl", "-q", "-sS", "-D", "-", "--max-time", "20", "--cacert", str(sc.ca_file), *args, url
    )
    return result.returncode, result.stdout, result.stderr


def _resolve(name: str, port: int, ip: str = ELSEWHERE_IP) -> tuple[str, str]:
    return "--resolve", f"{name}:{port}:{ip}"


def test_allowed_https_host_is_reached_without_any_proxy_setting(sidecar: Sidecar) -> None:
    port = sidecar.https.port
    hits = len(sidecar.https.hits)
    code, out, err = _curl(
        sidecar, f"https://allowed.test:{port}/t1", *_resolve("allowed.test", port)
    )
    assert code == 0, err
    assert "hello from upstream GET /t1" in out
    assert len(sidecar.https.hits) == hits + 1
    line = sidecar.proc.wait_decision(server__address="allowed.test", egress__decision="allow")
    assert line["network.transport.protocol"] == "transparent"


def test_denied_https_host_is_refused(sidecar: Sidecar) -> None:
    port = sidecar.https.port
    hits = len(sidecar.https.hits)
    code, out, _ = _curl(sidecar, f"https://evil.test:{port}/", *_resolve("evil.test", port))
    assert code != 0
    assert "hello from upstream" not in out
    assert len(sidecar.https.hits) == hits
    line = sidecar.proc.wait_decision(server__address="evil.test", egress__decision="deny")
    assert line["egress.reason"] == "deny_rule"


def test_plain_http_is_named_by_its_host_header(sidecar: Sidecar) -> None:
    port = sidecar.http.port
    code, out, err = _curl(
        sidecar, f"http://allowed.test:{port}/plain", *_resolve("allowed.test", port)
    )
    assert code == 0, err
    assert "hello from upstream GET /plain" in out
    code, out, _ = _curl(sidecar, f"http://evil.test:{port}/", *_resolve("evil.test", port))
    assert " 403 " in out.splitlines()[0]
    assert "x-egress-warden-reason: deny_rule" in out.lower()


def test_plain_http_cannot_switch_host_on_a_kept_alive_connection(sidecar: Sidecar) -> None:
    port = sidecar.http.port
    hits = [h.path for h in sidecar.http.hits]
    two = (
        b"GET /first HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n"
    )
    answer = _raw_exchange(sidecar.net.client_ns, ELSEWHERE_IP, port, two)
    assert b"hello from upstream GET /first" in answer
    assert b"403" in answer.split(b"hello from upstream", 1)[1]
    assert [h.path for h in sidecar.http.hits][len(hits) :] == ["/first"]


def _raw_exchange(ns: str, host: str, port: int, payload: bytes, timeout: float = 10) -> bytes:
    def talk() -> bytes:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(payload)
            chunks = []
            try:
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            except (ConnectionResetError, TimeoutError):
                pass
            return b"".join(chunks)

    return in_namespace(ns, talk)


def test_raw_tcp_to_an_address_no_rule_allows_is_refused(sidecar: Sidecar) -> None:
    # Not TLS, not HTTP: decided on the original destination, an IP literal.
    got = _raw_exchange(sidecar.net.client_ns, ELSEWHERE_IP, RAW_PORT, b"\x00raw bytes\n")
    assert got == b""
    line = sidecar.proc.wait_decision(server__address=ELSEWHERE_IP, egress__decision="deny")
    assert line["egress.reason"] == "private_network"
    assert line["network.transport.protocol"] == "transparent"


def test_raw_tcp_that_sends_nothing_is_decided_by_address(sidecar: Sidecar) -> None:
    def silent() -> bytes:
        with socket.create_connection((ELSEWHERE_IP, RAW_PORT + 1), timeout=10) as sock:
            return sock.recv(100)  # server-speaks-first protocols: nothing comes, then EOF

    started = time.monotonic()
    assert in_namespace(sidecar.net.client_ns, silent) == b""
    assert time.monotonic() - started < 8
    sidecar.proc.wait_decision(server__address=ELSEWHERE_IP, server__port=RAW_PORT + 1)


def test_forged_sni_reaches_only_the_named_hosts_real_address(sidecar: Sidecar) -> None:
    port = sidecar.https.port
    hits = len(sidecar.https.hits)
    ctx = ssl.create_default_context(cafile=str(sidecar.ca_file))

    def forged() -> bytes:
        # Dial the attacker's address, naming an allowed host in the ClientHello.
        with (
            socket.create_connection((GATEWAY_IP, port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="allowed.test") as tls,
        ):
            tls.sendall(b"GET /forged HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
            return tls.recv(65536)

    answer = in_namespace(sidecar.net.client_ns, forged)
    assert b"hello from upstream GET /forged" in answer
    assert len(sidecar.https.hits) == hits + 1
    assert sidecar.attacker.accepted == 0


def test_source_address_names_the_agent(sidecar: Sidecar) -> None:
    # alice.test is allowed for the agent alice only; the client's address is mapped to alice.
    port = sidecar.https.port
    code, _out, err = _curl(sidecar, f"https://alice.test:{port}/a", *_resolve("alice.test", port))
    assert code == 0, err
    line = sidecar.proc.wait_decision(server__address="alice.test", egress__decision="allow")
    assert line["egress.agent.id"] == "alice"


def test_inspected_host_is_intercepted_so_its_path_rules_apply(sidecar: Sidecar) -> None:
    # Under `inspect:` the redirected TLS is intercepted with the proxy's CA, as over CONNECT.
    proxy_ca = sidecar.proc.state_dir / "ca" / "mitmproxy-ca-cert.pem"
    port = sidecar.https.port
    target = _resolve("inspected.test", port)
    code, out, err = _curl(
        sidecar, f"https://inspected.test:{port}/public", *target, "--cacert", str(proxy_ca)
    )
    assert code == 0, err
    assert "hello from upstream GET /public" in out
    hits = len(sidecar.https.hits)
    code, out, err = _curl(
        sidecar, f"https://inspected.test:{port}/private/x", *target, "--cacert", str(proxy_ca)
    )
    assert code == 0, err
    assert " 403 " in out.splitlines()[0]
    assert len(sidecar.https.hits) == hits
    line = sidecar.proc.wait_decision(url__path="/private/x")
    assert line["network.transport.protocol"] == "https_inspected"
    assert line["egress.reason"] == "deny_rule"
    # Without trusting the proxy's CA there is no way past the interception.
    code, _out, _err = _curl(sidecar, f"https://inspected.test:{port}/public", *target)
    assert code != 0


def _dig(sc: Sidecar, *args: str) -> str:
    result = sc.net.client("dig", "+short", "+time=3", "+tries=1", f"@{GATEWAY_IP}", *args)
    return result.stdout.strip()


def test_held_connection_to_a_synthetic_address_is_released_by_approval(sidecar: Sidecar) -> None:
    synthetic = _dig(sidecar, "held.test", "A")
    assert synthetic.startswith("198.1"), synthetic  # the benchmarking range (198.18.0.0/15)
    port = sidecar.http.port
    hits = len(sidecar.http.hits)
    # No Host header, no SNI: only the synthetic address says which name this is.
    import threading

    answer: list[bytes] = []
    client = threading.Thread(
        target=lambda: answer.append(
            _raw_exchange(
                sidecar.net.client_ns, synthetic, port, b"GET /held HTTP/1.0\r\n\r\n", timeout=30
            )
        )
    )
    client.start()
    item = in_namespace(
        sidecar.net.proxy_ns, lambda: wait_pending(sidecar.proc, "held.test", agent="alice")
    )
    assert len(sidecar.http.hits) == hits  # nothing dialled while held
    in_namespace(sidecar.net.proxy_ns, lambda: approve(sidecar.proc, item["id"]))
    client.join(timeout=30)
    assert answer and b"hello from upstream GET /held" in answer[0]
    assert len(sidecar.http.hits) == hits + 1


def test_raw_tcp_to_an_allowed_names_real_address_is_decided_by_that_name(
    sidecar: Sidecar,
) -> None:
    # SSH-like: the client looks the name up (through the proxy's DNS), then speaks no TLS and
    # no HTTP; the address it dials was handed out for ssh.test, so ssh.test's rule decides.
    assert _dig(sidecar, "ssh.test", "A") == SSH_IP
    accepted = sidecar.ssh.accepted

    def ssh_like() -> bytes:
        with socket.create_connection((SSH_IP, RAW_PORT), timeout=10) as sock:
            banner = sock.recv(100)
            sock.sendall(b"hello\n")
            return banner + sock.recv(100)

    assert in_namespace(sidecar.net.client_ns, ssh_like) == b"SSH-2.0-echo\r\nhello\n"
    assert sidecar.ssh.accepted == accepted + 1
    line = sidecar.proc.wait_decision(
        server__address="ssh.test", network__transport__protocol="transparent"
    )
    assert line["egress.decision"] == "allow"
    assert line["egress.rule"] == f"ssh.test:{RAW_PORT}"


def test_unmapped_synthetic_address_is_refused(sidecar: Sidecar) -> None:
    got = _raw_exchange(sidecar.net.client_ns, "198.19.255.254", RAW_PORT, b"\x00hello\n")
    assert got == b""
    sidecar.proc.wait_decision(server__address="198.19.255.254", egress__decision="deny")
