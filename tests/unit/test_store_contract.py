"""The `Store` contract, run against every implementation (SQLite file, real PostgreSQL).

Fleet behaviour is exercised with two store instances on the same backing database, as two
worker processes or two replicas would have: atomic joins, single-winner claims and grants.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from proxy.policy.model import Action, Scope
from proxy.records import ApprovalRecord, GrantFor, PendingItem
from proxy.store import Store, StoreError
from proxy.store.base import Resolution, ResolutionWriter
from proxy.store.postgres import PostgresStore
from proxy.store.sqlite import SqliteStore
from tests.support.postgres import PostgresServer, start_postgres
from tests.unit.test_store_sqlite import NOW, decision, grant, pending

Opener = Callable[[], Awaitable[Store]]


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    with start_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens a new store instance on this test's (shared) database each time it is called."""
    if request.param == "sqlite":
        path = tmp_path / "warden.db"

        async def open_sqlite() -> Store:
            return await SqliteStore.open(path)

        return open_sqlite
    server: PostgresServer = request.getfixturevalue("pg_server")
    dsn = server.create_database()

    async def open_postgres() -> Store:
        return await PostgresStore.open(dsn)

    return open_postgres


@pytest.fixture
async def store(open_backend: Opener) -> AsyncIterator[Store]:
    s = await open_backend()
    yield s
    await s.close()


@pytest.fixture
async def pair(open_backend: Opener) -> AsyncIterator[tuple[Store, Store]]:
    """Two instances sharing one database, like two worker processes or replicas."""
    a = await open_backend()
    b = await open_backend()
    yield a, b
    await a.close()
    await b.close()


def approval(state: str, at: float, **kw: object) -> ApprovalRecord:
    fields: dict[str, object] = {
        "id": "p1",
        "state": state,
        "host": "index.packages.test",
        "port": 443,
        "agent": "claude",
        "scope": None,
        "grant_for": None,
        "approver": None,
        "reviewer": None,
        "note": "",
        "wait_ms": None,
        "at": at,
    }
    fields.update(kw)
    return ApprovalRecord(**fields)  # type: ignore[arg-type]


# --- basics --------------------------------------------------------------------------------------


async def test_is_a_store_and_pings(store: Store) -> None:
    assert isinstance(store, Store)
    assert await store.ping() is True
    store.subscribe(lambda channel, payload: None)
    await store.notify("egress_pending", "p1")


async def test_grant_round_trip(store: Store) -> None:
    g1 = grant("g1")
    g2 = grant("g2", action=Action.DENY, agent=None, expires_at=NOW + 10, session="s9")
    await store.add_grant(g1)
    await store.add_grant(g2)
    assert await store.list_grants(now=NOW) == [g1, g2]
    await store.add_grant(grant("g1", note="changed"))
    assert (await store.list_grants(now=NOW))[0].note == "changed"
    assert await store.delete_grant("g1") is True
    assert await store.delete_grant("g1") is False
    assert await store.list_grants(now=NOW) == [g2]
    assert await store.list_grants(now=NOW + 10) == []


async def test_grants_of_every_scope_are_stored(store: Store) -> None:
    # Workers and replicas share session grants and one-shot passes through the store.
    once = grant("pass-1", scope=Scope.ONCE, expires_at=NOW + 30)
    await store.add_grant(once)
    assert await store.list_grants(now=NOW) == [once]
    assert (await store.list_grants(now=NOW))[0].scope is Scope.ONCE
    await store.add_grant(grant("s", scope=Scope.SESSION))
    assert [g.id for g in await store.list_grants(now=NOW)] == ["pass-1", "s"]


async def test_grants_signature_moves_on_every_change(store: Store) -> None:
    empty = await store.grants_signature()
    await store.add_grant(grant("g1"))
    one = await store.grants_signature()
    await store.add_grant(grant("g2"))
    two = await store.grants_signature()
    await store.consume_grant("g1")
    used = await store.grants_signature()
    assert len({empty, one, two, used}) == 4


