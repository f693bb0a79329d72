"""The telemetry hub: receives each event once and hands it to every sink."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Sequence
from typing import Any, Protocol, TextIO

import structlog

from proxy.telemetry.events import (
    ApprovalEvent,
    Attributes,
    ConnectionCloseEvent,
    DecisionEvent,
    PolicyEvent,
)

Event = DecisionEvent | PolicyEvent | ApprovalEvent | ConnectionCloseEvent


class Sink(Protocol):
    """Receives every event once, with its severity and SPEC attributes already computed."""

    def emit(self, event: Event, severity: str, attributes: Attributes) -> None: ...


def severity_of(event: Event) -> str:
    """SPEC 6: allow INFO, hold and deny WARN; approvals INFO, denied/expired WARN."""
    match event:
        case DecisionEvent():
            return "info" if event.decision.allowed else "warning"
        case PolicyEvent():
            return {"rejected": "error", "warning": "warning"}.get(event.state, "info")
        case ApprovalEvent():
            return "warning" if event.state in ("denied", "expired") else "info"
        case ConnectionCloseEvent():
            return "info"


class _BackgroundWriter:
    """Writes lines to a stream from a thread, so a slow reader never blocks the event loop.

    The thread wakes every FLUSH_INTERVAL (or when BATCH_LINES are waiting) and writes what has
    queued up in one go: one wake-up per line handed the GIL back and forth between the event
    loop and this thread on every request, which cost the proxy a fifth of its request rate."""

    FLUSH_INTERVAL = 0.05  # seconds a line may wait before it is written
    BATCH_LINES = 2048  # or fewer, when this many are waiting

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="egress-log-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.FLUSH_INTERVAL)
            self._wake.clear()
            closing = self._closing
            lines = self._drain()
            try:
                if lines:
                    self._stream.write("\n".join(lines) + "\n")
                    self._stream.flush()
            except (OSError, ValueError):
                return
            if closing:
                return

    def _drain(self) -> list[str]:
        lines: list[str] = []
        try:
            while True:
                lines.append(self._queue.get_nowait())
        except queue.Empty:
            return lines

    def msg(self, message: str) -> None:
        self._queue.put(message)
        if self._queue.qsize() >= self.BATCH_LINES:
            self._wake.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join(timeout=2)


class _WriterLogger:
    def __init__(self, writer: _BackgroundWriter) -> None:
        self._writer = writer

    def msg(self, message: str) -> None:
        self._writer.msg(message)

    log = debug = info = warning = warn = error = critical = msg


_writer: _BackgroundWriter | None = None


def configure_logging(stream: TextIO | None = None) -> None:
    """JSON lines on stderr (SPEC 2), written off the event loop."""
    global _writer
    if _writer is None:
        _writer = _BackgroundWriter(stream or sys.stderr)
    writer = _writer

    def factory(*_args: Any) -> _WriterLogger:
        return _WriterLogger(writer)

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def flush_logging() -> None:
    """Drain the log writer (at shutdown)."""
    global _writer
    if _writer is not None:
        _writer.close()
        _writer = None


class StructlogSink:
    """One JSON line per event, the event name as the message."""

    def __init__(self) -> None:
        self._log = structlog.get_logger("egress-warden")

    def emit(self, event: Event, severity: str, attributes: Attributes) -> None:
        getattr(self._log, severity)(event.name, **attributes)


class Telemetry:
    """Fan-out of events to sinks; each event is built once and emitted once."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self._sinks = tuple(sinks)

    def emit(self, event: Event) -> None:
        severity = severity_of(event)
        attributes = event.attributes()
        for sink in self._sinks:
            sink.emit(event, severity, attributes)
