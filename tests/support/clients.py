"""Small real clients: a raw-socket HTTP/1.1 client for exact proxy-protocol checks, and curl."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


def raw_request(
    proxy_port: int, head: str, timeout: float = 10.0, host: str = "127.0.0.1"
) -> RawResponse:
    """Send `head` (request line and headers, no body) to the proxy; read one response."""
    with socket.create_connection((host, proxy_port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        _version, status, reason = [*lines[0].split(" ", 2), ""][:3]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return RawResponse(int(status), reason, headers, rest[:length])


def curl(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run curl with the given arguments (no config files, no env proxy)."""
    return subprocess.run(
        ["curl", "-q", "--silent", "--show-error", "--noproxy", "", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
