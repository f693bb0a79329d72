"""SSH (and git over SSH) through the proxy: `egress-warden connect` is the ProxyCommand that
`egress-warden env` puts in GIT_SSH_COMMAND; it opens a CONNECT tunnel with the agent's
credentials, so the policy decides SSH destinations like any other."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ALLOWED_IP
from tests.support.control import TOKEN_ENV
from tests.support.proxy import REPO, ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

BANNER = b"SSH-2.0-egress-test\r\n"


class _SshLikeServer:
    """Speaks first (an SSH banner), then echoes: what a raw tunnel must carry."""

    def __init__(self) -> None:
        self.sock = socket.create_server((ALLOWED_IP, 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    @staticmethod
    def _session(conn: socket.socket) -> None:
        with conn:
            conn.sendall(BANNER)
            while data := conn.recv(4096):
                conn.sendall(data)


@pytest.fixture(scope="module")
def ssh_server() -> Iterator[_SshLikeServer]:
    server = _SshLikeServer()
    yield server
    server.sock.close()


@pytest.fixture(scope="module")
def ssh_proxy(
    ssh_server: _SshLikeServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("ssh")
    policy = tmp / "policy.yaml"
    policy.write_text(
        f"version: 1\ndefault: deny\nallow: ['git.test:{ssh_server.port}', {ALLOWED_IP}/32]\n"
    )
    proxy = start_proxy(
        tmp / "state",
        [policy],
        *("--resolve", f"git.test:{ALLOWED_IP}", "--resolve", f"other.test:{ALLOWED_IP}"),
        env=TOKEN_ENV,
    )
    yield proxy
    proxy.stop()


def _connect(
    proxy: ProxyProcess, host: str, port: int, stdin: bytes
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "connect", host, str(port)],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        timeout=30,
        env={**os.environ, "HTTPS_PROXY": proxy.url},
        check=False,
    )


def test_connect_relays_a_server_first_protocol(
    ssh_proxy: ProxyProcess, ssh_server: _SshLikeServer
) -> None:
    relay = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "connect", "git.test", str(ssh_server.port)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "HTTPS_PROXY": ssh_proxy.url},
    )
    assert relay.stdin is not None and relay.stdout is not None
    try:
        assert relay.stdout.read(len(BANNER)) == BANNER  # the server spoke first
        relay.stdin.write(b"hello\n")
        relay.stdin.flush()
        assert relay.stdout.read(6) == b"hello\n"
    finally:
        relay.stdin.close()
        relay.wait(10)
    line = ssh_proxy.wait_decision(**{"server.address": "git.test"})
    assert line["egress.decision"] == "allow"


def test_connect_to_a_denied_destination_says_why(
    ssh_proxy: ProxyProcess, ssh_server: _SshLikeServer
) -> None:
    before = ssh_server.connections
    done = _connect(ssh_proxy, "other.test", ssh_server.port, b"")
    assert done.returncode == 1
    assert b"403" in done.stderr and b"(port)" in done.stderr
    assert ssh_server.connections == before


def test_ssh_goes_through_the_proxy_with_the_printed_git_ssh_command(
    ssh_proxy: ProxyProcess, ssh_server: _SshLikeServer, tmp_path: Path
) -> None:
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "env",
            "--shell",
            "json",
            "--ca",
            "never",
            "--proxy",
            ssh_proxy.url,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    env = json.loads(printed.stdout)
    command = shlex.split(env["GIT_SSH_COMMAND"])
    # The real ssh client: it reaches the server's banner through the tunnel (and then fails
    # the key exchange with this fake server, which is fine).
    done = subprocess.run(
        [
            *command,
            "-v",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            f"UserKnownHostsFile={tmp_path / 'known'}",
            "-p",
            str(ssh_server.port),
            "git@git.test",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
        check=False,
    )
    assert "remote software version egress-test" in done.stderr, done.stderr[-2000:]
