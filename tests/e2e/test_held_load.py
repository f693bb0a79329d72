"""Many held requests at once: 500 across 50 destinations, released by 50 approvals, while
allowed traffic keeps flowing."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ALLOWED_IP, Upstreams, ask_policy, resolve_args
from tests.support.control import TOKEN, TOKEN_ENV
from tests.support.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

DESTINATIONS = [f"d{i}.load.test" for i in range(50)]
PER_DESTINATION = 10


@pytest.fixture(scope="module")
def load_proxy(
    upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("load")
    policy = ask_policy(tmp / "policy.yaml", upstreams, "{wait: 60s, max_pending: 100}")
    extra = resolve_args()
    for name in DESTINATIONS:
        extra += ["--resolve", f"{name}:{ALLOWED_IP}"]
    proc = start_proxy(tmp / "state", [policy], *extra, env=TOKEN_ENV)
    yield proc
    proc.stop()


async def _latencies(client: httpx.AsyncClient, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        response = await client.get(url)
        assert response.status_code == 200
        out.append(time.perf_counter() - start)
    return out


async def _scenario(proxy: ProxyProcess, upstreams: Upstreams) -> dict[str, float]:
    allowed_url = f"http://allowed.test:{upstreams.http.port}/fast"
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
    async with (
        httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=90, limits=limits) as held,
        httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=30) as fast,
        httpx.AsyncClient(
            base_url=proxy.control_url,
            trust_env=False,
            timeout=30,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as api,
    ):
        baseline = await _latencies(fast, allowed_url, 30)
        tasks = [
            asyncio.create_task(held.get(f"http://{name}:{upstreams.http.port}/held/{i}"))
            for name in DESTINATIONS
            for i in range(PER_DESTINATION)
        ]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pending = (await api.get("/v1/pending")).json()
            if sum(item["waiting"] for item in pending) >= len(tasks):
                break
            await asyncio.sleep(0.2)
        assert len(pending) == len(DESTINATIONS)
        assert sum(item["waiting"] for item in pending) == len(tasks)
        during = await _latencies(fast, allowed_url, 30)
        released = 0
        for item in pending:
            answer = (
                await api.post(f"/v1/pending/{item['id']}/approve", json={"scope": "once"})
            ).json()
            released += answer["released"]
        responses = await asyncio.gather(*tasks)
    assert released == len(tasks)
    assert all(r.status_code == 200 for r in responses)
    return {
        "baseline_p50_ms": statistics.median(baseline) * 1000,
        "during_p50_ms": statistics.median(during) * 1000,
        "during_max_ms": max(during) * 1000,
    }


def test_500_held_requests_released_by_50_approvals_while_allowed_traffic_flows(
    load_proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    figures = asyncio.run(_scenario(load_proxy, upstreams))
    print(
        f"\nallowed-request latency: baseline p50 {figures['baseline_p50_ms']:.2f} ms, "
        f"with 500 held p50 {figures['during_p50_ms']:.2f} ms "
        f"(max {figures['during_max_ms']:.2f} ms)"
    )
    # Generous bound: holding must not stall the loop (a stall would cost seconds, not ms).
    assert figures["during_p50_ms"] < max(5 * figures["baseline_p50_ms"], 50)
