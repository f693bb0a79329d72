"""Run configuration assembled by the CLI."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from proxy.hosts import IPAddress
from proxy.policy.model import Mode


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """Parse `HOST:PORT` (`[v6]:PORT` for IPv6); port 0 means any free port."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return Endpoint(host.strip("[]"), int(port_text))


def parse_source_agent(text: str) -> tuple[str, str]:
    """Parse `CIDR=AGENT` (`10.0.0.5=ci-bot`, `10.1.0.0/16=builder`) for transparent mode."""
    network, sep, agent = text.partition("=")
    if not sep or not agent:
        raise ValueError(f"--source-agent {text!r}: expected CIDR=AGENT")
    try:
        canonical = ipaddress.ip_network(network.strip(), strict=False)
    except ValueError as exc:
        raise ValueError(f"--source-agent {text!r}: {exc}") from exc
    return str(canonical), agent.strip()


@dataclass(frozen=True)
class RunConfig:
    policy_files: tuple[Path, ...]
    listen: Endpoint
    control: Endpoint
    state_dir: Path
    mode: Mode | None = None
    requirements: Path | None = None
    agents_file: Path | None = None
    resolve: dict[str, IPAddress] = field(default_factory=dict)
    store: str | None = None  # default: sqlite:///<state_dir>/warden.db
    audit_max_age: float = 30 * 86400.0  # seconds a decision row is kept
    audit_per_agent: int = 100_000  # decision rows kept per agent
    upstream_ca: Path | None = None  # extra CA bundle to verify upstreams of inspected hosts
    stream_large_bodies: str = "1m"
    nameservers: tuple[tuple[str, int], ...] = ()  # empty: the system resolver
    drain: float = 10.0  # seconds open connections get to finish after SIGTERM
    socks: Endpoint | None = None  # a SOCKS5 listener too (`run --socks H:P`)
    control_hosts: tuple[str, ...] = ()  # Host names the control API answers to (--control-host)
    transparent: Endpoint | None = None  # kernel-redirected connections (`run --transparent`)
    dns: Endpoint | None = None  # the policy-aware DNS listener (`run --dns H:P`)
    # Identity in transparent mode: source network -> agent id (`--source-agent CIDR=ID`).
    source_agents: tuple[tuple[str, str], ...] = ()

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{(self.state_dir / 'warden.db').resolve()}"
