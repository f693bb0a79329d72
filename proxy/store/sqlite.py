"""SQLite state store (aiosqlite, WAL): one connection, one write transaction at a time.

The SQL here (with `?` placeholders) is shared with the PostgreSQL store, which renumbers the
placeholders: keep it portable (SQLite >= 3.35 for RETURNING, PostgreSQL >= 12).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from proxy.policy.model import Action, Scope
from proxy.records import ApprovalRecord, DecisionRecord, Grant, GrantFor, PendingItem
from proxy.render import FIELD_LIMIT, storable_text
from proxy.statedir import create_private_file, make_private_dir, tighten_private_file
from proxy.store.base import NotifyCallback, ResolutionWriter, StoreError
from proxy.store.migrations import (
    CURRENT_VERSION_SQL,
    SCHEMA_VERSION_DDL,
    pending_migrations,
)

BUSY_TIMEOUT_MS = 5000
PING_TIMEOUT = 2.0
MIN_SQLITE = (3, 35, 0)  # INSERT ... ON CONFLICT ... RETURNING and DELETE ... RETURNING
# Count, summed creation times and the lowest and highest id: adding, revoking or using up a
# grant moves at least one of them (ids are random, creation times differ).
GRANTS_SIGNATURE_SQL = (
    "SELECT count(*), coalesce(sum(created_at), 0), coalesce(min(id), '') || '/' || "
    "coalesce(max(id), '') FROM grants"
)
_SIDE_FILES = ("-wal", "-shm", "-journal")  # files SQLite keeps next to the database

_GRANT_COLS = "id, pattern, action, scope, agent, created_by, note, created_at, expires_at, session"
_PENDING_COLS = (
    "id, host, port, scheme, method, agent, session, first_seen, last_seen, count, "
    "expires_at, review, justification"
)
# What a write stores: the read columns plus the normalised uniqueness key (see migration 2).
_PENDING_WRITE_COLS = f"{_PENDING_COLS}, agent_key"
_APPROVAL_COLS = (
    "id, state, host, port, agent, scope, grant_for, approver, reviewer, note, wait_ms, at, "
    "grant_id, review"
)
_DECISION_COLS = (
    "request_id, at, decision, reason, host, port, method, transport, agent, session, rule, "
    "source, client_address, peer_address, mode, path, pending_id"
)

Row = Sequence[Any]
# SQLITE_MAX_VARIABLE_NUMBER: 32,766 since SQLite 3.32, 999 before.
_MAX_SQL_PARAMS = 32_766 if sqlite3.sqlite_version_info >= (3, 32) else 999


def _marks(cols: str) -> str:
    return ", ".join("?" for _ in cols.split(","))


_DECISION_MARKS = f"({_marks(_DECISION_COLS)})"  # one row's placeholders
_DECISIONS_PER_INSERT = _MAX_SQL_PARAMS // len(_DECISION_COLS.split(","))


def _decisions_query(
    limit: int,
    host: str | None,
    decision: str | None,
    mark: Callable[[int], str],
    agent: str | None = None,
    reason: str | None = None,
    since: float | None = None,
) -> tuple[str, list[Any]]:
    """The newest-first decision query for both stores; `mark(n)` is the n-th placeholder.
    Every filter given must match: host, decision, agent, reason exactly; `since` (unix
    seconds) keeps rows recorded at or after it."""
    where: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("host", host),
        ("decision", decision),
        ("agent", agent),
        ("reason", reason),
    ):
        if value is not None:
            params.append(storable_text(value, None))  # compared as the rows were stored
            where.append(f"{column} = {mark(len(params))}")
    if since is not None:
        params.append(since)
        where.append(f"at >= {mark(len(params))}")
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    params.append(limit)
    order = f"ORDER BY seq DESC LIMIT {mark(len(params))}"
    return f"SELECT {_DECISION_COLS} FROM decisions {clause}{order}", params


def _upsert_sql(table: str, cols: str) -> str:
    """INSERT ... ON CONFLICT (id) DO UPDATE: same syntax in SQLite >= 3.24 and PostgreSQL."""
    names = [c.strip() for c in cols.split(",")]
    updates = ", ".join(f"{n} = excluded.{n}" for n in names if n != "id")
    return (
        f"INSERT INTO {table} ({cols}) VALUES ({_marks(cols)}) "
        f"ON CONFLICT (id) DO UPDATE SET {updates}"
    )


def _pending_upsert_sql() -> str:
    """Store an item, replacing whichever row holds its (agent_key, host, port)."""
    updates = ", ".join(
        f"{n} = excluded.{n}"
        for n in (c.strip() for c in _PENDING_COLS.split(","))
        if n not in ("host", "port")
    )
    return (
        f"INSERT INTO pending ({_PENDING_WRITE_COLS}) VALUES ({_marks(_PENDING_WRITE_COLS)}) "
        f"ON CONFLICT (agent_key, host, port) DO UPDATE SET {updates}"
    )


def _pending_join_sql() -> str:
    """One atomic statement: join the live row for the key, or replace an expired one.

    SET expressions see the row as it was before the update (SQLite and PostgreSQL alike), so
    every column can test the same liveness condition.
    """
    live = "pending.expires_at > excluded.last_seen"

    def keep(col: str) -> str:
        return f"{col} = CASE WHEN {live} THEN pending.{col} ELSE excluded.{col} END"

    updates = ", ".join(
        [
            *(
                keep(c)
                for c in ("id", "scheme", "method", "agent", "session", "first_seen", "review")
            ),
            "last_seen = excluded.last_seen",
            # the latest reason an agent gave wins (a retry may add one)
            f"justification = CASE WHEN {live} THEN "
            "COALESCE(excluded.justification, pending.justification) "
            "ELSE excluded.justification END",
            f"count = CASE WHEN {live} THEN pending.count + 1 ELSE excluded.count END",
            # max() is spelt GREATEST() in PostgreSQL; CASE is portable.
            f"expires_at = CASE WHEN {live} AND pending.expires_at > excluded.expires_at "
            "THEN pending.expires_at ELSE excluded.expires_at END",
        ]
    )
    # The joining request counts as waiting (a new row: 1; an expired row replaced: 1).
    waiting = f"waiting = CASE WHEN {live} THEN pending.waiting + 1 ELSE 1 END"
    return (
        f"INSERT INTO pending ({_PENDING_WRITE_COLS}, waiting) "
        f"VALUES ({_marks(_PENDING_WRITE_COLS)}, 1) "
        f"ON CONFLICT (agent_key, host, port) DO UPDATE SET {updates}, {waiting} "
        f"RETURNING {_PENDING_COLS}"
    )


# An item's key never changes in practice; if a caller re-keys an id, drop the old row first so
# the key upsert cannot collide on the primary key.
PENDING_REKEY_SQL = (
    "DELETE FROM pending WHERE id = ? AND NOT (agent_key = ? AND host = ? AND port = ?)"
)
GRANT_UPSERT_SQL = _upsert_sql("grants", _GRANT_COLS)
PENDING_UPSERT_SQL = _pending_upsert_sql()
PENDING_JOIN_SQL = _pending_join_sql()
PENDING_CLAIM_SQL = f"DELETE FROM pending WHERE id = ? RETURNING {_PENDING_COLS}"
# Resolving: only a live item, and how many requests still wait on it (the last column).
PENDING_RESOLVE_SQL = (
    f"DELETE FROM pending WHERE id = ? AND expires_at > ? RETURNING {_PENDING_COLS}, waiting"
)
# A request stops waiting: one row updated while the item is still pending, none once claimed
# (the row lock orders it with a concurrent resolution).
PENDING_LEAVE_SQL = (
    "UPDATE pending SET waiting = CASE WHEN waiting > 0 THEN waiting - 1 ELSE 0 END WHERE id = ?"
)
# Who waits on an item: a count per store instance (`owner`), so the waiters of an instance that
# died can be left out (see `Store.resolve_pending`).
WAITER_JOIN_SQL = (
    "INSERT INTO pending_waiters (item_id, owner, count) VALUES (?, ?, 1) "
    "ON CONFLICT (item_id, owner) DO UPDATE SET count = pending_waiters.count + 1"
)
WAITER_LEAVE_SQL = (
    "UPDATE pending_waiters SET count = count - 1 WHERE item_id = ? AND owner = ? AND count > 0"
)
WAITERS_OF_SQL = "SELECT owner, count FROM pending_waiters WHERE item_id = ? AND count > 0"
WAITERS_DROP_SQL = "DELETE FROM pending_waiters WHERE item_id = ?"
# Counts left by items that are gone (an expired item replaced by a join, a purge).
WAITERS_ORPHANS_SQL = (
    "DELETE FROM pending_waiters WHERE NOT EXISTS "
    "(SELECT 1 FROM pending WHERE pending.id = pending_waiters.item_id)"
)
# Live once passes for a pattern that apply to an agent (its own first, then everyone's).
ONCE_PASSES_SQL = (
    "SELECT id FROM grants WHERE scope = 'once' AND pattern = ? "
    "AND (agent IS NULL OR agent = ?) AND (expires_at IS NULL OR expires_at > ?) "
    "ORDER BY agent IS NULL, created_at, id"
)
# The conditional delete that hands one pass to exactly one caller.
ONCE_TAKE_SQL = f"DELETE FROM grants WHERE id = ? AND scope = 'once' RETURNING {_GRANT_COLS}"
APPROVAL_INSERT_SQL = f"INSERT INTO approvals ({_APPROVAL_COLS}) VALUES ({_marks(_APPROVAL_COLS)})"
APPROVAL_LATEST_SQL = (
    f"SELECT {_APPROVAL_COLS} FROM approvals WHERE id = ? ORDER BY seq DESC LIMIT 1"
)


def _storable(params: tuple[Any, ...], limit: int | None = None) -> tuple[Any, ...]:
    """Every text parameter in a form both databases store (see `storable_text`): a value an
    agent sent (an undecodable byte, a NUL) must never make a write fail."""
    return tuple(storable_text(v, limit) if isinstance(v, str) else v for v in params)


def _rekey_params(p: PendingItem) -> tuple[Any, ...]:
    return _storable((p.id, _agent_key(p.agent), p.host, p.port))


def _agent_key(agent: str | None) -> str:
    return agent or ""


def _enum_value(value: Scope | GrantFor | None) -> str | None:
    return None if value is None else value.value


def _grant_params(g: Grant) -> tuple[Any, ...]:
    return _storable(
        (
            g.id,
            g.pattern,
            g.action.value,
            g.scope.value,
            g.agent,
            g.created_by,
            g.note,
            g.created_at,
            g.expires_at,
            g.session,
        )
    )


def _grant_from(r: Row) -> Grant:
    return Grant(
        id=r[0],
        pattern=r[1],
        action=Action(r[2]),
        scope=Scope(r[3]),
        agent=r[4],
        created_by=r[5],
        note=r[6],
        created_at=r[7],
        expires_at=r[8],
        session=r[9],
    )


def _pending_params(p: PendingItem) -> tuple[Any, ...]:
    return _storable(
        (
            p.id,
            p.host,
            p.port,
            p.scheme,
            p.method,
            p.agent,
            p.session,
            p.first_seen,
            p.last_seen,
            p.count,
            p.expires_at,
            p.review,
            p.justification,
            _agent_key(p.agent),
        )
    )


def _pending_from(r: Row) -> PendingItem:
    return PendingItem(
        id=r[0],
        host=r[1],
        port=r[2],
        scheme=r[3],
        method=r[4],
        agent=r[5],
        session=r[6],
        first_seen=r[7],
        last_seen=r[8],
        count=r[9],
        expires_at=r[10],
        review=r[11],
        justification=r[12],
    )


def _approval_params(a: ApprovalRecord) -> tuple[Any, ...]:
    return _storable(
        (
            a.id,
            a.state,
            a.host,
            a.port,
            a.agent,
            _enum_value(a.scope),
            _enum_value(a.grant_for),
            a.approver,
            a.reviewer,
            a.note,
            a.wait_ms,
            a.at,
            a.grant_id,
            a.review,
        )
    )


def _approval_from(r: Row) -> ApprovalRecord:
    return ApprovalRecord(
        id=r[0],
        state=r[1],
        host=r[2],
        port=r[3],
        agent=r[4],
        scope=None if r[5] is None else Scope(r[5]),
        grant_for=None if r[6] is None else GrantFor(r[6]),
        approver=r[7],
        reviewer=r[8],
        note=r[9],
        wait_ms=r[10],
        at=r[11],
        grant_id=r[12],
        review=r[13],
    )


def _decision_params(d: DecisionRecord) -> tuple[Any, ...]:
    """An audit row's values, each text capped at FIELD_LIMIT characters."""
    return _storable(
        (
            d.request_id,
            d.at,
            d.decision,
            d.reason,
            d.host,
            d.port,
            d.method,
            d.transport,
            d.agent,
            d.session,
            d.rule,
            d.source,
            d.client_address,
            d.peer_address,
            d.mode,
            d.path,
            d.pending_id,
        ),
        FIELD_LIMIT,
    )


