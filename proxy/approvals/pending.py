"""The local copy of the shared pending queue: items by id, by (agent, host, port) and counts
per agent, kept in step so the limit check is O(1) whatever the queue holds."""

from __future__ import annotations

from proxy.approvals.model import PendingKey, pending_key
from proxy.policy.model import ApprovalSettings
from proxy.records import PendingItem


class PendingIndex:
    """The last known copy of the store's pending items (the store is the source of truth)."""

    def __init__(self) -> None:
        self._items: dict[str, PendingItem] = {}
        self._keys: dict[PendingKey, str] = {}
        self._per_agent: dict[str | None, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, item_id: str) -> PendingItem | None:
        return self._items.get(item_id)

    def items(self) -> list[PendingItem]:
        return list(self._items.values())

    def has_key(self, agent: str | None, host: str, port: int) -> bool:
        return pending_key(agent, host, port) in self._keys

    def put(self, item: PendingItem) -> None:
        if item.id not in self._items:
            self._per_agent[item.agent] = self._per_agent.get(item.agent, 0) + 1
        self._items[item.id] = item
        self._keys[pending_key(item.agent, item.host, item.port)] = item.id

    def drop(self, item_id: str) -> None:
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

    def replace(self, items: list[PendingItem]) -> None:
        self._items, self._keys, self._per_agent = {}, {}, {}
        for item in items:
            self.put(item)

    def limit_reached(
        self, agent: str | None, host: str, port: int, settings: ApprovalSettings
    ) -> str | None:
        """Why a new item for (agent, host, port) may not be created (None: it may, or joins)."""
        if self.has_key(agent, host, port):
            return None  # joins the existing item
        who = f"agent {agent!r}" if agent is not None else "anonymous agents"
        if self._per_agent.get(agent, 0) >= settings.max_pending:
            return f"{who} already has {settings.max_pending} pending items (approval.max_pending)"
        if len(self._items) >= settings.max_pending_total:
            return (
                f"{settings.max_pending_total} items are pending in all "
                "(approval.max_pending_total)"
            )
        return None
