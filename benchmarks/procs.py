"""Child processes (each in its own process group), free ports, RSS, tools and machine facts."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"

# Debian package that provides each external tool the harness drives.
TOOLS = {"nginx": "nginx-light", "squid": "squid", "wrk": "wrk", "hey": "hey", "curl": "curl"}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


class BenchError(Exception):
    """A peer failed to start or a workload produced invalid results."""


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for children: no proxy variables, sbin on PATH."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    env["PATH"] = f"{env.get('PATH', '/usr/bin:/bin')}:{SBIN_PATH}"
    env.update(extra)
    return env


def which(tool: str) -> str | None:
    return shutil.which(tool, path=clean_env()["PATH"])


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if which(tool) is None]


def apt_line(tools: Sequence[str]) -> str:
    return "apt-get install -y " + " ".join(sorted({TOOLS[t] for t in tools}))


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (bound to port 0 and read back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def listening_sockets(port: int) -> int:
    """TCP sockets in LISTEN on 127.0.0.1:port (with SO_REUSEPORT, one per process bound)."""
    local = f"0100007F:{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1] == local and fields[3] == "0A":  # 0A: TCP_LISTEN
            count += 1
    return count


def raise_fd_limit() -> None:
    """Children inherit it: 1,000 tunnels need ~3,000 descriptors in the proxy."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Proc:
    """A child started in its own process group; `stop` ends the whole group."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        # Whatever is left of the group (helpers, a stuck leader) is killed outright.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)

    def rss_kib(self) -> int:
        """Resident memory of every process in the group, KiB."""
        return sum(_vm_rss_kib(pid) for pid in group_members(self.pid))

    def cpu_seconds(self) -> float:
        """User plus system CPU time used so far by every process in the group."""
        return sum(_cpu_ticks(pid) for pid in group_members(self.pid)) / _CLOCK_TICKS


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime


def _vm_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Supervisor:
    """Starts children and stops every one of them, newest first."""

    procs: list[Proc] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        with log.open("ab") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env or clean_env(),
                cwd=cwd or REPO,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        while self.procs:
            self.procs.pop().stop()


def wait_until(
    ready: Callable[[], bool], proc: Proc, timeout: float, interval: float = 0.02
) -> float:
    """Poll `ready` until true; returns the seconds it took. Fails fast if `proc` dies."""
    start = time.perf_counter()
    deadline = start + timeout
    while time.perf_counter() < deadline:
        if ready():
            return time.perf_counter() - start
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        time.sleep(interval)
    raise BenchError(f"{proc.name} not ready after {timeout:.0f}s:\n{proc.log_tail()}")


def run_tool(argv: Sequence[str], timeout: float) -> str:
    """Run a client tool to completion (bounded by `timeout`); returns its stdout."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=clean_env(),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{argv[0]} did not finish in {timeout:.0f}s") from exc
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-500:]}")
    return done.stdout


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=10, env=clean_env(), check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _machine_busy_seconds() -> float:
    """User, nice and system CPU time of the whole machine (all cores) since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return sum(int(v) for v in fields[1:4]) / _CLOCK_TICKS


def _own_seconds(sup: Supervisor) -> float:
    """CPU time of this process, its reaped children (the load tools) and the live peers."""
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return own + sum(proc.cpu_seconds() for proc in sup.procs)


@dataclass
class CpuAudit:
    """How much CPU other work on the machine used while the harness ran (% of one core).
    Approximate: kernel time spent on loopback traffic is partly counted as foreign."""

    machine: float = field(default_factory=_machine_busy_seconds)
    own: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def foreign_share(self, sup: Supervisor) -> float:
        machine = _machine_busy_seconds() - self.machine
        own = _own_seconds(sup) - self.own
        return max(0.0, machine - own) / (time.perf_counter() - self.started)


def load_average() -> float:
    """The one-minute load average: other work on the machine skews every figure."""
    return os.getloadavg()[0]


def _version(line: str) -> str:
    """`Squid Cache: Version 5.7` / `nginx version: nginx/1.22.1` -> `5.7` / `1.22.1`."""
    found = re.search(r"(\d+(?:\.\d+)+)", line)
    return found.group(1) if found else line


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, str]:
    from mitmproxy.version import VERSION as MITMPROXY_VERSION

    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": MITMPROXY_VERSION,
        "squid": _version(_first_line([which("squid") or "squid", "-v"])),
        "nginx": _version(_first_line([which("nginx") or "nginx", "-v"])),
    }
