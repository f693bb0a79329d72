"""PostgreSQL state store (asyncpg): one database shared by a fleet of proxy replicas.

Queries go through a small pool with short timeouts so a lost database turns into a prompt
StoreError instead of a hang; LISTEN runs on a dedicated connection that a background task
re-establishes with backoff. The SQL is shared with the SQLite store (see `proxy.store.sqlite`).
"""

from __future__ import annotations

import asyncio
import contextlib
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

from proxy.records import ApprovalRecord, DecisionRecord, Grant, PendingItem
from proxy.store.base import (
    CHANNELS,
    RESYNC_PAYLOAD,
    NotifyCallback,
    ResolutionWriter,
    StoreError,
)
from proxy.store.migrations import CURRENT_VERSION_SQL, SCHEMA_VERSION_DDL, pending_migrations
from proxy.store.sqlite import (
    _APPROVAL_COLS,
    _DECISION_COLS,
    _GRANT_COLS,
    _PENDING_COLS,
    APPROVAL_INSERT_SQL,
    APPROVAL_LATEST_SQL,
    GRANT_UPSERT_SQL,
    GRANTS_SIGNATURE_SQL,
    ONCE_PASSES_SQL,
    ONCE_TAKE_SQL,
    PENDING_CLAIM_SQL,
    PENDING_JOIN_SQL,
    PENDING_LEAVE_SQL,
    PENDING_REKEY_SQL,
    PENDING_RESOLVE_SQL,
    PENDING_UPSERT_SQL,
    WAITER_JOIN_SQL,
    WAITER_LEAVE_SQL,
    WAITERS_DROP_SQL,
    WAITERS_OF_SQL,
    WAITERS_ORPHANS_SQL,
    _approval_from,
    _approval_params,
    _decision_from,
    _decision_params,
    _decisions_query,
    _grant_from,
    _grant_params,
    _pending_from,
    _pending_params,
    _rekey_params,
    _storable,
)

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


def _pg(sql: str) -> str:
    """Renumber the shared SQL's `?` placeholders as PostgreSQL's $1, $2, ..."""
    counter = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


_GRANT_UPSERT = _pg(GRANT_UPSERT_SQL)
_PENDING_REKEY = _pg(PENDING_REKEY_SQL)
_PENDING_UPSERT = _pg(PENDING_UPSERT_SQL)
_PENDING_JOIN = _pg(PENDING_JOIN_SQL)
_PENDING_CLAIM = _pg(PENDING_CLAIM_SQL)
_PENDING_RESOLVE = _pg(PENDING_RESOLVE_SQL)
_PENDING_LEAVE = _pg(PENDING_LEAVE_SQL)
_ONCE_PASSES = _pg(ONCE_PASSES_SQL)
_ONCE_TAKE = _pg(ONCE_TAKE_SQL)
_WAITER_JOIN = _pg(WAITER_JOIN_SQL)
_WAITER_LEAVE = _pg(WAITER_LEAVE_SQL)
_WAITERS_OF = _pg(WAITERS_OF_SQL)
_WAITERS_DROP = _pg(WAITERS_DROP_SQL)
# Owners are listener sessions' backend pids: a replica that died has none any more.
_LIVE_OWNERS = "SELECT pid::text FROM pg_stat_activity WHERE pid::text = ANY($1::text[])"
_REKEY_OWNER = "UPDATE pending_waiters SET owner = $1 WHERE owner = $2"
_APPROVAL_INSERT = _pg(APPROVAL_INSERT_SQL)
_APPROVAL_LATEST = _pg(APPROVAL_LATEST_SQL)
_DECISION_INSERT = _pg(
    f"INSERT INTO decisions ({_DECISION_COLS}) "
    f"VALUES ({', '.join('?' for _ in _DECISION_COLS.split(','))})"
)


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


def _row(record: asyncpg.Record) -> tuple[Any, ...]:
    return tuple(record)


