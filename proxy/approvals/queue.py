"""The approval queue: one pending item per (agent, host, port), resolved by reviewers, people
or a policy change, and released on every replica.

It owns the lifecycle of pending items (create or join, resolve, expire) and composes the parts
that do the rest: `Waiters` (requests held here), `PendingIndex` (the local copy of the shared
queue), `GrantKeeper` (grants and once passes), `ReviewTier` (reviewers before humans) and the
`FleetChannel` (typed messages between replicas). The store is the source of truth.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import structlog

from proxy.approvals.fleet import FleetChannel, FleetMessage, MessageKind
from proxy.approvals.granting import GrantKeeper, Origin
from proxy.approvals.model import (
    POLICY_APPROVER,
    ApprovalError,
    ApprovalErrorCode,
    AutoReviewed,
    HoldResult,
    Outcome,
    ResolveResult,
    Verdict,
    verdict_from_record,
)
from proxy.approvals.notify import ItemResolution, Notifier
from proxy.approvals.pending import PendingIndex
from proxy.approvals.present import describe
from proxy.approvals.reviewing import ReviewTier
from proxy.approvals.waiters import Waiters
from proxy.eventbus import EventBus
from proxy.facts import RequestFacts
from proxy.grants import GrantIndex
from proxy.policy.model import Action, ApprovalSettings, EffectivePolicy, Scope
from proxy.records import ApprovalRecord, Grant, GrantFor, PendingItem
from proxy.review.chain import ChainResult, RecentDecision, bounded_justification
from proxy.review.runner import AutoReviewer
from proxy.store import Store, StoreError
from proxy.store.base import Resolution, ResolutionWriter
from proxy.telemetry import ApprovalEvent, Telemetry

log = structlog.get_logger("egress-warden")


class ApprovalQueue:
    """Pending items (in the store) and the requests waiting on them here (in memory)."""

    def __init__(
        self,
        store: Store,
        grants: GrantIndex,
        telemetry: Telemetry,
        bus: EventBus,
        clock: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
    ) -> None:
        self._store = store
        self._notifier = notifier  # `approval.notify` webhooks (this replica's items only)
        self._grants = grants  # the enforced index (GrantKeeper writes it)
        self._telemetry = telemetry
        self._bus = bus
        self._clock = clock
        self._fleet = FleetChannel(store)
        self._pending = PendingIndex()
        self._waiters = Waiters()
        self._keeper = GrantKeeper(store, grants, self._fleet, clock)
        self._tier = ReviewTier(store, self._keeper, telemetry, clock)

    @property
    def reviewer(self) -> AutoReviewer:
        return self._tier.reviewer

    # -- start, sync, drain ----------------------------------------------------------------

    async def start(self) -> int:
        """Load pending items and grants that survived a restart; listen to other replicas."""
        await self.sync()
        self._fleet.subscribe(self._on_message)
        return len(self._pending)

    async def sync(self) -> None:
        """Re-read pending items and persisted grants from the store."""
        self._pending.replace(await self._store.list_pending(self._clock()))
        await self._keeper.resync()

    def drain(self) -> None:
        """Shutting down: answer every held request now (their items stay pending)."""
        self._waiters.drain()

    # -- queries ---------------------------------------------------------------------------

    def limit_reached(self, facts: RequestFacts, settings: ApprovalSettings) -> str | None:
        """Why a new pending item for `facts` may not be created (None: it may, or it joins)."""
        assert facts.host is not None
        return self._pending.limit_reached(facts.agent, facts.host.name, facts.port, settings)

    def joins_pending(self, facts: RequestFacts) -> bool:
        """Whether `facts` would join an item already pending (humans own it: no new review)."""
        assert facts.host is not None
        return self._pending.has_key(facts.agent, facts.host.name, facts.port)

    def snapshot(self) -> list[tuple[PendingItem, int]]:
        """Known live items, oldest first, with how many requests wait on each here."""
        now = self._clock()
        items = sorted(
            (i for i in self._pending.items() if i.expires_at > now), key=lambda i: i.first_seen
        )
        return [(i, self.waiting(i.id)) for i in items]

    async def listing(self) -> list[tuple[PendingItem, int]]:
        """The shared queue as the store has it now (falls back to the last known copy)."""
        try:
            items = await self._store.list_pending(self._clock())
        except StoreError as exc:
            log.warning("egress.store", error=str(exc))
            return self.snapshot()
        self._pending.replace(items)
        return [(i, self.waiting(i.id)) for i in items]

    def waiting(self, item_id: str) -> int:
        return self._waiters.count(item_id)

    def pending_count(self) -> int:
        """Known pending items (safe to call from another thread: one len())."""
        return len(self._pending)

    def describe(self, item: PendingItem) -> dict[str, Any]:
        """The API/SSE shape of a pending item."""
        return describe(item, self.waiting(item.id))

    # -- reviewers and holding -------------------------------------------------------------

    async def take_one_shot(
        self,
        agent: str | None,
        host: str,
        port: int,
        settings: ApprovalSettings,
        origin: Origin = (None, None),
    ) -> Verdict | None:
        """A `once` approval given while nobody waited lets exactly one later request through
        (with what follows it within `approval.once_window`: see `GrantKeeper.open_window`)."""
        return await self._keeper.take_once(agent, host, port, settings.once_window, origin)

    async def auto_review(
        self, facts: RequestFacts, policy: EffectivePolicy
    ) -> AutoReviewed | None:
        """The review tier for a held request (see `ReviewTier.review`)."""
        return await self._tier.review(facts, policy)

    async def hold(
        self,
        facts: RequestFacts,
        settings: ApprovalSettings,
        client_gone: Callable[[], bool] | None = None,
        on_held: Callable[[PendingItem], None] | None = None,
        review: ChainResult | None = None,
    ) -> HoldResult:
        """Create or join the pending item for this request and wait up to `settings.wait`
        (`review`: the escalated auto-review trail the item carries for humans).

        Raises StoreError when the shared queue cannot be reached (nothing new is held then).
        """
        assert facts.host is not None
        item = await self._join(facts, settings, review)
        if on_held is not None:
            on_held(item)
        waited = await self._waiters.wait(item.id, settings.wait, client_gone)
        verdict = waited.verdict
        if verdict is None:
            # Leaving counts in the store: if the item was resolved while this request still
            # counted as waiting, that resolution covered it (an exact `once` across replicas).
            verdict = await self._leave(item.id)
            if verdict is None:
                return HoldResult(item, None, waited.abandoned, waited.draining)
        if _is_once_approval(verdict):
            self._keeper.open_window(
                facts.agent,
                facts.host.name,
                facts.port,
                verdict,
                settings.once_window,
                (facts.session, facts.client_address),
            )
        return HoldResult(item, verdict)

    async def _leave(self, item_id: str) -> Verdict | None:
        """Stop waiting on `item_id` in the store; the verdict that covered this request when
        the item was resolved meanwhile, else None."""
        try:
            if await self._store.leave_pending(item_id):
                return None
            record = await self._store.latest_approval(item_id)
        except StoreError as exc:
            # Still counted as waiting: a `once` approval of this item leaves no pass then.
            log.warning("egress.store", error=str(exc))
            return None
        return verdict_from_record(record) if record is not None else None

    async def _join(
        self, facts: RequestFacts, settings: ApprovalSettings, review: ChainResult | None
    ) -> PendingItem:
        assert facts.host is not None
        now = self._clock()
        candidate = PendingItem(
            id=_new_id(),
            host=facts.host.name,
            port=facts.port,
            scheme=facts.scheme,
            method=facts.method,
            agent=facts.agent,
            session=facts.session,
            first_seen=now,
            last_seen=now,
            count=1,
            expires_at=now + settings.pending_ttl,
            review=review.to_json() if review is not None else None,
            justification=bounded_justification(facts.justification),
        )
        item, created = await self._store.join_pending(candidate)
        self._pending.put(item)
        if created:
            await self._store.record_approval(
                replace(self._record(item, "requested"), review=item.review)
            )
            self._fleet.publish(FleetMessage(MessageKind.PENDING_CREATED, item.id))
            self._telemetry.emit(
                ApprovalEvent(
                    "requested",
                    item.id,
                    item.host,
                    item.port,
                    item.agent,
                    item.session,
                    request_id=facts.request_id,
                    traceparent=facts.traceparent,
                    reviewer=review.final.reviewer if review is not None else None,
                    rationale=review.summary() if review is not None else None,
                    signals=review.signal_names if review is not None else (),
                )
            )
            if self._notifier is not None:
                self._notifier.held(item)  # only the replica that created it tells
        self._bus.publish("pending", self.describe(item))
        return item

    # -- deciding --------------------------------------------------------------------------

    async def resolve(
        self,
        item_id: str,
        outcome: Outcome,
        *,
        scope: Scope,
        grant_for: GrantFor | None,
        note: str,
        approver: str,
        allowed_scopes: frozenset[Scope],
        reviewer: str = "human",
        by_policy: bool = False,
        session_ttl: float = 8 * 3600.0,
    ) -> ResolveResult:
        """Approve or deny a pending item: release its waiters (on every replica), record it.

        `grant_for` None: the item's own agent, or all agents when no agent asked for it.
        """
        if scope not in allowed_scopes:
            allowed = ", ".join(sorted(s.value for s in allowed_scopes))
            raise ApprovalError(
                ApprovalErrorCode.SCOPE_NOT_ALLOWED,
                f"scope {scope.value!r} is not allowed here ({allowed})",
            )
        if grant_for is not GrantFor.ALL:
            # Checked before the item is claimed, so a refused request leaves it pending.
            grant_for = await self._grant_for_item(item_id, grant_for, by_policy)
        covers = grant_for
        decided: list[tuple[Verdict, Grant | None]] = []  # what `write` made of the claim

        def write(item: PendingItem, waiting: int) -> Resolution:
            # Runs in the claim's transaction: the history row (and any grant) commit with it,
            # so a request that stops waiting on another replica either left before the claim
            # (and counts for nothing) or finds this verdict.
            grant: Grant | None = None
            if scope is not Scope.ONCE:
                grant = self._keeper.build(
                    host=item.host,
                    port=item.port,
                    agent=item.agent,
                    session=item.session,
                    action=Action.ALLOW if outcome is Outcome.APPROVED else Action.DENY,
                    scope=scope,
                    grant_for=covers,
                    approver=approver,
                    note=note,
                    session_ttl=session_ttl,
                )
            elif outcome is Outcome.APPROVED and waiting == 0:
                # Nobody waits on any replica: the agent's next retry gets through, once.
                grant = self._keeper.once_pass(item, covers, approver, note)
            verdict = Verdict(
                outcome,
                item.id,
                scope,
                covers,
                approver,
                reviewer,
                note,
                grant.id if grant is not None and grant.scope is not Scope.ONCE else None,
            )
            decided.append((verdict, grant))
            return Resolution(self._resolution_record(item, verdict, self._wait_ms(item)), grant)

        try:
            claimed = await self._store.resolve_pending(item_id, self._clock(), write)
        except StoreError as exc:
            raise ApprovalError(ApprovalErrorCode.STORE_UNAVAILABLE, str(exc)) from exc
        self._pending.drop(item_id)
        if claimed is None:
            raise ApprovalError(
                ApprovalErrorCode.NOT_FOUND,
                f"no pending item with id {item_id!r} (resolved or expired)",
            )
        item = claimed[0]
        verdict, stored = decided[-1]
        if stored is not None:
            self._keeper.stored(stored)
        grant = stored if stored is not None and stored.scope is not Scope.ONCE else None
        wait_ms = self._wait_ms(item)
        released = self._waiters.release(item.id, verdict)
        self._fleet.publish(FleetMessage(MessageKind.ITEM_RESOLVED, item.id))
        self.reviewer.recent.add(
            item.agent, RecentDecision(item.host, item.port, outcome.value, reviewer, time.time())
        )
        if self._notifier is not None:
            self._notifier.resolved(item, ItemResolution.of(verdict, released))
        if grant_for is GrantFor.ALL:
            # The same destination pending for other agents is covered by this verdict too.
            released += await self._resolve_siblings(item, verdict)

        self._telemetry.emit(
            ApprovalEvent(
                outcome.value,
                item.id,
                item.host,
                item.port,
                item.agent,
                item.session,
                scope=scope.value,
                grant_for=grant_for.value,
                reviewer=reviewer,
                approver=approver,
                wait_ms=wait_ms,
                note=note,
            )
        )
        self._bus.publish(
            "resolved",
            {
                **self.describe(item),
                "resolution": outcome.value,
                "scope": scope.value,
                "for": grant_for.value,
                "released": released,
                "approver": approver,
                "reviewer": reviewer,
            },
        )
        return ResolveResult(item, verdict, released, grant)

    async def _grant_for_item(
        self, item_id: str, grant_for: GrantFor | None, by_policy: bool
    ) -> GrantFor:
        """Whom a resolution of `item_id` covers. A grant "for the agent" of an item no
        authenticated agent asked for would be a grant without an agent, which covers every
        caller: an approver asking for that is refused rather than given more than they asked.
        A policy re-evaluation decides each item on its own and is not asked whom to cover."""
        if grant_for is GrantFor.AGENT and by_policy:
            return grant_for
        item = self._pending.get(item_id)
        if item is None:
            try:
                item = await self._store.get_pending(item_id)
            except StoreError as exc:
                raise ApprovalError(ApprovalErrorCode.STORE_UNAVAILABLE, str(exc)) from exc
        if item is None:
            return grant_for or GrantFor.AGENT  # claiming it answers not_found
        if item.agent is not None:
            return GrantFor.AGENT
        if grant_for is None:
            return GrantFor.ALL
        raise ApprovalError(
            ApprovalErrorCode.FOR_AGENT_WITHOUT_AGENT,
            f"pending item {item_id!r} has no authenticated agent, so there is no agent to "
            'approve or deny it for; use "for": "all" (`--for all`), which covers every agent',
        )

    async def _resolve_siblings(self, item: PendingItem, verdict: Verdict) -> int:
        released = 0
        for other in await self._store.list_pending(self._clock()):
            if other.host != item.host or other.port != item.port:
                continue
            sibling = replace(verdict, pending_id=other.id)
            writer = self._history_only(sibling)
            claimed = await self._store.resolve_pending(other.id, self._clock(), writer)
            if claimed is None:
                continue
            self._pending.drop(other.id)
            here = self._waiters.release(other.id, sibling)
            released += here
            if self._notifier is not None:
                self._notifier.resolved(claimed[0], ItemResolution.of(sibling, here))
            self._fleet.publish(FleetMessage(MessageKind.ITEM_RESOLVED, other.id))
        return released

    async def add_grant(self, grant: Grant) -> None:
        """Store a grant of any scope (the store is what every worker and replica enforces),
        then tell the replicas at once (they also poll the store's grants signature)."""
        await self._keeper.add(grant)

    async def revoke_grant(self, grant_id: str) -> bool:
        """Remove a grant everywhere; False when no replica knew it."""
        return await self._keeper.revoke(grant_id)

    async def reevaluate(self, judge: Callable[[PendingItem], Outcome | None]) -> int:
        """Resolve items that a policy or grant change now decides; returns how many."""
        resolved = 0
        for item, _ in await self.listing():
            outcome = judge(item)
            if outcome is None:
                continue
            try:
                await self.resolve(
                    item.id,
                    outcome,
                    scope=Scope.ONCE,
                    grant_for=GrantFor.AGENT,
                    note="decided by a policy or grant change",
                    approver=POLICY_APPROVER,
                    allowed_scopes=frozenset(Scope),
                    reviewer="auto",
                    by_policy=True,
                )
            except ApprovalError:
                continue  # resolved meanwhile by someone else
            resolved += 1
        return resolved

    # -- other replicas ----------------------------------------------------------------------

    def _on_message(self, message: FleetMessage) -> None:
        match message.kind:
            case MessageKind.ITEM_RESOLVED if message.id is not None:
                self._fleet.spawn(self._resolved(message.id))
            case MessageKind.RESYNC_RESOLVED:
                self._fleet.spawn(self.reconcile())
            case MessageKind.GRANT_REVOKED if message.id is not None:
                self._keeper.forget(message.id)
            case MessageKind.GRANTS_CHANGED:
                self._fleet.spawn(self._keeper.resync())
            case MessageKind.RESYNC_PENDING:
                self._fleet.spawn(self.listing())
            case _:
                pass  # a new item elsewhere: nothing waits on it here

    async def _resolved(self, item_id: str) -> None:
        """Another replica resolved `item_id`: release what waits on it here."""
        self._pending.drop(item_id)
        if item_id not in self._waiters:
            return
        record = await self._store.latest_approval(item_id)
        verdict = verdict_from_record(record) if record is not None else None
        if verdict is not None:
            # They were waiting when it was resolved, so they counted: a `once` approval
            # left no pass (see `resolve`).
            self._waiters.release(item_id, verdict)

    async def poll_grants(self) -> bool:
        """Re-read the grants when the store's signature moved; see `GrantKeeper.poll`."""
        return await self._keeper.poll()

    async def reconcile(self, full: bool = True) -> None:
        """Catch up with the store: resolutions whose notification was lost, grant changes.

        The pending listing is read only when requests wait here or on a `full` pass, so a
        quiet tick costs one grants query, not one pass over the queue."""
        if self._waiters or full:
            live = {item.id for item, _ in await self.listing()}
            for item_id in [i for i in self._waiters.item_ids() if i not in live]:
                await self._resolved(item_id)
        await self._keeper.resync()

    # -- expiry ----------------------------------------------------------------------------

    async def expire(self) -> list[PendingItem]:
        """Drop items past their pending_ttl (emits `expired` for those this replica purged)."""
        now = self._clock()
        expired = await self._store.purge_expired_pending(now)
        for item in expired:
            self._pending.drop(item.id)
            await self._store.record_approval(self._record(item, "expired"))
            self._telemetry.emit(
                ApprovalEvent(
                    "expired",
                    item.id,
                    item.host,
                    item.port,
                    item.agent,
                    item.session,
                    wait_ms=int((now - item.first_seen) * 1000),
                )
            )
            if self._notifier is not None:
                self._notifier.resolved(item, ItemResolution.expired())
            self._bus.publish("resolved", {**self.describe(item), "resolution": "expired"})
        return expired

    def _history_only(self, verdict: Verdict) -> ResolutionWriter:
        """A resolution that writes only its history row (no grant, no pass)."""
        return lambda claimed, _waiting: Resolution(self._resolution_record(claimed, verdict, None))

    def _wait_ms(self, item: PendingItem) -> int:
        return int((self._clock() - item.first_seen) * 1000)

    def _record(self, item: PendingItem, state: str) -> ApprovalRecord:
        return ApprovalRecord(
            id=item.id,
            state=state,
            host=item.host,
            port=item.port,
            agent=item.agent,
            scope=None,
            grant_for=None,
            approver=None,
            reviewer=None,
            note="",
            wait_ms=None,
            at=self._clock(),
        )

    def _resolution_record(
        self, item: PendingItem, verdict: Verdict, wait_ms: int | None
    ) -> ApprovalRecord:
        return replace(
            self._record(item, verdict.outcome.value),
            scope=verdict.scope,
            grant_for=verdict.grant_for,
            approver=verdict.approver,
            reviewer=verdict.reviewer,
            note=verdict.note,
            wait_ms=wait_ms,
            grant_id=verdict.grant_id,
        )


def _is_once_approval(verdict: Verdict) -> bool:
    """A person's or reviewer's `once` approval (a policy change re-decides instead)."""
    return (
        verdict.outcome is Outcome.APPROVED
        and verdict.scope is Scope.ONCE
        and verdict.approver != POLICY_APPROVER
    )


def _new_id() -> str:
    return secrets.token_hex(6)
