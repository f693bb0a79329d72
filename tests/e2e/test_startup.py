"""Start-up: a bad policy fails closed, with FILE:LINE, and nothing listens."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.proxy import REPO, free_port, listening

pytestmark = pytest.mark.e2e


def test_bad_policy_refuses_to_start_and_nothing_listens(tmp_path: Path) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text("version: 1\nallow:\n  - github.com\n  - '*.com'\n")
    port, control = free_port(), free_port()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "addons.cli",
            "run",
            "--policy",
            str(policy),
            "--listen",
            f"127.0.0.1:{port}",
            "--control",
            f"127.0.0.1:{control}",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert f"{policy}:4:" in result.stderr
    assert not listening(port) and not listening(control)


def test_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "addons.cli",
                "run",
                "--policy",
                str(REPO / "policies/default.yaml"),
                "--listen",
                f"127.0.0.1:{port}",
                "--control",
                "127.0.0.1:0",
                "--state-dir",
                str(tmp_path / "state"),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_shipped_policies_validate() -> None:
    files = sorted(str(p) for p in (REPO / "policies").rglob("*.yaml"))
    assert len(files) >= 3
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "policy", "validate", *files],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_check_exit_codes(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ndefault: ask\nallow: [github.com]\ndeny: ['**.pastebin.com']\n")

    def check(url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            # No DNS here: --no-resolve (the check says it skipped the network step).
            [
                sys.executable,
                "-m",
                "proxy.cli",
                "check",
                url,
                "--policy",
                str(policy),
                "--no-resolve",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    allowed = check("https://github.com/")
    assert allowed.returncode == 0 and "allow" in allowed.stdout
    denied = check("https://x.pastebin.com/")
    assert denied.returncode == 1
    assert f"{policy}:4" in denied.stdout
    assert check("https://unknown.example/").returncode == 3
