"""The gate: turns request facts into an admission, resolving the destination once."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.decide import Decision, Reason, Verdict, decide
from proxy.facts import RequestFacts
from proxy.hosts import IPAddress
from proxy.netguard import NetGuard
from proxy.policy.model import EffectivePolicy
from proxy.resolve import ResolutionError, Resolver
from proxy.telemetry import DecisionEvent, Telemetry


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision for one request and, when allowed, the address the proxy must dial."""

    decision: Decision
    address: IPAddress | None = None  # the resolved address (dialled only when allowed)
    pending_id: str | None = None

    @property
    def allowed(self) -> bool:
        return self.decision.allowed


class PolicyState:
    """Holds the policy in force; replaced atomically on reload."""

    def __init__(self, policy: EffectivePolicy) -> None:
        self.current = policy


class Gate:
    """Decides every request: the pure decision, plus the one DNS lookup it needs."""

    def __init__(
        self, policy: PolicyState, resolver: Resolver, guard: NetGuard, telemetry: Telemetry
    ) -> None:
        self.policy = policy
        self.resolver = resolver
        self.guard = guard
        self.telemetry = telemetry

    async def admit(self, facts: RequestFacts) -> Admission:
        """Decide `facts`; emit exactly one decision event."""
        admission = await self._admit(facts)
        self.telemetry.emit(
            DecisionEvent(facts, admission.decision, self.policy.current.mode, admission.address)
        )
        return admission

    async def _admit(self, facts: RequestFacts) -> Admission:
        policy = self.policy.current
        # First pass without DNS: a name the policy already refuses is never looked up.
        first = decide(facts, policy, guard=self.guard)
        if first.verdict is Verdict.DENY or facts.host is None:
            return Admission(first)
        try:
            address = await self.resolver.resolve(facts.host, facts.port)
        except ResolutionError as exc:
            return Admission(Decision(Verdict.DENY, Reason.DNS_FAILURE, detail=str(exc)))
        decision = decide(facts, policy, address=address, guard=self.guard)
        if decision.verdict is Verdict.HOLD:
            # Approvals are not wired in yet: a miss under `ask` is refused as pending.
            decision = Decision(
                Verdict.DENY,
                Reason.APPROVAL_PENDING,
                decision.rule,
                decision.source,
                "no rule matched; approval needed",
            )
        return Admission(decision, address)