async def test_consume_grant_has_one_winner(pair: tuple[Store, Store]) -> None:
    a, b = pair
    await a.add_grant(grant("pass-1", scope=Scope.ONCE))
    results = await asyncio.gather(*(s.consume_grant("pass-1") for s in (a, b) * 10))
    assert results.count(True) == 1
    assert await b.list_grants(now=NOW) == []
    assert await a.consume_grant("pass-1") is False


async def test_pending_round_trip_and_purge(store: Store) -> None:
    live = pending("live", host="a.test", review="ok", agent=None, session=None)
    dead1 = pending("dead1", host="b.test", first_seen=NOW - 200, expires_at=NOW - 1)
    dead2 = pending("dead2", host="c.test", first_seen=NOW - 50, expires_at=NOW)
    for item in (dead2, live, dead1):
        await store.upsert_pending(item)
    assert await store.get_pending("live") == live
    assert await store.get_pending("nope") is None
    assert await store.list_pending(NOW) == [live]
    assert await store.purge_expired_pending(NOW) == [dead1, dead2]
    assert await store.purge_expired_pending(NOW) == []
    assert await store.delete_pending("live") is True
    assert await store.delete_pending("live") is False


async def test_concurrent_purges_split_the_expired_items(pair: tuple[Store, Store]) -> None:
    a, b = pair
    for i in range(30):
        await a.upsert_pending(pending(f"d{i}", host=f"h{i}.test", expires_at=NOW - 1))
    got_a, got_b = await asyncio.gather(a.purge_expired_pending(NOW), b.purge_expired_pending(NOW))
    ids_a, ids_b = {p.id for p in got_a}, {p.id for p in got_b}
    assert not ids_a & ids_b  # each expired item is reported (and resolved) by one replica
    assert ids_a | ids_b == {f"d{i}" for i in range(30)}


async def test_upsert_pending_keeps_one_item_per_key(store: Store) -> None:
    await store.upsert_pending(pending("old"))
    new = pending("new", count=1)
    await store.upsert_pending(new)
    assert await store.get_pending("old") is None
    assert await store.list_pending(NOW) == [new]


# --- join_pending --------------------------------------------------------------------------------


async def test_join_pending_creates_then_joins(store: Store) -> None:
    first = pending("p1", count=1, first_seen=NOW, last_seen=NOW, expires_at=NOW + 300)
    got, created = await store.join_pending(first)
    assert (got, created) == (first, True)

    again = pending(
        "p2", count=1, method="POST", first_seen=NOW + 5, last_seen=NOW + 5, expires_at=NOW + 305
    )
    got, created = await store.join_pending(again)
    assert created is False
    # the existing item keeps its identity; last_seen/count/expires_at move on
    assert got == pending("p1", count=2, first_seen=NOW, last_seen=NOW + 5, expires_at=NOW + 305)
    assert await store.get_pending("p1") == got
    assert await store.get_pending("p2") is None

    # an earlier expiry never shortens the wait
    shorter = pending("p3", count=1, last_seen=NOW + 6, expires_at=NOW + 10)
    got, created = await store.join_pending(shorter)
    assert (got.id, created, got.count, got.expires_at) == ("p1", False, 3, NOW + 305)


async def test_join_pending_replaces_an_expired_item(store: Store) -> None:
    await store.join_pending(pending("old", count=4, expires_at=NOW + 10))
    # expires_at == last_seen counts as expired
    fresh = pending("fresh", count=1, first_seen=NOW + 10, last_seen=NOW + 10, expires_at=NOW + 99)
    got, created = await store.join_pending(fresh)
    assert (got, created) == (fresh, True)
    assert await store.get_pending("old") is None
    assert await store.list_pending(NOW) == [fresh]


