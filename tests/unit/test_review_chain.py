"""The review chain and what the policy lets an automatic approval grant."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from proxy.hosts import canonicalize_host
from proxy.policy.load import load_policies
from proxy.policy.model import EffectivePolicy, Scope
from proxy.policy.requirements import load_effective
from proxy.records import GrantFor
from proxy.review.chain import (
    JUSTIFICATION_LIMIT,
    ChainResult,
    Review,
    ReviewChain,
    ReviewOutcome,
    ReviewRequest,
    Signal,
    bounded_justification,
)
from proxy.review.runner import AutoDecision, AutoReviewer


class Fixed:
    def __init__(self, name: str, outcome: ReviewOutcome, scope: Scope | None = None) -> None:
        self.name = name
        self.outcome = outcome
        self.scope = scope
        self.seen: list[ReviewRequest] = []

    async def review(self, request: ReviewRequest) -> Review:
        self.seen.append(request)
        signal = Signal(f"{self.name}-signal", "seen", self.outcome)
        return Review(self.name, self.outcome, f"{self.name} said so", (signal,), self.scope)


class Broken:
    name = "broken"

    async def review(self, request: ReviewRequest) -> Review:
        raise RuntimeError("kaput")


def request() -> ReviewRequest:
    return ReviewRequest(canonicalize_host("x.example"), 443, "CONNECT", "https", agent="alice")


async def test_first_answer_that_is_not_escalate_decides() -> None:
    first, second, third = (
        Fixed("a", ReviewOutcome.ESCALATE),
        Fixed("b", ReviewOutcome.DENY),
        Fixed("c", ReviewOutcome.APPROVE),
    )
    result = await ReviewChain([first, second, third]).run(request())
    assert result.final.reviewer == "b" and result.outcome is ReviewOutcome.DENY
    assert [r.reviewer for r in result.trail] == ["a", "b"] and not third.seen
    # later reviewers see the signals earlier ones found
    assert [s.name for s in second.seen[0].signals] == ["a-signal"]


async def test_all_escalating_escalates_with_the_whole_trail() -> None:
    result = await ReviewChain(
        [Fixed("a", ReviewOutcome.ESCALATE), Fixed("b", ReviewOutcome.ESCALATE)]
    ).run(request())
    assert result.outcome is ReviewOutcome.ESCALATE
    assert result.summary() == "a: a said so; b: b said so"
    assert result.signal_names == ("a-signal", "b-signal")


async def test_a_failing_reviewer_escalates_and_never_approves() -> None:
    result = await ReviewChain([Broken(), Fixed("b", ReviewOutcome.ESCALATE)]).run(request())
    assert result.trail[0].outcome is ReviewOutcome.ESCALATE
    assert "kaput" in result.trail[0].rationale
    assert result.outcome is ReviewOutcome.ESCALATE


def test_justification_is_bounded() -> None:
    assert bounded_justification(None) is None and bounded_justification("  ") is None
    long = bounded_justification("x" * 5000)
    assert long is not None and len(long) == JUSTIFICATION_LIMIT


# -- caps -----------------------------------------------------------------------------------


def policy(tmp_path: Path, approval: str, requirements: str | None = None) -> EffectivePolicy:
    path = tmp_path / "p.yaml"
    path.write_text(f"version: 1\ndefault: ask\napproval:\n{approval}")
    if requirements is None:
        return load_policies([path])
    req = tmp_path / "r.yaml"
    req.write_text(f"version: 1\napproval:\n{requirements}")
    return load_effective([path], req)[0]


def approved(scope: Scope | None = None, signals: tuple[str, ...] = ()) -> ChainResult:
    review = Review(
        "rules",
        ReviewOutcome.APPROVE,
        "ok",
        tuple(Signal(n, "", ReviewOutcome.ESCALATE) for n in signals),
        scope,
    )
    return ChainResult(review, (review,))


RULES = "  review: [{kind: rules}]\n"


def test_default_cap_is_a_session_grant_for_the_agent(tmp_path: Path) -> None:
    settled = AutoReviewer().settle(approved(), "alice", policy(tmp_path, RULES))
    assert isinstance(settled, AutoDecision)
    assert (settled.scope, settled.grant_for) == (Scope.SESSION, GrantFor.AGENT)


def test_anonymous_caller_gets_once_unless_the_policy_says_for_all(tmp_path: Path) -> None:
    settled = AutoReviewer().settle(approved(), None, policy(tmp_path, RULES))
    assert isinstance(settled, AutoDecision) and settled.scope is Scope.ONCE
    loose = policy(tmp_path, RULES + "  auto: {for: all, scope: always}\n")
    settled = AutoReviewer().settle(approved(), None, loose)
    assert isinstance(settled, AutoDecision)
    assert (settled.scope, settled.grant_for) == (Scope.ALWAYS, GrantFor.ALL)


def test_a_reviewer_may_ask_for_less_never_more(tmp_path: Path) -> None:
    p = policy(tmp_path, RULES + "  auto: {scope: session}\n")
    once = AutoReviewer().settle(approved(Scope.ONCE), "alice", p)
    always = AutoReviewer().settle(approved(Scope.ALWAYS), "alice", p)
    assert isinstance(once, AutoDecision) and once.scope is Scope.ONCE
    assert isinstance(always, AutoDecision) and always.scope is Scope.SESSION


def test_scope_cap_follows_the_allowed_scopes(tmp_path: Path) -> None:
    p = policy(tmp_path, RULES + "  scopes: [once, always]\n")
    settled = AutoReviewer().settle(approved(), "alice", p)
    assert isinstance(settled, AutoDecision) and settled.scope is Scope.ONCE


def test_rate_signal_turns_an_approval_into_an_escalation(tmp_path: Path) -> None:
    settled = AutoReviewer().settle(approved(signals=("rate",)), "alice", policy(tmp_path, RULES))
    assert isinstance(settled, ChainResult) and settled.outcome is ReviewOutcome.ESCALATE


def test_requirements_can_forbid_automatic_approval(tmp_path: Path) -> None:
    p = policy(tmp_path, RULES, "  auto: {enabled: false}\n")
    assert p.approval.auto.enabled is False
    settled = AutoReviewer().settle(approved(), "alice", p)
    assert isinstance(settled, ChainResult) and settled.outcome is ReviewOutcome.ESCALATE
    assert "approval.auto" in settled.final.rationale
    # a denial is still automatic
    deny = replace(approved().final, outcome=ReviewOutcome.DENY)
    denied = AutoReviewer().settle(ChainResult(deny, (deny,)), "alice", p)
    assert isinstance(denied, AutoDecision) and denied.scope is Scope.ONCE


def test_requirements_cap_the_automatic_scope_and_for(tmp_path: Path) -> None:
    p = policy(
        tmp_path,
        RULES + "  auto: {scope: always, for: all}\n",
        "  auto: {scope: once, for: agent}\n",
    )
    assert p.approval.auto.scope is Scope.ONCE and p.approval.auto.grant_for == "agent"
    settled = AutoReviewer().settle(approved(), None, p)
    assert isinstance(settled, AutoDecision) and settled.scope is Scope.ONCE


def test_review_section_validates_patterns(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"trusted|pattern"):
        policy(tmp_path, "  review: [{kind: rules, trusted: ['*']}]\n")
    with pytest.raises(Exception, match=r"kind|webhook|url"):
        policy(tmp_path, "  review: [{kind: webhook}]\n")
