"""The review chain: reviewers that answer approve, deny or escalate before a human is asked.

Each reviewer sees the destination (a name, never an address: nothing is resolved before an
approval), the agent, its justification, its recent decisions and the signals earlier reviewers
found. The first answer that is not `escalate` decides; when every reviewer escalates, the
item goes to the human queue with the whole trail. A reviewer that fails escalates: no error
ever approves.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

import structlog

from proxy.hosts import Host
from proxy.policy.model import Scope

log = structlog.get_logger("egress-warden")

JUSTIFICATION_LIMIT = 500  # characters of an agent's justification that are kept
RECENT_LIMIT = 20  # recent decisions per agent passed to reviewers
_AGENTS_KEPT = 10_000  # agents whose recent decisions are remembered (least recent dropped)


class ReviewOutcome(StrEnum):
    APPROVE = "approve"
    DENY = "deny"
    ESCALATE = "escalate"


@dataclass(frozen=True, slots=True)
class Signal:
    """One thing a reviewer noticed, named so the rationale and the events can cite it."""

    name: str  # trusted | ip_literal | port | lookalike | mixed_script | encoded_label | ...
    detail: str
    effect: ReviewOutcome  # what this signal alone argues for

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "detail": self.detail, "effect": self.effect.value}


@dataclass(frozen=True, slots=True)
class RecentDecision:
    """One of the agent's recent review outcomes, shown to later reviewers."""

    host: str
    port: int
    outcome: str  # approve | deny | escalate | approved | denied (by a human)
    reviewer: str
    at: float

    def as_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "outcome": self.outcome,
            "reviewer": self.reviewer,
            "at": self.at,
        }


@dataclass(frozen=True, slots=True)
class ReviewRequest:
    """What a reviewer is asked about: a destination not yet decided (a name, unresolved)."""

    host: Host
    port: int
    method: str
    scheme: str
    path: str | None = None
    agent: str | None = None
    session: str | None = None
    justification: str | None = None
    recent: tuple[RecentDecision, ...] = ()
    signals: tuple[Signal, ...] = ()  # found by earlier reviewers in the chain

    def as_json(self) -> dict[str, Any]:
        """The request as the webhook and LLM reviewers receive it."""
        return {
            "agent": self.agent,
            "session": self.session,
            "host": self.host.name,
            "port": self.port,
            "method": self.method,
            "scheme": self.scheme,
            "path": self.path,
            "justification": self.justification,
            "recent_decisions": [r.as_json() for r in self.recent],
            "signals": [s.as_json() for s in self.signals],
        }


@dataclass(frozen=True, slots=True)
class Review:
    """One reviewer's answer."""

    reviewer: str  # rules | webhook | llm
    outcome: ReviewOutcome
    rationale: str
    signals: tuple[Signal, ...] = ()
    scope: Scope | None = None  # a reviewer may ask for less than the configured cap

    def as_json(self) -> dict[str, Any]:
        return {
            "reviewer": self.reviewer,
            "outcome": self.outcome.value,
            "rationale": self.rationale,
            "signals": [s.as_json() for s in self.signals],
            **({"scope": self.scope.value} if self.scope is not None else {}),
        }


@dataclass(frozen=True, slots=True)
class ChainResult:
    """The deciding review (the last one when all escalated) and every answer on the way."""

    final: Review
    trail: tuple[Review, ...]

    @property
    def outcome(self) -> ReviewOutcome:
        return self.final.outcome

    @property
    def signal_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.name for r in self.trail for s in r.signals))

    def summary(self) -> str:
        """One line for people: who decided what, and why (the trail when all escalated)."""
        if self.final.outcome is not ReviewOutcome.ESCALATE:
            return f"{self.final.reviewer}: {self.final.rationale}"
        return "; ".join(f"{r.reviewer}: {r.rationale}" for r in self.trail)

    def to_json(self) -> str:
        """The stored form (pending.review, approvals.review)."""
        return json.dumps(
            {
                "outcome": self.final.outcome.value,
                "reviewer": self.final.reviewer,
                "rationale": self.final.rationale,
                "signals": list(self.signal_names),
                "trail": [r.as_json() for r in self.trail],
            },
            ensure_ascii=False,
        )


class Reviewer(Protocol):
    """Anything that can review a destination (the rule, webhook and LLM reviewers)."""

    @property
    def name(self) -> str: ...

    async def review(self, request: ReviewRequest) -> Review: ...


class ReviewChain:
    """Reviewers in order; the first answer that is not `escalate` decides."""

    def __init__(self, reviewers: Sequence[Reviewer]) -> None:
        self.reviewers = tuple(reviewers)

    async def run(self, request: ReviewRequest) -> ChainResult:
        trail: list[Review] = []
        for reviewer in self.reviewers:
            try:
                review = await reviewer.review(request)
            except Exception as exc:  # a broken reviewer escalates, never approves
                log.warning("egress.review.error", reviewer=reviewer.name, error=repr(exc))
                review = Review(
                    reviewer.name, ReviewOutcome.ESCALATE, f"reviewer failed: {exc!r}"[:300]
                )
            trail.append(review)
            if review.outcome is not ReviewOutcome.ESCALATE:
                return ChainResult(review, tuple(trail))
            request = replace(request, signals=request.signals + review.signals)
        if not trail:
            trail.append(Review("chain", ReviewOutcome.ESCALATE, "no reviewer configured"))
        return ChainResult(trail[-1], tuple(trail))


@dataclass
class RecentDecisions:
    """The last few review outcomes per agent (in memory, per process): context for reviewers."""

    limit: int = RECENT_LIMIT
    _by_agent: OrderedDict[str | None, deque[RecentDecision]] = field(default_factory=OrderedDict)

    def add(self, agent: str | None, decision: RecentDecision) -> None:
        entries = self._by_agent.pop(agent, None) or deque(maxlen=self.limit)
        entries.append(decision)
        self._by_agent[agent] = entries
        while len(self._by_agent) > _AGENTS_KEPT:
            self._by_agent.popitem(last=False)

    def of(self, agent: str | None) -> tuple[RecentDecision, ...]:
        return tuple(self._by_agent.get(agent, ()))


@dataclass
class RateWindow:
    """Distinct new destinations each agent asked for within a sliding window (in memory)."""

    _seen: OrderedDict[str | None, OrderedDict[str, float]] = field(default_factory=OrderedDict)

    def touch(self, agent: str | None, destination: str, window: float, now: float) -> int:
        """Record `destination` for `agent`; how many distinct ones it asked for in `window`."""
        seen = self._seen.pop(agent, None) or OrderedDict()
        seen.pop(destination, None)
        seen[destination] = now
        while seen and next(iter(seen.values())) < now - window:
            seen.popitem(last=False)
        while len(seen) > 10_000:  # bounded whatever the window
            seen.popitem(last=False)
        self._seen[agent] = seen
        while len(self._seen) > _AGENTS_KEPT:
            self._seen.popitem(last=False)
        return len(seen)


def bounded_justification(text: str | None) -> str | None:
    """An agent's justification as kept: stripped, at most JUSTIFICATION_LIMIT characters."""
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    if len(text) > JUSTIFICATION_LIMIT:
        return text[: JUSTIFICATION_LIMIT - 1] + "…"
    return text


def now() -> float:
    return time.monotonic()
