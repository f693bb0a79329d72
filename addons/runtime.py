"""Builds and runs the embedded mitmproxy master with only the addons the product needs,
plus the control API on its own listener in the same event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from mitmproxy import options
from mitmproxy.addons import core, disable_h2c, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master
from mitmproxy.proxy import mode_servers

from addons.warden import EgressWarden
from proxy.agents import AgentRegistry, AgentsFileError
from proxy.approvals import ApprovalQueue
from proxy.audit import AuditSink, AuditWriter
from proxy.auth import Authenticator
from proxy.config import Endpoint, RunConfig
from proxy.control.app import ControlContext, ReloadResult, create_app
from proxy.control.token import load_or_create_token
from proxy.eventbus import EventBus
from proxy.facts import facts_from_url
from proxy.gate import Gate, PolicyState
from proxy.grants import GrantIndex
from proxy.hosts import IPAddress
from proxy.netguard import Listener, NetGuard
from proxy.policy.load import PolicyErrors
from proxy.policy.model import EffectivePolicy
from proxy.policy.requirements import load_effective
from proxy.resolve import Resolver
from proxy.store import StoreError, open_store
from proxy.telemetry import PolicyEvent, Telemetry
from proxy.telemetry.hub import Sink, StructlogSink
from proxy.telemetry.otel import OtelSink, build_otel_sink
from proxy.watch import FileWatcher
from proxy.workers import REUSE_PORT_ENV

log = structlog.get_logger("egress-warden")

EXPIRY_INTERVAL = 1.0


class StartupError(Exception):
    """The process cannot start (port taken, bad state dir...): exit non-zero with this message."""


def _reuse_port() -> bool:
    """Set for the workers of `run --workers N`: they all bind the same ports."""
    return os.environ.get(REUSE_PORT_ENV) == "1"


class _ReusePortAsyncio:
    """asyncio as mitmproxy's listener module sees it, with SO_REUSEPORT on start_server."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def start_server(*args: Any, **kwargs: Any) -> asyncio.Server:
        kwargs.setdefault("reuse_port", True)
        return await asyncio.start_server(*args, **kwargs)


def _listen_with_reuse_port() -> None:
    # mitmproxy has no option for SO_REUSEPORT; its listener calls asyncio.start_server.
    mode_servers.asyncio = _ReusePortAsyncio()  # type: ignore[attr-defined,assignment]


