"""The application: state, the decision snapshot, reloads, maintenance, start-up and shutdown.

Everything a running egress-warden is, except the proxy engine itself: `addons/runtime.py`
embeds mitmproxy around one `Service` and tells it when the proxy listens and when to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import ipaddress
import logging
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import structlog
import uvicorn

from proxy.admins import control_verifier
from proxy.agents import AgentRegistry, AgentsFileError
from proxy.approvals import ApprovalQueue
from proxy.approvals.notify import Notifier
from proxy.audit import AuditSink, AuditWriter
from proxy.auth import Authenticator, check_identity_config
from proxy.config import Endpoint, RunConfig
from proxy.control.app import ControlContext, ReloadResult, create_app
from proxy.control.listener import control_server_options
from proxy.control.token import WeakTokenError, load_control_token
from proxy.eventbus import EventBus
from proxy.facts import RequestFacts, facts_from_url
from proxy.gate import Gate, Snapshot
from proxy.grants import GrantIndex
from proxy.hosts import IPAddress
from proxy.netguard import Listener, NetGuard
from proxy.policy.load import PolicyErrors
from proxy.policy.model import EffectivePolicy, ScanMode
from proxy.policy.requirements import load_effective
from proxy.resolve import Resolver
from proxy.secrets.detect import detectors
from proxy.statedir import make_private_dir, secure_state_dir
from proxy.store import Store, StoreError, open_store
from proxy.telemetry import PolicyEvent, Telemetry
from proxy.telemetry.hub import Sink, StructlogSink
from proxy.telemetry.otel import OtelSink, build_otel_sink
from proxy.verdicts import Decision
from proxy.watch import FileWatcher
from proxy.workers import REUSE_PORT_ENV

log = structlog.get_logger("egress-warden")

MAINTENANCE_INTERVAL = 1.0
GRANTS_POLL = 0.25  # seconds: how soon another worker's grant or revocation is enforced here
FULL_RECONCILE_EVERY = 10  # maintenance ticks between full passes over the shared queue
DRAIN_POLL = 0.05  # seconds between checks for open connections while draining
# Seconds between re-reads of the machine's interface addresses (an interface may come up after
# start); the environment variable tunes it (tests use a short one).
LOCAL_ADDRESSES_EVERY = float(os.environ.get("EGRESS_WARDEN_ADDRESS_REFRESH", "30"))


class StartupError(Exception):
    """The process cannot start (port taken, bad state dir...): exit non-zero with this message."""


def reuse_port() -> bool:
    """Set for the workers of `run --workers N`: they all bind the same ports."""
    return os.environ.get(REUSE_PORT_ENV) == "1"


def bind(endpoint: Endpoint) -> socket.socket:
    """A listening, non-blocking socket on `endpoint` (StartupError when it is taken)."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port():
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((endpoint.host, endpoint.port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {endpoint}: {exc.strerror or exc}") from exc
    sock.listen(512)
    sock.setblocking(False)
    return sock


def check_free(endpoint: Endpoint) -> None:
    """Fail start-up early (before the store opens) when the proxy port is taken."""
    if endpoint.port != 0 and not reuse_port():
        bind(endpoint).close()


def local_addresses() -> list[IPAddress]:
    """Every address of every interface of this machine (what a wildcard listener accepts on)."""
    found: list[IPAddress] = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    with contextlib.suppress(OSError):
        for addresses in psutil.net_if_addrs().values():
            for address in addresses:
                if address.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                with contextlib.suppress(ValueError):
                    found.append(ipaddress.ip_address(address.address.partition("%")[0]))
    return found


def raise_open_file_limit() -> int:
    """Lift the soft limit on open files to the hard limit (each tunnel holds two sockets; the
    usual soft limit of 1024 would cap a proxy at ~500 tunnels). Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def console_address(sock: socket.socket) -> str:
    """The admin console's URL at the control listener (a wildcard listener: its loopback
    address, which the control API's Host check accepts, unlike a guessed name)."""
    host, port = sock.getsockname()[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{Endpoint(host, port)}/"


def loop_marker(token: str) -> str:
    """A per-instance `Via` token: shared by the workers and replicas of one state dir (they
    share the token), and telling nothing about the token itself."""
    return "egress-warden-" + hashlib.sha256(b"via:" + token.encode()).hexdigest()[:12]


def agents_path(cfg: RunConfig, policy: EffectivePolicy) -> Path | None:
    """The agents file in use: --agents, the policy's auth.agents_file, or <state>/agents.yaml."""
    if cfg.agents_file is not None:
        return cfg.agents_file
    if policy.agents_file is not None:
        return Path(policy.agents_file)
    default = cfg.state_dir / "agents.yaml"
    return default if default.exists() else None


def build_authenticator(cfg: RunConfig, policy: EffectivePolicy) -> Authenticator:
    """Agents configured: claimed identities must verify; required unless the policy says not.
    Raises AgentsFileError when the agents file is bad or per-agent rules have no registry."""
    path = agents_path(cfg, policy)
    problem = check_identity_config(policy, path)
    if problem is not None:
        raise AgentsFileError(problem)
    registry = AgentRegistry.load(path) if path is not None else None
    required = policy.auth_required if policy.auth_required is not None else path is not None
    return Authenticator(registry, required)


class PolicyReloader:
    """Re-reads policy, requirements and agents files; a bad file is rejected and the last
    good version stays in force; held requests the new rules decide are answered."""

    def __init__(self, cfg: RunConfig, gate: Gate, telemetry: Telemetry) -> None:
        self._cfg = cfg
        self._gate = gate
        self._telemetry = telemetry
        self._lock = asyncio.Lock()

    def _policy_paths(self) -> list[Path]:
        paths = [*self._cfg.policy_files]
        if self._cfg.requirements is not None:
            paths.append(self._cfg.requirements)
        return paths

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(str(p) for p in self._policy_paths())

    def watched(self) -> list[Path]:
        policy = self._gate.snapshot.policy
        agents = agents_path(self._cfg, policy) or self._cfg.state_dir / "agents.yaml"
        # Included files (presets) are watched too: editing one reloads like its includer.
        included = [Path(f) for f in policy.files if Path(f) not in self._policy_paths()]
        return [*self._policy_paths(), *dict.fromkeys(included), agents]

    def effective(self, policy: EffectivePolicy, warnings: list[str]) -> EffectivePolicy:
        if self._cfg.mode is None or self._cfg.mode is policy.mode:
            return policy
        if policy.mode_pinned:
            warnings.append(f"--mode {self._cfg.mode.value} ignored: the requirements pin the mode")
            return policy
        return replace(policy, mode=self._cfg.mode)

    def announce(self, warnings: list[str]) -> None:
        self._telemetry.emit(PolicyEvent("loaded", self.files))
        for warning in warnings:
            self._telemetry.emit(PolicyEvent("warning", self.files, warning))

    async def reload(self) -> ReloadResult:
        async with self._lock:
            files = self.files
            try:
                # Parsing is quick but touches the disk: keep it off the event loop.
                policy, warnings = await asyncio.to_thread(
                    load_effective, list(self._cfg.policy_files), self._cfg.requirements
                )
                auth = await asyncio.to_thread(build_authenticator, self._cfg, policy)
            except PolicyErrors as errors:
                messages = [str(e) for e in errors.errors]
                self._telemetry.emit(PolicyEvent("rejected", files, "; ".join(messages)))
                return ReloadResult(False, files, messages)
            except AgentsFileError as exc:
                self._telemetry.emit(PolicyEvent("rejected", files, str(exc)))
                return ReloadResult(False, files, [str(exc)])
            # Policy and identities change together: no request sees one without the other.
            current = self._gate.snapshot
            self._gate.snapshot = Snapshot(self.effective(policy, warnings), auth, current.guard)
            # A big policy is long-lived: keep the cyclic GC from re-scanning it (pauses).
            gc.freeze()
            self.announce(warnings)
        await warm_scanner(policy)
        await self._gate.reevaluate_pending()
        return ReloadResult(True, files, warnings)

    async def on_files_changed(self, changed: list[Path]) -> None:
        log.info("egress.policy.watch", changed=[str(p) for p in changed])
        await self.reload()


async def warm_scanner(policy: EffectivePolicy) -> None:
    """Build the credential scanner (importing detect-secrets, about 60 ms) off the event loop
    as soon as a policy inspects with scanning on, not at its first inspected request."""
    if any(rule.scan is not ScanMode.OFF for rule in policy.inspect):
        await asyncio.to_thread(detectors)


def _check_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url if "://" in url else "https://" + url)
    return parts.path or "/", parts.query


class _ControlServer(uvicorn.Server):
    """uvicorn without its own signal handling: SIGTERM belongs to the service's drain (uvicorn
    would otherwise take the signal, stop the control API first and re-raise it later)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Service:
    """One running egress-warden, minus the proxy engine: build with `start()`, tell it where
    the proxy listens with `proxy_listening()`, stop with `drain()` then `close()`."""

    def __init__(self, cfg: RunConfig, policy: EffectivePolicy, warnings: Sequence[str]) -> None:
        self.cfg = cfg
        self._initial_policy = policy
        self._initial_warnings = list(warnings)
        self._tasks: list[asyncio.Task[None]] = []
        self._proxy_listeners: list[Listener] = []
        self._ready = False
        self._draining = False
        self._closers: list[Callable[[], object]] = []
        self.store: Store | None = None
        self.notifier: Notifier | None = None
        self.otel: OtelSink | None = None
        self.control: _ControlServer | None = None
        self._control_task: asyncio.Task[None] | None = None

    # -- start-up ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, telemetry and the control API; raise StartupError on any problem."""
        cfg, policy = self.cfg, self._initial_policy
        try:
            secure_state_dir(cfg.state_dir)
            make_private_dir(cfg.state_dir / "ca")  # mitmproxy's CA keys live there
        except OSError as exc:
            raise StartupError(f"state dir {cfg.state_dir}: {exc.strerror or exc}") from exc
        try:
            auth = build_authenticator(cfg, policy)
        except AgentsFileError as exc:
            raise StartupError(str(exc)) from exc
        self.open_files = raise_open_file_limit()
        check_free(cfg.listen)
        self.control_sock = bind(cfg.control)
        self._closers.append(self.control_sock.close)
        try:
            token = load_control_token(cfg.state_dir)
        except WeakTokenError as exc:
            self._close_now()
            raise StartupError(str(exc)) from exc
        self.marker = loop_marker(token)
        # A policy's `telemetry:` section fills in OTEL_* variables the environment does not set.
        for name, value in policy.telemetry.items():
            os.environ.setdefault(name, value)
        try:
            self.otel = build_otel_sink()
        except ValueError as exc:
            self._close_now()
            raise StartupError(f"OpenTelemetry configuration: {exc}") from exc
        # The SDK logs plain-text lines of its own; the sink reports drops and failures as JSON.
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
        try:
            self.store = await open_store(cfg.store_url)
        except StoreError as exc:
            self._close_now()
            raise StartupError(str(exc)) from exc

        self.bus = EventBus()
        self.audit = AuditWriter(self.store, cfg.audit_max_age, cfg.audit_per_agent)
        sinks: list[Sink] = [StructlogSink(), AuditSink(self.audit, self.bus)]
        if self.otel is not None:
            sinks.append(self.otel)
        self.telemetry = Telemetry(sinks)
        self.grants = GrantIndex()
        # Webhooks read the targets in force on every event (a reload changes them); console
        # links default to the control listener's own address.
        self.notifier = Notifier(
            lambda: self.gate.snapshot.policy.approval,
            console_address(self.control_sock),
            report=self.telemetry.emit,
        )
        self.approvals = ApprovalQueue(
            self.store, self.grants, self.telemetry, self.bus, notifier=self.notifier
        )
        guard = NetGuard([], local_addresses())
        self.gate = Gate(
            Snapshot(policy, auth, guard),
            Resolver(cfg.resolve, nameservers=cfg.nameservers),
            self.telemetry,
            self.grants,
            self.approvals,
            self.audit.commit,
        )
        self.reloader = PolicyReloader(cfg, self.gate, self.telemetry)
        warnings = list(self._initial_warnings)
        self.gate.snapshot = replace(
            self.gate.snapshot, policy=self.reloader.effective(policy, warnings)
        )
        self.reloader.announce(warnings)
        await warm_scanner(policy)
        try:
            self.restored = await self.approvals.start()
        except StoreError as exc:
            await self.store.close()
            self._close_now()
            raise StartupError(str(exc)) from exc
        if self.otel is not None:
            self.otel.watch_pending(self.approvals.pending_count)

        ctx = ControlContext(
            token=token,
            is_ready=lambda: self._ready,
            policy=lambda: self.gate.snapshot.policy,
            approvals=self.approvals,
            grants=self.grants,
            store=self.store,
            audit=self.audit,
            bus=self.bus,
            reload=self.reloader.reload,
            check=self.check,
            rules_changed=self.gate.reevaluate_pending,
            verify=control_verifier(token, cfg.state_dir),  # bootstrap + <state>/admins.yaml
            hosts=cfg.control_hosts,
        )
        control_cfg = uvicorn.Config(
            create_app(ctx),
            log_config=None,
            access_log=False,
            lifespan="off",
            **control_server_options(),  # per-client cap, head deadline, bounded heads
        )
        self.control = _ControlServer(control_cfg)
        self._control_task = asyncio.create_task(self.control.serve(sockets=[self.control_sock]))
        self.audit.start()
        self._tasks.append(asyncio.create_task(self._maintenance()))
        self._tasks.append(asyncio.create_task(self._poll_grants()))
        watcher = FileWatcher(self.reloader.watched(), self.reloader.on_files_changed)
        self._tasks.append(asyncio.create_task(watcher.run()))

    def _close_now(self) -> None:
        for closer in self._closers:
            with contextlib.suppress(OSError):
                closer()
        self._closers.clear()

    def proxy_listening(self, addresses: Sequence[tuple[str, int]]) -> None:
        """The proxy listens on `addresses`: they (and the control API) are now the proxy
        itself for the network guard; announce readiness."""
        self._proxy_listeners = [
            Listener(ipaddress.ip_address(str(host).partition("%")[0]), int(port))
            for host, port in addresses
        ]
        self._refresh_guard()
        self._ready = True
        snap = self.gate.snapshot
        control = self.control_sock.getsockname()
        host, port = addresses[0]
        log.info(
            "egress.listening",
            proxy=f"{host}:{port}",
            control=f"{control[0]}:{control[1]}",
            mode=snap.policy.mode.value,
            pid=os.getpid(),
            rules=len(snap.policy.allow) + len(snap.policy.deny),
            auth="required" if snap.auth.required else "optional",
            agents=len(snap.auth.registry) if snap.auth.registry is not None else 0,
            grants=len(self.grants.all()),
            pending=self.restored,
            open_files=self.open_files,
            store=self.cfg.store_url.split("://", 1)[0],
        )

    def _refresh_guard(self) -> None:
        control = self.control_sock.getsockname()
        listeners = [
            *self._proxy_listeners,
            Listener(ipaddress.ip_address(control[0]), int(control[1])),
        ]
        guard = NetGuard(listeners, local_addresses())
        self.gate.snapshot = replace(self.gate.snapshot, guard=guard)

    async def _maintenance(self) -> None:
        """Expire old items, reconcile with the shared store (a lost notification is not
        lost), and re-read the machine's addresses (an interface may come up later)."""
        ticks = 0
        addresses_read = time.monotonic()
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            ticks += 1
            try:
                await self.approvals.expire()
                await self.approvals.reconcile(full=ticks % FULL_RECONCILE_EVERY == 0)
            except StoreError as exc:
                log.warning("egress.store", error=str(exc))
            if self._ready and time.monotonic() - addresses_read >= LOCAL_ADDRESSES_EVERY:
                addresses_read = time.monotonic()
                await asyncio.to_thread(self._refresh_guard)

    async def _poll_grants(self) -> None:
        """Grants made, revoked or used up by another worker or replica reach this one within
        GRANTS_POLL (one small query per poll when nothing changed)."""
        while True:
            await asyncio.sleep(GRANTS_POLL)
            try:
                await self.approvals.poll_grants()
            except StoreError as exc:
                log.warning("egress.store", error=str(exc))

    # -- dry runs ----------------------------------------------------------------------------

    async def check(self, url: str, method: str, agent: str | None) -> Decision:
        """`POST /v1/check`: the live path's decision for `url`, without holding (BadURL: 422)."""
        facts: RequestFacts = facts_from_url(url, method, agent)
        path, _ = _check_url(url)
        return await self.gate.dry_run(facts, inner=(method.upper(), path))

    # -- shutdown ----------------------------------------------------------------------------

    async def drain(self, grace: float, open_connections: Callable[[], int]) -> None:
        """Answer held requests now (403 approval_pending, with their records), then give open
        connections up to `grace` seconds to finish. The caller has stopped accepting."""
        if self._draining:
            return
        self._draining = True
        self._ready = False
        log.info("egress.draining", grace_s=grace, connections=open_connections())
        self.approvals.drain()
        # Polled: connections end inside mitmproxy, which offers no event to wait on.
        for _ in range(max(1, int(grace / DRAIN_POLL))):
            if open_connections() == 0:
                break
            await asyncio.sleep(DRAIN_POLL)
        await self.audit.flush()

    async def close(self) -> None:
        """Stop everything started by `start()`; the audit is flushed before the store closes."""
        for task in self._tasks:
            task.cancel()
        if self.control is not None:
            self.control.should_exit = True
        if self._control_task is not None:
            await asyncio.wait([self._control_task], timeout=5)
        await self.audit.stop()
        if self.notifier is not None:
            await self.notifier.close(grace=2.0)
        if self.store is not None:
            with contextlib.suppress(StoreError):
                await self.store.close()
        if self.otel is not None:
            await asyncio.to_thread(self.otel.shutdown, 3.0)
        self._close_now()
