"""Embeds mitmproxy around the application: the proxy engine with only the addons the product
needs, in the same event loop as the control API (see `proxy/service.py` for the rest)."""

from __future__ import annotations

import asyncio
import gc
import signal
from typing import Any

import structlog
from mitmproxy import options
from mitmproxy.addons import core, disable_h2c, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master
from mitmproxy.proxy import layer, mode_servers

from addons import socks, transparent
from addons.http_guard import HttpGuard
from addons.relay import RelayMode, RelaySettings, relay_mode
from addons.warden import EgressWarden
from proxy.config import RunConfig
from proxy.dnsserver import DnsListener, PolicyDns
from proxy.policy.model import EffectivePolicy
from proxy.service import Service, StartupError, reuse_port

__all__ = ["StartupError", "serve"]

log = structlog.get_logger("egress-warden")


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


class _NextLayer(next_layer.NextLayer):
    """mitmproxy's choice of layer, except for admitted raw tunnels: those wait for their
    ClientHello and are the warden's to decide (mitmproxy would intercept TLS)."""

    def __init__(self, warden: EgressWarden) -> None:
        super().__init__()
        self._warden = warden

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if self._warden.owns(nextlayer):
            return
        super().next_layer(nextlayer)


def _modes(cfg: RunConfig) -> list[str]:
    """The regular proxy on `--listen`, a SOCKS5 listener on `--socks` and a transparent one
    on `--transparent` if asked for."""
    modes = ["regular"]
    # mitmproxy's spec splits the port at the last colon: IPv6 hosts go unbracketed.
    if cfg.socks is not None:
        socks.install()
        modes.append(f"socks5@{cfg.socks.host}:{cfg.socks.port}")
    if cfg.transparent is not None:
        transparent.install()
        modes.append(f"transparent@{cfg.transparent.host}:{cfg.transparent.port}")
    return modes


def _proxy_options(cfg: RunConfig) -> options.Options:
    return options.Options(
        listen_host=cfg.listen.host,
        listen_port=cfg.listen.port,
        mode=_modes(cfg),
        confdir=str(cfg.state_dir / "ca"),
    )


async def serve(cfg: RunConfig, policy: EffectivePolicy, warnings: list[str]) -> int:
    """Run the proxy and the control API until SIGINT/SIGTERM (then drain). Returns 0."""
    try:
        mode = relay_mode()
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    service = Service(cfg, policy, warnings)
    await service.start()

    if reuse_port():
        _listen_with_reuse_port()
    master = Master(_proxy_options(cfg), event_loop=asyncio.get_running_loop())
    ps = proxyserver.Proxyserver()

    def close_client(client_id: str) -> None:
        handler = ps.connections.get(client_id)
        if handler is not None:
            handler.close_connection(handler.client)

    # Admitted raw tunnels leave mitmproxy's event pump for the relay (addons/relay.py).
    relay = None if mode is RelayMode.MITMPROXY else RelaySettings(mode, ps.connections.get)
    warden = EgressWarden(service.gate, service.marker, close_client, relay)
    # The policy-aware DNS tells the transparent edge which name an address was handed out for
    # (a synthetic address, or an allowed name's real one), so a connection that names nothing
    # is decided by that name before the gate decides.
    dns_server = PolicyDns(service.gate)
    edge = transparent.TransparentEdge(
        warden, transparent.SourceAgents(cfg.source_agents), dns_server.name_for
    )
    master.addons.add(
        core.Core(),
        HttpGuard(),  # the request head's limits, before any other addon sees a request
        warden,  # before NextLayer: our next_layer decides tunnels first
        edge,
        ps,
        _NextLayer(warden),
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

    async def announce() -> None:
        # Every listener (the SOCKS one too) up, so the guard knows them all as the proxy.
        while not (ps.is_running and ps.listen_addrs() and all(s.listen_addrs for s in ps.servers)):
            if master.should_exit.is_set():
                return
            await asyncio.sleep(0.02)
        service.proxy_listening([(str(a[0]), int(a[1])) for a in ps.listen_addrs()])
        for server in ps.servers:
            if server.mode.type_name in ("socks5", "transparent") and server.listen_addrs:
                host, port = server.listen_addrs[0][:2]
                kind = "socks" if server.mode.type_name == "socks5" else "transparent"
                log.info(f"egress.{kind}.listening", **{kind: f"{host}:{port}"})

    async def drain() -> None:
        # Refuse new connections first, answer held requests, let open tunnels finish.
        await ps.servers.update([])
        await service.drain(cfg.drain, lambda: len(ps.connections))
        master.shutdown()

    drain_task: asyncio.Task[None] | None = None

    def on_signal() -> None:
        nonlocal drain_task
        if drain_task is None:
            drain_task = asyncio.create_task(drain())
        else:
            master.shutdown()  # a second signal: stop now

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    dns_listener: DnsListener | None = None
    if cfg.dns is not None:
        dns_listener = DnsListener(dns_server)
        try:
            await dns_listener.start(cfg.dns)
        except OSError as exc:
            await service.close()
            raise StartupError(
                f"cannot listen for DNS on {cfg.dns}: {exc.strerror or exc}"
            ) from exc
    announce_task = asyncio.create_task(announce())
    # Everything built so far (policy, matchers, mitmproxy) lives for the whole run: freezing it
    # keeps full garbage collections short (they otherwise paused a 100k-rule proxy ~0.5 s).
    gc.freeze()
    try:
        await master.run()
    finally:
        announce_task.cancel()
        if drain_task is not None and not drain_task.done():
            drain_task.cancel()
        warden.close_all()
        if dns_listener is not None:
            await dns_listener.close()
        await service.close()
    return 0
