"""`run` refuses to start with a weak control token, and says where the token came from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.proxy import REPO

pytestmark = pytest.mark.e2e


def _run(tmp_path: Path, *extra: str, token: str | None) -> subprocess.CompletedProcess[str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefault: deny\n")
    env = {k: v for k, v in os.environ.items() if k != "EGRESS_WARDEN_CONTROL_TOKEN"}
    if token is not None:
        env["EGRESS_WARDEN_CONTROL_TOKEN"] = token
    argv = ["run", "--policy", str(policy), "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0"]
    return subprocess.run(
        [sys.executable, "-m", "addons.cli", *argv, "--state-dir", str(tmp_path / "state"), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_short_env_token_stops_the_start(tmp_path: Path, workers: str) -> None:
    result = _run(tmp_path, "--workers", workers, token="only-20-characters..")
    assert result.returncode == 1, result.stderr
    assert "$EGRESS_WARDEN_CONTROL_TOKEN" in result.stderr
    assert "at least 32" in result.stderr
    assert "only-20-characters" not in result.stderr
    assert "egress.listening" not in result.stderr


def test_placeholder_token_file_stops_the_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "control-token").write_text("CHANGE-ME-control-token-use-openssl-rand-hex-32\n")
    result = _run(tmp_path, token=None)
    assert result.returncode == 1, result.stderr
    assert f"{state}/control-token" in result.stderr and "placeholder" in result.stderr
