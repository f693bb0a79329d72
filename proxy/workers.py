"""`run --workers N`: N proxy processes sharing one listening port and one state store.

The supervisor fixes the ports (so every worker binds the same ones with SO_REUSEPORT and the
kernel spreads connections), makes sure the control token exists before any worker starts,
forwards SIGINT/SIGTERM, and stops everything if a worker dies (fail closed, never half-up).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from proxy.config import Endpoint
from proxy.control.token import WeakTokenError, load_control_token

REUSE_PORT_ENV = "EGRESS_WARDEN_REUSE_PORT"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def supervise(
    run_argv: Sequence[str], workers: int, listen: Endpoint, control: Endpoint, state_dir: Path
) -> int:
    """Start `workers` copies of `egress-warden run` and wait; returns the exit code."""
    listen = Endpoint(listen.host, listen.port or _free_port(listen.host))
    control = Endpoint(control.host, control.port or _free_port(control.host))
    try:
        load_control_token(state_dir)  # generated once, shared by every worker
    except WeakTokenError as exc:
        print(f"egress-warden: {exc}", file=sys.stderr)
        return 1
    # The last occurrence of an option wins: each worker runs alone on the fixed ports.
    argv = [*run_argv, "--workers", "1", "--listen", str(listen), "--control", str(control)]
    env = {**os.environ, REUSE_PORT_ENV: "1"}
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "addons.cli", *argv], env=env, stdin=subprocess.DEVNULL
        )
        for _ in range(workers)
    ]
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        codes = [child.poll() for child in children]
        if all(code is not None for code in codes):
            return 0 if stopping else max(code or 0 for code in codes) or 1
        if not stopping and any(code is not None for code in codes):
            print("egress-warden: a worker exited; stopping the others", file=sys.stderr)
            stop(signal.SIGTERM, None)
            stopping = False  # an unplanned stop: exit non-zero once everything is down
            for child in children:
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
            return 1
        time.sleep(0.2)
