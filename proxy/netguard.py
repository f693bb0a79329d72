"""Address classification: which destination IPs may be dialled without an explicit exemption.

Pure and fast: ranges are precomputed as integers and looked up with bisect, because this runs
for every address a request resolves to.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from proxy.hosts import IPAddress


class AddressClass(StrEnum):
    """Kind of destination address; everything but PUBLIC is blocked unless exempted."""

    PUBLIC = "public"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    LINK_LOCAL = "link_local"
    CGNAT = "cgnat"
    ULA = "ula"
    MULTICAST = "multicast"
    UNSPECIFIED = "unspecified"
    RESERVED = "reserved"
    SELF = "self"  # one of the proxy's own listeners: dialling it would loop


def _v4_range(cidr: str) -> tuple[int, int]:
    network = ipaddress.IPv4Network(cidr)
    return int(network.network_address), int(network.broadcast_address)


# Disjoint IPv4 ranges, sorted by start (checked at import below).
_V4_TABLE: tuple[tuple[str, AddressClass], ...] = (
    ("0.0.0.0/8", AddressClass.UNSPECIFIED),  # "this network"; 0.0.0.0 reaches local listeners
    ("10.0.0.0/8", AddressClass.PRIVATE),
    ("100.64.0.0/10", AddressClass.CGNAT),
    ("127.0.0.0/8", AddressClass.LOOPBACK),
    ("169.254.0.0/16", AddressClass.LINK_LOCAL),  # includes cloud metadata 169.254.169.254
    ("172.16.0.0/12", AddressClass.PRIVATE),
    ("192.0.0.0/24", AddressClass.RESERVED),  # IETF protocol assignments
    ("192.168.0.0/16", AddressClass.PRIVATE),
    ("198.18.0.0/15", AddressClass.RESERVED),  # benchmarking
    ("224.0.0.0/4", AddressClass.MULTICAST),
    ("240.0.0.0/4", AddressClass.RESERVED),  # includes broadcast 255.255.255.255
)
_V4_RANGES = sorted((*_v4_range(cidr), cls) for cidr, cls in _V4_TABLE)
_V4_STARTS: tuple[int, ...] = tuple(start for start, _, _ in _V4_RANGES)
_V4_ENDS: tuple[int, ...] = tuple(end for _, end, _ in _V4_RANGES)
_V4_CLASSES: tuple[AddressClass, ...] = tuple(cls for _, _, cls in _V4_RANGES)
assert all(_V4_ENDS[i] < _V4_STARTS[i + 1] for i in range(len(_V4_STARTS) - 1))

_MASK32 = 0xFFFFFFFF
_V6_LOOPBACK = 1
_V6_MAPPED_PREFIX = 0xFFFF  # ::ffff:0:0/96, value of bits 0-95
_V6_SIIT_PREFIX = 0xFFFF_0000  # ::ffff:0:0:0/96, IPv4-translated (RFC 2765 SIIT), bits 0-95
_V6_NAT64_PREFIX = 0x0064_FF9B_0000_0000_0000_0000  # 64:ff9b::/96, bits 0-95
_V6_NAT64_LOCAL_PREFIX = 0x0064_FF9B_0001  # 64:ff9b:1::/48, bits 0-47
_V6_6TO4_PREFIX = 0x2002  # 2002::/16
_V6_TEREDO_PREFIX = 0x2001_0000  # 2001::/32
_V6_DISCARD_PREFIX = 0x0100_0000_0000_0000  # 100::/64, bits 0-63
_V6_LINK_LOCAL_PREFIX = 0xFE80 >> 6  # fe80::/10, bits 0-9
_V6_SITE_LOCAL_PREFIX = 0xFEC0 >> 6  # fec0::/10, bits 0-9
_V6_ULA_PREFIX = 0xFC >> 1  # fc00::/7, bits 0-6
_V6_MULTICAST_PREFIX = 0xFF  # ff00::/8, bits 0-7


def _classify_v4(value: int) -> AddressClass:
    index = bisect_right(_V4_STARTS, value) - 1
    if index >= 0 and value <= _V4_ENDS[index]:
        return _V4_CLASSES[index]
    return AddressClass.PUBLIC


def _embedded_v4_int(value: int) -> int | None:
    """The IPv4 address (as an int) an IPv6 address carries inside, if any."""
    high96 = value >> 32
    if high96 in (_V6_MAPPED_PREFIX, _V6_NAT64_PREFIX, _V6_SIIT_PREFIX):
        return value & _MASK32
    if high96 == 0:
        # IPv4-compatible ::a.b.c.d; :: and ::1 are the unspecified and loopback addresses.
        return value if value > _V6_LOOPBACK else None
    if value >> 80 == _V6_NAT64_LOCAL_PREFIX:
        return value & _MASK32  # the /96 layout, by far the common use of this prefix
    if value >> 112 == _V6_6TO4_PREFIX:
        return (value >> 80) & _MASK32
    if value >> 96 == _V6_TEREDO_PREFIX:
        return ~value & _MASK32  # the client address is stored inverted in the last 32 bits
    return None


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, IPv4-compatible, IPv4-translated (SIIT), NAT64,
    6to4 or Teredo address; None for any other IPv6 address."""
    embedded = _embedded_v4_int(int(ip))
    return None if embedded is None else ipaddress.IPv4Address(embedded)


