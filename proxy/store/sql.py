"""The store's queries, written once over a small driver per database.

`SqlStore` implements every `Store` method in SQL portable to SQLite (>= 3.35: RETURNING,
upserts) and PostgreSQL (>= 12), with `?` placeholders. A `Driver` supplies what differs:
sessions (a serialised SQLite connection, or a pooled PostgreSQL one) whose `?` it renumbers
when its database wants `$n`, row counts, multi-row inserts, transactions, notifications
(PostgreSQL LISTEN/NOTIFY; none for SQLite), which store instances are still alive, and the
words its errors use. Row mapping is derived from the record types (`Table`): a column per
dataclass field, enums stored as their values, every text made storable.
"""

from __future__ import annotations

import dataclasses
import enum
import time
import types
import typing
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from proxy.records import ApprovalRecord, DecisionRecord, Grant, PendingItem
from proxy.render import FIELD_LIMIT, storable_text
from proxy.store.base import NotifyCallback, ResolutionWriter, StoreError

Row = Sequence[Any]


class Table[R]:
    """A record type's table: its columns are the dataclass's fields, in order."""

    def __init__(self, name: str, record: type[R], text_limit: int | None = None) -> None:
        self.name = name
        self.record = record
        hints = typing.get_type_hints(record)
        self.fields = tuple(f.name for f in dataclasses.fields(record))  # type: ignore[arg-type]
        self.cols = ", ".join(self.fields)
        self.marks = ", ".join("?" for _ in self.fields)
        self._enums = tuple(_enum_of(hints[name]) for name in self.fields)
        self._limit = text_limit

    def params(self, record: R) -> tuple[Any, ...]:
        """A record's values in column order, as both databases store them: enums by value,
        every text as `storable_text` makes it (an undecodable byte or a NUL an agent sent
        must never make a write fail)."""
        return tuple(_storable(getattr(record, name), self._limit) for name in self.fields)

    def from_row(self, row: Row) -> R:
        """The record a row read with `self.cols` holds (extra trailing columns ignored)."""
        values = {
            name: (kind(value) if kind is not None and value is not None else value)
            for name, kind, value in zip(self.fields, self._enums, row, strict=False)
        }
        return self.record(**values)


def _enum_of(hint: Any) -> type[enum.Enum] | None:
    """The enum type a field holds (`Scope`, `Scope | None`), else None."""
    candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, enum.Enum):
            return candidate
    return None


def _storable(value: Any, limit: int | None) -> Any:
    if isinstance(value, enum.Enum):
        value = value.value
    return storable_text(value, limit) if isinstance(value, str) else value


GRANTS = Table("grants", Grant)
PENDING = Table("pending", PendingItem)
APPROVALS = Table("approvals", ApprovalRecord)
DECISIONS = Table("decisions", DecisionRecord, FIELD_LIMIT)  # each text capped for the audit

# --- the queries ----------------------------------------------------------------------------

# Count, summed creation times and the lowest and highest id: adding, revoking or using up a
# grant moves at least one of them (ids are random, creation times differ).
GRANTS_SIGNATURE_SQL = (
    "SELECT count(*), coalesce(sum(created_at), 0), coalesce(min(id), '') || '/' || "
    "coalesce(max(id), '') FROM grants"
)


def _upsert_sql(table: Table[Any]) -> str:
    """INSERT ... ON CONFLICT (id) DO UPDATE: same syntax in SQLite >= 3.24 and PostgreSQL."""
    updates = ", ".join(f"{n} = excluded.{n}" for n in table.fields if n != "id")
    return (
        f"INSERT INTO {table.name} ({table.cols}) VALUES ({table.marks}) "
        f"ON CONFLICT (id) DO UPDATE SET {updates}"
    )


# What a pending write stores: the record's columns plus the normalised uniqueness key
# (migration 2: agent is nullable and NULLs never collide in a UNIQUE index).
_PENDING_WRITE_COLS = f"{PENDING.cols}, agent_key"
_PENDING_WRITE_MARKS = f"{PENDING.marks}, ?"


