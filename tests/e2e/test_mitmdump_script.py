"""The warden under plain mitmproxy (`mitmdump -s addons/warden.py --set egress_policy=...`):
options declared in `load()`, applied in `configure()`; an allowed and a denied request."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ALLOWED_IP, Upstreams, write_policy
from tests.support.proxy import REPO, free_port, listening

pytestmark = pytest.mark.e2e

MITMDUMP = Path(sys.executable).parent / "mitmdump"


@pytest.fixture
def mitmdump(upstreams: Upstreams, tmp_path: Path) -> Iterator[int]:
    policy = write_policy(tmp_path / "policy.yaml", upstreams)
    port = free_port()
    process = subprocess.Popen(
        [
            str(MITMDUMP),
            *("-s", str(REPO / "addons" / "warden.py")),
            *("--set", f"egress_policy={policy}"),
            *("--set", f"egress_resolve=allowed.test:{ALLOWED_IP}"),
            *("--set", f"confdir={tmp_path / 'mitmproxy'}"),
            *("--listen-host", "127.0.0.1", "--listen-port", str(port)),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                out = process.stdout.read() if process.stdout else ""
                pytest.fail(f"mitmdump did not start:\n{out}")
            time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def _curl(port: int, url: str) -> str:
    return subprocess.run(
        ["curl", "-q", "-sS", "-D", "-", "--max-time", "10", "-x", f"http://127.0.0.1:{port}", url],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    ).stdout


def test_allowed_and_denied_request_under_plain_mitmdump(
    mitmdump: int, upstreams: Upstreams
) -> None:
    hits = len(upstreams.http.hits)
    allowed = _curl(mitmdump, f"http://allowed.test:{upstreams.http.port}/via-mitmdump")
    assert "hello from upstream GET /via-mitmdump" in allowed
    assert len(upstreams.http.hits) == hits + 1
    denied = _curl(mitmdump, f"http://evil.test:{upstreams.http.port}/")
    assert denied.startswith("HTTP/1.1 403")
    assert "x-egress-warden-reason: deny_rule" in denied.lower()
    assert len(upstreams.http.hits) == hits + 1
