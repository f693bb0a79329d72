"""Host patterns and the host matcher: parse rule patterns, find the most specific matching rule.

Lookup cost does not depend on the number of rules: host-name rules live in a trie keyed by
labels right to left (TLD first), IP/CIDR rules in one dict per prefix length.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum

import idna

from proxy.hosts import Host, IPAddress
from proxy.netguard import embedded_ipv4
from proxy.policy.model import Rule

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAX_NAME = 253
_MAX_LABEL = 63
_LABEL_CHARS = re.compile(r"[a-z0-9_*-]+")
# Alternative full stops that UTS #46 maps to '.'; split on them like a browser would.
_IDN_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_WHITESPACE = re.compile(r"\s")
_IPV4ISH = re.compile(r"[0-9./]+")
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")


class PatternKind(IntEnum):
    """What a pattern matches; the value is its specificity rank (higher wins)."""

    APEX_WILDCARD = 0  # **.example.org: the apex and every subdomain
    WILDCARD = 1  # *.example.org: one or more labels below, not the apex
    GLOB = 2  # ec2.*.amazonaws.com / api-*.example.com: '*' within one label
    EXACT = 3  # github.com
    ADDRESS = 4  # 10.0.0.5, 10.20.0.0/16, [::1]:8443


@dataclass(frozen=True, slots=True)
class ParsedPattern:
    """A validated pattern in canonical form."""

    text: str  # canonical spelling (lower-case, punycode, no trailing dot; ports kept)
    kind: PatternKind
    labels: tuple[str, ...]  # host labels right to left, without the leading '*'/'**'
    port: int | None
    network: IPNetwork | None = None  # set iff kind is ADDRESS


def _invalid(text: str, reason: str) -> ValueError:
    return ValueError(f"invalid pattern {text!r}: {reason}")


def _parse_port(text: str, port: str) -> int:
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _invalid(text, f"port {port!r} must be a number from 1 to 65535")
    return int(port)


def parse_pattern(text: str) -> ParsedPattern:
    """Parse and canonicalise one allow/deny pattern; raise ValueError saying what is wrong."""
    if not text:
        raise _invalid(text, "empty pattern")
    if _WHITESPACE.search(text):
        raise _invalid(text, "whitespace is not allowed in a pattern")
    lowered = text.lower()
    if lowered.startswith("["):
        return _parse_bracketed_ipv6(text, lowered)
    if lowered.count(":") >= 2:
        return _parse_address(text, lowered, None)
    host, sep, port_text = lowered.partition(":")
    port = _parse_port(text, port_text) if sep else None
    if "/" in host or _IPV4ISH.fullmatch(host):
        return _parse_address(text, host, port)
    return _parse_host_pattern(text, host, port)


def _parse_bracketed_ipv6(text: str, lowered: str) -> ParsedPattern:
    addr, sep, rest = lowered[1:].partition("]")
    if not sep:
        raise _invalid(text, "missing ']' after the IPv6 address")
    port: int | None = None
    if rest:
        if not rest.startswith(":"):
            raise _invalid(text, "expected ':PORT' after ']'")
        port = _parse_port(text, rest[1:])
    if "/" in addr:
        raise _invalid(text, "write an IPv6 CIDR without brackets, e.g. 2001:db8::/32")
    return _parse_address(text, addr, port)


def _parse_address(text: str, addr: str, port: int | None) -> ParsedPattern:
    if "%" in addr:
        raise _invalid(text, "IPv6 zone ids ('%...') are not allowed")
    try:
        network = ipaddress.ip_network(addr, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            fixed = ipaddress.ip_network(addr, strict=False)
            raise _invalid(
                text, f"CIDR {addr!r} has host bits set (did you mean {fixed}?)"
            ) from None
        hint = " (for IPv6 with a port write [ADDR]:PORT)" if addr.count(":") >= 2 else ""
        raise _invalid(text, f"not a valid IP address or CIDR{hint}") from None
    single = network.prefixlen == network.max_prefixlen
    if port is not None and not single:
        raise _invalid(text, "a port may only follow a single address, not a CIDR")
    if single:
        canonical = str(network.network_address)
        if network.version == 6 and port is not None:
            canonical = f"[{canonical}]"
    else:
        canonical = str(network)
    if port is not None:
        canonical = f"{canonical}:{port}"
    return ParsedPattern(canonical, PatternKind.ADDRESS, (), port, network)


def _parse_host_pattern(text: str, host: str, port: int | None) -> ParsedPattern:
    if not host.isascii():
        host = host.translate(_IDN_DOTS)
    name = host.removesuffix(".")
    if not name:
        raise _invalid(text, "empty host")
    labels = name.split(".")
    if "" in labels:
        raise _invalid(text, "empty label (two dots in a row, or a leading dot)")
    kind = PatternKind.EXACT
    if labels[0] == "**":
        kind, labels = PatternKind.APEX_WILDCARD, labels[1:]
    elif labels[0] == "*":
        kind, labels = PatternKind.WILDCARD, labels[1:]
    if not labels:
        raise _invalid(text, "a bare wildcard matches every host; use 'default: allow' instead")
    canonical_labels: list[str] = []
    has_glob = False
    for label in labels:
        if "**" in label:
            if label == "**":
                raise _invalid(text, "'**' is only allowed as the whole leftmost label")
            raise _invalid(text, f"invalid wildcard {label!r}: at most one '*' per label")
        if label.count("*") > 1:
            raise _invalid(text, f"label {label!r} has more than one '*': at most one per label")
        if "*" in label:
            has_glob = True
            if not label.isascii():
                raise _invalid(text, f"label {label!r} mixes '*' with non-ASCII characters")
        elif not label.isascii():
            try:
                label = idna.encode(label, uts46=True).decode("ascii")
            except idna.IDNAError as exc:
                raise _invalid(text, f"invalid internationalised label {label!r}: {exc}") from None
        if len(label) > _MAX_LABEL:
            raise _invalid(text, f"label {label[:20]!r}... is longer than {_MAX_LABEL} characters")
        if not _LABEL_CHARS.fullmatch(label):
            raise _invalid(text, f"label {label!r} has characters not allowed in a host name")
        canonical_labels.append(label)
    if _NUMERIC_LABEL.fullmatch(canonical_labels[-1]):
        # 'a.1' or '0x7f.1' is an IP literal to a URL parser, never a name: refuse the ambiguity.
        raise _invalid(text, "looks like an IP address; write it as dotted-decimal IPv4 or a CIDR")
    if kind is not PatternKind.EXACT or has_glob:
        fixed_suffix = 0
        for label in reversed(canonical_labels):
            if "*" in label:
                break
            fixed_suffix += 1
        if fixed_suffix < 2:
            raise _invalid(text, "a wildcard needs at least two fixed labels to its right")
        if kind is PatternKind.EXACT:
            kind = PatternKind.GLOB
    joined = ".".join(canonical_labels)
    prefix = {PatternKind.APEX_WILDCARD: "**.", PatternKind.WILDCARD: "*."}.get(kind, "")
    canonical = prefix + joined
    if len(joined) > _MAX_NAME:
        raise _invalid(text, f"host is longer than {_MAX_NAME} characters")
    if port is not None:
        canonical = f"{canonical}:{port}"
    return ParsedPattern(canonical, kind, tuple(reversed(canonical_labels)), port)


@dataclass(frozen=True, slots=True)
class _Entry:
    """A rule stored in the index, with what decides between overlapping matches."""

    rule: Rule
    kind: PatternKind
    depth: int  # labels (or prefix bits) the pattern fixes: deeper is more specific
    order: int  # insertion order: the first of equally specific rules wins

    def score(self) -> tuple[int, int, int, int]:
        return (self.rule.port is not None, self.kind, self.depth, -self.order)


# The rules of one pattern, by port (None = any allowed port). Most patterns appear once,
# so a bucket of one rule is the entry itself: a dict per rule was a quarter of the memory of
# a 100,000-rule policy.
_Bucket = _Entry | dict[int | None, _Entry]


class _Node:
    """One trie node: the rules that end here, and the children one label further left."""

    __slots__ = ("children", "dstar", "globs", "star", "terminal")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.globs: list[tuple[str, str, _Node]] | None = None  # (prefix, suffix, child)
        self.terminal: _Bucket | None = None  # exact and in-label glob rules ending here
        self.star: _Bucket | None = None  # '*.' rules: strictly below this node
        self.dstar: _Bucket | None = None  # '**.' rules: this node and below

    def child(self, label: str) -> _Node:
        if "*" not in label:
            node = self.children.get(label)
            if node is None:
                node = self.children[label] = _Node()
            return node
        prefix, _, suffix = label.partition("*")
        if self.globs is None:
            self.globs = []
        for p, s, node in self.globs:
            if p == prefix and s == suffix:
                return node
        node = _Node()
        self.globs.append((prefix, suffix, node))
        return node


def _put(bucket: _Bucket | None, entry: _Entry) -> _Bucket:
    if bucket is None:
        return entry
    if isinstance(bucket, _Entry):
        if bucket.rule.port == entry.rule.port:
            return bucket  # the first duplicate keeps its source line
        bucket = {bucket.rule.port: bucket}
    bucket.setdefault(entry.rule.port, entry)
    return bucket


def _entry_for(bucket: _Bucket, port: int | None) -> _Entry | None:
    """The bucket's rule for `port`, else its port-less rule; for no port, any of its rules
    (the port-less one first)."""
    if isinstance(bucket, _Entry):
        rule_port = bucket.rule.port
        return bucket if port is None or rule_port is None or rule_port == port else None
    if port is None:
        return bucket.get(None) or next(iter(bucket.values()))
    return bucket.get(port) or bucket.get(None)


def _pick(bucket: _Bucket | None, port: int, best: _Entry | None) -> _Entry | None:
    if bucket is None:
        return best
    entry = _entry_for(bucket, port)
    if entry is None:
        return best
    if best is None or entry.score() > best.score():
        return entry
    return best


def _v4_in_v6_score(entry: _Entry) -> tuple[int, int, int, int]:
    """`entry.score()` of an IPv4 rule, comparable with IPv6 rules' scores: specificity is
    counted in host bits left open, so an IPv4 /32 names a destination as fully as a /128."""
    port_named, kind, depth, order = entry.score()
    return (port_named, kind, depth + 96, order)


class RuleSet:
    """An immutable index of rules; `match` returns the most specific rule for a host and port."""

    __slots__ = ("_nets", "_root", "_rules")

    def __init__(self) -> None:
        self._root = _Node()
        # IP version -> [(prefix length, {network int >> host bits: bucket})], longest first
        self._nets: dict[int, list[tuple[int, dict[int, _Bucket]]]] = {}
        self._rules: tuple[Rule, ...] = ()

    @classmethod
    def build(cls, rules: Iterable[Rule]) -> RuleSet:
        """Index `rules`; raise ValueError if a pattern is invalid."""
        return cls.from_parsed((rule, parse_pattern(rule.pattern)) for rule in rules)

    @classmethod
    def from_parsed(cls, pairs: Iterable[tuple[Rule, ParsedPattern]]) -> RuleSet:
        """Index rules whose patterns the caller already parsed (saves parsing twice on load)."""
        ruleset = cls()
        rules: list[Rule] = []
        nets: dict[int, dict[int, dict[int, _Bucket]]] = {}
        for order, (rule, parsed) in enumerate(pairs):
            rules.append(rule)
            if parsed.network is not None:
                net = parsed.network
                plen = net.prefixlen
                entry = _Entry(rule, PatternKind.ADDRESS, plen, order)
                key = int(net.network_address) >> (net.max_prefixlen - plen)
                table = nets.setdefault(net.version, {}).setdefault(plen, {})
                table[key] = _put(table.get(key), entry)
                continue
            node = ruleset._root
            for label in parsed.labels:
                node = node.child(label)
            entry = _Entry(rule, parsed.kind, len(parsed.labels), order)
            if parsed.kind is PatternKind.WILDCARD:
                node.star = _put(node.star, entry)
            elif parsed.kind is PatternKind.APEX_WILDCARD:
                node.dstar = _put(node.dstar, entry)
            else:
                node.terminal = _put(node.terminal, entry)
        ruleset._nets = {
            version: sorted(tables.items(), reverse=True) for version, tables in nets.items()
        }
        ruleset._rules = tuple(rules)
        return ruleset

    @classmethod
    def empty(cls) -> RuleSet:
        return cls()

    @property
    def rules(self) -> tuple[Rule, ...]:
        """All rules in the order given to `build`."""
        return self._rules

    def __len__(self) -> int:
        return len(self._rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self._rules)

    def __repr__(self) -> str:
        return f"RuleSet({len(self._rules)} rules)"

    def match(self, host: Host, port: int) -> Rule | None:
        """The most specific rule matching `host` on `port`, or None.

        A rule with a port matches only that port. Preference: port-specific, then exact, then
        in-label glob, then '*.', then '**.'; among equals the one fixing more labels, then the
        first given. IP-literal hosts match only IP/CIDR rules, names only name rules.
        """
        if host.ip is not None:
            entry = self._match_ip(host.ip, port)
            return None if entry is None else entry.rule
        labels = host.labels
        n = len(labels)
        best: _Entry | None = None
        # Depth-first over the trie; only in-label globs make it branch.
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if node.dstar is not None:
                best = _pick(node.dstar, port, best)
            if i == n:
                if node.terminal is not None:
                    best = _pick(node.terminal, port, best)
                continue
            if node.star is not None:
                best = _pick(node.star, port, best)
            label = labels[i]
            child = node.children.get(label)
            if child is not None:
                stack.append((child, i + 1))
            if node.globs is not None:
                for prefix, suffix, glob_child in node.globs:
                    if (
                        len(label) >= len(prefix) + len(suffix)
                        and label.startswith(prefix)
                        and label.endswith(suffix)
                    ):
                        stack.append((glob_child, i + 1))
        return None if best is None else best.rule

    def match_address(self, ip: IPAddress, port: int | None = None) -> Rule | None:
        """The IP/CIDR rule with the longest prefix containing `ip`, or None.

        An IPv6 address that embeds an IPv4 (mapped, SIIT, NAT64, 6to4, Teredo, compatible; see
        `netguard.embedded_ipv4`) is also matched by the IPv4 rules containing that IPv4.

        With `port`, rules naming another port are skipped; without it, port-specific rules
        count too (check `rule.port` before relying on the result for a given connection).
        """
        entry = self._match_ip(ip, port)
        return None if entry is None else entry.rule

    def _match_ip(self, ip: IPAddress, port: int | None) -> _Entry | None:
        best = self._lookup_ip(ip, port)
        if isinstance(ip, ipaddress.IPv6Address) and 4 in self._nets:
            inner = embedded_ipv4(ip)
            if inner is not None:
                # A translator or tunnel delivers [64:ff9b::a.b.c.d], [2002:a.b.c.d::],
                # [::a.b.c.d], [::ffff:0:a.b.c.d]... to a.b.c.d: IPv4 rules must see it, or
                # `deny: [a.b.c.0/24]` is bypassed by respelling the address. One more lookup,
                # still one dict probe per prefix length.
                found = self._lookup_ip(inner, port)
                if found is not None and (best is None or _v4_in_v6_score(found) > best.score()):
                    best = found
        return best

    def _lookup_ip(self, ip: IPAddress, port: int | None) -> _Entry | None:
        tables = self._nets.get(ip.version)
        if tables is None:
            return None
        value = int(ip)
        bits = ip.max_prefixlen
        for plen, table in tables:
            bucket = table.get(value >> (bits - plen))
            if bucket is None:
                continue
            entry = _entry_for(bucket, port)
            if entry is not None:
                # Longest prefix first, and ports only exist on full-length prefixes, so the
                # first hit is the most specific.
                return entry
        return None
