"""`run --workers N`: several processes on one port, one store; approvals reach every worker."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Upstreams, ask_policy, resolve_args
from tests.support.control import TOKEN_ENV, approve, wait_pending
from tests.support.proxy import free_port, listening, start_proxy

pytestmark = pytest.mark.e2e


def test_two_workers_share_the_port_and_the_queue(upstreams: Upstreams, tmp_path: Path) -> None:
    policy = ask_policy(tmp_path / "policy.yaml", upstreams, "{wait: 20s}")
    port, control = free_port(), free_port()
    proxy = start_proxy(
        tmp_path / "state",
        [policy],
        *resolve_args(),
        "--workers",
        "2",
        listen=f"127.0.0.1:{port}",
        control=f"127.0.0.1:{control}",
        env=TOKEN_ENV,
    )
    try:
        deadline = time.monotonic() + 20
        while (
            len({line["pid"] for line in proxy.lines if line.get("event") == "egress.listening"})
            < 2
        ):
            assert time.monotonic() < deadline, proxy.raw[-5:]
            time.sleep(0.1)
        # new connections are spread over both workers by the kernel
        for i in range(30):
            with httpx.Client(proxy=proxy.url, trust_env=False, timeout=10) as client:
                assert (
                    client.get(f"http://allowed.test:{upstreams.http.port}/w{i}").status_code == 200
                )
        out: list[httpx.Response] = []
        url = f"http://unknown.test:{upstreams.http.port}/held"

        def held() -> None:
            with httpx.Client(proxy=proxy.url, trust_env=False, timeout=30) as client:
                out.append(client.get(url))

        thread = threading.Thread(target=held, daemon=True)
        thread.start()
        # `waiting` counts requests held on the worker that answers the API: may be 0 here
        item = wait_pending(proxy, "unknown.test", waiting=0)
        time.sleep(0.5)  # let the request reach its hold
        start = time.monotonic()
        approve(proxy, item["id"])  # whichever worker answers the API, the holder is released
        thread.join(15)
        assert out and out[0].status_code == 200
        assert time.monotonic() - start < 5
    finally:
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(20) == 0
    assert not listening(port) and not listening(control)
