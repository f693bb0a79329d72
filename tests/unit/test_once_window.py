"""`once` passes and the `approval.once_window` (GrantKeeper over a real SQLite store)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.approvals import Outcome, Verdict
from proxy.approvals.fleet import FleetChannel
from proxy.approvals.granting import GrantKeeper
from proxy.grants import GrantIndex
from proxy.policy.model import ApprovalSection, Scope
from proxy.records import GrantFor, PendingItem
from proxy.store.sqlite import SqliteStore

HOST, PORT = "git.test", 8080


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def keeper(tmp_path: Path) -> AsyncIterator[tuple[GrantKeeper, Clock]]:
    store = await SqliteStore.open(tmp_path / "warden.db")
    clock = Clock()
    yield GrantKeeper(store, GrantIndex(clock), FleetChannel(store), clock), clock
    await store.close()


def _item(agent: str | None = "alice") -> PendingItem:
    return PendingItem(
        id="p1",
        host=HOST,
        port=PORT,
        scheme="http",
        method="GET",
        agent=agent,
        session=None,
        first_seen=1_000_000.0,
        last_seen=1_000_000.0,
        count=1,
        expires_at=1_003_600.0,
    )


async def _store_pass(grants: GrantKeeper) -> None:
    """What a `once` approval nobody waited for leaves in the store."""
    store = grants._store  # the keeper's own store: the pass is taken from there
    await store.add_grant(grants.once_pass(_item(), GrantFor.AGENT, "bob", "ok"))


def _approved() -> Verdict:
    return Verdict(Outcome.APPROVED, "p1", Scope.ONCE, GrantFor.AGENT, "bob", "human", "")


async def test_a_pass_admits_one_request_when_there_is_no_window(
    keeper: tuple[GrantKeeper, Clock],
) -> None:
    grants, _ = keeper
    await _store_pass(grants)
    assert await grants.take_once("mallory", HOST, PORT, 0.0) is None  # someone else's pass
    taken = await grants.take_once("alice", HOST, PORT, 0.0)
    assert taken is not None and taken.pending_id == "p1" and taken.approver == "bob"
    assert await grants.take_once("alice", HOST, PORT, 0.0) is None


async def test_a_used_pass_opens_a_window_for_the_same_agent_session_address_and_destination(
    keeper: tuple[GrantKeeper, Clock],
) -> None:
    grants, clock = keeper
    await _store_pass(grants)
    origin = ("s1", "10.0.0.7")
    assert await grants.take_once("alice", HOST, PORT, 10.0, origin) is not None
    clock.now += 9.5  # git's POSTs after its GET: the same operation
    again = await grants.take_once("alice", HOST, PORT, 10.0, origin)
    assert again is not None and again.pending_id == "p1"
    assert await grants.take_once("alice", HOST, PORT + 1, 10.0, origin) is None  # another port
    assert await grants.take_once("mallory", HOST, PORT, 10.0, origin) is None  # another agent
    # The same agent in another session, or from another address, is another operation.
    assert await grants.take_once("alice", HOST, PORT, 10.0, ("s2", "10.0.0.7")) is None
    assert await grants.take_once("alice", HOST, PORT, 10.0, ("s1", "10.0.0.8")) is None
    clock.now += 1.0  # the window has closed
    assert await grants.take_once("alice", HOST, PORT, 10.0, origin) is None


async def test_released_waiters_open_the_window_and_zero_turns_it_off(
    keeper: tuple[GrantKeeper, Clock],
) -> None:
    grants, clock = keeper
    grants.open_window("alice", HOST, PORT, _approved(), 0.0)
    assert await grants.take_once("alice", HOST, PORT, 0.0) is None
    grants.open_window("alice", HOST, PORT, _approved(), 5.0)
    assert await grants.take_once("alice", HOST, PORT, 0.0) == _approved()
    clock.now += 5.0
    assert await grants.take_once("alice", HOST, PORT, 0.0) is None


def test_once_window_is_ten_seconds_by_default_and_bounded() -> None:
    assert ApprovalSection().once_window == 10.0
    assert ApprovalSection(once_window="0s").once_window == 0.0
    assert ApprovalSection(once_window="10s").once_window == 10.0
    with pytest.raises(ValueError):
        ApprovalSection(once_window="1h")
