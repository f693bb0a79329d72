"""Holding requests for approval: one pending item per (agent, host, port), one shared future.

The store is the source of truth for pending items and persisted grants, so several replicas
sharing one store share one queue: an approval on any replica is announced over the store's
notifications (and found by a periodic reconcile if a notification is lost) and releases the
requests held on every replica.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import structlog

from proxy.audit import record_json
from proxy.eventbus import EventBus
from proxy.facts import RequestFacts
from proxy.grants import GrantIndex
from proxy.policy.model import Action, ApprovalSettings, EffectivePolicy, Scope
from proxy.records import ApprovalRecord, DecisionRecord, Grant, GrantFor, PendingItem
from proxy.review.chain import ChainResult, RecentDecision, bounded_justification
from proxy.review.runner import AutoDecision, AutoReviewer
from proxy.store import (
    CHANNEL_GRANTS,
    CHANNEL_PENDING,
    CHANNEL_RESOLVED,
    RESYNC_PAYLOAD,
    Store,
    StoreError,
)
from proxy.telemetry import ApprovalEvent, Telemetry

log = structlog.get_logger("egress-warden")

PendingKey = tuple[str | None, str, int]  # (agent, host, port)
POLL_INTERVAL = 0.5  # how often a waiter checks that its client is still there
POLICY_APPROVER = "policy"  # the approver recorded when a policy change resolves an item
REVOKE_PREFIX = "revoke:"


class ApprovalError(Exception):
    """An approval request that cannot be carried out; `code` is the API error code."""

    def __init__(self, code: str, detail: str, status: int) -> None:
        super().__init__(detail)
        self.code, self.detail, self.status = code, detail, status


class Outcome(StrEnum):
    APPROVED = "approved"
    DENIED = "denied"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What an approver decided for a pending item."""

    outcome: Outcome
    pending_id: str
    scope: Scope
    grant_for: GrantFor
    approver: str
    reviewer: str
    note: str
    grant_id: str | None = None


@dataclass(frozen=True, slots=True)
class HoldResult:
    item: PendingItem
    verdict: Verdict | None  # None: no answer in time (or the client left)
    abandoned: bool = False
    draining: bool = False  # the proxy is shutting down: answered now, the item stays


@dataclass(frozen=True, slots=True)
class ResolveResult:
    item: PendingItem
    verdict: Verdict
    released: int
    grant: Grant | None


@dataclass(frozen=True, slots=True)
class AutoReviewed:
    """What the review tier made of a held request: a verdict when it decided (approve or
    deny), else the escalated chain result that goes on the pending item for humans."""

    result: ChainResult
    verdict: Verdict | None


@dataclass
class _Waiting:
    future: asyncio.Future[Verdict]
    count: int = 0


def pending_key(agent: str | None, host: str, port: int) -> PendingKey:
    return (agent, host, port)


