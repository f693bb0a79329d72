"""The review tier inside approvals, over a real SQLite store: outcomes are carried out like an
approver's (grant within the cap, history row, event) and one review serves concurrent asks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.approvals.fleet import FleetChannel
from proxy.approvals.granting import GrantKeeper
from proxy.approvals.model import Outcome
from proxy.approvals.reviewing import ReviewTier
from proxy.facts import RequestFacts, Transport
from proxy.grants import GrantIndex
from proxy.hosts import canonicalize_host
from proxy.policy.load import load_policies
from proxy.policy.model import EffectivePolicy, Scope
from proxy.records import GrantFor
from proxy.review.chain import Review, ReviewChain, ReviewOutcome, ReviewRequest, Signal
from proxy.store.sqlite import SqliteStore
from proxy.telemetry import Telemetry
from proxy.telemetry.events import Attributes


class Capture:
    def __init__(self) -> None:
        self.events: list[Attributes] = []

    def emit(self, event: Any, severity: str, attributes: Attributes) -> None:
        self.events.append(attributes)


class Counting:
    name = "counting"

    def __init__(self, outcome: ReviewOutcome, delay: float = 0.0) -> None:
        self.outcome, self.delay, self.calls = outcome, delay, 0

    async def review(self, request: ReviewRequest) -> Review:
        self.calls += 1
        await asyncio.sleep(self.delay)
        signal = Signal("trusted", "listed", self.outcome)
        return Review("rules", self.outcome, f"said {self.outcome.value}", (signal,))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "warden.db")
    yield opened
    await opened.close()


def policy(tmp_path: Path) -> EffectivePolicy:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\ndefault: ask\napproval:\n  review: [{kind: rules}]\n")
    return load_policies([path])


def facts(agent: str | None = "alice") -> RequestFacts:
    return RequestFacts(
        request_id="r1",
        raw_host="docs.vendor.example",
        host=canonicalize_host("docs.vendor.example"),
        port=443,
        transport=Transport.HTTPS_CONNECT,
        method="CONNECT",
        scheme="https",
        agent=agent,
        session="s1" if agent else None,
    )


def tier_with(
    store: SqliteStore, reviewer: Counting, capture: Capture
) -> tuple[ReviewTier, GrantIndex]:
    index = GrantIndex()
    keeper = GrantKeeper(store, index, FleetChannel(store), clock=time.time)
    tier = ReviewTier(store, keeper, Telemetry([capture]), clock=time.time)
    tier.reviewer.chain_for = lambda _policy: ReviewChain([reviewer])  # type: ignore[method-assign]
    return tier, index


async def test_automatic_approval_stores_a_session_grant_for_the_agent(
    store: SqliteStore, tmp_path: Path
) -> None:
    capture = Capture()
    tier, index = tier_with(store, Counting(ReviewOutcome.APPROVE), capture)
    reviewed = await tier.review(facts(), policy(tmp_path))
    assert reviewed is not None and reviewed.verdict is not None
    verdict = reviewed.verdict
    assert (verdict.outcome, verdict.scope, verdict.grant_for) == (
        Outcome.APPROVED,
        Scope.SESSION,
        GrantFor.AGENT,
    )
    (grant,) = await store.list_grants()
    assert (grant.id, grant.agent, grant.session, grant.scope) == (
        verdict.grant_id,
        "alice",
        "s1",
        Scope.SESSION,
    )
    assert grant.created_by == "auto:rules" and [g.id for g in index.all()] == [grant.id]
    record = await store.latest_approval(verdict.pending_id)
    assert record is not None and record.state == "approved" and record.reviewer == "rules"
    assert json.loads(record.review or "{}")["signals"] == ["trusted"]
    (event,) = capture.events
    assert event["egress.approval.reviewer"] == "rules"
    assert event["egress.approval.signals"] == ["trusted"]


async def test_automatic_denial_is_once_and_stores_no_grant(
    store: SqliteStore, tmp_path: Path
) -> None:
    tier, _ = tier_with(store, Counting(ReviewOutcome.DENY), Capture())
    reviewed = await tier.review(facts(), policy(tmp_path))
    assert reviewed is not None and reviewed.verdict is not None
    assert reviewed.verdict.outcome is Outcome.DENIED and reviewed.verdict.scope is Scope.ONCE
    assert await store.list_grants() == []


async def test_anonymous_approval_is_once_without_a_grant(
    store: SqliteStore, tmp_path: Path
) -> None:
    tier, _ = tier_with(store, Counting(ReviewOutcome.APPROVE), Capture())
    reviewed = await tier.review(facts(agent=None), policy(tmp_path))
    assert reviewed is not None and reviewed.verdict is not None
    assert reviewed.verdict.scope is Scope.ONCE and await store.list_grants() == []


async def test_concurrent_asks_share_one_review(store: SqliteStore, tmp_path: Path) -> None:
    reviewer = Counting(ReviewOutcome.ESCALATE, delay=0.1)
    tier, _ = tier_with(store, reviewer, Capture())
    p = policy(tmp_path)
    results = await asyncio.gather(*(tier.review(facts(), p) for _ in range(5)))
    assert reviewer.calls == 1
    assert all(r is not None and r.verdict is None for r in results)


async def test_a_sharer_survives_the_first_asker_going_away(
    store: SqliteStore, tmp_path: Path
) -> None:
    reviewer = Counting(ReviewOutcome.ESCALATE, delay=0.2)
    tier, _ = tier_with(store, reviewer, Capture())
    p = policy(tmp_path)
    first = asyncio.ensure_future(tier.review(facts(), p))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(tier.review(facts(), p))
    await asyncio.sleep(0.05)
    first.cancel()
    result = await second
    assert result is not None and result.result.outcome is ReviewOutcome.ESCALATE
    assert reviewer.calls == 2  # the second asker reviewed again for itself
