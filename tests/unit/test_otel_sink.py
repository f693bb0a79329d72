"""OtelSink against real OTLP receivers (gRPC and HTTP/protobuf), through the Telemetry hub."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

import proxy
from proxy.facts import RequestFacts, Transport
from proxy.hosts import canonicalize_host
from proxy.policy.model import Mode
from proxy.telemetry.events import (
    ApprovalEvent,
    ConnectionCloseEvent,
    DecisionEvent,
    NotificationEvent,
    PolicyEvent,
)
from proxy.telemetry.hub import Telemetry
from proxy.telemetry.otel import OtelSink, build_otel_sink, otel_resource, parse_traceparent
from proxy.verdicts import Decision, Reason, Verdict
from tests.support.otlp import Collected, GrpcReceiver, HttpReceiver, closed_port, wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"

Receiver = GrpcReceiver | HttpReceiver


def decision_event(
    traceparent: str | None = TRACEPARENT,
    verdict: Verdict = Verdict.DENY,
    reason: Reason = Reason.DENY_RULE,
    request_id: str = "req-1",
) -> DecisionEvent:
    facts = RequestFacts(
        request_id=request_id,
        raw_host="evil.test",
        host=canonicalize_host("evil.test"),
        port=443,
        transport=Transport.HTTPS_CONNECT,
        method="CONNECT",
        agent="agent-a",
        session="sess-1",
        client_address="127.0.0.1",
        traceparent=traceparent,
    )
    decision = Decision(verdict, reason, "evil.test", "policy.yaml:12", "denied by rule")
    return DecisionEvent(facts, decision, Mode.ENFORCE, ipaddress.ip_address("203.0.113.7"))


APPROVAL = ApprovalEvent(
    state="approved",
    pending_id="p-1",
    host="api.example.test",
    port=443,
    agent="agent-a",
    scope="host",
    grant_for="1h",
    reviewer="human",
    approver="alice@example.test",
    wait_ms=4200,
    traceparent=TRACEPARENT,
)
POLICY = PolicyEvent(state="loaded", files=("policy.yaml", "agents.yaml"))
CLOSE = ConnectionCloseEvent(
    request_id="req-2",
    host="api.example.test",
    port=443,
    bytes_sent=1000,
    bytes_received=25000,
    duration_ms=80,
    transport="https_connect",
    agent="agent-a",
)


def otlp_env(receiver: Receiver | None, protocol: str, **extra: str) -> dict[str, str]:
    endpoint = receiver.endpoint if receiver is not None else f"http://127.0.0.1:{closed_port()}"
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_BLRP_SCHEDULE_DELAY": "50",
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
        **extra,
    }


def make_sink(env: dict[str, str]) -> OtelSink:
    sink = build_otel_sink(env)
    assert sink is not None
    return sink


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request: pytest.FixtureRequest) -> Iterator[tuple[Receiver, str]]:
    r: Receiver = GrpcReceiver() if request.param == "grpc" else HttpReceiver()
    yield r, request.param
    r.close()


@pytest.fixture
def grpc_receiver() -> Iterator[GrpcReceiver]:
    r = GrpcReceiver()
    yield r
    r.close()


def by_name(collected: Collected, name: str) -> list[dict[str, Any]]:
    return [r for r in collected.log_records() if r["event_name"] == name]


def test_events_and_metrics_arrive(receiver: tuple[Receiver, str]) -> None:
    r, protocol = receiver
    sink = make_sink(otlp_env(r, protocol))
    sink.set_pending(3)
    telemetry = Telemetry([sink])
    deny = decision_event()
    for event in (deny, APPROVAL, POLICY, CLOSE):
        telemetry.emit(event)
    try:
        assert wait_for(lambda: len(r.log_records()) >= 4)
        [record] = by_name(r, "egress.decision")
        assert record["attributes"] == {"event.name": "egress.decision", **deny.attributes()}
        assert record["attributes"]["egress.decision"] == "deny"
        assert (record["severity_number"], record["severity_text"]) == (13, "WARN")
        assert (record["trace_id"], record["span_id"], record["flags"]) == (TRACE_ID, SPAN_ID, 1)
        assert record["time_unix_nano"] > 0
        resource = record["resource"]
        assert resource["service.name"] == "egress-warden"
        assert resource["service.version"] == proxy.__version__
        assert resource["service.instance.id"]

        [approval] = by_name(r, "egress.approval")
        assert approval["attributes"]["egress.approval.approver"] == "alice@example.test"
        assert approval["attributes"]["egress.approval.wait_ms"] == 4200
        assert (approval["severity_text"], approval["trace_id"]) == ("INFO", TRACE_ID)
        [policy] = by_name(r, "egress.policy")
        assert policy["attributes"]["egress.policy.files"] == ["policy.yaml", "agents.yaml"]
        assert policy["trace_id"] == ""
        [close] = by_name(r, "egress.connection.close")
        assert close["attributes"]["egress.bytes.received"] == 25000

        wanted = {"egress.decisions", "egress.bytes", "egress.approval.wait", "egress.pending"}
        assert wait_for(lambda: wanted <= r.metric_names()), r.metric_names()
        decisions = r.sum_points("egress.decisions")
        assert ({"egress.decision": "deny", "egress.reason": "deny_rule"}, 1) in decisions
        byte_points = r.sum_points("egress.bytes")
        assert ({"direction": "sent"}, 1000) in byte_points
        assert ({"direction": "received"}, 25000) in byte_points
        assert ({}, 3) in r.sum_points("egress.pending")
        assert any(v == 4200 for _, v in r.sum_points("egress.approval.wait"))
        assert sink.exported_ok >= 4 and sink.dropped == 0
    finally:
        assert sink.shutdown(5)


def test_notification_outcomes_are_records_and_counted(grpc_receiver: GrpcReceiver) -> None:
    sink = make_sink(otlp_env(grpc_receiver, "grpc"))
    telemetry = Telemetry([sink])
    sent = NotificationEvent("sent", "held", "p1", "https://hooks.example", attempts=2, status=200)
    dropped = NotificationEvent("dropped", "held", "p2", "https://hooks.example", error="full")
    telemetry.emit(sent)
    telemetry.emit(dropped)
    try:
        assert wait_for(lambda: len(by_name(grpc_receiver, "egress.notify")) >= 2)
        records = {
            r["attributes"]["egress.notify.outcome"]: r
            for r in by_name(grpc_receiver, "egress.notify")
        }
        assert records["sent"]["severity_text"] == "INFO"
        assert records["sent"]["attributes"]["http.response.status_code"] == 200
        assert records["dropped"]["severity_text"] == "WARN"
        assert wait_for(lambda: "egress.notifications" in grpc_receiver.metric_names())
        points = grpc_receiver.sum_points("egress.notifications")
        assert ({"egress.notify.outcome": "sent", "egress.notify.event": "held"}, 1) in points
        assert ({"egress.notify.outcome": "dropped", "egress.notify.event": "held"}, 1) in points
    finally:
        assert sink.shutdown(5)


@pytest.mark.parametrize(
    "bad",
    [
        f"01-{TRACE_ID}-{SPAN_ID}-01",  # unknown version
        f"00-{TRACE_ID.upper()}-{SPAN_ID}-01",  # upper-case hex
        f"00-{'0' * 32}-{SPAN_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero span id
        f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01",  # short
        f"00-{TRACE_ID}-{SPAN_ID}-01-extra",  # trailing data on version 00
        f"00-{TRACE_ID}-{SPAN_ID}-1g",  # bad flags
        "",
    ],
)
def test_malformed_traceparent_is_rejected(bad: str) -> None:
    assert parse_traceparent(bad) is None


def test_malformed_traceparent_is_ignored_on_the_record(grpc_receiver: GrpcReceiver) -> None:
    assert parse_traceparent(TRACEPARENT) == (int(TRACE_ID, 16), int(SPAN_ID, 16), 1)
    sink = make_sink(otlp_env(grpc_receiver, "grpc"))
    Telemetry([sink]).emit(decision_event(traceparent=f"00-{TRACE_ID}-{'0' * 16}-01"))
    try:
        assert wait_for(lambda: len(grpc_receiver.log_records()) == 1)
        [record] = grpc_receiver.log_records()
        assert (record["trace_id"], record["span_id"]) == ("", "")
        assert record["attributes"]["egress.request_id"] == "req-1"
    finally:
        sink.shutdown(5)


def test_export_failures_are_counted(grpc_receiver: GrpcReceiver) -> None:
    grpc_receiver.mode = "fail"
    sink = make_sink(otlp_env(grpc_receiver, "grpc", OTEL_METRICS_EXPORTER="none"))
    telemetry = Telemetry([sink])
    for i in range(10):
        telemetry.emit(decision_event(request_id=f"r{i}"))
    try:
        assert wait_for(lambda: sink.export_failures == 10)
        assert sink.exported_ok == 0
    finally:
        sink.shutdown(2)


def emit_many(sink: OtelSink, n: int = 5000) -> tuple[float, float]:
    """Emit `n` decisions; return (total seconds, slowest single emit)."""
    telemetry = Telemetry([sink])
    events = [decision_event(request_id=f"r{i}") for i in range(n)]
    slowest = 0.0
    start = time.perf_counter()
    for event in events:
        t0 = time.perf_counter()
        telemetry.emit(event)
        slowest = max(slowest, time.perf_counter() - t0)
    return time.perf_counter() - start, slowest


def test_collector_down_or_hanging_never_blocks(grpc_receiver: GrpcReceiver) -> None:
    # A small queue so the hanging case overflows; a 1 s export timeout, so an emit that
    # waited on the network would take at least that long.
    small = {"OTEL_BLRP_MAX_QUEUE_SIZE": "64", "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE": "32"}
    env = otlp_env(grpc_receiver, "grpc", OTEL_EXPORTER_OTLP_TIMEOUT="1", **small)

    up = make_sink(env)
    up_time, _ = emit_many(up)
    up.shutdown(2)

    down = make_sink(otlp_env(None, "grpc", OTEL_EXPORTER_OTLP_TIMEOUT="1", **small))
    down_time, down_slowest = emit_many(down)
    started = time.perf_counter()
    down.shutdown(0.5)
    assert time.perf_counter() - started < 1.5  # shutdown is bounded too

    grpc_receiver.mode = "hang"
    hang = make_sink(env)
    with capture_logs() as logs:
        hang_time, hang_slowest = emit_many(hang)
    started = time.perf_counter()
    hang.shutdown(0.5)
    assert time.perf_counter() - started < 1.5

    for elapsed, slowest in ((down_time, down_slowest), (hang_time, hang_slowest)):
        assert elapsed < 3 * up_time + 0.5, (up_time, down_time, hang_time)
        assert slowest < 0.5, slowest
    assert hang.dropped > 4000
    warnings = [e for e in logs if e["event"] == "egress.telemetry.dropped"]
    assert len(warnings) == 1, "drop warnings are rate-limited"
    assert (warnings[0]["log_level"], warnings[0]["reason"]) == ("warning", "queue_full")
    # After shutdown emit is a no-op that counts the record as dropped.
    before = hang.dropped
    Telemetry([hang]).emit(POLICY)
    assert hang.dropped == before + 1


def test_build_otel_sink_configuration() -> None:
    assert build_otel_sink({}) is None
    assert build_otel_sink({"OTEL_TRACES_EXPORTER": "otlp"}) is None
    disabled = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_SDK_DISABLED": "true"}
    assert build_otel_sink(disabled) is None
    off = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
    }
    assert build_otel_sink(off) is None
    with pytest.raises(ValueError, match="http/json"):
        build_otel_sink(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:1",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            }
        )
    only_logs = build_otel_sink(
        {"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://127.0.0.1:1", "OTEL_METRICS_EXPORTER": "none"}
    )
    assert only_logs is not None
    only_logs.emit(CLOSE, "info", CLOSE.attributes())  # no metrics pipeline: still fine
    started = time.perf_counter()
    assert not only_logs.shutdown(0.3)  # nothing listens: cannot flush, gives up in time
    assert time.perf_counter() - started < 1


def test_resource_follows_standard_overrides() -> None:
    default = otel_resource({}).attributes
    assert default["service.name"] == "egress-warden"
    assert default["service.version"] == proxy.__version__
    assert default["service.instance.id"] != otel_resource({}).attributes["service.instance.id"]
    custom = otel_resource(
        {
            "OTEL_SERVICE_NAME": "warden-ci",
            "OTEL_RESOURCE_ATTRIBUTES": (
                "service.instance.id=box-7,deployment.environment=ci%2Fprod"
            ),
        }
    ).attributes
    assert custom["service.name"] == "warden-ci"
    assert custom["service.instance.id"] == "box-7"
    assert custom["deployment.environment"] == "ci/prod"
