"""Load generators: wrk (plain HTTP), hey (HTTPS through CONNECT), curl (the 100 MB download)
and small asyncio clients (idle tunnels, held requests)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import re
import socket
import ssl
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.procs import BenchError, run_tool, which

# wrk's `done` hook prints one JSON line; latency figures are in microseconds.
_WRK_SCRIPT = """\
wrk.method = "GET"
wrk.path = "{path}"
wrk.headers["Host"] = "{host}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"errors\\": %d, \\"status\\": %d, " ..
    "\\"p50_us\\": %d, \\"p99_us\\": %d, \\"max_us\\": %d}}\\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""
MAX_ERROR_SHARE = 0.01  # more failed requests than this and a figure is refused


@dataclass(frozen=True)
class LoadResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    # Every request's latency (ns, ascending) when the client timed each one itself, so that
    # percentiles can be taken over several runs together; empty for wrk and hey.
    latencies_ns: tuple[int, ...] = ()


def _check_errors(tool: str, ok: int, failed: int) -> None:
    if ok == 0 or failed > MAX_ERROR_SHARE * (ok + failed):
        raise BenchError(f"{tool}: {failed} failed of {ok + failed} requests")


def wrk(
    script_dir: Path,
    *,
    connect_port: int,
    path: str,
    host: str,
    connections: int,
    seconds: int,
) -> LoadResult:
    """Keep-alive GETs over `connections` connections for `seconds`, one wrk thread.

    Through a proxy `path` is absolute-form (`http://host:port/small`); direct, origin-form."""
    script = script_dir / f"wrk-{connect_port}-{connections}.lua"
    script.write_text(_WRK_SCRIPT.format(path=path, host=host))
    argv = [which("wrk") or "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
    argv += ["-s", str(script), f"http://127.0.0.1:{connect_port}"]
    out = run_tool(argv, timeout=seconds + 30)
    return parse_wrk(out)


def parse_wrk(out: str) -> LoadResult:
    """The `WRKJSON` line of our wrk script; a missing, cut or odd line is a BenchError."""
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise BenchError(f"wrk printed no summary:\n{out[-500:]}")
    try:
        data = json.loads(line.removeprefix("WRKJSON "))
        requests, status = int(data["requests"]), int(data["status"])
        failed = int(data["errors"]) + status
        duration_s = int(data["duration_us"]) / 1e6
        p50, p99, worst = (int(data[k]) / 1000 for k in ("p50_us", "p99_us", "max_us"))
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"wrk summary unreadable ({exc!r}): {line[:300]}") from None
    _check_errors("wrk", requests - status, failed)
    if duration_s <= 0:
        raise BenchError(f"wrk reported a duration of {duration_s} s")
    return LoadResult(requests, requests / duration_s, p50, p99, worst)


MAX_SEQUENTIAL = 200_000  # upper bound on requests in one sequential-latency run


def sequential_http(*, connect_port: int, path: str, host: str, seconds: float) -> LoadResult:
    """One keep-alive connection, one request at a time, each timed on its own.

    Used instead of wrk for percentiles: wrk corrects for coordinated omission by adding
    synthetic samples, so one 300 ms stall turns into a p75 of 140 ms."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    latencies: list[int] = []
    gc.disable()  # the client's own collector must not show up in the proxy's figures
    try:
        with socket.create_connection(("127.0.0.1", connect_port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            deadline, leftover = started + seconds, b""
            while len(latencies) < MAX_SEQUENTIAL and time.perf_counter() < deadline:
                sent = time.perf_counter_ns()
                sock.sendall(request)
                leftover = _read_response(sock, leftover)
                latencies.append(time.perf_counter_ns() - sent)
            elapsed = time.perf_counter() - started
    finally:
        gc.enable()
    latencies.sort()
    return LoadResult(
        requests=len(latencies),
        rps=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 50) / 1e6,
        p99_ms=percentile(latencies, 99) / 1e6,
        max_ms=latencies[-1] / 1e6,
        latencies_ns=tuple(latencies),
    )


def percentile(ordered: Sequence[int], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[rank - 1])


def _read_response(sock: socket.socket, buffer: bytes) -> bytes:
    """Read one response with a Content-Length body; returns bytes read past its end."""
    while b"\r\n\r\n" not in buffer:
        buffer += _recv(sock)
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    if status_line.split(b" ", 2)[1] != b"200":
        raise BenchError(f"unexpected response: {status_line!r}")
    length = next(
        (
            int(v)
            for k, _, v in (h.partition(b":") for h in header_lines)
            if k.strip().lower() == b"content-length"
        ),
        None,
    )
    if length is None:
        raise BenchError("response without Content-Length")
    while len(buffer) < length:
        buffer += _recv(sock)
    return buffer[length:]


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise BenchError("connection closed by the server")
    return data


_HEY_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_HEY_PCT = re.compile(r"(\d+)%% in ([\d.]+) secs".replace("%%", "%"))
_HEY_SLOWEST = re.compile(r"Slowest:\s+([\d.]+) secs")
_HEY_STATUS = re.compile(r"\[(\d{3})\]\s+(\d+) responses")
_HEY_ERRORS = re.compile(r"^\s+\[(\d+)\]\s+", re.MULTILINE)


def hey(
    url: str,
    proxy_url: str | None,
    *,
    concurrency: int,
    seconds: int,
    keepalive: bool,
) -> LoadResult:
    """HTTPS GETs through CONNECT (hey skips certificate checks); one Go CPU, so the proxy has
    the other core. Without keep-alive every request is a new tunnel and TLS handshake."""
    argv = [which("hey") or "hey", "-c", str(concurrency), "-z", f"{seconds}s", "-t", "10"]
    argv += ["-cpus", "1"]
    if not keepalive:
        argv.append("-disable-keepalive")
    if proxy_url is not None:
        argv += ["-x", proxy_url]
    return parse_hey(run_tool([*argv, url], timeout=seconds + 30), seconds)


def parse_hey(out: str, seconds: float) -> LoadResult:
    """hey's summary as a LoadResult, whatever parts of it hey printed."""
    rps = _HEY_RPS.search(out)
    statuses = {int(code): int(n) for code, n in _HEY_STATUS.findall(out)}
    errors_part = out.partition("Error distribution:")[2]
    failed = sum(int(n) for n in _HEY_ERRORS.findall(errors_part))
    failed += sum(n for code, n in statuses.items() if code != 200)
    ok = statuses.get(200, 0)
    _check_errors("hey", ok, failed)
    pct = {int(p): float(s) for p, s in _HEY_PCT.findall(out)}
    slowest = _HEY_SLOWEST.search(out)
    # hey's tables come out short on a slow machine (few requests: rows missing, or no table at
    # all): take what it printed, falling back to the nearest row, the slowest, or the count.
    slowest_s = float(slowest.group(1)) if slowest is not None else max(pct.values(), default=0)
    requests_per_s = float(rps.group(1)) if rps is not None else ok / seconds
    return LoadResult(
        ok + failed,
        requests_per_s,
        _hey_percentile(pct, 50, slowest_s) * 1000,
        _hey_percentile(pct, 99, slowest_s) * 1000,
        slowest_s * 1000,
    )


