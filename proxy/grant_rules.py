"""What a runtime allow grant may cover: catch-alls are refused, and a grant that reaches an
address the network guard blocks (loopback, private, link-local/metadata...) is marked as such.

An IP/CIDR allow lifts the private-network guard for what it covers (SPEC 3, step 4), so a
grant of `0.0.0.0/0` or `169.254.169.254/32` would open loopback or the metadata service to
every agent. Pure: the control API decides what to do with the answers.
"""

from __future__ import annotations

import ipaddress

from proxy.netguard import AddressClass, IPNetwork, embedded_ipv4_networks, private_overlap
from proxy.policy.match import parse_pattern

MIN_IPV4_PREFIX = 8  # an allow grant covers at most a /8 (16.7 million addresses)
MIN_IPV6_PREFIX = 32  # an allow grant covers at most a /32 (a regional registry's allocation)
MIN_FIXED_LABELS = 2  # a wildcard needs at least `example.com` to its right, not just `com`

_IDN_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


def wildcard_too_broad(pattern: str) -> str | None:
    """Why host pattern `pattern` matches too much (`*`, `**`, `**.com`, `api.*.com`), or None.

    Checked on the raw text so that a catch-all is named as one even though `parse_pattern`
    refuses it too."""
    text = pattern.strip().lower()
    if text.startswith("[") or text.count(":") >= 2:
        return None  # an IPv6 literal or CIDR
    host = text.partition(":")[0].translate(_IDN_DOTS).removesuffix(".")
    labels = host.split(".")
    starred = [i for i, label in enumerate(labels) if "*" in label]
    if not starred:
        return None
    fixed = labels[starred[-1] + 1 :]
    if len(fixed) >= MIN_FIXED_LABELS:
        return None
    if not fixed:
        return f"{pattern!r} matches every host"
    return f"{pattern!r} matches every host under the top-level domain {fixed[0]!r}"


def network_too_broad(network: IPNetwork) -> str | None:
    """Why an allow grant of `network` covers too much, or None: shorter than an IPv4 /8 or an
    IPv6 /32, or an IPv6 range whose addresses carry more than a /8 of IPv4 inside them."""
    if isinstance(network, ipaddress.IPv4Network):
        if network.prefixlen < MIN_IPV4_PREFIX:
            return f"{network} is wider than a /{MIN_IPV4_PREFIX}"
        return None
    if network.prefixlen < MIN_IPV6_PREFIX:
        return f"{network} is wider than a /{MIN_IPV6_PREFIX}"
    for inner in embedded_ipv4_networks(network):
        if inner.prefixlen < MIN_IPV4_PREFIX:
            return (
                f"{network} carries the IPv4 range {inner} (mapped, NAT64, 6to4 or Teredo forms),"
                f" wider than a /{MIN_IPV4_PREFIX}"
            )
    return None


def allow_grant_too_broad(pattern: str) -> str | None:
    """Why an allow grant of `pattern` is refused outright as too broad, or None (also None for
    an invalid pattern that is not a catch-all: parsing reports that)."""
    wildcard = wildcard_too_broad(pattern)
    if wildcard is not None:
        return wildcard
    try:
        parsed = parse_pattern(pattern)
    except ValueError:
        return None
    return None if parsed.network is None else network_too_broad(parsed.network)


def guarded_class(pattern: str) -> AddressClass | None:
    """The class of a guarded (non-public) address an IP/CIDR `pattern` covers, or None for a
    host-name pattern or one that covers only public addresses. `pattern` must be valid."""
    parsed = parse_pattern(pattern)
    return None if parsed.network is None else private_overlap(parsed.network)
