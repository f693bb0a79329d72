"""The audit cannot be erased: a refusal's row is committed before the refusal is sent (so a
`kill -9` right after it loses nothing), and retention is by age and per agent (an agent that
floods its own rows prunes only its own, and that raises an event naming it)."""

from __future__ import annotations

import base64
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Upstreams, resolve_args
from tests.support.clients import raw_request
from tests.support.control import TOKEN_ENV
from tests.support.proxy import REPO, start_proxy

pytestmark = pytest.mark.e2e


def _rows(db: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def test_a_refusal_row_survives_kill_9_right_after_the_refusal(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\ndefault: deny\ndeny: [evil.test]\n"
        f"network: {{ports: [{upstreams.http.port}]}}\n"
    )
    proxy = start_proxy(tmp_path / "state", [policy], *resolve_args(), env=TOKEN_ENV)
    try:
        with socket.create_connection(("127.0.0.1", proxy.proxy_port)) as sock:
            target = f"evil.test:{upstreams.http.port}"
            sock.sendall(f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = sock.recv(65536).decode("latin-1")
            # The very moment the refusal arrives, the process dies without any cleanup.
            proxy.process.send_signal(signal.SIGKILL)
        assert " 403 " in head.splitlines()[0]
        request_id = next(
            line.split(":", 1)[1].strip()
            for line in head.splitlines()
            if line.lower().startswith("x-egress-warden-request-id")
        )
        proxy.process.wait(10)
        rows = _rows(
            proxy.state_dir / "warden.db",
            "SELECT decision, reason FROM decisions WHERE request_id = ?",
            request_id,
        )
        assert rows == [("deny", "deny_rule")]
    finally:
        proxy.stop()


def test_an_agent_flooding_its_own_rows_prunes_only_its_own(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    agents = tmp_path / "agents.yaml"
    added = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "agents", "add", "flood", "--file", str(agents)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    credentials = base64.b64encode(f"flood:{added.stdout.strip().splitlines()[-1]}".encode())
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\ndefault: deny\ndeny: [evil.test]\nauth: {required: false}\n"
        f"network: {{ports: [{upstreams.http.port}]}}\n"
    )
    proxy = start_proxy(
        tmp_path / "state",
        [policy],
        "--agents",
        str(agents),
        "--audit-per-agent",
        "50",
        *resolve_args(),
        env=TOKEN_ENV,
    )
    target = f"evil.test:{upstreams.http.port}"
    try:
        for i in range(5):  # the quiet, anonymous rows the flood must not erase
            raw_request(proxy.proxy_port, f"GET http://{target}/quiet{i} HTTP/1.1\r\n\r\n")
        with socket.create_connection(("127.0.0.1", proxy.proxy_port)) as sock:
            sock.settimeout(10)
            for i in range(1100):
                sock.sendall(
                    f"GET http://{target}/f{i} HTTP/1.1\r\nHost: {target}\r\n"
                    f"Proxy-Authorization: Basic {credentials.decode()}\r\n\r\n".encode()
                )
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(65536)
                if b"Connection: close" in data or b"connection: close" in data:
                    sock.close()
                    sock = socket.create_connection(("127.0.0.1", proxy.proxy_port))
                    sock.settimeout(10)
        deadline = time.monotonic() + 10
        while not any(line.get("event") == "egress.audit.pruned" for line in proxy.lines):
            assert time.monotonic() < deadline, proxy.raw[-5:]
            time.sleep(0.1)
        pruned = next(line for line in proxy.lines if line.get("event") == "egress.audit.pruned")
        assert pruned["egress.agent.id"] == "flood" and pruned["rows"] > 0
        db = proxy.state_dir / "warden.db"
        quiet = _rows(db, "SELECT count(*) FROM decisions WHERE agent IS NULL")[0][0]
        flood = _rows(db, "SELECT count(*) FROM decisions WHERE agent = 'flood'")[0][0]
        assert quiet == 5
        assert 50 <= flood < 1100
    finally:
        proxy.stop()
