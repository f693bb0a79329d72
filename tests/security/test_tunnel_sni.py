"""Raw (not inspected) CONNECT tunnels: the ClientHello's server name must name the CONNECT
target, or a tunnel admitted for allowed.test carries TLS to any host the upstream serves.

The upstream here is a TLS recorder that notes, per TCP connection, whether any byte arrived,
the server name its ClientHello carried and whether the handshake completed.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from tests.conftest import ALLOWED_IP, Upstreams, resolve_args, write_policy
from tests.support.proxy import ProxyProcess, start_proxy
from tests.support.tls_recorder import TlsRecorder
from tests.support.tunnel import (
    ManualTls,
    exchange,
    get_request,
    open_tunnel,
    peer_closed,
    refragment_hello,
    send_in_pieces,
    tls_tunnel,
)

pytestmark = pytest.mark.e2e

MISMATCH = {"egress.reason": "host_mismatch"}


@pytest.fixture(scope="module")
def recorder(ca: trustme.CA) -> Iterator[TlsRecorder]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("allowed.test", "evil.test", ALLOWED_IP).configure_cert(context)
    server = TlsRecorder(ALLOWED_IP, context)
    yield server
    server.close()


GREETING = b"220 greeter ready\r\n"


def _greet(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                conn.sendall(GREETING)
                line = conn.recv(64)
                conn.sendall(b"echo " + line)
            except OSError:
                continue


@pytest.fixture(scope="module")
def greeter() -> Iterator[socket.socket]:
    """An upstream that speaks first (one greeting, then echoes one line)."""
    listener = socket.create_server((ALLOWED_IP, 0))
    threading.Thread(target=_greet, args=(listener,), daemon=True).start()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def sni_proxy(
    upstreams: Upstreams,
    recorder: TlsRecorder,
    greeter: socket.socket,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("sni")
    greeter_port = greeter.getsockname()[1]
    ports = sorted({443, upstreams.http.port, upstreams.https.port, recorder.port, greeter_port})
    policy = write_policy(
        tmp / "policy.yaml",
        upstreams,
        body=f"""\
