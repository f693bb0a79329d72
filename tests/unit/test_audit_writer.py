"""The decision audit never stops on one row: any text is stored (escaped, capped) by both
stores; a row the store still refuses is dropped after a bounded number of tries, counted and
announced, while the rows around it and every later batch land; a store that does not answer
keeps the rows for later instead."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from proxy.audit import BATCH, AuditWriter, record_json
from proxy.records import DecisionRecord
from proxy.render import FIELD_LIMIT
from proxy.store import Store, StoreError
from proxy.store.postgres import PostgresStore
from proxy.store.sqlite import SqliteStore
from tests.support.postgres import PostgresServer
from tests.unit import test_store_contract as contract
from tests.unit.test_store_sqlite import decision, pending

# Both stores (SQLite, a real PostgreSQL), as the Store contract tests run them.
pg_server = contract.pg_server
open_backend = contract.open_backend
store = contract.store

NASTY = {
    "method": "G\udcffT",  # byte 0xff in the request line, as mitmproxy decodes it
    "host": "held.test\x00",
    "path": "/\x1b[2K\x1b[1A\u202e" + "\udcfe" * 10 + "a" * 5000,
    "agent": "\ud800",
    "rule": "\x00" * 3,
    "session": "s\udc80",
}


def nasty(i: int) -> DecisionRecord:
    return dataclasses.replace(decision(i), **NASTY)


def _storable(value: Any) -> bool:
    if not isinstance(value, str):
        return True
    value.encode("utf-8")
    return "\x00" not in value and len(value) <= FIELD_LIMIT


# -- both stores take any text ------------------------------------------------------------------


async def test_any_text_is_stored_escaped_and_read_back_as_json(store: Store) -> None:
    await store.record_decisions([decision(1), nasty(2), decision(3)])
    rows = await store.list_decisions(limit=10)
    assert [r.request_id for r in rows] == ["r3", "r2", "r1"]
    stored = rows[1]
    assert all(_storable(v) for v in dataclasses.astuple(stored))
    assert stored.method == "G\\xffT"
    assert stored.host == "held.test\\x00"
    assert stored.agent == "\\ud800"
    assert stored.path is not None and stored.path.startswith("/\x1b[2K\x1b[1A\u202e\\xfe\\xfe")
    assert len(stored.path) == FIELD_LIMIT and stored.path.endswith(" chars]")
    json.dumps([record_json(r) for r in rows], ensure_ascii=False).encode("utf-8")
    # The host filter matches the row as it was stored.
    found = await store.list_decisions(limit=10, host="held.test\x00")
    assert [r.request_id for r in found] == ["r2"]


async def test_pending_items_with_undecodable_text_are_stored(store: Store) -> None:
    item = dataclasses.replace(pending("p1"), method="G\udcffT")
    got, created = await store.join_pending(item)
    assert created and got.method == "G\\xffT"


async def test_a_latin1_postgres_database_gets_the_ascii_form_of_a_row(
    pg_server: PostgresServer,
) -> None:
    name = "latin1_audit"
    pg_server.psql(
        f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
        "TEMPLATE template0"
    )
    pg = await PostgresStore.open(pg_server.dsn_for(name))
    try:
        writer = AuditWriter(pg, per_agent=1000)
        wide = dataclasses.replace(decision(2), host="日本.test", path="/é")
        for record in (decision(1), wide, decision(3)):
            writer.add(record)
        await writer.flush()
        rows = await pg.list_decisions(limit=10)
        assert [r.request_id for r in rows] == ["r3", "r2", "r1"]
        assert rows[1].host == "\\u65e5\\u672c.test" and rows[1].path == "/\\xe9"
        assert writer.dropped == 0
    finally:
        await pg.close()


# -- the writer ---------------------------------------------------------------------------------


class RefusingStore:
    """A real SQLite store that refuses every batch holding a poisoned row (as a store that
    cannot encode it would), or everything while `down`, and counts the attempts."""

    def __init__(self, inner: SqliteStore, poisoned: set[str]) -> None:
        self.inner = inner
        self.poisoned = poisoned
        self.down = False
        self.attempts: dict[str, int] = {}

    async def record_decisions(self, records: Sequence[DecisionRecord]) -> None:
        for r in records:
            self.attempts[r.request_id] = self.attempts.get(r.request_id, 0) + 1
        if self.down:
            raise StoreError("state database: disk I/O error")
        if any(r.request_id in self.poisoned for r in records):
            raise UnicodeEncodeError("utf-8", "G\udcffT", 1, 2, "surrogates not allowed")
        await self.inner.record_decisions(records)

    async def ping(self) -> bool:
        return not self.down

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "warden.db")
    yield s
    await s.close()


async def _ids(db: SqliteStore) -> list[str]:
    return [r.request_id for r in reversed(await db.list_decisions(limit=100_000))]


async def test_a_refused_row_is_dropped_after_bounded_tries_and_later_rows_land(
    sqlite: SqliteStore,
) -> None:
    refusing = RefusingStore(sqlite, poisoned={"r7"})
    writer = AuditWriter(refusing, per_agent=100_000)  # type: ignore[arg-type]
    for i in range(20):
        writer.add(decision(i))
    with capture_logs() as logs:
        await writer.flush()
    assert await _ids(sqlite) == [f"r{i}" for i in range(20) if i != 7]
    assert writer.dropped == 1
    # Halving 20 rows down to one takes 5 tries, then one more in plain ASCII.
    assert refusing.attempts["r7"] <= 7
    [event] = [e for e in logs if e["event"] == "egress.audit.dropped"]
    assert event["count"] == 1 and event["request_ids"] == ["r7"]
    assert event["log_level"] == "error"

    # Nothing is retried later: the next batch lands at once, the poisoned row is not seen again.
    writer.add(decision(20))
    await writer.flush()
    assert (await _ids(sqlite))[-1] == "r20"
    assert refusing.attempts["r7"] <= 7 and refusing.attempts["r20"] == 1


async def test_a_full_batch_with_poison_at_both_ends_keeps_order_and_bounds(
    sqlite: SqliteStore,
) -> None:
    count = BATCH + 30
    refusing = RefusingStore(sqlite, poisoned={"r0", f"r{BATCH - 1}", f"r{count - 1}"})
    writer = AuditWriter(refusing, per_agent=100_000)  # type: ignore[arg-type]
    for i in range(count):
        writer.add(decision(i))
    with capture_logs() as logs:
        await writer.flush()
    assert await _ids(sqlite) == [f"r{i}" for i in range(count) if f"r{i}" not in refusing.poisoned]
    assert writer.dropped == 3
    assert max(refusing.attempts.values()) <= BATCH.bit_length() + 2
    dropped = [e for e in logs if e["event"] == "egress.audit.dropped"]
    assert sum(e["count"] for e in dropped) == 3


async def test_a_store_that_does_not_answer_keeps_the_rows_for_later(
    sqlite: SqliteStore,
) -> None:
    refusing = RefusingStore(sqlite, poisoned=set())
    writer = AuditWriter(refusing, per_agent=100_000)  # type: ignore[arg-type]
    refusing.down = True
    for i in range(5):
        writer.add(decision(i))
    with pytest.raises(StoreError):
        await writer.flush()
    assert refusing.attempts == {f"r{i}": 1 for i in range(5)}  # no splitting while it is down
    writer.add(decision(5))
    refusing.down = False
    await writer.flush()
    assert await _ids(sqlite) == [f"r{i}" for i in range(6)]
    assert writer.dropped == 0


async def test_the_real_bug_an_undecodable_method_does_not_stop_the_audit(
    sqlite: SqliteStore,
) -> None:
    writer = AuditWriter(sqlite, per_agent=100_000)
    writer.add(dataclasses.replace(decision(1), method="G\udcffT"))
    writer.add(decision(2))
    await writer.flush()
    writer.add(decision(3))
    await writer.flush()
    rows = await sqlite.list_decisions(limit=10)
    assert [(r.request_id, r.method) for r in rows] == [
        ("r3", "GET"),
        ("r2", "GET"),
        ("r1", "G\\xffT"),
    ]
    assert writer.dropped == 0