async def test_join_pending_keys_on_agent_host_port(store: Store) -> None:
    base = {"count": 1, "last_seen": NOW, "expires_at": NOW + 60}
    items = [
        pending("anon", agent=None, **base),
        pending("claude", agent="claude", **base),
        pending("other-port", agent="claude", port=8443, **base),
        pending("other-host", agent="claude", host="files.packages.test", **base),
    ]
    for item in items:
        assert (await store.join_pending(item))[1] is True
    got, created = await store.join_pending(pending("anon-2", agent=None, **base))
    assert (got.id, created, got.agent) == ("anon", False, None)
    assert len(await store.list_pending(NOW)) == 4


async def test_concurrent_joiners_create_one_item(pair: tuple[Store, Store]) -> None:
    a, b = pair
    for key in range(10):  # several rounds: races are probabilistic
        host = f"h{key}.test"
        results = await asyncio.gather(
            a.join_pending(pending(f"a{key}", host=host, count=1, expires_at=NOW + 60)),
            b.join_pending(pending(f"b{key}", host=host, count=1, expires_at=NOW + 60)),
        )
        assert sorted(created for _, created in results) == [False, True]
        winner = next(item for item, created in results if created)
        stored = await a.get_pending(winner.id)
        assert stored is not None and stored.count == 2
    assert len(await b.list_pending(NOW)) == 10


async def test_many_concurrent_joiners_count_every_request(pair: tuple[Store, Store]) -> None:
    a, b = pair
    results = await asyncio.gather(
        *(
            s.join_pending(pending(f"j{i}", count=1, last_seen=NOW + i, expires_at=NOW + 60))
            for i, s in enumerate((a, b) * 10)
        )
    )
    assert [created for _, created in results].count(True) == 1
    [item] = await a.list_pending(NOW)
    assert item.count == 20


# --- claim_pending -------------------------------------------------------------------------------


async def test_claim_pending_has_one_winner(pair: tuple[Store, Store]) -> None:
    a, b = pair
    item = pending("p1")
    await a.upsert_pending(item)
    results = await asyncio.gather(*(s.claim_pending("p1") for s in (a, b) * 10))
    winners = [r for r in results if r is not None]
    assert winners == [item]
    assert await b.get_pending("p1") is None
    assert await a.claim_pending("p1") is None
    assert await a.claim_pending("never") is None


# --- resolving: waiting requests, the claim and its writes in one transaction ----------------


def _resolution(state: str = "approved", once: bool = False) -> ResolutionWriter:
    """A writer recording `state`, plus a once pass for the item when nobody waits."""

    def write(item: PendingItem, waiting: int) -> Resolution:
        record = approval(state, NOW + 5, id=item.id, host=item.host, agent=item.agent)
        if once and waiting == 0:
            return Resolution(record, grant(f"once-{item.id}", scope=Scope.ONCE))
        return Resolution(record)

    return write


async def test_resolve_counts_the_requests_still_waiting(store: Store) -> None:
    for i in range(3):  # three requests join one item
        await store.join_pending(pending(f"j{i}", count=1, last_seen=NOW + i))
    assert await store.leave_pending("j0") is True  # one stops waiting (timed out, still pending)
    got = await store.resolve_pending("j0", NOW, _resolution())
    assert got is not None and got[0].id == "j0" and got[1] == 2
    latest = await store.latest_approval("j0")
    assert latest is not None and latest.state == "approved"
    # the two still counted find the item gone: the resolution covered them
    assert await store.leave_pending("j0") is False


async def test_resolve_stores_the_pass_only_when_nobody_waits(store: Store) -> None:
    await store.join_pending(pending("busy", count=1))
    await store.join_pending(pending("idle", count=1, host="idle.test"))
    assert await store.leave_pending("idle") is True
    await store.resolve_pending("busy", NOW, _resolution(once=True))
    await store.resolve_pending("idle", NOW, _resolution(once=True))
    assert [g.id for g in await store.list_grants(now=NOW)] == ["once-idle"]


