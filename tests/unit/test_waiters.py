"""The waiters' sweeper: clients that went away are noticed, and many held requests are checked
in slices, so the event loop is never stalled by one long sweep."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from proxy.approvals import waiters
from proxy.approvals.waiters import SWEEP_SLICE, Waiters


async def test_the_sweep_yields_between_slices_and_wakes_the_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(waiters, "POLL_INTERVAL", 0.05)
    held = Waiters()
    events: list[str] = []
    count = 2 * SWEEP_SLICE + 10
    gone_index = count - 1  # a client in the last slice has left

    def checker(i: int) -> Callable[[], bool]:
        def client_gone() -> bool:
            events.append("check")
            return i == gone_index

        return client_gone

    tasks = [
        asyncio.ensure_future(held.wait(f"item-{i % 3}", 5.0, checker(i))) for i in range(count)
    ]
    await asyncio.sleep(0)  # every waiter registers

    async def ticker() -> None:
        while True:
            events.append("tick")
            await asyncio.sleep(0)

    ticking = asyncio.ensure_future(ticker())
    done, _ = await asyncio.wait(tasks, timeout=2, return_when=asyncio.FIRST_COMPLETED)
    ticking.cancel()
    assert [t.result().abandoned for t in done] == [True]
    assert tasks[gone_index] in done
    # Within the first sweep, the loop ran other work between the slices of checks.
    first = events.index("check")
    sweep = events[first : first + count + 10]
    runs = [len(run) for run in "".join("c" if e == "check" else "|" for e in sweep).split("|")]
    assert max(runs) <= SWEEP_SLICE, runs[:5]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
