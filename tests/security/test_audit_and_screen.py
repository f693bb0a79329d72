"""What an agent writes into its requests reaches a person's screen and the audit store. Through
a real running proxy: terminal escapes and bidi controls in a held request are escaped in the
`pending` and `decisions` tables, and bytes that are not UTF-8 in a method or path neither stop
the decision audit nor make `GET /v1/decisions` fail."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ALLOWED_IP, Upstreams, ask_policy, resolve_args
from tests.support.control import TOKEN_ENV, api
from tests.support.proxy import REPO, ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

# Erase the line, move up, conceal, an OSC 8 link, a C1 CSI and a right-to-left override: each
# could make a row show a host it does not belong to, or hide the rows above it.
SCREEN_ATTACK = b"\x1b[2K\x1b[1A\x1b[8m\x1b]8;;http://trusted.test/\x07x\x1b]8;;\x07"
RAW_RLO = "\u202e".encode()
FORBIDDEN_ON_SCREEN = ("\x1b", "\x07", "\x9b", "\u202e", "\u2066", "\u200b")


@pytest.fixture
def proxy(tmp_path: Path, upstreams: Upstreams) -> Iterator[ProxyProcess]:
    policy = ask_policy(tmp_path / "policy.yaml", upstreams, "{wait: 1s}")
    proc = start_proxy(
        tmp_path / "state",
        [policy],
        *resolve_args(),
        "--resolve",
        f"held.test:{ALLOWED_IP}",
        "--resolve",
        f"other.held.test:{ALLOWED_IP}",
        env=TOKEN_ENV,
    )
    yield proc
    proc.stop()


def _send(proxy: ProxyProcess, head: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes as a request head; the status line of the answer (b"" if closed)."""
    with socket.create_connection(("127.0.0.1", proxy.proxy_port), timeout=timeout) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.partition(b"\r\n")[0]


def _cli(proxy: ProxyProcess, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args, "--control", proxy.control_url],
        cwd=REPO,
        env={**_env(), **TOKEN_ENV},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # Decode exactly what reached the terminal: no byte may be lost or replaced on the way.
    return done.stdout.decode("utf-8")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_WARDEN_")}


def _assert_one_honest_line_per_row(screen: str) -> None:
    for char in FORBIDDEN_ON_SCREEN:
        assert char not in screen, f"{char!r} reached the terminal:\n{screen!r}"
    for line in screen.splitlines():
        assert line.isprintable(), repr(line)


def _decisions(proxy: ProxyProcess, limit: int = 200) -> list[dict[str, Any]]:
    with api(proxy) as client:
        response = client.get("/v1/decisions", params={"limit": limit})
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()
    return rows


def _wait_rows(proxy: ProxyProcess, want: int, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    rows = _decisions(proxy)
    while len(rows) < want and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = _decisions(proxy)
    return rows


def test_escape_sequences_in_held_requests_are_escaped_on_the_approvers_screen(
    proxy: ProxyProcess,
) -> None:
    # Absolute form: mitmproxy takes raw ESC and BEL in the path of an http:// target.
    first = _send(
        proxy, b"GET http://held.test/" + SCREEN_ATTACK + b" HTTP/1.1\r\nHost: held.test\r\n\r\n"
    )
    # Origin form: the path is not checked at all, so UTF-8 bidi and zero-width characters and
    # a C1 CSI (as UTF-8) arrive as they are.
    second = _send(
        proxy,
        b"GET /" + RAW_RLO + "\u2066\u200b\u009b2J".encode() + SCREEN_ATTACK + b" HTTP/1.1\r\n"
        b"Host: other.held.test\r\n\r\n",
    )
    # A method with ESC in it, to a host of its own: refused at the edge (400), never held.
    method = _send(
        proxy,
        b"GE\x1b[2KT http://method.held.test/m HTTP/1.1\r\nHost: method.held.test\r\n\r\n",
    )
    assert b" 403 " in first and b" 403 " in second, (first, second)
    assert b" 400 " in method and b"not an HTTP token" in method, method

    rows = _wait_rows(proxy, 4)
    paths = [row["path"] for row in rows]
    assert "/" + SCREEN_ATTACK.decode() in paths, paths
    assert any(p.startswith("/\u202e\u2066\u200b\u009b2J") for p in paths), paths

    pending = _cli(proxy, "pending")
    _assert_one_honest_line_per_row(pending)
    with api(proxy) as client:
        items = client.get("/v1/pending").json()
    assert {item["host"] for item in items} >= {"held.test", "other.held.test"}
    for item in items:
        # Each id is printed on the row of its own host.
        [line] = [line for line in pending.splitlines() if line.startswith(item["id"])]
        assert f"{item['host']}:{item['port']}" in line, pending
    [method_item] = [item for item in items if item["host"] == "method.held.test"] or [None]
    assert method_item is None, method_item

    decisions = _cli(proxy, "decisions", "--limit", "50")
    _assert_one_honest_line_per_row(decisions)
    assert "held.test:80/\\x1b[2K\\x1b[1A\\x1b[8m\\x1b]8;;http://trusted.test/\\x07x" in decisions
    assert "other.held.test:80/\\u202e\\u2066\\u200b\\x9b2J\\x1b[2K" in decisions
    # Every row the API holds is on screen: none was hidden by an earlier one.
    assert len(decisions.splitlines()) == 1 + len(_decisions(proxy, 50))


def test_bytes_that_are_not_utf8_do_not_stop_the_audit(
    proxy: ProxyProcess, upstreams: Upstreams
) -> None:
    port = upstreams.http.port
    host = f"allowed.test:{port}"
    odd = [
        # A method holding byte 0xff, to an allowed and to a held destination.
        b"G\xffT http://" + host.encode() + b"/odd-method HTTP/1.1\r\nHost: " + host.encode(),
        b"G\xffT http://held.test/odd-method HTTP/1.1\r\nHost: held.test",
        # An origin-form path holding bytes that are not UTF-8 (and a NUL-free C0 control).
        b"GET /odd-path-\xff\xfe\x01 HTTP/1.1\r\nHost: " + host.encode(),
    ]
    for head in odd:
        status = _send(proxy, head + b"\r\n\r\n")
        assert status == b"" or status.startswith(b"HTTP/1.1 "), status
    time.sleep(0.5)  # several audit rounds

    for n in range(3):
        answer = _send(
            proxy, f"GET http://{host}/after-{n} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        assert answer.startswith(b"HTTP/1.1 200"), answer
    deadline = time.monotonic() + 10
    rows = _decisions(proxy)
    while time.monotonic() < deadline:
        if {f"/after-{n}" for n in range(3)} <= {row["path"] for row in rows}:
            break
        time.sleep(0.1)
        rows = _decisions(proxy)
    else:
        raise AssertionError(f"later decisions never reached the audit: {rows}")

    # What was recorded of the odd requests is escaped, never lost in a failing batch.
    for row in rows:
        for value in row.values():
            if isinstance(value, str):
                value.encode("utf-8")
                assert "\x00" not in value
    odd_methods = {row["method"] for row in rows if row["path"] == "/odd-method"}
    assert odd_methods <= {"G\\xffT"}, odd_methods
    odd_paths = {row["path"] for row in rows if row["path"].startswith("/odd-path")}
    assert odd_paths <= {"/odd-path-\\xff\\xfe\x01"}, odd_paths
    assert not [line for line in proxy.lines if line.get("event") == "egress.audit"]
    assert not [line for line in proxy.lines if line.get("event") == "egress.audit.dropped"]
    _assert_one_honest_line_per_row(_cli(proxy, "decisions", "--limit", "50"))
