"""The gate: the one door every request goes through, whatever edge saw it.

An edge (CONNECT, plain HTTP, a request inside an inspected tunnel, a TLS ClientHello in a raw
tunnel, a dry run) hands over what it saw as `RequestFacts`; the gate decides with the snapshot
in force, resolves a name only once the rules allow it (a miss is held unresolved, so no DNS
query ever leaks a name nobody approved), holds misses for approval, re-checks the dialled
address after approval, and emits exactly one decision event per verdict.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from proxy.approvals import POLICY_APPROVER, ApprovalQueue, Outcome
from proxy.approvals import Verdict as ApprovalVerdict
from proxy.auth import Authenticator, Caller
from proxy.decide import apply_mode, decide
from proxy.facts import RequestFacts, Transport
from proxy.grants import GrantIndex
from proxy.hosts import InvalidHost, IPAddress, canonicalize_host
from proxy.identity import Identity
from proxy.inspection import decide_inspected
from proxy.netguard import NetGuard
from proxy.policy.model import EffectivePolicy, InspectRule, ScanMode
from proxy.records import PendingItem
from proxy.resolve import ResolutionError, Resolver
from proxy.review.runner import AutoDecision, AutoReviewer
from proxy.secrets import Finding
from proxy.store import StoreError
from proxy.telemetry import DecisionEvent, Telemetry
from proxy.verdicts import Decision, Reason, Tier, Verdict


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What decides, swapped as one on reload: the policy, who the agents are, and which
    addresses are the proxy itself."""

    policy: EffectivePolicy
    auth: Authenticator
    guard: NetGuard


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision for one request and, when allowed, the address the proxy must dial."""

    decision: Decision
    address: IPAddress | None = None  # the checked address (dialled only when allowed)
    pending_id: str | None = None
    inspect: InspectRule | None = None  # an admitted CONNECT to a host under `inspect:`

    @property
    def allowed(self) -> bool:
        return self.decision.allowed


def _after_approval(verdict: ApprovalVerdict) -> Decision:
    source = verdict.grant_id or f"approval:{verdict.pending_id}"
    detail = f"{verdict.outcome.value} by {verdict.approver} (scope {verdict.scope.value})"
    if verdict.note:
        detail += f": {verdict.note}"  # the approver's words reach the agent
    if verdict.outcome is Outcome.APPROVED:
        return Decision(Verdict.ALLOW, Reason.APPROVED, None, source, detail)
    return Decision(Verdict.DENY, Reason.APPROVAL_DENIED, None, source, detail, Tier.FLOOR)


def _deny(reason: Reason, detail: str, tier: Tier = Tier.GUARD) -> Decision:
    return Decision(Verdict.DENY, reason, detail=detail, tier=tier)


class Gate:
    """Decides every request: the pure decision, the one DNS lookup it needs, and holding."""

    def __init__(
        self,
        snapshot: Snapshot,
        resolver: Resolver,
        telemetry: Telemetry,
        grants: GrantIndex | None = None,
        approvals: ApprovalQueue | None = None,
        commit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._generation = 0
        self.resolver = resolver
        self.telemetry = telemetry
        self.grants = grants or GrantIndex()
        self.approvals = approvals
        # Writes the audit rows emitted so far: awaited before any refusal is answered, so a
        # `kill -9` right after a refusal cannot lose its row (allowed rows stay batched).
        self._commit = commit

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @snapshot.setter
    def snapshot(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot  # one assignment: a request sees the old or the new, whole
        self._generation += 1

    @property
    def policy(self) -> EffectivePolicy:
        return self.snapshot.policy

    def identify(self, identity: Identity | None) -> Caller:
        """Who is asking, verified against the agents registry in force."""
        return self.snapshot.auth.identify(identity)

    def _emit(self, facts: RequestFacts, admission: Admission) -> Admission:
        self.telemetry.emit(
            DecisionEvent(
                facts,
                admission.decision,
                self.snapshot.policy.mode,
                admission.address,
                admission.pending_id,
            )
        )
        return admission

    def _first_pass(self, facts: RequestFacts) -> Decision:
        snap = self.snapshot
        grants = self.grants.rules_for(facts.agent, facts.session)
        return decide(facts, snap.policy, grants=grants, guard=snap.guard, address=None)

    async def _dial_check(self, facts: RequestFacts, approved: Decision | None) -> Admission:
        """Resolve an admitted name once and decide again on the address that will be dialled;
        after an approval, only a deny (guard, rule) can still refuse it."""
        assert facts.host is not None
        try:
            address = await self.resolver.resolve(facts.host, facts.port)
        except ResolutionError as exc:
            return Admission(_deny(Reason.DNS_FAILURE, str(exc)))
        snap = self.snapshot
        grants = self.grants.rules_for(facts.agent, facts.session)
        final = decide(facts, snap.policy, grants=grants, guard=snap.guard, address=address)
        if approved is not None and final.verdict is not Verdict.DENY:
            final = approved
        elif final.verdict is Verdict.HOLD:
            # The rules changed between the passes: a miss is never dialled unapproved.
            return Admission(final, address)
        inspect = None
        if final.allowed and facts.transport in (Transport.HTTPS_CONNECT, Transport.SOCKS5):
            inspect = snap.policy.inspect_rule(facts.host, facts.port)
        return Admission(final, address, inspect=inspect)

    # -- live requests -----------------------------------------------------------------------

    async def _refused(self, facts: RequestFacts, admission: Admission) -> Admission:
        """Emit a refusal and commit its audit row before the edge answers it."""
        self._emit(facts, admission)
        if self._commit is not None:
            await self._commit()
        return admission

    async def admit(
        self, facts: RequestFacts, client_gone: Callable[[], bool] | None = None
    ) -> Admission:
        """Decide `facts`, holding a miss under `ask`; emits one decision event per verdict."""
        admission = await self._admit(facts, client_gone)
        if admission.allowed:
            return self._emit(facts, admission)
        return await self._refused(facts, admission)

    async def _admit(
        self, facts: RequestFacts, client_gone: Callable[[], bool] | None
    ) -> Admission:
        first = self._first_pass(facts)
        if first.verdict is Verdict.DENY or facts.host is None:
            return Admission(first)
        if first.verdict is Verdict.HOLD:
            return await self._hold(facts, first, client_gone)
        admission = await self._dial_check(facts, None)
        if admission.decision.verdict is Verdict.HOLD:
            return await self._hold(facts, admission.decision, client_gone)
        return admission

    async def _hold(
        self, facts: RequestFacts, held: Decision, client_gone: Callable[[], bool] | None
    ) -> Admission:
        assert facts.host is not None
        approvals = self.approvals
        if approvals is None:
            return Admission(_deny(Reason.APPROVAL_UNAVAILABLE, "approvals unavailable"))
        settings = self.snapshot.policy.approval
        one_shot = await approvals.take_one_shot(
            facts.agent,
            facts.host.name,
            facts.port,
            settings,
            (facts.session, facts.client_address),
        )
        if one_shot is not None:
            admission = await self._dial_check(facts, _after_approval(one_shot))
            return replace(admission, pending_id=one_shot.pending_id)
        reviewed = None
        if not approvals.joins_pending(facts):
            # The review tier first (no DNS: reviewers see the name); humans get escalations.
            try:
                reviewed = await approvals.auto_review(facts, self.snapshot.policy)
            except StoreError as exc:
                return Admission(_deny(Reason.APPROVAL_UNAVAILABLE, str(exc)))
            if reviewed is not None and reviewed.verdict is not None:
                auto = reviewed.verdict
                decision = replace(
                    _after_approval(auto),
                    detail=f"{auto.outcome.value} by the {auto.reviewer} reviewer: {auto.note}",
                )
                if not decision.allowed:
                    return Admission(decision, None, auto.pending_id)
                admission = await self._dial_check(facts, decision)  # resolved only now
                return replace(admission, pending_id=auto.pending_id)
        limit = approvals.limit_reached(facts, settings)
        if limit is not None:
            return Admission(_deny(Reason.APPROVAL_LIMIT, limit, Tier.FLOOR))

        def on_held(item: PendingItem) -> None:
            self._emit(facts, Admission(held, None, item.id))

        try:
            review = reviewed.result if reviewed is not None else None
            result = await approvals.hold(facts, settings, client_gone, on_held, review)
        except StoreError as exc:
            # The shared queue is unreachable: keep enforcing, but hold nothing new.
            return Admission(_deny(Reason.APPROVAL_UNAVAILABLE, str(exc)))
        pending_id = result.item.id
        if result.verdict is None:
            if result.draining:
                detail = "the proxy is shutting down; the item stays pending"
            elif result.abandoned:
                detail = "client went away"
            else:
                detail = "no answer in time"
            return Admission(_deny(Reason.APPROVAL_PENDING, detail, Tier.POLICY), None, pending_id)
        if result.verdict.approver == POLICY_APPROVER:
            # Released by a policy or grant change: the new rules decide, with their provenance.
            again = self._first_pass(facts)
            if again.verdict is Verdict.ALLOW:
                admission = await self._dial_check(facts, None)
                if admission.decision.verdict is not Verdict.HOLD:
                    return replace(admission, pending_id=pending_id)
            elif again.verdict is Verdict.DENY:
                return Admission(again, None, pending_id)
            still = _deny(Reason.APPROVAL_PENDING, "still unknown", Tier.POLICY)
            return Admission(still, None, pending_id)
        decision = _after_approval(result.verdict)
        if not decision.allowed:
            return Admission(decision, None, pending_id)
        # Approved: only now is the name resolved, and the address still checked.
        return replace(await self._dial_check(facts, decision), pending_id=pending_id)

    async def admit_inspected(self, facts: RequestFacts) -> Admission:
        """A request inside an intercepted tunnel (facts carry its method and path; `invalid`
        when the edge saw a Host or target that does not name the tunnel's host)."""
        snap = self.snapshot
        if facts.invalid is not None:
            decision = _deny(facts.invalid, facts.invalid_detail or facts.invalid.value)
        elif facts.host is None:
            decision = _deny(Reason.INVALID_HOST, "invalid host")
        else:
            rule = snap.policy.inspect_rule(facts.host, facts.port)
            if rule is None:  # the policy stopped inspecting this host: the tunnel decides
                decision = Decision(Verdict.ALLOW, Reason.ALLOW_RULE, detail="tunnel admitted")
            else:
                decision = apply_mode(
                    decide_inspected(rule, facts.method, facts.path or "/"), snap.policy
                )
        if decision.allowed:
            return self._emit(facts, Admission(decision))
        return await self._refused(facts, Admission(decision))

    async def admit_secrets(
        self, facts: RequestFacts, finding: Finding, scan: ScanMode = ScanMode.ENFORCE
    ) -> Admission:
        """What the edge found in an admitted request's content (`proxy.secrets`): a placeholder
        on its way to another host is refused `secret_misuse` (never relaxed); a credential for
        another host `secret_detected` (audit mode and `scan: report` only report it). Emits one
        event, which names the secret's id or the detector, never a value."""
        if finding.reason is Reason.SECRET_MISUSE:
            decision = Decision(
                Verdict.DENY,
                Reason.SECRET_MISUSE,
                finding.subject,
                finding.source,
                f"placeholder of secret {finding.subject} in the {finding.where}",
                Tier.GUARD,
            )
        else:
            rule = None if facts.host is None else self.policy.inspect_rule(facts.host, facts.port)
            decision = Decision(
                Verdict.DENY,
                Reason.SECRET_DETECTED,
                finding.subject,
                rule.source if rule is not None else None,
                f"{finding.subject} in the {finding.where}",
                Tier.POLICY,
            )
            decision = apply_mode(decision, self.policy)
            if scan is ScanMode.REPORT and not decision.allowed:
                decision = replace(
                    decision, verdict=Verdict.ALLOW, detail=decision.detail + " (scan: report)"
                )
        if decision.allowed:
            return self._emit(facts, Admission(decision))
        return await self._refused(facts, Admission(decision))

    async def admit_tls_hello(
        self, facts: RequestFacts, sni: str | None, *, malformed: bool = False
    ) -> Admission:
        """The ClientHello of an admitted raw tunnel: its SNI must name the CONNECT target
        (no SNI is allowed; IP-literal targets are exempt; a malformed hello is refused).
        Emits only a refusal."""
        if malformed:
            decision = _deny(Reason.INVALID_REQUEST, "malformed TLS ClientHello in the tunnel")
            return await self._refused(facts, Admission(decision))
        if sni is None or facts.host is None or facts.host.ip is not None:
            return Admission(Decision(Verdict.ALLOW, Reason.ALLOW_RULE, detail="sni checked"))
        try:
            named = canonicalize_host(sni)
        except InvalidHost:
            named = None
        if named == facts.host:
            return Admission(Decision(Verdict.ALLOW, Reason.ALLOW_RULE, detail="sni checked"))
        decision = _deny(
            Reason.HOST_MISMATCH, f"TLS server name {sni!r} does not match the CONNECT target"
        )
        return await self._refused(facts, Admission(decision))

    # -- open tunnels -------------------------------------------------------------------------

    def recheck(self, facts: RequestFacts, admitted: Decision) -> Decision | None:
        """An open tunnel under the rules and identities in force now: None while it may stay
        open, else the refusal that closes it (emitted). Revoking an agent, a grant or a rule
        closes what it admitted; a tunnel a `once` approval admitted stays (nothing revoked it).
        """
        snap = self.snapshot
        registry = snap.auth.registry
        if facts.agent is not None and (registry is None or facts.agent not in registry):
            reason = f"agent {facts.agent!r} is no longer registered"
        else:
            now = self._first_pass(facts)
            by_grant = (admitted.source or "").startswith(("grant:", "g-"))
            by_rule = admitted.reason in (Reason.ALLOW_RULE, Reason.DEFAULT_ALLOW)
            if now.verdict is Verdict.DENY:
                reason = f"now refused: {now.detail or now.reason.value}"
            elif now.verdict is Verdict.HOLD and (by_grant or by_rule):
                reason = "the rule or grant that admitted it is gone"
            else:
                return None
        decision = _deny(Reason.REVOKED, reason, Tier.FLOOR)
        self._emit(facts, Admission(decision))
        return decision

    def expire_tunnel(self, facts: RequestFacts, lifetime: float) -> Decision:
        """An open tunnel older than `network.max_tunnel_lifetime` is closed (emitted)."""
        decision = _deny(Reason.REVOKED, f"open longer than {lifetime:g}s", Tier.FLOOR)
        self._emit(facts, Admission(decision))
        return decision

    @property
    def version(self) -> tuple[int, int]:
        """Changes when anything that decides changes (snapshot swapped, grants changed)."""
        return (self._generation, self.grants.version)

    # -- dry runs ----------------------------------------------------------------------------

    async def dry_run(
        self,
        facts: RequestFacts,
        *,
        resolve: bool = True,
        inner: tuple[str, str] | None = None,
    ) -> Decision:
        """What the live proxy would decide for `facts`, by the same steps, without holding or
        emitting. `inner` (method, path) is checked on hosts under `inspect:`."""
        first = self._first_pass(facts)
        if first.verdict is Verdict.HOLD and facts.host is not None:
            return await self._dry_review(facts, first, resolve)
        if first.verdict is not Verdict.ALLOW or facts.host is None:
            return first  # a deny, exactly as live
        if not resolve and facts.host.ip is None:
            return replace(first, detail=f"{first.detail} (network step skipped: --no-resolve)")
        admission = await self._dial_check(facts, None)
        if admission.inspect is not None and inner is not None and admission.allowed:
            inspected = replace(
                facts, transport=Transport.HTTPS_INSPECTED, method=inner[0], path=inner[1]
            )
            return apply_mode(
                decide_inspected(admission.inspect, inspected.method, inspected.path or "/"),
                self.snapshot.policy,
            )
        return admission.decision

    async def _dry_review(self, facts: RequestFacts, held: Decision, resolve: bool) -> Decision:
        """A miss in a dry run: held unresolved as live, unless the rules reviewers would decide
        it (then, for an approval, the address is still checked, as live after approval)."""
        approvals = self.approvals
        if approvals is not None and approvals.joins_pending(facts):
            return held  # live joins the pending item without a review
        reviewer = approvals.reviewer if approvals is not None else AutoReviewer()
        decided = await reviewer.dry_review(facts, self.snapshot.policy)
        if not isinstance(decided, AutoDecision):
            return held
        rationale = decided.result.summary()
        if not decided.approved:
            return _deny(Reason.APPROVAL_DENIED, f"denied by the rules reviewer: {rationale}")
        approved = Decision(
            Verdict.ALLOW, Reason.APPROVED, detail=f"approved by the rules reviewer: {rationale}"
        )
        if not resolve and facts.host is not None and facts.host.ip is None:
            return replace(approved, detail=f"{approved.detail} (network step skipped)")
        return (await self._dial_check(facts, approved)).decision

    # -- pending items -----------------------------------------------------------------------

    def judge_pending(self, item: PendingItem) -> Outcome | None:
        """How the rules in force now decide a pending item (None: still a miss)."""
        try:
            host = canonicalize_host(item.host)
        except InvalidHost:
            return Outcome.DENIED
        facts = RequestFacts(
            request_id="reevaluate",
            raw_host=item.host,
            host=host,
            port=item.port,
            transport=Transport.HTTPS_CONNECT if item.method == "CONNECT" else Transport.HTTP,
            method=item.method,
            scheme=item.scheme,
            agent=item.agent,
            session=item.session,
        )
        decision = self._first_pass(facts)
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
