"""Unit tests for proxy.netguard: which destination addresses are blocked, and why."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.hosts import IPAddress
from proxy.netguard import AddressClass, Listener, NetGuard, classify, embedded_ipv4

A = AddressClass


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def v4(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def v6(text: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(text)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", A.LOOPBACK),
        ("127.255.255.254", A.LOOPBACK),
        ("::1", A.LOOPBACK),
        ("10.0.0.1", A.PRIVATE),
        ("172.16.0.1", A.PRIVATE),
        ("172.31.255.255", A.PRIVATE),
        ("192.168.1.1", A.PRIVATE),
        ("169.254.169.254", A.LINK_LOCAL),  # cloud metadata service
        ("169.254.0.1", A.LINK_LOCAL),
        ("fe80::1", A.LINK_LOCAL),
        ("febf:ffff::1", A.LINK_LOCAL),
        ("100.64.0.1", A.CGNAT),
        ("100.127.255.255", A.CGNAT),
        ("fd00::1", A.ULA),
        ("fc00::1", A.ULA),
        ("224.0.0.1", A.MULTICAST),
        ("239.255.255.250", A.MULTICAST),
        ("ff02::1", A.MULTICAST),
        ("0.0.0.0", A.UNSPECIFIED),
        ("0.1.2.3", A.UNSPECIFIED),
        ("::", A.UNSPECIFIED),
        ("240.0.0.1", A.RESERVED),
        ("255.255.255.255", A.RESERVED),
        ("192.0.0.8", A.RESERVED),
        ("198.18.0.1", A.RESERVED),
        ("198.19.255.255", A.RESERVED),
        ("fec0::1", A.RESERVED),
        ("100::1", A.RESERVED),
    ],
)
def test_special_purpose_addresses_have_their_class(address: str, expected: AddressClass) -> None:
    assert classify(ip(address)) is expected


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "2606:4700::1111",
        "2001:4860:4860::8888",
        "9.255.255.255",  # just below 10/8
        "11.0.0.0",  # just above 10/8
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "169.253.255.255",
        "169.255.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "192.0.1.0",
        "192.167.255.255",
        "192.169.0.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
        "1.0.0.0",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
        "100:0:0:1::",  # just past 100::/64
        "::ffff:0:808:808",  # SIIT form of a public IPv4
        "::ffff:0:cb00:7101",
    ],
)
def test_public_addresses_are_public(address: str) -> None:
    assert classify(ip(address)) is A.PUBLIC


@pytest.mark.parametrize(
    ("address", "inner"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::127.0.0.1", "127.0.0.1"),
        ("64:ff9b::7f00:1", "127.0.0.1"),
        ("64:ff9b:1::7f00:1", "127.0.0.1"),
        ("2002:7f00:1::", "127.0.0.1"),
        ("2002:7f00:1:1234::5", "127.0.0.1"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"),  # Teredo client ~0x80fffffe
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),  # RFC 4380 example
        ("::ffff:0:127.0.0.1", "127.0.0.1"),  # SIIT IPv4-translated (RFC 2765)
        ("::ffff:0:7f00:1", "127.0.0.1"),
        ("::ffff:0:cb00:7101", "203.0.113.1"),
        ("::ffff:0:0:1", "0.0.0.1"),
        ("::cb00:7101", "203.0.113.1"),  # IPv4-compatible
        ("64:ff9b::cb00:7101", "203.0.113.1"),
        ("2002:cb00:7101::", "203.0.113.1"),
    ],
)
def test_embedded_ipv4_is_found_in_every_translation_format(address: str, inner: str) -> None:
    assert embedded_ipv4(v6(address)) == v4(inner)


@pytest.mark.parametrize(
    "address",
    [
        "::",
        "::1",
        "2606:4700::1111",
        "fe80::1",
        # Neighbours of the ::ffff:0:0/96 (mapped) and ::ffff:0:0:0/96 (SIIT) prefixes.
        # ("::ffff:0:0:1" used to be listed here: it is the SIIT form of 0.0.0.1.)
        "::1:ffff:0:0:1",
        "::fffe:0:0:1",
        "::ffff:1:0:1",
        "0:0:0:1:ffff::1",
    ],
)
def test_addresses_without_an_embedding_have_no_embedded_ipv4(address: str) -> None:
    assert embedded_ipv4(v6(address)) is None


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("64:ff9b::7f00:1", A.LOOPBACK),  # NAT64
        ("64:ff9b:1::7f00:1", A.LOOPBACK),  # local-use NAT64
        ("2002:7f00:1::", A.LOOPBACK),  # 6to4
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", A.LOOPBACK),  # Teredo
        ("::ffff:127.0.0.1", A.LOOPBACK),  # IPv4-mapped
        ("::127.0.0.1", A.LOOPBACK),  # IPv4-compatible
        ("::ffff:169.254.169.254", A.LINK_LOCAL),
        ("64:ff9b::a9fe:a9fe", A.LINK_LOCAL),
        ("2002:a00:1::", A.PRIVATE),
        ("64:ff9b::6440:1", A.CGNAT),
        ("::ffff:0.0.0.0", A.UNSPECIFIED),
        ("::ffff:0:7f00:1", A.LOOPBACK),  # SIIT IPv4-translated
        ("::ffff:0:127.0.0.1", A.LOOPBACK),
        ("::ffff:0:a9fe:a9fe", A.LINK_LOCAL),
        ("::ffff:0:a00:1", A.PRIVATE),
        ("::ffff:0:c0a8:101", A.PRIVATE),
        ("::ffff:0:6440:1", A.CGNAT),
        ("::ffff:0:e000:1", A.MULTICAST),
        ("::ffff:0:0:0", A.UNSPECIFIED),
        ("::7f00:1", A.LOOPBACK),  # IPv4-compatible, hex spelling
        ("::a9fe:a9fe", A.LINK_LOCAL),
    ],
)
def test_ipv6_embeddings_of_blocked_ipv4_are_blocked_as_that_ipv4(
    address: str, expected: AddressClass
) -> None:
    assert classify(ip(address)) is expected


_BLOCKED_V4_NETS = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
]


@st.composite
def blocked_ipv4(draw: st.DrawFn) -> ipaddress.IPv4Address:
    net = ipaddress.IPv4Network(draw(st.sampled_from(_BLOCKED_V4_NETS)))
    return net[draw(st.integers(0, net.num_addresses - 1))]


def _embeddings(address: ipaddress.IPv4Address) -> list[ipaddress.IPv6Address]:
    value = int(address)
    return [
        v6(f"::ffff:{address}"),
        v6("64:ff9b::") + value,
        v6("64:ff9b:1::") + value,
        ipaddress.IPv6Address((0x2002 << 112) | (value << 80) | 1),
        ipaddress.IPv6Address((0x2001_0000 << 96) | (0x0102_0304 << 64) | (~value & 0xFFFFFFFF)),
    ]


def _more_embeddings(address: ipaddress.IPv4Address) -> list[ipaddress.IPv6Address]:
    """SIIT IPv4-translated and (for non-zero values) IPv4-compatible forms."""
    value = int(address)
    forms = [v6("::ffff:0:0:0") + value]
    if value > 1:  # ::0 and ::1 are the unspecified and loopback addresses, not embeddings
        forms.append(ipaddress.IPv6Address(value))
    return forms


@given(blocked_ipv4())
def test_siit_and_compatible_forms_do_not_smuggle_a_blocked_ipv4(
    address: ipaddress.IPv4Address,
) -> None:
    expected = classify(address)
    for embedded in _more_embeddings(address):
        assert embedded_ipv4(embedded) == address
        assert classify(embedded) is expected


@given(st.ip_addresses(v=4))
def test_siit_form_is_classified_like_its_ipv4(address: ipaddress.IPv4Address) -> None:
    siit = v6("::ffff:0:0:0") + int(address)
    assert embedded_ipv4(siit) == address
    assert classify(siit) is classify(address)


@given(blocked_ipv4())
def test_no_ipv6_translation_format_smuggles_a_blocked_ipv4(
    address: ipaddress.IPv4Address,
) -> None:
    expected = classify(address)
    assert expected is not A.PUBLIC
    for embedded in _embeddings(address):
        assert embedded_ipv4(embedded) == address
        assert classify(embedded) is expected


@given(st.ip_addresses(v=4))
def test_ipv4_class_matches_the_cidr_table(address: ipaddress.IPv4Address) -> None:
    blocked = any(address in ipaddress.IPv4Network(net) for net in _BLOCKED_V4_NETS)
    assert (classify(address) is not A.PUBLIC) == blocked


# --- SELF -------------------------------------------------------------------------------------


def test_own_listener_is_self_but_another_port_is_not() -> None:
    guard = NetGuard([Listener(v4("127.0.0.1"), 8080)])
    assert guard.classify(v4("127.0.0.1"), 8080) is A.SELF
    assert guard.classify(v4("127.0.0.1"), 8081) is A.LOOPBACK
    assert guard.classify(v4("127.0.0.2"), 8080) is A.LOOPBACK  # not bound there
    assert guard.classify(v4("8.8.8.8"), 8080) is A.PUBLIC


def test_wildcard_listener_is_self_on_any_loopback_or_local_address() -> None:
    guard = NetGuard([Listener(v4("0.0.0.0"), 3128)], local_addresses=[v4("10.1.2.3")])
    assert guard.classify(v4("127.0.0.2"), 3128) is A.SELF
    assert guard.classify(v4("127.0.0.1"), 3128) is A.SELF
    assert guard.classify(v4("10.1.2.3"), 3128) is A.SELF
    assert guard.classify(v4("0.0.0.0"), 3128) is A.SELF
    assert guard.classify(v6("::ffff:127.0.0.1"), 3128) is A.SELF
    assert guard.classify(v4("127.0.0.2"), 3129) is A.LOOPBACK
    assert guard.classify(v4("10.1.2.4"), 3128) is A.PRIVATE


def test_ipv6_wildcard_listener_is_self_on_ipv6_and_ipv4_loopback() -> None:
    guard = NetGuard([Listener(v6("::"), 3128)])
    assert guard.classify(v6("::1"), 3128) is A.SELF
    assert guard.classify(v4("127.0.0.1"), 3128) is A.SELF  # dual-stack socket
    assert guard.classify(v6("::1"), 443) is A.LOOPBACK


def test_listener_on_a_public_address_is_self_only_on_that_port() -> None:
    guard = NetGuard([Listener(v4("203.0.113.7"), 8080)])
    assert guard.classify(v4("203.0.113.7"), 8080) is A.SELF
    assert guard.classify(v4("203.0.113.7"), 443) is A.PUBLIC


def test_guard_without_listeners_is_plain_classification() -> None:
    guard = NetGuard([])
    assert guard.classify(v4("127.0.0.1"), 8080) is A.LOOPBACK
    assert guard.classify(v6("2606:4700::1111"), 443) is A.PUBLIC
