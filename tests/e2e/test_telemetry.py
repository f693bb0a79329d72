"""OpenTelemetry export from the real proxy to real OTLP receivers (gRPC and HTTP/protobuf)."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ALLOWED_IP, Upstreams, resolve_args, write_policy
from tests.support.clients import curl
from tests.support.control import TOKEN_ENV, api, approve, wait_pending
from tests.support.otlp import Collected, GrpcReceiver, HttpReceiver, closed_port, wait_for
from tests.support.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"
NAMES = ["t-approve.test", "t-expire.test"]


def _policy_text(upstreams: Upstreams) -> str:
    ports = sorted({80, 443, upstreams.http.port, upstreams.https.port})
    return f"""\
version: 1
default: ask
allow:
  - allowed.test
  - {ALLOWED_IP}/32
deny:
  - evil.test
network:
  ports: {ports}
approval:
  wait: 4s
  pending_ttl: 5s
"""


def _otel_env(endpoint: str, protocol: str, **extra: str) -> dict[str, str]:
    return {
        **TOKEN_ENV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_BLRP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
        **extra,
    }


def _start(upstreams: Upstreams, tmp: Path, env: dict[str, str]) -> tuple[ProxyProcess, Path]:
    policy = write_policy(tmp / "policy.yaml", upstreams, body=_policy_text(upstreams))
    extra = resolve_args()
    for name in NAMES:
        extra += ["--resolve", f"{name}:{ALLOWED_IP}"]
    return start_proxy(tmp / "state", [policy], *extra, env=env), policy


@pytest.fixture(scope="module")
def grpc_receiver() -> Iterator[GrpcReceiver]:
    receiver = GrpcReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def otel_proxy(
    upstreams: Upstreams, grpc_receiver: GrpcReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path]]:
    proc, policy = _start(
        upstreams, tmp_path_factory.mktemp("otel"), _otel_env(grpc_receiver.endpoint, "grpc")
    )
    yield proc, policy
    proc.stop()


def _records(receiver: Collected, event: str, **attrs: Any) -> list[dict[str, Any]]:
    return [
        r
        for r in receiver.log_records()
        if r["event_name"] == event and all(r["attributes"].get(k) == v for k, v in attrs.items())
    ]


def _one(receiver: Collected, event: str, timeout: float = 15, **attrs: Any) -> dict[str, Any]:
    assert wait_for(lambda: bool(_records(receiver, event, **attrs)), timeout), (
        event,
        attrs,
        [r["event_name"] for r in receiver.log_records()][-20:],
    )
    return _records(receiver, event, **attrs)[-1]


def _proxied(proxy: ProxyProcess, url: str, **kw: Any) -> httpx.Response:
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as client:
        return client.get(url, **kw)


def test_allowed_connect_is_exported_with_trace_ids_and_resource(
    otel_proxy: tuple[ProxyProcess, Path],
    grpc_receiver: GrpcReceiver,
    upstreams: Upstreams,
    ca_file: Path,
) -> None:
    proxy, _ = otel_proxy
    result = curl(
        "-x",
        proxy.url,
        "--cacert",
        str(ca_file),
        "--proxy-header",
        f"traceparent: {TRACEPARENT}",
        f"https://allowed.test:{upstreams.https.port}/t",
    )
    assert result.returncode == 0, result.stderr
    record = _one(
        grpc_receiver,
        "egress.decision",
        **{"egress.decision": "allow", "network.transport.protocol": "https_connect"},
    )
    attrs = record["attributes"]
    assert attrs["server.address"] == "allowed.test"
    assert attrs["server.port"] == upstreams.https.port
    assert attrs["egress.rule"] == "allowed.test"
    assert attrs["egress.rule.source"].endswith("policy.yaml:4")
    assert attrs["network.peer.address"] == ALLOWED_IP
    assert attrs["egress.mode"] == "enforce"
    assert record["severity_text"] == "INFO"
    assert (record["trace_id"], record["span_id"]) == (TRACE_ID, SPAN_ID)
    resource = record["resource"]
    assert resource["service.name"] == "egress-warden"
    assert resource["service.instance.id"]
    assert resource["service.version"]
    assert resource["deployment.environment"] == "test"
    close = _one(
        grpc_receiver,
        "egress.connection.close",
        **{"egress.request_id": attrs["egress.request_id"]},
    )
    assert close["attributes"]["egress.bytes.received"] > 0
    assert close["attributes"]["egress.bytes.sent"] > 0


def test_denied_plain_http_is_exported_as_warn(
    otel_proxy: tuple[ProxyProcess, Path], grpc_receiver: GrpcReceiver, upstreams: Upstreams
) -> None:
    proxy, _ = otel_proxy
    response = _proxied(
        proxy,
        f"http://evil.test:{upstreams.http.port}/x/y?q=1",
        headers={"traceparent": TRACEPARENT},
    )
    assert response.status_code == 403
    record = _one(
        grpc_receiver,
        "egress.decision",
        **{"egress.decision": "deny", "server.address": "evil.test"},
    )
    attrs = record["attributes"]
    assert attrs["egress.reason"] == "deny_rule"
    assert attrs["egress.rule"] == "evil.test"
    assert attrs["url.path"] == "/x/y"
    assert attrs["http.request.method"] == "GET"
    assert attrs["client.address"] == "127.0.0.1"
    assert record["severity_text"] == "WARN"
    assert record["trace_id"] == TRACE_ID


def test_hold_then_approve_is_exported(
    otel_proxy: tuple[ProxyProcess, Path], grpc_receiver: GrpcReceiver, upstreams: Upstreams
) -> None:
    proxy, _ = otel_proxy
    url = f"http://t-approve.test:{upstreams.http.port}/held"
    out: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: out.append(_proxied(proxy, url)), daemon=True)
    thread.start()
    item = wait_pending(proxy, "t-approve.test")
    approve(proxy, item["id"], scope="session")
    thread.join(30)
    assert out[0].status_code == 200
    hold = _one(
        grpc_receiver,
        "egress.decision",
        **{"egress.decision": "hold", "server.address": "t-approve.test"},
    )
    assert hold["attributes"]["egress.approval.id"] == item["id"]
    requested = _one(
        grpc_receiver,
        "egress.approval",
        **{"egress.approval.id": item["id"], "egress.approval.state": "requested"},
    )
    assert requested["attributes"]["server.address"] == "t-approve.test"
    approved = _one(
        grpc_receiver,
        "egress.approval",
        **{"egress.approval.id": item["id"], "egress.approval.state": "approved"},
    )
    attrs = approved["attributes"]
    assert attrs["egress.approval.scope"] == "session"
    assert attrs["egress.approval.reviewer"] == "human"
    assert attrs["egress.approval.approver"] == "admin"
    assert attrs["egress.approval.wait_ms"] >= 0
    final = _one(
        grpc_receiver,
        "egress.decision",
        **{"egress.decision": "allow", "server.address": "t-approve.test"},
    )
    assert final["attributes"]["egress.reason"] == "approved"
    assert wait_for(lambda: "egress.decisions" in grpc_receiver.metric_names(), 10)
    assert wait_for(lambda: "egress.approval.wait" in grpc_receiver.metric_names(), 10)


def test_hold_then_expire_is_exported(
    otel_proxy: tuple[ProxyProcess, Path], grpc_receiver: GrpcReceiver, upstreams: Upstreams
) -> None:
    proxy, _ = otel_proxy
    response = _proxied(proxy, f"http://t-expire.test:{upstreams.http.port}/late")
    assert response.headers["x-egress-warden-reason"] == "approval_pending"
    pending_id = response.headers["x-egress-warden-pending-id"]
    timeout = _one(
        grpc_receiver,
        "egress.decision",
        **{"egress.decision": "deny", "server.address": "t-expire.test"},
    )
    assert timeout["attributes"]["egress.reason"] == "approval_pending"
    expired = _one(
        grpc_receiver,
        "egress.approval",
        timeout=20,
        **{"egress.approval.id": pending_id, "egress.approval.state": "expired"},
    )
    assert expired["severity_text"] == "WARN"
    with api(proxy) as client:
        assert all(i["id"] != pending_id for i in client.get("/v1/pending").json())


def test_rejected_policy_reload_is_exported(
    otel_proxy: tuple[ProxyProcess, Path], grpc_receiver: GrpcReceiver
) -> None:
    proxy, policy = otel_proxy
    good = policy.read_text()
    policy.write_text(good + "bogus_key: 1\n")
    try:
        with api(proxy) as client:
            answer = client.post("/v1/policy/reload")
        assert answer.status_code == 422
        assert "bogus_key" in answer.json()["detail"]
        record = _one(grpc_receiver, "egress.policy", **{"egress.policy.state": "rejected"})
        assert record["severity_text"] == "ERROR"
        assert "bogus_key" in record["attributes"]["error.message"]
    finally:
        policy.write_text(good)


def test_http_protobuf_export(upstreams: Upstreams, tmp_path: Path) -> None:
    receiver = HttpReceiver()
    proxy, _ = _start(upstreams, tmp_path, _otel_env(receiver.endpoint, "http/protobuf"))
    try:
        assert _proxied(proxy, f"http://evil.test:{upstreams.http.port}/").status_code == 403
        record = _one(receiver, "egress.decision", **{"egress.decision": "deny"})
        assert record["resource"]["service.name"] == "egress-warden"
    finally:
        proxy.stop()
        receiver.close()


def _p50_ms(proxy: ProxyProcess, url: str, n: int = 60) -> float:
    samples = []
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as client:
        for _ in range(n):
            start = time.perf_counter()
            assert client.get(url).status_code == 200
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def test_collector_down_or_hanging_does_not_slow_the_proxy(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    url = f"http://allowed.test:{upstreams.http.port}/latency"
    up = GrpcReceiver()
    hanging = GrpcReceiver()
    hanging.mode = "hang"
    figures: dict[str, float] = {}
    small_queue = {"OTEL_BLRP_MAX_QUEUE_SIZE": "8", "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE": "4"}
    try:
        for label, endpoint in (
            ("up", up.endpoint),
            ("down", f"http://127.0.0.1:{closed_port()}"),
            ("hanging", hanging.endpoint),
        ):
            (tmp_path / label).mkdir()
            proxy, _ = _start(
                upstreams, tmp_path / label, _otel_env(endpoint, "grpc", **small_queue)
            )
            try:
                _p50_ms(proxy, url, 10)  # warm up
                figures[label] = _p50_ms(proxy, url)
                if label == "hanging":
                    dropped = wait_for(
                        lambda p=proxy: any(  # type: ignore[misc]
                            line.get("event") == "egress.telemetry.dropped" for line in p.lines
                        ),
                        15,
                    )
                    assert dropped, proxy.raw[-10:]
            finally:
                proxy.stop()
    finally:
        up.close()
        hanging.close()
    print(f"\nallowed p50 ms by collector state: {figures}")
    assert figures["down"] < 3 * figures["up"] + 5
    assert figures["hanging"] < 3 * figures["up"] + 5


def test_policy_telemetry_section_configures_export(upstreams: Upstreams, tmp_path: Path) -> None:
    receiver = GrpcReceiver()
    body = _policy_text(upstreams) + (
        f"telemetry:\n  endpoint: {receiver.endpoint}\n  protocol: grpc\n"
        "  service_name: warden-from-config\n  resource_attributes: {team: platform}\n"
    )
    policy = write_policy(tmp_path / "policy.yaml", upstreams, body=body)
    proxy = start_proxy(tmp_path / "state", [policy], *resolve_args(), env=TOKEN_ENV)
    try:
        assert _proxied(proxy, f"http://evil.test:{upstreams.http.port}/").status_code == 403
        record = _one(receiver, "egress.decision", **{"egress.decision": "deny"})
        assert record["resource"]["service.name"] == "warden-from-config"
        assert record["resource"]["team"] == "platform"
    finally:
        proxy.stop()
        receiver.close()
