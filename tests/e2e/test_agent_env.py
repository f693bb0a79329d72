"""Real tools behind the proxy through `egress-warden exec` (and `--isolate`), credentials in the
`AGENT~SESSION:TOKEN` form, and `env`/`ca env` trust that adds the proxy CA to the system roots.

Every tool's request is shown in the proxy's decision lines (as the agent, with its session) and
refused when the policy denies; under `--isolate` whatever ignores the proxy fails."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from proxy.agents import AgentRegistry
from tests.conftest import ALLOWED_IP, Upstreams, resolve_args, write_policy
from tests.support.clients import curl
from tests.support.proxy import REPO, ProxyProcess, start_proxy
from tests.support.toolservers import (
    ToolServer,
    make_git_repo,
    start_git_server,
    start_npm_registry,
    start_package_index,
)

pytestmark = pytest.mark.e2e

AGENT, SESSION = "ci-bot", "run-7"
NODE = shutil.which("node")
NPM = shutil.which("npm")
PY = sys.executable


def _clean_env(home: Path) -> dict[str, str]:
    """This process's environment without proxy or trust settings, with private tool configs."""
    dropped = ("proxy", "ssl_cert", "ca_bundle", "git_config", "pip_", "node_extra")
    env = {k: v for k, v in os.environ.items() if not any(d in k.lower() for d in dropped)}
    env.update(
        HOME=str(home),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL="/dev/null",
        GIT_TERMINAL_PROMPT="0",
        PIP_CONFIG_FILE="/dev/null",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    return env


@dataclass
class Rig:
    proxy: ProxyProcess
    upstreams: Upstreams
    git: ToolServer
    git_tls: ToolServer
    index: ToolServer
    npm: ToolServer
    token: str
    token_file: Path
    policy: Path
    tmp: Path

    def exec(
        self,
        *command: str,
        isolate: bool = False,
        options: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        argv = [PY, "-m", "addons.cli", "exec", "--agent", AGENT, "--session", SESSION]
        argv += ["--token-file", str(self.token_file), "--proxy", self.proxy.url]
        argv += ["--policy", str(self.policy), "--state-dir", str(self.proxy.state_dir)]
        argv += [*options, *(["--isolate"] if isolate else []), "--", *command]
        return subprocess.run(
            argv,
            cwd=REPO,
            env=env or _clean_env(self.tmp),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def seen(self, path: str | None, verdict: str = "allow", **match: object) -> dict[str, object]:
        """The proxy's decision line for `path` (None: a CONNECT, which has no path), as the
        agent with its session."""
        wanted: dict[str, object] = {
            "egress.decision": verdict,
            "egress.agent.id": AGENT,
            "session.id": SESSION,
        }
        if path is None:
            wanted["network.transport.protocol"] = "https_connect"
        else:
            wanted["url.path"] = path
        return self.proxy.wait_decision(**wanted, **match)


@pytest.fixture(scope="module")
def rig(
    upstreams: Upstreams, ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("agentenv")
    git_root = tmp / "git"
    git_root.mkdir()
    make_git_repo(git_root)
    git = start_git_server(ALLOWED_IP, git_root)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("allowed.test", "evil.test").configure_cert(tls)
    git_tls = start_git_server(ALLOWED_IP, git_root, tls)
    index = start_package_index(ALLOWED_IP, tmp / "index")
    npm = start_npm_registry(ALLOWED_IP)
    agents = tmp / "agents.yaml"
    token = AgentRegistry.load(agents).add(AGENT)
    token_file = tmp / "token"
    token_file.write_text(token + "\n")
    policy = write_policy(
        tmp / "policy.yaml", upstreams, extra_ports=(git.port, git_tls.port, index.port, npm.port)
    )
    proc = start_proxy(tmp / "state", [policy], *resolve_args(), "--agents", str(agents))
    yield Rig(proc, upstreams, git, git_tls, index, npm, token, token_file, policy, tmp)
    proc.stop()
    for server in (git, git_tls, index, npm):
        server.close()


# --- HTTP clients -------------------------------------------------------------------------------

_URLLIB = (
    "import sys, urllib.request as u; print(u.urlopen(sys.argv[1], timeout=30).read().decode())"
)
_REQUESTS = (
    "import sys, requests; r = requests.get(sys.argv[1], timeout=30); r.raise_for_status(); "
    "print(r.text)"
)
_HTTPX = (
    "import sys, httpx; r = httpx.get(sys.argv[1], timeout=30); r.raise_for_status(); print(r.text)"
)
# Node 20 has no proxy support of its own; this is what undici's ProxyAgent does with the
# variable: WHATWG URL parsing, then the decoded userinfo as Basic credentials.
_NODE = """
const http = require('http');
const proxy = new URL(process.env.HTTP_PROXY);
const user = decodeURIComponent(proxy.username) + ':' + decodeURIComponent(proxy.password);
const target = new URL(process.argv[1]);
const auth = 'Basic ' + Buffer.from(user).toString('base64');
const options = {host: proxy.hostname, port: proxy.port, path: target.href,
                 headers: {Host: target.host, 'Proxy-Authorization': auth}};
const req = http.request(options, (res) => {
  let body = '';
  res.on('data', (d) => body += d);
  res.on('end', () => { console.log(body); process.exit(res.statusCode === 200 ? 0 : 1); });
});
req.on('error', (e) => { console.error(e.message); process.exit(2); });
req.end();
"""

# Node's own fetch through undici's EnvHttpProxyAgent (`make install` puts undici under
# .venv/node): the proxy variables, credentials included, as a Node agent would use them.
UNDICI = REPO / ".venv" / "node" / "node_modules" / "undici"
_NODE_UNDICI = f"""
const {{EnvHttpProxyAgent, setGlobalDispatcher}} = require({json.dumps(str(UNDICI))});
setGlobalDispatcher(new EnvHttpProxyAgent());
fetch(process.argv[1]).then(async (r) => {{
  console.log(await r.text());
  process.exit(r.status === 200 ? 0 : 1);
}}).catch((e) => {{ console.error(String(e.cause || e)); process.exit(2); }});
"""

CLIENTS = {
    "curl": ["curl", "-sS", "-f", "--max-time", "30"],
    "urllib": [PY, "-c", _URLLIB],
    "requests": [PY, "-c", _REQUESTS],
    "httpx": [PY, "-c", _HTTPX],
    "node": [NODE or "node", "-e", _NODE],
    "node-fetch-undici": [NODE or "node", "-e", _NODE_UNDICI],
}


TUNNELLING = {"node-fetch-undici"}  # clients that CONNECT even for http:// URLs


def _client(name: str) -> list[str]:
    if name.startswith("node") and NODE is None:
        pytest.fail("node is not installed (apt-get install nodejs)")
    if name == "node-fetch-undici" and not UNDICI.is_dir():
        pytest.fail(f"undici is not installed under {UNDICI.parent} (make install does it)")
    return CLIENTS[name]


@pytest.mark.parametrize("isolate", [False, True], ids=["plain", "isolated"])
@pytest.mark.parametrize("client", list(CLIENTS))
def test_client_goes_through_the_proxy_as_the_agent_and_session(
    rig: Rig, client: str, isolate: bool
) -> None:
    path = f"/{client}-{'isolated' if isolate else 'plain'}"
    result = rig.exec(
        *_client(client), f"http://allowed.test:{rig.upstreams.http.port}{path}", isolate=isolate
    )
    assert result.returncode == 0, result.stderr
    assert f"hello from upstream GET {path}" in result.stdout
    # undici's proxy agent tunnels even http:// URLs through CONNECT (no path to match).
    rig.seen(None if client in TUNNELLING else path, **{"server.address": "allowed.test"})
    hit = next(h for h in rig.upstreams.http.hits if h.path == path)
    assert "proxy-authorization" not in hit.headers


@pytest.mark.parametrize("isolate", [False, True], ids=["plain", "isolated"])
@pytest.mark.parametrize("client", list(CLIENTS))
def test_client_is_refused_when_the_policy_denies(rig: Rig, client: str, isolate: bool) -> None:
    path = f"/denied-{client}-{'isolated' if isolate else 'plain'}"
    before = len(rig.upstreams.http.hits)
    result = rig.exec(
        *_client(client), f"http://evil.test:{rig.upstreams.http.port}{path}", isolate=isolate
    )
    assert result.returncode != 0
    rig.seen(
        None if client in TUNNELLING else path,
        "deny",
        **{"server.address": "evil.test", "egress.reason": "deny_rule"},
    )
    assert not [h for h in rig.upstreams.http.hits[before:] if h.path == path]


# --- git and pip --------------------------------------------------------------------------------


@pytest.mark.parametrize("isolate", [False, True], ids=["plain", "isolated"])
def test_git_clone_over_smart_http_goes_through_the_proxy(rig: Rig, isolate: bool) -> None:
    dest = rig.tmp / f"clone-{isolate}"
    url = f"http://allowed.test:{rig.git.port}/demo.git"
    result = rig.exec("git", "clone", "-q", url, str(dest), isolate=isolate)
    assert result.returncode == 0, result.stderr
    assert (dest / "README").read_text() == "served by git http-backend\n"
    rig.seen("/demo.git/info/refs", **{"server.port": rig.git.port})
    rig.seen("/demo.git/git-upload-pack", **{"http.request.method": "POST"})


@pytest.mark.parametrize("isolate", [False, True], ids=["plain", "isolated"])
def test_git_clone_over_https_tunnels_through_the_proxy(
    rig: Rig, ca_file: Path, isolate: bool
) -> None:
    dest = rig.tmp / f"clone-tls-{isolate}"
    env = {**_clean_env(rig.tmp), "GIT_SSL_CAINFO": str(ca_file)}
    url = f"https://allowed.test:{rig.git_tls.port}/demo.git"
    served = len(rig.git_tls.paths)
    result = rig.exec("git", "clone", "-q", url, str(dest), isolate=isolate, env=env)
    assert result.returncode == 0, result.stderr
    assert (dest / "README").is_file()
    assert "/demo.git/git-upload-pack" in rig.git_tls.paths[served:]
    line = rig.proxy.wait_decision(
        **{"server.port": rig.git_tls.port, "egress.agent.id": AGENT, "session.id": SESSION}
    )
    assert line["egress.decision"] == "allow"


def test_git_clone_is_refused_when_the_policy_denies(rig: Rig) -> None:
    served = len(rig.git.paths)
    dest = rig.tmp / "clone-denied"
    result = rig.exec("git", "clone", "-q", f"http://evil.test:{rig.git.port}/demo.git", str(dest))
    assert result.returncode != 0
    assert "403" in result.stderr
    rig.seen("/demo.git/info/refs", "deny", **{"server.address": "evil.test"})
    assert len(rig.git.paths) == served
    assert not (dest / "README").exists()


def _pip_download(
    rig: Rig, host: str, dest: Path, isolate: bool
) -> subprocess.CompletedProcess[str]:
    index = f"http://{host}:{rig.index.port}/simple/"
    return rig.exec(
        PY, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--retries", "0",
        "--index-url", index, "--trusted-host", host, "-d", str(dest), "demo-pkg",
        isolate=isolate,
    )  # fmt: skip


@pytest.mark.parametrize("isolate", [False, True], ids=["plain", "isolated"])
def test_pip_download_from_a_local_index_goes_through_the_proxy(rig: Rig, isolate: bool) -> None:
    dest = rig.tmp / f"pip-{isolate}"
    result = _pip_download(rig, "allowed.test", dest, isolate)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [p.name for p in dest.iterdir()] == ["demo_pkg-1.0-py3-none-any.whl"]
    rig.seen("/simple/demo-pkg/", **{"server.port": rig.index.port})
    rig.seen("/files/demo_pkg-1.0-py3-none-any.whl")


def test_pip_download_is_refused_when_the_policy_denies(rig: Rig) -> None:
    served = len(rig.index.paths)
    dest = rig.tmp / "pip-denied"
    result = _pip_download(rig, "evil.test", dest, False)
    assert result.returncode != 0
    rig.seen("/simple/demo-pkg/", "deny", **{"server.address": "evil.test"})
    assert len(rig.index.paths) == served
    assert not dest.exists() or not list(dest.iterdir())


def _npm_install(
    rig: Rig, host: str, dest: Path, isolate: bool
) -> subprocess.CompletedProcess[str]:
    if NPM is None:
        pytest.fail("npm is not installed (it comes with nodejs)")
    return rig.exec(
        NPM, "install", "--no-audit", "--no-fund", "--no-package-lock", "--fetch-retries=0",
        "--prefer-online", "--cache", str(dest.with_name(dest.name + "-cache")),
        "--prefix", str(dest), "--registry", f"http://{host}:{rig.npm.port}/", "demo-npm-pkg",
        isolate=isolate,
    )  # fmt: skip


@pytest.mark.parametrize("isolate", [False, True], ids=["plain", "isolated"])
def test_npm_install_from_a_local_registry_goes_through_the_proxy(rig: Rig, isolate: bool) -> None:
    dest = rig.tmp / f"npm-{isolate}"
    result = _npm_install(rig, "allowed.test", dest, isolate)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (dest / "node_modules" / "demo-npm-pkg" / "index.js").is_file()
    rig.seen("/demo-npm-pkg", **{"server.port": rig.npm.port})
    rig.seen("/demo-npm-pkg/-/demo-npm-pkg-1.0.0.tgz")


def test_npm_install_is_refused_when_the_policy_denies(rig: Rig) -> None:
    served = len(rig.npm.paths)
    dest = rig.tmp / "npm-denied"
    result = _npm_install(rig, "evil.test", dest, False)
    assert result.returncode != 0
    rig.seen("/demo-npm-pkg", "deny", **{"server.address": "evil.test"})
    assert len(rig.npm.paths) == served
    assert not (dest / "node_modules" / "demo-npm-pkg").exists()


# --- the credential form ------------------------------------------------------------------------


def test_the_documented_proxy_url_form_authenticates_in_curl(rig: Rig) -> None:
    port = rig.proxy.proxy_port
    url = f"http://allowed.test:{rig.upstreams.http.port}/cred-tilde"
    ok = curl("-x", f"http://{AGENT}~{SESSION}:{rig.token}@127.0.0.1:{port}", url)
    assert ok.returncode == 0 and "hello from upstream" in ok.stdout, ok.stderr
    rig.seen("/cred-tilde")
    # The old form, encoded as clients need it, still works; raw, the `/` ends the authority.
    encoded = curl("-x", f"http://{AGENT}%2F{SESSION}:{rig.token}@127.0.0.1:{port}", url + "2")
    assert encoded.returncode == 0, encoded.stderr
    rig.seen("/cred-tilde2")
    raw = curl("-x", f"http://{AGENT}/{SESSION}:{rig.token}@127.0.0.1:{port}", url + "3")
    assert raw.returncode != 0


def _direct(rig: Rig, tool: str, proxy_url: str) -> tuple[list[str], str]:
    """`tool` given the proxy URL explicitly (no exec): its command and the path it asks for."""
    http = f"http://allowed.test:{rig.upstreams.http.port}"
    if tool == "git":
        repo = f"http://allowed.test:{rig.git.port}/demo.git"
        return ["git", "-c", f"http.proxy={proxy_url}", "ls-remote", repo], "/demo.git/info/refs"
    if tool == "pip":
        index = f"http://allowed.test:{rig.index.port}/simple/"
        dest = str(rig.tmp / "pip-direct")
        return [
            *(PY, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--proxy", proxy_url),
            *("--index-url", index, "--trusted-host", "allowed.test", "-d", dest, "demo-pkg"),
        ], "/simple/demo-pkg/"
    code = {
        "requests": "import requests, sys; r = requests.get(sys.argv[1], proxies="
        "{'http': sys.argv[2]}, timeout=30); r.raise_for_status()",
        "httpx": "import httpx, sys; r = httpx.get(sys.argv[1], proxy=sys.argv[2], timeout=30);"
        " r.raise_for_status()",
        "urllib": "import sys, urllib.request as u; u.build_opener(u.ProxyHandler("
        "{'http': sys.argv[2]})).open(sys.argv[1], timeout=30).read()",
    }
    if tool == "node":
        if NODE is None:
            pytest.fail("node is not installed (apt-get install nodejs)")
        return [
            NODE,
            "-e",
            f"process.env.HTTP_PROXY = {proxy_url!r};\n{_NODE}",
            http + "/node-direct",
        ], "/node-direct"
    return [PY, "-c", code[tool], f"{http}/{tool}-direct", proxy_url], f"/{tool}-direct"


@pytest.mark.parametrize("tool", ["git", "pip", "requests", "httpx", "urllib", "node"])
def test_the_documented_form_authenticates_in_each_tool(rig: Rig, tool: str) -> None:
    proxy_url = f"http://{AGENT}~{SESSION}:{rig.token}@127.0.0.1:{rig.proxy.proxy_port}"
    command, path = _direct(rig, tool, proxy_url)
    match = {"url.path": path, "egress.agent.id": AGENT, "session.id": SESSION}
    before = len(rig.proxy.decisions(**match))
    result = subprocess.run(
        command, env=_clean_env(rig.tmp), capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    deadline = time.monotonic() + 5
    while len(rig.proxy.decisions(**match)) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(rig.proxy.decisions(**match)) > before


def test_a_wrong_token_is_refused_through_exec(rig: Rig) -> None:
    bad = rig.tmp / "bad-token"
    bad.write_text("not-the-token\n")
    path = "/wrong-token"
    argv = [PY, "-m", "addons.cli", "exec", "--agent", AGENT, "--token-file", str(bad)]
    argv += ["--proxy", rig.proxy.url, "--policy", str(rig.policy), "--"]
    argv += ["curl", "-sS", "-f", f"http://allowed.test:{rig.upstreams.http.port}{path}"]
    result = subprocess.run(
        argv, cwd=REPO, env=_clean_env(rig.tmp), capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "407" in result.stderr
    assert not [h for h in rig.upstreams.http.hits if h.path == path]


# --- --isolate: nothing but the proxy -----------------------------------------------------------

_RAW = (
    "import socket, sys; s = socket.create_connection(('127.0.0.2', int(sys.argv[1])), timeout=5);"
    "s.sendall(b'GET /raw-bypass HTTP/1.0\\r\\n\\r\\n'); print(s.recv(100))"
)
_NODE_FETCH = (
    "fetch(process.argv[1]).then((r) => { console.log('reached', r.status); process.exit(0); },"
    " (e) => { console.error('failed', e.cause && e.cause.code); process.exit(1); });"
)


def _direct_attempts(rig: Rig) -> dict[str, list[str]]:
    port = str(rig.upstreams.http.port)
    attempts = {
        "raw-socket": [PY, "-c", _RAW, port],
        "curl-noproxy": [
            *("curl", "-sS", "--max-time", "10", "--noproxy", "*"),
            f"http://127.0.0.2:{port}/raw-bypass",
        ],
    }
    if NODE is not None:  # Node 20's fetch ignores proxy variables
        attempts["node-fetch"] = [NODE, "-e", _NODE_FETCH, f"http://127.0.0.2:{port}/raw-bypass"]
    return attempts


@pytest.mark.parametrize("attempt", ["raw-socket", "curl-noproxy", "node-fetch"])
def test_isolated_command_cannot_bypass_the_proxy(rig: Rig, attempt: str) -> None:
    command = _direct_attempts(rig).get(attempt)
    if command is None:
        pytest.fail("node is not installed (apt-get install nodejs)")
    # Unisolated, the same command reaches the upstream directly: the bypass is real.
    plain = rig.exec(*command)
    assert plain.returncode == 0, plain.stderr
    hits = len(rig.upstreams.http.hits)
    isolated = rig.exec(*command, isolate=True)
    assert isolated.returncode != 0
    assert "ran isolated" in isolated.stderr
    assert len(rig.upstreams.http.hits) == hits


def test_isolated_command_sees_only_loopback_and_no_dns(rig: Rig) -> None:
    probe = (
        "import socket\nprint(sorted(n for _, n in socket.if_nameindex()))\n"
        "try:\n    socket.getaddrinfo('allowed.test', 80)\nexcept OSError:\n    print('no-dns')\n"
    )
    result = rig.exec(PY, "-c", probe, isolate=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['lo']", "no-dns"]


def test_isolated_command_cannot_reach_processes_outside(rig: Rig) -> None:
    # A process of the same user outside could be ptraced into connecting for the command.
    outside = rig.proxy.process.pid
    probe = f"import os; print(os.path.exists('/proc/{outside}'), os.getpid())"
    assert rig.exec(PY, "-c", probe).stdout.split()[0] == "True"
    result = rig.exec(PY, "-c", probe, isolate=True)
    assert result.returncode == 0, result.stderr
    visible, pid = result.stdout.split()
    assert visible == "False"
    assert int(pid) < 10  # numbered inside its own PID namespace


def test_isolation_that_cannot_be_made_does_not_run_the_command(rig: Rig) -> None:
    fake = rig.tmp / "fakebin"
    fake.mkdir(exist_ok=True)
    unshare = fake / "unshare"
    unshare.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\n")
    unshare.write_text(unshare.read_text() + "exit 1\n")
    unshare.chmod(0o755)
    marker = rig.tmp / "ran"
    env = _clean_env(rig.tmp)
    env["PATH"] = f"{fake}:{env.get('PATH', '/usr/bin:/bin')}"
    result = rig.exec("touch", str(marker), isolate=True, env=env)
    assert result.returncode == 125
    assert "not running the command" in result.stderr
    assert "Operation not permitted" in result.stderr
    assert not marker.exists()


def test_exec_without_a_command_is_a_usage_error(rig: Rig) -> None:
    result = rig.exec()
    assert result.returncode == 2
    assert "needs a command" in result.stderr


# --- trust: the system roots plus the proxy CA --------------------------------------------------


@pytest.fixture(scope="module")
def inspecting(
    upstreams: Upstreams, ca_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path]]:
    tmp = tmp_path_factory.mktemp("agentenv-inspect")
    ports = sorted({80, 443, upstreams.https.port})
    policy = write_policy(
        tmp / "policy.yaml",
        upstreams,
        body=f"""\
version: 1
default: deny
allow: [allowed.test, api.allowed.test, {ALLOWED_IP}/32]
network: {{ports: {ports}}}
inspect:
  - host: api.allowed.test
    methods: [GET, HEAD]
""",
    )
    proc = start_proxy(tmp / "state", [policy], *resolve_args(), "--upstream-ca", str(ca_file))
    yield proc, policy
    proc.stop()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "addons.cli", *args], cwd=REPO, capture_output=True, text=True, check=False
    )


def _sh_env(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = shlex.split(value)[0]
    return env


def _ca_env(proxy: ProxyProcess, ca_file: Path) -> dict[str, str]:
    # The trustme CA stands in for the system roots: it signs the upstreams.
    result = _cli(
        "ca", "env", "--state-dir", str(proxy.state_dir), "--ca-bundle-base", str(ca_file)
    )
    assert result.returncode == 0, result.stderr
    return _sh_env(result.stdout)


def test_ca_env_points_at_a_bundle_of_the_roots_and_the_proxy_ca(
    inspecting: tuple[ProxyProcess, Path], ca_file: Path
) -> None:
    proxy, _ = inspecting
    env = _ca_env(proxy, ca_file)
    bundle = proxy.state_dir / "ca" / "bundle.pem"
    proxy_ca = proxy.state_dir / "ca" / "mitmproxy-ca-cert.pem"
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO"):
        assert Path(env[name]) == bundle.resolve()
    for name in ("PIP_CERT", "CARGO_HTTP_CAINFO"):
        assert Path(env[name]) == bundle.resolve()
    assert Path(env["NODE_EXTRA_CA_CERTS"]) == proxy_ca.resolve()
    text = bundle.read_text()
    assert ca_file.read_text().strip() in text
    assert proxy_ca.read_text().strip() in text


def _curl_with(
    env: dict[str, str], proxy: ProxyProcess, url: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-q", "-sS", "-f", "--max-time", "30", "-x", proxy.url, url],
        env={**_clean_env(proxy.state_dir.parent), **env},
        capture_output=True,
        text=True,
        check=False,
    )


def _requests_with(
    env: dict[str, str], proxy: ProxyProcess, url: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-c", _REQUESTS, url],
        env={**_clean_env(proxy.state_dir.parent), **env, "HTTPS_PROXY": proxy.url},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("tool", ["curl", "requests"])
def test_ca_env_verifies_inspected_and_tunnelled_hosts(
    inspecting: tuple[ProxyProcess, Path], ca_file: Path, upstreams: Upstreams, tool: str
) -> None:
    proxy, _ = inspecting
    env = _ca_env(proxy, ca_file)
    run = _curl_with if tool == "curl" else _requests_with
    tunnelled = f"https://allowed.test:{upstreams.https.port}/tunnel-{tool}"
    inspected = f"https://api.allowed.test:{upstreams.https.port}/inspected-{tool}"
    for url in (tunnelled, inspected):
        result = run(env, proxy, url)
        assert result.returncode == 0, f"{url}: {result.stderr}"
        assert "hello from upstream" in result.stdout
    line = proxy.wait_decision(**{"url.path": f"/inspected-{tool}"})
    assert line["network.transport.protocol"] == "https_inspected"
    # The old `ca env` (the proxy CA alone) fails every host that is not inspected.
    alone = {k: str(proxy.state_dir / "ca" / "mitmproxy-ca-cert.pem") for k in env}
    assert run(alone, proxy, tunnelled + "-alone").returncode != 0


@pytest.mark.parametrize("host", ["allowed.test", "api.allowed.test"], ids=["tunnel", "inspected"])
def test_git_verifies_tunnelled_and_inspected_hosts_with_the_bundle(
    inspecting: tuple[ProxyProcess, Path], ca_file: Path, upstreams: Upstreams, host: str
) -> None:
    proxy, _ = inspecting
    env = {**_clean_env(proxy.state_dir.parent), **_ca_env(proxy, ca_file)}
    env["GIT_CONFIG_COUNT"], env["GIT_CONFIG_KEY_0"], env["GIT_CONFIG_VALUE_0"] = (
        "1",
        "http.proxy",
        proxy.url,
    )
    repo = f"/git-{host}.git"
    url = f"https://{host}:{upstreams.https.port}{repo}"
    result = subprocess.run(
        ["git", "ls-remote", url], env=env, capture_output=True, text=True, check=False
    )
    # The upstream is no git server: git fails after TLS, never on the certificate.
    assert "certificate" not in result.stderr.lower(), result.stderr
    assert any(h.path.startswith(f"{repo}/info/refs") for h in upstreams.https.hits)
    # With the proxy CA alone (the old `ca env`) only the inspected host verifies.
    env["GIT_SSL_CAINFO"] = str(proxy.state_dir / "ca" / "mitmproxy-ca-cert.pem")
    alone = subprocess.run(
        ["git", "ls-remote", url + "-alone"], env=env, capture_output=True, text=True, check=False
    )
    assert ("certificate" in alone.stderr.lower()) == (host == "allowed.test"), alone.stderr


def test_env_adds_ca_variables_only_when_the_policy_inspects(
    rig: Rig, inspecting: tuple[ProxyProcess, Path], ca_file: Path
) -> None:
    proxy, policy = inspecting
    common = ["env", "--proxy", proxy.url, "--state-dir", str(proxy.state_dir)]
    common += ["--ca-bundle-base", str(ca_file)]
    with_inspect = _sh_env(_cli(*common, "--policy", str(policy)).stdout)
    assert Path(with_inspect["SSL_CERT_FILE"]).name == "bundle.pem"
    without = _cli(*common, "--policy", str(rig.policy))
    assert without.returncode == 0, without.stderr
    assert "SSL_CERT_FILE" not in _sh_env(without.stdout)
    assert _sh_env(without.stdout)["HTTPS_PROXY"] == proxy.url


def test_exec_with_an_inspecting_policy_verifies_both_kinds_of_host(
    inspecting: tuple[ProxyProcess, Path], ca_file: Path, upstreams: Upstreams
) -> None:
    proxy, policy = inspecting
    argv = [PY, "-m", "addons.cli", "exec", "--proxy", proxy.url, "--policy", str(policy)]
    argv += ["--state-dir", str(proxy.state_dir), "--ca-bundle-base", str(ca_file), "--"]
    for host, path in (("allowed.test", "/exec-tunnel"), ("api.allowed.test", "/exec-inspected")):
        url = f"https://{host}:{upstreams.https.port}{path}"
        result = subprocess.run(
            [*argv, "curl", "-sS", "-f", "--max-time", "30", url],
            cwd=REPO,
            env=_clean_env(proxy.state_dir.parent),
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        proxy.wait_decision(**{"server.address": host, "egress.decision": "allow"})
