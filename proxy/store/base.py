"""The state-store interface: runtime grants, pending items, approval history, decision audit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from proxy.records import ApprovalRecord, DecisionRecord, Grant, PendingItem


class StoreError(Exception):
    """The state store cannot be opened or used; the message says what to do about it."""


@runtime_checkable
class Store(Protocol):
    """Persistent state shared by the proxy: every method commits before it returns."""

    async def close(self) -> None:
        """Release the connection; the store must not be used afterwards."""
        ...

    # grants (only scope=always grants are stored; the caller keeps session grants in memory)
    async def add_grant(self, grant: Grant) -> None:
        """Persist an `always` grant (replacing one with the same id)."""
        ...

    async def list_grants(self, now: float | None = None) -> list[Grant]:
        """Grants not expired at `now` (default: the current time), oldest first."""
        ...

    async def delete_grant(self, grant_id: str) -> bool:
        """Delete a grant; False when the id is unknown."""
        ...

    # pending items
    async def upsert_pending(self, item: PendingItem) -> None:
        """Insert a pending item or replace the one with the same id."""
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

    # decision audit (append-heavy: called with batches)
    async def record_decisions(self, records: Sequence[DecisionRecord]) -> None:
        """Append a batch of decision audit rows in one transaction."""
        ...

    async def list_decisions(
        self, limit: int = 100, host: str | None = None, decision: str | None = None
    ) -> list[DecisionRecord]:
        """The newest `limit` decision rows matching the filters, newest first."""
        ...

    async def prune_decisions(self, keep: int) -> int:
        """Keep the newest `keep` decision rows; return how many were deleted."""
        ...