def _pending_upsert_sql() -> str:
    """Store an item, replacing whichever row holds its (agent_key, host, port)."""
    updates = ", ".join(f"{n} = excluded.{n}" for n in PENDING.fields if n not in ("host", "port"))
    return (
        f"INSERT INTO pending ({_PENDING_WRITE_COLS}) VALUES ({_PENDING_WRITE_MARKS}) "
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
            # the joining request counts as waiting (a new row: 1; an expired row replaced: 1)
            f"waiting = CASE WHEN {live} THEN pending.waiting + 1 ELSE 1 END",
        ]
    )
    return (
        f"INSERT INTO pending ({_PENDING_WRITE_COLS}, waiting) "
        f"VALUES ({_PENDING_WRITE_MARKS}, 1) "
        f"ON CONFLICT (agent_key, host, port) DO UPDATE SET {updates} "
        f"RETURNING {PENDING.cols}"
    )


GRANT_UPSERT_SQL = _upsert_sql(GRANTS)
GRANTS_LIVE_SQL = (
    f"SELECT {GRANTS.cols} FROM grants WHERE expires_at IS NULL OR expires_at > ? "
    "ORDER BY created_at, id"
)
# Live once passes for a pattern that apply to an agent (its own first, then everyone's).
ONCE_PASSES_SQL = (
    "SELECT id FROM grants WHERE scope = 'once' AND pattern = ? "
    "AND (agent IS NULL OR agent = ?) AND (expires_at IS NULL OR expires_at > ?) "
    "ORDER BY agent IS NULL, created_at, id"
)
# The conditional delete that hands one pass to exactly one caller.
ONCE_TAKE_SQL = f"DELETE FROM grants WHERE id = ? AND scope = 'once' RETURNING {GRANTS.cols}"