def grant_pattern(host: str, port: int) -> str:
    """The exact-host pattern a grant for host:port uses."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def verdict_from_record(record: ApprovalRecord) -> Verdict | None:
    """Rebuild a verdict from the approval history (for requests held on another replica)."""
    if record.state not in (Outcome.APPROVED.value, Outcome.DENIED.value):
        return None
    return Verdict(
        Outcome(record.state),
        record.id,
        record.scope or Scope.ONCE,
        record.grant_for or GrantFor.AGENT,
        record.approver or "unknown",
        record.reviewer or "human",
        record.note,
        record.grant_id,
    )


class ApprovalQueue:
    """Pending items (in the store) and the requests waiting on them here (in memory)."""

    def __init__(
        self,
        store: Store,
        grants: GrantIndex,
        telemetry: Telemetry,
        bus: EventBus,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._grants = grants
        self._telemetry = telemetry
        self._bus = bus
        self._clock = clock
        self._items: dict[str, PendingItem] = {}  # last known copy of the store's items
        self._waiting: dict[str, _Waiting] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watched: set[tuple[Callable[[], bool], asyncio.Future[None]]] = set()
        self._sweeper: asyncio.Future[None] | None = None
        # Bounded state: pending items by (agent, host, port) and counts per agent, kept in step
        # with `_items`, so the limit check is O(1) whatever the queue holds.
        self._keys: dict[PendingKey, str] = {}
        self._per_agent: dict[str | None, int] = {}
        self._draining: asyncio.Future[None] | None = None
        self._grants_seen: tuple[int, float, str] | None = None
        self.reviewer = AutoReviewer()
        # One review per (agent, host, port) at a time: concurrent requests share its answer.
        self._reviewing: dict[PendingKey, asyncio.Future[AutoReviewed | None]] = {}

    def _put(self, item: PendingItem) -> None:
        if item.id not in self._items:
            self._per_agent[item.agent] = self._per_agent.get(item.agent, 0) + 1
        self._items[item.id] = item
        self._keys[pending_key(item.agent, item.host, item.port)] = item.id

    def _drop(self, item_id: str) -> None:
        item = self._items.pop(item_id, None)
        if item is None:
            return
        key = pending_key(item.agent, item.host, item.port)
        if self._keys.get(key) == item_id:
            del self._keys[key]
        left = self._per_agent.get(item.agent, 1) - 1
        if left > 0:
            self._per_agent[item.agent] = left
        else:
            self._per_agent.pop(item.agent, None)

    def _replace_items(self, items: list[PendingItem]) -> None:
        self._items, self._keys, self._per_agent = {}, {}, {}
        for item in items:
            self._put(item)

    def limit_reached(self, facts: RequestFacts, settings: ApprovalSettings) -> str | None:
        """Why a new pending item for `facts` may not be created (None: it may, or it joins)."""
        assert facts.host is not None
        if pending_key(facts.agent, facts.host.name, facts.port) in self._keys:
            return None  # joins the existing item
        who = f"agent {facts.agent!r}" if facts.agent is not None else "anonymous agents"
        if self._per_agent.get(facts.agent, 0) >= settings.max_pending:
            return f"{who} already has {settings.max_pending} pending items (approval.max_pending)"
        if len(self._items) >= settings.max_pending_total:
            return (
                f"{settings.max_pending_total} items are pending in all "
                "(approval.max_pending_total)"
            )
        return None

    def drain(self) -> None:
        """Shutting down: answer every held request now (their items stay pending)."""
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_future()
        if not self._draining.done():
            self._draining.set_result(None)

    async def start(self) -> int:
        """Load pending items and grants that survived a restart; listen to other replicas."""
        await self.sync()
        self._store.subscribe(self._on_notify)
        return len(self._items)

    async def sync(self) -> None:
        """Re-read pending items and persisted grants from the store."""
        items = await self._store.list_pending(self._clock())
        self._replace_items(items)
        await self._resync_grants()

    # -- queries ---------------------------------------------------------------------------

    def snapshot(self) -> list[tuple[PendingItem, int]]:
        """Known live items, oldest first, with how many requests wait on each here."""
        now = self._clock()
        items = sorted(
            (i for i in self._items.values() if i.expires_at > now), key=lambda i: i.first_seen
        )
        return [(i, self.waiting(i.id)) for i in items]

    async def listing(self) -> list[tuple[PendingItem, int]]:
        """The shared queue as the store has it now (falls back to the last known copy)."""
        try:
            items = await self._store.list_pending(self._clock())
        except StoreError as exc:
            log.warning("egress.store", error=str(exc))
            return self.snapshot()
        self._replace_items(items)
        return [(i, self.waiting(i.id)) for i in items]

    def waiting(self, item_id: str) -> int:
        waiting = self._waiting.get(item_id)
        return waiting.count if waiting is not None else 0

    def pending_count(self) -> int:
        """Known pending items (safe to call from another thread: one len())."""
        return len(self._items)

    async def take_one_shot(self, agent: str | None, host: str, port: int) -> Verdict | None:
        """A `once` approval given while nobody waited lets exactly one later request through."""
        for grant in self._grants.once_for(agent, grant_pattern(host, port)):
            try:
                won = await self._store.consume_grant(grant.id)
            except StoreError:
                return None
            self._grants.remove(grant.id)
            if won:
                self._notify(CHANNEL_GRANTS, REVOKE_PREFIX + grant.id)
                return Verdict(
                    Outcome.APPROVED,
                    grant.id.removeprefix("once-"),
                    Scope.ONCE,
                    GrantFor.AGENT if grant.agent is not None else GrantFor.ALL,
                    grant.created_by,
                    "human",
                    grant.note,
                    grant.id,
                )
        return None

    # -- automatic review ------------------------------------------------------------------

    def joins_pending(self, facts: RequestFacts) -> bool:
        """Whether `facts` would join an item already pending (humans own it: no new review)."""
        assert facts.host is not None
        return pending_key(facts.agent, facts.host.name, facts.port) in self._keys

    async def auto_review(
        self, facts: RequestFacts, policy: EffectivePolicy
    ) -> AutoReviewed | None:
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
            answer = await self._auto_review(facts, policy)
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

    async def _auto_review(
        self, facts: RequestFacts, policy: EffectivePolicy
    ) -> AutoReviewed | None:
        started = self._clock()
        decided = await self.reviewer.review(facts, policy)
        if decided is None:
            return None
        if isinstance(decided, ChainResult):
            return AutoReviewed(decided, None)
        verdict = await self._auto_resolve(facts, decided, policy, started)
        return AutoReviewed(decided.result, verdict)

    async def _auto_resolve(
        self, facts: RequestFacts, decided: AutoDecision, policy: EffectivePolicy, started: float
    ) -> Verdict:
        """Carry out an automatic approval (a grant of at most the allowed scope, stored so
        every worker and replica enforces it) or denial (`once`: nothing is stored that a
        human could not overrule)."""
        assert facts.host is not None
        final = decided.result.final
        outcome = Outcome.APPROVED if decided.approved else Outcome.DENIED
        approver = f"auto:{final.reviewer}"
        review_id = "r-" + secrets.token_hex(6)
        grant: Grant | None = None
        if decided.approved and decided.scope is not Scope.ONCE:
            for_agent = decided.grant_for is GrantFor.AGENT
            grant = Grant(
                id="g-" + secrets.token_hex(6),
                pattern=grant_pattern(facts.host.name, facts.port),
                action=Action.ALLOW,
                scope=decided.scope,
                agent=facts.agent if for_agent else None,
                session=facts.session if for_agent and decided.scope is Scope.SESSION else None,
                created_by=approver,
                note=final.rationale,
                created_at=self._clock(),
                expires_at=(
                    self._clock() + policy.approval.session_idle
                    if decided.scope is Scope.SESSION
                    else None
                ),
            )
            await self.add_grant(grant)
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

    # -- holding ---------------------------------------------------------------------------

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
        waiting = self._waiting.get(item.id)
        if waiting is None:
            waiting = _Waiting(asyncio.get_running_loop().create_future())
            self._waiting[item.id] = waiting
        waiting.count += 1
        # One sweeper checks every waiter's client; a waiter itself wakes only once.
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        watch = (client_gone, gone) if client_gone is not None else None
        if watch is not None:
            self._watched.add(watch)
            self._ensure_sweeper()
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_future()
        try:
            futures: set[asyncio.Future[Any]] = {waiting.future, gone, self._draining}
            done, _ = await asyncio.wait(
                futures, timeout=settings.wait, return_when=asyncio.FIRST_COMPLETED
            )
            if waiting.future in done:
                return HoldResult(item, waiting.future.result())
            return HoldResult(item, None, abandoned=gone in done, draining=self._draining in done)
        finally:
            if watch is not None:
                self._watched.discard(watch)
            if not gone.done():
                gone.cancel()
            waiting.count -= 1
            if waiting.count <= 0 and self._waiting.get(item.id) is waiting:
                del self._waiting[item.id]

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep())

    async def _sweep(self) -> None:
        """Drop waiters whose client went away (checked every POLL_INTERVAL, for all at once)."""
        while self._watched:
            await asyncio.sleep(POLL_INTERVAL)
            for client_gone, gone in list(self._watched):
                if not gone.done() and client_gone():
                    gone.set_result(None)

    async def _join(
        self, facts: RequestFacts, settings: ApprovalSettings, review: ChainResult | None
    ) -> PendingItem:
        assert facts.host is not None
        now = self._clock()
        candidate = PendingItem(
            id=secrets.token_hex(6),
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
        self._put(item)
        if created:
            await self._store.record_approval(
                replace(self._record(item, "requested"), review=item.review)
            )
            self._notify(CHANNEL_PENDING, item.id)
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
                "scope_not_allowed", f"scope {scope.value!r} is not allowed here ({allowed})", 422
            )
        if grant_for is not GrantFor.ALL:
            # Checked before the item is claimed, so a refused request leaves it pending.
            grant_for = await self._grant_for_item(item_id, grant_for, by_policy)
        try:
            item = await self._store.claim_pending(item_id)
        except StoreError as exc:
            raise ApprovalError("store_unavailable", str(exc), 503) from exc
        self._drop(item_id)
        if item is None:
            raise ApprovalError(
                "not_found", f"no pending item with id {item_id!r} (resolved or expired)", 404
            )
        if item.expires_at <= self._clock():
            raise ApprovalError("not_found", f"pending item {item_id!r} has expired", 404)

        grant = await self._make_grant(item, outcome, scope, grant_for, approver, note, session_ttl)
        verdict = Verdict(
            outcome,
            item.id,
            scope,
            grant_for,
            approver,
            reviewer,
            note,
            grant.id if grant is not None else None,
        )
        wait_ms = int((self._clock() - item.first_seen) * 1000)
        record = replace(
            self._record(item, outcome.value),
            scope=scope,
            grant_for=grant_for,
            approver=approver,
            reviewer=reviewer,
            note=note,
            wait_ms=wait_ms,
            grant_id=verdict.grant_id,
        )
        await self._store.record_approval(record)
        if scope is Scope.ONCE and outcome is Outcome.APPROVED and self.waiting(item.id) == 0:
            # Nobody waits here: the agent's next retry gets through, once. Stored before any
            # other replica hears of the approval, so a request released there uses it up.
            await self._one_shot(item, grant_for, approver, note)
        released = self._release(item.id, verdict)
        self._notify(CHANNEL_RESOLVED, item.id)
        self.reviewer.recent.add(
            item.agent, RecentDecision(item.host, item.port, outcome.value, reviewer, time.time())
        )
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
        item = self._items.get(item_id)
        if item is None:
            try:
                item = await self._store.get_pending(item_id)
            except StoreError as exc:
                raise ApprovalError("store_unavailable", str(exc), 503) from exc
        if item is None:
            return grant_for or GrantFor.AGENT  # claiming it answers not_found
        if item.agent is not None:
            return GrantFor.AGENT
        if grant_for is None:
            return GrantFor.ALL
        raise ApprovalError(
            "for_agent_without_agent",
            f"pending item {item_id!r} has no authenticated agent, so there is no agent to "
            'approve or deny it for; use "for": "all" (`--for all`), which covers every agent',
            422,
        )

    async def _resolve_siblings(self, item: PendingItem, verdict: Verdict) -> int:
        released = 0
        for other in await self._store.list_pending(self._clock()):
            if other.host != item.host or other.port != item.port:
                continue
            claimed = await self._store.claim_pending(other.id)
            if claimed is None:
                continue
            self._drop(other.id)
            sibling = replace(verdict, pending_id=other.id)
            await self._store.record_approval(
                replace(
                    self._record(claimed, verdict.outcome.value),
                    scope=verdict.scope,
                    grant_for=verdict.grant_for,
                    approver=verdict.approver,
                    reviewer=verdict.reviewer,
                    note=verdict.note,
                    grant_id=verdict.grant_id,
                )
            )
            released += self._release(other.id, sibling)
            self._notify(CHANNEL_RESOLVED, other.id)
        return released

    def _release(self, item_id: str, verdict: Verdict) -> int:
        waiting = self._waiting.get(item_id)
        if waiting is None or waiting.future.done():
            return 0
        waiting.future.set_result(verdict)
        return waiting.count

    async def _one_shot(
        self, item: PendingItem, grant_for: GrantFor, approver: str, note: str
    ) -> None:
        grant = Grant(
            id=f"once-{item.id}",
            pattern=grant_pattern(item.host, item.port),
            action=Action.ALLOW,
            scope=Scope.ONCE,
            agent=item.agent if grant_for is GrantFor.AGENT else None,
            created_by=approver,
            note=note,
            created_at=self._clock(),
            expires_at=item.expires_at,
        )
        await self._store.add_grant(grant)
        self._grants.add(grant)
        self._notify(CHANNEL_GRANTS, RESYNC_PAYLOAD)

    async def _make_grant(
        self,
        item: PendingItem,
        outcome: Outcome,
        scope: Scope,
        grant_for: GrantFor,
        approver: str,
        note: str,
        session_ttl: float,
    ) -> Grant | None:
        if scope is Scope.ONCE:
            return None
        for_agent = grant_for is GrantFor.AGENT
        grant = Grant(
            id="g-" + secrets.token_hex(6),
            pattern=grant_pattern(item.host, item.port),
            action=Action.ALLOW if outcome is Outcome.APPROVED else Action.DENY,
            scope=scope,
            agent=item.agent if for_agent else None,
            session=item.session if for_agent and scope is Scope.SESSION else None,
            created_by=approver,
            note=note,
            created_at=self._clock(),
            expires_at=self._clock() + session_ttl if scope is Scope.SESSION else None,
        )
        await self.add_grant(grant)
        return grant

    async def add_grant(self, grant: Grant) -> None:
        """Store a grant of any scope (the store is what every worker and replica enforces),
        then tell the replicas at once (they also poll the store's grants signature)."""
        await self._store.add_grant(grant)
        self._grants.add(grant)
        self._notify(CHANNEL_GRANTS, RESYNC_PAYLOAD)

    async def revoke_grant(self, grant_id: str) -> bool:
        """Remove a grant everywhere; False when no replica knew it."""
        local = self._grants.remove(grant_id)
        stored = await self._store.delete_grant(grant_id)
        self._notify(CHANNEL_GRANTS, REVOKE_PREFIX + grant_id)
        return local is not None or stored

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

    def _notify(self, channel: str, payload: str) -> None:
        task = asyncio.ensure_future(self._store.notify(channel, payload))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("egress.fleet", error=str(exc))

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == CHANNEL_RESOLVED:
            self._spawn(self.reconcile() if payload == RESYNC_PAYLOAD else self._resolved(payload))
        elif channel == CHANNEL_GRANTS:
            if payload.startswith(REVOKE_PREFIX):
                self._grants.remove(payload.removeprefix(REVOKE_PREFIX))
            else:
                self._spawn(self._resync_grants())
        elif channel == CHANNEL_PENDING and payload == RESYNC_PAYLOAD:
            self._spawn(self.listing())

    async def _resolved(self, item_id: str) -> None:
        """Another replica resolved `item_id`: release what waits on it here."""
        self._drop(item_id)
        if item_id not in self._waiting:
            return
        record = await self._store.latest_approval(item_id)
        verdict = verdict_from_record(record) if record is not None else None
        if verdict is None or self._release(item_id, verdict) == 0:
            return
        if verdict.scope is Scope.ONCE and verdict.outcome is Outcome.APPROVED:
            # The approving replica left a one-shot pass (nobody waited there): the requests
            # released here are that "once", so the pass is used up.
            await self._store.consume_grant(f"once-{item_id}")
            self._grants.remove(f"once-{item_id}")

    async def _resync_grants(self) -> None:
        self._grants_seen = await self._store.grants_signature()
        self._grants.replace_persisted(await self._store.list_grants())

    async def poll_grants(self) -> bool:
        """Re-read the grants when the store's signature moved (another worker or replica
        added, revoked or used one up); one small query when nothing changed."""
        if await self._store.grants_signature() == self._grants_seen:
            return False
        await self._resync_grants()
        return True

    async def reconcile(self, full: bool = True) -> None:
        """Catch up with the store: resolutions whose notification was lost, grant changes.

        The pending listing is read only when requests wait here or on a `full` pass, so a
        quiet tick costs one grants query, not one pass over the queue."""
        if self._waiting or full:
            live = {item.id for item, _ in await self.listing()}
            for item_id in [i for i in self._waiting if i not in live]:
                await self._resolved(item_id)
        await self._resync_grants()

    # -- expiry ----------------------------------------------------------------------------

    async def expire(self) -> list[PendingItem]:
        """Drop items past their pending_ttl (emits `expired` for those this replica purged)."""
        now = self._clock()
        expired = await self._store.purge_expired_pending(now)
        for item in expired:
            self._drop(item.id)
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
            self._bus.publish("resolved", {**self.describe(item), "resolution": "expired"})
        return expired

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

    def describe(self, item: PendingItem) -> dict[str, Any]:
        """The API/SSE shape of a pending item."""
        return {
            "id": item.id,
            "host": item.host,
            "port": item.port,
            "scheme": item.scheme,
            "method": item.method,
            "agent": item.agent,
            "session": item.session,
            "first_seen": item.first_seen,
            "last_seen": item.last_seen,
            "count": item.count,
            "expires_at": item.expires_at,
            "review": review_json(item.review),
            "justification": item.justification,
            "waiting": self.waiting(item.id),
        }


def review_json(stored: str | None) -> Any:
    """A stored review (JSON text) as the API shows it: the object, or the text if it is not
    JSON (rows written before the review tier)."""
    if stored is None:
        return None
    try:
        return json.loads(stored)
    except ValueError:
        return stored


def review_trail(record: ApprovalRecord | None) -> dict[str, Any] | None:
    """The review trail of a decision row (`GET /v1/decisions`): the latest approval-history
    row of its pending item or automatic review (who decided, why, the signals)."""
    if record is None:
        return None
    stored = review_json(record.review)
    trail: dict[str, Any] = {
        "state": record.state,
        "reviewer": record.reviewer,
        "approver": record.approver,
        "rationale": record.note or None,
        "scope": record.scope.value if record.scope is not None else None,
    }
    if isinstance(stored, dict):
        trail["signals"] = stored.get("signals", [])
        trail["trail"] = stored.get("trail", [])
    return trail


async def with_review_trails(store: Store, rows: list[DecisionRecord]) -> list[dict[str, Any]]:
    """Decision rows as the API shows them, each with its `review` trail (None when the row
    was not held or reviewed; also None for all when the history cannot be read now)."""
    ids = {r.pending_id for r in rows if r.pending_id is not None}
    try:
        trails = {i: review_trail(await store.latest_approval(i)) for i in ids}
    except StoreError as exc:
        log.warning("egress.store", error=str(exc))
        trails = {}
    return [
        {**record_json(r), "review": trails.get(r.pending_id) if r.pending_id else None}
        for r in rows
    ]
