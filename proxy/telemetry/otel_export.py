"""The OpenTelemetry SDK side of the sink, imported only when OTLP export is configured: the
severity map, a record's trace context, and the exporter and batch processor that count what
they export, fail and drop (the SDK does not)."""

from __future__ import annotations

import collections
import inspect
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

from opentelemetry._logs import SeverityNumber
from opentelemetry.context import Context
from opentelemetry.sdk._logs import ReadableLogRecord, ReadWriteLogRecord
from opentelemetry.sdk._logs.export import (
    BatchLogRecordProcessor,
    LogRecordExporter,
    LogRecordExportResult,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from proxy.telemetry.otel import _start as start_thread
from proxy.telemetry.otel import parse_traceparent

__all__ = ["SEVERITY", "CountingBatchProcessor", "CountingExporter", "context_for"]

SEVERITY: Final[dict[str, tuple[SeverityNumber, str]]] = {
    "debug": (SeverityNumber.DEBUG, "DEBUG"),
    "info": (SeverityNumber.INFO, "INFO"),
    "warning": (SeverityNumber.WARN, "WARN"),
    "error": (SeverityNumber.ERROR, "ERROR"),
}


def context_for(traceparent: str | None) -> Context:
    # An explicit empty Context, never the ambient one: a record must only carry the trace the
    # agent sent, not whatever happens to be current in the proxy's thread.
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        return Context()
    span = NonRecordingSpan(
        SpanContext(
            parsed.trace_id,
            parsed.span_id,
            is_remote=True,
            trace_flags=TraceFlags(parsed.trace_flags),
        )
    )
    return set_span_in_context(span, Context())


class CountingExporter(LogRecordExporter):
    """Wraps the OTLP exporter to count exported and failed records (the SDK does not)."""

    def __init__(self, inner: LogRecordExporter, on_failure: Callable[[int], None]) -> None:
        self._inner = inner
        self._on_failure = on_failure
        self.exported_ok = 0
        self.export_failures = 0
        self._shut = False
        self._shutdown_lock = threading.Lock()

    def abort(self) -> None:
        """Shut the OTLP exporter down now, from another thread: its retry loop stops."""
        start_thread(lambda: self.shutdown(timeout_millis=0))

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        try:
            result = self._inner.export(batch)
        except Exception:  # an exporter bug must not kill the export thread
            result = LogRecordExportResult.FAILURE
        # Only the processor's single worker thread calls export, so plain ints are safe.
        if result is LogRecordExportResult.SUCCESS:
            self.exported_ok += len(batch)
        else:
            self.export_failures += len(batch)
            self._on_failure(len(batch))
        return result

    # `timeout_millis` must be a named parameter: BatchProcessor inspects the signature.
    def shutdown(self, timeout_millis: float = 30_000) -> None:
        with self._shutdown_lock:
            if self._shut:
                return
            self._shut = True
        if "timeout_millis" in inspect.signature(self._inner.shutdown).parameters:
            self._inner.shutdown(timeout_millis=timeout_millis)  # type: ignore[no-untyped-call,call-arg]
        else:
            self._inner.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


class CountingBatchProcessor(BatchLogRecordProcessor):
    """The SDK's batch processor, counting the records it drops when its queue is full.

    The SDK drops the oldest record silently (a stdlib log line at most); we look at the
    queue before handing the record over. The queue is a private detail of the SDK, so if a
    future SDK hides it we stop counting rather than fail.
    """

    def __init__(
        self,
        exporter: LogRecordExporter,
        on_drop: Callable[[], None],
        *,
        schedule_delay_millis: float,
        max_export_batch_size: int,
        export_timeout_millis: float,
        max_queue_size: int,
    ) -> None:
        super().__init__(
            exporter,
            schedule_delay_millis=schedule_delay_millis,
            max_export_batch_size=max_export_batch_size,
            export_timeout_millis=export_timeout_millis,
            max_queue_size=max_queue_size,
        )
        self._on_drop = on_drop
        queue = getattr(getattr(self, "_batch_processor", None), "_queue", None)
        self._queue: collections.deque[Any] | None = (
            queue if isinstance(queue, collections.deque) and queue.maxlen else None
        )

    def queue_length(self) -> int:
        return len(self._queue) if self._queue is not None else 0

    def on_emit(self, log_record: ReadWriteLogRecord) -> None:
        queue = self._queue
        if queue is not None and len(queue) >= (queue.maxlen or 0):
            self._on_drop()
        super().on_emit(log_record)
