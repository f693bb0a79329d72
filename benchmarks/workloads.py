"""The workloads: each runs against every peer and returns table rows. The load and latency
workloads measure every peer once per round, in a peer order rotated by one each round, and
report the median over the rounds (latency percentiles: over every request of every round,
where the client times each request itself)."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import random
import resource
import ssl
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import bench_policy
from benchmarks.clients import (
    LoadResult,
    SilentUpstream,
    close_all,
    curl_download,
    hey,
    open_many,
    open_tunnel,
    percentile,
    send_pending,
    sequential_http,
    wrk,
)
from benchmarks.peers import (
    GENERATED_RULES,
    LABEL_WIDTH,
    MITMPROXY,
    NONE,
    PEER_ORDER,
    SQUID,
    WARDEN_10,
    WARDEN_10_W2,
    WARDEN_100K,
    Peer,
    held_names,
    start_mitmdump,
    start_squid,
    start_warden,
)
from benchmarks.procs import BenchError, Proc, Supervisor, run_tool, which
from benchmarks.upstream import BIG_BYTES, BIG_PATH, SMALL_BODY, SMALL_PATH, Upstream
from benchmarks.websocket import WS_PATH, ws_download

HIGHER, LOWER, INFO = "higher", "lower", "info"  # INFO rows get no ratios


@dataclass(frozen=True)
class Settings:
    seconds: int = 3  # each throughput run (wrk / hey)
    latency_seconds: int = 3  # each one-connection latency run
    # req/s and latency workloads: every peer once per round, median reported. One round's
    # req/s moves by up to ±8 % for the same process, so 3 rounds could not settle 5 %.
    rounds: int = 5
    connections: int = 32
    idle_tunnels: int = 1000
    held: int = 1000
    downloads: int = 21  # one download takes ~0.1 s and moves by ±8 %: many, interleaved
    open_concurrency: int = 50  # tunnels/held requests being set up at once
    held_many: int = 10_000  # the many-held row (egress-warden only: see `held_many`)
    ws_bytes: int = 32_000_000  # one plain ws:// download, in 64 KiB messages
    ws_runs: int = 5
    startups: int = 3  # fresh starts per peer kind for the start-up rows


FULL = Settings()
QUICK = Settings(
    seconds=1,
    latency_seconds=1,
    rounds=1,
    idle_tunnels=200,
    held=200,
    downloads=1,
    ws_bytes=16_000_000,
    ws_runs=1,
    startups=1,
)


@dataclass
class Row:
    workload: str
    metric: str
    better: str  # HIGHER or LOWER
    values: dict[str, float | None] = field(default_factory=dict)
    # False: a footprint (RSS at rest, start-up), not a per-request or per-tunnel cost; shown
    # with ratios but left out of the "more than 5 % worse than bare mitmproxy" summary.
    per_use: bool = True


@dataclass
class Bench:
    settings: Settings
    upstream: Upstream
    peers: dict[str, Peer]
    workdir: Path
    log: Callable[[str], None] = print
    sup: Supervisor | None = None  # for workloads that start processes of their own
    policy_results: list[tuple[int, float, float, float]] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # % of one core, per measurement

    def each(self, *, with_none: bool = True) -> Iterator[Peer]:
        for key in PEER_ORDER:
            if key in self.peers and (with_none or key != NONE):
                yield self.peers[key]

    def measure[T](
        self, peer: Peer, run: Callable[[Peer], T], show: Callable[[T], str], tag: str = ""
    ) -> T:
        """Run one measurement; log its figure and the proxy's CPU use (share of one core)."""
        cpu_before = peer.proc.cpu_seconds() if peer.proc else 0.0
        started = time.perf_counter()
        result = run(peer)
        wall = time.perf_counter() - started
        note = ""
        if peer.proc is not None:
            busy = (peer.proc.cpu_seconds() - cpu_before) / wall
            self.cpu.setdefault(peer.key, []).append(busy * 100)
            note = f"  (proxy CPU {busy:.0%} of one core)"
        prefix = f"[{tag}] " if tag else ""
        self.log(f"  {prefix}{peer.label:<{LABEL_WIDTH}} {show(result)}{note}")
        return result

    def rounds[T](
        self,
        run: Callable[[Peer], T],
        show: Callable[[T], str],
        count: int | None = None,
        *,
        with_none: bool = True,
    ) -> dict[str, list[T]]:
        """Every peer measured once per round, for `count` rounds (default `settings.rounds`);
        round r goes through the peers rotated by r, so no peer is always first or last."""
        peers = list(self.each(with_none=with_none))
        found: dict[str, list[T]] = {peer.key: [] for peer in peers}
        for r in range(self.settings.rounds if count is None else count):
            for peer in rotated(peers, r):
                found[peer.key].append(self.measure(peer, run, show, f"r{r + 1}"))
        return found

    def cpu_row(self, workload: str) -> Row:
        """The proxies' mean CPU use over the runs just measured, as an INFO row."""
        values: dict[str, float | None] = {
            key: statistics.fmean(shares) for key, shares in self.cpu.items()
        }
        row = Row(workload, "proxy CPU during the run above (% of one core)", INFO, values)
        self.cpu.clear()
        return row

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.upstream.ca_file))


