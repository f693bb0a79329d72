"""Fixtures that own real processes and ports: upstream servers, the trustme CA, the proxy."""

from __future__ import annotations

import shutil
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.support.proxy import ProxyProcess, start_proxy
from tests.support.upstream import Upstream, start_upstream

# Upstreams the policy may reach live on 127.0.0.2 (exempted by an explicit CIDR rule); a canary
# on 127.0.0.1 must never be reached because nothing exempts it.
ALLOWED_IP = "127.0.0.2"
CANARY_IP = "127.0.0.1"
TEST_NAMES = [
    "allowed.test",
    "api.allowed.test",
    "evil.test",
    "evilallowed.test",
    "unknown.test",
    "paste.pastebin.test",
]


@pytest.fixture(scope="session", autouse=True)
def _need_curl() -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is required for the end-to-end tests (apt-get install curl)")


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@dataclass
class Upstreams:
    http: Upstream
    https: Upstream
    canary: Upstream


@pytest.fixture(scope="session")
def upstreams(ca: trustme.CA) -> Iterator[Upstreams]:
    cert = ca.issue_cert(*TEST_NAMES, "*.allowed.test", "*.held.test", ALLOWED_IP)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server_ctx)
    ups = Upstreams(
        http=start_upstream(ALLOWED_IP),
        https=start_upstream(ALLOWED_IP, server_ctx),
        canary=start_upstream(CANARY_IP),
    )
    yield ups
    for up in (ups.http, ups.https, ups.canary):
        up.close()


def write_policy(
    path: Path, upstreams: Upstreams, extra_ports: tuple[int, ...] = (), body: str = ""
) -> Path:
    ports = sorted(
        {80, 443, upstreams.http.port, upstreams.https.port, upstreams.canary.port, *extra_ports}
    )
    path.write_text(
        body
        or f"""\
version: 1
mode: enforce
default: ask
allow:
  - allowed.test
  - "*.allowed.test"
  - loopname.test
  - {ALLOWED_IP}/32
deny:
  - evil.test
  - "**.pastebin.test"
network:
  ports: {ports}
  block_private: true
approval:
  wait: 1s
"""
    )
    return path


def ask_policy(path: Path, upstreams: Upstreams, approval: str, deny: Sequence[str] = ()) -> Path:
    """`default: ask`, allowing allowed.test and the upstreams' address on ports 80, 443 and the
    HTTP upstream's; `approval` is the approval section as a YAML flow mapping."""
    ports = sorted({80, 443, upstreams.http.port})
    denied = f"deny: [{', '.join(deny)}]\n" if deny else ""
    return write_policy(
        path,
        upstreams,
        body=f"version: 1\ndefault: ask\nallow: [allowed.test, {ALLOWED_IP}/32]\n{denied}"
        f"network: {{ports: {ports}}}\napproval: {approval}\n",
    )


def resolve_args() -> list[str]:
    args: list[str] = []
    for name in TEST_NAMES:
        args += ["--resolve", f"{name}:{ALLOWED_IP}"]
    args += ["--resolve", f"loopname.test:{CANARY_IP}"]
    return args


@pytest.fixture(scope="module")
def proxy(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("proxy")
    policy = write_policy(tmp / "policy.yaml", upstreams)
    proc = start_proxy(tmp / "state", [policy], *resolve_args())
    yield proc
    proc.stop()
