"""Name resolution: once per request, static overrides (`--resolve HOST:IP`), never blocking."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping

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


CACHE_SECONDS = 5.0  # short: the address is re-checked on every use, so this only saves lookups
CACHE_ENTRIES = 10_000


class Resolver:
    """Resolves a host to the single address that will be dialled (answers cached briefly)."""

    def __init__(
        self, overrides: Mapping[str, IPAddress] | None = None, cache_seconds: float = CACHE_SECONDS
    ) -> None:
        self._overrides = dict(overrides or {})
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[IPAddress, float]] = {}

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
