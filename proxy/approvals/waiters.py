"""Requests waiting here for a pending item's verdict: one shared future per item, one sweeper
that notices clients that went away, and a drain that answers them all at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.approvals.model import Verdict

POLL_INTERVAL = 0.5  # how often the sweeper checks that waiting clients are still there
# Clients checked between two yields to the event loop: 10,000 held requests took one 16 ms
# stretch per sweep (py-spy), a stall for every allowed request behind it; slices keep each
# stretch under 1 ms.
SWEEP_SLICE = 500


@dataclass(frozen=True, slots=True)
class WaitResult:
    verdict: Verdict | None  # None: no answer in time, the client left, or draining
    abandoned: bool = False
    draining: bool = False


@dataclass
class _Waiting:
    future: asyncio.Future[Verdict]
    count: int = 0


class Waiters:
    """The requests held in this process, by pending item id (in memory only)."""

    def __init__(self) -> None:
        self._waiting: dict[str, _Waiting] = {}
        self._watched: set[tuple[Callable[[], bool], asyncio.Future[None]]] = set()
        self._sweeper: asyncio.Future[None] | None = None
        self._draining: asyncio.Future[None] | None = None

    def count(self, item_id: str) -> int:
        """How many requests wait on `item_id` here."""
        waiting = self._waiting.get(item_id)
        return waiting.count if waiting is not None else 0

    def item_ids(self) -> list[str]:
        return list(self._waiting)

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._waiting

    def release(self, item_id: str, verdict: Verdict) -> int:
        """Answer every request waiting on `item_id`; returns how many were released."""
        waiting = self._waiting.get(item_id)
        if waiting is None or waiting.future.done():
            return 0
        waiting.future.set_result(verdict)
        return waiting.count

    def drain(self) -> None:
        """Shutting down: answer every held request now (their items stay pending)."""
        draining = self._drain_future()
        if not draining.done():
            draining.set_result(None)

    def _drain_future(self) -> asyncio.Future[None]:
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_future()
        return self._draining

    async def wait(
        self, item_id: str, seconds: float, client_gone: Callable[[], bool] | None
    ) -> WaitResult:
        """Wait up to `seconds` for `item_id`'s verdict (or the client leaving, or a
        drain)."""
        loop = asyncio.get_running_loop()
        waiting = self._waiting.get(item_id)
        if waiting is None:
            waiting = _Waiting(loop.create_future())
            self._waiting[item_id] = waiting
        waiting.count += 1
        # One sweeper checks every waiter's client; a waiter itself wakes only once.
        gone: asyncio.Future[None] = loop.create_future()
        watch = (client_gone, gone) if client_gone is not None else None
        if watch is not None:
            self._watched.add(watch)
            self._ensure_sweeper()
        draining = self._drain_future()
        try:
            futures: set[asyncio.Future[Any]] = {waiting.future, gone, draining}
            done, _ = await asyncio.wait(
                futures, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
            )
            if waiting.future in done:
                return WaitResult(waiting.future.result())
            return WaitResult(None, abandoned=gone in done, draining=draining in done)
        finally:
            if watch is not None:
                self._watched.discard(watch)
            if not gone.done():
                gone.cancel()
            waiting.count -= 1
            if waiting.count <= 0 and self._waiting.get(item_id) is waiting:
                del self._waiting[item_id]

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep())

    async def _sweep(self) -> None:
        """Wake waiters whose client went away (checked every POLL_INTERVAL, for all at once)."""
        while self._watched:
            await asyncio.sleep(POLL_INTERVAL)
            watched = list(self._watched)
            for start in range(0, len(watched), SWEEP_SLICE):
                if start:
                    await asyncio.sleep(0)  # let other work run between slices
                for client_gone, gone in watched[start : start + SWEEP_SLICE]:
                    if not gone.done() and client_gone():
                        gone.set_result(None)
