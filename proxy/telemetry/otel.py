"""OpenTelemetry sink: every event becomes one OTLP log record, plus a few metrics (SPEC 6).

Export never blocks the proxy: `emit()` only appends to a bounded in-memory queue that a
background thread drains; when the collector is down or hangs the queue fills, records are
dropped (and counted), and the proxy carries on.

The SDK and the exporters are imported only when OTLP export is configured (`build_otel_sink`
finds an endpoint): a proxy without a collector never loads them (~40 ms and ~7 MiB at start).
The SDK-facing classes live in `proxy.telemetry.otel_export`.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple
from urllib.parse import unquote

import structlog

import proxy
from proxy.render import storable_text
from proxy.telemetry.events import (
    ApprovalEvent,
    Attributes,
    ConnectionCloseEvent,
    DecisionEvent,
    NotificationEvent,
)
from proxy.telemetry.hub import Event

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import LogRecordExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricExporter
    from opentelemetry.sdk.resources import Resource

    from proxy.telemetry.otel_export import CountingBatchProcessor, CountingExporter

__all__ = [
    "BYTE_LABELS",
    "BoundedLabel",
    "OtelSink",
    "TraceParent",
    "build_otel_sink",
    "otel_resource",
    "parse_traceparent",
]

SERVICE_NAME: Final = "egress-warden"
SCOPE_NAME: Final = "egress-warden"

# Defaults chosen for a proxy: a small bounded queue (memory is capped at a few MB even with
# the collector gone), and an export timeout short enough that a hung collector stalls only
# the export thread for a few seconds at a time.
DEFAULT_MAX_QUEUE_SIZE: Final = 2048
DEFAULT_MAX_EXPORT_BATCH_SIZE: Final = 512
DEFAULT_SCHEDULE_DELAY_MS: Final = 1000
DEFAULT_EXPORT_TIMEOUT_S: Final = 5.0
DEFAULT_METRIC_EXPORT_INTERVAL_MS: Final = 60_000
DEFAULT_METRIC_EXPORT_TIMEOUT_MS: Final = 5_000
WARN_INTERVAL_S: Final = 30.0

# `egress.bytes` split by destination and agent, for capacity planning: off unless asked for
# (`EGRESS_WARDEN_METRICS_LABELS=host,agent`), and bounded (the first N distinct values of each
# keep their own label, later ones are counted as `other`), so a crawl over a million hosts
# cannot grow the metric state or the collector's series without bound.
METRICS_LABELS_ENV: Final = "EGRESS_WARDEN_METRICS_LABELS"
METRICS_LABEL_LIMIT_ENV: Final = "EGRESS_WARDEN_METRICS_LABEL_LIMIT"
DEFAULT_METRICS_LABEL_LIMIT: Final = 100
OTHER_LABEL: Final = "other"
BYTE_LABELS: Final[dict[str, str]] = {"host": "server.address", "agent": "egress.agent.id"}

# Approval waits span from milliseconds (auto/webhook) to an hour (a human at lunch).
APPROVAL_WAIT_BUCKETS_MS: Final = (
    100.0,
    500.0,
    1_000.0,
    5_000.0,
    15_000.0,
    30_000.0,
    60_000.0,
    300_000.0,
    900_000.0,
    3_600_000.0,
)

_log = structlog.get_logger("egress.telemetry")


# --- traceparent ---------------------------------------------------------------------------

# W3C Trace Context level 1, version 00 exactly: lower-case hex, nothing after the flags.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


class TraceParent(NamedTuple):
    """The ids parsed from a W3C `traceparent` header."""

    trace_id: int
    span_id: int
    trace_flags: int


def parse_traceparent(value: str | None) -> TraceParent | None:
    """Parse a `traceparent` strictly; anything malformed (or all-zero ids) gives None."""
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if trace_id == 0 or span_id == 0:
        return None
    return TraceParent(trace_id, span_id, int(match[3], 16))


def _traceparent_of(event: Event) -> str | None:
    match event:
        case DecisionEvent():
            return event.facts.traceparent
        case ApprovalEvent() | ConnectionCloseEvent():
            return event.traceparent
        case _:
            return None


# --- attributes and resource ---------------------------------------------------------------

_Scalar = str | bool | int | float
AttributeValue = _Scalar | tuple[str, ...] | tuple[bool, ...] | tuple[int, ...] | tuple[float, ...]


def _attribute_value(value: Any) -> AttributeValue:
    """OTel attributes take scalars or homogeneous sequences; anything else becomes a string.
    Text an agent sent may hold bytes that are not UTF-8: escaped, or protobuf would refuse the
    whole export batch."""
    if isinstance(value, str):
        return storable_text(value, None)
    if isinstance(value, _Scalar):
        return value
    if isinstance(value, list | tuple) and value:
        kind = type(value[0])
        if kind in (str, bool, int, float) and all(type(v) is kind for v in value):
            return tuple(value)
    return str(value)


def _otel_attributes(name: str, attributes: Attributes) -> dict[str, AttributeValue]:
    out: dict[str, AttributeValue] = {"event.name": name}
    for key, value in attributes.items():
        if value is not None:
            out[key] = _attribute_value(value)
    return out


def _parse_resource_attributes(raw: str) -> dict[str, str]:
    """`OTEL_RESOURCE_ATTRIBUTES`: comma-separated key=value, values percent-encoded."""
    out: dict[str, str] = {}
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[key.strip()] = unquote(value.strip())
    return out


def otel_resource(env: Mapping[str, str] | None = None) -> Resource:
    """service.name=egress-warden, a per-process service.instance.id and the version.

    `OTEL_RESOURCE_ATTRIBUTES` overrides those, and `OTEL_SERVICE_NAME` overrides service.name,
    as the SDK does.
    """
    env = os.environ if env is None else env
    attrs: dict[str, str] = {
        "service.name": SERVICE_NAME,
        "service.version": proxy.__version__,
        "service.instance.id": str(uuid.uuid4()),
    }
    attrs.update(_parse_resource_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES", "")))
    if service_name := env.get("OTEL_SERVICE_NAME", "").strip():
        attrs["service.name"] = service_name
    from opentelemetry.sdk.resources import Resource

    # Resource.create adds telemetry.sdk.* and runs the configured detectors; ours win.
    return Resource.create(dict(attrs))


# --- export plumbing with counters ---------------------------------------------------------


class _RateLimitedWarning:
    """One structlog warning per interval, so a dead collector does not flood stderr."""

    def __init__(self, event: str, interval_s: float = WARN_INTERVAL_S) -> None:
        self._event = event
        self._interval = interval_s
        self._last = -interval_s
        self._lock = threading.Lock()

    def __call__(self, **fields: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._interval:
                return
            self._last = now
        _log.warning(self._event, logger="egress.telemetry", **fields)


class BoundedLabel:
    """One metric label's values, top-N by arrival: the first `limit` distinct values keep their
    own label, every later one reads `other` (series per label: at most limit + 1)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._kept:
            return value
        with self._lock:
            if len(self._kept) < self.limit:
                self._kept.add(value)
                return value
        return OTHER_LABEL


