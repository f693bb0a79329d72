"""Path rules on an inspected (TLS-intercepted) host: every spelling that reaches `/secret` on
the server is refused, and so is every path whose meaning depends on how the server decodes it;
a request inside the tunnel may not name another host. Nothing refused reaches the upstream."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.conftest import ALLOWED_IP, Upstreams, resolve_args, write_policy
from tests.support.clients import curl
from tests.support.proxy import ProxyProcess, start_proxy
from tests.support.tls_recorder import TlsRecorder
from tests.support.tunnel import Reply, exchange, get_request, tls_tunnel

pytestmark = pytest.mark.e2e

DENY_RULE = "deny_rule"
INVALID = "invalid_request"
MISMATCH = "host_mismatch"


@pytest.fixture(scope="module")
def recorder(ca: trustme.CA) -> Iterator[TlsRecorder]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("allowed.test", "evil.test", ALLOWED_IP).configure_cert(context)
    server = TlsRecorder(ALLOWED_IP, context)
    yield server
    server.close()


@pytest.fixture(scope="module")
def inspecting(
    upstreams: Upstreams,
    recorder: TlsRecorder,
    ca_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("inspect-paths")
    ports = sorted({443, upstreams.https.port, recorder.port})
    policy = write_policy(
        tmp / "policy.yaml",
        upstreams,
        body=f"""\
version: 1
default: deny
allow: [allowed.test, {ALLOWED_IP}/32]
deny: [evil.test]
network: {{ports: {ports}}}
inspect:
  - host: allowed.test
    deny_paths: ["/secret*"]