def rotated[T](items: Sequence[T], by: int) -> list[T]:
    """`items` starting at index `by` (modulo the length) and wrapping round."""
    if not items:
        return []
    start = by % len(items)
    return [*items[start:], *items[:start]]


def _median_rps(runs: dict[str, list[LoadResult]]) -> dict[str, float | None]:
    return {key: statistics.median(r.rps for r in results) for key, results in runs.items()}


# --- request targets ------------------------------------------------------------------------


def _http_target(bench: Bench, peer: Peer) -> dict[str, str | int]:
    """wrk arguments: direct to nginx for the baseline, else absolute-form through the proxy."""
    port = bench.upstream.http_port
    if peer.port is None:
        return {"connect_port": port, "path": SMALL_PATH, "host": f"127.0.0.1:{port}"}
    authority = f"{peer.target}:{port}"
    return {
        "connect_port": peer.port,
        "path": f"http://{authority}{SMALL_PATH}",
        "host": authority,
    }


def _https_url(bench: Bench, peer: Peer, path: str) -> str:
    return f"https://{peer.target}:{bench.upstream.https_port}{path}"


def _wrk(bench: Bench, peer: Peer, connections: int, seconds: int) -> LoadResult:
    target = _http_target(bench, peer)
    return wrk(
        bench.workdir,
        connect_port=int(target["connect_port"]),
        path=str(target["path"]),
        host=str(target["host"]),
        connections=connections,
        seconds=seconds,
    )


def _sequential(bench: Bench, peer: Peer, seconds: float) -> LoadResult:
    target = _http_target(bench, peer)
    return sequential_http(
        connect_port=int(target["connect_port"]),
        path=str(target["path"]),
        host=str(target["host"]),
        seconds=seconds,
    )


def _hey(bench: Bench, peer: Peer, concurrency: int, seconds: int, keepalive: bool) -> LoadResult:
    url = _https_url(bench, peer, SMALL_PATH)
    return hey(url, peer.proxy_url, concurrency=concurrency, seconds=seconds, keepalive=keepalive)


def _download(bench: Bench, peer: Peer) -> float:
    url = _https_url(bench, peer, BIG_PATH)
    return curl_download(url, peer.proxy_url, bench.upstream.ca_file, BIG_BYTES)


def _rps(result: LoadResult) -> str:
    return f"{result.rps:,.0f} req/s over {result.requests:,} requests"


def _percentiles(result: LoadResult) -> str:
    return (
        f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, max {result.max_ms:.1f} ms"
        f" ({result.requests:,} requests)"
    )


# --- check and warm-up ----------------------------------------------------------------------


