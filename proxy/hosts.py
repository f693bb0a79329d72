"""Host canonicalisation: one spelling per destination, IP literals parsed, bad hosts rejected."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_NAME_LENGTH = 253  # RFC 1035 limit on the dotted text form (no trailing dot)
MAX_LABEL_LENGTH = 63
# Far above any valid host; bounds the work done on hostile input before real checks.
_MAX_RAW_LENGTH = 1024


class InvalidHost(ValueError):
    """The host cannot be a destination (bad characters, too long, bad IDN, zone id...)."""


@dataclass(frozen=True, slots=True)
class Host:
    """A canonical destination host: a lower-case punycode name, or an IP address."""

    name: str  # canonical text: punycode name, dotted IPv4, or compressed IPv6 (no brackets)
    ip: IPAddress | None = None  # set iff the host is an IP literal

    @property
    def is_ip(self) -> bool:
        return self.ip is not None

    @property
    def labels(self) -> tuple[str, ...]:
        """Labels right to left (TLD first); empty for IP literals."""
        return () if self.ip is not None else tuple(reversed(self.name.split(".")))


# A whole valid lower-case ASCII name in one match (the hot path): LDH labels of 1-63 chars,
# no hyphen at either end; underscore tolerated except in the last label (real hosts such as
# `_dmarc.x` or `a_b.x` exist, but no TLD has one). Dots are outside the label class, so the
# pattern cannot backtrack badly.
_NAME_RE = re.compile(r"(?:(?!-)[a-z0-9_-]{1,63}(?<!-)\.)*(?!-)[a-z0-9-]{1,63}(?<!-)")
# WHATWG "ends in a number": such a name must be an IPv4 literal or nothing.
_NUMERIC_LABEL_RE = re.compile(r"[0-9]+|0x[0-9a-f]*")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")

_DEC_DIGITS = frozenset("0123456789")
_OCT_DIGITS = frozenset("01234567")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
# Largest value of the last part, by number of parts: a / a.b (24 bits) / a.b.c (16 bits) / a.b.c.d
_LAST_PART_MAX = (0xFFFFFFFF, 0xFFFFFF, 0xFFFF, 0xFF)


def _parse_ipv4_number(part: str) -> int | None:
    """One inet_aton part (strtoul base 0: 0x hex, leading-0 octal, else decimal), or None."""
    if not part or part[0] not in _DEC_DIGITS:
        return None  # glibc requires a digit first: no sign, no space, no empty part
    if part[0] == "0" and len(part) > 1:
        if part[1] in "xX":
            digits = part[2:]
            # "0x" with no hex digit: strtoul stops after the "0", leaving "x" as garbage.
            if not digits or not _HEX_DIGITS.issuperset(digits):
                return None
            value = int(digits, 16)
        else:
            if not _OCT_DIGITS.issuperset(part):
                return None  # "08": strtoul stops at the 8, which is then garbage
            value = int(part, 8)
    else:
        # No leading zero, so more than 10 digits is always > 32 bits; the cap also keeps
        # int() clear of its decimal-length limit.
        if len(part) > 10 or not _DEC_DIGITS.issuperset(part):
            return None
        value = int(part)
    return value if value <= 0xFFFFFFFF else None


def parse_ipv4_literal(text: str) -> ipaddress.IPv4Address | None:
    """Parse `text` exactly as glibc inet_aton does, minus its tolerance of trailing garbage.

    1 to 4 parts, each decimal, octal (leading 0) or hex (0x/0X); all parts but the last are
    one byte, the last fills the remaining bytes. Returns None if inet_aton would reject it.
    """
    parts = text.split(".")
    count = len(parts)
    if count > 4:
        return None
    values: list[int] = []
    for part in parts:
        value = _parse_ipv4_number(part)
        if value is None:
            return None
        values.append(value)
    if values[-1] > _LAST_PART_MAX[count - 1]:
        return None
    result = values[-1]
    for index, value in enumerate(values[:-1]):
        if value > 0xFF:
            return None
        result |= value << (24 - 8 * index)
    return ipaddress.IPv4Address(result)


def _explain(text: str) -> str:
    """A short reason why `text` (lower-case, trailing dot stripped) is not a valid name."""
    if "\x00" in text:
        return "host contains a NUL character"
    if "\r" in text or "\n" in text:
        return "host contains CR/LF"
    if any(ch.isspace() for ch in text):
        return "host contains whitespace"
    if ":" in text:
        return "host must not contain a port"
    for ch in text:
        if ch not in _NAME_CHARS:
            return f"host contains an invalid character {ch!r}"
    labels = text.split(".")
    for label in labels:
        if not label:
            return "host has an empty label"
        if len(label) > MAX_LABEL_LENGTH:
            return f"host label longer than {MAX_LABEL_LENGTH} characters"
        if label[0] == "-" or label[-1] == "-":
            return "host label starts or ends with a hyphen"
    if "_" in labels[-1]:
        return "host top-level label contains an underscore"
    return "invalid host"


def _check_alabels(text: str) -> None:
    """Reject `xn--` labels that are not the canonical punycode of a valid IDNA label."""
    for label in text.split("."):
        if not label.startswith("xn--"):
            continue
        try:
            valid = idna.alabel(idna.ulabel(label)).decode("ascii") == label
        except UnicodeError:  # idna.IDNAError and punycode errors both derive from it
            valid = False
        if not valid:
            raise InvalidHost(f"invalid punycode label {label!r}")


def _idn_to_ascii(raw: str) -> str:
    """UTS46-map a non-ASCII host (non-transitional, like browsers) and punycode its labels.

    Mapping runs on the whole text first so that full-width dots and digits become ASCII
    (full-width `127.0.0.1` must end up as the IP it spells). STD3 rules are off so that `_`
    survives; ASCII labels are then checked by the name rules, not by IDNA2008.
    """
    if "\x00" in raw or "\r" in raw or "\n" in raw or any(ch.isspace() for ch in raw):
        raise InvalidHost(_explain(raw))
    try:
        mapped = idna.uts46_remap(raw, std3_rules=False, transitional=False)
        labels = [
            label if label.isascii() else idna.alabel(label).decode("ascii")
            for label in mapped.split(".")
        ]
    except UnicodeError as exc:  # idna.IDNAError derives from UnicodeError
        raise InvalidHost(f"invalid internationalised host: {exc}") from None
    return ".".join(labels)


def _parse_ipv6(text: str, raw: str) -> Host:
    """Canonicalise an ASCII host that has a colon or brackets: it must be an IPv6 literal."""
    bracketed = text[0] == "["
    if bracketed:
        if text[-1] != "]" or len(text) < 3:
            if "]:" in text:
                raise InvalidHost("host must not contain a port")
            raise InvalidHost("unbalanced brackets in host")
        text = text[1:-1]
    if "%" in text:
        # A zone id names a local interface; ipaddress would accept and carry it along.
        raise InvalidHost("IPv6 zone ids are not allowed")
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        if bracketed:
            raise InvalidHost("bracketed host is not an IPv6 address") from None
        if text.count(":") == 1:
            raise InvalidHost("host must not contain a port") from None
        bad = _explain(raw.lower())
        if bad == "host must not contain a port":
            bad = "invalid IPv6 address"
        raise InvalidHost(bad) from None
    mapped = address.ipv4_mapped
    if mapped is not None:
        # ::ffff:a.b.c.d is dialled as IPv4; canonicalise so CIDR rules and netguard see it.
        return Host(str(mapped), mapped)
    return Host(str(address), address)


def canonicalize_host(raw: str) -> Host:
    """Return the canonical Host for `raw` or raise InvalidHost. Idempotent.

    `raw` is a bare host: the caller has already split off any port.
    """
    if not raw:
        raise InvalidHost("empty host")
    if len(raw) > _MAX_RAW_LENGTH:
        raise InvalidHost("host too long")
    if raw.isascii():
        text = raw.lower()
        if text[0] == "[" or ":" in text:
            return _parse_ipv6(text, raw)
    else:
        # IPv6 literals are ASCII only; a mapped colon or bracket fails the name rules below.
        text = _idn_to_ascii(raw)
        if not text:
            raise InvalidHost("empty host")  # everything mapped away (e.g. soft hyphens)
    if text[-1] == ".":
        text = text[:-1]  # one trailing dot names the same (fully qualified) host
        if not text or text[-1] == ".":
            raise InvalidHost("host has an empty label")
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidHost(f"host longer than {MAX_NAME_LENGTH} characters")
    if _NUMERIC_LABEL_RE.fullmatch(text.rpartition(".")[2]):
        # Like the WHATWG URL parser: a numeric last label means an IPv4 literal or nothing,
        # so `foo.123` or `1.2.3.999` can never reach a resolver that reads it differently.
        address = parse_ipv4_literal(text)
        if address is None:
            bad = _explain(text)
            if bad == "invalid host":
                bad = "host ends in a number but is not a valid IPv4 address"
            raise InvalidHost(bad)
        return Host(str(address), address)
    if _NAME_RE.fullmatch(text) is None:
        raise InvalidHost(_explain(text))
    if "xn--" in text:
        _check_alabels(text)
    return Host(text)
