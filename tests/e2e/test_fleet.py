"""Fleet mode: several replicas sharing one real PostgreSQL (started by the fixture)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ALLOWED_IP, Upstreams, ask_policy, resolve_args
from tests.support.control import TOKEN_ENV, api, approve, wait_pending
from tests.support.postgres import PostgresServer, start_postgres
from tests.support.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

NAMES = [f"f{i}.fleet.test" for i in range(8)]


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with start_postgres() as server:
        yield server


def _replica(
    upstreams: Upstreams, tmp: Path, name: str, dsn: str, wait: str = "20s"
) -> ProxyProcess:
    approval = f"{{wait: {wait}, pending_ttl: 1h}}"
    policy = ask_policy(tmp / f"policy-{name}.yaml", upstreams, approval, deny=["evil.test"])
    extra = resolve_args()
    for host in NAMES:
        extra += ["--resolve", f"{host}:{ALLOWED_IP}"]
    return start_proxy(tmp / f"state-{name}", [policy], *extra, "--store", dsn, env=TOKEN_ENV)


@pytest.fixture
def fleet(
    pg: PostgresServer, upstreams: Upstreams, tmp_path: Path
) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    dsn = pg.create_database()
    a = _replica(upstreams, tmp_path, "a", dsn)
    b = _replica(upstreams, tmp_path, "b", dsn)
    yield a, b
    for proc in (a, b):
        proc.stop()


def _get(proxy: ProxyProcess, url: str) -> httpx.Response:
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=40) as client:
        return client.get(url)


def _background(proxy: ProxyProcess, url: str) -> tuple[threading.Thread, list[httpx.Response]]:
    out: list[httpx.Response] = []

    def run() -> None:
        # a replica killed under the request leaves nothing to collect
        with contextlib.suppress(httpx.HTTPError):
            out.append(_get(proxy, url))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_held_request_on_a_is_released_by_approval_on_b(
    fleet: tuple[ProxyProcess, ProxyProcess], upstreams: Upstreams
) -> None:
    a, b = fleet
    url = f"http://{NAMES[0]}:{upstreams.http.port}/cross"
    thread_a, out_a = _background(a, url)
    wait_pending(a, NAMES[0])
    thread_b, out_b = _background(b, url)
    item = wait_pending(b, NAMES[0])
    with api(b) as client:
        items = [i for i in client.get("/v1/pending").json() if i["host"] == NAMES[0]]
    assert len(items) == 1 and items[0]["count"] == 2  # both replicas joined one item
    start = time.monotonic()
    approve(b, item["id"])
    thread_a.join(10)
    thread_b.join(10)
    assert out_a and out_a[0].status_code == 200
    assert out_b and out_b[0].status_code == 200
    assert time.monotonic() - start < 2.0


def test_always_grant_made_on_a_applies_on_b(
    fleet: tuple[ProxyProcess, ProxyProcess], upstreams: Upstreams
) -> None:
    a, b = fleet
    url = f"http://{NAMES[1]}:{upstreams.http.port}/grant"
    thread, out = _background(a, url)
    item = wait_pending(a, NAMES[1])
    approve(a, item["id"], scope="always", grant_for="all")
    thread.join(10)
    assert out[0].status_code == 200
    deadline = time.monotonic() + 5
    while _get(b, url).status_code != 200:
        assert time.monotonic() < deadline, "grant made on A never applied on B"
        time.sleep(0.2)
    with api(b) as client:
        assert any(g["pattern"].startswith(NAMES[1]) for g in client.get("/v1/grants").json())


def test_kill_9_of_a_loses_no_pending_item(
    fleet: tuple[ProxyProcess, ProxyProcess], upstreams: Upstreams
) -> None:
    a, b = fleet
    _background(a, f"http://{NAMES[2]}:{upstreams.http.port}/killed")
    item = wait_pending(a, NAMES[2])
    a.process.send_signal(signal.SIGKILL)
    a.process.wait(10)
    with api(b) as client:
        assert any(i["id"] == item["id"] for i in client.get("/v1/pending").json())
    approve(b, item["id"])  # scope once, nobody waiting: the retry passes, on either replica
    assert _get(b, f"http://{NAMES[2]}:{upstreams.http.port}/retry").status_code == 200


def test_database_outage_keeps_enforcing_and_recovers(
    pg: PostgresServer, upstreams: Upstreams, tmp_path: Path
) -> None:
    dsn = pg.create_database()
    proxy = _replica(upstreams, tmp_path, "solo", dsn, wait="2s")
    try:
        pg.stop()
        try:
            assert _get(proxy, f"http://allowed.test:{upstreams.http.port}/ok").status_code == 200
            assert _get(proxy, f"http://evil.test:{upstreams.http.port}/").status_code == 403
            miss = _get(proxy, f"http://{NAMES[3]}:{upstreams.http.port}/")
            assert miss.status_code == 403
            assert miss.headers["x-egress-warden-reason"] == "approval_unavailable"
        finally:
            pg.start()
        deadline = time.monotonic() + 30
        while True:
            response = _get(proxy, f"http://{NAMES[4]}:{upstreams.http.port}/back")
            if response.headers.get("x-egress-warden-reason") == "approval_pending":
                break  # held again (and timed out after 2 s): the queue works again
            assert time.monotonic() < deadline, response.headers
            time.sleep(0.5)
        with api(proxy) as client:
            assert any(i["host"] == NAMES[4] for i in client.get("/v1/pending").json())
    finally:
        proxy.stop()