def check_and_warm(bench: Bench) -> None:
    """Each peer must serve the small body over HTTP and HTTPS; then one second of load."""
    curl = which("curl") or "curl"
    for peer in bench.each():
        target = _http_target(bench, peer)
        proxy = ["-x", peer.proxy_url] if peer.proxy_url else []
        http_url = f"http://{peer.target}:{bench.upstream.http_port}{SMALL_PATH}"
        body = run_tool([curl, "-sS", "--max-time", "10", *proxy, http_url], timeout=20)
        https_url = _https_url(bench, peer, SMALL_PATH)
        cacert = ["--cacert", str(bench.upstream.ca_file)]
        body2 = run_tool([curl, "-sS", "--max-time", "10", *cacert, *proxy, https_url], 20)
        if body.encode() != SMALL_BODY or body2.encode() != SMALL_BODY:
            raise BenchError(f"{peer.label}: unexpected body via {target}: {body[:200]!r}")
        _wrk(bench, peer, 4, 1)
        bench.log(f"  {peer.label}: ok")


# --- the workloads --------------------------------------------------------------------------


def http_rps(bench: Bench) -> list[Row]:
    c, seconds = bench.settings.connections, bench.settings.seconds
    row = Row("plain HTTP", f"keep-alive req/s ({c} conns)", HIGHER)
    row.values = _median_rps(bench.rounds(lambda p: _wrk(bench, p, c, seconds), _rps))
    return [row, bench.cpu_row(row.workload)]


def new_tunnels(bench: Bench) -> list[Row]:
    c, seconds = bench.settings.connections, bench.settings.seconds
    row = Row("HTTPS", f"new CONNECT tunnels/s, 1 request each ({c} conc.)", HIGHER)
    row.values = _median_rps(bench.rounds(lambda p: _hey(bench, p, c, seconds, False), _rps))
    return [row, bench.cpu_row(row.workload)]


def tunnel_rps(bench: Bench) -> list[Row]:
    c, seconds = bench.settings.connections, bench.settings.seconds
    row = Row("HTTPS", f"req/s inside {c} long-lived tunnels", HIGHER)
    row.values = _median_rps(bench.rounds(lambda p: _hey(bench, p, c, seconds, True), _rps))
    return [row, bench.cpu_row(row.workload)]


def throughput(bench: Bench) -> list[Row]:
    """`downloads` rounds of one download per peer, the peer order rotated each round."""
    runs = bench.settings.downloads
    row = Row("HTTPS", f"tunnel MB/s, 100 MB download (median of {runs})", HIGHER)
    speeds = bench.rounds(lambda p: _download(bench, p), lambda v: f"{v:.0f} MB/s", count=runs)
    row.values = {key: statistics.median(found) for key, found in speeds.items()}
    return [row, bench.cpu_row(row.workload)]


def latency(bench: Bench) -> list[Row]:
    """One connection, sequential requests: p50/p99/max, and p50/p99 minus the no-proxy run.
    See `_latency_rows` for how the rounds are combined."""
    seconds = bench.settings.latency_seconds
    kinds: dict[str, Callable[[Peer], LoadResult]] = {
        "HTTP keep-alive request": lambda p: _sequential(bench, p, seconds),
        "new tunnel + TLS + request": lambda p: _hey(bench, p, 1, seconds, False),
    }
    rows: list[Row] = []
    added: list[Row] = []
    for kind, measure in kinds.items():
        p50, p99, worst = _latency_rows("latency", kind, bench.rounds(measure, _percentiles))
        rows += [p50, p99, worst]
        added += [_added(p50), _added(p99)]
    bench.cpu.clear()  # no CPU rows for the latency runs: one connection barely loads a proxy
    return rows + added