def _classify_v6(value: int) -> AddressClass:
    if value == 0:
        return AddressClass.UNSPECIFIED
    if value == _V6_LOOPBACK:
        return AddressClass.LOOPBACK
    if value >> 120 == _V6_MULTICAST_PREFIX:
        return AddressClass.MULTICAST
    if value >> 121 == _V6_ULA_PREFIX:
        return AddressClass.ULA
    top10 = value >> 118
    if top10 == _V6_LINK_LOCAL_PREFIX:
        return AddressClass.LINK_LOCAL
    if top10 == _V6_SITE_LOCAL_PREFIX:
        return AddressClass.RESERVED
    if value >> 64 == _V6_DISCARD_PREFIX:
        return AddressClass.RESERVED
    embedded = _embedded_v4_int(value)
    if embedded is not None:
        # A translator or tunnel would deliver to the IPv4 inside: block what it would block.
        inner = _classify_v4(embedded)
        if inner is not AddressClass.PUBLIC:
            return inner
        if value >> 96 == _V6_TEREDO_PREFIX:
            # Teredo packets go via the server in bits 32-63; a non-public one is not real
            # Teredo, so treat it as suspect too.
            return _classify_v4((value >> 64) & _MASK32)
    return AddressClass.PUBLIC


def classify(ip: IPAddress) -> AddressClass:
    """Class of `ip`; PUBLIC means "may be dialled without an explicit exemption"."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _classify_v4(int(ip))
    return _classify_v6(int(ip))


@dataclass(frozen=True, slots=True)
class Listener:
    """An address the proxy itself listens on."""

    host: IPAddress
    port: int


def _unmap(ip: IPAddress) -> IPAddress:
    """::ffff:a.b.c.d is the same socket destination as a.b.c.d."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class NetGuard:
    """Classifies (ip, port) destinations, recognising the proxy's own listeners as SELF."""

    def __init__(
        self, own_listeners: Iterable[Listener], local_addresses: Iterable[IPAddress] = ()
    ) -> None:
        exact: set[tuple[IPAddress, int]] = set()
        wildcard_ports: set[int] = set()
        for listener in own_listeners:
            host = _unmap(listener.host)
            if host.is_unspecified:
                # 0.0.0.0 / :: accept on every local address; a dual-stack :: socket takes
                # IPv4 too, so do not split by family (over-matching only turns a block
                # into a clearer one).
                wildcard_ports.add(listener.port)
            else:
                exact.add((host, listener.port))
        self._exact = frozenset(exact)
        self._wildcard_ports = frozenset(wildcard_ports)
        self._local = frozenset(_unmap(address) for address in local_addresses)

    def _is_self(self, ip: IPAddress, port: int) -> bool:
        if (ip, port) in self._exact:
            return True
        if port in self._wildcard_ports:
            # Dialling 0.0.0.0 or :: connects to the local host on Linux.
            return ip.is_loopback or ip.is_unspecified or ip in self._local
        return False

    def classify(self, ip: IPAddress, port: int) -> AddressClass:
        """SELF if (ip, port) reaches one of the proxy's own listeners, else classify(ip)."""
        if (self._exact or self._wildcard_ports) and self._is_self(_unmap(ip), port):
            return AddressClass.SELF
        return classify(ip)