def _decision_from(r: Row) -> DecisionRecord:
    return DecisionRecord(
        request_id=r[0],
        at=r[1],
        decision=r[2],
        reason=r[3],
        host=r[4],
        port=r[5],
        method=r[6],
        transport=r[7],
        agent=r[8],
        session=r[9],
        rule=r[10],
        source=r[11],
        client_address=r[12],
        peer_address=r[13],
        mode=r[14],
        path=r[15],
        pending_id=r[16],
    )


def _process_alive(owner: str) -> bool:
    """Whether the process a SQLite store instance's `owner` names still runs (same host)."""
    try:
        os.kill(int(owner), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True  # another user's process, or an owner this version does not read: count it
    return True


def _reason(exc: BaseException) -> str:
    """A short lower-case reason for an OS or SQLite error."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc) or type(exc).__name__
    if "readonly" in text or "read-only" in text:
        return f"permission denied ({text})"
    return text


def _prepare(path: Path) -> Path:
    """Create the parent directory and fail early with 'permission denied' (blocking I/O)."""
    path = path.expanduser()
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(parent))
            break
    make_private_dir(path.parent)
    if path.exists():
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        if not os.access(path, os.R_OK | os.W_OK):
            raise PermissionError(13, "Permission denied", str(path))
    # WAL mode needs to create <db>-wal and <db>-shm next to the database.
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied", str(path.parent))
    # Grants, pending items and the audit are for the proxy's user only. Create the file 0600
    # before SQLite does (it would apply the umask); SQLite gives new -wal/-shm files the
    # database's mode, and ones left by an older version are tightened here.
    create_private_file(path)
    for suffix in _SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            tighten_private_file(path.with_name(path.name + suffix))
    return path


class SqliteStore:
    """`Store` on one SQLite file; calls are serialised and each write commits before returning."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        """Wrap an open, migrated connection; use `SqliteStore.open` instead."""
        self._conn = conn
        self.path = path
        self._lock = asyncio.Lock()
        self._closed = False
        # Kept only so subscribe() is well-defined: one SQLite file has no fleet to hear from
        # (worker processes on one host re-read the shared file instead).
        self._subscribers: list[NotifyCallback] = []
        # Processes sharing the file are told apart by pid: a dead one's waiters stop counting.
        self.owner = str(os.getpid())

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        """Open (creating if needed) the database at `path` and bring its schema up to date."""
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            need = ".".join(map(str, MIN_SQLITE))
            raise StoreError(
                f"cannot open state database {path}: SQLite {sqlite3.sqlite_version} is too old "
                f"(need >= {need}); upgrade the system SQLite or use --store postgresql://..."
            )
        try:
            path = await asyncio.to_thread(_prepare, Path(path))
            # isolation_level=None: no implicit transactions; we BEGIN/COMMIT explicitly.
            conn = await aiosqlite.connect(str(path), isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open state database {path}: {_reason(exc)}") from exc
        try:
            await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            row = await _enable_wal(conn)
            if row is None or str(row[0]).lower() != "wal":
                mode = None if row is None else row[0]
                raise StoreError(
                    f"cannot open state database {path}: WAL journal mode unavailable "
                    f"(got {mode}); use a local filesystem"
                )
            await conn.execute("PRAGMA synchronous = NORMAL")
            await conn.execute("PRAGMA foreign_keys = ON")
            await _migrate(conn, str(path))
        except BaseException as exc:
            await conn.close()
            if isinstance(exc, StoreError):
                raise
            if isinstance(exc, (OSError, sqlite3.Error)):
                raise StoreError(f"cannot open state database {path}: {_reason(exc)}") from exc
            raise
        return cls(conn, path)

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            await self._conn.close()

    async def ping(self) -> bool:
        """True when the database answers a trivial query within PING_TIMEOUT; never raises."""
        if self._closed:
            return False
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                await self._fetchall("SELECT 1")
        except Exception:
            return False
        return True

    # --- plumbing -----------------------------------------------------------------------------

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One serialised write transaction, committed on success, rolled back on error."""
        async with self._lock, self._errors():
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                await _rollback(self._conn)
                raise
            await self._conn.execute("COMMIT")

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        """Serialised read access (never sees another call's half-done transaction)."""
        async with self._lock, self._errors():
            yield self._conn

    @asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        if self._closed:
            raise StoreError(f"state database {self.path} is closed")
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"state database {self.path}: {_reason(exc)}") from exc

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        async with self._read() as conn, conn.execute(sql, tuple(params)) as cur:
            return list(await cur.fetchall())

    async def _delete_by_id(self, table: str, item_id: str) -> bool:
        async with (
            self._write() as conn,
            conn.execute(f"DELETE FROM {table} WHERE id = ?", (item_id,)) as cur,
        ):
            return cur.rowcount > 0

    # --- grants -------------------------------------------------------------------------------

    async def add_grant(self, grant: Grant) -> None:
        """Persist an `always` or `once` grant (replacing one with the same id)."""
        async with self._write() as conn:
            await conn.execute(GRANT_UPSERT_SQL, _grant_params(grant))

    async def list_grants(self, now: float | None = None) -> list[Grant]:
        """Grants not expired at `now` (default: the current time), oldest first."""
        at = time.time() if now is None else now
        rows = await self._fetchall(
            f"SELECT {_GRANT_COLS} FROM grants WHERE expires_at IS NULL OR expires_at > ? "
            "ORDER BY created_at, id",
            (at,),
        )
        return [_grant_from(r) for r in rows]

    async def delete_grant(self, grant_id: str) -> bool:
        """Delete a grant; False when the id is unknown."""
        return await self._delete_by_id("grants", grant_id)

    async def consume_grant(self, grant_id: str) -> bool:
        """Use up a grant: True for exactly one caller (the write lock serialises processes)."""
        return await self._delete_by_id("grants", grant_id)

    async def take_once_pass(self, pattern: str, agent: str | None, now: float) -> Grant | None:
        """Use up one live `once` grant for `pattern` that applies to `agent` (see Store)."""
        candidates = await self._fetchall(ONCE_PASSES_SQL, _storable((pattern, agent, now)))
        for (grant_id,) in candidates:
            async with self._write() as conn, conn.execute(ONCE_TAKE_SQL, (grant_id,)) as cur:
                row = await cur.fetchone()
            if row is not None:
                return _grant_from(row)
        return None

    async def grants_signature(self) -> tuple[int, float, str]:
        rows = await self._fetchall(GRANTS_SIGNATURE_SQL)
        count, created, ids = rows[0]
        return int(count), float(created), str(ids)

    # --- pending items ------------------------------------------------------------------------

    async def upsert_pending(self, item: PendingItem) -> None:
        """Insert a pending item or replace the one with the same id or the same key."""
        async with self._write() as conn:
            await conn.execute(PENDING_REKEY_SQL, _rekey_params(item))
            await conn.execute(PENDING_UPSERT_SQL, _pending_params(item))

    async def join_pending(self, item: PendingItem) -> tuple[PendingItem, bool]:
        """Join the live item for item's (agent, host, port) or store `item`; True if created."""
        async with self._write() as conn:
            async with conn.execute(PENDING_JOIN_SQL, _pending_params(item)) as cur:
                row = await cur.fetchone()
            if row is None:  # RETURNING always yields the inserted or updated row
                raise StoreError(f"state database {self.path}: join_pending returned no row")
            got = _pending_from(row)
            await conn.execute(WAITER_JOIN_SQL, (got.id, self.owner))
        return got, got.id == item.id

    async def claim_pending(self, item_id: str) -> PendingItem | None:
        """Delete and return a pending item; None when another caller claimed it first."""
        async with (
            self._write() as conn,
            conn.execute(PENDING_CLAIM_SQL, (item_id,)) as cur,
        ):
            row = await cur.fetchone()
        return None if row is None else _pending_from(row)

    async def resolve_pending(
        self, item_id: str, now: float, write: ResolutionWriter
    ) -> tuple[PendingItem, int] | None:
        """Claim a live item and store its resolution in one transaction (see Store)."""
        async with self._write() as conn:
            async with conn.execute(PENDING_RESOLVE_SQL, (item_id, now)) as cur:
                row = await cur.fetchone()
            if row is None:
                return None
            item = _pending_from(row)
            async with conn.execute(WAITERS_OF_SQL, (item_id,)) as cur:
                counts = [(str(owner), int(n)) for owner, n in await cur.fetchall()]
            await conn.execute(WAITERS_DROP_SQL, (item_id,))
            waiting = sum(n for owner, n in counts if _process_alive(owner))
            resolution = write(item, waiting)
            await conn.execute(APPROVAL_INSERT_SQL, _approval_params(resolution.record))
            if resolution.grant is not None:
                await conn.execute(GRANT_UPSERT_SQL, _grant_params(resolution.grant))
        return item, waiting

    async def leave_pending(self, item_id: str) -> bool:
        """A joined request stops waiting; False when the item was resolved or purged."""
        async with self._write() as conn:
            async with conn.execute(PENDING_LEAVE_SQL, (item_id,)) as cur:
                still_pending = cur.rowcount > 0
            if still_pending:
                await conn.execute(WAITER_LEAVE_SQL, (item_id, self.owner))
        return still_pending

    async def get_pending(self, item_id: str) -> PendingItem | None:
        """The pending item with this id (expired or not), or None."""
        rows = await self._fetchall(f"SELECT {_PENDING_COLS} FROM pending WHERE id = ?", (item_id,))
        return _pending_from(rows[0]) if rows else None

    async def list_pending(self, now: float) -> list[PendingItem]:
        """Pending items with expires_at > now, oldest (first_seen) first."""
        rows = await self._fetchall(
            f"SELECT {_PENDING_COLS} FROM pending WHERE expires_at > ? ORDER BY first_seen, id",
            (now,),
        )
        return [_pending_from(r) for r in rows]

    async def delete_pending(self, item_id: str) -> bool:
        """Delete a pending item; False when the id is unknown."""
        return await self._delete_by_id("pending", item_id)

    async def purge_expired_pending(self, now: float) -> list[PendingItem]:
        """Delete the pending items with expires_at <= now and return them, oldest first."""
        async with self._write() as conn:
            async with conn.execute(
                f"SELECT {_PENDING_COLS} FROM pending WHERE expires_at <= ? "
                "ORDER BY first_seen, id",
                (now,),
            ) as cur:
                rows = list(await cur.fetchall())
            if rows:
                await conn.executemany("DELETE FROM pending WHERE id = ?", [(r[0],) for r in rows])
            await conn.execute(WAITERS_ORPHANS_SQL)
        return [_pending_from(r) for r in rows]

    # --- approval history ---------------------------------------------------------------------

    async def record_approval(self, record: ApprovalRecord) -> None:
        """Append one approval-history row."""
        async with self._write() as conn:
            await conn.execute(APPROVAL_INSERT_SQL, _approval_params(record))

    async def list_approvals(self, limit: int = 100) -> list[ApprovalRecord]:
        """The newest `limit` approval-history rows, newest first."""
        if limit <= 0:
            return []
        rows = await self._fetchall(
            f"SELECT {_APPROVAL_COLS} FROM approvals ORDER BY seq DESC LIMIT ?", (limit,)
        )
        return [_approval_from(r) for r in rows]

    async def latest_approval(self, item_id: str) -> ApprovalRecord | None:
        """The newest approval-history row for this pending item id, or None."""
        rows = await self._fetchall(APPROVAL_LATEST_SQL, (item_id,))
        return _approval_from(rows[0]) if rows else None

    # --- decision audit -----------------------------------------------------------------------

    async def record_decisions(self, records: Sequence[DecisionRecord]) -> None:
        """Append a batch of decision audit rows in one transaction, in the given order."""
        if not records:
            return
        # One multi-row INSERT per chunk: executemany steps once per row, and each step hands
        # the GIL to this connection's thread and back, which slowed the event loop.
        rows = [_decision_params(d) for d in records]
        async with self._write() as conn:
            for start in range(0, len(rows), _DECISIONS_PER_INSERT):
                chunk = rows[start : start + _DECISIONS_PER_INSERT]
                values = ", ".join([_DECISION_MARKS] * len(chunk))
                sql = f"INSERT INTO decisions ({_DECISION_COLS}) VALUES {values}"
                await conn.execute(sql, [value for row in chunk for value in row])

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
            limit, host, decision, lambda _n: "?", agent=agent, reason=reason, since=since
        )
        rows = await self._fetchall(sql, params)
        return [_decision_from(r) for r in rows]

    async def prune_decisions(self, keep: int) -> int:
        """Keep the newest `keep` decision rows; return how many were deleted."""
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        async with self._write() as conn:
            params: tuple[Any, ...] = ()
            if keep == 0:
                sql = "DELETE FROM decisions"
            else:
                async with conn.execute(
                    "SELECT seq FROM decisions ORDER BY seq DESC LIMIT 1 OFFSET ?", (keep - 1,)
                ) as cur:
                    row = await cur.fetchone()
                if row is None:
                    return 0
                sql, params = "DELETE FROM decisions WHERE seq < ?", (row[0],)
            async with conn.execute(sql, params) as cur:
                return max(cur.rowcount, 0)

    async def prune_decisions_before(self, cutoff: float) -> int:
        async with (
            self._write() as conn,
            conn.execute("DELETE FROM decisions WHERE at < ?", (cutoff,)) as cur,
        ):
            return max(cur.rowcount, 0)

    async def prune_decisions_per_agent(self, keep: int) -> dict[str | None, int]:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        over = await self._fetchall(
            "SELECT agent FROM decisions GROUP BY agent HAVING count(*) > ?", (keep,)
        )
        pruned: dict[str | None, int] = {}
        for (agent,) in over:
            async with (
                self._write() as conn,
                conn.execute(
                    "DELETE FROM decisions WHERE agent IS ? AND seq < (SELECT seq FROM decisions "
                    "WHERE agent IS ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                    (agent, agent, keep - 1),
                ) as cur,
            ):
                pruned[agent] = max(cur.rowcount, 0)
        return pruned

    # --- fleet signalling ---------------------------------------------------------------------

    async def notify(self, channel: str, payload: str) -> None:
        """No-op: a SQLite store has no replicas to signal."""

    def subscribe(self, callback: NotifyCallback) -> None:
        """Accept the callback; SQLite never calls it (there are no notifications)."""
        self._subscribers.append(callback)


