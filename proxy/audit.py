"""The decision audit: every decision event becomes a row in the store, written in batches."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from proxy.eventbus import EventBus
from proxy.records import DecisionRecord
from proxy.store import Store
from proxy.telemetry import DecisionEvent, Event
from proxy.telemetry.events import Attributes

log = structlog.get_logger("egress-warden")

BATCH = 500
FLUSH_INTERVAL = 0.05
QUEUE_LIMIT = 100_000


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
    return {
        "request_id": record.request_id,
        "at": record.at,
        "decision": record.decision,
        "reason": record.reason,
        "host": record.host,
        "port": record.port,
        "method": record.method,
        "transport": record.transport,
        "agent": record.agent,
        "session": record.session,
        "rule": record.rule,
        "source": record.source,
        "client_address": record.client_address,
        "peer_address": record.peer_address,
        "mode": record.mode,
        "path": record.path,
        "pending_id": record.pending_id,
    }


class AuditWriter:
    """Batches decision rows into the store off the request path; bounded, drops are counted."""

    def __init__(self, store: Store, retention: int) -> None:
        self._store = store
        self._retention = retention
        self._buffer: list[DecisionRecord] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._written_since_prune = 0
        self.dropped = 0

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
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), FLUSH_INTERVAL)
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception as exc:  # the store may be briefly unavailable: retry next round
                log.warning("egress.audit", error=str(exc))

    async def flush(self) -> None:
        """Write everything buffered so far (also called before the audit is read)."""
        while self._buffer:
            batch, self._buffer = self._buffer[:BATCH], self._buffer[BATCH:]
            try:
                await self._store.record_decisions(batch)
            except Exception:
                self._buffer = batch + self._buffer
                raise
            self._written_since_prune += len(batch)
        if self._written_since_prune >= max(1000, self._retention // 10):
            self._written_since_prune = 0
            await self._store.prune_decisions(self._retention)

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
