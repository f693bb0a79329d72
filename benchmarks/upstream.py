"""The upstreams: one nginx process (`nginx-light`) serving HTTP and HTTPS on loopback, and a
small WebSocket server (`benchmarks/websocket.py`, its own process) for plain `ws://`."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import trustme

from benchmarks.procs import Proc, Supervisor, free_port, port_open, wait_until, which

BENCH_HOST = "bench.test"
SMALL_PATH = "/small"
BIG_PATH = "/big"
SMALL_BODY = b"egress-warden benchmark: a small response body, about one hundred bytes long.\n"
BIG_BYTES = 100 * 1000 * 1000
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Upstream:
    proc: Proc
    http_port: int
    https_port: int
    ca_file: Path  # the trustme CA that signed nginx's certificate
    ws_port: int | None = None  # the WebSocket upstream, once started


@dataclass(frozen=True)
class _Certs:
    cert: Path
    key: Path
    ca: Path


def _write_certs(directory: Path) -> _Certs:
    ca = trustme.CA()
    leaf = ca.issue_cert(BENCH_HOST, "127.0.0.1")
    certs = _Certs(directory / "server.pem", directory / "server.key", directory / "ca.pem")
    leaf.cert_chain_pems[0].write_to_path(str(certs.cert))
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(str(certs.cert), append=True)
    leaf.private_key_pem.write_to_path(str(certs.key))
    ca.cert_pem.write_to_path(str(certs.ca))
    return certs


def _write_content(www: Path) -> None:
    www.mkdir()
    (www / SMALL_PATH.lstrip("/")).write_bytes(SMALL_BODY)
    chunk = os.urandom(_CHUNK)
    with (www / BIG_PATH.lstrip("/")).open("wb") as out:
        left = BIG_BYTES
        while left:
            left -= out.write(chunk[: min(left, _CHUNK)])


def _config(prefix: Path, certs: _Certs, http_port: int, https_port: int) -> str:
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/tmp-{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
{temp}
    default_type application/octet-stream;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_header_timeout 300s;
    server {{
        listen 127.0.0.1:{http_port} backlog=4096;
        listen 127.0.0.1:{https_port} ssl backlog=4096;
        server_name {BENCH_HOST};
        ssl_certificate {certs.cert};
        ssl_certificate_key {certs.key};
        root {prefix}/www;
        location / {{ }}
    }}
}}
"""


def start_nginx(sup: Supervisor, prefix: Path) -> Upstream:
    prefix.mkdir()
    certs = _write_certs(prefix)
    _write_content(prefix / "www")
    http_port, https_port = free_port(), free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(_config(prefix, certs, http_port, https_port))
    nginx = which("nginx") or "nginx"
    argv = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    proc = sup.spawn("nginx", argv, prefix / "stdout.log")
    wait_until(lambda: port_open(http_port) and port_open(https_port), proc, timeout=15)
    return Upstream(proc, http_port, https_port, certs.ca)


def start_ws_upstream(sup: Supervisor, upstream: Upstream, workdir: Path) -> Upstream:
    """The WebSocket upstream next to nginx; returns `upstream` with its port."""
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.websocket", str(port)]
    proc = sup.spawn("ws-upstream", argv, workdir / "ws-upstream.log")
    wait_until(lambda: port_open(port), proc, timeout=15)
    return replace(upstream, ws_port=port)
