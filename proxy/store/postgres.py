"""PostgreSQL state store: the shared queries (`proxy.store.sql`) over asyncpg, for a fleet.

Queries go through a small pool with short timeouts so a lost database turns into a prompt
StoreError instead of a hang; LISTEN runs on a dedicated connection that a background task
re-establishes with backoff. That connection's session also names this replica's waiters: a
replica that died has no session, so its waiters stop counting at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import re
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import asyncpg.pool
import structlog

from proxy.store.base import CHANNELS, RESYNC_PAYLOAD, NotifyCallback, StoreError
from proxy.store.migrations import CURRENT_VERSION_SQL, SCHEMA_VERSION_DDL, pending_migrations
from proxy.store.sql import WAITERS_REKEY_SQL, Row, SqlStore, Table

CONNECT_TIMEOUT = 3.0  # per connection attempt (refused is immediate; this bounds black holes)
COMMAND_TIMEOUT = 5.0  # per statement
PING_TIMEOUT = 2.0
MIGRATION_TIMEOUT = 120.0  # waiting for another replica's migration, or running one
POOL_MIN, POOL_MAX = 1, 5
LISTEN_BACKOFF_MIN = 0.5
LISTEN_BACKOFF_MAX = 10.0
# A black-holed network never closes the socket, so probe the idle listener this often.
LISTEN_KEEPALIVE = 5.0
# pg_advisory_lock key serialising migrations across replicas ("egresswd" as an int64).
MIGRATION_LOCK_KEY = int.from_bytes(b"egresswd", "big")
CLOSE_TIMEOUT = 2.0

_log = structlog.get_logger("egress.store")


# What a lost or failing database raises through asyncpg.
_DB_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

# Opening also parses the URL: asyncpg raises ValueError (ClientConfigurationError) for bad ones.
_OPEN_ERRORS: tuple[type[Exception], ...] = (*_DB_ERRORS, ValueError)


@functools.lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """Renumber the shared SQL's `?` placeholders as PostgreSQL's $1, $2, ..."""
    counter = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


# Owners are listener sessions' backend pids: a replica that died has none any more.
_LIVE_OWNERS = "SELECT pid::text FROM pg_stat_activity WHERE pid::text = ANY($1::text[])"


def describe_dsn(dsn: str) -> str:
    """host:port/database for messages: never the user's password."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
        database = unquote(parts.path.lstrip("/")) or unquote(parts.username or "") or "postgres"
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}/{database}"


def _reason(exc: BaseException, dsn: str) -> str:
    """A short lower-case reason for a connection or query failure, without the password."""
    if isinstance(exc, ConnectionRefusedError):
        text = "connection refused"
    elif isinstance(exc, TimeoutError):
        text = "timed out"
    elif isinstance(exc, socket.gaierror):
        text = f"cannot resolve host ({exc.strerror or exc})"
    elif isinstance(exc, asyncpg.ConnectionDoesNotExistError):
        text = "connection lost"
    elif isinstance(exc, OSError):
        text = str(exc)
        # Several addresses tried (e.g. localhost as ::1 and 127.0.0.1): one combined error.
        if "Connect call failed" in text or "refused" in text.lower():
            text = "connection refused"
        elif exc.strerror:
            text = exc.strerror.lower()
    else:
        text = str(exc) or type(exc).__name__
    try:
        password = urlsplit(dsn).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    return text


def _count(status: str) -> int:
    """The row count of a command status ('DELETE 3', 'UPDATE 1', 'INSERT 0 1')."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


type Connection = asyncpg.pool.PoolConnectionProxy[asyncpg.Record] | asyncpg.Connection[Any]


class _Session:
    """Statements on one pooled connection, with `?` renumbered for PostgreSQL."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [tuple(r) for r in await self._conn.fetch(_pg(sql), *params)]

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        record = await self._conn.fetchrow(_pg(sql), *params)
        return None if record is None else tuple(record)

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return _count(await self._conn.execute(_pg(sql), *params))

    async def insert_rows(self, table: Table[Any], rows: Sequence[tuple[Any, ...]]) -> None:
        sql = f"INSERT INTO {table.name} ({table.cols}) VALUES ({table.marks})"
        await self._conn.executemany(_pg(sql), rows)

    async def live_owners(self, owners: Sequence[str]) -> set[str]:
        return {str(r[0]) for r in await self._conn.fetch(_LIVE_OWNERS, list(owners))}


