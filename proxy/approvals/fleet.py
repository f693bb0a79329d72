"""The fleet channel: typed, versioned messages between replicas sharing one store.

A message is JSON `{"v": 1, "kind": ..., "id": ...}` on the store's notification channel for
its kind (PostgreSQL NOTIFY; a SQLite store has no replicas and drops them). Notifications are
hints: every replica also reconciles with the store periodically, so a lost or unknown message
costs latency, never correctness. Payloads of the earlier format (a bare item id, `revoke:<id>`,
the empty resync) are still read, so a fleet can be upgraded one replica at a time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

from proxy.store import CHANNEL_GRANTS, CHANNEL_PENDING, CHANNEL_RESOLVED, RESYNC_PAYLOAD, Store

log = structlog.get_logger("egress-warden")

FLEET_VERSION = 1
_LEGACY_REVOKE = "revoke:"


class MessageKind(StrEnum):
    PENDING_CREATED = "pending_created"  # id: a new pending item
    ITEM_RESOLVED = "item_resolved"  # id: a pending item was approved or denied
    GRANTS_CHANGED = "grants_changed"  # grants were added: re-read them
    GRANT_REVOKED = "grant_revoked"  # id: a grant was revoked or used up
    RESYNC_PENDING = "resync_pending"  # re-read the pending queue
    RESYNC_RESOLVED = "resync_resolved"  # resolutions may have been missed: reconcile


_CHANNEL = {
    MessageKind.PENDING_CREATED: CHANNEL_PENDING,
    MessageKind.RESYNC_PENDING: CHANNEL_PENDING,
    MessageKind.ITEM_RESOLVED: CHANNEL_RESOLVED,
    MessageKind.RESYNC_RESOLVED: CHANNEL_RESOLVED,
    MessageKind.GRANTS_CHANGED: CHANNEL_GRANTS,
    MessageKind.GRANT_REVOKED: CHANNEL_GRANTS,
}
# What a channel's resync (the store's reconnect signal, or a message this version cannot
# read) means: catch up with everything that channel carries.
_RESYNC = {
    CHANNEL_PENDING: MessageKind.RESYNC_PENDING,
    CHANNEL_RESOLVED: MessageKind.RESYNC_RESOLVED,
    CHANNEL_GRANTS: MessageKind.GRANTS_CHANGED,
}


@dataclass(frozen=True, slots=True)
class FleetMessage:
    kind: MessageKind
    id: str | None = None
    version: int = FLEET_VERSION

    @property
    def channel(self) -> str:
        return _CHANNEL[self.kind]

    def encode(self) -> str:
        body: dict[str, Any] = {"v": self.version, "kind": self.kind.value}
        if self.id is not None:
            body["id"] = self.id
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def decode(cls, channel: str, payload: str) -> FleetMessage | None:
        """The message a notification carries (None: not one of our channels)."""
        resync = _RESYNC.get(channel)
        if resync is None:
            return None
        if payload == RESYNC_PAYLOAD:
            return cls(resync)
        if payload.startswith("{"):
            try:
                body = json.loads(payload)
                version = int(body["v"])
                kind = MessageKind(body["kind"])
                item = body.get("id")
            except (ValueError, KeyError, TypeError):
                return cls(resync)  # unreadable: catch up instead
            if version > FLEET_VERSION or _CHANNEL[kind] != channel:
                return cls(resync)  # a newer replica's message: catch up instead
            return cls(kind, item if isinstance(item, str) else None, version)
        # the earlier, string-prefixed format
        if channel == CHANNEL_GRANTS:
            if payload.startswith(_LEGACY_REVOKE):
                return cls(MessageKind.GRANT_REVOKED, payload.removeprefix(_LEGACY_REVOKE), 0)
            return cls(MessageKind.GRANTS_CHANGED, None, 0)
        if channel == CHANNEL_RESOLVED:
            return cls(MessageKind.ITEM_RESOLVED, payload, 0)
        return cls(MessageKind.PENDING_CREATED, payload, 0)


class FleetChannel:
    """Publishes and receives fleet messages through the store; runs their handlers as
    background tasks whose failures are logged, never lost silently."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._tasks: set[asyncio.Task[Any]] = set()

    def publish(self, message: FleetMessage) -> None:
        self.spawn(self._store.notify(message.channel, message.encode()))

    def subscribe(self, handler: Callable[[FleetMessage], None]) -> None:
        def on_notify(channel: str, payload: str) -> None:
            message = FleetMessage.decode(channel, payload)
            if message is not None:
                handler(message)

        self._store.subscribe(on_notify)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("egress.fleet", error=str(exc))