# An item's key never changes in practice; if a caller re-keys an id, drop the old row first so
# the key upsert cannot collide on the primary key.
PENDING_REKEY_SQL = (
    "DELETE FROM pending WHERE id = ? AND NOT (agent_key = ? AND host = ? AND port = ?)"
)
PENDING_UPSERT_SQL = _pending_upsert_sql()
PENDING_JOIN_SQL = _pending_join_sql()
PENDING_CLAIM_SQL = f"DELETE FROM pending WHERE id = ? RETURNING {PENDING.cols}"
PENDING_BY_ID_SQL = f"SELECT {PENDING.cols} FROM pending WHERE id = ?"
PENDING_LIVE_SQL = (
    f"SELECT {PENDING.cols} FROM pending WHERE expires_at > ? ORDER BY first_seen, id"
)
PENDING_PURGE_SQL = f"DELETE FROM pending WHERE expires_at <= ? RETURNING {PENDING.cols}"
# Resolving: only a live item.
PENDING_RESOLVE_SQL = (
    f"DELETE FROM pending WHERE id = ? AND expires_at > ? RETURNING {PENDING.cols}"
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
WAITERS_REKEY_SQL = "UPDATE pending_waiters SET owner = ? WHERE owner = ?"
# Counts left by items that are gone (an expired item replaced by a join, a purge).
WAITERS_ORPHANS_SQL = (
    "DELETE FROM pending_waiters WHERE NOT EXISTS "
    "(SELECT 1 FROM pending WHERE pending.id = pending_waiters.item_id)"
)

APPROVAL_INSERT_SQL = f"INSERT INTO approvals ({APPROVALS.cols}) VALUES ({APPROVALS.marks})"
APPROVALS_NEWEST_SQL = f"SELECT {APPROVALS.cols} FROM approvals ORDER BY seq DESC LIMIT ?"
APPROVAL_LATEST_SQL = (
    f"SELECT {APPROVALS.cols} FROM approvals WHERE id = ? ORDER BY seq DESC LIMIT 1"
)

# seq < NULL (fewer than `keep` rows) matches nothing.
DECISIONS_KEEP_SQL = (
    "DELETE FROM decisions WHERE seq < "
    "(SELECT seq FROM decisions ORDER BY seq DESC LIMIT 1 OFFSET ?)"
)
DECISIONS_OVER_SQL = "SELECT agent FROM decisions GROUP BY agent HAVING count(*) > ?"


def decisions_query(
    limit: int,
    host: str | None = None,
    decision: str | None = None,
    agent: str | None = None,
    reason: str | None = None,
    since: float | None = None,
) -> tuple[str, list[Any]]:
    """The newest-first decision query. Every filter given must match: host, decision, agent,
    reason exactly; `since` (unix seconds) keeps rows recorded at or after it."""
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
            where.append(f"{column} = ?")
    if since is not None:
        params.append(since)
        where.append("at >= ?")
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    params.append(limit)
    return f"SELECT {DECISIONS.cols} FROM decisions {clause}ORDER BY seq DESC LIMIT ?", params


# --- what a driver provides -------------------------------------------------------------------


class Session(Protocol):
    """One connection's worth of access, inside or outside a transaction; `?` placeholders."""

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        ...

    async def insert_rows(self, table: Table[Any], rows: Sequence[tuple[Any, ...]]) -> None:
        """Append rows (in order) as fast as this database takes them."""
        ...

    async def live_owners(self, owners: Sequence[str]) -> set[str]:
        """Which of these store instances (see `Driver.owner`) still run."""
        ...


class Driver(Protocol):
    # The store instance this process is to the others: waiters are counted under it.
    owner: str
    # How this database compares two values equal when both may be NULL.
    same: str
    # Where the data lives, for messages ("state database /var/lib/x.db").
    label: str

    def reading(self) -> AbstractAsyncContextManager[Session]:
        """Reads (never seeing another call's half-done transaction)."""
        ...

    def statement(self) -> AbstractAsyncContextManager[Session]:
        """One write statement, atomic by itself, committed when the block ends."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[Session]:
        """A transaction: committed when the block ends, rolled back when it raises."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...

    async def notify(self, channel: str, payload: str) -> None: ...

    def subscribe(self, callback: NotifyCallback) -> None: ...


# --- the store ------------------------------------------------------------------------------


class SqlStore:
    """`Store` over a `Driver`: every call commits before it returns."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    @property
    def owner(self) -> str:
        """The store instance (replica or worker) this process counts its waiters under."""
        return self.driver.owner

    @owner.setter
    def owner(self, owner: str) -> None:
        self.driver.owner = owner

    async def close(self) -> None:
        """Release the connections (idempotent)."""
        await self.driver.close()

    async def ping(self) -> bool:
        """True when the database answers a trivial query right now; never raises."""
        return await self.driver.ping()

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self.driver.reading() as db:
            return await db.fetch(sql, params)

    async def _fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        async with self.driver.reading() as db:
            return await db.fetchrow(sql, params)

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self.driver.statement() as db:
            return await db.execute(sql, params)

    # --- grants -----------------------------------------------------------------------------

    async def add_grant(self, grant: Grant) -> None:
        """Persist a grant (replacing one with the same id)."""
        await self._execute(GRANT_UPSERT_SQL, GRANTS.params(grant))

    async def list_grants(self, now: float | None = None) -> list[Grant]:
        """Grants not expired at `now` (default: the current time), oldest first."""
        at = time.time() if now is None else now
        return [GRANTS.from_row(r) for r in await self._fetch(GRANTS_LIVE_SQL, (at,))]

    async def delete_grant(self, grant_id: str) -> bool:
        """Delete a grant; False when the id is unknown."""
        return await self._execute("DELETE FROM grants WHERE id = ?", (grant_id,)) > 0

    async def consume_grant(self, grant_id: str) -> bool:
        """Use up a grant: one DELETE, so of concurrent callers exactly one sees the row
        (SQLite serialises writers; a PostgreSQL DELETE that waited on another's row lock
        re-checks the row after that commits)."""
        return await self.delete_grant(grant_id)

    async def take_once_pass(self, pattern: str, agent: str | None, now: float) -> Grant | None:
        """Use up one live `once` grant for `pattern` that applies to `agent` (see Store)."""
        params = (_storable(pattern, None), _storable(agent, None), now)
        candidates = await self._fetch(ONCE_PASSES_SQL, params)
        for (grant_id,) in candidates:
            async with self.driver.statement() as db:
                row = await db.fetchrow(ONCE_TAKE_SQL, (grant_id,))
            if row is not None:
                return GRANTS.from_row(row)
        return None

    async def grants_signature(self) -> tuple[int, float, str]:
        row = await self._fetchrow(GRANTS_SIGNATURE_SQL)
        assert row is not None  # an aggregate always answers one row
        return int(row[0]), float(row[1]), str(row[2])

    # --- pending items ----------------------------------------------------------------------

    async def upsert_pending(self, item: PendingItem) -> None:
        """Insert a pending item or replace the one with the same id or the same key."""
        rekey = (item.id, _agent_key(item.agent), item.host, item.port)
        async with self.driver.transaction() as db:
            await db.execute(PENDING_REKEY_SQL, [_storable(v, None) for v in rekey])
            await db.execute(PENDING_UPSERT_SQL, _pending_write(item))

    async def join_pending(self, item: PendingItem) -> tuple[PendingItem, bool]:
        """Join the live item for item's (agent, host, port) or store `item`; True if created.
        The caller counts as waiting on it (under this instance) until it leaves."""
        async with self.driver.transaction() as db:
            row = await db.fetchrow(PENDING_JOIN_SQL, _pending_write(item))
            if row is None:  # RETURNING always yields the inserted or updated row
                raise StoreError(f"{self.driver.label}: join_pending returned no row")
            got = PENDING.from_row(row)
            await db.execute(WAITER_JOIN_SQL, (got.id, self.driver.owner))
        return got, got.id == item.id

    async def claim_pending(self, item_id: str) -> PendingItem | None:
        """Delete and return a pending item; None when another caller claimed it first."""
        async with self.driver.statement() as db:
            row = await db.fetchrow(PENDING_CLAIM_SQL, (item_id,))
        return None if row is None else PENDING.from_row(row)

    async def resolve_pending(
        self, item_id: str, now: float, write: ResolutionWriter
    ) -> tuple[PendingItem, int] | None:
        """Claim a live item and store its resolution in one transaction (see Store); the
        waiters counted under instances that no longer run are left out."""
        async with self.driver.transaction() as db:
            row = await db.fetchrow(PENDING_RESOLVE_SQL, (item_id, now))
            if row is None:
                return None
            item = PENDING.from_row(row)
            counts = [
                (str(owner), int(n)) for owner, n in await db.fetch(WAITERS_OF_SQL, (item_id,))
            ]
            await db.execute(WAITERS_DROP_SQL, (item_id,))
            live = await db.live_owners([owner for owner, _ in counts]) if counts else set()
            waiting = sum(n for owner, n in counts if owner in live)
            resolution = write(item, waiting)
            await db.execute(APPROVAL_INSERT_SQL, APPROVALS.params(resolution.record))
            if resolution.grant is not None:
                await db.execute(GRANT_UPSERT_SQL, GRANTS.params(resolution.grant))
        return item, waiting

    async def leave_pending(self, item_id: str) -> bool:
        """A joined request stops waiting; False when the item was resolved or purged."""
        async with self.driver.transaction() as db:
            # The pending row's lock orders this with a resolution's DELETE.
            still_pending = await db.execute(PENDING_LEAVE_SQL, (item_id,)) > 0
            if still_pending:
                await db.execute(WAITER_LEAVE_SQL, (item_id, self.driver.owner))
        return still_pending

    async def get_pending(self, item_id: str) -> PendingItem | None:
        """The pending item with this id (expired or not), or None."""
        row = await self._fetchrow(PENDING_BY_ID_SQL, (item_id,))
        return None if row is None else PENDING.from_row(row)

    async def list_pending(self, now: float) -> list[PendingItem]:
        """Pending items with expires_at > now, oldest (first_seen) first."""
        return [PENDING.from_row(r) for r in await self._fetch(PENDING_LIVE_SQL, (now,))]

    async def delete_pending(self, item_id: str) -> bool:
        """Delete a pending item; False when the id is unknown."""
        return await self._execute("DELETE FROM pending WHERE id = ?", (item_id,)) > 0

    async def purge_expired_pending(self, now: float) -> list[PendingItem]:
        """Delete the pending items with expires_at <= now and return them, oldest first.

        One DELETE ... RETURNING: replicas purging at once each get a disjoint share.
        """
        async with self.driver.transaction() as db:
            rows = await db.fetch(PENDING_PURGE_SQL, (now,))
            await db.execute(WAITERS_ORPHANS_SQL)
        return sorted((PENDING.from_row(r) for r in rows), key=lambda p: (p.first_seen, p.id))

    # --- approval history -------------------------------------------------------------------

    async def record_approval(self, record: ApprovalRecord) -> None:
        """Append one approval-history row."""
        await self._execute(APPROVAL_INSERT_SQL, APPROVALS.params(record))

    async def list_approvals(self, limit: int = 100) -> list[ApprovalRecord]:
        """The newest `limit` approval-history rows, newest first."""
        if limit <= 0:
            return []
        return [APPROVALS.from_row(r) for r in await self._fetch(APPROVALS_NEWEST_SQL, (limit,))]

    async def latest_approval(self, item_id: str) -> ApprovalRecord | None:
        """The newest approval-history row for this pending item id, or None."""
        row = await self._fetchrow(APPROVAL_LATEST_SQL, (item_id,))
        return None if row is None else APPROVALS.from_row(row)

    # --- decision audit ---------------------------------------------------------------------

    async def record_decisions(self, records: Sequence[DecisionRecord]) -> None:
        """Append a batch of decision audit rows in one transaction, in the given order."""
        if not records:
            return
        rows = [DECISIONS.params(d) for d in records]
        async with self.driver.transaction() as db:
            await db.insert_rows(DECISIONS, rows)

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
        sql, params = decisions_query(limit, host, decision, agent, reason, since)
        return [DECISIONS.from_row(r) for r in await self._fetch(sql, params)]

    async def prune_decisions(self, keep: int) -> int:
        """Keep the newest `keep` decision rows; return how many were deleted."""
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        if keep == 0:
            return await self._execute("DELETE FROM decisions")
        return await self._execute(DECISIONS_KEEP_SQL, (keep - 1,))

    async def prune_decisions_before(self, cutoff: float) -> int:
        """Delete decision rows recorded before `cutoff` (unix seconds); return how many."""
        return await self._execute("DELETE FROM decisions WHERE at < ?", (cutoff,))

    async def prune_decisions_per_agent(self, keep: int) -> dict[str | None, int]:
        """Keep the newest `keep` rows of each agent; return the rows deleted per agent."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        same = self.driver.same
        sql = (
            f"DELETE FROM decisions WHERE agent {same} ? AND seq < (SELECT seq FROM decisions "
            f"WHERE agent {same} ? ORDER BY seq DESC LIMIT 1 OFFSET ?)"
        )
        pruned: dict[str | None, int] = {}
        for (agent,) in await self._fetch(DECISIONS_OVER_SQL, (keep,)):
            pruned[agent] = await self._execute(sql, (agent, agent, keep - 1))
        return pruned

    # --- fleet signalling -------------------------------------------------------------------

    async def notify(self, channel: str, payload: str) -> None:
        """Signal every replica sharing the store (a no-op where there are none)."""
        await self.driver.notify(channel, payload)

    def subscribe(self, callback: NotifyCallback) -> None:
        """Call `callback(channel, payload)` for each notification (see Store)."""
        self.driver.subscribe(callback)


def _agent_key(agent: str | None) -> str:
    return agent or ""


def _pending_write(item: PendingItem) -> tuple[Any, ...]:
    return (*PENDING.params(item), _storable(_agent_key(item.agent), None))
