"""The host matcher: pattern grammar, specificity, ports, CIDRs."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.hosts import Host, canonicalize_host
from proxy.policy.match import PatternKind, RuleSet, parse_pattern
from proxy.policy.model import Action, Rule


def host(name: str) -> Host:
    """A canonical Host built directly (independent of the canonicaliser)."""
    try:
        ip = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return Host(name=name)
    return Host(name=str(ip), ip=ip)


def ruleset(*patterns: str) -> RuleSet:
    return RuleSet.build(
        Rule(p, Action.ALLOW, f"test:{i}", parse_pattern(p).port) for i, p in enumerate(patterns)
    )


def matched(rules: RuleSet, name: str, port: int = 443) -> str | None:
    rule = rules.match(host(name), port)
    return None if rule is None else rule.pattern


def test_exact_matches_only_itself() -> None:
    rules = ruleset("github.com")
    assert matched(rules, "github.com") == "github.com"
    assert matched(rules, "api.github.com") is None
    assert matched(rules, "evilgithub.com") is None
    assert matched(rules, "github.com.evil.net") is None


def test_wildcard_does_not_match_apex() -> None:
    rules = ruleset("*.githubusercontent.com")
    assert matched(rules, "githubusercontent.com") is None
    assert matched(rules, "raw.githubusercontent.com") == "*.githubusercontent.com"
    assert matched(rules, "a.b.c.githubusercontent.com") == "*.githubusercontent.com"


def test_double_star_matches_apex_and_deep_subdomains() -> None:
    rules = ruleset("**.example.org")
    assert matched(rules, "example.org") == "**.example.org"
    assert matched(rules, "www.example.org") == "**.example.org"
    assert matched(rules, "a.b.c.d.example.org") == "**.example.org"
    assert matched(rules, "example.org.evil.net") is None
    assert matched(rules, "notexample.org") is None


def test_lookalike_does_not_match_exact_or_wildcard() -> None:
    rules = ruleset("github.com", "*.github.com")
    assert matched(rules, "evilgithub.com") is None
    assert matched(rules, "evil-github.com") is None
    assert matched(rules, "github.com.attacker.io") is None


def test_in_label_glob_matches_within_one_label_only() -> None:
    rules = ruleset("ec2.*.amazonaws.com", "api-*.example.com")
    assert matched(rules, "ec2.us-east-1.amazonaws.com") == "ec2.*.amazonaws.com"
    assert matched(rules, "ec2.a.b.amazonaws.com") is None
    assert matched(rules, "ec2.amazonaws.com") is None
    assert matched(rules, "x.ec2.eu.amazonaws.com") is None
    assert matched(rules, "api-v2.example.com") == "api-*.example.com"
    assert matched(rules, "api-v2.x.example.com") is None
    assert matched(rules, "www.example.com") is None


def test_port_specific_rule_matches_only_its_port() -> None:
    rules = ruleset("api.example.com:8443", "*.example.net:8443")
    assert matched(rules, "api.example.com", 8443) == "api.example.com:8443"
    assert matched(rules, "api.example.com", 443) is None
    assert matched(rules, "x.example.net", 8443) == "*.example.net:8443"
    assert matched(rules, "x.example.net", 443) is None


def test_most_specific_rule_wins() -> None:
    rules = ruleset("**.example.com", "*.example.com", "api-*.example.com", "api-1.example.com")
    assert matched(rules, "api-1.example.com") == "api-1.example.com"
    assert matched(rules, "api-2.example.com") == "api-*.example.com"
    assert matched(rules, "www.example.com") == "*.example.com"
    assert matched(rules, "example.com") == "**.example.com"
    deeper = ruleset("**.example.com", "**.api.example.com")
    assert matched(deeper, "v1.api.example.com") == "**.api.example.com"
    ported = ruleset("api.example.com", "**.example.com:8443")
    assert matched(ported, "api.example.com", 8443) == "**.example.com:8443"
    assert matched(ported, "api.example.com", 443) == "api.example.com"


def test_first_of_equal_rules_wins() -> None:
    rules = RuleSet.build(
        [Rule("a.example", Action.ALLOW, "one"), Rule("A.example.", Action.ALLOW, "two")]
    )
    found = rules.match(host("a.example"), 443)
    assert found is not None and found.source == "one"
    assert len(rules) == 2


def test_cidr_and_address_rules() -> None:
    rules = ruleset("10.20.0.0/16", "10.20.5.0/24", "10.0.0.5:8080", "[::1]", "2001:db8::/32")
    assert matched(rules, "10.20.1.1") == "10.20.0.0/16"
    assert matched(rules, "10.20.5.9") == "10.20.5.0/24"
    assert matched(rules, "10.21.0.1") is None
    assert matched(rules, "10.0.0.5", 8080) == "10.0.0.5:8080"
    assert matched(rules, "10.0.0.5", 443) is None
    assert matched(rules, "::1") == "[::1]"
    assert matched(rules, "2001:db8:1::7") == "2001:db8::/32"
    assert matched(rules, "::ffff:10.20.1.1") == "10.20.0.0/16"


def test_match_address_longest_prefix_and_port() -> None:
    rules = ruleset("10.0.0.0/8", "10.1.0.0/16", "10.1.2.3:8080")
    addr = ipaddress.ip_address("10.1.2.3")
    found = rules.match_address(addr)
    assert found is not None and found.pattern == "10.1.2.3:8080"
    found = rules.match_address(addr, 443)
    assert found is not None and found.pattern == "10.1.0.0/16"
    assert rules.match_address(ipaddress.ip_address("192.168.0.1")) is None


def test_ip_literal_hosts_never_match_name_patterns() -> None:
    rules = ruleset("**.1.1.example", "localhost", "1-1-1-1.example.com")
    assert matched(rules, "127.0.0.1") is None
    assert matched(rules, "1.1.1.1") is None
    names = ruleset("10.0.0.0/8")
    assert matched(names, "ten.example.com") is None


@pytest.mark.parametrize(
    ("pattern", "canonical", "kind", "port"),
    [
        ("GitHub.COM.", "github.com", PatternKind.EXACT, None),
        ("*.Example.com:8443", "*.example.com:8443", PatternKind.WILDCARD, 8443),
        ("**.example.org", "**.example.org", PatternKind.APEX_WILDCARD, None),
        ("ec2.*.amazonaws.com", "ec2.*.amazonaws.com", PatternKind.GLOB, None),
        ("bücher.de", "xn--bcher-kva.de", PatternKind.EXACT, None),
        ("10.20.0.0/16", "10.20.0.0/16", PatternKind.ADDRESS, None),
        ("10.0.0.5:8080", "10.0.0.5:8080", PatternKind.ADDRESS, 8080),
        ("[::1]:8443", "[::1]:8443", PatternKind.ADDRESS, 8443),
        ("2001:DB8::/32", "2001:db8::/32", PatternKind.ADDRESS, None),
        ("localhost", "localhost", PatternKind.EXACT, None),
    ],
)
def test_pattern_canonical_form(
    pattern: str, canonical: str, kind: PatternKind, port: int | None
) -> None:
    parsed = parse_pattern(pattern)
    assert (parsed.text, parsed.kind, parsed.port) == (canonical, kind, port)


def test_idn_pattern_matches_punycode_host() -> None:
    assert matched(ruleset("**.bücher.de"), "shop.xn--bcher-kva.de") == "**.bücher.de"


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("*", "bare wildcard"),
        ("**", "bare wildcard"),
        ("*.com", "at least two fixed labels"),
        ("**.com", "at least two fixed labels"),
        ("example.*", "at least two fixed labels"),
        ("a.**.example.com", "whole leftmost label"),
        ("***.example.com", "at most one '*'"),
        ("a.*b*.c", "more than one '*'"),
        ("a..example.com", "empty label"),
        (".example.com", "empty label"),
        ("", "empty pattern"),
        ("exa mple.com", "whitespace"),
        (" example.com", "whitespace"),
        ("10.0.0.1/16", "host bits set"),
        ("10.0.0.0/33", "not a valid IP"),
        ("example.com:0", "port"),
        ("example.com:65536", "port"),
        ("example.com:http", "port"),
        ("10.0.0.0/8:443", "single address"),
        ("0x7f.1", "looks like an IP"),
        ("ex!ample.com", "characters not allowed"),
    ],
)
def test_invalid_patterns_are_rejected(pattern: str, reason: str) -> None:
    with pytest.raises(ValueError, match="invalid pattern") as info:
        parse_pattern(pattern)
    assert reason in str(info.value)


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
# The last label is alphabetic: a numeric or hex-looking one would read as an IP literal.
_tld = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=6)
_name = st.tuples(st.lists(_label, min_size=1, max_size=4), _tld).map(
    lambda parts: ".".join([*parts[0], parts[1]])
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_name, min_size=1, max_size=50, unique=True), st.sampled_from("ax0-"))
def test_exact_rules_match_their_hosts_and_no_prefixed_host(names: list[str], extra: str) -> None:
    rules = ruleset(*names)
    for name in names:
        assert matched(rules, name) == name
        prefixed = extra + name
        if prefixed not in names:
            assert matched(rules, prefixed) is None


@pytest.mark.parametrize(
    "name", ["bücher.de", "GitHub.COM.", "faß.de", "例え.テスト", "a_b.example.com"]
)
def test_exact_pattern_agrees_with_host_canonicaliser(name: str) -> None:
    canonical = canonicalize_host(name)
    assert parse_pattern(name).text == canonical.name
    assert ruleset(name).match(canonical, 443) is not None


@pytest.mark.parametrize("name", ["api.example.com", "10.1.2.3"])
def test_one_pattern_with_and_without_a_port_and_duplicates(name: str) -> None:
    # One pattern's rules share a bucket: a lone rule, then per port once a second port comes.
    alone = ruleset(f"{name}:8443")
    assert matched(alone, name, 8443) == f"{name}:8443"
    assert matched(alone, name, 443) is None
    rules = ruleset(f"{name}:8443", name, name, f"{name}:8443")
    assert matched(rules, name, 8443) == f"{name}:8443"
    assert matched(rules, name, 443) == name
    found = rules.match(host(name), 443)
    assert found is not None and found.source == "test:1"  # the first duplicate's line
    found = rules.match(host(name), 8443)
    assert found is not None and found.source == "test:0"
    if name[0].isdigit():
        address = ipaddress.ip_address(name)
        only_port = alone.match_address(address)
        assert only_port is not None and only_port.pattern == f"{name}:8443"
        assert alone.match_address(address, 443) is None
        either = rules.match_address(address)
        assert either is not None and either.pattern == name


# --- IPv4 rules see the IPv4 inside IPv6 translation forms ------------------------------------

_EMBEDDINGS_OF_203_0_113_1 = [
    "::ffff:203.0.113.1",  # IPv4-mapped
    "64:ff9b::cb00:7101",  # NAT64 well-known prefix
    "64:ff9b:1::cb00:7101",  # NAT64 local-use prefix
    "2002:cb00:7101::",  # 6to4
    "2002:cb00:7101:1234::5",
    "::cb00:7101",  # IPv4-compatible
    "::ffff:0:cb00:7101",  # SIIT IPv4-translated
    "2001:0:4136:e378:8000:63bf:34ff:8efe",  # Teredo (client address stored inverted)
]


@pytest.mark.parametrize("address", _EMBEDDINGS_OF_203_0_113_1)
def test_ipv4_cidr_rule_matches_the_ipv4_inside_ipv6_forms(address: str) -> None:
    rules = ruleset("203.0.113.0/24")
    assert matched(rules, address) == "203.0.113.0/24"
    found = rules.match_address(ipaddress.ip_address(address), 443)
    assert found is not None and found.pattern == "203.0.113.0/24"


@pytest.mark.parametrize("address", _EMBEDDINGS_OF_203_0_113_1)
def test_ipv4_address_rule_with_port_matches_ipv6_forms_on_that_port_only(address: str) -> None:
    rules = ruleset("203.0.113.1:8443")
    assert matched(rules, address, 8443) == "203.0.113.1:8443"
    assert matched(rules, address, 443) is None


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::cb00:7201",  # 203.0.114.1: outside the /24
        "2002:cb00:7201::",
        "::cb00:7201",
        "::ffff:0:cb00:7201",
        "2001:db8::cb00:7101",  # documentation prefix: no embedding
        "::1",
        "::",
        "64:ff9a::cb00:7101",  # one bit off the NAT64 prefix
        "::fffe:0:cb00:7101",  # one bit off the SIIT prefix
    ],
)
def test_ipv4_cidr_rule_does_not_match_other_ipv6_addresses(address: str) -> None:
    assert matched(ruleset("203.0.113.0/24"), address) is None


def test_ipv6_rule_and_embedded_ipv4_rule_most_specific_wins() -> None:
    rules = ruleset("64:ff9b::/96", "203.0.113.0/24", "203.0.113.1")
    # the IPv4 /32 names one destination; the IPv6 /96 covers every NAT64 address
    assert matched(rules, "64:ff9b::cb00:7101") == "203.0.113.1"
    assert matched(rules, "64:ff9b::cb00:7102") == "203.0.113.0/24"  # 8 bits open, the /96: 32
    assert matched(rules, "64:ff9b::cb00:7201") == "64:ff9b::/96"
    assert matched(rules, "::ffff:0:cb00:7102") == "203.0.113.0/24"
    exact = ruleset("203.0.113.0/24", "[64:ff9b::cb00:7101]")
    assert matched(exact, "64:ff9b::cb00:7101") == "[64:ff9b::cb00:7101]"


def test_ipv6_rules_alone_still_match_without_ipv4_rules() -> None:
    rules = ruleset("64:ff9b::/96")
    assert matched(rules, "64:ff9b::cb00:7101") == "64:ff9b::/96"
    assert matched(rules, "2002:cb00:7101::") is None


@settings(max_examples=200)
@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_every_embedding_matches_exactly_when_the_ipv4_does(
    address: ipaddress.IPv4Address, prefix: int
) -> None:
    net = ipaddress.IPv4Network(f"{address}/{prefix}", strict=False)
    other = ipaddress.IPv4Address(int(address) ^ 0x8000_0000)  # flip the top bit
    rules = ruleset(str(net) if prefix < 32 else str(address))
    for inner in (address, other):
        value = int(inner)
        forms = [
            ipaddress.IPv6Address(0xFFFF_0000_0000 | value),  # SIIT
            ipaddress.IPv6Address((0x0064_FF9B << 96) | value),  # NAT64
            ipaddress.IPv6Address((0x2002 << 112) | (value << 80)),  # 6to4
        ]
        if value > 1:
            forms.append(ipaddress.IPv6Address(value))  # IPv4-compatible
        expected = inner in net
        for form in forms:
            assert (rules.match_address(form, 443) is not None) == expected, form