class PostgresDriver:
    """A PostgreSQL database shared by replicas: a pool for queries, a listener for NOTIFY."""

    same = "IS NOT DISTINCT FROM"  # PostgreSQL's NULL-safe equality

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], dsn: str) -> None:
        self._pool = pool
        self._dsn = dsn
        self.where = describe_dsn(dsn)
        self.label = f"state database PostgreSQL at {self.where}"
        self._closed = False
        self._subscribers: list[NotifyCallback] = []
        self._listener: asyncpg.Connection[Any] | None = None
        self._listener_lost = asyncio.Event()
        self._listening = False
        self._listen_task: asyncio.Task[None] | None = None
        # Whose waiters this instance counts: its listener session's backend pid ("" until the
        # listener is up).
        self.owner = ""

    async def start(self) -> None:
        """LISTEN before the store is handed out, so no notification sent after open() is
        missed; then keep listening in the background."""
        try:
            listener = await self._connect_listener()
        except _DB_ERRORS as exc:
            await _close_pool(self._pool)
            raise _connect_error(exc, self._dsn) from exc
        try:
            await self._adopt_listener(listener)
        except _DB_ERRORS as exc:
            listener.terminate()
            await _close_pool(self._pool)
            raise _connect_error(exc, self._dsn) from exc
        self._listen_task = asyncio.create_task(self._listen_forever(), name="store-listener")

    async def close(self) -> None:
        """Stop listening and close every connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._listen_task is not None:
            self._listen_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listen_task
        if self._listener is not None:
            await _close_conn(self._listener)
            self._listener = None
        await _close_pool(self._pool)

    async def ping(self) -> bool:
        """True when the database answers `SELECT 1` within PING_TIMEOUT; never raises."""
        if self._closed:
            return False
        try:
            async with asyncio.timeout(PING_TIMEOUT), self._pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        except Exception:
            return False
        return True

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is up (False during an outage, until reconnected)."""
        return self._listening

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[_Session]:
        """A pooled connection; database failures become StoreError."""
        if self._closed:
            raise StoreError(f"state database PostgreSQL at {self.where} is closed")
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                yield _Session(conn)
        except _DB_ERRORS as exc:
            raise StoreError(
                f"state database PostgreSQL at {self.where}: {_reason(exc, self._dsn)}"
            ) from exc

    statement = reading  # one statement on its own is atomic and commits

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Session]:
        async with self.reading() as session, session._conn.transaction():
            yield session

    async def notify(self, channel: str, payload: str) -> None:
        """NOTIFY every replica listening on `channel` (delivered when this call commits)."""
        async with self.statement() as db:
            await db.execute("SELECT pg_notify(?, ?)", (channel, payload))

    def subscribe(self, callback: NotifyCallback) -> None:
        """Call `callback(channel, payload)` for each notification on CHANNELS (see Store)."""
        self._subscribers.append(callback)

    def _dispatch(self, channel: str, payload: str) -> None:
        for callback in list(self._subscribers):
            try:
                callback(channel, payload)
            except Exception:
                # One faulty subscriber must not starve the others or kill the listener.
                _log.exception("store notification callback failed", channel=channel)

    def _on_notification(self, conn: object, pid: int, channel: str, payload: object, /) -> None:
        self._dispatch(channel, str(payload))

    async def _connect_listener(self) -> asyncpg.Connection[Any]:
        """A dedicated connection LISTENing on CHANNELS (outside the pool: it is never idle)."""
        conn: asyncpg.Connection[Any] = await asyncpg.connect(
            self._dsn,
            timeout=CONNECT_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT,
            server_settings={"application_name": "egress-warden-listener"},
        )
        try:
            for channel in CHANNELS:
                await conn.add_listener(channel, self._on_notification)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _adopt_listener(self, conn: asyncpg.Connection[Any]) -> None:
        """Make `conn` the listener; its termination callback flags the loss at once. Its
        session names this instance's waiters: those counted under the previous session are
        moved over (they still wait)."""
        owner = str(await conn.fetchval("SELECT pg_backend_pid()"))
        if self.owner and self.owner != owner:
            await conn.execute(_pg(WAITERS_REKEY_SQL), owner, self.owner)
        self.owner = owner
        lost = asyncio.Event()

        def on_terminated(_conn: object, /) -> None:
            lost.set()

        conn.add_termination_listener(on_terminated)
        self._listener_lost = lost
        self._listener = conn
        self._listening = True

    async def _listen_forever(self) -> None:
        """Keep a LISTEN connection up: reconnect with backoff, then tell subscribers to resync."""
        delay = LISTEN_BACKOFF_MIN
        while True:
            conn = self._listener
            if conn is None:
                try:
                    conn = await self._connect_listener()
                except Exception as exc:  # anything: this task must outlive every outage
                    _log.warning(
                        "store listener cannot reconnect",
                        where=self.where,
                        error=_reason(exc, self._dsn),
                        retry_in=delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, LISTEN_BACKOFF_MAX)
                    continue
                delay = LISTEN_BACKOFF_MIN
                try:
                    await self._adopt_listener(conn)
                except _DB_ERRORS as exc:
                    conn.terminate()
                    _log.warning(
                        "store listener cannot reconnect", where=self.where, error=str(exc)
                    )
                    await asyncio.sleep(delay)
                    continue
                _log.info("store listener reconnected", where=self.where)
                for channel in CHANNELS:
                    self._dispatch(channel, RESYNC_PAYLOAD)
            await self._watch(conn, self._listener_lost)
            self._listening = False
            self._listener = None
            _log.warning("store listener lost its connection", where=self.where)
            conn.terminate()

    async def _watch(self, conn: asyncpg.Connection[Any], lost: asyncio.Event) -> None:
        """Return once `conn` is gone: closed by the server, or not answering a probe."""
        while not lost.is_set() and not conn.is_closed():
            try:
                async with asyncio.timeout(LISTEN_KEEPALIVE):
                    await lost.wait()
            except TimeoutError:
                try:
                    await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT)
                except _DB_ERRORS:
                    return


