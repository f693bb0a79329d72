"""Real upstream servers on loopback (HTTP and HTTPS with trustme certificates) that record hits."""

from __future__ import annotations

import hashlib
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]
    body_len: int
    body_sha256: str


@dataclass
class Upstream:
    """A running upstream server; `hits` lists every request it received."""

    server: ThreadingHTTPServer
    scheme: str
    hits: list[Hit] = field(default_factory=list)

    @property
    def host(self) -> str:
        return str(self.server.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(upstream_ref: list[Upstream]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # One buffered write per response and no Nagle: otherwise delayed ACKs add ~40 ms.
        wbufsize = 1 << 16
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _read_body(self) -> tuple[int, str]:
            digest = hashlib.sha256()
            total = 0
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunk = self.rfile.read(size)
                    digest.update(chunk)
                    total += len(chunk)
                    self.rfile.readline()
            else:
                remaining = int(self.headers.get("Content-Length", "0") or 0)
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    digest.update(chunk)
                    total += len(chunk)
                    remaining -= len(chunk)
            return total, digest.hexdigest()

        def _handle(self) -> None:
            length, sha = self._read_body()
            hit = Hit(
                self.command,
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                length,
                sha,
            )
            upstream_ref[0].hits.append(hit)
            if self.path.startswith("/download/"):
                size = int(self.path.rsplit("/", 1)[1])
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                block = b"x" * (1 << 20)
                sent = 0
                while sent < size:
                    part = block[: min(len(block), size - sent)]
                    self.wfile.write(part)
                    sent += len(part)
                return
            text = f"hello from upstream {self.command} {self.path} len={length} sha256={sha}\n"
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle

    return Handler


def start_upstream(host: str, ssl_context: ssl.SSLContext | None = None) -> Upstream:
    """Start an upstream on `host`, port 0; HTTPS when an SSL context is given."""
    ref: list[Upstream] = []
    server = ThreadingHTTPServer((host, 0), _handler(ref))
    server.daemon_threads = True
    if ssl_context is not None:
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    upstream = Upstream(server, "https" if ssl_context else "http")
    ref.append(upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return upstream