def _deleted(status: str) -> int:
    """The row count of a 'DELETE n' command status."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


_updated = _deleted  # 'UPDATE n' ends with the count the same way


class PostgresStore:
    """`Store` on a PostgreSQL database shared by replicas; every call commits before returning."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], dsn: str) -> None:
        """Wrap an open, migrated pool; use `PostgresStore.open` instead."""
        self._pool = pool
        self._dsn = dsn
        self.where = describe_dsn(dsn)
        self._closed = False
        self._subscribers: list[NotifyCallback] = []
        self._listener: asyncpg.Connection[Any] | None = None
        self._listener_lost = asyncio.Event()
        self._listening = False
        self._listen_task: asyncio.Task[None] | None = None
        # Whose waiters this instance counts: its listener session's backend pid (see
        # `resolve_pending`); "" until the listener is up.
        self.owner = ""

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
        store = cls(pool, dsn)
        # LISTEN before returning, so no notification sent after open() is missed.
        try:
            listener = await store._connect_listener()
        except _DB_ERRORS as exc:
            await _close_pool(pool)
            raise _connect_error(exc, dsn) from exc
        try:
            await store._adopt_listener(listener)
        except _DB_ERRORS as exc:
            listener.terminate()
            await _close_pool(pool)
            raise _connect_error(exc, dsn) from exc
        store._listen_task = asyncio.create_task(store._listen_forever(), name="store-listener")
        return store

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

    # --- plumbing -----------------------------------------------------------------------------

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy[asyncpg.Record]]:
        """A pooled connection; database failures become StoreError."""
        if self._closed:
            raise StoreError(f"state database PostgreSQL at {self.where} is closed")
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                yield conn
        except _DB_ERRORS as exc:
            raise StoreError(
                f"state database PostgreSQL at {self.where}: {_reason(exc, self._dsn)}"
            ) from exc

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy[asyncpg.Record]]:
        async with self._conn() as conn, conn.transaction():
            yield conn

    async def _fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        async with self._conn() as conn:
            return [_row(r) for r in await conn.fetch(sql, *args)]

    async def _fetchrow(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        async with self._conn() as conn:
            record = await conn.fetchrow(sql, *args)
        return None if record is None else _row(record)

    async def _execute(self, sql: str, *args: Any) -> str:
        async with self._conn() as conn:
            return await conn.execute(sql, *args)

    # --- grants -------------------------------------------------------------------------------

    async def add_grant(self, grant: Grant) -> None:
        """Persist an `always` or `once` grant (replacing one with the same id)."""
        await self._execute(_GRANT_UPSERT, *_grant_params(grant))

    async def list_grants(self, now: float | None = None) -> list[Grant]:
        """Grants not expired at `now` (default: the current time), oldest first."""
        at = time.time() if now is None else now
        rows = await self._fetch(
            f"SELECT {_GRANT_COLS} FROM grants WHERE expires_at IS NULL OR expires_at > $1 "
            "ORDER BY created_at, id",
            at,
        )
        return [_grant_from(r) for r in rows]

    async def delete_grant(self, grant_id: str) -> bool:
        """Delete a grant; False when the id is unknown."""
        return _deleted(await self._execute("DELETE FROM grants WHERE id = $1", grant_id)) > 0

    async def consume_grant(self, grant_id: str) -> bool:
        """Use up a grant: the row lock makes exactly one concurrent DELETE see it."""
        return await self.delete_grant(grant_id)

    async def take_once_pass(self, pattern: str, agent: str | None, now: float) -> Grant | None:
        """Use up one live `once` grant for `pattern` that applies to `agent` (see Store).

        Under READ COMMITTED a DELETE that waited on another's row lock re-checks the row
        after that commits, so of concurrent takers exactly one gets each pass."""
        candidates = await self._fetch(_ONCE_PASSES, *_storable((pattern, agent, now)))
        for (grant_id,) in candidates:
            row = await self._fetchrow(_ONCE_TAKE, grant_id)
            if row is not None:
                return _grant_from(row)
        return None

    async def grants_signature(self) -> tuple[int, float, str]:
        row = await self._fetchrow(GRANTS_SIGNATURE_SQL)
        assert row is not None  # an aggregate always answers one row
        return int(row[0]), float(row[1]), str(row[2])

    # --- pending items ------------------------------------------------------------------------

    async def upsert_pending(self, item: PendingItem) -> None:
        """Insert a pending item or replace the one with the same id or the same key."""
        async with self._tx() as conn:
            await conn.execute(_PENDING_REKEY, *_rekey_params(item))
            await conn.execute(_PENDING_UPSERT, *_pending_params(item))

    async def join_pending(self, item: PendingItem) -> tuple[PendingItem, bool]:
        """Join the live item for item's (agent, host, port) or store `item`; True if created."""
        async with self._tx() as conn:
            record = await conn.fetchrow(_PENDING_JOIN, *_pending_params(item))
            if record is None:  # RETURNING always yields the inserted or updated row
                raise StoreError(f"PostgreSQL at {self.where}: join_pending returned no row")
            got = _pending_from(_row(record))
            await conn.execute(_WAITER_JOIN, got.id, self.owner)
        return got, got.id == item.id

    async def claim_pending(self, item_id: str) -> PendingItem | None:
        """Delete and return a pending item; None when another caller claimed it first."""
        row = await self._fetchrow(_PENDING_CLAIM, item_id)
        return None if row is None else _pending_from(row)

    async def resolve_pending(
        self, item_id: str, now: float, write: ResolutionWriter
    ) -> tuple[PendingItem, int] | None:
        """Claim a live item and store its resolution in one transaction (see Store)."""
        async with self._tx() as conn:
            record = await conn.fetchrow(_PENDING_RESOLVE, item_id, now)
            if record is None:
                return None
            item = _pending_from(_row(record))
            counts = [(str(r[0]), int(r[1])) for r in await conn.fetch(_WAITERS_OF, item_id)]
            await conn.execute(_WAITERS_DROP, item_id)
            live: set[str] = set()
            if counts:
                owners = [owner for owner, _ in counts]
                live = {str(r[0]) for r in await conn.fetch(_LIVE_OWNERS, owners)}
            waiting = sum(n for owner, n in counts if owner in live)
            resolution = write(item, waiting)
            await conn.execute(_APPROVAL_INSERT, *_approval_params(resolution.record))
            if resolution.grant is not None:
                await conn.execute(_GRANT_UPSERT, *_grant_params(resolution.grant))
        return item, waiting

    async def leave_pending(self, item_id: str) -> bool:
        """A joined request stops waiting; False when the item was resolved or purged."""
        async with self._tx() as conn:
            # The pending row's lock orders this with a resolution's DELETE.
            still_pending = _updated(await conn.execute(_PENDING_LEAVE, item_id)) > 0
            if still_pending:
                await conn.execute(_WAITER_LEAVE, item_id, self.owner)
        return still_pending

    async def get_pending(self, item_id: str) -> PendingItem | None:
        """The pending item with this id (expired or not), or None."""
        row = await self._fetchrow(f"SELECT {_PENDING_COLS} FROM pending WHERE id = $1", item_id)
        return None if row is None else _pending_from(row)

    async def list_pending(self, now: float) -> list[PendingItem]:
        """Pending items with expires_at > now, oldest (first_seen) first."""
        rows = await self._fetch(
            f"SELECT {_PENDING_COLS} FROM pending WHERE expires_at > $1 ORDER BY first_seen, id",
            now,
        )
        return [_pending_from(r) for r in rows]

    async def delete_pending(self, item_id: str) -> bool:
        """Delete a pending item; False when the id is unknown."""
        return _deleted(await self._execute("DELETE FROM pending WHERE id = $1", item_id)) > 0

    async def purge_expired_pending(self, now: float) -> list[PendingItem]:
        """Delete the pending items with expires_at <= now and return them, oldest first.

        One DELETE ... RETURNING: replicas purging at once each get a disjoint share.
        """
        async with self._tx() as conn:
            rows = [
                _row(r)
                for r in await conn.fetch(
                    f"DELETE FROM pending WHERE expires_at <= $1 RETURNING {_PENDING_COLS}", now
                )
            ]
            await conn.execute(WAITERS_ORPHANS_SQL)
        items = [_pending_from(r) for r in rows]
        items.sort(key=lambda p: (p.first_seen, p.id))
        return items

    # --- approval history ---------------------------------------------------------------------

    async def record_approval(self, record: ApprovalRecord) -> None:
        """Append one approval-history row."""
        await self._execute(_APPROVAL_INSERT, *_approval_params(record))

    async def list_approvals(self, limit: int = 100) -> list[ApprovalRecord]:
        """The newest `limit` approval-history rows, newest first."""
        if limit <= 0:
            return []
        rows = await self._fetch(
            f"SELECT {_APPROVAL_COLS} FROM approvals ORDER BY seq DESC LIMIT $1", limit
        )
        return [_approval_from(r) for r in rows]

    async def latest_approval(self, item_id: str) -> ApprovalRecord | None:
        """The newest approval-history row for this pending item id, or None."""
        row = await self._fetchrow(_APPROVAL_LATEST, item_id)
        return None if row is None else _approval_from(row)

    # --- decision audit -----------------------------------------------------------------------

    async def record_decisions(self, records: Sequence[DecisionRecord]) -> None:
        """Append a batch of decision audit rows in one transaction, in the given order."""
        if not records:
            return
        async with self._tx() as conn:
            await conn.executemany(_DECISION_INSERT, [_decision_params(d) for d in records])

    async def list_decisions(
        self,
        limit: int = 100,
        host: str | None = None,
        decision: str | None = None,
        agent: str | None = None,
        reason: str | None = None,
        since: float | None = None,
    ) -> list[DecisionRecord]:
        """The newest `limit` decision rows matching the filters, newest first."""
        if limit <= 0:
            return []
        sql, params = _decisions_query(
            limit, host, decision, lambda n: f"${n}", agent=agent, reason=reason, since=since
        )
        rows = await self._fetch(sql, *params)
        return [_decision_from(r) for r in rows]

    async def prune_decisions(self, keep: int) -> int:
        """Keep the newest `keep` decision rows; return how many were deleted."""
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        if keep == 0:
            return _deleted(await self._execute("DELETE FROM decisions"))
        # seq < NULL (fewer than `keep` rows) matches nothing.
        status = await self._execute(
            "DELETE FROM decisions WHERE seq < "
            "(SELECT seq FROM decisions ORDER BY seq DESC LIMIT 1 OFFSET $1)",
            keep - 1,
        )
        return _deleted(status)

    async def prune_decisions_before(self, cutoff: float) -> int:
        return _deleted(await self._execute("DELETE FROM decisions WHERE at < $1", cutoff))

    async def prune_decisions_per_agent(self, keep: int) -> dict[str | None, int]:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        over = await self._fetch(
            "SELECT agent FROM decisions GROUP BY agent HAVING count(*) > $1", keep
        )
        pruned: dict[str | None, int] = {}
        for (agent,) in over:
            status = await self._execute(
                "DELETE FROM decisions WHERE agent IS NOT DISTINCT FROM $1 AND seq < (SELECT seq "
                "FROM decisions WHERE agent IS NOT DISTINCT FROM $1 ORDER BY seq DESC "
                "LIMIT 1 OFFSET $2)",
                agent,
                keep - 1,
            )
            pruned[agent] = _deleted(status)
        return pruned

    # --- fleet signalling ---------------------------------------------------------------------

    async def notify(self, channel: str, payload: str) -> None:
        """NOTIFY every replica listening on `channel` (delivered when this call commits)."""
        await self._execute("SELECT pg_notify($1, $2)", channel, payload)

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
            await conn.execute(_REKEY_OWNER, owner, self.owner)
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
