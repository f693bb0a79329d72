"""Builds and runs the embedded mitmproxy master with only the addons the product needs."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import socket
from dataclasses import replace

import structlog
import uvicorn
from mitmproxy import options
from mitmproxy.addons import core, disable_h2c, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from addons.warden import EgressWarden
from proxy.config import Endpoint, RunConfig
from proxy.control.app import create_app
from proxy.control.token import load_or_create_token
from proxy.gate import Gate, PolicyState
from proxy.hosts import IPAddress
from proxy.netguard import Listener, NetGuard
from proxy.policy.model import EffectivePolicy
from proxy.resolve import Resolver
from proxy.telemetry import PolicyEvent, Telemetry
from proxy.telemetry.hub import StructlogSink

log = structlog.get_logger("egress-warden")


class StartupError(Exception):
    """The process cannot start (port taken, bad state dir...): exit non-zero with this message."""


def _bind(endpoint: Endpoint) -> socket.socket:
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((endpoint.host, endpoint.port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {endpoint}: {exc.strerror or exc}") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _check_free(endpoint: Endpoint) -> None:
    if endpoint.port != 0:
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


async def serve(cfg: RunConfig, policy: EffectivePolicy) -> int:
    """Run the proxy and the control API until SIGINT/SIGTERM. Returns the exit code."""
    if cfg.mode is not None:
        policy = replace(policy, mode=cfg.mode)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    _check_free(cfg.listen)
    control_sock = _bind(cfg.control)
    token = load_or_create_token(cfg.state_dir)
    del token  # the full control API arrives with approvals; the token file exists from now on

    telemetry = Telemetry([StructlogSink()])
    telemetry.emit(PolicyEvent("loaded", policy.files))
    state = PolicyState(policy)
    gate = Gate(state, Resolver(cfg.resolve), NetGuard([]), telemetry)

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
    master.options.update(
        stream_large_bodies=cfg.stream_large_bodies,
        connection_strategy="eager",
        emudhra=False,
        emudhra_old=False,
    )

    def proxy_ready() -> bool:
        return bool(ps.is_running and ps.listen_addrs())

    control_cfg = uvicorn.Config(
        create_app(proxy_ready), log_config=None, access_log=False, lifespan="off"
    )
    control = uvicorn.Server(control_cfg)
    control_task = asyncio.create_task(control.serve(sockets=[control_sock]))

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
            mode=policy.mode.value,
            rules=len(policy.allow) + len(policy.deny),
        )

    announce_task = asyncio.create_task(announce())
    try:
        await master.run()
    finally:
        announce_task.cancel()
        control.should_exit = True
        await asyncio.wait([control_task], timeout=5)
    return 0