async def _rollback(conn: aiosqlite.Connection) -> None:
    """Roll back, tolerating a transaction SQLite already ended itself (e.g. on SQLITE_FULL)."""
    with contextlib.suppress(sqlite3.Error):
        await conn.execute("ROLLBACK")


async def _enable_wal(conn: aiosqlite.Connection) -> Row | None:
    """PRAGMA journal_mode = WAL, retried while another process switches the same new file.

    Changing the journal mode can fail with SQLITE_BUSY at once, without the busy handler, when
    several processes open a fresh database together (e.g. N workers starting at once).
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.01
    while True:
        try:
            async with conn.execute("PRAGMA journal_mode = WAL") as cur:
                return await cur.fetchone()
        except sqlite3.OperationalError as exc:
            busy = "locked" in str(exc) or "busy" in str(exc)
            if not busy or time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


async def _migrate(conn: aiosqlite.Connection, where: str) -> None:
    """Apply the migrations this database lacks, each in its own transaction."""
    await conn.execute(SCHEMA_VERSION_DDL)
    while True:
        # BEGIN IMMEDIATE takes the write lock, so two processes opening at once cannot both
        # apply the same migration: the second re-reads the version after the first commits.
        await conn.execute("BEGIN IMMEDIATE")
        try:
            async with conn.execute(CURRENT_VERSION_SQL) as cur:
                row = await cur.fetchone()
            todo = pending_migrations(None if row is None else row[0], where)
            if not todo:
                await conn.execute("COMMIT")
                return
            step = todo[0]
            for statement in step.render("sqlite"):
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                (step.version, time.time()),
            )
        except BaseException:
            await _rollback(conn)
            raise
        await conn.execute("COMMIT")
