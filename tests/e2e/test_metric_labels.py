"""The real proxy exports `egress.bytes` split by destination host when asked
(`EGRESS_WARDEN_METRICS_LABELS=host`), bounded by `EGRESS_WARDEN_METRICS_LABEL_LIMIT`: a real
OTLP/gRPC receiver sees the first host under its own name and later hosts as `other`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Upstreams, resolve_args, write_policy
from tests.support.control import TOKEN_ENV
from tests.support.otlp import GrpcReceiver, wait_for
from tests.support.proxy import start_proxy

pytestmark = pytest.mark.e2e


@pytest.fixture
def receiver() -> Iterator[GrpcReceiver]:
    r = GrpcReceiver()
    yield r
    r.close()


def test_bytes_by_host_first_n_then_other(
    upstreams: Upstreams, receiver: GrpcReceiver, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.yaml", upstreams)
    env = {
        **TOKEN_ENV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "EGRESS_WARDEN_METRICS_LABELS": "host",
        "EGRESS_WARDEN_METRICS_LABEL_LIMIT": "1",
    }
    proc = start_proxy(tmp_path / "state", [policy], *resolve_args(), env=env)
    try:
        received: dict[str, int] = {"allowed.test": 0, "other": 0}
        with httpx.Client(proxy=proc.url, trust_env=False, timeout=30) as client:
            for host, label in (
                ("allowed.test", "allowed.test"),
                ("api.allowed.test", "other"),
                ("allowed.test", "allowed.test"),
            ):
                response = client.get(f"http://{host}:{upstreams.http.port}/m-{host}")
                assert response.status_code == 200
                received[label] += len(response.content)

        def totals() -> dict[str, float]:
            last: dict[str, float] = {}
            for attrs, value in receiver.sum_points("egress.bytes"):
                if attrs.get("direction") == "received":
                    last[attrs.get("server.address", "-")] = value  # cumulative: last wins
            return last

        assert wait_for(lambda: totals() == received, 15), (totals(), received)
    finally:
        proc.stop()
