"""Unit tests for what an allow grant may cover: networks reaching guarded addresses
(proxy.netguard.private_overlap and friends) and catch-all patterns (proxy.grant_rules)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.grant_rules import (
    allow_grant_too_broad,
    guarded_class,
    network_too_broad,
    wildcard_too_broad,
)
from proxy.netguard import (
    AddressClass,
    IPNetwork,
    classify,
    embedded_ipv4,
    embedded_ipv4_networks,
    private_overlap,
    private_witness,
)

A = AddressClass


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


# -- private_overlap: examples -------------------------------------------------------------


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ("0.0.0.0/0", A.UNSPECIFIED),
        ("127.0.0.0/8", A.LOOPBACK),
        ("127.0.0.1/32", A.LOOPBACK),
        ("169.254.169.254/32", A.LINK_LOCAL),
        ("10.0.0.0/8", A.PRIVATE),
        ("172.0.0.0/8", A.PRIVATE),  # public around it, 172.16.0.0/12 inside
        ("192.168.1.0/24", A.PRIVATE),
        ("100.64.0.0/10", A.CGNAT),
        ("126.255.255.255/32", None),
        ("128.0.0.0/8", None),  # the neighbour of loopback
        ("8.8.8.0/24", None),
        ("1.0.0.0/8", None),
        ("224.0.0.0/4", A.MULTICAST),
        ("255.255.255.255/32", A.RESERVED),
        ("::1/128", A.LOOPBACK),
        ("::/128", A.UNSPECIFIED),
        ("fe80::/10", A.LINK_LOCAL),
        ("fd00::/8", A.ULA),
        ("ff02::1/128", A.MULTICAST),
        ("::ffff:127.0.0.1/128", A.LOOPBACK),  # mapped
        ("::ffff:169.254.169.254/128", A.LINK_LOCAL),
        ("::ffff:0:7f00:1/128", A.LOOPBACK),  # SIIT
        ("::7f00:1/128", A.LOOPBACK),  # compatible
        ("64:ff9b::a9fe:a9fe/128", A.LINK_LOCAL),  # NAT64 to the metadata service
        ("64:ff9b:1::a00:1/128", A.PRIVATE),  # NAT64, local-use prefix
        ("2002:7f00:1::/48", A.LOOPBACK),  # 6to4
        ("2002:a9fe:a9fe::/48", A.LINK_LOCAL),
        ("2001:0:808:808:0:0:80ff:fffe/128", A.LOOPBACK),  # Teredo client 127.0.0.1 (inverted)
        ("2001:0:a00:1::f7f7:f7f7/128", A.PRIVATE),  # Teredo server 10.0.0.1
        ("::ffff:8.8.8.8/128", None),
        ("64:ff9b::808:808/128", None),
        ("2002:808:808::/48", None),
        ("2001:0:808:808:0:0:f7f7:f7f7/128", None),  # Teredo, both ends public
        ("2606:4700::/32", None),
        ("2a00:1450:4001::/48", None),
    ],
)
def test_private_overlap_examples(network: str, expected: AddressClass | None) -> None:
    assert private_overlap(net(network)) == expected


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ("::ffff:0:0/96", ["0.0.0.0/0"]),
        ("::ffff:7f00:0/120", ["127.0.0.0/24"]),
        ("2002:7f00::/24", ["127.0.0.0/8"]),
        ("2002:7f00:1::/48", ["127.0.0.1/32"]),
        ("2002:7f00:1:2::/64", ["127.0.0.1/32"]),
        ("2001:0:a00:1::/64", ["0.0.0.0/0", "10.0.0.1/32"]),  # Teredo: client, server
        ("2001:0:a00:1::ffff:ff00/120", ["0.0.0.0/24", "10.0.0.1/32"]),
        ("2606:4700::/32", []),
    ],
)
def test_embedded_ipv4_networks_examples(network: str, expected: list[str]) -> None:
    found = embedded_ipv4_networks(ipaddress.IPv6Network(network))
    assert [str(n) for n in found] == expected


# -- private_overlap: properties -----------------------------------------------------------

_V4_INTERESTING = [
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
    "8.8.8.0/24",
    "0.0.0.0/0",
]
_V6_PREFIXES = [
    "::/96",
    "::ffff:0:0/96",
    "::ffff:0:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "fe80::/10",
    "fc00::/7",
    "ff00::/8",
    "fec0::/10",
    "100::/64",
    "2606:4700::/32",
    "::/0",
]


@st.composite
def v4_addresses(draw: st.DrawFn) -> ipaddress.IPv4Address:
    around = ipaddress.IPv4Network(draw(st.sampled_from(_V4_INTERESTING)))
    offset = draw(st.integers(0, around.num_addresses - 1))
    return ipaddress.IPv4Address(int(around.network_address) + offset)


@st.composite
def v6_addresses(draw: st.DrawFn) -> ipaddress.IPv6Address:
    inner = int(draw(v4_addresses()))
    kind = draw(st.sampled_from(["prefix", "6to4", "teredo"]))
    noise = draw(st.integers(0, (1 << 128) - 1))
    if kind == "6to4":
        return ipaddress.IPv6Address((0x2002 << 112) | (inner << 80) | (noise & ((1 << 80) - 1)))
    if kind == "teredo":
        server = int(draw(v4_addresses()))
        flags_port = noise & ((1 << 32) - 1)
        client = ~inner & 0xFFFFFFFF
        value = (0x2001_0000 << 96) | (server << 64) | (flags_port << 32) | client
        return ipaddress.IPv6Address(value)
    prefix = ipaddress.IPv6Network(draw(st.sampled_from(_V6_PREFIXES)))
    host_bits = 128 - prefix.prefixlen
    low = noise & ((1 << host_bits) - 1)
    if host_bits >= 32 and draw(st.booleans()):
        low = (low & ~0xFFFFFFFF) | inner  # an IPv4 where the /96 forms carry it
    return ipaddress.IPv6Address(int(prefix.network_address) | low)


addresses = st.one_of(v4_addresses(), v6_addresses())


@st.composite
def networks_around(
    draw: st.DrawFn,
) -> tuple[IPNetwork, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    address = draw(addresses)
    prefix = draw(st.integers(0, address.max_prefixlen))
    return ipaddress.ip_network((address, prefix), strict=False), address


@settings(max_examples=800)
@given(networks_around())
@example((net("::ffff:127.0.0.1/128"), ipaddress.ip_address("::ffff:127.0.0.1")))
@example((net("2001::/32"), ipaddress.ip_address("2001:0:a00:1::f7f7:f7f7")))
def test_a_network_holding_a_guarded_address_overlaps(
    case: tuple[IPNetwork, ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    network, address = case
    assert address in network
    if classify(address) is not A.PUBLIC:
        assert private_overlap(network) is not None


@settings(max_examples=800)
@given(networks_around())
def test_the_witness_is_a_guarded_address_inside_the_network(
    case: tuple[IPNetwork, ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    network, _ = case
    witness = private_witness(network)
    if witness is not None:
        assert witness in network
        assert classify(witness) is not A.PUBLIC
        assert private_overlap(network) == classify(witness)
    else:
        assert private_overlap(network) is None


@settings(max_examples=500)
@given(networks_around())
def test_embedded_ipv4_networks_hold_what_each_address_carries(
    case: tuple[IPNetwork, ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    network, address = case
    if not isinstance(network, ipaddress.IPv6Network):
        return
    assert isinstance(address, ipaddress.IPv6Address)
    inner = embedded_ipv4(address)
    if inner is not None:
        assert any(inner in carried for carried in embedded_ipv4_networks(network))


@given(st.integers(0, (1 << 32) - 1), st.integers(20, 32))
def test_ipv4_overlap_agrees_with_every_address(value: int, prefix: int) -> None:
    network = ipaddress.IPv4Network((value, prefix), strict=False)
    guarded = any(classify(a) is not A.PUBLIC for a in network)
    assert (private_overlap(network) is not None) == guarded


# -- breadth ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "*",
        "**",
        "*:443",
        "**.com",
        "*.com",
        "**.com.",
        "*.COM",
        "ec2.*.com",
        "api-*.io",
        "*.\uff43\uff4f\uff4d",  # fullwidth "com"
    ],
)
def test_catch_all_wildcards_are_too_broad(pattern: str) -> None:
    assert wildcard_too_broad(pattern) is not None
    assert allow_grant_too_broad(pattern) is not None


@pytest.mark.parametrize(
    "pattern",
    ["*.example.com", "**.example.org", "ec2.*.amazonaws.com", "github.com", "com", "10.0.0.0/8"],
)
def test_wildcards_under_a_registered_name_are_not_too_broad(pattern: str) -> None:
    assert wildcard_too_broad(pattern) is None


@pytest.mark.parametrize(
    "network",
    [
        "0.0.0.0/0",
        "0.0.0.0/1",
        "8.0.0.0/7",
        "::/0",
        "2000::/3",
        "2001:db8::/31",
        "::ffff:0:0/96",
        "::ffff:0:0/97",
        "64:ff9b::/96",
        "2002::/16",
        "2001::/32",
        "::/64",
    ],
)
def test_wide_networks_are_too_broad(network: str) -> None:
    assert network_too_broad(net(network)) is not None
    assert allow_grant_too_broad(network) is not None


@pytest.mark.parametrize(
    "network",
    [
        "1.0.0.0/8",
        "10.0.0.0/8",
        "127.0.0.1/32",
        "2001:db8::/32",
        "2606:4700::/32",
        "::ffff:a00:0/104",
        "2002:a00::/32",
        "64:ff9b::a00:0/104",
    ],
)
def test_networks_up_to_the_limit_are_not_too_broad(network: str) -> None:
    assert network_too_broad(net(network)) is None


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("[::ffff:127.0.0.1]", A.LOOPBACK),
        ("::ffff:127.0.0.1", A.LOOPBACK),
        ("[::ffff:127.0.0.1]:8080", A.LOOPBACK),
        ("169.254.169.254", A.LINK_LOCAL),
        ("169.254.169.254:80", A.LINK_LOCAL),
        ("10.0.0.0/8", A.PRIVATE),
        ("8.8.8.8", None),
        ("localhost", None),  # a name: the guard still runs on the address it resolves to
        ("*.internal.example", None),
    ],
)
def test_guarded_class_of_patterns(pattern: str, expected: AddressClass | None) -> None:
    assert guarded_class(pattern) == expected


def test_an_invalid_pattern_that_is_no_catch_all_is_left_to_parsing() -> None:
    assert allow_grant_too_broad("10.0.0.1/8") is None  # host bits set: invalid_pattern
    assert allow_grant_too_broad("exa mple.com") is None
