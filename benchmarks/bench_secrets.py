"""Credential scanning cost: an inspected 10 MB upload with `scan: enforce` versus `scan: off`.

Run: .venv/bin/python benchmarks/bench_secrets.py [--rounds N]

Starts an HTTPS sink on loopback and egress-warden twice (the same policy but for the scan
mode), uploads 10 MB through each with curl, and prints the median time and throughput. The
scan reads the first 1 MiB of the body (bounded at 100 ms); the rest streams through.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme

REPO = Path(__file__).resolve().parent.parent
HOST = "upload.bench.test"
SIZE = 10 * 1000 * 1000


class _Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        remaining = int(self.headers.get("Content-Length", "0") or 0)
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _sink(tmp: Path) -> tuple[ThreadingHTTPServer, Path]:
    ca = trustme.CA()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(HOST).configure_cert(ctx)
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, ca_file


def _proxy(tmp: Path, port: int, ca_file: Path, scan: str) -> tuple[subprocess.Popen[str], str]:
    policy = tmp / f"policy-{scan}.yaml"
    policy.write_text(
        f"version: 1\ndefault: deny\nallow: [{HOST}, 127.0.0.1/32]\n"
        f"network: {{ports: [{port}], block_private: false}}\n"
        f"inspect:\n  - host: {HOST}\n    scan: {scan}\n"
    )
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "addons.cli", "run", "--listen", "127.0.0.1:0"),
            *("--control", "127.0.0.1:0", "--state-dir", str(tmp / f"state-{scan}")),
            *("--policy", str(policy), "--resolve", f"{HOST}:127.0.0.1"),
            *("--upstream-ca", str(ca_file)),
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    seen: list[str] = []
    for line in proc.stderr:
        seen.append(line)
        if '"egress.listening"' in line:
            url = "http://" + json.loads(line)["proxy"]
            threading.Thread(target=lambda: [None for _ in proc.stderr or ()], daemon=True).start()
            return proc, url
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("the proxy did not start:\n" + "".join(seen[-20:]))


def _bare_mitmproxy(tmp: Path, ca_file: Path) -> tuple[subprocess.Popen[str], str, Path]:
    """Bare mitmdump intercepting TLS (the baseline for inspected traffic): no policy, no
    addon, the same upstream CA; returns the process, its URL and its CA certificate."""
    confdir = tmp / "mitmdump"
    port = _free_port()
    mitmdump = Path(sys.executable).with_name("mitmdump")
    proc = subprocess.Popen(
        [
            *(str(mitmdump), "--quiet", "--listen-host", "127.0.0.1", "--listen-port", str(port)),
            *("--set", f"confdir={confdir}", "--set", f"ssl_verify_upstream_trusted_ca={ca_file}"),
            *("--set", "stream_large_bodies=1m"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}", confdir / "mitmproxy-ca-cert.pem"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("mitmdump did not start")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _upload(
    proxy_url: str, proxy_ca: Path, body: Path, port: int, *, resolve: bool = False
) -> float:
    # Bare mitmproxy would resolve the test name itself: --connect-to makes curl's CONNECT
    # target the sink's address while SNI and Host keep the name.
    pinned = ["--connect-to", f"{HOST}:{port}:127.0.0.1:{port}"] if resolve else []
    start = time.perf_counter()
    result = subprocess.run(
        [
            *("curl", "-q", "--silent", "--show-error", "-x", proxy_url, "--noproxy", ""),
            *pinned,
            *("--cacert", str(proxy_ca), "-o", "/dev/null", "-w", "%{http_code}"),
            *("--data-binary", f"@{body}", f"https://{HOST}:{port}/upload"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if result.stdout != "200":
        raise RuntimeError(f"upload answered {result.stdout!r}: {result.stderr}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        body = tmp / "body.bin"
        body.write_bytes(os.urandom(SIZE))
        server, ca_file = _sink(tmp)
        port = int(server.server_address[1])
        print(f"{'workload':<34} {'scan':<8} {'median s':>9} {'MB/s':>8}")
        # The baseline: bare mitmproxy intercepting the same upload.
        results: dict[str, float] = {}
        proc, url, proxy_ca = _bare_mitmproxy(tmp, ca_file)
        try:
            _upload(url, proxy_ca, body, port, resolve=True)
            times = [_upload(url, proxy_ca, body, port, resolve=True) for _ in range(args.rounds)]
        finally:
            proc.terminate()
            proc.wait(timeout=15)
        results["mitmdump"] = statistics.median(times)
        rate = SIZE / results["mitmdump"] / 1e6
        label = "inspected 10 MB upload (mitmdump)"
        print(f"{label:<34} {'-':<8} {results['mitmdump']:>9.3f} {rate:>8.1f}")
        for scan in ("off", "enforce"):
            proc, url = _proxy(tmp, port, ca_file, scan)
            try:
                proxy_ca = tmp / f"state-{scan}" / "ca" / "mitmproxy-ca-cert.pem"
                _upload(url, proxy_ca, body, port)  # warm-up
                times = [_upload(url, proxy_ca, body, port) for _ in range(args.rounds)]
            finally:
                proc.terminate()
                proc.wait(timeout=15)
            median = statistics.median(times)
            results[scan] = median
            rate = SIZE / median / 1e6
            print(f"{'inspected 10 MB upload':<34} {scan:<8} {median:>9.3f} {rate:>8.1f}")
        for scan in ("off", "enforce"):
            ratio = results["mitmdump"] / results[scan]
            print(f"egress-warden (scan {scan}) / bare mitmproxy intercepting: {ratio:.2f}x")
        server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
