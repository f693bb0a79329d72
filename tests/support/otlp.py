"""Real OTLP receivers for tests: a gRPC server on the official service stubs and an HTTP one.

Both collect the decoded `Export*ServiceRequest`s and can be switched to hang (hold each export
until released) or fail (refuse it), to show the exporter never stalls the proxy.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import grpc  # type: ignore[import-untyped]
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

Mode = Literal["ok", "hang", "fail"]


@dataclass
class Collected:
    """What a receiver got, shared by both transports."""

    logs: list[logs_service_pb2.ExportLogsServiceRequest] = field(default_factory=list)
    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)
    mode: Mode = "ok"
    hang_s: float = 30.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)

    def gate(self) -> bool:
        """Apply the mode; True when the request should be accepted."""
        if self.mode == "hang":
            self.release.wait(self.hang_s)
            return False
        return self.mode == "ok"

    def add_logs(self, request: logs_service_pb2.ExportLogsServiceRequest) -> None:
        with self.lock:
            self.logs.append(request)

    def add_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self.lock:
            self.metrics.append(request)

    def log_records(self) -> list[dict[str, Any]]:
        with self.lock:
            return flatten_logs(self.logs)

    def metric_names(self) -> set[str]:
        with self.lock:
            return metric_names(self.metrics)

    def sum_points(self, name: str) -> list[tuple[dict[str, Any], float]]:
        with self.lock:
            return sum_points(self.metrics, name)


# --- gRPC ----------------------------------------------------------------------------------


class _LogsServicer(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, collected: Collected) -> None:
        self._c = collected

    def Export(
        self, request: logs_service_pb2.ExportLogsServiceRequest, context: grpc.ServicerContext
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        if not self._c.gate():
            # PERMISSION_DENIED is not retryable: a "fail" receiver fails each export at once.
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused by test receiver")
        self._c.add_logs(request)
        return logs_service_pb2.ExportLogsServiceResponse()


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, collected: Collected) -> None:
        self._c = collected

    def Export(
        self,
        request: metrics_service_pb2.ExportMetricsServiceRequest,
        context: grpc.ServicerContext,
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        if not self._c.gate():
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused by test receiver")
        self._c.add_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class GrpcReceiver(Collected):
    """An OTLP/gRPC collector on 127.0.0.1, port chosen by the OS."""

    def __init__(self) -> None:
        super().__init__()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        # The generated *_pb2_grpc modules are untyped.
        add_logs = logs_service_pb2_grpc.add_LogsServiceServicer_to_server
        add_metrics = metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server
        add_logs(_LogsServicer(self), self.server)  # type: ignore[no-untyped-call]
        add_metrics(_MetricsServicer(self), self.server)  # type: ignore[no-untyped-call]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.release.set()
        self.server.stop(grace=0).wait(5)


# --- HTTP/protobuf -------------------------------------------------------------------------


def _decode_body(body: bytes, encoding: str | None) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


class HttpReceiver(Collected):
    """An OTLP/HTTP collector (`POST /v1/logs`, `/v1/metrics`, protobuf bodies) on 127.0.0.1."""

    def __init__(self) -> None:
        super().__init__()
        collected = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                body = _decode_body(body, self.headers.get("Content-Encoding"))
                reply: bytes
                if self.path == "/v1/logs":
                    logs = logs_service_pb2.ExportLogsServiceRequest.FromString(body)
                    add: Callable[[], None] = lambda: collected.add_logs(logs)  # noqa: E731
                    reply = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    metrics = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                    add = lambda: collected.add_metrics(metrics)  # noqa: E731
                    reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                else:
                    self._send(404, b"")
                    return
                if not collected.gate():
                    # 400 is not retryable for the OTLP/HTTP exporter: fails at once.
                    self._send(400, b"")
                    return
                add()
                self._send(200, reply)

            def _send(self, status: int, payload: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/x-protobuf")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up (timeout) while we hung

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# --- helpers -------------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def any_value(value: AnyValue) -> Any:
    """Decode an OTLP AnyValue into plain Python."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return key_values(value.kvlist_value.values)
    return getattr(value, kind)


def key_values(items: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in items}


def flatten_logs(
    requests: Iterable[logs_service_pb2.ExportLogsServiceRequest],
) -> list[dict[str, Any]]:
    """Every received log record as a simple dict, in arrival order."""
    out: list[dict[str, Any]] = []
    for request in requests:
        for resource_logs in request.resource_logs:
            resource = key_values(resource_logs.resource.attributes)
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    out.append(
                        {
                            "event_name": record.event_name,
                            "severity_number": record.severity_number,
                            "severity_text": record.severity_text,
                            "body": any_value(record.body),
                            "attributes": key_values(record.attributes),
                            "resource": resource,
                            "scope": scope_logs.scope.name,
                            "trace_id": record.trace_id.hex(),
                            "span_id": record.span_id.hex(),
                            "flags": record.flags,
                            "time_unix_nano": record.time_unix_nano,
                        }
                    )
    return out


def metric_names(requests: Iterable[metrics_service_pb2.ExportMetricsServiceRequest]) -> set[str]:
    return {
        metric.name
        for request in requests
        for resource_metrics in request.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
    }


def sum_points(
    requests: Iterable[metrics_service_pb2.ExportMetricsServiceRequest], name: str
) -> list[tuple[dict[str, Any], float]]:
    """(attributes, value) of every Sum/Gauge point of metric `name`, histograms as their sum."""
    points: list[tuple[dict[str, Any], float]] = []
    for request in requests:
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name != name:
                        continue
                    kind = metric.WhichOneof("data")
                    if kind == "histogram":
                        for hp in metric.histogram.data_points:
                            points.append((key_values(hp.attributes), hp.sum))
                        continue
                    data = metric.sum if kind == "sum" else metric.gauge
                    for p in data.data_points:
                        value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                        points.append((key_values(p.attributes), value))
    return points


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
