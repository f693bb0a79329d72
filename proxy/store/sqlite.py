"""SQLite state store: the shared queries (`proxy.store.sql`) over one aiosqlite connection.

One connection in WAL mode, one write transaction at a time (BEGIN IMMEDIATE: worker processes
sharing the file queue on the write lock instead of failing to upgrade a read); every call
commits before it returns. SQLite >= 3.35 for RETURNING.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from proxy.statedir import create_private_file, make_private_dir, tighten_private_file
from proxy.store.base import NotifyCallback, StoreError
from proxy.store.migrations import (
    CURRENT_VERSION_SQL,
    SCHEMA_VERSION_DDL,
    pending_migrations,
)
from proxy.store.sql import Row, SqlStore, Table

BUSY_TIMEOUT_MS = 5000
PING_TIMEOUT = 2.0
MIN_SQLITE = (3, 35, 0)  # INSERT ... ON CONFLICT ... RETURNING and DELETE ... RETURNING
_SIDE_FILES = ("-wal", "-shm", "-journal")  # files SQLite keeps next to the database
# SQLITE_MAX_VARIABLE_NUMBER: 32,766 since SQLite 3.32, 999 before.
_MAX_SQL_PARAMS = 32_766 if sqlite3.sqlite_version_info >= (3, 32) else 999


class _Session:
    """Statements on the one connection (the driver holds its lock around a session)."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self._conn.execute(sql, tuple(params)) as cur:
            return list(await cur.fetchall())

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        async with self._conn.execute(sql, tuple(params)) as cur:
            row = await cur.fetchone()
        return None if row is None else tuple(row)

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self._conn.execute(sql, tuple(params)) as cur:
            return max(cur.rowcount, 0)

    async def insert_rows(self, table: Table[Any], rows: Sequence[tuple[Any, ...]]) -> None:
        # One multi-row INSERT per chunk: executemany steps once per row, and each step hands
        # the GIL to this connection's thread and back, which slowed the event loop.
        per_insert = _MAX_SQL_PARAMS // len(table.fields)
        for start in range(0, len(rows), per_insert):
            chunk = rows[start : start + per_insert]
            values = ", ".join([f"({table.marks})"] * len(chunk))
            sql = f"INSERT INTO {table.name} ({table.cols}) VALUES {values}"
            await self._conn.execute(sql, [value for row in chunk for value in row])

    async def live_owners(self, owners: Sequence[str]) -> set[str]:
        return {owner for owner in owners if _process_alive(owner)}


class SqliteDriver:
    """One SQLite file: calls serialised on one connection; writes in BEGIN IMMEDIATE."""

    same = "IS"  # SQLite's NULL-safe equality

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self.label = f"state database {path}"
        self._lock = asyncio.Lock()
        self._closed = False
        # Processes sharing the file are told apart by pid: a dead one's waiters stop counting.
        self.owner = str(os.getpid())
        # Kept only so subscribe() is well-defined: one SQLite file has no fleet to hear from
        # (worker processes on one host re-read the shared file instead).
        self._subscribers: list[NotifyCallback] = []

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[_Session]:
        """Serialised read access (never sees another call's half-done transaction)."""
        async with self._lock, self._errors():
            yield _Session(self._conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Session]:
        """One serialised write transaction, committed on success, rolled back on error."""
        async with self._lock, self._errors():
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _Session(self._conn)
            except BaseException:
                await _rollback(self._conn)
                raise
            await self._conn.execute("COMMIT")

    statement = transaction  # a single write takes the write lock the same way

    @asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        if self._closed:
            raise StoreError(f"state database {self.path} is closed")
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"state database {self.path}: {_reason(exc)}") from exc

    async def ping(self) -> bool:
        """True when the database answers a trivial query within PING_TIMEOUT; never raises."""
        if self._closed:
            return False
        try:
            async with asyncio.timeout(PING_TIMEOUT), self.reading() as db:
                await db.fetch("SELECT 1")
        except Exception:
            return False
        return True

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            await self._conn.close()

    async def notify(self, channel: str, payload: str) -> None:
        """No-op: a SQLite store has no replicas to signal."""

    def subscribe(self, callback: NotifyCallback) -> None:
        """Accept the callback; SQLite never calls it (there are no notifications)."""
        self._subscribers.append(callback)


class SqliteStore(SqlStore):
    """`Store` on one SQLite file; calls are serialised and each write commits before returning."""

    driver: SqliteDriver

    def __init__(self, driver: SqliteDriver) -> None:
        """Wrap an open, migrated connection; use `SqliteStore.open` instead."""
        super().__init__(driver)
        self.path = driver.path

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
        return cls(SqliteDriver(conn, path))


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
