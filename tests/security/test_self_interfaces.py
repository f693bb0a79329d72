"""The proxy itself on every interface: with wildcard listeners, a request to any local
address at the proxy's or the control API's port is refused, including an address that
appears after start. Runs the proxy in a network namespace of its own, with a veth interface
whose address exists only there (nothing is sent off this machine)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxy import ProxyProcess, free_port, start_proxy

pytestmark = pytest.mark.e2e

FIRST = "10.231.0.1"  # present at start
LATER = "10.231.0.2"  # added while the proxy runs


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("network namespaces need root and iproute2 (apt-get install iproute2)")
    name = f"ewself{os.getpid()}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        # A veth pair with both ends inside the namespace (no dummy module needed).
        _ip("-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        _ip("-n", name, "addr", "add", f"{FIRST}/24", "dev", "d0")
        _ip("-n", name, "link", "set", "d0", "up")
        _ip("-n", name, "link", "set", "d1", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=10)


def _curl(ns: str, *args: str) -> tuple[str, str]:
    """(status, reason header) of a curl run inside the namespace."""
    result = subprocess.run(
        [
            *("ip", "netns", "exec", ns, "curl", "-q", "-s", "-o", "/dev/null", "-D", "-"),
            *("--noproxy", "", "--max-time", "5", *args),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    status, reason = "", ""
    for line in result.stdout.splitlines():
        if line.startswith("HTTP/"):
            status = line.split()[1]
        if line.lower().startswith("x-egress-warden-reason:"):
            reason = line.split(":", 1)[1].strip()
    return status, reason


def test_every_local_address_is_the_proxy_itself(namespace: str, tmp_path: Path) -> None:
    proxy_port, control_port = free_port(), free_port()
    policy = tmp_path / "policy.yaml"
    # Everything local is explicitly allowed: only the self guard may stop these requests.
    policy.write_text(
        "version: 1\ndefault: allow\nallow: [10.231.0.0/24]\n"
        f"network: {{ports: [{proxy_port}, {control_port}]}}\n"
    )
    proc: ProxyProcess = start_proxy(
        tmp_path / "state",
        [policy],
        listen=f"0.0.0.0:{proxy_port}",
        control=f"0.0.0.0:{control_port}",
        prefix=["ip", "netns", "exec", namespace],
        env={"EGRESS_WARDEN_ADDRESS_REFRESH": "0.5"},
    )
    try:
        proxy = f"http://127.0.0.1:{proxy_port}"
        # The control API really answers on the interface address (so the test can fail).
        assert _curl(namespace, f"http://{FIRST}:{control_port}/healthz")[0] == "200"
        for port in (control_port, proxy_port):
            url = f"http://{FIRST}:{port}/v1/pending"
            assert _curl(namespace, "-x", proxy, url) == ("403", "private_network"), url
            tunnel = _curl(namespace, "-x", proxy, "-p", f"https://{FIRST}:{port}/")
            assert tunnel == ("403", "private_network"), port
        _ip("-n", namespace, "addr", "add", f"{LATER}/24", "dev", "d0")
        assert _curl(namespace, f"http://{LATER}:{control_port}/healthz")[0] == "200"
        deadline = time.monotonic() + 10
        answer: tuple[str, str] = ("", "")
        while time.monotonic() < deadline:
            answer = _curl(namespace, "-x", proxy, f"http://{LATER}:{control_port}/v1/pending")
            if answer == ("403", "private_network"):
                break
            time.sleep(0.3)
        assert answer == ("403", "private_network")
    finally:
        proc.stop()
