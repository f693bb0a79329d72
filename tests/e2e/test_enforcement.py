"""End to end: the real proxy process, real clients (curl, httpx), real upstreams on loopback."""

from __future__ import annotations

import hashlib
import socket
import ssl
from pathlib import Path

import httpx
import pytest

from tests.conftest import Upstreams
from tests.support.clients import curl, raw_request
from tests.support.proxy import ProxyProcess

pytestmark = pytest.mark.e2e


def test_allowed_connect_is_a_plain_tunnel_with_the_upstream_certificate(
    proxy: ProxyProcess, upstreams: Upstreams, ca_file: Path
) -> None:
    # curl trusts only the test CA: it can only succeed if the proxy did not intercept TLS.
    result = curl(
        "-x",
        proxy.url,
        "--cacert",
        str(ca_file),
        "-w",
        "\n%{ssl_verify_result}",
        f"https://allowed.test:{upstreams.https.port}/tunnel-check",
    )
    assert result.returncode == 0, result.stderr
    assert "hello from upstream GET /tunnel-check" in result.stdout
    assert result.stdout.rstrip().endswith("0")
    line = proxy.wait_decision(**{"server.address": "allowed.test", "egress.decision": "allow"})
    assert line["network.transport.protocol"] == "https_connect"
    assert line["egress.reason"] == "allow_rule"
    assert line["egress.rule"] == "allowed.test"
    assert line["network.peer.address"] == "127.0.0.2"


def test_allowed_connect_via_httpx(
    proxy: ProxyProcess, upstreams: Upstreams, ca_file: Path
) -> None:
    with httpx.Client(
        proxy=proxy.url, verify=ssl.create_default_context(cafile=str(ca_file)), trust_env=False
    ) as client:
        response = client.get(f"https://api.allowed.test:{upstreams.https.port}/via-httpx")
    assert response.status_code == 200
    assert "GET /via-httpx" in response.text


def test_allowed_plain_http_reaches_upstream(proxy: ProxyProcess, upstreams: Upstreams) -> None:
    before = len(upstreams.http.hits)
    with httpx.Client(proxy=proxy.url, trust_env=False) as client:
        response = client.get(
            f"http://allowed.test:{upstreams.http.port}/plain",
            headers={"X-Egress-Warden-Agent": "spoof", "Proxy-Authorization": "Basic Zm9vOmJhcg=="},
        )
    assert response.status_code == 200
    hit = upstreams.http.hits[before]
    assert hit.path == "/plain"
    assert hit.headers["host"] == f"allowed.test:{upstreams.http.port}"
    assert "proxy-authorization" not in hit.headers
    assert not any(h.startswith("x-egress-warden-") for h in hit.headers)
    line = proxy.wait_decision(**{"url.path": "/plain"})
    assert line["egress.decision"] == "allow"
    assert line["network.transport.protocol"] == "http"
    assert line["http.request.method"] == "GET"


def test_denied_connect_gets_the_spec_403(proxy: ProxyProcess, upstreams: Upstreams) -> None:
    target = f"paste.pastebin.test:{upstreams.https.port}"
    response = raw_request(proxy.proxy_port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
    assert response.status == 403
    assert (
        response.reason == f"Blocked by egress policy: {target} denied by rule '**.pastebin.test'"
    )
    assert response.headers["x-egress-warden-reason"] == "deny_rule"
    assert response.headers["proxy-status"].startswith(
        "egress-warden; error=http_request_denied; details="
    )
    request_id = response.headers["x-egress-warden-request-id"]
    assert request_id
    # a deny rule is never offered an approval: the body says what can help instead
    assert b"A deny rule always wins" in b" ".join(response.body.split())
    assert b"approv" not in response.body.lower()
    line = proxy.wait_decision(**{"egress.request_id": request_id})
    assert line["egress.decision"] == "deny"
    assert line["egress.rule"] == "**.pastebin.test"
    assert line["egress.rule.source"].endswith("policy.yaml:11")
    assert line["level"] == "warning"


def test_denied_connect_via_curl_fails(
    proxy: ProxyProcess, upstreams: Upstreams, ca_file: Path
) -> None:
    result = curl(
        "-x",
        proxy.url,
        "--cacert",
        str(ca_file),
        "-w",
        "%{http_connect}",
        f"https://evil.test:{upstreams.https.port}/",
    )
    assert result.returncode != 0
    assert result.stdout.strip() == "403"


def test_denied_plain_http_gets_the_spec_403(proxy: ProxyProcess, upstreams: Upstreams) -> None:
    before = len(upstreams.http.hits)
    with httpx.Client(proxy=proxy.url, trust_env=False) as client:
        response = client.get(f"http://evil.test:{upstreams.http.port}/steal")
    assert response.status_code == 403
    assert response.reason_phrase.startswith("Blocked by egress policy: evil.test:")
    assert response.headers["x-egress-warden-reason"] == "deny_rule"
    assert "proxy-status" in response.headers
    assert len(upstreams.http.hits) == before


def test_unknown_destination_asks_and_answers_approval_pending(
    proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    target = f"unknown.test:{upstreams.https.port}"
    response = raw_request(proxy.proxy_port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
    assert response.status == 403
    assert response.headers["x-egress-warden-reason"] == "approval_pending"


def test_large_upload_through_allowed_tunnel_arrives_intact(
    proxy: ProxyProcess, upstreams: Upstreams, ca_file: Path, tmp_path: Path
) -> None:
    payload = tmp_path / "upload.bin"
    block = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB of non-repeating-ish bytes
    with payload.open("wb") as handle:
        for i in range(64):
            handle.write(block[i:] + block[:i])
    expected = hashlib.sha256(payload.read_bytes()).hexdigest()
    result = curl(
        "-x",
        proxy.url,
        "--cacert",
        str(ca_file),
        "--data-binary",
        f"@{payload}",
        "-H",
        "Content-Type: application/octet-stream",
        f"https://allowed.test:{upstreams.https.port}/upload",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"len={64 * 1024 * 1024} sha256={expected}" in result.stdout


def test_large_plain_http_upload_is_streamed_intact(
    proxy: ProxyProcess, upstreams: Upstreams, tmp_path: Path
) -> None:
    payload = tmp_path / "upload.bin"
    payload.write_bytes(b"y" * (8 * 1024 * 1024))
    expected = hashlib.sha256(payload.read_bytes()).hexdigest()
    result = curl(
        "-x",
        proxy.url,
        "--data-binary",
        f"@{payload}",
        f"http://allowed.test:{upstreams.http.port}/upload-plain",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"sha256={expected}" in result.stdout


def test_dns_failure_fails_closed_with_502(proxy: ProxyProcess) -> None:
    with httpx.Client(proxy=proxy.url, trust_env=False) as client:
        response = client.get("http://nowhere.allowed.test/")
    assert response.status_code == 502
    assert response.headers["x-egress-warden-reason"] == "dns_failure"


def test_a_client_connection_carries_at_most_one_connect(
    proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    # The addon keeps one tunnel record per client connection; that relies on mitmproxy
    # closing the connection after a refused CONNECT instead of reading another one.
    target = f"allowed.test:{upstreams.https.port}"
    with socket.create_connection((proxy.proxy_host, proxy.proxy_port), timeout=10) as sock:
        sock.sendall(b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        assert data.startswith(b"HTTP/1.1 403")
        try:
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            rest = sock.recv(65536)
            while chunk := sock.recv(65536):
                rest += chunk
        except ConnectionResetError:
            rest = b""
    assert b"HTTP/1.1 200" not in rest