# -- networks: does a rule's CIDR reach anything the guard blocks? ---------------------------

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Non-public IPv6 ranges that carry no IPv4 address (start, end), as `_classify_v6` sees them.
_V6_PLAIN_RANGES: tuple[tuple[int, int], ...] = tuple(
    (int(n.network_address), int(n.broadcast_address))
    for n in map(
        ipaddress.IPv6Network,
        ("::/128", "::1/128", "100::/64", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8"),
    )
)

# IPv6 ranges that carry an IPv4 address: (start, end, bit shift of the IPv4 field, inverted).
_V6_IPV4_FIELDS: tuple[tuple[int, int, int, bool], ...] = tuple(
    (int(n.network_address), int(n.broadcast_address), shift, inverted)
    for n, shift, inverted in (
        (ipaddress.IPv6Network("::/96"), 0, False),  # IPv4-compatible
        (ipaddress.IPv6Network("::ffff:0:0/96"), 0, False),  # mapped
        (ipaddress.IPv6Network("::ffff:0:0:0/96"), 0, False),  # SIIT
        (ipaddress.IPv6Network("64:ff9b::/96"), 0, False),  # NAT64
        (ipaddress.IPv6Network("64:ff9b:1::/48"), 0, False),  # NAT64, local use
        (ipaddress.IPv6Network("2002::/16"), 80, False),  # 6to4
        (ipaddress.IPv6Network("2001::/32"), 0, True),  # Teredo client (stored inverted)
        (ipaddress.IPv6Network("2001::/32"), 64, False),  # Teredo server
    )
)


def _v6_ipv4_fields(
    network: ipaddress.IPv6Network,
) -> list[tuple[int, int, bool, ipaddress.IPv4Network]]:
    """For each IPv4-carrying range `network` overlaps: (start of the overlap, shift of the
    IPv4 field, inverted, the IPv4 network the field spans there). Two CIDR blocks overlap
    only by nesting, and a field of a CIDR block spans one IPv4 CIDR block."""
    lo, hi = int(network.network_address), int(network.broadcast_address)
    found = []
    for start, end, shift, inverted in _V6_IPV4_FIELDS:
        if hi < start or end < lo:
            continue
        block_start, block_end = max(lo, start), min(hi, end)  # the smaller of the two
        host_bits = (block_end - block_start + 1).bit_length() - 1
        free = min(max(host_bits - shift, 0), 32)  # field bits the block leaves open
        field = (block_start >> shift) & _MASK32
        if inverted:
            field = ~(field | ((1 << free) - 1)) & _MASK32
        found.append((block_start, shift, inverted, ipaddress.IPv4Network((field, 32 - free))))
    return found


def embedded_ipv4_networks(network: ipaddress.IPv6Network) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks the addresses of `network` carry inside (mapped, compatible, SIIT,
    NAT64, 6to4, Teredo client and server): what a translator or tunnel would deliver to."""
    return [inner for _, _, _, inner in _v6_ipv4_fields(network)]


def _first_blocked_v4(lo: int, hi: int) -> int | None:
    for start, end in zip(_V4_STARTS, _V4_ENDS, strict=True):
        if start <= hi and lo <= end:
            return max(lo, start)
    return None


def private_witness(network: IPNetwork) -> IPAddress | None:
    """An address in `network` that `classify` does not call PUBLIC, or None if there is none."""
    lo, hi = int(network.network_address), int(network.broadcast_address)
    if isinstance(network, ipaddress.IPv4Network):
        found = _first_blocked_v4(lo, hi)
        return None if found is None else ipaddress.IPv4Address(found)
    for start, end in _V6_PLAIN_RANGES:
        if start <= hi and lo <= end:
            return ipaddress.IPv6Address(max(lo, start))
    for block_start, shift, inverted, carried in _v6_ipv4_fields(network):
        inner = _first_blocked_v4(int(carried.network_address), int(carried.broadcast_address))
        if inner is None:
            continue
        value = ~inner & _MASK32 if inverted else inner
        # Same bits as the block's start, with the IPv4 field set to the blocked address.
        return ipaddress.IPv6Address((block_start & ~(_MASK32 << shift)) | (value << shift))
    return None


def private_overlap(network: IPNetwork) -> AddressClass | None:
    """The class of a non-public address inside `network` (IPv6 forms that embed an IPv4 count
    by that IPv4), or None when every address in it is PUBLIC."""
    witness = private_witness(network)
    return None if witness is None else classify(witness)
