"""The auto-review tier as the approval queue uses it: builds the chain the policy configures,
runs it for a held request, and applies what the policy and requirements allow an automatic
approval to grant."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.facts import RequestFacts
from proxy.policy.model import (
    EffectivePolicy,
    LlmReviewerSection,
    RulesReviewerSection,
    Scope,
    WebhookReviewerSection,
)
from proxy.records import GrantFor
from proxy.review.chain import (
    ChainResult,
    RateWindow,
    RecentDecision,
    RecentDecisions,
    Review,
    ReviewChain,
    Reviewer,
    ReviewOutcome,
    ReviewRequest,
    bounded_justification,
    now,
)
from proxy.review.rules import RulesReviewer, known_hosts
from proxy.review.webhook import WebhookReviewer

SCOPE_ORDER = (Scope.ONCE, Scope.SESSION, Scope.ALWAYS)


@dataclass(frozen=True, slots=True)
class AutoDecision:
    """A chain result that decided (approve or deny), with what an approval may grant."""

    result: ChainResult
    scope: Scope  # ONCE for a denial
    grant_for: GrantFor

    @property
    def approved(self) -> bool:
        return self.result.outcome is ReviewOutcome.APPROVE


def _escalated(result: ChainResult, why: str) -> ChainResult:
    """`result` turned into an escalation by the policy (the trail keeps what was answered)."""
    review = Review("policy", ReviewOutcome.ESCALATE, why, result.final.signals)
    return ChainResult(review, (*result.trail, review))


class AutoReviewer:
    """The review tier: one per process; its rate window and recent decisions outlive
    reloads (the chain is rebuilt when the policy changes)."""

    def __init__(self, clock: Callable[[], float] = now) -> None:
        self.recent = RecentDecisions()
        self.rate = RateWindow()
        self._clock = clock
        self._built: tuple[EffectivePolicy, ReviewChain] | None = None

    def chain_for(self, policy: EffectivePolicy) -> ReviewChain:
        if self._built is not None and self._built[0] is policy:
            return self._built[1]
        reviewers: list[Reviewer] = []
        allowed = known_hosts(policy.allow.rules, ())
        for section in policy.approval.review:
            if isinstance(section, RulesReviewerSection):
                reviewers.append(RulesReviewer(section, allowed, self.rate, self._clock))
            elif isinstance(section, WebhookReviewerSection):
                reviewers.append(WebhookReviewer(section))
            elif isinstance(section, LlmReviewerSection) and section.enabled:
                from proxy.review.llm import LlmReviewer  # the client package loads on use

                reviewers.append(LlmReviewer(section))
        chain = ReviewChain(reviewers)
        self._built = (policy, chain)
        return chain

    def request_for(self, facts: RequestFacts) -> ReviewRequest:
        assert facts.host is not None
        return ReviewRequest(
            host=facts.host,
            port=facts.port,
            method=facts.method,
            scheme=facts.scheme,
            path=facts.path,
            agent=facts.agent,
            session=facts.session,
            justification=bounded_justification(facts.justification),
            recent=self.recent.of(facts.agent),
        )

    async def dry_review(
        self, facts: RequestFacts, policy: EffectivePolicy
    ) -> ChainResult | AutoDecision | None:
        """What the tier would decide, with no side effect: only the rules reviewers (a dry run
        asks no webhook or model), on a copy of the rate window. None: no rules reviewer."""
        sections = [s for s in policy.approval.review if isinstance(s, RulesReviewerSection)]
        if not sections or facts.host is None:
            return None
        allowed = known_hosts(policy.allow.rules, ())
        rate = copy.deepcopy(self.rate)
        chain = ReviewChain([RulesReviewer(s, allowed, rate, self._clock) for s in sections])
        return self.settle(await chain.run(self.request_for(facts)), facts.agent, policy)

    async def review(
        self, facts: RequestFacts, policy: EffectivePolicy
    ) -> ChainResult | AutoDecision | None:
        """None when no reviewer is configured; an AutoDecision when the chain decided and the
        policy lets it; else the (escalated) chain result for the human queue."""
        if not policy.approval.review or facts.host is None:
            return None
        result = await self.chain_for(policy).run(self.request_for(facts))
        decided = self.settle(result, facts.agent, policy)
        self.remember(facts, result if isinstance(decided, ChainResult) else decided.result)
        return decided

    def settle(
        self, result: ChainResult, agent: str | None, policy: EffectivePolicy
    ) -> ChainResult | AutoDecision:
        """Apply the rate signal and the approval caps (policy and requirements) to `result`."""
        grant_for = GrantFor.AGENT if agent is not None else GrantFor.ALL
        if result.outcome is ReviewOutcome.DENY:
            return AutoDecision(result, Scope.ONCE, grant_for)
        if result.outcome is ReviewOutcome.ESCALATE:
            return result
        if "rate" in result.signal_names:
            return _escalated(result, "rate signal: an automatic approval needs a human now")
        auto = policy.approval.auto
        if not auto.enabled:
            return _escalated(result, "automatic approval is off (approval.auto.enabled)")
        cap = auto.scope
        asked = result.final.scope
        if asked is not None and SCOPE_ORDER.index(asked) < SCOPE_ORDER.index(cap):
            cap = asked
        if agent is None and auto.grant_for != "all":
            # A grant without an agent covers every caller: only with an explicit `for: all`.
            cap = Scope.ONCE
        if agent is not None and auto.grant_for == "all":
            grant_for = GrantFor.ALL
        allowed = [
            s for s in SCOPE_ORDER[: SCOPE_ORDER.index(cap) + 1] if s in policy.approval.scopes
        ]
        if not allowed:
            return _escalated(result, "no scope an automatic approval may grant is allowed")
        return AutoDecision(result, allowed[-1], grant_for)

    def remember(self, facts: RequestFacts, result: ChainResult) -> None:
        assert facts.host is not None
        self.recent.add(
            facts.agent,
            RecentDecision(
                facts.host.name,
                facts.port,
                result.outcome.value,
                result.final.reviewer,
                time.time(),
            ),
        )
