"""`--workers` never changes what is allowed: grants of every scope, revocations and one-shot
passes are shared by all workers through the store."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ALLOWED_IP, Upstreams, resolve_args
from tests.support.clients import RawResponse, raw_request
from tests.support.control import TOKEN_ENV, api, approve, wait_pending
from tests.support.proxy import ProxyProcess, free_port, start_proxy

pytestmark = pytest.mark.e2e


@pytest.fixture
def workers(tmp_path: Path, upstreams: Upstreams) -> Iterator[ProxyProcess]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"version: 1\ndefault: ask\nallow: [allowed.test, {ALLOWED_IP}/32]\n"
        f"network: {{ports: [{upstreams.http.port}]}}\napproval: {{wait: 2s, once_window: 0s}}\n"
    )
    proxy = start_proxy(
        tmp_path / "state",
        [policy],
        *resolve_args(),
        "--workers",
        "2",
        listen=f"127.0.0.1:{free_port()}",
        control=f"127.0.0.1:{free_port()}",
        env=TOKEN_ENV,
    )
    deadline = time.monotonic() + 20
    while len({line["pid"] for line in proxy.lines if line.get("event") == "egress.listening"}) < 2:
        assert time.monotonic() < deadline, proxy.raw[-5:]
        time.sleep(0.1)
    yield proxy
    proxy.process.send_signal(signal.SIGTERM)
    proxy.process.wait(20)


def _get(proxy: ProxyProcess, host: str, port: int, path: str = "/") -> RawResponse:
    # One connection per request: the kernel spreads them over both workers.
    return raw_request(
        proxy.proxy_port, f"GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
    )


def test_a_session_deny_and_its_revocation_hold_on_every_worker(
    workers: ProxyProcess, upstreams: Upstreams
) -> None:
    port = upstreams.http.port
    with api(workers) as client:
        created = client.post(
            "/v1/grants",
            json={"pattern": f"allowed.test:{port}", "action": "deny", "scope": "session"},
        )
        assert created.status_code == 201, created.text
        grant_id = created.json()["id"]
        time.sleep(1.5)  # several grant polls (0.25 s each), with room for a busy machine
        reasons = [_get(workers, "allowed.test", port, f"/d{i}").headers for i in range(10)]
        assert [r.get("x-egress-warden-reason") for r in reasons] == ["deny_rule"] * 10
        # Every worker lists it and can revoke it.
        for _ in range(6):
            listed = {g["id"] for g in client.get("/v1/grants").json()}
            assert grant_id in listed
        assert client.delete(f"/v1/grants/{grant_id}").status_code == 200
        time.sleep(1.5)
        statuses = [_get(workers, "allowed.test", port, f"/a{i}").status for i in range(10)]
        assert statuses == [200] * 10
        for _ in range(6):
            assert grant_id not in {g["id"] for g in client.get("/v1/grants").json()}


def test_a_once_approval_lets_exactly_one_request_through(
    workers: ProxyProcess, upstreams: Upstreams
) -> None:
    port = upstreams.http.port
    first: list[RawResponse] = []
    held = threading.Thread(
        target=lambda: first.append(_get(workers, "unknown.test", port, "/first"))
    )
    held.start()
    item = wait_pending(workers, "unknown.test", waiting=0)
    time.sleep(0.3)
    approve(workers, item["id"], "once")
    held.join(10)
    assert first and first[0].status == 200
    before = len(upstreams.http.hits)
    retries = [_get(workers, "unknown.test", port, f"/again{i}") for i in range(3)]
    assert [r.headers.get("x-egress-warden-reason") for r in retries] == ["approval_pending"] * 3
    assert len(upstreams.http.hits) == before
