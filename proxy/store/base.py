"""The state-store interface: runtime grants, pending items, approval history, decision audit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from proxy.records import ApprovalRecord, DecisionRecord, Grant, PendingItem


class StoreError(Exception):
    """The state store cannot be opened or used; the message says what to do about it."""


# Fleet notification channels (PostgreSQL LISTEN/NOTIFY names).
CHANNEL_PENDING: Final = "egress_pending"  # a pending item was created or joined
CHANNEL_RESOLVED: Final = "egress_resolved"  # a pending item was approved, denied or expired
CHANNEL_GRANTS: Final = "egress_grants"  # grants were added or deleted
CHANNELS: Final = (CHANNEL_PENDING, CHANNEL_RESOLVED, CHANNEL_GRANTS)
# Delivered to every subscriber on every channel after the listener reconnects: notifications
# sent during the outage are lost, so subscribers should re-read the state they cache.
RESYNC_PAYLOAD: Final = ""

NotifyCallback = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class Resolution:
    """What resolving a pending item writes in the same transaction as its claim: the history
    row and, optionally, a grant (a `once` pass when nobody waits on the item anywhere)."""

    record: ApprovalRecord
    grant: Grant | None = None


# Given the claimed item and how many requests were still waiting on it (on every replica),
# what the resolution writes. Called inside the store's transaction: it must not await.
ResolutionWriter = Callable[[PendingItem, int], Resolution]


@runtime_checkable
class Store(Protocol):
    """Persistent state shared by the proxy: every method commits before it returns."""

    async def close(self) -> None:
        """Release the connection; the store must not be used afterwards."""
        ...

    async def ping(self) -> bool:
        """True when the store answers a trivial query right now; never raises."""
        ...

    # grants (every scope; scope=once grants are one-shot passes shared by replicas)
    async def add_grant(self, grant: Grant) -> None:
        """Persist a grant of any scope (replacing one with the same id): the store is what
        every worker and replica enforces, `once` passes and session grants included."""
        ...

    async def list_grants(self, now: float | None = None) -> list[Grant]:
        """Grants not expired at `now` (default: the current time), oldest first."""
        ...

    async def delete_grant(self, grant_id: str) -> bool:
        """Delete a grant; False when the id is unknown."""
        ...

    async def consume_grant(self, grant_id: str) -> bool:
        """Use up a (once) grant: delete it; True for exactly one of any concurrent callers."""
        ...

    async def take_once_pass(self, pattern: str, agent: str | None, now: float) -> Grant | None:
        """Use up one live `once` grant for exactly `pattern` that applies to `agent` (its own,
        or one for every agent) and return it; None when there is none. One conditional
        DELETE ... RETURNING per candidate: each pass goes to exactly one caller, whichever
        worker or replica asks, whatever it has cached."""
        ...

    async def grants_signature(self) -> tuple[int, float, str]:
        """A cheap fingerprint of the grants table: it changes whenever a grant is added,
        revoked or used up, so replicas poll it instead of re-reading every grant."""
        ...

    # pending items
    async def upsert_pending(self, item: PendingItem) -> None:
        """Insert a pending item or replace the one with the same id.

        A different item holding the same (agent, host, port) is replaced as well: there is at
        most one pending item per key.
        """
        ...

    async def join_pending(self, item: PendingItem) -> tuple[PendingItem, bool]:
        """Atomically join the live pending item for item's (agent, host, port), or create it.

        When a row for the key has expires_at > item.last_seen it is updated (last_seen =
        item.last_seen, count + 1, expires_at = the later of both) and returned with False.
        Either way the caller counts as waiting on the item until it calls `leave_pending`.
        Otherwise `item` (whose id must be fresh) is stored, replacing an expired row for the
        key, and returned with True. Race-free across processes and replicas.
        """
        ...

    async def claim_pending(self, item_id: str) -> PendingItem | None:
        """Atomically delete and return a pending item; exactly one concurrent caller gets it."""
        ...

    async def resolve_pending(
        self, item_id: str, now: float, write: ResolutionWriter
    ) -> tuple[PendingItem, int] | None:
        """Resolve a live pending item in one transaction: delete it (exactly one concurrent
        caller wins), then store what `write(item, waiting)` returns. `waiting`: the requests
        that joined it (`join_pending`) and have not left (`leave_pending`), on every replica.
        Returns (item, waiting); None when no item with this id has expires_at > now."""
        ...

    async def leave_pending(self, item_id: str) -> bool:
        """A request that joined the item stops waiting on it without a verdict. False when
        the item is gone (resolved or purged) while the request still counted as waiting: a
        resolution then covered it (see `latest_approval`)."""
        ...

    async def get_pending(self, item_id: str) -> PendingItem | None:
        """The pending item with this id (expired or not), or None."""
        ...

    async def list_pending(self, now: float) -> list[PendingItem]:
        """Pending items with expires_at > now, oldest (first_seen) first."""
        ...

    async def delete_pending(self, item_id: str) -> bool:
        """Delete a pending item; False when the id is unknown."""
        ...

    async def purge_expired_pending(self, now: float) -> list[PendingItem]:
        """Delete the pending items with expires_at <= now and return them, oldest first."""
        ...

    # approval history
    async def record_approval(self, record: ApprovalRecord) -> None:
        """Append one approval-history row."""
        ...

    async def list_approvals(self, limit: int = 100) -> list[ApprovalRecord]:
        """The newest `limit` approval-history rows, newest first."""
        ...

    async def latest_approval(self, item_id: str) -> ApprovalRecord | None:
        """The newest approval-history row for this pending item id, or None."""
        ...

    # decision audit (append-heavy: called with batches)
    async def record_decisions(self, records: Sequence[DecisionRecord]) -> None:
        """Append a batch of decision audit rows in one transaction.

        Any text is taken: each is stored as `proxy.render.storable_text` makes it (undecodable
        bytes and NUL escaped, capped at FIELD_LIMIT), and read back that way.
        """
        ...

    async def list_decisions(
        self,
        limit: int = 100,
        host: str | None = None,
        decision: str | None = None,
        agent: str | None = None,
        reason: str | None = None,
        since: float | None = None,
    ) -> list[DecisionRecord]:
        """The newest `limit` decision rows matching every filter given (`since`: unix seconds,
        rows recorded at or after it), newest first."""
        ...

    async def prune_decisions(self, keep: int) -> int:
        """Keep the newest `keep` decision rows; return how many were deleted."""
        ...

    async def prune_decisions_before(self, cutoff: float) -> int:
        """Delete decision rows recorded before `cutoff` (unix seconds); return how many."""
        ...

    async def prune_decisions_per_agent(self, keep: int) -> dict[str | None, int]:
        """Keep the newest `keep` rows of each agent (None: anonymous callers); return the rows
        deleted per agent that had more. One agent's flood never erases another's rows."""
        ...

    # fleet signalling
    async def notify(self, channel: str, payload: str) -> None:
        """Signal every replica sharing the store (PostgreSQL NOTIFY; a no-op for SQLite)."""
        ...

    def subscribe(self, callback: NotifyCallback) -> None:
        """Call `callback(channel, payload)` on the event loop for each notification on CHANNELS.

        After a lost listener connection is re-established, each callback also gets
        (channel, RESYNC_PAYLOAD) once per channel. SQLite never calls it.
        """
        ...