version: 1
default: deny
allow: [allowed.test, {ALLOWED_IP}/32]
deny: [evil.test]
network: {{ports: {ports}}}
""",
    )
    proc = start_proxy(tmp / "state", [policy], *resolve_args())
    yield proc
    proc.stop()


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(context)
    return context


def _mismatches(proxy: ProxyProcess) -> int:
    return len(proxy.decisions(**MISMATCH))


def _new_decision(
    proxy: ProxyProcess, before: int, match: dict[str, str] = MISMATCH, timeout: float = 5.0
) -> dict[str, Any]:
    """The one decision line matching `match` logged after the first `before` (or raise)."""
    deadline = time.monotonic() + timeout
    while len(proxy.decisions(**match)) <= before and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = proxy.decisions(**match)[before:]
    assert len(lines) == 1, f"expected one new decision line matching {match}, got {lines}"
    return lines[0]


def _assert_refused_before_upstream(
    recorder: TlsRecorder, since: int, proxy: ProxyProcess, mismatches: int
) -> None:
    """Nothing of the tunnel reached the upstream; exactly one host_mismatch decision."""
    arrivals = recorder.wait_closed(since)
    # With eager connections the proxy may have dialled (then closed) the upstream at CONNECT.
    assert len(arrivals) <= 1, arrivals
    assert not any(a.got_bytes or a.hello_seen or a.handshake_done for a in arrivals), arrivals
    line = _new_decision(proxy, mismatches)
    assert line["egress.decision"] == "deny"
    assert line["network.transport.protocol"] == "https_connect"
    assert line["server.address"] == "allowed.test"
    assert line["server.port"] == recorder.port


def test_sni_naming_another_host_is_refused_before_the_upstream_sees_a_byte(
    sni_proxy: ProxyProcess, recorder: TlsRecorder, client_tls: ssl.SSLContext
) -> None:
    since, mismatches = len(recorder.arrivals), _mismatches(sni_proxy)
    with (
        open_tunnel(sni_proxy.proxy_port, f"allowed.test:{recorder.port}") as sock,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        client_tls.wrap_socket(sock, server_hostname="evil.test")
    _assert_refused_before_upstream(recorder, since, sni_proxy, mismatches)


def test_sni_mismatch_sends_nothing_to_the_shared_https_upstream(
    sni_proxy: ProxyProcess, upstreams: Upstreams, client_tls: ssl.SSLContext
) -> None:
    before, mismatches = len(upstreams.https.hits), _mismatches(sni_proxy)
    with (
        open_tunnel(sni_proxy.proxy_port, f"allowed.test:{upstreams.https.port}") as sock,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        client_tls.wrap_socket(sock, server_hostname="evil.test")
    line = _new_decision(sni_proxy, mismatches)
    assert line["server.port"] == upstreams.https.port
    assert len(upstreams.https.hits) == before


def test_sni_naming_the_connect_target_is_relayed_end_to_end(
    sni_proxy: ProxyProcess, upstreams: Upstreams, client_tls: ssl.SSLContext
) -> None:
    before, mismatches = len(upstreams.https.hits), _mismatches(sni_proxy)
    with tls_tunnel(
        sni_proxy.proxy_port, f"allowed.test:{upstreams.https.port}", client_tls, "allowed.test"
    ) as tls:
        reply = exchange(tls, get_request("/sni-ok", f"allowed.test:{upstreams.https.port}"))
    assert reply.status == 200 and b"GET /sni-ok" in reply.body
    assert [hit.path for hit in upstreams.https.hits[before:]] == ["/sni-ok"]
    assert _mismatches(sni_proxy) == mismatches


def test_sni_in_other_case_with_trailing_dot_is_the_same_host(
    sni_proxy: ProxyProcess, recorder: TlsRecorder, client_tls: ssl.SSLContext
) -> None:
    client_tls.check_hostname = False  # the certificate names allowed.test, without the dot
    with tls_tunnel(
        sni_proxy.proxy_port, f"allowed.test:{recorder.port}", client_tls, "ALLOWED.Test."
    ) as tls:
        reply = exchange(tls, get_request("/case", "allowed.test"))
    assert reply.status == 200 and b"GET /case" in reply.body


def test_client_hello_without_sni_is_relayed(
    sni_proxy: ProxyProcess, recorder: TlsRecorder, client_tls: ssl.SSLContext
) -> None:
    client_tls.check_hostname = False
    since, mismatches = len(recorder.arrivals), _mismatches(sni_proxy)
    with tls_tunnel(sni_proxy.proxy_port, f"allowed.test:{recorder.port}", client_tls, None) as tls:
        reply = exchange(tls, get_request("/no-sni", "allowed.test"))
    assert reply.status == 200 and b"GET /no-sni" in reply.body
    [arrival] = [a for a in recorder.wait_closed(since) if a.got_bytes]
    assert arrival.hello_seen and arrival.sni is None and arrival.handshake_done
    assert _mismatches(sni_proxy) == mismatches


@pytest.mark.parametrize("sni", ["evil.test", "allowed.test", None])
def test_ip_literal_connect_target_is_exempt_from_the_sni_check(
    sni_proxy: ProxyProcess, recorder: TlsRecorder, client_tls: ssl.SSLContext, sni: str | None
) -> None:
    client_tls.check_hostname = False
    since, mismatches = len(recorder.arrivals), _mismatches(sni_proxy)
    with tls_tunnel(sni_proxy.proxy_port, f"{ALLOWED_IP}:{recorder.port}", client_tls, sni) as tls:
        reply = exchange(tls, get_request("/by-ip", ALLOWED_IP))
    assert reply.status == 200 and f"sni={sni}".encode() in reply.body
    [arrival] = [a for a in recorder.wait_closed(since) if a.got_bytes]
    assert arrival.sni == sni and arrival.handshake_done
    assert _mismatches(sni_proxy) == mismatches


# A ClientHello that arrives in pieces must be checked whole, never relayed on its first bytes.
SPLITS = {
    "record-header-first": (5,),
    "three-writes": (5, 60),
    "one-byte-first": (1, 3, 9),
}


@pytest.mark.parametrize("cuts", list(SPLITS.values()), ids=list(SPLITS))
def test_client_hello_split_across_tcp_writes_is_still_checked(
    sni_proxy: ProxyProcess,
    recorder: TlsRecorder,
    client_tls: ssl.SSLContext,
    cuts: tuple[int, ...],
) -> None:
    since, mismatches = len(recorder.arrivals), _mismatches(sni_proxy)
    evil = ManualTls(client_tls, "evil.test")
    with open_tunnel(sni_proxy.proxy_port, f"allowed.test:{recorder.port}") as sock:
        send_in_pieces(sock, evil.client_hello(), cuts, pause=0.2)
        assert peer_closed(sock), "the proxy kept the tunnel open after a mismatching hello"
    _assert_refused_before_upstream(recorder, since, sni_proxy, mismatches)

    good = ManualTls(client_tls, "allowed.test")
    with open_tunnel(sni_proxy.proxy_port, f"allowed.test:{recorder.port}") as sock:
        send_in_pieces(sock, good.client_hello(), cuts, pause=0.2)
        good.finish_handshake(sock)
        reply = good.request(sock, get_request("/split", "allowed.test"))
    assert reply.status == 200 and b"GET /split" in reply.body and b"sni=allowed.test" in reply.body


def test_client_hello_fragmented_across_tls_records_is_still_checked(
    sni_proxy: ProxyProcess, recorder: TlsRecorder, client_tls: ssl.SSLContext
) -> None:
    # Legal TLS: one handshake message in two records, the server name in the second.
    since, mismatches = len(recorder.arrivals), _mismatches(sni_proxy)
    evil = ManualTls(client_tls, "evil.test")
    with open_tunnel(sni_proxy.proxy_port, f"allowed.test:{recorder.port}") as sock:
        send_in_pieces(sock, refragment_hello(evil.client_hello(), 40), (45,), pause=0.2)
        assert peer_closed(sock), "the proxy kept the tunnel open after a mismatching hello"
    _assert_refused_before_upstream(recorder, since, sni_proxy, mismatches)

    good = ManualTls(client_tls, "allowed.test")
    with open_tunnel(sni_proxy.proxy_port, f"allowed.test:{recorder.port}") as sock:
        sock.sendall(refragment_hello(good.client_hello(), 40))
        good.finish_handshake(sock)
        reply = good.request(sock, get_request("/fragmented", "allowed.test"))
    assert reply.status == 200 and b"sni=allowed.test" in reply.body


def test_client_hello_pipelined_with_the_connect_is_still_checked(
    sni_proxy: ProxyProcess, recorder: TlsRecorder, client_tls: ssl.SSLContext
) -> None:
    # The ClientHello sent in the same write as the CONNECT, before the proxy's 200.
    since, mismatches = len(recorder.arrivals), _mismatches(sni_proxy)
    evil = ManualTls(client_tls, "evil.test")
    target = f"allowed.test:{recorder.port}"
    with open_tunnel(sni_proxy.proxy_port, target, early=evil.client_hello()) as sock:
        assert peer_closed(sock), "the proxy kept the tunnel open after a mismatching hello"
    _assert_refused_before_upstream(recorder, since, sni_proxy, mismatches)

    good = ManualTls(client_tls, "allowed.test")
    with open_tunnel(sni_proxy.proxy_port, target, early=good.client_hello()) as sock:
        good.finish_handshake(sock)
        reply = good.request(sock, get_request("/pipelined", "allowed.test"))
    assert reply.status == 200 and b"sni=allowed.test" in reply.body


def test_malformed_client_hello_is_refused(sni_proxy: ProxyProcess, recorder: TlsRecorder) -> None:
    since = len(recorder.arrivals)
    invalid = {"egress.reason": "invalid_request"}
    before = len(sni_proxy.decisions(**invalid))
    # A TLS handshake record whose ClientHello body is truncated garbage.
    with open_tunnel(sni_proxy.proxy_port, f"allowed.test:{recorder.port}") as sock:
        sock.sendall(b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\xff\xff")
        assert peer_closed(sock)
    arrivals = recorder.wait_closed(since)
    assert not any(a.got_bytes for a in arrivals), arrivals
    line = _new_decision(sni_proxy, before, invalid)
    assert line["server.address"] == "allowed.test"


def test_plain_http_inside_a_raw_tunnel_is_relayed(
    sni_proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    before, mismatches = len(upstreams.http.hits), _mismatches(sni_proxy)
    with open_tunnel(sni_proxy.proxy_port, f"allowed.test:{upstreams.http.port}") as sock:
        reply = exchange(sock, get_request("/plain-in-tunnel", "allowed.test"))
    assert reply.status == 200 and b"GET /plain-in-tunnel" in reply.body
    assert [hit.path for hit in upstreams.http.hits[before:]] == ["/plain-in-tunnel"]
    assert _mismatches(sni_proxy) == mismatches


def test_server_speaks_first_protocol_is_relayed(
    sni_proxy: ProxyProcess, greeter: socket.socket
) -> None:
    # SMTP/SSH-style: the upstream greets before the client sends anything; waiting for a
    # ClientHello must not stall the tunnel.
    port = greeter.getsockname()[1]
    with open_tunnel(sni_proxy.proxy_port, f"allowed.test:{port}") as sock:
        assert sock.recv(64) == GREETING
        sock.sendall(b"QUIT\r\n")
        assert sock.recv(64) == b"echo QUIT\r\n"