def _latency_rows(workload: str, kind: str, runs: dict[str, list[LoadResult]]) -> list[Row]:
    """p50 and p99 over every request of every run together when the client timed each request
    (a p99 from one 3 s run rests on its ~30 slowest requests and moves by ±20 % from run to
    run); otherwise (hey) the median over the runs of each run's figure. max: the largest."""
    p50, p99, worst = (
        Row(workload, f"{kind} {name} (ms)", LOWER) for name in ("p50", "p99", "max")
    )
    for key, results in runs.items():
        if all(r.latencies_ns for r in results):
            pooled = sorted(itertools.chain.from_iterable(r.latencies_ns for r in results))
            p50.values[key] = percentile(pooled, 50) / 1e6
            p99.values[key] = percentile(pooled, 99) / 1e6
        else:
            p50.values[key] = statistics.median(r.p50_ms for r in results)
            p99.values[key] = statistics.median(r.p99_ms for r in results)
        worst.values[key] = max(r.max_ms for r in results)
    return [p50, p99, worst]


def _added(row: Row) -> Row:
    base = row.values.get(NONE)
    added = Row(row.workload, "added " + row.metric, row.better)
    for key, value in row.values.items():
        if key != NONE and value is not None and base is not None:
            added.values[key] = value - base
    return added


def idle_rss(bench: Bench) -> list[Row]:
    """RSS with N, then 2N idle tunnels: the second batch gives the marginal cost, free of the
    allocator pools that earlier workloads left behind (the first batch soaks those up)."""
    n = bench.settings.idle_tunnels
    rest = Row("memory", "RSS before the tunnels, after the load runs (MiB)", LOWER, per_use=False)
    first = Row("memory", f"RSS with {n:,} idle TLS tunnels (MiB)", LOWER, per_use=False)
    per = Row("memory", f"RSS per 1,000 idle TLS tunnels, {n:,} to {2 * n:,} (MiB)", LOWER)
    for peer in bench.each(with_none=False):
        before, one, two = (kib / 1024 for kib in asyncio.run(_rss_with_tunnels(bench, peer, n)))
        bench.log(
            f"  {peer.label:<{LABEL_WIDTH}} {before:.1f} MiB, {one:.1f} with {n:,},"
            f" {two:.1f} with {2 * n:,}"
        )
        rest.values[peer.key], first.values[peer.key] = before, one
        per.values[peer.key] = (two - one) * 1000 / n
    return [rest, first, per]


async def _rss_with_tunnels(bench: Bench, peer: Peer, n: int) -> list[int]:
    """The proxy's RSS (KiB) before, with n and with 2n idle tunnels."""
    assert peer.proc is not None and peer.port is not None
    proc, proxy_port = peer.proc, peer.port
    tls, port = bench.tls(), bench.upstream.https_port
    await asyncio.sleep(1)
    samples = [proc.rss_kib()]
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(2):
            writers += await open_many(
                [open_tunnel(proxy_port, peer.target, port, tls) for _ in range(n)],
                bench.settings.open_concurrency,
            )
            await asyncio.sleep(IDLE_SETTLE)
            samples.append(proc.rss_kib())
    finally:
        await close_all(writers)
    await asyncio.sleep(1)
    return samples


def held(bench: Bench) -> list[Row]:
    """Allowed latency while N requests are outstanding: held for approval in egress-warden,
    waiting on an upstream that never answers in bare mitmproxy and Squid. Every proxy holds
    its N at once, then the latency is measured in rounds like the latency workload."""
    return asyncio.run(_held_rounds(bench, bench.settings.held))


async def _held_rounds(bench: Bench, n: int) -> list[Row]:
    cpu = Row("held", f"proxy CPU holding {n:,} requests, no other traffic (%)", LOWER)
    peers = list(bench.each(with_none=False))
    silent = SilentUpstream()
    await silent.start()
    writers: list[asyncio.StreamWriter] = []
    try:
        for peer in peers:
            writers += await _hold(bench, peer, silent, n)
            assert peer.proc is not None
            busy = await _cpu_share(peer.proc, CPU_WINDOW)
            bench.log(f"  {peer.label:<{LABEL_WIDTH}} holds {n:,}; holding costs {busy:.0%} CPU")
            cpu.values[peer.key] = busy * 100
        seconds = bench.settings.latency_seconds
        runs = await asyncio.to_thread(
            bench.rounds, lambda p: _sequential(bench, p, seconds), _percentiles, with_none=False
        )
        bench.cpu.clear()
    finally:
        await close_all(writers)
        await silent.close()
    kind = f"allowed HTTP request while {n:,} are held,"
    return [*_latency_rows("held", kind, runs), cpu]


