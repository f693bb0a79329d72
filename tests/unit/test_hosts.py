"""Unit tests for proxy.hosts: one canonical spelling per destination, bad hosts rejected."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.provisional import domains

from proxy.hosts import Host, InvalidHost, canonicalize_host, parse_ipv4_literal
from proxy.netguard import AddressClass, classify

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


# --- strategies -------------------------------------------------------------------------------


@st.composite
def ipv4_number_spelling(draw: st.DrawFn, value: int) -> str:
    """`value` spelled as inet_aton reads a part: decimal, octal (leading 0) or hex (0x/0X)."""
    style = draw(st.sampled_from(["dec", "oct", "hex"]))
    if style == "dec":
        return str(value)
    zeros = "0" * draw(st.integers(0, 3))
    if style == "oct":
        return "0" + zeros + format(value, "o")
    digits = format(value, "x")
    digits = "".join(c.upper() if draw(st.booleans()) else c for c in digits)
    return draw(st.sampled_from(["0x", "0X"])) + zeros + digits


@st.composite
def ipv4_spelling(draw: st.DrawFn, address: ipaddress.IPv4Address) -> str:
    """Any of the 1-4 part inet_aton spellings of `address`."""
    value = int(address)
    count = draw(st.integers(1, 4))
    octets = value.to_bytes(4, "big")
    parts = [*octets[: count - 1], int.from_bytes(octets[count - 1 :], "big")]
    return ".".join(draw(ipv4_number_spelling(part)) for part in parts)


# Hosts in many shapes, valid and invalid, for the idempotence property.
_HOST_ALPHABET = "abcxyzAZ0179._-:[]%üßÄΣ\uff11\uff0e。 \x00\tİ\u00ad"
any_host = st.one_of(
    domains(),
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
    st.ip_addresses(v=4).flatmap(ipv4_spelling),
    st.text(alphabet=_HOST_ALPHABET, min_size=1, max_size=30),
    st.from_regex(r"[a-z0-9_-]{1,10}(\.[a-zA-Z0-9_ü-]{1,10}){0,3}\.?", fullmatch=True),
)


# --- properties -------------------------------------------------------------------------------


@given(any_host)
@example("GitHub.COM.")
@example("bücher.example")
@example("::ffff:7f00:1")
@example("\uff11\uff12\uff17。\uff10。\uff10。\uff11")
@example("0x7f.1")
def test_canonicalising_twice_changes_nothing(raw: str) -> None:
    try:
        host = canonicalize_host(raw)
    except InvalidHost:
        assume(False)
        return
    assert canonicalize_host(host.name) == host


@given(ipv4_spelling(LOOPBACK))
@example("2130706433")
@example("0x7f.1")
@example("0177.0.0.1")
@example("127.1")
@example("127.0.1")
@example("0X7F.0x0.00.1")
def test_every_ipv4_spelling_of_loopback_is_loopback(raw: str) -> None:
    host = canonicalize_host(raw)
    assert host == Host("127.0.0.1", LOOPBACK)
    assert host.ip is not None
    assert classify(host.ip) is AddressClass.LOOPBACK


@given(st.ip_addresses(v=4).flatmap(lambda a: st.tuples(st.just(a), ipv4_spelling(a))))
def test_every_ipv4_spelling_canonicalises_to_dotted_decimal(
    case: tuple[ipaddress.IPv4Address, str],
) -> None:
    address, raw = case
    assert canonicalize_host(raw) == Host(str(address), address)


def _inet_aton(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


_ATON_ALPHABET = "0123456789.xabcdef"
# Random strings rarely parse, so also build strings out of plausible parts.
_aton_part = st.one_of(
    st.text(alphabet="0123456789", min_size=0, max_size=11),
    st.text(alphabet="0123456789abcdef", max_size=9).map(lambda s: "0x" + s),
    st.text(alphabet="01234567", max_size=12).map(lambda s: "0" + s),
    st.text(alphabet=_ATON_ALPHABET, max_size=6),
)
aton_candidates = st.one_of(
    st.text(alphabet=_ATON_ALPHABET, max_size=40),
    st.lists(_aton_part, min_size=1, max_size=5).map(".".join),
)


@given(aton_candidates)
@example("0x")
@example("08")
@example("4294967295")
@example("4294967296")
@example("1.16777215")
@example("1.16777216")
@example("1.2.3.")
@example(".1.2.3")
def test_ipv4_parser_agrees_exactly_with_inet_aton(text: str) -> None:
    assert parse_ipv4_literal(text) == _inet_aton(text)


@given(aton_candidates.filter(lambda s: not s.endswith(".")))
def test_canonicaliser_reads_inet_aton_literals_as_inet_aton_does(text: str) -> None:
    expected = _inet_aton(text)
    try:
        host = canonicalize_host(text)
    except InvalidHost:
        assert expected is None
        return
    assert host.ip == expected


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("GitHub.COM.", "github.com"),
        ("EXAMPLE.com", "example.com"),
        ("example.com.", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example.", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example"),
        ("faß.de", "xn--fa-hia.de"),  # non-transitional: ß is kept, not mapped to ss
        ("bücher。example", "xn--bcher-kva.example"),  # ideographic full stop is a dot
        ("a_b.example.com", "a_b.example.com"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("evil_.com", "evil_.com"),  # underscore outside the TLD is tolerated
        ("localhost", "localhost"),
        ("1e100.net", "1e100.net"),
        ("a-b.c0", "a-b.c0"),
    ],
)
def test_names_are_lower_cased_punycoded_and_lose_one_trailing_dot(
    raw: str, canonical: str
) -> None:
    assert canonicalize_host(raw) == Host(canonical)


def test_labels_are_listed_tld_first() -> None:
    assert canonicalize_host("a.b.example.com").labels == ("com", "example", "b", "a")
    assert canonicalize_host("127.0.0.1").labels == ()


def test_full_width_digits_spell_the_ip_they_look_like() -> None:
    full_width = "\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11"  # 127.0.0.1
    assert canonicalize_host(full_width) == Host("127.0.0.1", LOOPBACK)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ".",
        "..",
        "example.com..",
        "a..b",
        ".example.com",
        "exa mple.com",
        " example.com",
        "example.com ",
        "example.com\x00",
        "example.com\r\nHost: evil",
        "example.com\n",
        "exa\tmple.com",
        "ex\u3000ample.com",  # ideographic space
        "exam/ple.com",
        "example.com@evil",
        "example.com:80",
        "example.com:",
        "-example.com",
        "example-.com",
        "example.-com",
        "example.co_m",
        "example._com",
        "a" * 64 + ".com",
        "foo.123",
        "foo.0x1f",
        "1.2.3.999",
        "1.2.3.4.5",
        "256.1.1.1",
        "08.0.0.1",
        "0x",
        "xn--zz.example",  # not valid punycode
        "xn--abc-.example",
        "xn--ls8h.example",  # punycode of an emoji: not IDNA2008-valid
        "xn--bcher-kva-.example",
        "💩.example",
        "a\u200db.example",  # ZWJ outside its allowed context
        "\u00ad",  # a soft hyphen maps to nothing: empty host
    ],
)
def test_malformed_hosts_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidHost):
        canonicalize_host(raw)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("example.com\x00", "NUL"),
        ("example.com\r\n", "CR/LF"),
        ("exa mple.com", "whitespace"),
        ("example.com:80", "port"),
        ("[::1]:80", "port"),
        ("fe80::1%eth0", "zone"),
    ],
)
def test_rejections_say_why(raw: str, reason: str) -> None:
    with pytest.raises(InvalidHost, match=reason):
        canonicalize_host(raw)


def test_name_length_limits() -> None:
    label63 = "a" * 63
    assert canonicalize_host(label63 + ".com").name == label63 + ".com"
    name253 = ".".join(["a" * 62] * 4) + ".b"  # 4 * 62 + 3 dots + 2 = 253
    assert len(name253) == 253
    assert canonicalize_host(name253).name == name253
    assert canonicalize_host(name253 + ".").name == name253
    with pytest.raises(InvalidHost):
        canonicalize_host(name253 + "b")  # 254 characters


def test_very_long_input_is_rejected() -> None:
    with pytest.raises(InvalidHost):
        canonicalize_host("a." * 5000 + "com")


# --- IP literals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("[2606:4700:0000:0000:0000:0000:0000:1111]", "2606:4700::1111"),
        ("2606:4700::1111", "2606:4700::1111"),
        ("[FE80::1]", "fe80::1"),
        ("64:ff9b::7f00:1", "64:ff9b::7f00:1"),  # NAT64 stays IPv6; netguard looks inside
        ("2002:7f00:1::", "2002:7f00:1::"),
        ("::127.0.0.1", "::7f00:1"),  # IPv4-compatible stays IPv6
    ],
)
def test_ipv6_literals_canonicalise_to_compressed_text_without_brackets(
    raw: str, canonical: str
) -> None:
    host = canonicalize_host(raw)
    assert host.name == canonical
    assert host.ip == ipaddress.IPv6Address(canonical)


@pytest.mark.parametrize(
    "raw", ["::ffff:127.0.0.1", "[::ffff:127.0.0.1]", "::ffff:7f00:1", "[::FFFF:7F00:1]"]
)
def test_ipv4_mapped_ipv6_canonicalises_to_the_ipv4_address(raw: str) -> None:
    assert canonicalize_host(raw) == Host("127.0.0.1", LOOPBACK)


@pytest.mark.parametrize(
    "raw",
    [
        "fe80::1%eth0",
        "[fe80::1%eth0]",
        "[fe80::1%25eth0]",
        "::1%1",
        "[1.2.3.4]",
        "[example.com]",
        "[]",
        "[::1",
        "::1]",
        "[[::1]]",
        "[::1].",
        "::1.",
        ":::1",
        "1:2:3:4:5:6:7:8:9",
        "::ffff:127.1",
        "::1 ",
        "[ ::1]",
        "::1/128",
        "\uff3b::1\uff3d",  # full-width brackets: IPv6 literals are ASCII only
    ],
)
def test_bad_ipv6_literals_and_zone_ids_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidHost):
        canonicalize_host(raw)


def test_ipv4_literal_with_trailing_dot_is_the_ip() -> None:
    assert canonicalize_host("127.0.0.1.") == Host("127.0.0.1", LOOPBACK)


def test_ipv4_parser_rejects_what_glibc_would_accept_only_as_garbage() -> None:
    # glibc inet_aton accepts trailing whitespace and anything after it; we must not.
    assert _inet_aton("127.0.0.1 evil") == LOOPBACK
    assert parse_ipv4_literal("127.0.0.1 evil") is None
    assert parse_ipv4_literal("127.0.0.1\n") is None
    assert parse_ipv4_literal("+1") is None
    assert parse_ipv4_literal(" 1") is None


@given(st.one_of(st.text(max_size=40), any_host))
def test_arbitrary_text_either_canonicalises_or_raises_invalid_host(raw: str) -> None:
    try:
        host = canonicalize_host(raw)
    except InvalidHost:
        return
    assert host.name.isascii()
    assert host.name == host.name.lower()
