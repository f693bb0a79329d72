"""A sidecar's network, in two network namespaces the test creates: the agent's (client) and
the proxy's (gateway). The client's only link leads to the gateway, whose nftables rules
redirect every TCP connection from the client to the transparent listener and DNS to the DNS
listener, and drop everything else. Nothing here touches the machine's own namespace.

Code that must open sockets inside a namespace runs in a thread of its own that joined it
(`in_namespace`): sockets keep the namespace they were created in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

GATEWAY_IP = "10.77.0.1"  # the proxy's side of the link
CLIENT_IP = "10.77.0.2"  # the agent's address (a `--source-agent` key)
ELSEWHERE_IP = "10.77.5.5"  # an address "out there": only reachable through the redirect


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def in_namespace[T](ns: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a new thread that joined network namespace `ns`; return its result."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            with open(f"/run/netns/{ns}") as handle:
                os.setns(handle.fileno(), os.CLONE_NEWNET)
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def redirect_rules(transparent_port: int, dns_port: int) -> str:
    """The gateway's nftables rules: the client's TCP -> the transparent listener, its DNS
    (UDP and TCP 53) -> the DNS listener, everything else from the client dropped."""
    return f"""
table inet sidecar_test {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "vp" udp dport 53 redirect to :{dns_port}
    iifname "vp" tcp dport 53 redirect to :{dns_port}
    iifname "vp" meta l4proto tcp redirect to :{transparent_port}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "vp" ct state established,related accept
    iifname "vp" tcp dport {{ {transparent_port}, {dns_port} }} accept
    iifname "vp" udp dport {dns_port} accept
    iifname "vp" drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
  }}
}}
"""


@dataclass(frozen=True)
class SidecarNet:
    proxy_ns: str
    client_ns: str

    def client(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command in the client namespace (no proxy variables at all)."""
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        return subprocess.run(
            ["ip", "netns", "exec", self.client_ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )

    def client_bg(self, *argv: str) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        return subprocess.Popen(
            ["ip", "netns", "exec", self.client_ns, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    @property
    def proxy_prefix(self) -> Sequence[str]:
        return ("ip", "netns", "exec", self.proxy_ns)

    def redirect(self, transparent_port: int, dns_port: int) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.proxy_ns, "nft", "-f", "-"],
            input=redirect_rules(transparent_port, dns_port),
            text=True,
            check=True,
            capture_output=True,
            timeout=10,
        )


def require_tools(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.fail("network namespaces need root")
    missing = [t for t in ("ip", "nft", *tools) if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: apt-get install iproute2 nftables dnsutils curl")


@contextmanager
def sidecar_net(tag: str) -> Iterator[SidecarNet]:
    """Two fresh namespaces joined by a veth pair; the client's default route is the gateway."""
    proxy_ns, client_ns = f"ew{tag}p{os.getpid()}", f"ew{tag}c{os.getpid()}"
    _ip("netns", "add", proxy_ns)
    try:
        _ip("netns", "add", client_ns)
        _ip("-n", proxy_ns, "link", "set", "lo", "up")
        _ip("-n", client_ns, "link", "set", "lo", "up")
        _ip("-n", proxy_ns, "link", "add", "vp", "type", "veth", "peer", "name", "vc")
        _ip("-n", proxy_ns, "link", "set", "vc", "netns", client_ns)
        _ip("-n", proxy_ns, "addr", "add", f"{GATEWAY_IP}/24", "dev", "vp")
        _ip("-n", client_ns, "addr", "add", f"{CLIENT_IP}/24", "dev", "vc")
        _ip("-n", proxy_ns, "link", "set", "vp", "up")
        _ip("-n", client_ns, "link", "set", "vc", "up")
        _ip("-n", client_ns, "route", "add", "default", "via", GATEWAY_IP)
        yield SidecarNet(proxy_ns, client_ns)
    finally:
        for ns in (client_ns, proxy_ns):
            subprocess.run(["ip", "netns", "delete", ns], check=False, timeout=10)
