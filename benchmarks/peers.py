"""The proxies under test, started side by side on 127.0.0.1: none, bare mitmproxy, Squid and
egress-warden with a 10-rule and a 100,000-rule policy, and with the 10-rule policy on 2 workers."""

from __future__ import annotations

import os
import pwd
import random
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_policy import make_patterns
from benchmarks.procs import (
    VENV_BIN,
    Proc,
    Supervisor,
    clean_env,
    free_port,
    listening_sockets,
    port_open,
    wait_until,
    which,
)
from benchmarks.upstream import BENCH_HOST, Upstream

NONE, MITMPROXY, SQUID, WARDEN_10, WARDEN_100K = "none", "mitmproxy", "squid", "ew10", "ew100k"
WARDEN_10_W2 = "ew10w2"
PEER_ORDER = (NONE, MITMPROXY, SQUID, WARDEN_10, WARDEN_100K, WARDEN_10_W2)
LABELS = {
    NONE: "no proxy",
    MITMPROXY: "bare mitmproxy",
    SQUID: "Squid",
    WARDEN_10: "warden 10 rules",
    WARDEN_100K: "warden 100k rules",
    WARDEN_10_W2: "warden 10 rules, 2 workers",
}
LABEL_WIDTH = max(len(label) for label in LABELS.values())  # log lines line up on it
WARDENS = (WARDEN_10, WARDEN_100K, WARDEN_10_W2)
HELD_DOMAIN = "held.test"
HELD_NAMES = 50  # h0.held.test .. h49.held.test, each pinned to 127.0.0.1
APPROVAL_WAIT = "120s"
POLICY_SEED = 1234
# Generated allow entries on top of the two fixed ones (bench.test, 127.0.0.1/32).
GENERATED_RULES = {WARDEN_10: 8, WARDEN_100K: 100_000, WARDEN_10_W2: 8}
WORKERS = {WARDEN_10_W2: 2}  # `run --workers N`; the others run one process


@dataclass(frozen=True)
class Peer:
    key: str
    proc: Proc | None  # None: the no-proxy baseline
    port: int | None  # the proxy's listening port
    target: str  # the host clients put in URLs: a name egress-warden checks, else an IP
    startup_s: float | None = None
    rss_start_kib: int | None = None  # right after it became ready
    control_port: int | None = None
    token: str | None = None
    workers: int = 1  # egress-warden proxy processes sharing the port (SO_REUSEPORT)

    @property
    def label(self) -> str:
        return LABELS[self.key]

    @property
    def proxy_url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port is not None else None

    @property
    def is_warden(self) -> bool:
        return self.key in WARDENS


def _since(started: float) -> float:
    return time.perf_counter() - started


def held_names(count: int = HELD_NAMES) -> list[str]:
    return [f"h{i}.{HELD_DOMAIN}" for i in range(count)]


# --- bare mitmproxy -------------------------------------------------------------------------


