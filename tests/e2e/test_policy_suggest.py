"""`policy suggest` end to end: a real proxy in audit mode records real traffic; the suggested
policy, loaded in enforce mode by `egress-warden check`, allows exactly that traffic and none of
its near misses (sibling names, other ports, parent domains, denied names)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ALLOWED_IP, Upstreams
from tests.support.control import TOKEN_ENV
from tests.support.proxy import REPO, start_proxy

pytestmark = pytest.mark.e2e

SIBLINGS = ("a.svc.test", "b.svc.test", "c.svc.test")  # three: one wildcard
PAIR = ("one.pair.test", "two.pair.test")  # two: listed one by one
DENIED = "x.bad.test"  # refused (would be, in audit mode) by the deny rule `**.bad.test`


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def _curl(proxy_url: str, url: str) -> int:
    result = subprocess.run(
        [
            *("curl", "-q", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--noproxy", ""),
            *("--max-time", "10", "-x", proxy_url, url),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return int(result.stdout or 0)


def test_suggested_policy_allows_exactly_the_recorded_traffic(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    port = upstreams.http.port
    audit_policy = tmp_path / "audit.yaml"
    # Audit mode lets everything through (recording would_deny); the upstreams' loopback
    # address is exempted so the network guard, which audit mode never lifts, lets them pass.
    audit_policy.write_text(
        f"version: 1\nmode: audit\ndefault: deny\nallow: [{ALLOWED_IP}/32]\n"
        f"deny: ['**.bad.test']\nnetwork: {{ports: [80, 443, {port}]}}\n"
    )
    names = (*SIBLINGS, *PAIR, DENIED)
    resolve = [arg for name in names for arg in ("--resolve", f"{name}:{ALLOWED_IP}")]
    proc = start_proxy(tmp_path / "state", [audit_policy], *resolve, env=TOKEN_ENV)
    try:
        for name in names:
            assert _curl(proc.url, f"http://{name}:{port}/recorded") == 200, name
        proc.wait_decision(server__address=DENIED)
        env = {**os.environ, **TOKEN_ENV}
        result = _cli("policy", "suggest", "--since", "1h", "--control", proc.control_url, env=env)
    finally:
        proc.stop()
    assert result.returncode == 0, result.stderr
    suggested = tmp_path / "suggested.yaml"
    suggested.write_text(result.stdout)

    # The store holds the same audit: reading it directly suggests the same rules.
    from_store = _cli("policy", "suggest", "--state-dir", str(tmp_path / "state"))
    assert from_store.returncode == 0, from_store.stderr
    assert yaml.safe_load(from_store.stdout) == yaml.safe_load(result.stdout)

    data = yaml.safe_load(result.stdout)
    assert data["mode"] == "enforce"
    assert sorted(data["allow"]) == sorted(
        [f"*.svc.test:{port}", f"one.pair.test:{port}", f"two.pair.test:{port}"]
    )
    assert data["deny"] == [f"{DENIED}:{port}"]
    assert _cli("policy", "validate", str(suggested)).returncode == 0

    def decided(url: str) -> int:
        return _cli("check", url, "--policy", str(suggested), "--no-resolve").returncode

    for name in (*SIBLINGS, *PAIR):
        assert decided(f"http://{name}:{port}/") == 0, name  # allowed
    near_misses = [
        f"http://d.svc.test:{port + 1}/",  # a sibling on another port
        f"http://svc.test:{port}/",  # the parent of a `*.` group
        f"http://three.pair.test:{port}/",  # a sibling of only two
        f"http://pair.test:{port}/",  # their parent
        "http://one.pair.test/",  # the recorded name on port 80
        "https://one.pair.test/",  # ... and on 443
        f"http://{DENIED}:{port}/",  # refused by the deny rule
        f"http://y.bad.test:{port}/",  # a sibling of the denied name
    ]
    for url in near_misses:
        assert decided(url) != 0, url
