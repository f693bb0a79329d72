"""The review tier inside approvals: runs the reviewers for a held request (one review per
destination at a time) and carries out what they decide like an approver would: a grant of at
most the allowed scope, an approval-history row and an `egress.approval` event."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

from proxy.approvals.granting import GrantKeeper
from proxy.approvals.model import AutoReviewed, Outcome, PendingKey, Verdict, pending_key
from proxy.facts import RequestFacts
from proxy.policy.model import Action, EffectivePolicy, Scope
from proxy.records import ApprovalRecord
from proxy.review.chain import ChainResult
from proxy.review.runner import AutoDecision, AutoReviewer
from proxy.store import Store
from proxy.telemetry import ApprovalEvent, Telemetry


class ReviewTier:
    """Reviewers before humans; see the module docstring."""

    def __init__(
        self,
        store: Store,
        grants: GrantKeeper,
        telemetry: Telemetry,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._grants = grants
        self._telemetry = telemetry
        self._clock = clock
        self.reviewer = AutoReviewer()
        self._reviewing: dict[PendingKey, asyncio.Future[AutoReviewed | None]] = {}

    async def review(self, facts: RequestFacts, policy: EffectivePolicy) -> AutoReviewed | None:
        """Run the review tier for a held request (None: no reviewer configured). An approval
        or denial is carried out here (stored, announced); an escalation is returned for the
        pending item. Concurrent requests for one destination share one review.

        Raises StoreError when an automatic outcome cannot be stored."""
        assert facts.host is not None
        key = pending_key(facts.agent, facts.host.name, facts.port)
        running = self._reviewing.get(key)
        if running is not None:
            try:
                return await asyncio.shield(running)
            except asyncio.CancelledError:
                if not running.cancelled():
                    raise  # this request itself was cancelled
                # the request that started the review went away: review again for this one
        future: asyncio.Future[AutoReviewed | None] = asyncio.get_running_loop().create_future()
        self._reviewing[key] = future
        try:
            answer = await self._review(facts, policy)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: sharers re-raise it, nobody logs it as lost
            raise
        else:
            future.set_result(answer)
            return answer
        finally:
            if self._reviewing.get(key) is future:
                del self._reviewing[key]

    async def _review(self, facts: RequestFacts, policy: EffectivePolicy) -> AutoReviewed | None:
        started = self._clock()
        decided = await self.reviewer.review(facts, policy)
        if decided is None:
            return None
        if isinstance(decided, ChainResult):
            return AutoReviewed(decided, None)
        verdict = await self._carry_out(facts, decided, policy, started)
        return AutoReviewed(decided.result, verdict)

    async def _carry_out(
        self, facts: RequestFacts, decided: AutoDecision, policy: EffectivePolicy, started: float
    ) -> Verdict:
        """An automatic approval (a grant of at most the allowed scope, stored so every worker
        and replica enforces it) or denial (`once`: nothing is stored that a human could not
        overrule)."""
        assert facts.host is not None
        final = decided.result.final
        outcome = Outcome.APPROVED if decided.approved else Outcome.DENIED
        approver = f"auto:{final.reviewer}"
        review_id = "r-" + secrets.token_hex(6)
        grant = None
        if decided.approved and decided.scope is not Scope.ONCE:
            grant = self._grants.build(
                host=facts.host.name,
                port=facts.port,
                agent=facts.agent,
                session=facts.session,
                action=Action.ALLOW,
                scope=decided.scope,
                grant_for=decided.grant_for,
                approver=approver,
                note=final.rationale,
                session_ttl=policy.approval.session_idle,
            )
            await self._grants.add(grant)
        verdict = Verdict(
            outcome,
            review_id,
            decided.scope,
            decided.grant_for,
            approver,
            final.reviewer,
            final.rationale,
            grant.id if grant is not None else None,
        )
        wait_ms = int((self._clock() - started) * 1000)
        await self._store.record_approval(
            ApprovalRecord(
                id=review_id,
                state=outcome.value,
                host=facts.host.name,
                port=facts.port,
                agent=facts.agent,
                scope=decided.scope,
                grant_for=decided.grant_for,
                approver=approver,
                reviewer=final.reviewer,
                note=final.rationale,
                wait_ms=wait_ms,
                at=self._clock(),
                grant_id=verdict.grant_id,
                review=decided.result.to_json(),
            )
        )
        self._telemetry.emit(
            ApprovalEvent(
                outcome.value,
                review_id,
                facts.host.name,
                facts.port,
                facts.agent,
                facts.session,
                scope=decided.scope.value,
                grant_for=decided.grant_for.value,
                reviewer=final.reviewer,
                approver=approver,
                wait_ms=wait_ms,
                note=final.rationale,
                request_id=facts.request_id,
                traceparent=facts.traceparent,
                rationale=final.rationale,
                signals=decided.result.signal_names,
            )
        )
        return verdict