def start_mitmdump(sup: Supervisor, workdir: Path) -> Peer:
    """`mitmdump` with no script; CONNECT is a raw tunnel (`--ignore-hosts '.*'`), like an
    allowed egress-warden tunnel, and bodies over 1m are streamed as egress-warden does."""
    workdir.mkdir()
    port = free_port()
    argv = [str(VENV_BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1"]
    argv += ["--listen-port", str(port), "--ignore-hosts", ".*"]
    argv += ["--set", f"confdir={workdir / 'conf'}", "--set", "stream_large_bodies=1m"]
    argv += ["--set", "connection_strategy=eager"]
    started = time.perf_counter()
    proc = sup.spawn(MITMPROXY, argv, workdir / "mitmdump.log")
    wait_until(lambda: port_open(port), proc, timeout=60)
    return Peer(MITMPROXY, proc, port, "127.0.0.1", _since(started), proc.rss_kib())


# --- Squid ----------------------------------------------------------------------------------


def _squid_config(workdir: Path, port: int) -> str:
    return f"""\
http_port 127.0.0.1:{port}
http_access allow all
cache deny all
cache_mem 0 MB
access_log none
cache_store_log none
cache_log {workdir}/cache.log
pid_filename {workdir}/squid.pid
coredump_dir {workdir}
shutdown_lifetime 0 seconds
pinger_enable off
http_upgrade_request_protocols websocket allow all
http_upgrade_request_protocols WebSocket allow all
digest_generation off
netdb_filename none
max_filedescriptors 16384
via off
"""


def _hand_to_squid_user(workdir: Path) -> None:
    """Run as root, Squid drops to the `proxy` user: it must reach and write its directory."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("proxy")
    except KeyError:
        return
    workdir.parent.chmod(0o711)
    os.chown(workdir, user.pw_uid, user.pw_gid)


def start_squid(sup: Supervisor, workdir: Path) -> Peer:
    workdir.mkdir()
    port = free_port()
    conf = workdir / "squid.conf"
    conf.write_text(_squid_config(workdir, port))
    _hand_to_squid_user(workdir)
    argv = [which("squid") or "squid", "-N", "-f", str(conf)]
    started = time.perf_counter()
    proc = sup.spawn(SQUID, argv, workdir.parent / "squid.out")
    wait_until(lambda: port_open(port), proc, timeout=60)
    return Peer(SQUID, proc, port, "127.0.0.1", _since(started), proc.rss_kib())


# --- egress-warden --------------------------------------------------------------------------


def warden_policy(path: Path, extra_rules: int, ports: Sequence[int]) -> Path:
    """bench.test and 127.0.0.1/32 (loopback is blocked unless a CIDR rule exempts it),
    `extra_rules` generated entries (exact, `*.`, `**.`, in-label globs, CIDRs), default ask."""
    patterns = make_patterns(extra_rules, random.Random(POLICY_SEED)) if extra_rules else []
    lines = ["version: 1", "mode: enforce", "default: ask", "allow:"]
    lines += [f"  - {BENCH_HOST}", '  - "127.0.0.1/32"']
    lines += [f'  - "{p}"' for p in patterns]
    lines += [f"network:\n  ports: [{', '.join(str(p) for p in sorted(ports))}]"]
    lines += [
        "  block_private: true",
        f"approval:\n  wait: {APPROVAL_WAIT}\n  pending_ttl: 1h\n  max_pending: 1000",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _healthy(control_port: int) -> bool:
    """`GET /healthz` answers 200. A raw keep-alive request that the probe closes itself after
    the answer: with `Connection: close` the server closes first, and a client already gone by
    then has been seen to make the control listener's `write_eof` raise ENOTCONN during
    start-up, which ends the process."""
    try:
        with socket.create_connection(("127.0.0.1", control_port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            while b"\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                answer += chunk
            return answer.split(b" ", 2)[1] == b"200"
    except (OSError, IndexError):
        return False


def _warden_ready(port: int, control: int, workers: int) -> bool:
    """With `--workers N` every worker binds both ports (SO_REUSEPORT) and serves the control
    API itself, so `/healthz` answers for whichever worker the kernel picks: the proxy port must
    also have one listening socket per worker. A worker listens once its proxy is running, which
    is also what makes its `/healthz` answer 200."""
    if workers > 1 and listening_sockets(port) < workers:
        return False
    return _healthy(control) and port_open(port)


def start_warden(
    sup: Supervisor,
    workdir: Path,
    key: str,
    rules: int,
    upstream: Upstream,
    workers: int = 1,
    extra_env: dict[str, str] | None = None,
) -> Peer:
    """`egress-warden run` with a generated policy; ready when `/healthz` answers 200 and the
    proxy port accepts (with `--workers N`: when all N workers listen on it). `extra_env`: e.g.
    `EGRESS_WARDEN_RELAY` for a variant started by one workload."""
    workdir.mkdir()
    ports = [
        p for p in (upstream.http_port, upstream.https_port, upstream.ws_port) if p is not None
    ]
    policy = warden_policy(workdir / "policy.yaml", rules, ports)
    port, control = free_port(), free_port()
    argv = [str(VENV_BIN / "egress-warden"), "run", "--policy", str(policy)]
    argv += ["--listen", f"127.0.0.1:{port}", "--control", f"127.0.0.1:{control}"]
    argv += ["--state-dir", str(workdir / "state")]
    if workers > 1:
        argv += ["--workers", str(workers)]
    for name in [BENCH_HOST, *held_names()]:
        argv += ["--resolve", f"{name}:127.0.0.1"]
    token = secrets.token_hex(16)
    # The idle-tunnel workload opens 2,000 tunnels from one address: lift the per-client cap.
    env = clean_env(
        EGRESS_WARDEN_CONTROL_TOKEN=token,
        EGRESS_WARDEN_MAX_CONNECTIONS_PER_CLIENT="0",
        **(extra_env or {}),
    )
    started = time.perf_counter()
    proc = sup.spawn(key, argv, workdir / "warden.log", env=env)
    wait_until(lambda: _warden_ready(port, control, workers), proc, timeout=180, interval=0.05)
    startup = _since(started)
    return Peer(key, proc, port, BENCH_HOST, startup, proc.rss_kib(), control, token, workers)


def start_peers(
    sup: Supervisor, workdir: Path, upstream: Upstream, keys: Sequence[str]
) -> dict[str, Peer]:
    """Starts the peers one after the other, so that each start-up time is measured alone."""
    peers = {NONE: Peer(NONE, None, None, "127.0.0.1")}
    if MITMPROXY in keys:
        peers[MITMPROXY] = start_mitmdump(sup, workdir / "mitmdump")
    if SQUID in keys:
        peers[SQUID] = start_squid(sup, workdir / "squid")
    for key in WARDENS:
        if key in keys:
            rules, workers = GENERATED_RULES[key], WORKERS.get(key, 1)
            peers[key] = start_warden(sup, workdir / key, key, rules, upstream, workers)
    return peers
