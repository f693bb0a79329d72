"""The bypass suite: every way we can think of to reach loopback, metadata, the proxy itself."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ALLOWED_IP, Upstreams, resolve_args, write_policy
from tests.support.clients import curl, raw_request
from tests.support.proxy import ProxyProcess, free_port, start_proxy

pytestmark = pytest.mark.e2e


def _get(proxy: ProxyProcess, url: str) -> httpx.Response:
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=10) as client:
        return client.get(url)


@pytest.mark.parametrize(
    "spelling",
    ["127.0.0.1", "2130706433", "0x7f.1", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]", "localhost"],
)
def test_loopback_spellings_are_denied_as_private(
    proxy: ProxyProcess, upstreams: Upstreams, spelling: str
) -> None:
    before = len(upstreams.canary.hits)
    response = raw_request(
        proxy.proxy_port,
        f"GET http://{spelling}:{upstreams.canary.port}/x HTTP/1.1\r\n"
        f"Host: {spelling}:{upstreams.canary.port}\r\n\r\n",
    )
    assert response.status == 403, response
    assert response.headers["x-egress-warden-reason"] == "private_network"
    assert "destination_ip_prohibited" in response.headers["proxy-status"]
    assert len(upstreams.canary.hits) == before


@pytest.mark.parametrize("spelling", ["127.0.0.1", "2130706433", "[::ffff:127.0.0.1]", "localhost"])
def test_loopback_spellings_are_denied_over_connect(
    proxy: ProxyProcess, upstreams: Upstreams, spelling: str
) -> None:
    target = f"{spelling}:{upstreams.canary.port}"
    response = raw_request(proxy.proxy_port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
    assert response.status == 403
    assert response.headers["x-egress-warden-reason"] == "private_network"


def test_name_resolving_to_loopback_without_cidr_exemption_is_denied(
    proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    before = len(upstreams.canary.hits)
    response = _get(proxy, f"http://loopname.test:{upstreams.canary.port}/")
    assert response.status_code == 403
    assert response.headers["x-egress-warden-reason"] == "private_network"
    assert len(upstreams.canary.hits) == before
    line = proxy.wait_decision(**{"server.address": "loopname.test"})
    assert line["network.peer.address"] == "127.0.0.1"


def test_cloud_metadata_address_is_denied(proxy: ProxyProcess) -> None:
    response = _get(proxy, "http://169.254.169.254/latest/meta-data/")
    assert response.status_code == 403
    assert response.headers["x-egress-warden-reason"] == "private_network"


def test_host_header_mismatch_is_denied(proxy: ProxyProcess, upstreams: Upstreams) -> None:
    before = len(upstreams.http.hits)
    response = raw_request(
        proxy.proxy_port,
        f"GET http://allowed.test:{upstreams.http.port}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    )
    assert response.status == 403
    assert response.headers["x-egress-warden-reason"] == "host_mismatch"
    assert len(upstreams.http.hits) == before


def test_userinfo_trick_is_decided_on_the_real_host(
    proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    before = len(upstreams.http.hits)
    # curl sends the request for evil.test (userinfo becomes an Authorization header).
    result = curl(
        "-x",
        proxy.url,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        f"http://allowed.test@evil.test:{upstreams.http.port}/",
    )
    assert result.stdout == "403"
    # A raw client putting userinfo in the request target is refused outright.
    raw = raw_request(
        proxy.proxy_port,
        f"GET http://allowed.test@evil.test:{upstreams.http.port}/ HTTP/1.1\r\n"
        f"Host: evil.test:{upstreams.http.port}\r\n\r\n",
    )
    assert raw.status in (400, 403)
    assert len(upstreams.http.hits) == before


def test_upper_case_and_trailing_dot_spellings_are_canonicalised(
    proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    allowed = _get(proxy, f"http://ALLOWED.Test.:{upstreams.http.port}/upper")
    assert allowed.status_code == 200
    denied = raw_request(
        proxy.proxy_port,
        f"CONNECT EVIL.TEST.:{upstreams.https.port} HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert denied.status == 403
    assert denied.headers["x-egress-warden-reason"] == "deny_rule"


def test_lookalike_host_is_not_the_allowed_one(proxy: ProxyProcess, upstreams: Upstreams) -> None:
    response = raw_request(
        proxy.proxy_port,
        f"CONNECT evilallowed.test:{upstreams.https.port} HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert response.status == 403
    assert response.headers["x-egress-warden-reason"] == "approval_pending"


def test_port_not_allowed_is_denied(proxy: ProxyProcess) -> None:
    response = raw_request(proxy.proxy_port, "CONNECT allowed.test:22 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response.status == 403
    assert response.headers["x-egress-warden-reason"] == "port"


def test_invalid_host_is_denied(proxy: ProxyProcess) -> None:
    response = raw_request(
        proxy.proxy_port, "CONNECT bad_host_.te_st:443 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert response.status in (400, 403)
    if response.status == 403:
        assert response.headers["x-egress-warden-reason"] == "invalid_host"


@pytest.fixture(scope="module")
def wide_open_proxy(
    upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A proxy whose policy exempts all of 127.0.0.0/8 and allows its own port."""
    tmp = tmp_path_factory.mktemp("wide")
    port = free_port()
    control = free_port()
    body = f"""\
version: 1
default: allow
allow:
  - 127.0.0.0/8
  - localhost
network:
  ports: [{port}, {control}, {upstreams.canary.port}]
"""
    policy = write_policy(tmp / "wide.yaml", upstreams, body=body)
    proc = start_proxy(
        tmp / "state",
        [policy],
        *resolve_args(),
        listen=f"127.0.0.1:{port}",
        control=f"127.0.0.1:{control}",
    )
    yield proc
    proc.stop()


def test_proxy_refuses_requests_to_itself_even_when_loopback_is_exempt(
    wide_open_proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    proxy = wide_open_proxy
    # the CIDR exemption does let the canary through: the proxy itself is still refused
    assert _get(proxy, f"http://127.0.0.1:{upstreams.canary.port}/ok").status_code == 200
    for port in (proxy.proxy_port, proxy.control_port):
        response = _get(proxy, f"http://127.0.0.1:{port}/healthz")
        assert response.status_code == 403, port
        assert response.headers["x-egress-warden-reason"] == "private_network"
        assert "proxy itself" in response.reason_phrase
        connect = raw_request(
            proxy.proxy_port, f"CONNECT localhost:{port} HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert connect.status == 403


def test_origin_form_request_to_the_proxy_is_refused(wide_open_proxy: ProxyProcess) -> None:
    proxy = wide_open_proxy
    response = raw_request(
        proxy.proxy_port, f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{proxy.control_port}\r\n\r\n"
    )
    assert response.status == 403
    response = raw_request(
        proxy.proxy_port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{proxy.proxy_port}\r\n\r\n"
    )
    assert response.status == 403


def test_ip_literal_in_allowed_cidr_is_allowed(proxy: ProxyProcess, upstreams: Upstreams) -> None:
    response = _get(proxy, f"http://{ALLOWED_IP}:{upstreams.http.port}/by-ip")
    assert response.status_code == 200