class PostgresStore(SqlStore):
    """`Store` on a PostgreSQL database shared by replicas; every call commits before returning."""

    driver: PostgresDriver

    def __init__(self, driver: PostgresDriver) -> None:
        """Wrap an open, migrated, listening driver; use `PostgresStore.open` instead."""
        super().__init__(driver)
        self.where = driver.where

    @classmethod
    async def open(cls, dsn: str) -> PostgresStore:
        """Connect, apply missing migrations (once across replicas) and start listening."""
        where = describe_dsn(dsn)
        try:
            await _migrate(dsn, where)
            pool = await asyncpg.create_pool(
                dsn,
                min_size=POOL_MIN,
                max_size=POOL_MAX,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={"application_name": "egress-warden"},
            )
        except StoreError:
            raise
        except _OPEN_ERRORS as exc:
            raise _connect_error(exc, dsn) from exc
        driver = PostgresDriver(pool, dsn)
        await driver.start()
        return cls(driver)

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is up (False during an outage, until reconnected)."""
        return self.driver.listening


def _connect_error(exc: BaseException, dsn: str) -> StoreError:
    return StoreError(
        f"cannot connect to PostgreSQL at {describe_dsn(dsn)}: {_reason(exc, dsn)}; check "
        "--store and that the database server is running and reachable"
    )


async def _migrate(dsn: str, where: str) -> None:
    """Apply missing migrations on a dedicated connection, serialised by an advisory lock.

    The lock is session-level and the connection is closed afterwards, so a failure can never
    leave the lock held by a pooled connection and block the other replicas.
    """
    conn: asyncpg.Connection[Any] = await asyncpg.connect(
        dsn, timeout=CONNECT_TIMEOUT, command_timeout=MIGRATION_TIMEOUT
    )
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(SCHEMA_VERSION_DDL)
        while True:
            async with conn.transaction():
                current = await conn.fetchval(CURRENT_VERSION_SQL)
                todo = pending_migrations(current, f"PostgreSQL at {where}")
                if not todo:
                    return
                step = todo[0]
                for statement in step.render("postgresql"):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                    step.version,
                    time.time(),
                )
    finally:
        await _close_conn(conn)


async def _close_conn(conn: asyncpg.Connection[Any]) -> None:
    """Close politely, or drop the socket when the server does not answer."""
    try:
        await conn.close(timeout=CLOSE_TIMEOUT)
    except Exception:
        conn.terminate()


async def _close_pool(pool: asyncpg.Pool[asyncpg.Record]) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await pool.close()
    except Exception:
        pool.terminate()
