"""`egress.bytes` split by host and agent for capacity planning: opt-in, and bounded (the first
N distinct values keep their label, the rest are `other`), exported to a real OTLP receiver."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import pytest

from proxy.telemetry.events import ConnectionCloseEvent
from proxy.telemetry.otel import BoundedLabel, OtelSink, build_otel_sink
from tests.support.otlp import GrpcReceiver, wait_for


def _close(host: str, agent: str | None, sent: int, received: int) -> ConnectionCloseEvent:
    return ConnectionCloseEvent(
        request_id=f"r-{host}-{agent}",
        host=host,
        port=443,
        bytes_sent=sent,
        bytes_received=received,
        duration_ms=5,
        transport="https_connect",
        agent=agent,
    )


@pytest.fixture
def receiver() -> Iterator[GrpcReceiver]:
    r = GrpcReceiver()
    yield r
    r.close()


def _sink(receiver: GrpcReceiver, **extra: str) -> OtelSink:
    sink = build_otel_sink(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_METRIC_EXPORT_INTERVAL": "100",
            **extra,
        }
    )
    assert sink is not None
    return sink


def _totals(receiver: GrpcReceiver) -> dict[tuple[tuple[str, str], ...], float]:
    # Cumulative sums: the last exported point of each series is its total.
    last: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
    for attrs, value in receiver.sum_points("egress.bytes"):
        last[tuple(sorted(attrs.items()))] = value
    return dict(last)


def test_bounded_label_keeps_first_n_values_then_other() -> None:
    label = BoundedLabel(2)
    assert [label(v) for v in ("a", "b", "c", "a", "d", "b")] == [
        "a",
        "b",
        "other",
        "a",
        "other",
        "b",
    ]


def test_bytes_split_by_host_and_agent_with_overflow_as_other(receiver: GrpcReceiver) -> None:
    sink = _sink(
        receiver,
        EGRESS_WARDEN_METRICS_LABELS="host,agent",
        EGRESS_WARDEN_METRICS_LABEL_LIMIT="2",
    )
    try:
        for event in (
            _close("a.test", "ci", 10, 100),
            _close("b.test", "dev", 20, 200),
            _close("c.test", "ci", 30, 300),  # third host: other
            _close("a.test", "bot", 40, 400),  # third agent: other
            _close("d.test", None, 50, 500),  # anonymous: no agent label
        ):
            sink.emit(event, "info", event.attributes())
        sink.force_flush()

        def series() -> dict[tuple[tuple[str, str], ...], float]:
            return {k: v for k, v in _totals(receiver).items() if ("direction", "sent") in k}

        want = {
            (("direction", "sent"), ("egress.agent.id", "ci"), ("server.address", "a.test")): 10,
            (("direction", "sent"), ("egress.agent.id", "dev"), ("server.address", "b.test")): 20,
            (("direction", "sent"), ("egress.agent.id", "ci"), ("server.address", "other")): 30,
            (("direction", "sent"), ("egress.agent.id", "other"), ("server.address", "a.test")): 40,
            (("direction", "sent"), ("server.address", "other")): 50,
        }
        assert wait_for(lambda: series() == want, 10), series()
        received = {k: v for k, v in _totals(receiver).items() if ("direction", "received") in k}
        assert sum(received.values()) == 1500
    finally:
        assert sink.shutdown(5)


def test_bytes_carry_only_direction_by_default(receiver: GrpcReceiver) -> None:
    sink = _sink(receiver)
    try:
        event = _close("a.test", "ci", 7, 70)
        sink.emit(event, "info", event.attributes())
        sink.force_flush()
        assert wait_for(lambda: bool(_totals(receiver)), 10)
        assert set(_totals(receiver)) == {(("direction", "received"),), (("direction", "sent"),)}
    finally:
        assert sink.shutdown(5)


def test_unknown_label_is_a_configuration_error(receiver: GrpcReceiver) -> None:
    with pytest.raises(ValueError, match="unknown label 'path'"):
        _sink(receiver, EGRESS_WARDEN_METRICS_LABELS="host,path")