async def test_resolve_skips_expired_and_unknown_items(store: Store) -> None:
    await store.join_pending(pending("old", count=1, last_seen=NOW, expires_at=NOW + 10))
    assert await store.resolve_pending("old", NOW + 10, _resolution()) is None
    assert await store.resolve_pending("never", NOW, _resolution()) is None
    assert await store.latest_approval("old") is None  # nothing written
    assert [p.id for p in await store.purge_expired_pending(NOW + 10)] == ["old"]


async def test_resolve_rolls_back_when_the_writer_fails(store: Store) -> None:
    await store.join_pending(pending("p1", count=1))

    def broken(item: PendingItem, waiting: int) -> Resolution:
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        await store.resolve_pending("p1", NOW, broken)
    assert await store.get_pending("p1") is not None  # still pending
    assert await store.resolve_pending("p1", NOW, _resolution()) is not None


async def test_resolve_has_one_winner(pair: tuple[Store, Store]) -> None:
    a, b = pair
    await a.join_pending(pending("p1", count=1))
    results = await asyncio.gather(
        *(
            s.resolve_pending("p1", NOW, _resolution(state))
            for s in (a, b)
            for state in ("approved", "denied") * 5
        )
    )
    assert len([r for r in results if r is not None]) == 1
    assert len([r for r in await a.list_approvals() if r.id == "p1"]) == 1


async def test_leaving_races_resolving_exactly(pair: tuple[Store, Store]) -> None:
    """A request leaving while the item is resolved either left first (not counted) or is
    told the item is gone (counted): never both, never neither."""
    a, b = pair
    for round_ in range(10):
        item_id = f"r{round_}"
        await a.join_pending(pending(item_id, host=f"h{round_}.test", count=1))
        left, resolved = await asyncio.gather(
            a.leave_pending(item_id), b.resolve_pending(item_id, NOW, _resolution())
        )
        assert resolved is not None
        assert resolved[1] == (0 if left else 1)


async def test_waiters_of_an_instance_that_died_do_not_count(pair: tuple[Store, Store]) -> None:
    """A replica or worker killed while requests waited there: they wait no more, so a `once`
    approval of their item leaves a pass for the retry."""
    a, b = pair
    await b.join_pending(pending("p1", count=1))
    live_owner = b.owner  # type: ignore[attr-defined]
    b.owner = "2147483646"  # type: ignore[attr-defined]  # no such process or database session
    await b.join_pending(pending("p2", count=1))
    await b.join_pending(pending("p1-again", count=1))
    b.owner = live_owner  # type: ignore[attr-defined]
    got = await a.resolve_pending("p1", NOW, _resolution(once=True))
    assert got is not None and got[1] == 1  # the live instance's one request
    await b.join_pending(pending("p3", count=1, host="dead.test"))
    b.owner = "2147483646"  # type: ignore[attr-defined]
    await b.join_pending(pending("p4", count=1, host="dead.test"))  # joins p3, then "dies"
    b.owner = live_owner  # type: ignore[attr-defined]
    assert await b.leave_pending("p3") is True  # the live one stops waiting
    got = await a.resolve_pending("p3", NOW, _resolution(once=True))
    assert got is not None and got[1] == 0
    assert [g.id for g in await a.list_grants(now=NOW)] == ["once-p3"]


# --- once passes ---------------------------------------------------------------------------------

PATTERN = "pass.test:80"


async def test_a_once_pass_goes_to_exactly_one_taker(pair: tuple[Store, Store]) -> None:
    a, b = pair
    for round_ in range(5):  # several rounds: races are probabilistic
        await a.add_grant(grant(f"once-{round_}", pattern=PATTERN, scope=Scope.ONCE))
        taken = await asyncio.gather(
            *(s.take_once_pass(PATTERN, "claude", NOW) for s in (a, b) * 8)
        )
        winners = [g for g in taken if g is not None]
        assert [g.id for g in winners] == [f"once-{round_}"]
    assert await a.take_once_pass(PATTERN, "claude", NOW) is None


