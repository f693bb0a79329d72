"""The gate: turns request facts into an admission, resolving the destination once and holding
misses for approval."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proxy.approvals import POLICY_APPROVER, ApprovalQueue, Outcome
from proxy.approvals import Verdict as ApprovalVerdict
from proxy.auth import Authenticator
from proxy.decide import Decision, Reason, Verdict, decide
from proxy.facts import RequestFacts, Transport
from proxy.grants import GrantIndex
from proxy.hosts import IPAddress, canonicalize_host
from proxy.netguard import NetGuard
from proxy.policy.model import EffectivePolicy
from proxy.records import PendingItem
from proxy.resolve import ResolutionError, Resolver
from proxy.store import StoreError
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


def _after_approval(verdict: ApprovalVerdict) -> Decision:
    source = verdict.grant_id or f"approval:{verdict.pending_id}"
    detail = f"{verdict.outcome.value} by {verdict.approver} (scope {verdict.scope.value})"
    if verdict.outcome is Outcome.APPROVED:
        return Decision(Verdict.ALLOW, Reason.APPROVED, None, source, detail)
    return Decision(Verdict.DENY, Reason.APPROVAL_DENIED, None, source, detail)


class Gate:
    """Decides every request: the pure decision, the one DNS lookup it needs, and holding."""

    def __init__(
        self,
        policy: PolicyState,
        resolver: Resolver,
        guard: NetGuard,
        telemetry: Telemetry,
        grants: GrantIndex | None = None,
        approvals: ApprovalQueue | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        self.policy = policy
        self.resolver = resolver
        self.guard = guard
        self.telemetry = telemetry
        self.grants = grants or GrantIndex()
        self.approvals = approvals
        self.auth = auth or Authenticator()

    def _emit(self, facts: RequestFacts, admission: Admission) -> None:
        self.telemetry.emit(
            DecisionEvent(
                facts,
                admission.decision,
                self.policy.current.mode,
                admission.address,
                admission.pending_id,
            )
        )

    async def admit(
        self, facts: RequestFacts, client_gone: Callable[[], bool] | None = None
    ) -> Admission:
        """Decide `facts`, holding a miss under `ask`; emits one decision event per verdict."""
        admission = await self._decide(facts)
        if admission.decision.verdict is not Verdict.HOLD:
            self._emit(facts, admission)
            return admission
        return await self._hold(facts, admission, client_gone)

    def judge_pending(self, item: PendingItem) -> Outcome | None:
        """How the rules in force now decide a pending item (None: still a miss)."""
        facts = RequestFacts(
            request_id="reevaluate",
            raw_host=item.host,
            host=canonicalize_host(item.host),
            port=item.port,
            transport=Transport.HTTPS_CONNECT if item.method == "CONNECT" else Transport.HTTP,
            method=item.method,
            scheme=item.scheme,
            agent=item.agent,
            session=item.session,
        )
        grants = self.grants.rules_for(item.agent, item.session)
        decision = decide(facts, self.policy.current, grants=grants, guard=self.guard)
        if decision.verdict is Verdict.ALLOW:
            return Outcome.APPROVED
        if decision.verdict is Verdict.DENY:
            return Outcome.DENIED
        return None

    async def reevaluate_pending(self) -> int:
        """After a policy or grant change: answer held requests the new rules decide."""
        if self.approvals is None:
            return 0
        return await self.approvals.reevaluate(self.judge_pending)

    async def _decide(self, facts: RequestFacts) -> Admission:
        policy = self.policy.current
        grants = self.grants.rules_for(facts.agent, facts.session)
        # First pass without DNS: a name the policy already refuses is never looked up.
        first = decide(facts, policy, grants=grants, guard=self.guard)
        if first.verdict is Verdict.DENY or facts.host is None:
            return Admission(first)
        try:
            address = await self.resolver.resolve(facts.host, facts.port)
        except ResolutionError as exc:
            return Admission(Decision(Verdict.DENY, Reason.DNS_FAILURE, detail=str(exc)))
        return Admission(
            decide(facts, policy, grants=grants, address=address, guard=self.guard), address
        )

    async def _hold(
        self, facts: RequestFacts, held: Admission, client_gone: Callable[[], bool] | None
    ) -> Admission:
        assert facts.host is not None
        if self.approvals is None:
            admission = Admission(
                Decision(Verdict.DENY, Reason.APPROVAL_UNAVAILABLE, detail="approvals unavailable"),
                held.address,
            )
            self._emit(facts, admission)
            return admission
        one_shot = await self.approvals.take_one_shot(facts.agent, facts.host.name, facts.port)
        if one_shot is not None:
            admission = Admission(_after_approval(one_shot), held.address, one_shot.pending_id)
            self._emit(facts, admission)
            return admission

        def on_held(item: PendingItem) -> None:
            self._emit(facts, Admission(held.decision, held.address, item.id))

        try:
            result = await self.approvals.hold(
                facts, self.policy.current.approval, client_gone, on_held
            )
        except StoreError as exc:
            # The shared queue is unreachable: keep enforcing, but hold nothing new.
            admission = Admission(
                Decision(Verdict.DENY, Reason.APPROVAL_UNAVAILABLE, detail=str(exc)),
                held.address,
            )
            self._emit(facts, admission)
            return admission
        if result.verdict is None:
            decision = Decision(
                Verdict.DENY,
                Reason.APPROVAL_PENDING,
                detail="client went away" if result.abandoned else "no answer in time",
            )
        elif result.verdict.approver == POLICY_APPROVER:
            # Released by a policy or grant change: the new rules decide, with their provenance.
            again = await self._decide(facts)
            decision = again.decision
            if decision.verdict is Verdict.HOLD:
                decision = Decision(Verdict.DENY, Reason.APPROVAL_PENDING, detail="still unknown")
        else:
            decision = _after_approval(result.verdict)
        admission = Admission(decision, held.address, result.item.id)
        self._emit(facts, admission)
        return admission
