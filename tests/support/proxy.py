"""Start the real egress-warden process (subprocess) and read its structured log."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Something accepts connections on host:port."""
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


@dataclass
class ProxyProcess:
    process: subprocess.Popen[str]
    state_dir: Path
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    proxy_host: str = ""
    proxy_port: int = 0
    control_port: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.proxy_host}:{self.proxy_port}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def decisions(self, **match: Any) -> list[dict[str, Any]]:
        """Decision lines whose attributes equal every `match` item (dots as `__`)."""
        wanted = {k.replace("__", "."): v for k, v in match.items()}
        return [
            line
            for line in list(self.lines)
            if line.get("event") == "egress.decision"
            and all(line.get(k) == v for k, v in wanted.items())
        ]

    def wait_decision(self, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.decisions(**match)
            if found:
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"no decision line matching {match}; got {self.lines[-5:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _reader(proc: ProxyProcess) -> None:
    assert proc.process.stderr is not None
    for line in proc.process.stderr:
        proc.raw.append(line)
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                proc.lines.append(json.loads(line))


def start_proxy(
    state_dir: Path,
    policies: list[Path],
    *extra: str,
    listen: str = "127.0.0.1:0",
    control: str = "127.0.0.1:0",
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    prefix: Sequence[str] = (),
) -> ProxyProcess:
    """Run `egress-warden run` (behind `prefix`, e.g. `ip netns exec NS`) and wait until it
    announces its listeners."""
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "addons.cli",
        "run",
        "--listen",
        listen,
        "--control",
        control,
    ]
    cmd += ["--state-dir", str(state_dir)]
    for policy in policies:
        cmd += ["--policy", str(policy)]
    cmd += list(extra)
    full_env = {**os.environ, **(env or {})}
    process = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    proc = ProxyProcess(process, state_dir)
    threading.Thread(target=_reader, args=(proc,), daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(proc.lines):
            if line.get("event") == "egress.listening":
                host, _, port = line["proxy"].rpartition(":")
                proc.proxy_host, proc.proxy_port = host, int(port)
                proc.control_port = int(line["control"].rpartition(":")[2])
                return proc
        if process.poll() is not None:
            time.sleep(0.2)
            raise RuntimeError(f"proxy exited with {process.returncode}:\n{''.join(proc.raw)}")
        time.sleep(0.02)
    proc.stop()
    raise RuntimeError(f"proxy did not start in {timeout}s:\n{''.join(proc.raw)}")
