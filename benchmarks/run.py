"""Proxy benchmark harness: no proxy, bare mitmproxy, Squid and egress-warden (10 and 100,000
rules, and 10 rules on 2 workers) side by side on 127.0.0.1, in front of one nginx (HTTP, HTTPS)
and a small WebSocket upstream (plain ws://).

Run: .venv/bin/python benchmarks/run.py [--quick] [--only NAME[,NAME]] [--no-write]
     (`make bench`). Needs: apt-get install -y nginx-light squid wrk hey curl
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peers import PEER_ORDER, start_peers
from benchmarks.procs import (
    BenchError,
    CpuAudit,
    Supervisor,
    apt_line,
    load_average,
    machine_facts,
    missing_tools,
    raise_fd_limit,
)
from benchmarks.report import RunInfo, target_summary, text_table, update_doc, worse_summary
from benchmarks.upstream import start_nginx, start_ws_upstream
from benchmarks.workloads import FULL, QUICK, WORKLOADS, Bench, Row, Settings, check_and_warm

BUSY_FOREIGN = 0.10  # other processes using more than this share of a core skew the figures


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    parser.add_argument(
        "--only", metavar="NAME", help=f"comma-separated workloads: {', '.join(WORKLOADS)}"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in WORKLOADS]
        if unknown:
            parser.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run_workloads(bench: Bench, names: list[str]) -> tuple[list[Row], list[str]]:
    """Every workload in turn; one that fails (a tool's odd output, a peer that cannot do it) is
    reported and the others still run. Returns the rows and the failures."""
    rows: list[Row] = []
    failed: list[str] = []
    for name in names:
        description, workload = WORKLOADS[name]
        log(f"== {name}: {description}")
        started = time.perf_counter()
        try:
            rows += workload(bench)
        except BenchError as exc:
            log(f"   {name} FAILED: {exc}")
            failed.append(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        log(f"   done in {time.perf_counter() - started:.1f}s")
    return rows, failed


def describe(settings: Settings) -> str:
    s = settings
    return (
        f"{s.rounds} round{'s' if s.rounds != 1 else ''} of the req/s and latency runs (each "
        "peer once per round, peer order rotated by one each round; medians reported, "
        "one-connection HTTP percentiles over all rounds' requests together), "
        f"{s.seconds} s per throughput run, {s.latency_seconds} s per latency run, "
        f"{s.connections} connections, {s.idle_tunnels:,} idle tunnels, {s.held:,} held "
        f"requests, {s.downloads} download{'s' if s.downloads != 1 else ''} per peer "
        f"(interleaved likewise), {s.held_many:,} held requests for the held-10k rows, "
        f"{s.ws_runs} plain ws:// download{'s' if s.ws_runs != 1 else ''} of "
        f"{s.ws_bytes / 1e6:.0f} MB per peer, {s.startups} fresh start"
        f"{'s' if s.startups != 1 else ''} per peer kind"
    )


def start_all(sup: Supervisor, workdir: Path, settings: Settings) -> Bench:
    """nginx, then every peer one after the other; checked and warmed up."""
    log(f"temp dir {workdir}; starting nginx and the WebSocket upstream")
    upstream = start_ws_upstream(sup, start_nginx(sup, workdir / "nginx"), workdir)
    log("starting peers one after the other: " + ", ".join(PEER_ORDER[1:]))
    peers = start_peers(sup, workdir, upstream, PEER_ORDER)
    for peer in peers.values():
        if peer.proc is not None and peer.startup_s is not None:
            log(f"  {peer.label}: ready in {peer.startup_s:.2f}s (pid {peer.proc.pid})")
    bench = Bench(settings, upstream, peers, workdir, log, sup)
    log("checking and warming up every peer")
    check_and_warm(bench)
    return bench


def machine_note(load: float, foreign: float) -> str:
    if foreign > BUSY_FOREIGN:
        log("warning: other work on this machine used CPU around the run: figures are skewed")
    return f"load average {load:.2f} at the start, other work ~{foreign:.0%} of a core"


def bench_run(args: argparse.Namespace, workdir: Path, sup: Supervisor) -> None:
    settings = QUICK if args.quick else FULL
    names = args.only.split(",") if args.only else list(WORKLOADS)
    started, audit, load = time.perf_counter(), CpuAudit(), load_average()
    bench = start_all(sup, workdir, settings)
    rows, failed = run_workloads(bench, names)
    foreign = audit.foreign_share(sup)
    log(f"all done in {time.perf_counter() - started:.0f}s")
    note = machine_note(load, foreign)
    log(note)
    print(text_table(rows))
    print(f"\n{worse_summary(rows)}")
    print(f"\n{target_summary(rows)}")
    if failed:
        print("\nworkloads that failed (no rows):\n  " + "\n  ".join(failed))
        raise BenchError(f"{len(failed)} workload(s) failed")
    if args.no_write or args.quick or args.only:
        log("docs/benchmarks.md not updated (only a full run without --no-write writes it)")
        return
    info = RunInfo(
        command=shlex.join([".venv/bin/python", "benchmarks/run.py", *sys.argv[1:]]),
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine_facts(),
        settings=f"{describe(settings)}; {note}",
    )
    log(f"wrote {update_doc(info, rows, bench.policy_results)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    missing = missing_tools()
    if missing:
        log(f"missing tools: {', '.join(missing)}. Install them with:\n  {apt_line(missing)}")
        return 2
    raise_fd_limit()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="egress-warden-bench-"))
    sup = Supervisor()
    try:
        bench_run(args, workdir, sup)
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    finally:
        sup.stop_all()
        if args.keep_temp:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
