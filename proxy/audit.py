"""The decision audit: every decision event becomes a row in the store, written in batches.

A row the store refuses never stops the audit: the batch holding it is written in halves down
to that row, which is tried once more in plain ASCII and then dropped (counted, with an
`egress.audit.dropped` event). Only a store that does not answer keeps rows waiting."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import structlog

from proxy.eventbus import EventBus
from proxy.records import DecisionRecord
from proxy.render import storable_text
from proxy.store import Store, StoreError
from proxy.telemetry import DecisionEvent, Event
from proxy.telemetry.events import Attributes

log = structlog.get_logger("egress-warden")

DEFAULT_MAX_AGE = 30 * 86400.0  # seconds a decision row is kept
DEFAULT_PER_AGENT = 100_000  # rows kept per agent (anonymous callers count as one agent)
BATCH = 500
FLUSH_INTERVAL = 0.05
QUEUE_LIMIT = 100_000
# While the store does not answer, rounds back off up to this (one warning per round).
RETRY_MAX_INTERVAL = 5.0


def decision_record(event: DecisionEvent) -> DecisionRecord:
    f, d = event.facts, event.decision
    return DecisionRecord(
        request_id=f.request_id,
        at=event.at,
        decision=d.verdict.value,
        reason=d.reason.value,
        host=f.host.name if f.host is not None else f.raw_host,
        port=f.port,
        method=f.method,
        transport=f.transport.value,
        agent=f.agent,
        session=f.session,
        rule=d.rule,
        source=d.source,
        client_address=f.client_address,
        peer_address=str(event.address) if event.address is not None else None,
        mode=event.mode.value,
        path=f.path,
        pending_id=event.pending_id,
    )


def record_json(record: DecisionRecord) -> dict[str, Any]:
    """An audit row as the API shows it: every text as the store keeps it (`storable_text`), so
    live events and the stored audit read the same and any JSON encoder takes them."""
    row = dataclasses.asdict(record)
    return {name: storable_text(v) if isinstance(v, str) else v for name, v in row.items()}


def _ascii_record(record: DecisionRecord) -> DecisionRecord:
    """The last form a refused row is offered in: every text escaped to ASCII (a database whose
    encoding is narrower than UTF-8 takes that too)."""
    changes: dict[str, Any] = {
        name: v.encode("ascii", "backslashreplace").decode("ascii")
        for name, v in dataclasses.asdict(record).items()
        if isinstance(v, str)
    }
    return dataclasses.replace(record, **changes)


class AuditWriter:
    """Batches decision rows into the store off the request path; bounded, drops are counted."""

    def __init__(
        self,
        store: Store,
        max_age: float = DEFAULT_MAX_AGE,
        per_agent: int = DEFAULT_PER_AGENT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._max_age = max_age
        self._per_agent = per_agent
        self._clock = clock
        self._buffer: list[DecisionRecord] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._written_since_prune = 0
        self.dropped = 0  # rows lost: queue full, or refused by the store

    def add(self, record: DecisionRecord) -> None:
        if len(self._buffer) >= QUEUE_LIMIT:
            self.dropped += 1
            return
        self._buffer.append(record)
        if len(self._buffer) >= BATCH:
            self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def _run(self) -> None:
        interval = FLUSH_INTERVAL
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), interval)
            self._wakeup.clear()
            try:
                await self.flush()
            except StoreError as exc:  # the store does not answer: rows wait, retried later
                log.warning("egress.audit", error=str(exc), buffered=len(self._buffer))
                interval = min(interval * 2, RETRY_MAX_INTERVAL)
            except Exception:  # a bug here must not end the audit for good
                log.exception("egress.audit")
                interval = min(interval * 2, RETRY_MAX_INTERVAL)
            else:
                interval = FLUSH_INTERVAL

    async def flush(self) -> None:
        """Write everything buffered so far (also called before the audit is read).

        Raises StoreError only when the store does not answer; the rows stay buffered."""
        while self._buffer:
            batch, self._buffer = self._buffer[:BATCH], self._buffer[BATCH:]
            await self._write(batch)
            self._written_since_prune += len(batch)
        if self._written_since_prune >= max(1000, self._per_agent // 10):
            self._written_since_prune = 0
            await self.prune()

    async def prune(self) -> dict[str | None, int]:
        """Retention by age, then per agent: an agent flooding its own rows prunes only its
        own, and that raises an `egress.audit.pruned` event naming it."""
        try:
            await self._store.prune_decisions_before(self._clock() - self._max_age)
            pruned = await self._store.prune_decisions_per_agent(self._per_agent)
        except Exception as exc:
            raise StoreError(f"cannot prune the decision audit: {exc}") from exc
        for agent, rows in pruned.items():
            log.warning(
                "egress.audit.pruned",
                **{"egress.agent.id": agent, "rows": rows, "kept": self._per_agent},
            )
        return pruned

    async def commit(self) -> None:
        """Write what is buffered now (a refusal's row before the refusal is sent). A store
        that does not answer keeps the rows buffered; the refusal goes out regardless."""
        try:
            await self.flush()
        except StoreError as exc:
            log.warning("egress.audit", error=str(exc), buffered=len(self._buffer))

    async def _write(self, batch: list[DecisionRecord]) -> None:
        """Write `batch` in order. When the store refuses it but answers a ping, some row is at
        fault: halves are written apart down to single rows; a single row refused again in
        plain ASCII is dropped. Each row is tried at most log2(BATCH) + 2 times."""
        todo: list[tuple[list[DecisionRecord], bool]] = [(batch, False)]  # (rows, last form)
        refused: list[DecisionRecord] = []
        error: Exception | None = None
        while todo:
            rows, last = todo.pop()
            try:
                await self._store.record_decisions(rows)
                continue
            except Exception as exc:
                error = exc
            if not await self._store.ping():
                unwritten = rows + [row for part, _ in reversed(todo) for row in part]
                self._buffer[:0] = unwritten
                raise StoreError(f"the decision audit cannot be written: {error}") from error
            if len(rows) > 1:
                middle = len(rows) // 2
                todo += [(rows[middle:], False), (rows[:middle], False)]
            elif not last:
                todo.append(([_ascii_record(rows[0])], True))
            else:
                refused.append(rows[0])
        if refused:
            self.dropped += len(refused)
            log.error(
                "egress.audit.dropped",
                count=len(refused),
                total=self.dropped,
                request_ids=[storable_text(r.request_id, 64) for r in refused[:10]],
                error=storable_text(str(error), 500),
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()


class AuditSink:
    """Telemetry sink: decision events go to the audit writer and to live subscribers."""

    def __init__(self, writer: AuditWriter, bus: EventBus) -> None:
        self._writer = writer
        self._bus = bus

    def emit(self, event: Event, severity: str, attributes: Attributes) -> None:
        if isinstance(event, DecisionEvent):
            record = decision_record(event)
            self._writer.add(record)
            if self._bus.subscribers:
                self._bus.publish("decision", record_json(record))