async def test_a_once_pass_applies_to_its_agent_only(store: Store) -> None:
    await store.add_grant(grant("mine", pattern=PATTERN, scope=Scope.ONCE, agent="claude"))
    await store.add_grant(grant("all", pattern=PATTERN, scope=Scope.ONCE, agent=None))
    await store.add_grant(grant("late", pattern=PATTERN, scope=Scope.ONCE, expires_at=NOW))
    await store.add_grant(grant("always", pattern=PATTERN, scope=Scope.ALWAYS))
    assert await store.take_once_pass("other.test:80", "claude", NOW) is None
    taken = await store.take_once_pass(PATTERN, None, NOW)  # anonymous: everyone's pass only
    assert taken is not None and taken.id == "all"
    assert await store.take_once_pass(PATTERN, "codex", NOW) is None
    taken = await store.take_once_pass(PATTERN, "claude", NOW)
    assert taken is not None and taken.id == "mine" and taken.scope is Scope.ONCE
    assert await store.take_once_pass(PATTERN, "claude", NOW) is None  # expired, or always
    assert {g.id for g in await store.list_grants(now=NOW - 1)} == {"late", "always"}


# --- approval history ----------------------------------------------------------------------------


async def test_approvals_round_trip_and_latest(store: Store) -> None:
    requested = approval("requested", NOW)
    approved = approval(
        "approved",
        NOW + 1,
        scope=Scope.ALWAYS,
        grant_for=GrantFor.ALL,
        approver="alice",
        reviewer="human",
        note="ok",
        wait_ms=1234,
        grant_id="g-42",
    )
    other = approval("requested", NOW + 2, id="p2")
    for record in (requested, approved, other):
        await store.record_approval(record)
    assert await store.list_approvals() == [other, approved, requested]
    assert await store.list_approvals(limit=0) == []
    latest = await store.latest_approval("p1")
    assert latest == approved
    assert latest is not None and latest.grant_id == "g-42" and latest.scope is Scope.ALWAYS
    assert await store.latest_approval("p2") == other
    assert await store.latest_approval("nope") is None


# --- decision audit ------------------------------------------------------------------------------


async def test_decisions_filters_and_prune(store: Store) -> None:
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
    assert await store.list_decisions(host="a.test", decision="deny") == [batch[2]]
    assert await store.list_decisions(decision="deny") == [batch[2], batch[1]]
    assert await store.prune_decisions(keep=10) == 0
    assert await store.prune_decisions(keep=3) == 1
    assert await store.list_decisions() == list(reversed(batch[1:]))
    assert await store.prune_decisions(keep=0) == 3
    with pytest.raises(ValueError):
        await store.prune_decisions(keep=-1)


async def test_decisions_pruned_by_age_and_per_agent(store: Store) -> None:
    rows = [
        dataclasses.replace(decision(i), agent=agent)
        for i, agent in enumerate(["flood"] * 6 + ["quiet"] * 2 + [None] * 3)
    ]
    await store.record_decisions(rows)
    # The flooding agent's oldest rows go; the others keep all of theirs.
    assert await store.prune_decisions_per_agent(keep=3) == {"flood": 3}
    kept = {r.request_id for r in await store.list_decisions(limit=100)}
    assert kept == {r.request_id for r in rows[3:]}
    assert await store.prune_decisions_per_agent(keep=3) == {}
    assert await store.prune_decisions_per_agent(keep=2) == {"flood": 1, None: 1}
    # By age: everything recorded before the cutoff.
    assert await store.prune_decisions_before(NOW + 7) == 3
    assert {r.request_id for r in await store.list_decisions(limit=100)} == {"r7", "r9", "r10"}
    with pytest.raises(ValueError):
        await store.prune_decisions_per_agent(keep=0)


async def test_closed_store_raises(open_backend: Opener) -> None:
    s = await open_backend()
    await s.close()
    await s.close()
    with pytest.raises(StoreError, match="closed"):
        await s.list_grants()
    assert await s.ping() is False
