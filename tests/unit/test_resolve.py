"""Unit tests for proxy.resolve against a real DNS server on loopback: what is asked, and when."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections.abc import Iterator, Mapping

import dns.message
import dns.query
import pytest

from proxy.hosts import IPAddress, canonicalize_host
from proxy.resolve import CACHE_SECONDS, ResolutionError, Resolver, parse_nameserver_option
from tests.support.dns import DnsServer

ANSWERS = {"api.test": "127.0.0.2", "v6only.test": "::1"}


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer(ANSWERS) as running:
        yield running


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A bound UDP port that never answers: every query to it times out."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def closed_port() -> int:
    """A UDP port with nothing bound: queries to it go unanswered."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resolver_for(
    server: DnsServer,
    overrides: Mapping[str, IPAddress] | None = None,
    cache_seconds: float = CACHE_SECONDS,
) -> Resolver:
    return Resolver(overrides, cache_seconds, nameservers=[server.address])


async def resolve(resolver: Resolver, name: str) -> IPAddress:
    return await resolver.resolve(canonicalize_host(name), 443)


async def test_answer_comes_from_the_configured_nameserver(server: DnsServer) -> None:
    assert await resolve(resolver_for(server), "api.test") == ipaddress.ip_address("127.0.0.2")
    # A answered: no AAAA query, and no search domain appended to the name.
    assert server.questions == [("api.test", "A")]
    assert server.queried("api.test")


async def test_aaaa_is_asked_only_after_an_empty_a_answer(server: DnsServer) -> None:
    assert await resolve(resolver_for(server), "v6only.test") == ipaddress.ip_address("::1")
    assert server.questions == [("v6only.test", "A"), ("v6only.test", "AAAA")]


async def test_nxdomain_is_a_resolution_error_after_one_query(server: DnsServer) -> None:
    with pytest.raises(ResolutionError, match=r"nosuch\.test: no such name \(NXDOMAIN\)"):
        await resolve(resolver_for(server), "nosuch.test")
    assert server.questions == [("nosuch.test", "A")]


async def test_subdomain_of_a_known_name_is_nxdomain(server: DnsServer) -> None:
    with pytest.raises(ResolutionError, match="NXDOMAIN"):
        await resolve(resolver_for(server), "x.api.test")
    assert server.queries == ["x.api.test"]


async def test_override_is_never_queried(server: DnsServer) -> None:
    resolver = resolver_for(server, overrides={"api.test": ipaddress.ip_address("127.0.0.7")})
    assert await resolve(resolver, "api.test") == ipaddress.ip_address("127.0.0.7")
    assert server.packets == 0


@pytest.mark.parametrize("literal", ["127.0.0.9", "[::1]", "2130706441"])
async def test_ip_literal_is_never_queried(server: DnsServer, literal: str) -> None:
    address = await resolve(resolver_for(server), literal)
    assert address == canonicalize_host(literal).ip
    assert server.packets == 0


async def test_cached_answer_is_not_asked_again_within_the_ttl(server: DnsServer) -> None:
    resolver = resolver_for(server)
    await resolve(resolver, "api.test")
    await resolve(resolver, "api.test")
    assert server.queries == ["api.test"]


async def test_expired_answer_is_asked_again(server: DnsServer) -> None:
    resolver = resolver_for(server, cache_seconds=0.05)
    await resolve(resolver, "api.test")
    await asyncio.sleep(0.1)
    await resolve(resolver, "api.test")
    assert server.queries == ["api.test", "api.test"]


async def test_timeout_is_a_resolution_error_within_the_lifetime(silent_port: int) -> None:
    resolver = Resolver(nameservers=[("127.0.0.1", silent_port)], dns_timeout=0.2, dns_lifetime=0.4)
    started = time.monotonic()
    with pytest.raises(
        ResolutionError, match=rf"api\.test: no answer from 127\.0\.0\.1:{silent_port}"
    ):
        await resolve(resolver, "api.test")
    assert time.monotonic() - started < 2


async def test_ipv6_nameserver_from_the_option_is_used() -> None:
    with DnsServer(ANSWERS, host="::1") as server:
        resolver = Resolver(nameservers=[parse_nameserver_option(f"[::1]:{server.port}")])
        assert await resolve(resolver, "api.test") == ipaddress.ip_address("127.0.0.2")
        assert server.queries == ["api.test"]


async def test_next_nameserver_answers_when_the_first_is_down(server: DnsServer) -> None:
    down = ("127.0.0.1", closed_port())
    resolver = Resolver(nameservers=[down, server.address], dns_timeout=0.2)
    assert await resolve(resolver, "api.test") == ipaddress.ip_address("127.0.0.2")
    assert server.queries == ["api.test"]


async def test_waiting_for_dns_does_not_block_the_event_loop(silent_port: int) -> None:
    resolver = Resolver(nameservers=[("127.0.0.1", silent_port)], dns_lifetime=0.5)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    with pytest.raises(ResolutionError):
        await resolve(resolver, "api.test")
    ticker.cancel()
    assert ticks >= 10


def test_nameserver_addresses_must_be_ip_addresses() -> None:
    with pytest.raises(ValueError, match=r"ns\.test"):
        Resolver(nameservers=[("ns.test", 53)])


def test_server_records_names_and_answers_over_tcp(server: DnsServer) -> None:
    response = dns.query.tcp(
        dns.message.make_query("API.Test.", "A"), server.host, port=server.port, timeout=2
    )
    assert [rrset.to_text() for rrset in response.answer] == ["API.Test. 60 IN A 127.0.0.2"]
    assert server.queries == ["api.test"]
    assert server.queried("test")
    assert not server.queried("pi.test")  # a label boundary, not a string suffix


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
        ("::1", ("::1", 53)),
        ("2001:DB8:0::1", ("2001:db8::1", 53)),
        ("::1:53", ("::1:53", 53)),  # a bare IPv6 address is read whole: a port needs brackets
    ],
)
def test_parse_nameserver_option(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver_option(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not an IP address"),
        ("ns.test", "not an IP address"),
        ("ns.test:53", "not an IP address"),
        ("127.0.0.1:", "port must be 1-65535"),
        ("127.0.0.1:0", "port must be 1-65535"),
        ("127.0.0.1:65536", "port must be 1-65535"),
        ("127.0.0.1:+53", "port must be 1-65535"),
        ("127.0.0.1:\uff15\uff13", "port must be 1-65535"),
        ("[127.0.0.1]:53", "brackets are for IPv6 addresses only"),
        ("[::1", "expected IP, IP:PORT or [IPv6]:PORT"),
        ("[::1]53", "expected IP, IP:PORT or [IPv6]:PORT"),
    ],
)
def test_parse_nameserver_option_rejects(text: str, message: str) -> None:
    expected = "^" + re.escape(f"--nameserver {text!r}: ") + ".*" + re.escape(message)
    with pytest.raises(ValueError, match=expected):
        parse_nameserver_option(text)
