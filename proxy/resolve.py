"""Name resolution: once per request, static overrides (`--resolve HOST:IP`), never blocking."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping, Sequence

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.resolver

from proxy.hosts import Host, InvalidHost, IPAddress, canonicalize_host


class ResolutionError(Exception):
    """The name has no usable address."""


def parse_resolve_option(text: str) -> tuple[str, IPAddress]:
    """Parse curl-style `HOST:IP` (IPv6 may be bracketed): `api.test:127.0.0.1`."""
    host, sep, ip_text = text.partition(":")
    if not sep or not host or not ip_text:
        raise ValueError(f"--resolve {text!r}: expected HOST:IP")
    try:
        canonical = canonicalize_host(host)
        ip = ipaddress.ip_address(ip_text.strip("[]"))
    except (InvalidHost, ValueError) as exc:
        raise ValueError(f"--resolve {text!r}: {exc}") from exc
    return canonical.name, ip


DNS_PORT = 53


def parse_nameserver_option(text: str) -> tuple[str, int]:
    """Parse `IP`, `IP:PORT` or `[IPv6]:PORT` (port 53 by default): `127.0.0.1:5353`."""
    expected = f"--nameserver {text!r}: expected IP, IP:PORT or [IPv6]:PORT"
    if text.startswith("["):
        ip_text, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(expected)
        port_text: str | None = rest[1:] if rest else None
    elif text.count(":") > 1:
        # A bare IPv6 address: its last group could be read as a port, so a port needs brackets.
        ip_text, port_text = text, None
    else:
        ip_text, sep, after = text.partition(":")
        port_text = after if sep else None
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError as exc:
        # A name would need DNS to find the nameserver itself.
        raise ValueError(f"--nameserver {text!r}: not an IP address ({exc})") from exc
    if text.startswith("[") and ip.version != 6:
        raise ValueError(f"--nameserver {text!r}: brackets are for IPv6 addresses only")
    if port_text is None:
        return str(ip), DNS_PORT
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"--nameserver {text!r}: port must be 1-65535")
    return str(ip), int(port_text)


CACHE_SECONDS = 5.0  # short: the address is re-checked on every use, so this only saves lookups
CACHE_ENTRIES = 10_000
DNS_TIMEOUT = 2.0  # per query sent to one nameserver
DNS_LIFETIME = 4.0  # for the whole lookup of one name (its A and, if needed, AAAA query)


class Resolver:
    """Resolves a host to the single address that will be dialled (answers cached briefly).

    By default names go to the system resolver (`getaddrinfo`); with `nameservers` they are
    asked of exactly those servers over DNS (A first, then AAAA), so what is queried is known.
    """

    def __init__(
        self,
        overrides: Mapping[str, IPAddress] | None = None,
        cache_seconds: float = CACHE_SECONDS,
        nameservers: Sequence[tuple[str, int]] | None = None,
        *,
        dns_timeout: float = DNS_TIMEOUT,
        dns_lifetime: float = DNS_LIFETIME,
    ) -> None:
        self._overrides = dict(overrides or {})
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[IPAddress, float]] = {}
        self._dns: dns.asyncresolver.Resolver | None = None
        self._dns_lifetime = dns_lifetime
        if nameservers:  # an empty list (no --nameserver given) means the system resolver
            self._dns = dns.asyncresolver.Resolver(configure=False)
            try:
                self._dns.nameservers = [
                    dns.nameserver.Do53Nameserver(str(ipaddress.ip_address(ip)), port)
                    for ip, port in nameservers
                ]
            except ValueError as exc:
                raise ValueError(f"nameservers {list(nameservers)!r}: {exc}") from exc
            self._dns.timeout = dns_timeout
            self._dns.lifetime = dns_lifetime

    async def resolve(self, host: Host, port: int) -> IPAddress:
        """The address to dial: the IP literal itself, an override, or the first DNS answer."""
        if host.ip is not None:
            return host.ip
        override = self._overrides.get(host.name)
        if override is not None:
            return override
        loop = asyncio.get_running_loop()
        cached = self._cache.get(host.name)
        if cached is not None and cached[1] > loop.time():
            return cached[0]
        if self._dns is not None:
            address = await self._query(self._dns, host)
        else:
            address = await self._lookup(host, port)
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.clear()
        self._cache[host.name] = (address, loop.time() + self._cache_seconds)
        return address

    async def _lookup(self, host: Host, port: int) -> IPAddress:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                host.name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except (OSError, UnicodeError) as exc:
            raise ResolutionError(f"{host.name}: {exc}") from exc
        for _family, _type, _proto, _canon, sockaddr in infos:
            try:
                return ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
            except ValueError:
                continue
        raise ResolutionError(f"{host.name}: no address")

    async def _query(self, resolver: dns.asyncresolver.Resolver, host: Host) -> IPAddress:
        """Ask the configured nameservers: A, then AAAA only when the name has no A record."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._dns_lifetime
        try:
            # Absolute (rooted) name: no search domain is ever appended, so only this name leaks.
            qname = dns.name.from_text(host.name)
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                answer = await resolver.resolve(
                    qname,
                    rdtype,
                    raise_on_no_answer=False,
                    lifetime=max(deadline - loop.time(), 0.001),
                )
                for rdata in answer.rrset or ():
                    if isinstance(rdata, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA):
                        return ipaddress.ip_address(rdata.address)
        except dns.resolver.NXDOMAIN as exc:
            raise ResolutionError(f"{host.name}: no such name (NXDOMAIN)") from exc
        except dns.exception.Timeout as exc:
            raise ResolutionError(
                f"{host.name}: no answer from {self._servers(resolver)} "
                f"within {self._dns_lifetime:g} s"
            ) from exc
        except (dns.exception.DNSException, OSError) as exc:
            # NoNameservers (SERVFAIL, REFUSED, unreachable) names each server and its answer.
            raise ResolutionError(f"{host.name}: {exc}") from exc
        raise ResolutionError(f"{host.name}: no A or AAAA record")

    @staticmethod
    def _servers(resolver: dns.asyncresolver.Resolver) -> str:
        return ", ".join(
            f"[{ns.address}]:{ns.port}" if ":" in ns.address else f"{ns.address}:{ns.port}"
            for ns in resolver.nameservers
            if isinstance(ns, dns.nameserver.Do53Nameserver)
        )