def _bind(endpoint: Endpoint) -> socket.socket:
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if _reuse_port():
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((endpoint.host, endpoint.port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {endpoint}: {exc.strerror or exc}") from exc
    sock.listen(512)
    sock.setblocking(False)
    return sock


def _check_free(endpoint: Endpoint) -> None:
    if endpoint.port != 0 and not _reuse_port():
        _bind(endpoint).close()


def _local_addresses() -> list[IPAddress]:
    found: list[IPAddress] = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.append(ipaddress.ip_address(str(info[4][0]).partition("%")[0]))
    except (OSError, ValueError):
        pass  # best effort: loopback is always covered
    return found


def _proxy_options(cfg: RunConfig) -> options.Options:
    return options.Options(
        listen_host=cfg.listen.host,
        listen_port=cfg.listen.port,
        mode=["regular"],
        confdir=str(cfg.state_dir / "ca"),
    )


def agents_path(cfg: RunConfig, policy: EffectivePolicy) -> Path | None:
    """The agents file in use: --agents, the policy's auth.agents_file, or <state>/agents.yaml."""
    if cfg.agents_file is not None:
        return cfg.agents_file
    if policy.agents_file is not None:
        return Path(policy.agents_file)
    default = cfg.state_dir / "agents.yaml"
    return default if default.exists() else None


def build_authenticator(cfg: RunConfig, policy: EffectivePolicy) -> Authenticator:
    """Agents configured: claimed identities must verify; required unless the policy says not."""
    path = agents_path(cfg, policy)
    registry = AgentRegistry.load(path) if path is not None else None
    required = policy.auth_required if policy.auth_required is not None else path is not None
    return Authenticator(registry, required)


class PolicyReloader:
    """Re-reads policy, requirements and agents files; a bad file is rejected and the last
    good version stays in force; held requests the new rules decide are answered."""

    def __init__(
        self, cfg: RunConfig, state: PolicyState, telemetry: Telemetry, gate: Gate | None = None
    ) -> None:
        self._cfg = cfg
        self._state = state
        self._telemetry = telemetry
        self.gate = gate
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
        agents = agents_path(self._cfg, self._state.current) or self._cfg.state_dir / "agents.yaml"
        return [*self._policy_paths(), agents]

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
            self._state.current = self.effective(policy, warnings)
            if self.gate is not None:
                self.gate.auth = auth
            # A big policy is long-lived: keep the cyclic GC from re-scanning it (pauses).
            gc.freeze()
            self.announce(warnings)
        if self.gate is not None:
            await self.gate.reevaluate_pending()
        return ReloadResult(True, files, warnings)

    async def on_files_changed(self, changed: list[Path]) -> None:
        log.info("egress.policy.watch", changed=[str(p) for p in changed])
        await self.reload()


async def _maintenance_loop(approvals: ApprovalQueue) -> None:
    """Expire old items and reconcile with the shared store (a lost notification is not lost)."""
    while True:
        await asyncio.sleep(EXPIRY_INTERVAL)
        try:
            await approvals.expire()
            await approvals.reconcile()
        except StoreError as exc:
            log.warning("egress.store", error=str(exc))


async def serve(cfg: RunConfig, policy: EffectivePolicy, warnings: list[str]) -> int:
    """Run the proxy and the control API until SIGINT/SIGTERM. Returns the exit code."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        auth = build_authenticator(cfg, policy)
    except AgentsFileError as exc:
        raise StartupError(str(exc)) from exc
    _check_free(cfg.listen)
    control_sock = _bind(cfg.control)
    token = load_or_create_token(cfg.state_dir)
    # A policy's `telemetry:` section fills in OTEL_* variables the environment does not set.
    for name, value in policy.telemetry.items():
        os.environ.setdefault(name, value)
    try:
        otel: OtelSink | None = build_otel_sink()
    except ValueError as exc:
        control_sock.close()
        raise StartupError(f"OpenTelemetry configuration: {exc}") from exc
    # The SDK logs plain-text lines of its own; the sink reports drops and failures as JSON.
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
    try:
        store = await open_store(cfg.store_url)
    except StoreError as exc:
        control_sock.close()
        raise StartupError(str(exc)) from exc

    bus = EventBus()
    audit = AuditWriter(store, cfg.audit_retention)
    sinks: list[Sink] = [StructlogSink(), AuditSink(audit, bus)]
    if otel is not None:
        sinks.append(otel)
    telemetry = Telemetry(sinks)
    state = PolicyState(policy)
    reloader = PolicyReloader(cfg, state, telemetry)
    warnings = list(warnings)
    state.current = reloader.effective(policy, warnings)
    reloader.announce(warnings)

    grants = GrantIndex()
    approvals = ApprovalQueue(store, grants, telemetry, bus)
    try:
        restored = await approvals.start()
    except StoreError as exc:
        control_sock.close()
        raise StartupError(str(exc)) from exc
    if otel is not None:
        otel.watch_pending(approvals.pending_count)
    gate = Gate(state, Resolver(cfg.resolve), NetGuard([]), telemetry, grants, approvals, auth)
    reloader.gate = gate

    if _reuse_port():
        _listen_with_reuse_port()
    master = Master(_proxy_options(cfg), event_loop=asyncio.get_running_loop())
    ps = proxyserver.Proxyserver()
    master.addons.add(
        core.Core(),
        EgressWarden(gate),  # before NextLayer: our next_layer decides tunnels first
        ps,
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        disable_h2c.DisableH2C(),
        errorcheck.ErrorCheck(repeat_errors_on_stderr=True),
    )
    # Large bodies are streamed, never buffered whole; the eMudhra signing options stay off.
    if cfg.upstream_ca is not None:
        master.options.update(ssl_verify_upstream_trusted_ca=str(cfg.upstream_ca))
    master.options.update(
        stream_large_bodies=cfg.stream_large_bodies,
        connection_strategy="eager",
        emudhra=False,
        emudhra_old=False,
    )

    def proxy_ready() -> bool:
        return bool(ps.is_running and ps.listen_addrs())

    ctx = ControlContext(
        token=token,
        is_ready=proxy_ready,
        policy=lambda: state.current,
        approvals=approvals,
        grants=grants,
        store=store,
        audit=audit,
        bus=bus,
        reload=reloader.reload,
        facts_for=facts_from_url,
        rules_changed=gate.reevaluate_pending,
    )
    control_cfg = uvicorn.Config(create_app(ctx), log_config=None, access_log=False, lifespan="off")
    control = uvicorn.Server(control_cfg)
    control_task = asyncio.create_task(control.serve(sockets=[control_sock]))
    audit.start()
    expiry_task = asyncio.create_task(_maintenance_loop(approvals))
    watcher = FileWatcher(reloader.watched(), reloader.on_files_changed)
    watch_task = asyncio.create_task(watcher.run())

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)

    async def announce() -> None:
        while not proxy_ready():
            if master.should_exit.is_set():
                return
            await asyncio.sleep(0.02)
        listeners = [
            Listener(ipaddress.ip_address(str(a[0]).partition("%")[0]), int(a[1]))
            for a in ps.listen_addrs()
        ]
        control_addr = control_sock.getsockname()
        listeners.append(Listener(ipaddress.ip_address(control_addr[0]), int(control_addr[1])))
        gate.guard = NetGuard(listeners, _local_addresses())
        proxy_addr = ps.listen_addrs()[0]
        log.info(
            "egress.listening",
            proxy=f"{proxy_addr[0]}:{proxy_addr[1]}",
            control=f"{control_addr[0]}:{control_addr[1]}",
            mode=state.current.mode.value,
            pid=os.getpid(),
            rules=len(state.current.allow) + len(state.current.deny),
            auth="required" if auth.required else "optional",
            agents=len(auth.registry) if auth.registry is not None else 0,
            grants=len(grants.all()),
            pending=restored,
            store=cfg.store_url.split("://", 1)[0],
        )

    announce_task = asyncio.create_task(announce())
    # Everything built so far (policy, matchers, mitmproxy) lives for the whole run: freezing it
    # keeps full garbage collections short (they otherwise paused a 100k-rule proxy ~0.5 s).
    gc.freeze()
    try:
        await master.run()
    finally:
        for task in (announce_task, expiry_task, watch_task):
            task.cancel()
        control.should_exit = True
        await asyncio.wait([control_task], timeout=5)
        await audit.stop()
        with contextlib.suppress(StoreError):
            await store.close()
        if otel is not None:
            await asyncio.to_thread(otel.shutdown, 3.0)
    return 0
