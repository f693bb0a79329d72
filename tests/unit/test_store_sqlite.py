"""SqliteStore against real database files: round trips, expiry, audit queries, durability."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.policy.model import Action, Scope
from proxy.records import ApprovalRecord, DecisionRecord, Grant, GrantFor, PendingItem
from proxy.store import Store, StoreError, open_store, sqlite_path
from proxy.store.migrations import LATEST_VERSION
from proxy.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000.0


def grant(gid: str = "g1", **kw: object) -> Grant:
    fields: dict[str, object] = {
        "id": gid,
        "pattern": "*.example.com",
        "action": Action.ALLOW,
        "scope": Scope.ALWAYS,
        "agent": "claude",
        "created_by": "alice",
        "note": "docs",
        "created_at": NOW,
        "expires_at": None,
        "session": None,
    }
    fields.update(kw)
    return Grant(**fields)  # type: ignore[arg-type]


def pending(pid: str = "p1", **kw: object) -> PendingItem:
    fields: dict[str, object] = {
        "id": pid,
        "host": "index.packages.test",
        "port": 443,
        "scheme": "https",
        "method": "GET",
        "agent": "claude",
        "session": "s1",
        "first_seen": NOW,
        "last_seen": NOW + 1,
        "count": 2,
        "expires_at": NOW + 300,
        "review": None,
    }
    fields.update(kw)
    return PendingItem(**fields)  # type: ignore[arg-type]


def decision(i: int, host: str = "a.test", verdict: str = "allow") -> DecisionRecord:
    return DecisionRecord(
        request_id=f"r{i}",
        at=NOW + i,
        decision=verdict,
        reason="rule",
        host=host,
        port=443,
        method="GET",
        transport="https",
        agent="claude",
        session=None,
        rule="allow *.test",
        source="policy.yaml:3",
        client_address="127.0.0.1:5000",
        peer_address=None,
        mode="enforce",
        path="/x",
        pending_id=None,
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "state" / "warden.db")
    yield s
    await s.close()


# --- round trips ---------------------------------------------------------------------------------


async def test_open_creates_parent_dirs_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "warden.db"
    s = await SqliteStore.open(path)
    await s.close()
    assert path.exists()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_grant_round_trip(store: SqliteStore) -> None:
    g1 = grant("g1")
    g2 = grant("g2", action=Action.DENY, agent=None, expires_at=NOW + 10, session="s9")
    await store.add_grant(g1)
    await store.add_grant(g2)
    assert await store.list_grants(now=NOW) == [g1, g2]
    got = (await store.list_grants(now=NOW))[1]
    assert got.action is Action.DENY and got.scope is Scope.ALWAYS and got.agent is None
    # add_grant with a known id replaces it
    g1b = grant("g1", note="changed")
    await store.add_grant(g1b)
    assert (await store.list_grants(now=NOW))[0] == g1b
    assert await store.delete_grant("g1") is True
    assert await store.delete_grant("g1") is False
    assert await store.list_grants(now=NOW) == [g2]


async def test_upsert_pending_replaces_the_item_holding_its_key(store: SqliteStore) -> None:
    # one pending item per (agent, host, port): a new id for an occupied key replaces the row
    await store.upsert_pending(pending("old"))
    await store.upsert_pending(pending("new", count=1))
    assert await store.get_pending("old") is None
    assert [p.id for p in await store.list_pending(NOW)] == ["new"]
    # an id moving to another key leaves its old key free
    await store.upsert_pending(pending("new", host="other.test"))
    await store.upsert_pending(pending("third", agent=None))
    assert sorted(p.id for p in await store.list_pending(NOW)) == ["new", "third"]


async def test_list_grants_hides_expired(store: SqliteStore) -> None:
    await store.add_grant(grant("forever"))
    await store.add_grant(grant("later", expires_at=NOW + 60))
    await store.add_grant(grant("gone", expires_at=NOW - 1))
    await store.add_grant(grant("edge", expires_at=NOW))
    # expires_at == now counts as expired
    assert [g.id for g in await store.list_grants(now=NOW)] == ["forever", "later"]
    # default now is the wall clock: everything expiring in 2023 is gone
    assert [g.id for g in await store.list_grants()] == ["forever"]


async def test_pending_round_trip(store: SqliteStore) -> None:
    item = pending("p1", review="looks fine", agent=None, session=None)
    await store.upsert_pending(item)
    assert await store.get_pending("p1") == item
    assert await store.get_pending("nope") is None
    updated = pending("p1", count=7, last_seen=NOW + 50)
    await store.upsert_pending(updated)
    assert await store.get_pending("p1") == updated
    assert await store.list_pending(NOW) == [updated]
    assert await store.delete_pending("p1") is True
    assert await store.delete_pending("p1") is False
    assert await store.list_pending(NOW) == []


async def test_list_pending_hides_expired_and_purge_returns_them(store: SqliteStore) -> None:
    # distinct hosts: there is at most one pending item per (agent, host, port)
    live_old = pending("live-old", host="a.test", first_seen=NOW - 100, expires_at=NOW + 10)
    live_new = pending("live-new", host="b.test", first_seen=NOW - 5, expires_at=NOW + 10)
    dead1 = pending("dead1", host="c.test", first_seen=NOW - 200, expires_at=NOW - 1)
    # expires_at == now: expired
    dead2 = pending("dead2", host="d.test", first_seen=NOW - 50, expires_at=NOW)
    for item in (live_new, dead2, live_old, dead1):
        await store.upsert_pending(item)
    assert await store.list_pending(NOW) == [live_old, live_new]
    assert await store.purge_expired_pending(NOW) == [dead1, dead2]
    assert await store.get_pending("dead1") is None
    assert await store.purge_expired_pending(NOW) == []
    assert await store.list_pending(NOW) == [live_old, live_new]


async def test_approval_round_trip_newest_first(store: SqliteStore) -> None:
    requested = ApprovalRecord(
        id="p1",
        state="requested",
        host="index.packages.test",
        port=443,
        agent="claude",
        scope=None,
        grant_for=None,
        approver=None,
        reviewer=None,
        note="",
        wait_ms=None,
        at=NOW,
    )
    approved = ApprovalRecord(
        id="p1",
        state="approved",
        host="index.packages.test",
        port=443,
        agent=None,
        scope=Scope.ALWAYS,
        grant_for=GrantFor.ALL,
        approver="alice",
        reviewer="human",
        note="ok",
        wait_ms=1234,
        at=NOW + 1,
        grant_id="g-77",
    )
    await store.record_approval(requested)
    await store.record_approval(approved)
    got = await store.list_approvals()
    assert got == [approved, requested]
    assert got[0].scope is Scope.ALWAYS and got[0].grant_for is GrantFor.ALL
    assert got[0].grant_id == "g-77" and got[1].grant_id is None
    assert await store.list_approvals(limit=1) == [approved]
    assert await store.list_approvals(limit=0) == []


# --- decision audit ------------------------------------------------------------------------------


async def test_decisions_newest_first_with_filters(store: SqliteStore) -> None:
    batch = [
        decision(0, "a.test", "allow"),
        decision(1, "b.test", "deny"),
        decision(2, "a.test", "deny"),
        decision(3, "a.test", "hold"),
    ]
    await store.record_decisions(batch[:2])
    await store.record_decisions(batch[2:])
    await store.record_decisions([])
    assert await store.list_decisions() == list(reversed(batch))
    assert await store.list_decisions(limit=2) == [batch[3], batch[2]]
    assert await store.list_decisions(host="a.test") == [batch[3], batch[2], batch[0]]
    assert await store.list_decisions(decision="deny") == [batch[2], batch[1]]
    assert await store.list_decisions(host="a.test", decision="deny") == [batch[2]]
    assert await store.list_decisions(host="nope.test") == []


async def test_large_decision_batch_spans_statements_in_order(store: SqliteStore) -> None:
    # More rows than one multi-row INSERT can carry (SQLite's bound-parameter limit).
    batch = [decision(i, f"h{i % 7}.test") for i in range(5_000)]
    await store.record_decisions(batch)
    assert await store.list_decisions(limit=10_000) == list(reversed(batch))


async def test_prune_decisions_keeps_newest(store: SqliteStore) -> None:
    batch = [decision(i) for i in range(10)]
    await store.record_decisions(batch)
    assert await store.prune_decisions(keep=20) == 0
    assert await store.prune_decisions(keep=4) == 6
    assert await store.list_decisions() == list(reversed(batch[6:]))
    assert await store.prune_decisions(keep=4) == 0
    await store.record_decisions([decision(10)])
    assert await store.prune_decisions(keep=4) == 1
    assert [d.request_id for d in await store.list_decisions()] == ["r10", "r9", "r8", "r7"]
    assert await store.prune_decisions(keep=0) == 4
    assert await store.list_decisions() == []
    with pytest.raises(ValueError):
        await store.prune_decisions(keep=-1)


async def test_concurrent_record_decisions_all_land(store: SqliteStore) -> None:
    await asyncio.gather(*(store.record_decisions([decision(i)]) for i in range(200)))
    got = await store.list_decisions(limit=1000)
    assert len(got) == 200
    assert {d.request_id for d in got} == {f"r{i}" for i in range(200)}


async def test_concurrent_mixed_calls(store: SqliteStore) -> None:
    await asyncio.gather(
        *(store.record_decisions([decision(i), decision(i + 1000)]) for i in range(50)),
        *(store.upsert_pending(pending(f"p{i}", host=f"h{i}.test")) for i in range(50)),
        *(store.list_decisions() for _ in range(20)),
    )
    assert len(await store.list_decisions(limit=1000)) == 100
    assert len(await store.list_pending(NOW)) == 50


# --- migrations ----------------------------------------------------------------------------------


def _versions(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]


async def test_migrations_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "warden.db"
    s = await SqliteStore.open(path)
    await s.add_grant(grant())
    await s.close()
    assert _versions(path) == list(range(1, LATEST_VERSION + 1))
    s = await SqliteStore.open(path)
    assert [g.id for g in await s.list_grants()] == ["g1"]
    await s.close()
    assert _versions(path) == list(range(1, LATEST_VERSION + 1))


async def test_concurrent_opens_migrate_once(tmp_path: Path) -> None:
    path = tmp_path / "warden.db"
    stores = await asyncio.gather(*(SqliteStore.open(path) for _ in range(5)))
    for s in stores:
        await s.close()
    assert _versions(path) == list(range(1, LATEST_VERSION + 1))


async def test_schema_too_new_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "warden.db"
    s = await SqliteStore.open(path)
    await s.close()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?, 0)", (LATEST_VERSION + 5,)
        )
    with pytest.raises(StoreError, match=r"schema version \d+, newer than this egress-warden"):
        await SqliteStore.open(path)


async def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "warden.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=f"cannot open state database {path}"):
        await SqliteStore.open(path)


async def test_parent_is_a_file_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=r"cannot open state database .*: not a directory"):
        await SqliteStore.open(tmp_path / "file" / "warden.db")


async def test_closed_store_raises(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "warden.db")
    await s.close()
    await s.close()
    with pytest.raises(StoreError, match="closed"):
        await s.list_grants()


# --- open_store ----------------------------------------------------------------------------------


def test_sqlite_path_forms() -> None:
    assert sqlite_path("sqlite:///abs/path.db") == Path("/abs/path.db")
    assert sqlite_path("sqlite:relative.db") == Path("relative.db")
    assert sqlite_path("sqlite:dir/rel.db") == Path("dir/rel.db")
    with pytest.raises(StoreError):
        sqlite_path("sqlite://")


async def test_open_store_sqlite(tmp_path: Path) -> None:
    s = await open_store(f"sqlite://{tmp_path}/x/warden.db")
    try:
        assert isinstance(s, SqliteStore)
        assert isinstance(s, Store)
        await s.add_grant(grant())
        assert len(await s.list_grants()) == 1
    finally:
        await s.close()
    assert (tmp_path / "x" / "warden.db").exists()


async def test_open_store_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = await open_store("sqlite:rel.db")
    await s.close()
    assert (tmp_path / "rel.db").exists()


async def test_open_store_rejects_others() -> None:
    with pytest.raises(StoreError, match="unsupported") as info:
        await open_store("mysql://user:secret@db/warden")
    assert "secret" not in str(info.value)
    with pytest.raises(StoreError, match="unsupported"):
        await open_store("/just/a/path.db")


async def test_migration_2_dedupes_and_backfills_key(tmp_path: Path) -> None:
    # a version-1 database may hold several items for one key: keep the one expiring last
    path = tmp_path / "warden.db"
    with sqlite3.connect(path) as conn:
        from proxy.store.migrations import MIGRATIONS, SCHEMA_VERSION_DDL

        conn.execute(SCHEMA_VERSION_DDL)
        for statement in MIGRATIONS[0].render("sqlite"):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1, 0)")
        for pid, agent, expires in (("a", None, 10), ("b", None, 20), ("c", "x", 5)):
            conn.execute(
                "INSERT INTO pending VALUES (?, 'h.test', 443, 'https', 'GET', ?, NULL, "
                "0, 0, 1, ?, NULL)",
                (pid, agent, expires),
            )
    s = await SqliteStore.open(path)
    try:
        assert [p.id for p in await s.list_pending(0)] == ["b", "c"]
        created = pending("d", host="h.test", agent=None, last_seen=1, expires_at=30)
        joined, was_created = await s.join_pending(created)
        assert (joined.id, was_created, joined.count) == ("b", False, 2)
    finally:
        await s.close()
    assert _versions(path) == list(range(1, LATEST_VERSION + 1))


# --- durability ----------------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    from proxy.policy.model import Action, Scope
    from proxy.records import DecisionRecord, Grant, PendingItem
    from proxy.store.sqlite import SqliteStore

    async def main() -> None:
        store = await SqliteStore.open(Path(sys.argv[1]))
        await store.add_grant(Grant(
            id="g-kill", pattern="kill.test", action=Action.ALLOW, scope=Scope.ALWAYS,
            agent=None, created_by="test", note="", created_at=1.0,
        ))
        await store.upsert_pending(PendingItem(
            id="p-kill", host="kill.test", port=443, scheme="https", method="GET",
            agent=None, session=None, first_seen=1.0, last_seen=1.0, count=1,
            expires_at=4e9,
        ))
        await store.record_decisions([
            DecisionRecord(
                request_id=f"r{i}", at=float(i), decision="deny", reason="x",
                host="kill.test", port=443, method="GET", transport="https", agent=None,
                session=None, rule=None, source=None, client_address=None,
                peer_address=None, mode="enforce",
            )
            for i in range(3)
        ])
        print("written", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


async def test_committed_writes_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "warden.db"
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _WRITER, str(path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip() == "written", proc.stderr
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "warden.db-wal").exists()  # killed: no clean close folded the WAL in

    s = await SqliteStore.open(path)
    try:
        assert [g.id for g in await s.list_grants()] == ["g-kill"]
        got = await s.get_pending("p-kill")
        assert got is not None and got.expires_at == 4e9
        assert [d.request_id for d in await s.list_decisions()] == ["r2", "r1", "r0"]
    finally:
        await s.close()