async def _hold(
    bench: Bench, peer: Peer, silent: SilentUpstream, n: int, concurrency: int = 0
) -> list[asyncio.StreamWriter]:
    """Sends n requests that stay outstanding (`concurrency` at a time, default the settings');
    returns once the proxy holds them all."""
    assert peer.port is not None
    before = await _outstanding(peer, silent)
    writers = await open_many(
        [
            send_pending(peer.port, url, host)
            for url, host in _held_targets(bench, peer, n, silent.port)
        ],
        concurrency or bench.settings.open_concurrency,
    )
    timeout = max(HOLD_TIMEOUT, n / HOLD_RATE_FLOOR)
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = await _outstanding(peer, silent) - before
        if count >= n:
            return writers
        await asyncio.sleep(0.2)
    await close_all(writers)
    raise BenchError(f"{peer.label}: only {count} of {n} requests held after {timeout:.0f}s")


async def _outstanding(peer: Peer, silent: SilentUpstream) -> int:
    """Requests the proxy holds: egress-warden's count, else the silent upstream's accepts."""
    if peer.is_warden:
        return await asyncio.to_thread(_held_in_warden, peer)
    return silent.accepted


def _held_targets(bench: Bench, peer: Peer, n: int, silent_port: int) -> list[tuple[str, str]]:
    if peer.is_warden:
        names = held_names(max(1, min(len(held_names()), n // 20)))
        port = bench.upstream.http_port
        hosts = [f"{names[i % len(names)]}:{port}" for i in range(n)]
        return [(f"http://{host}/held/{i}", host) for i, host in enumerate(hosts)]
    host = f"127.0.0.1:{silent_port}"
    return [(f"http://{host}/held/{i}", host) for i in range(n)]


IDLE_SETTLE = 1.5  # seconds between opening idle tunnels and reading RSS
CPU_WINDOW = 2.0  # seconds over which the idle CPU of a holding proxy is sampled
HOLD_TIMEOUT = 60.0  # seconds for all held requests to be registered
HOLD_RATE_FLOOR = 80  # held requests per second: a slower proxy fails the workload


async def _cpu_share(proc: Proc, seconds: float) -> float:
    await asyncio.sleep(0.5)  # let the last registrations settle
    start = proc.cpu_seconds()
    await asyncio.sleep(seconds)
    return (proc.cpu_seconds() - start) / seconds


def _held_in_warden(peer: Peer) -> int:
    """A counter of held requests, read from `/v1/pending`; the caller subtracts the reading
    taken before sending. One process: the items' `waiting`, the requests held right now.

    With `--workers N` every worker serves the control API on the shared port and `waiting`
    counts only the waiters of the worker that happened to answer, so the items' `count` is
    summed instead: the store (shared by the workers) adds one to it, atomically, for every
    request that joins the item on any worker, just before that request starts to wait. It never
    goes down, hence the reading before; the harness keeps every held connection open and
    `approval.wait` (120 s) outlasts the wait, so every request counted is still held."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{peer.control_port}/v1/pending",
        headers={"Authorization": f"Bearer {peer.token}"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        items = json.load(response)
    counter = "waiting" if peer.workers == 1 else "count"
    return sum(int(item[counter]) for item in items)


def policy(bench: Bench) -> list[Row]:
    """Start-up to ready for every peer, then `bench_policy`'s load and lookup figures."""
    startup = Row("policy", "process start to ready (s)", LOWER)
    memory = Row("policy", "RSS right after start-up (MiB)", LOWER)
    for peer in bench.each(with_none=False):
        startup.values[peer.key] = peer.startup_s
        if peer.rss_start_kib is not None:
            memory.values[peer.key] = peer.rss_start_kib / 1024
    rng = random.Random(bench_policy.SEED)
    with tempfile.TemporaryDirectory(dir=bench.workdir) as tmp:
        results = [bench_policy.measure(Path(tmp), n, rng) for n in (10, 100_000)]
    bench.policy_results = results
    load = Row("policy", "policy load, 10 / 100,000 rules (s)", LOWER)
    hit = Row("policy", "lookup hit (ns)", LOWER)
    miss = Row("policy", "lookup miss (ns)", LOWER)
    for key, (_, load_s, hit_ns, miss_ns) in zip((WARDEN_10, WARDEN_100K), results, strict=True):
        load.values[key], hit.values[key], miss.values[key] = load_s, hit_ns, miss_ns
    return [startup, memory, load, hit, miss]


# --- start-up -------------------------------------------------------------------------------

STARTUP_SETTLE = 1.0  # seconds between ready and the RSS reading (late imports, first GC)


def startup(bench: Bench) -> list[Row]:
    """Fresh processes of bare mitmproxy, Squid and egress-warden (the 10-rule peer's
    configuration), started one at a time with nothing else starting: time from spawn to ready,
    and RSS one second later; medians over `startups` starts each."""
    sup = _sup(bench)
    ready = Row("start-up", "process start to ready (s)", LOWER, per_use=False)
    memory = Row("start-up", "RSS 1 s after ready (MiB)", LOWER, per_use=False)
    starters: dict[str, Callable[[Path], Peer]] = {
        MITMPROXY: lambda d: start_mitmdump(sup, d),
        SQUID: lambda d: start_squid(sup, d),
        WARDEN_10: lambda d: start_warden(
            sup, d, WARDEN_10, GENERATED_RULES[WARDEN_10], bench.upstream
        ),
    }
    for key, start in starters.items():
        times, sizes = [], []
        for i in range(bench.settings.startups):
            peer = start(bench.workdir / f"startup-{key}-{i}")
            assert peer.proc is not None and peer.startup_s is not None
            time.sleep(STARTUP_SETTLE)
            times.append(peer.startup_s)
            sizes.append(peer.proc.rss_kib() / 1024)
            peer.proc.stop()
        ready.values[key], memory.values[key] = statistics.median(times), statistics.median(sizes)
        bench.log(
            f"  {peer.label:<{LABEL_WIDTH}} ready in {ready.values[key]:.2f}s,"
            f" {memory.values[key]:.1f} MiB ({len(times)} start{'s' if len(times) > 1 else ''})"
        )
    return [ready, memory]


def _sup(bench: Bench) -> Supervisor:
    if bench.sup is None:
        raise BenchError("this workload starts processes and needs the run's supervisor")
    return bench.sup


# --- plain ws:// ----------------------------------------------------------------------------

WS_MESSAGE = 1 << 16


def _ws(bench: Bench, peer: Peer) -> float:
    port = bench.upstream.ws_port
    if port is None:
        raise BenchError("no WebSocket upstream")
    if peer.port is None:
        return ws_download(
            connect_port=port,
            target=WS_PATH,
            host=f"127.0.0.1:{port}",
            total=bench.settings.ws_bytes,
            message_size=WS_MESSAGE,
        )
    authority = f"{peer.target}:{port}"
    return ws_download(
        connect_port=peer.port,
        target=f"http://{authority}{WS_PATH}",
        host=authority,
        total=bench.settings.ws_bytes,
        message_size=WS_MESSAGE,
    )


def websocket(bench: Bench) -> list[Row]:
    """A plain `ws://` download (upstream to client, 64 KiB binary messages) through each peer,
    `ws_runs` interleaved runs, median MB/s. egress-warden meters it (message payload bytes on
    the close event). A peer that cannot upgrade (answers other than 101) gets no figure."""
    mb = bench.settings.ws_bytes / 1e6
    row = Row("WebSocket", f"plain ws:// MB/s, {mb:.0f} MB in 64 KiB messages, metered", HIGHER)
    speeds: dict[str, list[float]] = {}
    peers = list(bench.each())
    for r in range(bench.settings.ws_runs):
        for peer in rotated(peers, r):
            try:
                speed = bench.measure(peer, lambda p: _ws(bench, p), lambda v: f"{v:.0f} MB/s")
            except BenchError as exc:
                bench.log(f"  {peer.label:<{LABEL_WIDTH}} no figure: {exc}")
                continue
            speeds.setdefault(peer.key, []).append(speed)
    row.values = {key: statistics.median(found) for key, found in speeds.items()}
    return [row, bench.cpu_row(row.workload)]


# --- many held requests ---------------------------------------------------------------------

HELD_MANY_CONCURRENCY = 200  # held requests being sent at once (each one a new connection)


def held_many(bench: Bench) -> list[Row]:
    """egress-warden (10 rules, one process) holding `held_many` requests: the allowed-request
    latency over one connection with nothing held and then while they are all held (rounds like
    the latency workload; the ratio is the issue's target), and RSS. Only egress-warden: bare
    mitmproxy and Squid would hold an upstream connection per request as well (twice the
    descriptors) and the target compares egress-warden with itself."""
    peer = bench.peers.get(WARDEN_10)
    if peer is None or peer.proc is None:
        return []
    n = bench.settings.held_many
    # Each held request is an open connection here and in the proxy (which raises its own soft
    # limit to the hard one): fewer if this machine's limit cannot take them.
    room = min(_fd_limit(), _fd_limit(peer.proc.pid)) - FD_RESERVE
    if room < n:
        bench.log(f"  file descriptor limit leaves room for {room:,} held requests, not {n:,}")
        n = max(room, 1)
    return asyncio.run(_held_many(bench, peer, n))


FD_RESERVE = 1_000  # descriptors kept free for everything else either process has open


def _fd_limit(pid: int | None = None) -> int:
    """The soft RLIMIT_NOFILE of this process, or of `pid` (from /proc)."""
    if pid is None:
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _held_many(bench: Bench, peer: Peer, n: int) -> list[Row]:
    assert peer.proc is not None
    # At least 3 s a round: a 1 s quick round gives ~150 requests, whose p99 is their maximum.
    seconds, rounds = max(3, bench.settings.latency_seconds), max(1, bench.settings.rounds)

    async def latency_runs(tag: str) -> list[LoadResult]:
        return [
            await asyncio.to_thread(
                bench.measure,
                peer,
                lambda p: _sequential(bench, p, seconds),
                _percentiles,
                f"{tag} r{r + 1}",
            )
            for r in range(rounds)
        ]

    calm = await latency_runs("nothing held")
    rss_before = peer.proc.rss_kib() / 1024
    silent = SilentUpstream()
    await silent.start()
    writers: list[asyncio.StreamWriter] = []
    started = time.perf_counter()
    try:
        writers = await _hold(bench, peer, silent, n, HELD_MANY_CONCURRENCY)
        bench.log(
            f"  {peer.label:<{LABEL_WIDTH}} holds {n:,} after {time.perf_counter() - started:.1f}s"
        )
        await asyncio.sleep(IDLE_SETTLE)
        rss_held = peer.proc.rss_kib() / 1024
        busy = await _cpu_share(peer.proc, CPU_WINDOW)
        held_runs = await latency_runs(f"{n:,} held")
    finally:
        await close_all(writers)
        await silent.close()
    bench.cpu.clear()
    key = peer.key
    rows: list[Row] = []
    for name, runs in (("nothing held", calm), (f"{n:,} held", held_runs)):
        p50, p99, _ = _latency_rows("held 10k", f"allowed HTTP request, {name},", {key: runs})
        rows += [p50, p99]
    calm_p99, held_p99 = rows[1].values[key], rows[3].values[key]
    ratio = Row("held 10k", f"p99 while {n:,} are held / p99 with nothing held (x)", INFO)
    if calm_p99 and held_p99 is not None:
        ratio.values[key] = held_p99 / calm_p99
    memory = Row("held 10k", f"RSS holding {n:,} requests (MiB)", LOWER, per_use=False)
    memory.values[key] = rss_held
    per = Row("held 10k", "RSS per held request (KiB)", LOWER)
    per.values[key] = (rss_held - rss_before) * 1024 / n
    cpu = Row("held 10k", f"proxy CPU holding {n:,} requests, no other traffic (%)", LOWER)
    cpu.values[key] = busy * 100
    return [*rows, ratio, memory, per, cpu]


# --- the default relay against mitmproxy's -------------------------------------------------

RELAY_ENV = "EGRESS_WARDEN_RELAY"


def relay_available() -> bool:
    """Whether this build has a choice of tunnel relay (`addons/relay.py`)."""
    return importlib.util.find_spec("addons.relay") is not None


def idle_relay(bench: Bench) -> list[Row]:
    """RSS per 1,000 idle tunnels in a fresh egress-warden (10 rules) with the default relay and
    with `EGRESS_WARDEN_RELAY=mitmproxy` (mitmproxy's own TCP layer), side by side in one run;
    the 2n-minus-n difference as in `idle_rss`. Skipped (no rows) when the build has no relay
    choice: the hook for it is this function."""
    if not relay_available():
        bench.log("  no addons/relay.py in this build: relay comparison skipped")
        return []
    sup, n = _sup(bench), bench.settings.idle_tunnels
    variants: dict[str, dict[str, str]] = {
        "default relay": {},
        "EGRESS_WARDEN_RELAY=copy": {RELAY_ENV: "copy"},
        "EGRESS_WARDEN_RELAY=mitmproxy": {RELAY_ENV: "mitmproxy"},
    }
    rows: list[Row] = []
    for i, (name, env) in enumerate(variants.items()):
        fresh = start_warden(
            sup,
            bench.workdir / f"relay-{i}",
            WARDEN_10,
            GENERATED_RULES[WARDEN_10],
            bench.upstream,
            extra_env=env,
        )
        assert fresh.proc is not None
        try:
            before, one, two = (
                kib / 1024 for kib in asyncio.run(_rss_with_tunnels(bench, fresh, n))
            )
        finally:
            fresh.proc.stop()
        bench.log(
            f"  {name:<{LABEL_WIDTH}} {before:.1f} MiB, {one:.1f} with {n:,},"
            f" {two:.1f} with {2 * n:,}"
        )
        row = Row("memory", f"fresh warden, {name}: RSS per 1,000 idle TLS tunnels (MiB)", LOWER)
        row.values[WARDEN_10] = (two - one) * 1000 / n
        rows.append(row)
    return rows


WORKLOADS: dict[str, tuple[str, Callable[[Bench], list[Row]]]] = {
    "http_rps": ("plain HTTP keep-alive requests/s (wrk)", http_rps),
    "new_tunnels": ("new HTTPS CONNECT tunnels/s, one request each (hey)", new_tunnels),
    "tunnel_rps": ("requests/s inside long-lived tunnels (hey)", tunnel_rps),
    "throughput": ("tunnel throughput for a 100 MB download (curl)", throughput),
    "latency": ("p50/p99/max latency, one connection (sequential client, hey)", latency),
    "idle_rss": ("RSS per 1,000 idle TLS tunnels (asyncio)", idle_rss),
    "held": ("allowed latency while 1,000 requests are held (asyncio)", held),
    "policy": ("start-up, policy load and lookup at 100,000 rules", policy),
    "startup": ("fresh starts: time to ready and RSS vs bare mitmproxy and Squid", startup),
    "websocket": ("plain ws:// download MB/s, metered (asyncio upstream)", websocket),
    "held_many": ("allowed p99 and RSS while 10,000 requests are held (warden)", held_many),
    "idle_relay": ("RSS per 1,000 idle tunnels: default relay vs mitmproxy's", idle_relay),
}
REFERENCES = (MITMPROXY, SQUID)
SUBJECTS = (WARDEN_10, WARDEN_100K, WARDEN_10_W2)
