"""Holding requests for approval: one pending item per (agent, host, port), one shared future."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from proxy.eventbus import EventBus
from proxy.facts import RequestFacts
from proxy.grants import GrantIndex
from proxy.policy.model import Action, ApprovalSettings, Scope
from proxy.records import ApprovalRecord, Grant, GrantFor, PendingItem
from proxy.store import Store
from proxy.telemetry import ApprovalEvent, Telemetry

PendingKey = tuple[str | None, str, int]  # (agent, host, port)
POLL_INTERVAL = 0.5  # how often a waiter checks that its client is still there
POLICY_APPROVER = "policy"  # the approver recorded when a policy change resolves an item


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


@dataclass(frozen=True, slots=True)
class ResolveResult:
    item: PendingItem
    verdict: Verdict
    released: int
    grant: Grant | None


@dataclass
class _Waiting:
    future: asyncio.Future[Verdict]
    count: int = 0


def pending_key(agent: str | None, host: str, port: int) -> PendingKey:
    return (agent, host, port)


def grant_pattern(host: str, port: int) -> str:
    """The exact-host pattern a grant for host:port uses."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ApprovalQueue:
    """Pending items (persisted in the store) and the requests waiting on them (in memory)."""

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
        self._items: dict[str, PendingItem] = {}
        self._by_key: dict[PendingKey, str] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._one_shots: dict[PendingKey, tuple[Verdict, float]] = {}
        self._lock = asyncio.Lock()

    async def restore(self) -> int:
        """Load pending items that survived a restart."""
        for item in await self._store.list_pending(self._clock()):
            self._items[item.id] = item
            self._by_key[pending_key(item.agent, item.host, item.port)] = item.id
        return len(self._items)

    # -- queries ---------------------------------------------------------------------------

    def snapshot(self) -> list[tuple[PendingItem, int]]:
        """Live items, oldest first, with how many requests wait on each right now."""
        now = self._clock()
        items = sorted(
            (i for i in self._items.values() if i.expires_at > now), key=lambda i: i.first_seen
        )
        return [(i, self.waiting(i.id)) for i in items]

    def get(self, item_id: str) -> PendingItem | None:
        return self._items.get(item_id)

    def waiting(self, item_id: str) -> int:
        waiting = self._waiting.get(item_id)
        return waiting.count if waiting is not None else 0

    def pending_count(self) -> int:
        """Live pending items (safe to call from another thread: one len())."""
        return len(self._items)

    @property
    def total_waiting(self) -> int:
        return sum(w.count for w in self._waiting.values())

    def take_one_shot(self, agent: str | None, host: str, port: int) -> Verdict | None:
        """A `once` verdict given while nobody waited applies to the next request only."""
        entry = self._one_shots.pop(pending_key(agent, host, port), None)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    # -- holding ---------------------------------------------------------------------------

    async def hold(
        self,
        facts: RequestFacts,
        settings: ApprovalSettings,
        client_gone: Callable[[], bool] | None = None,
        on_held: Callable[[PendingItem], None] | None = None,
    ) -> HoldResult:
        """Create or join the pending item for this request and wait up to `settings.wait`."""
        assert facts.host is not None
        item = await self._upsert(facts, settings)
        if on_held is not None:
            on_held(item)
        waiting = self._waiting.get(item.id)
        if waiting is None:
            waiting = _Waiting(asyncio.get_running_loop().create_future())
            self._waiting[item.id] = waiting
        waiting.count += 1
        deadline = asyncio.get_running_loop().time() + settings.wait
        try:
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return HoldResult(item, None)
                done, _ = await asyncio.wait(
                    {waiting.future}, timeout=min(remaining, POLL_INTERVAL)
                )
                if done:
                    return HoldResult(item, waiting.future.result())
                if client_gone is not None and client_gone():
                    return HoldResult(item, None, abandoned=True)
        finally:
            waiting.count -= 1
            if waiting.count <= 0 and self._waiting.get(item.id) is waiting:
                del self._waiting[item.id]

    async def _upsert(self, facts: RequestFacts, settings: ApprovalSettings) -> PendingItem:
        assert facts.host is not None
        key = pending_key(facts.agent, facts.host.name, facts.port)
        now = self._clock()
        async with self._lock:
            existing_id = self._by_key.get(key)
            existing = self._items.get(existing_id) if existing_id else None
            if existing is not None and existing.expires_at > now:
                item = replace(
                    existing,
                    last_seen=now,
                    count=existing.count + 1,
                    expires_at=max(existing.expires_at, now + settings.pending_ttl),
                )
                created = False
            else:
                item = PendingItem(
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
                )
                created = True
            self._items[item.id] = item
            self._by_key[key] = item.id
            await self._store.upsert_pending(item)
        if created:
            await self._store.record_approval(self._record(item, "requested"))
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
        grant_for: GrantFor,
        note: str,
        approver: str,
        allowed_scopes: frozenset[Scope],
        reviewer: str = "human",
    ) -> ResolveResult:
        """Approve or deny a pending item: release its waiters and record the grant."""
        if scope not in allowed_scopes:
            allowed = ", ".join(sorted(s.value for s in allowed_scopes))
            raise ApprovalError(
                "scope_not_allowed", f"scope {scope.value!r} is not allowed here ({allowed})", 422
            )
        async with self._lock:
            item = self._items.get(item_id)
            if item is None or item.expires_at <= self._clock():
                raise ApprovalError("not_found", f"no pending item with id {item_id!r}", 404)
            del self._items[item_id]
            key = pending_key(item.agent, item.host, item.port)
            if self._by_key.get(key) == item_id:
                del self._by_key[key]
            await self._store.delete_pending(item_id)

        grant = await self._make_grant(item, outcome, scope, grant_for, approver, note)
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
        released = self._release(item_id, verdict)
        if scope is Scope.ONCE and released == 0 and outcome is Outcome.APPROVED:
            # Nobody is waiting any more: the agent's next retry gets through, once.
            self._one_shots[key] = (verdict, item.expires_at)
        if grant_for is GrantFor.ALL:
            # The same destination pending for other agents is covered by this verdict too.
            for other in [
                i for i in self._items.values() if i.host == item.host and i.port == item.port
            ]:
                released += await self._resolve_sibling(other, verdict)

        now = self._clock()
        wait_ms = int((now - item.first_seen) * 1000)
        record = replace(
            self._record(item, outcome.value),
            scope=scope,
            grant_for=grant_for,
            approver=approver,
            reviewer=reviewer,
            note=note,
            wait_ms=wait_ms,
        )
        await self._store.record_approval(record)
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

    async def _resolve_sibling(self, item: PendingItem, verdict: Verdict) -> int:
        async with self._lock:
            if self._items.pop(item.id, None) is None:
                return 0
            key = pending_key(item.agent, item.host, item.port)
            if self._by_key.get(key) == item.id:
                del self._by_key[key]
            await self._store.delete_pending(item.id)
        return self._release(item.id, replace(verdict, pending_id=item.id))

    def _release(self, item_id: str, verdict: Verdict) -> int:
        waiting = self._waiting.get(item_id)
        if waiting is None or waiting.future.done():
            return 0
        waiting.future.set_result(verdict)
        return waiting.count

    async def _make_grant(
        self,
        item: PendingItem,
        outcome: Outcome,
        scope: Scope,
        grant_for: GrantFor,
        approver: str,
        note: str,
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
        )
        if scope is Scope.ALWAYS:
            await self._store.add_grant(grant)
        self._grants.add(grant)
        return grant

    async def reevaluate(self, judge: Callable[[PendingItem], Outcome | None]) -> int:
        """Resolve items that a policy or grant change now decides; returns how many."""
        resolved = 0
        for item in list(self._items.values()):
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
                )
            except ApprovalError:
                continue  # resolved meanwhile by someone else
            resolved += 1
        return resolved

    async def expire(self) -> list[PendingItem]:
        """Drop items past their pending_ttl (emits `expired`)."""
        now = self._clock()
        self._one_shots = {k: v for k, v in self._one_shots.items() if v[1] > now}
        if not any(i.expires_at <= now for i in self._items.values()):
            return []
        async with self._lock:
            expired = [i for i in self._items.values() if i.expires_at <= now]
            for item in expired:
                del self._items[item.id]
                key = pending_key(item.agent, item.host, item.port)
                if self._by_key.get(key) == item.id:
                    del self._by_key[key]
            await self._store.purge_expired_pending(now)
        for item in expired:
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
            "review": item.review,
            "waiting": self.waiting(item.id),
        }
