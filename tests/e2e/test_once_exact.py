"""`once` approvals made exact: across two real replicas sharing a real PostgreSQL, a `once`
approval admits exactly the requests waiting at that moment (on either replica), or exactly one
later retry; and within `approval.once_window` it covers one client operation (a real
`git clone` over smart HTTP makes a GET, then POSTs)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from proxy.agents import AgentRegistry
from tests.conftest import ALLOWED_IP, Upstreams, ask_policy, resolve_args, write_policy
from tests.support.control import TOKEN_ENV, api, approve, wait_pending
from tests.support.postgres import PostgresServer, start_postgres
from tests.support.proxy import ProxyProcess, start_proxy
from tests.support.toolservers import ToolServer, make_git_repo, start_git_server

pytestmark = pytest.mark.e2e

WAIT = 5.0  # approval.wait of the fleet: long enough to line up waiters on both replicas
NAMES = [f"o{i}.once.test" for i in range(12)]
RETRIES_PER_REPLICA = 5


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with start_postgres() as server:
        yield server


@pytest.fixture(scope="module")
def fleet(
    pg: PostgresServer, upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, ProxyProcess, str]]:
    """Two replicas on one database, and its DSN; `once_window: 0s`: `once` is one request."""
    tmp = tmp_path_factory.mktemp("once-fleet")
    dsn = pg.create_database()
    replicas = [_replica(upstreams, tmp, name, dsn) for name in ("a", "b")]
    yield replicas[0], replicas[1], dsn
    for proc in replicas:
        proc.stop()


@pytest.fixture(scope="module")
def agent_fleet(
    pg: PostgresServer, upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, ProxyProcess, dict[str, tuple[str, str]]]]:
    """Two replicas with verified agents, each allowed one pending item (`max_pending: 1`)."""
    tmp = tmp_path_factory.mktemp("once-agents")
    agents = tmp / "agents.yaml"
    registry = AgentRegistry(agents)
    auth = {name: (name, registry.add(name)) for name in ("alice", "bob")}
    dsn = pg.create_database()
    replicas = [
        _replica(upstreams, tmp, name, dsn, "max_pending: 1", "--agents", str(agents))
        for name in ("a", "b")
    ]
    yield replicas[0], replicas[1], auth
    for proc in replicas:
        proc.stop()


def _replica(
    upstreams: Upstreams, tmp: Path, name: str, dsn: str, settings: str = "", *extra: str
) -> ProxyProcess:
    more = f", {settings}" if settings else ""
    approval = f"{{wait: {WAIT:g}s, pending_ttl: 1h, once_window: 0s{more}}}"
    policy = ask_policy(tmp / f"policy-{name}.yaml", upstreams, approval)
    args = [*resolve_args(), *extra, "--store", dsn]
    for host in NAMES:
        args += ["--resolve", f"{host}:{ALLOWED_IP}"]
    return start_proxy(tmp / f"state-{name}", [policy], *args, env=TOKEN_ENV)


def _get(
    proxy: ProxyProcess, url: str, timeout: float, auth: tuple[str, str] | None = None
) -> int | None:
    """The status the client got, or None when it gave up waiting (still held)."""
    target = httpx.Proxy(proxy.url, auth=auth) if auth else proxy.url
    try:
        with httpx.Client(proxy=target, trust_env=False, timeout=timeout) as client:
            return client.get(url).status_code
    except httpx.TimeoutException:
        return None


def _concurrently(calls: list[tuple[ProxyProcess, str]], timeout: float) -> list[int | None]:
    """Send every request at once (threads released together) and collect the statuses."""
    results: list[int | None] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int, proxy: ProxyProcess, url: str) -> None:
        start.wait()
        results[i] = _get(proxy, url, timeout)

    threads = [
        threading.Thread(target=run, args=(i, proxy, url), daemon=True)
        for i, (proxy, url) in enumerate(calls)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 10)
    return results


def _background(
    proxy: ProxyProcess, url: str, auth: tuple[str, str] | None = None
) -> tuple[threading.Thread, list[int | None]]:
    out: list[int | None] = []
    thread = threading.Thread(target=lambda: out.append(_get(proxy, url, 30, auth)), daemon=True)
    thread.start()
    return thread, out


def _nobody_waiting(proxy: ProxyProcess, dsn: str, url: str, host: str) -> str:
    """Hold one request, let its client give up, and return the id of its item once the
    store counts nobody waiting on it (the item stays pending)."""
    assert _get(proxy, url, timeout=1.0) is None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rows = asyncio.run(_pending_rows(dsn, host))
        if rows and rows[0][1] == 0:
            return str(rows[0][0])
        time.sleep(0.1)
    raise AssertionError(f"{host}: the abandoned request still counts as waiting")


async def _pending_rows(dsn: str, host: str) -> list[tuple[str, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, waiting FROM pending WHERE host = $1", host)
    finally:
        await conn.close()
    return [(r["id"], r["waiting"]) for r in rows]


def test_once_with_nobody_waiting_admits_exactly_one_retry_on_all_replicas(
    fleet: tuple[ProxyProcess, ProxyProcess, str], upstreams: Upstreams
) -> None:
    a, b, dsn = fleet
    for round_, host in enumerate(NAMES[:4]):  # several rounds: the race is probabilistic
        url = f"http://{host}:{upstreams.http.port}/retry"
        item_id = _nobody_waiting(a, dsn, url, host)
        approve(b if round_ % 2 else a, item_id)
        # Long enough for every answer: the losers are held, then refused approval_pending.
        statuses = _concurrently([(p, url) for p in (a, b) * RETRIES_PER_REPLICA], WAIT + 10)
        assert sorted(statuses, key=str) == [200] + [403] * (len(statuses) - 1), statuses


def test_waiters_on_both_replicas_are_all_admitted_and_leave_no_pass(
    fleet: tuple[ProxyProcess, ProxyProcess, str], upstreams: Upstreams
) -> None:
    a, b, _ = fleet
    host = NAMES[4]
    url = f"http://{host}:{upstreams.http.port}/held"
    held = [_background(p, url) for p in (a, a, b, b)]
    wait_pending(a, host, waiting=2)
    item = wait_pending(b, host, waiting=2)
    approve(a, str(item["id"]))
    for thread, _ in held:
        thread.join(15)
    assert [out for _, out in held] == [[200]] * 4
    # The approval was used by the four: one more retry, on either replica, is held again.
    for proxy in (a, b):
        assert _get(proxy, url, timeout=WAIT - 2) is None  # held: no answer yet
        wait_pending(proxy, host, waiting=0)


def _hammer(
    proxy: ProxyProcess,
    url: str,
    auth: tuple[str, str],
    stop: threading.Event,
    out: list[int | None],
) -> None:
    # one kept-alive connection: probes as fast as the proxy answers them
    with httpx.Client(proxy=httpx.Proxy(proxy.url, auth=auth), trust_env=False, timeout=5) as c:
        while not stop.is_set():
            out.append(c.get(url).status_code)


def test_a_waiter_on_b_is_the_once_while_other_requests_race_for_a_pass(
    agent_fleet: tuple[ProxyProcess, ProxyProcess, dict[str, tuple[str, str]]],
    upstreams: Upstreams,
) -> None:
    """Alice waits on replica B; A approves `once` for all. Meanwhile bob hammers both replicas
    for the same destination: bob already has his one pending item, so each of his requests is
    answered at once, 200 only if it took a once pass. Alice was waiting, so she is the once:
    no pass may exist, not even for the moment before B hears of the approval."""
    a, b, auth = agent_fleet
    port = upstreams.http.port
    _get(a, f"http://{NAMES[11]}:{port}/elsewhere", 1.0, auth["bob"])  # bob's one item
    wait_pending(a, NAMES[11], agent="bob", waiting=0)
    for host in NAMES[6:11]:  # several rounds: the race is probabilistic
        url = f"http://{host}:{port}/race"
        thread, out = _background(b, url, auth["alice"])
        item = wait_pending(b, host, agent="alice")
        probes: list[int | None] = []
        stop = threading.Event()
        hammers = [
            threading.Thread(target=_hammer, args=(p, url, auth["bob"], stop, probes), daemon=True)
            for p in (a, b) * 2
        ]
        for hammering in hammers:
            hammering.start()
        time.sleep(0.2)
        approve(a, str(item["id"]))
        thread.join(15)
        time.sleep(1.0)  # past B's handling of the approval
        stop.set()
        for hammering in hammers:
            hammering.join(10)
        assert out == [200], host
        assert probes and set(probes) == {403}, (host, probes)


# --- one client operation: git over smart HTTP -----------------------------------------------

GIT_HOST = "git.once.test"
GIT_WINDOW = 3.0


@pytest.fixture
def git_rig(upstreams: Upstreams, tmp_path: Path) -> Iterator[tuple[ProxyProcess, ToolServer]]:
    root = tmp_path / "git"
    root.mkdir()
    make_git_repo(root)
    git = start_git_server(ALLOWED_IP, root)
    policy = write_policy(
        tmp_path / "policy.yaml",
        upstreams,
        body=f"version: 1\ndefault: ask\nallow: [{ALLOWED_IP}/32]\n"
        f"network: {{ports: [{git.port}]}}\n"
        f"approval: {{wait: 20s, once_window: {GIT_WINDOW:g}s}}\n",
    )
    proxy = start_proxy(
        tmp_path / "state",
        [policy],
        "--resolve",
        f"{GIT_HOST}:{ALLOWED_IP}",
        env=TOKEN_ENV,
    )
    yield proxy, git
    proxy.stop()
    git.close()


def _clone(proxy: ProxyProcess, port: int, dest: Path) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
        "http_proxy": proxy.url,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
    }
    url = f"http://{GIT_HOST}:{port}/demo.git"
    return subprocess.Popen(
        ["git", "clone", "-q", url, str(dest)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # git runs git-remote-http: stop them together, by group
    )


def test_one_once_approval_covers_a_whole_git_clone_then_expires(
    git_rig: tuple[ProxyProcess, ToolServer], tmp_path: Path
) -> None:
    proxy, git = git_rig
    first = _clone(proxy, git.port, tmp_path / "one")
    item = wait_pending(proxy, GIT_HOST)
    approve(proxy, str(item["id"]))
    _, err = first.communicate(timeout=30)
    assert first.returncode == 0, err.decode()
    assert (tmp_path / "one" / "README").read_text() == "served by git http-backend\n"
    assert "/demo.git/git-upload-pack" in git.paths  # the POSTs came after the approved GET

    time.sleep(GIT_WINDOW + 0.5)  # the window has closed: the next clone asks again
    served = len(git.paths)
    second = _clone(proxy, git.port, tmp_path / "two")
    try:
        again = wait_pending(proxy, GIT_HOST)
        assert again["id"] != item["id"]
        assert len(git.paths) == served  # held before reaching the server
    finally:
        os.killpg(second.pid, signal.SIGKILL)
        second.communicate(timeout=10)
    with api(proxy) as client:
        decisions = client.get("/v1/decisions", params={"limit": 50}).json()
    assert any(d.get("path") == "/demo.git/git-upload-pack" for d in decisions), decisions