def _hey_percentile(table: dict[int, float], wanted: int, slowest: float) -> float:
    """The row for `wanted`, else the nearest row above it, else the slowest request."""
    above = [p for p in table if p >= wanted]
    return table[min(above)] if above else slowest


def curl_download(url: str, proxy_url: str | None, ca_file: Path, expect_bytes: int) -> float:
    """One download, returns MB/s (10^6 bytes) over the whole transfer including set-up."""
    argv = [which("curl") or "curl", "-sS", "--cacert", str(ca_file), "-o", "/dev/null"]
    argv += ["--max-time", "120", "-w", "%{http_code} %{size_download} %{time_total}"]
    if proxy_url is not None:
        argv += ["-x", proxy_url]
    status, size, total = run_tool([*argv, url], timeout=150).split()
    if status != "200" or int(size) != expect_bytes:
        raise BenchError(f"curl {url}: status {status}, {size} bytes")
    return int(size) / float(total) / 1e6


# --- asyncio clients ------------------------------------------------------------------------


STEP_TIMEOUT = 30.0  # seconds for any one connect, CONNECT answer or TLS handshake


async def open_tunnel(
    proxy_port: int, host: str, port: int, tls: ssl.SSLContext
) -> asyncio.StreamWriter:
    """CONNECT through the proxy and complete TLS with the upstream; the tunnel stays idle."""
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            writer.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                raise BenchError(f"CONNECT {host}:{port} answered {status}")
            await writer.start_tls(tls, server_hostname=host)
    except BaseException:
        writer.close()
        raise
    return writer


async def send_pending(proxy_port: int, url: str, host: str) -> asyncio.StreamWriter:
    """Send one absolute-form GET through the proxy and leave the answer unread."""
    async with asyncio.timeout(STEP_TIMEOUT):
        _, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    return writer


async def open_many(
    coros: Sequence[Coroutine[Any, Any, asyncio.StreamWriter]], limit: int
) -> list[asyncio.StreamWriter]:
    """Await connection openers with at most `limit` in flight. If any fails, the ones that
    opened are closed again and the first error is raised."""
    gate = asyncio.Semaphore(limit)

    async def one(coro: Coroutine[Any, Any, asyncio.StreamWriter]) -> asyncio.StreamWriter:
        async with gate:
            return await coro

    results = await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)
    writers = [r for r in results if isinstance(r, asyncio.StreamWriter)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await close_all(writers)
        raise BenchError(f"{len(errors)} of {len(results)} connections failed: {errors[0]!r}")
    return writers


async def close_all(writers: Sequence[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)


@dataclass
class SilentUpstream:
    """Accepts connections and never answers: requests to it stay in flight in a proxy."""

    server: asyncio.Server | None = None
    accepted: int = 0
    _writers: list[asyncio.StreamWriter] | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._writers = []
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0, backlog=4096)

    async def _accept(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._writers is not None
        self._writers.append(writer)
        self.accepted += 1

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        await close_all(self._writers or [])
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)
