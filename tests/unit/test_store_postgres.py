"""PostgresStore against a real PostgreSQL: migrations across replicas, LISTEN/NOTIFY, outages.

The shared `Store` behaviour is in test_store_contract.py; this module covers what only the
fleet store does. The outage test stops and restarts the module's server, so it runs last.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from proxy.store import (
    CHANNEL_GRANTS,
    CHANNEL_PENDING,
    CHANNEL_RESOLVED,
    CHANNELS,
    RESYNC_PAYLOAD,
    Store,
    StoreError,
    open_store,
)
from proxy.store.migrations import LATEST_VERSION
from proxy.store.postgres import PostgresStore, describe_dsn
from tests.support.postgres import PostgresServer, start_postgres
from tests.unit.test_store_sqlite import grant

Received = asyncio.Queue[tuple[str, str]]


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    with start_postgres() as server:
        yield server


@pytest.fixture
def dsn(pg_server: PostgresServer) -> str:
    return pg_server.create_database()


@pytest.fixture
async def pair(dsn: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    a = await PostgresStore.open(dsn)
    b = await PostgresStore.open(dsn)
    yield a, b
    await a.close()
    await b.close()


def _collect(store: PostgresStore) -> Received:
    queue: Received = asyncio.Queue()
    store.subscribe(lambda channel, payload: queue.put_nowait((channel, payload)))
    return queue


def _versions(server: PostgresServer, dsn: str) -> list[int]:
    out = server.psql("SELECT version FROM schema_version ORDER BY version", dsn.rsplit("/", 1)[1])
    return [int(line) for line in out.split()]


# --- opening and migrations ----------------------------------------------------------------------


async def test_concurrent_opens_migrate_once(pg_server: PostgresServer, dsn: str) -> None:
    # without the advisory lock, concurrent CREATE TABLEs fail with duplicate-object errors
    stores = await asyncio.gather(*(PostgresStore.open(dsn) for _ in range(4)))
    try:
        await stores[0].add_grant(grant())
        assert [g.id for g in await stores[3].list_grants()] == ["g1"]
    finally:
        for s in stores:
            await s.close()
    assert _versions(pg_server, dsn) == list(range(1, LATEST_VERSION + 1))
    s = await PostgresStore.open(dsn)  # reopening applies nothing and keeps the data
    try:
        assert [g.id for g in await s.list_grants()] == ["g1"]
    finally:
        await s.close()
    assert _versions(pg_server, dsn) == list(range(1, LATEST_VERSION + 1))


async def test_schema_too_new_is_refused(pg_server: PostgresServer, dsn: str) -> None:
    s = await PostgresStore.open(dsn)
    await s.close()
    pg_server.psql(
        f"INSERT INTO schema_version VALUES ({LATEST_VERSION + 5}, 0)", dsn.rsplit("/", 1)[1]
    )
    with pytest.raises(StoreError, match=r"schema version \d+, newer than this egress-warden"):
        await PostgresStore.open(dsn)


async def test_open_store_urls(dsn: str) -> None:
    for url in (dsn, dsn.replace("postgresql://", "postgres://", 1)):
        s = await open_store(url)
        try:
            assert isinstance(s, PostgresStore) and isinstance(s, Store)
            assert await s.ping() is True
        finally:
            await s.close()


async def test_unreachable_server_is_a_prompt_store_error_without_password() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        await open_store(f"postgresql://warden:hunter2@127.0.0.1:{port}/fleet")
    assert time.monotonic() - started < 5
    assert str(info.value).startswith(
        f"cannot connect to PostgreSQL at 127.0.0.1:{port}/fleet: connection refused"
    )
    assert "hunter2" not in str(info.value)


async def test_missing_database_is_named(pg_server: PostgresServer) -> None:
    with pytest.raises(StoreError, match=r'/nosuchdb: database "nosuchdb" does not exist'):
        await PostgresStore.open(pg_server.dsn_for("nosuchdb"))


def test_describe_dsn_hides_credentials() -> None:
    assert describe_dsn("postgresql://u:pw@db.internal:6543/warden") == "db.internal:6543/warden"
    assert describe_dsn("postgres://u@[::1]/w") == "[::1]:5432/w"
    assert describe_dsn("postgresql://alice@db") == "db:5432/alice"


# --- LISTEN / NOTIFY -----------------------------------------------------------------------------


async def test_notify_reaches_every_replica(pair: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = pair
    got_a, got_b = _collect(a), _collect(b)
    await a.notify(CHANNEL_RESOLVED, "p-123")
    for queue in (got_b, got_a):  # the sender hears its own notification too
        assert await asyncio.wait_for(queue.get(), 1) == (CHANNEL_RESOLVED, "p-123")
    for channel in (CHANNEL_PENDING, CHANNEL_GRANTS):
        await b.notify(channel, f"x-{channel}")
        assert await asyncio.wait_for(got_a.get(), 1) == (channel, f"x-{channel}")
    await b.notify("some_other_channel", "ignored")
    await b.notify(CHANNEL_PENDING, "last")
    assert await asyncio.wait_for(got_a.get(), 1) == (CHANNEL_PENDING, "last")


async def test_a_failing_callback_does_not_stop_the_others(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = pair

    def broken(channel: str, payload: str) -> None:
        raise RuntimeError("subscriber bug")

    b.subscribe(broken)
    got = _collect(b)
    for payload in ("one", "two"):
        await a.notify(CHANNEL_GRANTS, payload)
        assert await asyncio.wait_for(got.get(), 1) == (CHANNEL_GRANTS, payload)


# --- outages (stops the shared server: keep last) ------------------------------------------------


async def _eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"{what} within {within} s")


async def test_outage_fails_fast_then_recovers(
    pg_server: PostgresServer, pair: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = pair
    got = _collect(b)
    assert await a.ping() is True and b.listening
    try:
        await asyncio.to_thread(pg_server.stop)

        started = time.monotonic()
        with pytest.raises(StoreError, match=r"PostgreSQL at 127\.0\.0\.1"):
            await a.list_grants()
        with pytest.raises(StoreError):  # pooled connections are gone: still prompt
            await a.add_grant(grant())
        assert time.monotonic() - started < 5
        started = time.monotonic()
        assert await a.ping() is False
        assert time.monotonic() - started < 3

        async def not_listening() -> bool:
            return not b.listening

        await _eventually(not_listening, 5, "the listener did not notice the outage")
    finally:
        await asyncio.to_thread(pg_server.start)

    await _eventually(a.ping, 10, "ping() did not recover")
    await a.add_grant(grant())
    assert [g.id for g in await b.list_grants()] == ["g1"]

    async def listening() -> bool:
        return b.listening

    # the listener retries with backoff (at most 10 s apart)
    await _eventually(listening, 15, "the listener did not reconnect")
    # after reconnecting, subscribers are told to resync (notifications may have been missed)
    resync = {await asyncio.wait_for(got.get(), 1) for _ in CHANNELS}
    assert resync == {(channel, RESYNC_PAYLOAD) for channel in CHANNELS}
    await a.notify(CHANNEL_RESOLVED, "after-outage")
    assert await asyncio.wait_for(got.get(), 1) == (CHANNEL_RESOLVED, "after-outage")
