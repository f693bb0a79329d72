"""The SOCKS5 listener (`run --socks`): the same policy, identities, approvals and events as
the HTTP proxy. curl as the client (`--socks5-hostname`: names resolved at the proxy; `--socks5`
with an IP literal), plus a raw socket client for the reply codes on the wire."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.agents import AgentRegistry
from tests.conftest import ALLOWED_IP, CANARY_IP, Upstreams, resolve_args
from tests.support.control import TOKEN_ENV, approve, wait_pending
from tests.support.proxy import ProxyProcess, free_port, start_proxy

pytestmark = pytest.mark.e2e

ALICE_ONLY = "alice-only.test"  # allowed for the agent alice alone
HELD = "held-socks.test"  # no rule names it: held for approval
EXTRA_NAMES = (ALICE_ONLY, HELD)


class SocksProxy:
    def __init__(self, proc: ProxyProcess, socks_port: int, token: str) -> None:
        self.proc = proc
        self.socks = f"127.0.0.1:{socks_port}"
        self.port = socks_port
        self.alice_token = token


@pytest.fixture(scope="module")
def socks_proxy(
    upstreams: Upstreams, ca_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SocksProxy]:
    tmp = tmp_path_factory.mktemp("socks")
    agents = tmp / "agents.yaml"
    token = AgentRegistry(agents).add("alice")
    ports = sorted({80, 443, upstreams.http.port, upstreams.https.port, upstreams.canary.port})
    policy = tmp / "policy.yaml"
    policy.write_text(
        f"version: 1\ndefault: ask\nallow: [allowed.test, api.allowed.test, {ALLOWED_IP}/32]\n"
        "deny: [evil.test]\n"
        f"network: {{ports: {ports}}}\n"
        "approval: {wait: 20s}\n"
        "auth: {required: false}\n"
        "inspect: [{host: api.allowed.test, methods: [GET], deny_paths: ['/private*']}]\n"
        f"agents:\n  alice: {{allow: [{ALICE_ONLY}]}}\n"
    )
    socks_port = free_port()
    extra = resolve_args()
    for name in EXTRA_NAMES:
        extra += ["--resolve", f"{name}:{ALLOWED_IP}"]
    proc = start_proxy(
        tmp / "state",
        [policy],
        *extra,
        "--agents",
        str(agents),
        "--socks",
        f"127.0.0.1:{socks_port}",
        "--upstream-ca",
        str(ca_file),
        env=TOKEN_ENV,
    )
    yield SocksProxy(proc, socks_port, token)
    proc.stop()


def _curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-q", "-sS", "--noproxy", "", "--max-time", str(timeout), *args],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        check=False,
    )


def _hits(upstream_hits: list[object], host: str) -> int:
    return sum(1 for hit in upstream_hits if getattr(hit, "headers", {}).get("host") == host)


def _socks_connect(
    port: int, host: str, dport: int, auth: tuple[str, str] | None = None
) -> tuple[bytes, socket.socket]:
    """A raw SOCKS5 handshake: (the reply's first two bytes, the socket). With `auth`, the
    first two bytes are the RFC 1929 status when authentication fails."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"\x05\x01" + (b"\x02" if auth else b"\x00"))
    assert sock.recv(2) == (b"\x05\x02" if auth else b"\x05\x00")
    if auth:
        user, password = (part.encode() for part in auth)
        sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        status = sock.recv(2)
        if status != b"\x01\x00":
            return status, sock
    name = host.encode()
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", dport))
    reply = sock.recv(10)
    return reply[:2], sock


def test_socks5_hostname_allowed_reaches_upstream_and_logs_socks5(
    socks_proxy: SocksProxy, upstreams: Upstreams
) -> None:
    host = f"allowed.test:{upstreams.http.port}"
    before = _hits(upstreams.http.hits, host)
    result = _curl("--socks5-hostname", socks_proxy.socks, f"http://{host}/socks-ok")
    assert result.returncode == 0, result.stderr
    assert "hello from upstream GET /socks-ok" in result.stdout
    line = socks_proxy.proc.wait_decision(
        server__address="allowed.test", network__transport__protocol="socks5"
    )
    assert line["egress.decision"] == "allow"
    assert line["network.peer.address"] == ALLOWED_IP  # resolved at the proxy
    assert _hits(upstreams.http.hits, host) == before + 1


def test_socks5_with_ip_literal_is_checked_as_an_ip(
    socks_proxy: SocksProxy, upstreams: Upstreams
) -> None:
    url = f"http://{ALLOWED_IP}:{upstreams.http.port}/socks-ip"
    result = _curl("--socks5", socks_proxy.socks, url)
    assert result.returncode == 0, result.stderr
    line = socks_proxy.proc.wait_decision(
        server__address=ALLOWED_IP, network__transport__protocol="socks5"
    )
    assert line["egress.rule"] == f"{ALLOWED_IP}/32"


def test_denied_name_gets_socks_not_allowed_reply_and_no_upstream_hit(
    socks_proxy: SocksProxy, upstreams: Upstreams
) -> None:
    host = f"evil.test:{upstreams.http.port}"
    result = _curl("--socks5-hostname", socks_proxy.socks, f"http://{host}/")
    assert result.returncode != 0
    reply, sock = _socks_connect(socks_proxy.port, "evil.test", upstreams.http.port)
    sock.close()
    assert reply == b"\x05\x02"  # connection not allowed by ruleset
    line = socks_proxy.proc.wait_decision(
        server__address="evil.test", network__transport__protocol="socks5"
    )
    assert (line["egress.decision"], line["egress.reason"]) == ("deny", "deny_rule")
    assert _hits(upstreams.http.hits, host) == 0


def test_authenticated_agent_gets_its_own_rules(
    socks_proxy: SocksProxy, upstreams: Upstreams
) -> None:
    host = f"{ALICE_ONLY}:{upstreams.http.port}"
    url = f"http://{host}/alice"
    credentials = f"alice:{socks_proxy.alice_token}"
    result = _curl("--socks5-hostname", socks_proxy.socks, "--proxy-user", credentials, url)
    assert result.returncode == 0, result.stderr
    line = socks_proxy.proc.wait_decision(server__address=ALICE_ONLY, egress__decision="allow")
    assert line["egress.agent.id"] == "alice"
    assert line["network.transport.protocol"] == "socks5"
    assert _hits(upstreams.http.hits, host) == 1


def test_wrong_token_fails_socks_authentication(
    socks_proxy: SocksProxy, upstreams: Upstreams
) -> None:
    status, sock = _socks_connect(
        socks_proxy.port, ALICE_ONLY, upstreams.http.port, auth=("alice", "wrong-token")
    )
    sock.close()
    assert status == b"\x01\x01"  # RFC 1929: authentication failed
    result = _curl(
        "--socks5-hostname",
        socks_proxy.socks,
        "--proxy-user",
        "alice:wrong-token",
        f"http://{ALICE_ONLY}:{upstreams.http.port}/wrong",
    )
    assert result.returncode != 0
    hits = [h for h in upstreams.http.hits if h.path == "/wrong"]
    assert hits == []


def test_anonymous_caller_does_not_get_agent_rules(
    socks_proxy: SocksProxy, upstreams: Upstreams
) -> None:
    # Alice's rule does not apply without her credentials: the name is a miss, held.
    url = f"http://{ALICE_ONLY}:{upstreams.http.port}/anonymous"
    result = _curl("--socks5-hostname", socks_proxy.socks, url, timeout=2)
    assert result.returncode != 0
    line = socks_proxy.proc.wait_decision(server__address=ALICE_ONLY, egress__decision="hold")
    assert "egress.agent.id" not in line
    assert [h for h in upstreams.http.hits if h.path == "/anonymous"] == []


def test_held_name_is_released_by_approval(socks_proxy: SocksProxy, upstreams: Upstreams) -> None:
    host = f"{HELD}:{upstreams.http.port}"
    client = subprocess.Popen(
        [
            *("curl", "-q", "-sS", "--noproxy", "", "--max-time", "30"),
            *("--socks5-hostname", socks_proxy.socks, f"http://{host}/held"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        item = wait_pending(socks_proxy.proc, HELD)
        assert item["port"] == upstreams.http.port
        assert _hits(upstreams.http.hits, host) == 0  # nothing dialled while held
        approve(socks_proxy.proc, item["id"])
        out, err = client.communicate(timeout=40)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, err
    assert "hello from upstream GET /held" in out
    line = socks_proxy.proc.wait_decision(server__address=HELD, egress__decision="allow")
    assert line["egress.reason"] == "approved"
    assert _hits(upstreams.http.hits, host) == 1


def test_private_network_guard_applies_to_socks(
    socks_proxy: SocksProxy, upstreams: Upstreams
) -> None:
    before = len(upstreams.canary.hits)
    url = f"http://{CANARY_IP}:{upstreams.canary.port}/canary"
    result = _curl("--socks5", socks_proxy.socks, url)
    assert result.returncode != 0
    line = socks_proxy.proc.wait_decision(
        server__address=CANARY_IP, network__transport__protocol="socks5"
    )
    assert (line["egress.decision"], line["egress.reason"]) == ("deny", "private_network")
    assert len(upstreams.canary.hits) == before


def test_socks_to_the_proxys_own_listeners_is_refused(tmp_path: Path, upstreams: Upstreams) -> None:
    """Loopback explicitly allowed on every port the proxy listens on: only the self guard can
    refuse these, and it must know the SOCKS listener as well as the others."""
    proxy_port, control_port, socks_port = free_port(), free_port(), free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"version: 1\ndefault: allow\nallow: [{CANARY_IP}/32]\n"
        f"network: {{ports: [{proxy_port}, {control_port}, {socks_port}]}}\n"
    )
    proc = start_proxy(
        tmp_path / "state",
        [policy],
        "--socks",
        f"127.0.0.1:{socks_port}",
        listen=f"127.0.0.1:{proxy_port}",
        control=f"127.0.0.1:{control_port}",
        env=TOKEN_ENV,
    )
    try:
        for port in (control_port, socks_port, proxy_port):
            reply, sock = _socks_connect(socks_port, CANARY_IP, port)
            sock.close()
            assert reply == b"\x05\x02", port
            line = proc.wait_decision(server__port=port, network__transport__protocol="socks5")
            assert (line["egress.decision"], line["egress.reason"]) == ("deny", "private_network")
            assert "itself" in line["egress.detail"]
    finally:
        proc.stop()


def test_tls_through_socks_reaches_the_named_host(
    socks_proxy: SocksProxy, upstreams: Upstreams, ca_file: Path
) -> None:
    url = f"https://allowed.test:{upstreams.https.port}/socks-tls"
    result = _curl("--socks5-hostname", socks_proxy.socks, "--cacert", str(ca_file), url)
    assert result.returncode == 0, result.stderr
    assert "hello from upstream GET /socks-tls" in result.stdout


def test_tls_server_name_must_match_the_socks_target(
    socks_proxy: SocksProxy, upstreams: Upstreams
) -> None:
    """Admitted for allowed.test, the ClientHello names evil.test: closed, nothing relayed."""
    before = len(upstreams.https.hits)
    reply, sock = _socks_connect(socks_proxy.port, "allowed.test", upstreams.https.port)
    assert reply == b"\x05\x00"
    client_tls = ssl.create_default_context()
    client_tls.check_hostname = False
    client_tls.verify_mode = ssl.CERT_NONE
    with sock, pytest.raises((ssl.SSLError, OSError)):
        client_tls.wrap_socket(sock, server_hostname="evil.test")
    line = socks_proxy.proc.wait_decision(
        server__address="allowed.test", egress__reason="host_mismatch"
    )
    assert line["network.transport.protocol"] == "socks5"
    assert len(upstreams.https.hits) == before


def test_inspected_host_over_socks_is_intercepted_and_its_path_rules_apply(
    socks_proxy: SocksProxy, upstreams: Upstreams
) -> None:
    proxy_ca = socks_proxy.proc.state_dir / "ca" / "mitmproxy-ca-cert.pem"
    base = f"https://api.allowed.test:{upstreams.https.port}"

    def get(path: str) -> str:
        result = _curl(
            *("--socks5-hostname", socks_proxy.socks, "--cacert", str(proxy_ca)),
            *("-o", "/dev/null", "-w", "%{http_code}", base + path),
        )
        return result.stdout

    assert get("/public") == "200"
    assert get("/private/keys") == "403"
    line = socks_proxy.proc.wait_decision(**{"url.path": "/private/keys"})
    assert (line["egress.decision"], line["network.transport.protocol"]) == (
        "deny",
        "https_inspected",
    )
    assert [h for h in upstreams.https.hits if h.path.startswith("/private")] == []