""",
    )
    proc = start_proxy(tmp / "state", [policy], *resolve_args(), "--upstream-ca", str(ca_file))
    yield proc
    proc.stop()


@dataclass
class Seen:
    status: int
    reason: str | None  # X-Egress-Warden-Reason
    body: str


def _proxy_ca(proxy: ProxyProcess) -> Path:
    return proxy.state_dir / "ca" / "mitmproxy-ca-cert.pem"


def _via_curl(proxy: ProxyProcess, port: int, path: str) -> Seen:
    marker = "\n--curl-write-out--"
    result = curl(
        "-x",
        proxy.url,
        "--cacert",
        str(_proxy_ca(proxy)),
        "--path-as-is",
        "-o",
        "-",
        "-w",
        marker + "%{http_code} %{header_json}",
        f"https://allowed.test:{port}{path}",
    )
    assert result.returncode == 0, result.stderr
    body, _, tail = result.stdout.rpartition(marker)
    code, _, header_json = tail.partition(" ")
    headers = json.loads(header_json)
    reason = headers.get("x-egress-warden-reason")
    return Seen(int(code), reason[0] if reason else None, body)


def _inspected_tls(proxy: ProxyProcess) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(_proxy_ca(proxy)))
    return context


def _raw(proxy: ProxyProcess, port: int, request: bytes) -> Reply:
    """Send `request` byte for byte inside an intercepted tunnel to allowed.test:port."""
    context = _inspected_tls(proxy)
    with tls_tunnel(proxy.proxy_port, f"allowed.test:{port}", context, "allowed.test") as tls:
        return exchange(tls, request)


def _via_raw(proxy: ProxyProcess, port: int, path: str) -> Seen:
    reply = _raw(proxy, port, get_request(path, f"allowed.test:{port}"))
    return Seen(
        reply.status,
        reply.headers.get("x-egress-warden-reason"),
        reply.body.decode(errors="replace"),
    )


# Targets a server resolves into /secret*: refused by the deny_paths rule.
REACH_SECRET = [
    "/secret",
    "/secret?x=1",
    "/secretive",
    "/secret;jsessionid=1",
    "/%73ecret",
    "/%73%65%63%72%65%74",
    "//secret",
    "///secret",
    "/./secret",
    "/%2e/secret",
    "/x/../secret",
    "/x/y/../../secret",
    "/x/%2e%2e/secret",
    "/x/.%2E/secret",
    "/%2e%2e/secret",
    "/../secret",
]
# Paths whose target depends on how the server decodes them: refused as invalid.
AMBIGUOUS = [
    "/x%2Fsecret",
    "/x%2fsecret",
    "/%2e%2e%2fsecret",
    "/%00",
    "/secret%00",
    "/%C0%AFsecret",
    "/%E0%80%AFsecret",
    "/%5Csecret",
    "/x%5C..%5Csecret",
    "/%252e%252e/secret",
    "/%2573ecret",
    "/x/..;/secret",
    "/x//../secret",
    "/%zzsecret",
    "/%7",
]
# Raw bytes curl would rewrite or refuse to send: only a raw client sends them as they are.
AMBIGUOUS_RAW_ONLY = ["/x\\..\\secret", "/secret#x", "/x/../secret#", "/\x01secret"]
ALLOWED = ["/public", "/caf%C3%A9", "/x/../public", "/secre", "/%7Epublic"]

REFUSED = [(p, DENY_RULE) for p in REACH_SECRET] + [(p, INVALID) for p in AMBIGUOUS]


@pytest.mark.parametrize(("path", "reason"), REFUSED, ids=[p for p, _ in REFUSED])
def test_path_forms_are_refused_through_curl(
    inspecting: ProxyProcess, upstreams: Upstreams, path: str, reason: str
) -> None:
    before = len(upstreams.https.hits)
    seen = _via_curl(inspecting, upstreams.https.port, path)
    assert (seen.status, seen.reason) == (403, reason), seen
    assert upstreams.https.hits[before:] == []


@pytest.mark.parametrize(
    ("path", "reason"),
    REFUSED + [(p, INVALID) for p in AMBIGUOUS_RAW_ONLY],
    ids=[p for p, _ in REFUSED] + [repr(p) for p in AMBIGUOUS_RAW_ONLY],
)
def test_path_forms_are_refused_byte_for_byte(
    inspecting: ProxyProcess, upstreams: Upstreams, path: str, reason: str
) -> None:
    before = len(upstreams.https.hits)
    seen = _via_raw(inspecting, upstreams.https.port, path)
    assert (seen.status, seen.reason) == (403, reason), seen
    assert upstreams.https.hits[before:] == []


@pytest.mark.parametrize("path", ALLOWED)
def test_other_paths_reach_the_upstream_as_sent(
    inspecting: ProxyProcess, upstreams: Upstreams, path: str
) -> None:
    before = len(upstreams.https.hits)
    seen = _via_curl(inspecting, upstreams.https.port, path)
    assert (seen.status, seen.reason) == (200, None), seen
    assert f"GET {path} " in seen.body
    assert [hit.path for hit in upstreams.https.hits[before:]] == [path]
    seen = _via_raw(inspecting, upstreams.https.port, path)
    assert seen.status == 200 and f"GET {path} " in seen.body
    assert [hit.path for hit in upstreams.https.hits[before:]] == [path, path]


def test_refusal_is_logged_with_the_path_as_sent(
    inspecting: ProxyProcess, upstreams: Upstreams
) -> None:
    seen = _via_curl(inspecting, upstreams.https.port, "/x/%2e%2e/secret")
    assert seen.status == 403
    line = inspecting.wait_decision(5.0, **{"url.path": "/x/%2e%2e/secret"})
    assert line["egress.decision"] == "deny"
    assert line["egress.reason"] == DENY_RULE
    assert line["egress.rule"] == "/secret*"
    assert line["network.transport.protocol"] == "https_inspected"


HOST_TRICKS = {
    "absolute-form-other-host": "GET https://evil.test/ HTTP/1.1\r\nHost: allowed.test\r\n",
    "absolute-form-other-host-with-port": (
        "GET https://evil.test:{port}/public HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
    ),
    "absolute-form-other-port": (
        "GET https://allowed.test:1/public HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
    ),
    "absolute-form-http-other-host": (
        "GET http://evil.test:{port}/public HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
    ),
    "host-header-other-host": "GET /public HTTP/1.1\r\nHost: evil.test\r\n",
    "host-header-other-host-with-port": "GET /public HTTP/1.1\r\nHost: evil.test:{port}\r\n",
    "host-header-other-port": "GET /public HTTP/1.1\r\nHost: allowed.test:1\r\n",
    "host-header-subdomain": "GET /public HTTP/1.1\r\nHost: api.allowed.test:{port}\r\n",
    "host-header-userinfo": "GET /public HTTP/1.1\r\nHost: allowed.test@evil.test\r\n",
}


@pytest.mark.parametrize("head", list(HOST_TRICKS.values()), ids=list(HOST_TRICKS))
def test_request_naming_another_host_inside_the_tunnel_is_refused(
    inspecting: ProxyProcess, upstreams: Upstreams, head: str
) -> None:
    before = len(upstreams.https.hits), len(upstreams.http.hits), len(upstreams.canary.hits)
    request = (head.format(port=upstreams.https.port) + "Connection: close\r\n\r\n").encode()
    reply = _raw(inspecting, upstreams.https.port, request)
    assert reply.status == 403, reply
    assert reply.headers.get("x-egress-warden-reason") == MISMATCH, reply
    after = len(upstreams.https.hits), len(upstreams.http.hits), len(upstreams.canary.hits)
    assert after == before


def test_second_host_header_naming_another_host_is_refused(
    inspecting: ProxyProcess, upstreams: Upstreams
) -> None:
    # The proxy must not check one Host header while the server reads the other.
    port = upstreams.https.port
    before = len(upstreams.https.hits)
    for first, second in (("allowed.test", "evil.test"), ("evil.test", "allowed.test")):
        request = get_request("/public", f"{first}:{port}", f"Host: {second}:{port}")
        reply = _raw(inspecting, port, request)
        assert 400 <= reply.status < 500, reply
    assert upstreams.https.hits[before:] == []


def test_absolute_form_naming_the_tunnel_host_is_decided_on_its_path(
    inspecting: ProxyProcess, upstreams: Upstreams
) -> None:
    port = upstreams.https.port
    before = len(upstreams.https.hits)
    denied = _raw(
        inspecting,
        port,
        f"GET https://allowed.test:{port}/secret HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert (denied.status, denied.headers.get("x-egress-warden-reason")) == (403, DENY_RULE)
    assert upstreams.https.hits[before:] == []
    allowed = _raw(
        inspecting,
        port,
        f"GET https://allowed.test:{port}/public HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert allowed.status == 200, allowed
    # mitmproxy forwards the target in the form it came in (origin servers accept both).
    [hit] = upstreams.https.hits[before:]
    assert hit.path in ("/public", f"https://allowed.test:{port}/public")


def test_client_sni_does_not_choose_the_upstream_server_name(
    inspecting: ProxyProcess, recorder: TlsRecorder
) -> None:
    # The client's TLS ends at the proxy; the proxy's own TLS to the upstream must name the
    # CONNECT target, whatever server name the client put in its ClientHello.
    since = len(recorder.arrivals)
    context = _inspected_tls(inspecting)
    context.check_hostname = False
    target = f"allowed.test:{recorder.port}"
    with tls_tunnel(inspecting.proxy_port, target, context, "evil.test") as tls:
        reply = exchange(tls, get_request("/public", target))
    assert reply.status == 200, reply
    arrivals = [a for a in recorder.wait_closed(since) if a.hello_seen]
    assert arrivals and {a.sni for a in arrivals} == {"allowed.test"}, arrivals
