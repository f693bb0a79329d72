"""`egress-warden connect HOST PORT`: an SSH `ProxyCommand` through the proxy.

It opens a CONNECT tunnel to HOST:PORT through the proxy named by `HTTPS_PROXY` (credentials
from its userinfo, as `egress-warden env` prints them) and relays stdin/stdout through it, so
`ssh` and git over SSH reach the network only through the policy. A refusal is printed with its
reason and the command exits 1 (ssh then reports the ProxyCommand failed).
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import sys
import threading
from collections.abc import Mapping
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
HEAD_LIMIT = 65536


class ConnectError(Exception):
    """The tunnel could not be opened; the message says why (the proxy's reason if refused)."""


def proxy_from_environment(env: Mapping[str, str]) -> str:
    for name in PROXY_VARIABLES:
        if env.get(name):
            return env[name]
    raise ConnectError("no proxy: set HTTPS_PROXY (egress-warden env prints it)")


def open_tunnel(
    proxy: str, host: str, port: int, timeout: float = 30.0
) -> tuple[socket.socket, bytes]:
    """A socket through which bytes reach host:port, opened with CONNECT through `proxy`."""
    parts = urlsplit(proxy if "://" in proxy else "http://" + proxy)
    if parts.scheme != "http" or not parts.hostname:
        raise ConnectError(f"proxy URL {proxy!r}: expected http://[AGENT:TOKEN@]HOST:PORT")
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if parts.username is not None:
        userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        head += f"Proxy-Authorization: Basic {base64.b64encode(userinfo.encode()).decode()}\r\n"
    sock = socket.create_connection((parts.hostname, parts.port or 8080), timeout=timeout)
    try:
        sock.sendall((head + "\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk or len(answer) > HEAD_LIMIT:
                raise ConnectError("the proxy closed the connection before answering")
            answer += chunk
        status_line, *fields = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        if status_line.split(" ")[1:2] != ["200"]:
            reason = next(
                (
                    f.split(":", 1)[1].strip()
                    for f in fields
                    if f.lower().startswith("x-egress-warden-reason:")
                ),
                "",
            )
            suffix = f" ({reason})" if reason else ""
            raise ConnectError(f"{target}: {status_line}{suffix}")
        sock.settimeout(None)
        # What came after the proxy's answer is the destination's already (SSH's server speaks
        # first: its banner may share a read with the 200).
        return sock, answer.partition(b"\r\n\r\n")[2]
    except BaseException:
        sock.close()
        raise


def relay(sock: socket.socket, stdin: BinaryIO, stdout: BinaryIO, first: bytes = b"") -> None:
    """Copy stdin to the tunnel and the tunnel to stdout (after `first`, the destination's
    bytes read with the proxy's answer) until both sides are done."""
    if first:
        stdout.write(first)
        stdout.flush()

    def upstream() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(stdin.fileno(), 65536):
                sock.sendall(chunk)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=upstream, daemon=True)
    sender.start()
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            stdout.write(chunk)
            stdout.flush()


def main(host: str, port: int, proxy: str | None = None) -> int:
    """Run as a ProxyCommand: 0 when the tunnel ran, 1 when it could not be opened."""
    try:
        sock, first = open_tunnel(proxy or proxy_from_environment(os.environ), host, port)
    except (ConnectError, OSError) as exc:
        print(f"egress-warden connect: {exc}", file=sys.stderr)
        return 1
    with sock:
        relay(sock, sys.stdin.buffer, sys.stdout.buffer, first)
    return 0
