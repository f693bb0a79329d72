"""Files a running proxy keeps are private to its user, and a policy alias bomb written over the
live policy file is rejected fast while the last good policy stays in force."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ALLOWED_IP, Upstreams
from tests.support.clients import raw_request
from tests.support.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

# 373 bytes that expand to ~10^9 values; unbounded, a reload took 16 s and 890 MB.
BILLION_LAUGHS = """\
version: 1
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
allow: *i
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("files") / "policy.yaml"


@pytest.fixture(scope="module")
def live(
    upstreams: Upstreams, policy_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A proxy that generates its own control token (none in the environment), started under a
    permissive umask so only modes the proxy sets itself can pass."""
    policy_file.write_text(
        f"version: 1\ndefault: deny\nallow: [{ALLOWED_IP}/32]\n"
        f"network: {{ports: [80, 443, {upstreams.http.port}]}}\n"
    )
    state = tmp_path_factory.mktemp("files-state") / "state"
    previous = os.umask(0o000)
    try:
        proc = start_proxy(state, [policy_file], env={"EGRESS_WARDEN_CONTROL_TOKEN": ""})
    finally:
        os.umask(previous)
    yield proc
    proc.stop()


def _control(proxy: ProxyProcess) -> httpx.Client:
    token = (proxy.state_dir / "control-token").read_text().strip()
    return httpx.Client(
        base_url=proxy.control_url,
        headers={"Authorization": f"Bearer {token}"},
        trust_env=False,
        timeout=30,
    )


def _allowed_upstream_answers(proxy: ProxyProcess, upstreams: Upstreams) -> bool:
    before = len(upstreams.http.hits)
    authority = f"{ALLOWED_IP}:{upstreams.http.port}"
    response = raw_request(
        proxy.proxy_port, f"GET http://{authority}/ok HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    return response.status == 200 and len(upstreams.http.hits) == before + 1


def test_state_dir_is_0700_and_secrets_0600(live: ProxyProcess) -> None:
    state = live.state_dir
    assert mode(state) == 0o700
    assert mode(state / "control-token") == 0o600
    assert mode(state / "warden.db") == 0o600
    for suffix in ("-wal", "-shm"):
        side = state / f"warden.db{suffix}"
        if side.exists():
            assert mode(side) == 0o600, side


def test_alias_bomb_reload_is_rejected_fast_and_old_policy_stays(
    live: ProxyProcess, upstreams: Upstreams, policy_file: Path
) -> None:
    with _control(live) as control:
        assert control.get("/v1/policy").json()["default"] == "deny"
        assert _allowed_upstream_answers(live, upstreams)

        policy_file.write_text(BILLION_LAUGHS)
        start = time.monotonic()
        response = control.post("/v1/policy/reload")
        elapsed = time.monotonic() - start
        # Generous for a loaded 2-core machine; unbounded expansion took 16 s.
        assert elapsed < 5.0, f"reload of an alias bomb took {elapsed:.1f}s"
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["error"] == "policy_rejected"
        assert f"{policy_file}:6:" in body["detail"]
        assert "alias" in body["detail"]

        start = time.monotonic()
        health = httpx.get(f"{live.control_url}/healthz", trust_env=False, timeout=5)
        assert health.status_code == 200
        assert time.monotonic() - start < 2.0

        # The last good policy is still the one in force.
        effective = control.get("/v1/policy").json()
        assert effective["default"] == "deny"
        assert [rule["pattern"] for rule in effective["allow"]] == [f"{ALLOWED_IP}/32"]
        assert _allowed_upstream_answers(live, upstreams)
        lol = f"lol.test:{upstreams.http.port}"  # what the bomb would have allowed
        denied = raw_request(live.proxy_port, f"GET http://{lol}/ HTTP/1.1\r\nHost: {lol}\r\n\r\n")
        assert denied.status == 403
        assert denied.headers["x-egress-warden-reason"] == "default_deny"
    assert live.process.poll() is None