# --- the sink ------------------------------------------------------------------------------


class OtelSink:
    """A `Sink` exporting events as OTLP log records and updating the SPEC 6 metrics.

    Either exporter may be None (that signal is then off). `emit()` never waits on the
    network; `shutdown()` flushes what is queued within a bounded time.
    """

    def __init__(
        self,
        log_exporter: LogRecordExporter | None,
        metric_exporter: MetricExporter | None = None,
        *,
        resource: Resource | None = None,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        max_export_batch_size: int = DEFAULT_MAX_EXPORT_BATCH_SIZE,
        schedule_delay_ms: float = DEFAULT_SCHEDULE_DELAY_MS,
        export_timeout_ms: float = DEFAULT_EXPORT_TIMEOUT_S * 1000,
        metric_export_interval_ms: float = DEFAULT_METRIC_EXPORT_INTERVAL_MS,
        metric_export_timeout_ms: float = DEFAULT_METRIC_EXPORT_TIMEOUT_MS,
        byte_labels: Sequence[str] = (),
        label_limit: int = DEFAULT_METRICS_LABEL_LIMIT,
    ) -> None:
        unknown = sorted(set(byte_labels) - BYTE_LABELS.keys())
        if unknown:
            raise ValueError(f"unknown egress.bytes label {unknown[0]!r} (use host, agent)")
        # attribute name -> its bounded value set, in a fixed order
        self._byte_labels = {BYTE_LABELS[k]: BoundedLabel(label_limit) for k in byte_labels}
        self.resource = resource if resource is not None else otel_resource()
        self._dropped = 0
        self._drop_lock = threading.Lock()
        self._closed = False
        self._pending = 0
        self._pending_source: Callable[[], int] | None = None
        self._warn_dropped = _RateLimitedWarning("egress.telemetry.dropped")
        self._warn_failed = _RateLimitedWarning("egress.telemetry.export_failed")

        # Only now the SDK: a process without OTLP export never constructs a sink.
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        from proxy.telemetry import otel_export

        self._severity = otel_export.SEVERITY
        self._context_for = otel_export.context_for
        self._exporter: CountingExporter | None = None
        self._processor: CountingBatchProcessor | None = None
        self._logger_provider: LoggerProvider | None = None
        if log_exporter is not None:
            self._exporter = otel_export.CountingExporter(log_exporter, self._export_failed)
            self._processor = otel_export.CountingBatchProcessor(
                self._exporter,
                self._record_dropped,
                schedule_delay_millis=schedule_delay_ms,
                max_export_batch_size=min(max_export_batch_size, max_queue_size),
                export_timeout_millis=export_timeout_ms,
                max_queue_size=max_queue_size,
            )
            # shutdown_on_exit=False: the SDK's atexit hook waits up to 30 s on a hung
            # collector; the runtime calls our bounded shutdown() instead.
            self._logger_provider = LoggerProvider(resource=self.resource, shutdown_on_exit=False)
            self._logger_provider.add_log_record_processor(self._processor)
        self._logger = (
            self._logger_provider.get_logger(SCOPE_NAME, proxy.__version__)
            if self._logger_provider is not None
            else None
        )

        self._meter_provider: MeterProvider | None = None
        self._metric_exporter = metric_exporter
        if metric_exporter is not None:
            reader = PeriodicExportingMetricReader(
                metric_exporter,
                export_interval_millis=metric_export_interval_ms,
                export_timeout_millis=metric_export_timeout_ms,
            )
            self._meter_provider = MeterProvider(
                metric_readers=[reader], resource=self.resource, shutdown_on_exit=False
            )
            meter = self._meter_provider.get_meter(SCOPE_NAME, proxy.__version__)
            self._decisions = meter.create_counter(
                "egress.decisions", unit="{request}", description="Decided requests"
            )
            self._bytes = meter.create_counter(
                "egress.bytes", unit="By", description="Bytes relayed through admitted connections"
            )
            self._notifications = meter.create_counter(
                "egress.notifications",
                unit="{notification}",
                description="Approval webhooks sent, given up on, or dropped",
            )
            self._approval_wait = meter.create_histogram(
                "egress.approval.wait",
                unit="ms",
                description="Time from hold to an approve or deny",
                explicit_bucket_boundaries_advisory=APPROVAL_WAIT_BUCKETS_MS,
            )
            meter.create_observable_gauge(
                "egress.pending",
                callbacks=[self._observe_pending],
                unit="{request}",
                description="Requests currently held for approval",
            )

    # -- counters --------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Log records dropped because the export queue was full (or the sink was shut down)."""
        return self._dropped

    @property
    def exported_ok(self) -> int:
        """Log records the collector accepted."""
        return self._exporter.exported_ok if self._exporter is not None else 0

    @property
    def export_failures(self) -> int:
        """Log records whose export failed (collector down, timed out or refused)."""
        return self._exporter.export_failures if self._exporter is not None else 0

    @property
    def queued(self) -> int:
        """Log records waiting in the export queue."""
        return self._processor.queue_length() if self._processor is not None else 0

    def _record_dropped(self, reason: str = "queue_full") -> None:
        # reason: queue_full (collector slow or unreachable) | shut_down | emit_error
        with self._drop_lock:
            self._dropped += 1
            dropped = self._dropped
        self._warn_dropped(dropped=dropped, reason=reason)

    def _export_failed(self, count: int) -> None:
        self._warn_failed(failed=count, export_failures=self.export_failures)

    # -- pending gauge ---------------------------------------------------------------------

    def set_pending(self, n: int) -> None:
        """Record the number of held requests, reported by the `egress.pending` gauge."""
        self._pending = n

    def watch_pending(self, source: Callable[[], int]) -> None:
        """Read `egress.pending` from `source` at each metric export instead of set_pending."""
        self._pending_source = source

    def _observe_pending(self, _options: CallbackOptions) -> Iterable[Observation]:
        value = self._pending
        if self._pending_source is not None:
            try:
                value = self._pending_source()
            except Exception:  # a broken callback must not stop the other metrics
                return []
        from opentelemetry.metrics import Observation

        return [Observation(value)]

    # -- Sink ------------------------------------------------------------------------------

    def emit(self, event: Event, severity: str, attributes: Attributes) -> None:
        """Queue one log record and update the metrics; returns without touching the network."""
        if self._closed:
            self._record_dropped("shut_down")
            return
        try:
            if self._logger is not None:
                number, text = self._severity.get(severity, self._severity["info"])
                self._logger.emit(
                    timestamp=time.time_ns(),
                    context=self._context_for(_traceparent_of(event)),
                    severity_number=number,
                    severity_text=text,
                    body=event.name,
                    attributes=_otel_attributes(event.name, attributes),
                    event_name=event.name,
                )
            if self._meter_provider is not None:
                self._record_metrics(event)
        except Exception:  # telemetry must never fail a request; the drop is counted and logged
            self._record_dropped("emit_error")

    def _record_metrics(self, event: Event) -> None:
        match event:
            case DecisionEvent():
                self._decisions.add(
                    1,
                    {
                        "egress.decision": event.decision.verdict.value,
                        "egress.reason": event.decision.reason.value,
                    },
                )
            case ApprovalEvent(state="approved" | "denied", wait_ms=int(wait)):
                self._approval_wait.record(
                    wait,
                    {
                        "egress.approval.state": event.state,
                        "egress.approval.reviewer": event.reviewer or "unknown",
                    },
                )
            case NotificationEvent():
                self._notifications.add(
                    1,
                    {
                        "egress.notify.outcome": event.outcome,
                        "egress.notify.event": event.event,
                    },
                )
            case ConnectionCloseEvent():
                labels = self._byte_attributes(event)
                self._bytes.add(event.bytes_sent, {"direction": "sent", **labels})
                self._bytes.add(event.bytes_received, {"direction": "received", **labels})
            case _:
                pass

    def _byte_attributes(self, event: ConnectionCloseEvent) -> dict[str, str]:
        if not self._byte_labels:
            return {}
        values = {"server.address": event.host, "egress.agent.id": event.agent}
        # An anonymous connection has no agent label (as its log record has no agent id).
        return {
            name: bounded(value)
            for name, bounded in self._byte_labels.items()
            if (value := values[name]) is not None
        }

    # -- lifecycle -------------------------------------------------------------------------

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        """Export what is queued now; False if that did not finish within `timeout_s`."""
        return self._bounded(timeout_s, self._flush)

    def shutdown(self, timeout_s: float = 5.0) -> bool:
        """Flush and stop the export threads within `timeout_s`; False if that was not enough.

        When the deadline passes (collector down or hung) the exporters are shut down under
        the SDK's feet, which aborts their retry loops, and what was still queued is lost.
        """
        if self._closed:
            return True
        self._closed = True
        deadline = time.monotonic() + timeout_s
        # Logs and metrics in parallel: each may sit in its own export timeout.
        threads = []
        if self._logger_provider is not None:
            threads.append(_start(self._logger_provider.shutdown))
        if self._meter_provider is not None:
            provider = self._meter_provider
            threads.append(_start(lambda: provider.shutdown(timeout_millis=timeout_s * 1000)))
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if not any(t.is_alive() for t in threads):
            return True
        if self._exporter is not None:
            self._exporter.abort()
        if self._metric_exporter is not None:
            _start(self._metric_exporter.shutdown)
        return False

    def _flush(self) -> None:
        if self._logger_provider is not None:
            self._logger_provider.force_flush()
        if self._meter_provider is not None:
            self._meter_provider.force_flush()

    @staticmethod
    def _bounded(timeout_s: float, work: Callable[[], object]) -> bool:
        # The SDK's flush can block for a whole export timeout per batch; run it on a daemon
        # thread so the caller (the proxy's shutdown path) waits at most `timeout_s`.
        thread = _start(work)
        thread.join(timeout_s)
        return not thread.is_alive()


