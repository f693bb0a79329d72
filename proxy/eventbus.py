"""In-process publish/subscribe for live events (`GET /v1/events`): slow subscribers drop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

SUBSCRIBER_QUEUE = 1000


class EventBus:
    """Fan-out of (kind, data) events to subscribers, each with a bounded queue."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[tuple[str, dict[str, Any]]]] = set()
        self.dropped = 0

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        for queue in self._subscribers:
            try:
                queue.put_nowait((kind, data))
            except asyncio.QueueFull:
                self.dropped += 1

    async def subscribe(self) -> AsyncGenerator[tuple[str, dict[str, Any]]]:
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
