"""Schemathesis against the live control API's own /openapi.json: no 5xx, ever."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Upstreams, resolve_args, write_policy
from tests.support.control import TOKEN, TOKEN_ENV
from tests.support.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api_proxy(
    upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("fuzz")
    policy = write_policy(tmp / "policy.yaml", upstreams)
    proc = start_proxy(tmp / "state", [policy], *resolve_args(), env=TOKEN_ENV)
    yield proc
    proc.stop()


def test_schemathesis_finds_no_server_errors(api_proxy: ProxyProcess, tmp_path: Path) -> None:
    binary = Path(sys.executable).with_name("schemathesis")
    command = [str(binary)] if binary.exists() else [shutil.which("schemathesis") or "schemathesis"]
    result = subprocess.run(
        [
            *command,
            "run",
            f"{api_proxy.control_url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--exclude-path",
            "/v1/events",
            "--max-examples",
            "25",
            "--workers",
            "1",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Test cases:" in output and " passed" in output
    assert " failed" not in output
    # the API is still healthy afterwards
    assert api_proxy.process.poll() is None
