"""IPv6 spellings that carry an IPv4 inside (NAT64, 6to4, IPv4-compatible, SIIT) are judged by
that IPv4: an IPv4 deny rule denies them, and an embedded loopback is a private address.

No request here may leave the machine, even if the proxy regressed: the deny-rule proxy is asked
`POST /v1/check` first (the same decision code, no dialling) and a form is only sent through the
proxy once that says deny; the private-network proxy has `default: deny`, so a form the guard
missed would be refused `default_deny` without a socket being opened.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import ALLOWED_IP, Upstreams
from tests.support.clients import RawResponse, raw_request
from tests.support.control import TOKEN_ENV, api
from tests.support.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

DENIED_CIDR = "127.0.0.0/31"  # holds the canary (127.0.0.1), not the allowed upstream (.2)

# 127.0.0.1 spelled as IPv6 by each translation or tunnelling scheme.
EMBEDDED_CANARY = [
    pytest.param("[64:ff9b::7f00:1]", id="nat64"),
    pytest.param("[64:ff9b:1::7f00:1]", id="nat64-local"),
    pytest.param("[2002:7f00:1::]", id="6to4"),
    pytest.param("[2002:7f00:1:ffff::1]", id="6to4-subnet"),
    pytest.param("[::7f00:1]", id="compat"),
    pytest.param("[::127.0.0.1]", id="compat-dotted"),
    pytest.param("[::ffff:0:7f00:1]", id="siit"),
    pytest.param("[::ffff:0:127.0.0.1]", id="siit-dotted"),
]

EMBEDDED_LOOPBACK = [
    pytest.param("[::ffff:0:7f00:1]", id="siit"),
    pytest.param("[64:ff9b::7f00:1]", id="nat64"),
    pytest.param("[2002:7f00:1::]", id="6to4"),
    pytest.param("[::7f00:1]", id="compat"),
]


def _proxy(tmp: pytest.TempPathFactory, name: str, body: str) -> ProxyProcess:
    path = tmp.mktemp(name)
    policy = path / "policy.yaml"
    policy.write_text(body)
    return start_proxy(path / "state", [policy], env=TOKEN_ENV)


@pytest.fixture(scope="module")
def deny_proxy(
    upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """Only the deny rule can refuse anything: default allow, no private-network block."""
    ports = sorted({80, 443, upstreams.http.port, upstreams.canary.port})
    proc = _proxy(
        tmp_path_factory,
        "deny-forms",
        f"version: 1\ndefault: allow\ndeny: [{DENIED_CIDR}]\n"
        f"network: {{ports: {ports}, block_private: false}}\n",
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def private_proxy(
    upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    ports = sorted({80, 443, upstreams.canary.port})
    proc = _proxy(
        tmp_path_factory,
        "private-forms",
        f"version: 1\ndefault: deny\nnetwork: {{ports: {ports}, block_private: true}}\n",
    )
    yield proc
    proc.stop()


def _get(proxy: ProxyProcess, authority: str) -> RawResponse:
    return raw_request(
        proxy.proxy_port,
        f"GET http://{authority}/x HTTP/1.1\r\nHost: {authority}\r\n\r\n",
    )


def _connect(proxy: ProxyProcess, authority: str) -> RawResponse:
    return raw_request(
        proxy.proxy_port, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )


def _checked_deny(proxy: ProxyProcess, url: str) -> None:
    """Fail, without sending anything through the proxy, unless the policy denies `url`."""
    with api(proxy) as client:
        response = client.post("/v1/check", json={"url": url})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["decision"], body["reason"]) == ("deny", "deny_rule"), body
    assert body["rule"] == DENIED_CIDR


def test_deny_policy_lets_other_loopback_through(
    deny_proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    """Control: the policy itself is permissive, so a refusal below is the deny rule's doing."""
    before = len(upstreams.http.hits)
    response = _get(deny_proxy, f"{ALLOWED_IP}:{upstreams.http.port}")
    assert response.status == 200, response
    assert len(upstreams.http.hits) == before + 1


def test_plain_ipv4_in_the_denied_cidr_is_denied(
    deny_proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    before = len(upstreams.canary.hits)
    authority = f"127.0.0.1:{upstreams.canary.port}"
    _checked_deny(deny_proxy, f"http://{authority}/")
    response = _get(deny_proxy, authority)
    assert response.status == 403
    assert response.headers["x-egress-warden-reason"] == "deny_rule"
    assert len(upstreams.canary.hits) == before


@pytest.mark.parametrize("host", EMBEDDED_CANARY)
def test_ipv6_forms_of_a_denied_ipv4_are_denied_by_the_ipv4_rule(
    deny_proxy: ProxyProcess, upstreams: Upstreams, host: str
) -> None:
    before = len(upstreams.canary.hits)
    authority = f"{host}:{upstreams.canary.port}"
    _checked_deny(deny_proxy, f"http://{authority}/")
    for response in (_get(deny_proxy, authority), _connect(deny_proxy, authority)):
        assert response.status == 403, response
        assert response.headers["x-egress-warden-reason"] == "deny_rule"
        assert DENIED_CIDR in response.reason
    assert len(upstreams.canary.hits) == before


@pytest.mark.parametrize("host", EMBEDDED_LOOPBACK)
def test_ipv6_forms_of_loopback_are_private(
    private_proxy: ProxyProcess, upstreams: Upstreams, host: str
) -> None:
    before = len(upstreams.canary.hits)
    authority = f"{host}:{upstreams.canary.port}"
    for response in (_get(private_proxy, authority), _connect(private_proxy, authority)):
        assert response.status == 403, response
        # default_deny here would mean the network guard did not see the loopback inside
        assert response.headers["x-egress-warden-reason"] == "private_network"
        assert "destination_ip_prohibited" in response.headers["proxy-status"]
    assert len(upstreams.canary.hits) == before
