"""The approval parts on their own: fleet messages, waiters, the pending index."""

from __future__ import annotations

import asyncio

import pytest

from proxy.approvals import ApprovalError, ApprovalErrorCode, Outcome, Verdict
from proxy.approvals.fleet import FLEET_VERSION, FleetMessage, MessageKind
from proxy.approvals.pending import PendingIndex
from proxy.approvals.waiters import Waiters
from proxy.control.app import APPROVAL_ERROR_STATUS
from proxy.policy.model import ApprovalSettings, Scope
from proxy.records import GrantFor, PendingItem
from proxy.store import CHANNEL_GRANTS, CHANNEL_PENDING, CHANNEL_RESOLVED, RESYNC_PAYLOAD

# -- fleet messages ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        FleetMessage(MessageKind.PENDING_CREATED, "abc"),
        FleetMessage(MessageKind.ITEM_RESOLVED, "abc"),
        FleetMessage(MessageKind.GRANTS_CHANGED),
        FleetMessage(MessageKind.GRANT_REVOKED, "g-1"),
        FleetMessage(MessageKind.RESYNC_PENDING),
        FleetMessage(MessageKind.RESYNC_RESOLVED),
    ],
)
def test_fleet_messages_round_trip_typed_and_versioned(message: FleetMessage) -> None:
    payload = message.encode()
    assert f'"v":{FLEET_VERSION}' in payload and message.kind.value in payload
    assert FleetMessage.decode(message.channel, payload) == message


def test_store_resync_means_catch_up_on_that_channel() -> None:
    assert FleetMessage.decode(CHANNEL_RESOLVED, RESYNC_PAYLOAD) == FleetMessage(
        MessageKind.RESYNC_RESOLVED
    )
    assert FleetMessage.decode(CHANNEL_PENDING, RESYNC_PAYLOAD) == FleetMessage(
        MessageKind.RESYNC_PENDING
    )
    assert FleetMessage.decode(CHANNEL_GRANTS, RESYNC_PAYLOAD) == FleetMessage(
        MessageKind.GRANTS_CHANGED
    )
    assert FleetMessage.decode("other_channel", "x") is None


def test_earlier_string_payloads_are_still_read() -> None:
    assert FleetMessage.decode(CHANNEL_RESOLVED, "1a2b3c") == FleetMessage(
        MessageKind.ITEM_RESOLVED, "1a2b3c", 0
    )
    assert FleetMessage.decode(CHANNEL_GRANTS, "revoke:g-9") == FleetMessage(
        MessageKind.GRANT_REVOKED, "g-9", 0
    )


def test_unreadable_or_newer_messages_catch_up_instead() -> None:
    newer = '{"v":99,"kind":"item_resolved","id":"x"}'
    assert FleetMessage.decode(CHANNEL_RESOLVED, newer) == FleetMessage(MessageKind.RESYNC_RESOLVED)
    assert FleetMessage.decode(CHANNEL_GRANTS, '{"v":1,"kind":"nonsense"}') == FleetMessage(
        MessageKind.GRANTS_CHANGED
    )
    wrong_channel = FleetMessage(MessageKind.GRANT_REVOKED, "g").encode()
    assert FleetMessage.decode(CHANNEL_PENDING, wrong_channel) == FleetMessage(
        MessageKind.RESYNC_PENDING
    )


# -- waiters -----------------------------------------------------------------------------------


def verdict(item_id: str) -> Verdict:
    return Verdict(Outcome.APPROVED, item_id, Scope.ONCE, GrantFor.ALL, "ann", "human", "")


async def test_release_answers_every_waiter_of_an_item() -> None:
    waiters = Waiters()
    tasks = [asyncio.ensure_future(waiters.wait("a", 5, None)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert waiters.count("a") == 3 and "a" in waiters
    assert waiters.release("a", verdict("a")) == 3
    results = await asyncio.gather(*tasks)
    assert all(r.verdict == verdict("a") for r in results)
    assert waiters.count("a") == 0 and not waiters


async def test_no_answer_in_time_and_client_gone_and_drain() -> None:
    waiters = Waiters()
    timed_out = await waiters.wait("a", 0.05, None)
    assert timed_out.verdict is None and not timed_out.abandoned
    gone = await waiters.wait("b", 5, lambda: True)  # the sweeper notices within 0.5 s
    assert gone.abandoned and gone.verdict is None
    task = asyncio.ensure_future(waiters.wait("c", 5, None))
    await asyncio.sleep(0.01)
    waiters.drain()
    assert (await task).draining


# -- pending index -----------------------------------------------------------------------------


def item(item_id: str, agent: str | None, host: str) -> PendingItem:
    return PendingItem(item_id, host, 443, "https", "CONNECT", agent, None, 0, 0, 1, 10)


def test_pending_index_limits_per_agent_and_in_all() -> None:
    index = PendingIndex()
    settings = ApprovalSettings(max_pending=2, max_pending_total=3)
    index.put(item("1", "alice", "a.test"))
    index.put(item("2", "alice", "b.test"))
    assert index.limit_reached("alice", "a.test", 443, settings) is None  # joins
    assert "max_pending" in (index.limit_reached("alice", "c.test", 443, settings) or "")
    index.put(item("3", "bob", "a.test"))
    assert "max_pending_total" in (index.limit_reached("carol", "x.test", 443, settings) or "")
    index.drop("1")
    assert index.limit_reached("alice", "c.test", 443, settings) is None
    assert len(index) == 2 and not index.has_key("alice", "a.test", 443)


# -- errors ------------------------------------------------------------------------------------


def test_every_error_code_has_an_api_status() -> None:
    assert set(APPROVAL_ERROR_STATUS) == set(ApprovalErrorCode)
    error = ApprovalError(ApprovalErrorCode.NOT_FOUND, "gone")
    assert (error.code, error.detail) == ("not_found", "gone")