def _start(work: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=work, name="egress-otel-stop", daemon=True)
    thread.start()
    return thread


# --- configuration from the standard environment -------------------------------------------

_PROTOCOLS: Final = ("grpc", "http/protobuf")


def _get(env: Mapping[str, str], *names: str) -> str | None:
    """First non-empty value among `names` (signal-specific variables first)."""
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def _signal_enabled(env: Mapping[str, str], signal: str) -> bool:
    exporter = (_get(env, f"OTEL_{signal}_EXPORTER") or "").lower()
    if exporter == "none":
        return False
    endpoint = _get(env, f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    return endpoint is not None or "otlp" in exporter.split(",")


def _protocol(env: Mapping[str, str], signal: str) -> str:
    protocol = (
        _get(env, f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )
    if protocol not in _PROTOCOLS:
        raise ValueError(f"unsupported OTLP protocol {protocol!r} (use one of {_PROTOCOLS})")
    return protocol


def _endpoint(env: Mapping[str, str], signal: str, protocol: str) -> str | None:
    """The signal endpoint per the OTLP exporter spec; None lets the exporter use its default."""
    specific = _get(env, f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    if specific is not None:
        return specific
    base = _get(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
    if base is None or protocol == "grpc":
        return base
    # For OTLP/HTTP the generic endpoint is a base URL: append the signal path.
    return f"{base.rstrip('/')}/v1/{signal.lower()}"


def _timeout_s(env: Mapping[str, str], signal: str) -> float:
    # Seconds, as the Python exporters read these variables; a shorter default than their 10 s.
    name = f"OTEL_EXPORTER_OTLP_{signal}_TIMEOUT"
    if _get(env, name) is None:
        name = "OTEL_EXPORTER_OTLP_TIMEOUT"
    return _number(env, name, DEFAULT_EXPORT_TIMEOUT_S)


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


def _log_exporter(env: Mapping[str, str]) -> LogRecordExporter:
    protocol = _protocol(env, "LOGS")
    endpoint, timeout = _endpoint(env, "LOGS", protocol), _timeout_s(env, "LOGS")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

        return OTLPLogExporter(endpoint=endpoint, timeout=timeout)
    from opentelemetry.exporter.otlp.proto.http._log_exporter import (
        OTLPLogExporter as HttpLogExporter,
    )

    return HttpLogExporter(endpoint=endpoint, timeout=timeout)


def _metric_exporter(env: Mapping[str, str]) -> MetricExporter:
    protocol = _protocol(env, "METRICS")
    endpoint, timeout = _endpoint(env, "METRICS", protocol), _timeout_s(env, "METRICS")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(endpoint=endpoint, timeout=timeout)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    return HttpMetricExporter(endpoint=endpoint, timeout=timeout)


def _byte_labels(env: Mapping[str, str]) -> tuple[list[str], int]:
    raw = _get(env, METRICS_LABELS_ENV) or ""
    labels = [item.strip().lower() for item in raw.split(",") if item.strip()]
    unknown = [label for label in labels if label not in BYTE_LABELS]
    if unknown:
        raise ValueError(f"{METRICS_LABELS_ENV}: unknown label {unknown[0]!r} (use host, agent)")
    limit = int(_number(env, METRICS_LABEL_LIMIT_ENV, DEFAULT_METRICS_LABEL_LIMIT))
    return list(dict.fromkeys(labels)), limit


def build_otel_sink(env: Mapping[str, str] | None = None) -> OtelSink | None:
    """An OtelSink configured from the standard `OTEL_*` variables, or None when OTLP is off.

    A signal (logs, metrics) is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or its signal-specific
    `OTEL_EXPORTER_OTLP_{LOGS,METRICS}_ENDPOINT` is set, or `OTEL_{LOGS,METRICS}_EXPORTER`
    names `otlp` (the exporter's default endpoint is then used); `OTEL_*_EXPORTER=none` or
    `OTEL_SDK_DISABLED=true` turns it off. Protocol: `OTEL_EXPORTER_OTLP[_LOGS|_METRICS]_PROTOCOL`
    = `grpc` (default) or `http/protobuf`; anything else raises ValueError. Queue and interval
    come from `OTEL_BLRP_*` and `OTEL_METRIC_EXPORT_*`, the export timeout from
    `OTEL_EXPORTER_OTLP[_LOGS|_METRICS]_TIMEOUT` (seconds, as the Python SDK reads it; default
    5). Headers, TLS and compression are read by the exporters themselves from the process
    environment (`os.environ`), whatever `env` is passed. `EGRESS_WARDEN_METRICS_LABELS=host,agent`
    splits `egress.bytes` by `server.address` and/or `egress.agent.id`, the first
    `EGRESS_WARDEN_METRICS_LABEL_LIMIT` (default 100) distinct values of each, later ones `other`.
    """
    env = os.environ if env is None else env
    if (env.get("OTEL_SDK_DISABLED") or "").strip().lower() == "true":
        return None
    logs_on, metrics_on = _signal_enabled(env, "LOGS"), _signal_enabled(env, "METRICS")
    if not (logs_on or metrics_on):
        return None
    max_queue = int(_number(env, "OTEL_BLRP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE_SIZE))
    byte_labels, label_limit = _byte_labels(env)
    return OtelSink(
        _log_exporter(env) if logs_on else None,
        _metric_exporter(env) if metrics_on else None,
        resource=otel_resource(env),
        max_queue_size=max_queue,
        max_export_batch_size=int(
            _number(env, "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE", DEFAULT_MAX_EXPORT_BATCH_SIZE)
        ),
        schedule_delay_ms=_number(env, "OTEL_BLRP_SCHEDULE_DELAY", DEFAULT_SCHEDULE_DELAY_MS),
        export_timeout_ms=_number(env, "OTEL_BLRP_EXPORT_TIMEOUT", DEFAULT_EXPORT_TIMEOUT_S * 1000),
        metric_export_interval_ms=_number(
            env, "OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_METRIC_EXPORT_INTERVAL_MS
        ),
        metric_export_timeout_ms=_number(
            env, "OTEL_METRIC_EXPORT_TIMEOUT", DEFAULT_METRIC_EXPORT_TIMEOUT_MS
        ),
        byte_labels=byte_labels,
        label_limit=label_limit,
    )
