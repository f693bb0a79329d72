"""`approval.notify`: a real proxy holding real requests tells a real local HTTP receiver."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.agents import AgentRegistry
from tests.conftest import ALLOWED_IP, Upstreams, resolve_args
from tests.support.control import TOKEN_ENV, api, approve, deny, wait_pending
from tests.support.postgres import start_postgres
from tests.support.proxy import REPO, ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

NAMES = [f"n{i}.held.test" for i in range(12)]
HOOK_TOKEN = "Bearer hook-secret-0123"


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: Any
    at: float


@dataclass
class Receiver:
    """Records every POST; `/flaky*` answers 500 twice per notification, `/hang*` never answers
    (until closed), anything else 200."""

    server: ThreadingHTTPServer
    posts: list[Post] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def received(self, path: str, **match: Any) -> list[Post]:
        with self.lock:
            posts = [p for p in self.posts if p.path == path]
        return [p for p in posts if all(_get_in(p.body, k) == v for k, v in match.items())]

    def wait(self, path: str, count: int = 1, timeout: float = 10, **match: Any) -> list[Post]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.received(path, **match)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"{path}: {len(self.received(path, **match))} posts, want {count}")

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _get_in(body: Any, dotted: str) -> Any:
    for part in dotted.split("__"):
        body = body.get(part) if isinstance(body, dict) else None
    return body


def start_receiver() -> Receiver:
    box: list[Receiver] = []
    failures: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            receiver = box[0]
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            with receiver.lock:
                receiver.posts.append(Post(self.path, dict(self.headers), body, time.monotonic()))
                key = f"{self.path} {_get_in(body, 'id')}"
                failed = failures.get(key, 0)
                if self.path.startswith("/flaky") and failed < 2:
                    failures[key] = failed + 1
                    status = 500
                else:
                    status = 200
            if self.path.startswith("/hang"):
                receiver.release.wait(60)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False
    box.append(Receiver(server))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return box[0]


def _policy(path: Path, upstreams: Upstreams, notify: str, extra: str = "") -> Path:
    ports = sorted({80, 443, upstreams.http.port})
    path.write_text(
        f"""\
version: 1
default: ask
allow: [allowed.test, {ALLOWED_IP}/32]
network:
  ports: {ports}
auth:
  required: false
approval:
  wait: 20s
  pending_ttl: 1h
{extra}  notify:
{notify}"""
    )
    return path


def _targets(receiver: Receiver) -> str:
    hook = receiver.url
    return f"""\
    - url: {hook}/json
      headers: {{Authorization: "env:HOOK_TOKEN"}}
    - url: {hook}/slack
      format: slack
      events: [held]
    - url: {hook}/flaky
      events: [held]
      backoff: 100ms
    - url: {hook}/hang
      timeout: 30s
      attempts: 1
"""


def _args() -> list[str]:
    extra = resolve_args()
    for name in NAMES:
        extra += ["--resolve", f"{name}:{ALLOWED_IP}"]
    return extra


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = start_receiver()
    yield rec
    rec.close()


@pytest.fixture(scope="module")
def notifying(
    upstreams: Upstreams, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path]]:
    tmp = tmp_path_factory.mktemp("notify")
    policy = _policy(tmp / "policy.yaml", upstreams, _targets(receiver))
    env = {**TOKEN_ENV, "HOOK_TOKEN": HOOK_TOKEN}
    proc = start_proxy(tmp / "state", [policy], *_args(), env=env)
    yield proc, policy
    proc.stop()


def _get(proxy: ProxyProcess, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=40) as client:
        return client.get(url, headers=headers)


def _background(
    proxy: ProxyProcess, url: str, headers: dict[str, str] | None = None
) -> tuple[threading.Thread, list[httpx.Response | Exception]]:
    out: list[httpx.Response | Exception] = []

    def run() -> None:
        try:
            out.append(_get(proxy, url, headers))
        except Exception as exc:  # surfaced by the assertions on `out`
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_held_item_is_notified_as_json_and_slack(
    notifying: tuple[ProxyProcess, Path], receiver: Receiver, upstreams: Upstreams
) -> None:
    proxy, _ = notifying
    host = NAMES[0]
    thread, out = _background(
        proxy,
        f"http://{host}:{upstreams.http.port}/held",
        {"X-Egress-Warden-Justification": "reading the <!here> API docs"},
    )
    item = wait_pending(proxy, host)
    (post,) = receiver.wait("/json", event="held", item__id=item["id"])
    body = post.body
    assert body["type"] == "egress-warden.notification" and body["version"] == 1
    assert body["item"]["host"] == host and body["item"]["port"] == upstreams.http.port
    assert body["item"]["destination"] == f"{host}:{upstreams.http.port}"
    assert body["item"]["justification"] == "reading the <!here> API docs"
    assert body["item"]["agent"] is None and body["item"]["waiting"] == 1
    assert body["item"]["expires_at"] == pytest.approx(item["expires_at"])
    assert body["resolution"] is None
    control = f"http://127.0.0.1:{proxy.control_port}"
    assert body["console_url"] == f"{control}/#pending/{item['id']}"
    assert post.headers["Authorization"] == HOOK_TOKEN  # from the environment
    assert post.headers["Content-Type"] == "application/json"

    slack = [p for p in receiver.wait("/slack") if item["id"] in json.dumps(p.body)]
    assert len(slack) == 1
    message = slack[0].body
    assert set(message) == {"text", "blocks"}
    assert host in message["text"] and f"#pending/{item['id']}" in message["text"]
    assert "<!here>" not in message["text"]  # escaped: an agent cannot ping a channel
    assert "Authorization" not in slack[0].headers  # headers are per target
    approve(proxy, item["id"])
    thread.join(30)
    response = out[0]
    assert isinstance(response, httpx.Response) and response.status_code == 200


def test_resolution_is_notified_with_who_and_scope(
    notifying: tuple[ProxyProcess, Path], receiver: Receiver, upstreams: Upstreams
) -> None:
    proxy, _ = notifying
    host = NAMES[1]
    thread, out = _background(proxy, f"http://{host}:{upstreams.http.port}/decide")
    item = wait_pending(proxy, host)
    deny(proxy, item["id"])
    thread.join(30)
    response = out[0]
    assert isinstance(response, httpx.Response) and response.status_code == 403
    (post,) = receiver.wait("/json", event="resolved", item__id=item["id"])
    assert post.body["resolution"] == {
        "decision": "denied",
        "scope": "once",
        "for": "all",
        "by": "admin",
        "reviewer": "human",
        "note": None,
        "released": 1,
    }
    assert post.body["item"]["host"] == host
    # `events: [held]` targets are not told of resolutions
    time.sleep(0.3)
    slack = [p for p in receiver.received("/slack") if item["id"] in json.dumps(p.body)]
    assert len(slack) == 1 and "is waiting for" in slack[0].body["text"]


def test_a_500_is_retried_until_delivered(
    notifying: tuple[ProxyProcess, Path], receiver: Receiver, upstreams: Upstreams
) -> None:
    proxy, _ = notifying
    host = NAMES[2]
    thread, _out = _background(proxy, f"http://{host}:{upstreams.http.port}/retry")
    item = wait_pending(proxy, host)
    posts = receiver.wait("/flaky", count=3, item__id=item["id"])
    assert len(posts) == 3  # 500, 500, 200: then done
    assert len({p.body["id"] for p in posts}) == 1  # one notification, tried three times
    assert posts[2].at - posts[0].at >= 0.1  # backed off between attempts
    deadline = time.monotonic() + 5
    while True:
        sent = [
            line
            for line in proxy.lines
            if line.get("event") == "egress.notify"
            and line.get("egress.approval.id") == item["id"]
            and line.get("egress.notify.target") == receiver.url
            and line.get("egress.notify.attempts") == 3
        ]
        if sent:
            break
        assert time.monotonic() < deadline, "no egress.notify line for the retried delivery"
        time.sleep(0.05)
    assert sent[0]["egress.notify.outcome"] == "sent"
    time.sleep(0.5)
    assert len(receiver.received("/flaky", item__id=item["id"])) == 3
    approve(proxy, item["id"])
    thread.join(30)


def test_a_hanging_webhook_delays_neither_holds_nor_approvals(
    notifying: tuple[ProxyProcess, Path], receiver: Receiver, upstreams: Upstreams
) -> None:
    proxy, _ = notifying
    first, second = NAMES[3], NAMES[6]
    thread_1, out_1 = _background(proxy, f"http://{first}:{upstreams.http.port}/stuck")
    stuck = wait_pending(proxy, first)
    receiver.wait("/hang")  # the hook's worker hangs on this or an earlier notification
    started = time.monotonic()
    thread_2, out_2 = _background(proxy, f"http://{second}:{upstreams.http.port}/fast")
    item = wait_pending(proxy, second)
    assert time.monotonic() - started < 3.0
    approved = time.monotonic()
    approve(proxy, item["id"])
    thread_2.join(30)
    response = out_2[0]
    assert isinstance(response, httpx.Response) and response.status_code == 200
    assert time.monotonic() - approved < 2.0
    # the other targets have queues of their own: they heard of it at once
    receiver.wait("/json", event="resolved", item__id=item["id"], timeout=3)
    assert not receiver.received("/hang", item__id=item["id"])  # still queued behind
    approve(proxy, stuck["id"])
    thread_1.join(30)
    assert isinstance(out_1[0], httpx.Response) and out_1[0].status_code == 200


def test_a_reload_changes_targets_and_console_url(
    notifying: tuple[ProxyProcess, Path], receiver: Receiver, upstreams: Upstreams
) -> None:
    proxy, policy = notifying
    original = policy.read_text()
    try:
        _policy(
            policy,
            upstreams,
            f"    - url: {receiver.url}/reloaded\n",
            extra="  console_url: https://warden.example/approvals\n",
        )
        with api(proxy) as client:
            assert client.post("/v1/policy/reload").json()["ok"] is True
        host = NAMES[4]
        thread, _out = _background(proxy, f"http://{host}:{upstreams.http.port}/re")
        item = wait_pending(proxy, host)
        (post,) = receiver.wait("/reloaded", item__id=item["id"])
        assert post.body["console_url"] == f"https://warden.example/approvals#pending/{item['id']}"
        time.sleep(0.3)
        assert not receiver.received("/json", item__id=item["id"])
        approve(proxy, item["id"])
        thread.join(30)
    finally:
        policy.write_text(original)
        with api(proxy) as client:
            client.post("/v1/policy/reload")


def test_bad_notify_config_is_a_policy_error_with_file_and_line(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    bad = _policy(
        tmp_path / "bad.yaml",
        upstreams,
        """\
    - url: ftp://hooks.example/in
    - url: http://hooks.example/in
      format: teams
      headers: {Authorization: "Bearer inline-secret"}
""",
    )
    validate = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "policy", "validate", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert validate.returncode == 2
    out = validate.stdout + validate.stderr
    assert f"{bad}:12: approval.notify[0].url: 'ftp://hooks.example/in' must be an http" in out
    assert f"{bad}:14: approval.notify[1].format: Input should be 'json' or 'slack'" in out
    assert f"{bad}:15: approval.notify[1].headers.Authorization:" in out
    assert "env:VARIABLE" in out and "inline-secret" not in out
    with pytest.raises(RuntimeError) as refused:
        start_proxy(tmp_path / "state", [bad], env=TOKEN_ENV)
    assert f"{bad}:12: approval.notify[0].url" in str(refused.value)


def test_a_fleet_notifies_once_per_item(
    upstreams: Upstreams, receiver: Receiver, tmp_path: Path
) -> None:
    with start_postgres() as pg:
        dsn = pg.create_database()
        replicas: list[ProxyProcess] = []
        try:
            for name in ("a", "b"):
                policy = _policy(
                    tmp_path / f"policy-{name}.yaml",
                    upstreams,
                    f"    - url: {receiver.url}/fleet\n",
                )
                replicas.append(
                    start_proxy(
                        tmp_path / f"state-{name}",
                        [policy],
                        *_args(),
                        "--store",
                        dsn,
                        env=TOKEN_ENV,
                    )
                )
            a, b = replicas
            url = f"http://{NAMES[5]}:{upstreams.http.port}/fleet"
            thread_a, out_a = _background(a, url)
            wait_pending(a, NAMES[5])
            thread_b, out_b = _background(b, url)
            item = wait_pending(b, NAMES[5])
            (_held,) = receiver.wait("/fleet", event="held", item__id=item["id"])
            approve(b, item["id"])
            thread_a.join(30)
            thread_b.join(30)
            assert [type(o[0]) for o in (out_a, out_b)] == [httpx.Response, httpx.Response]
            (resolved,) = receiver.wait("/fleet", event="resolved", item__id=item["id"])
            assert resolved.body["resolution"]["released"] == 1  # the one held on b
            time.sleep(1.0)  # room for a duplicate to arrive: none may
            assert len(receiver.received("/fleet", item__id=item["id"])) == 2
        finally:
            for proc in replicas:
                proc.stop()


def test_expiry_is_notified_as_resolved_expired(
    upstreams: Upstreams, receiver: Receiver, tmp_path: Path
) -> None:
    policy = _policy(tmp_path / "policy.yaml", upstreams, f"    - url: {receiver.url}/expiry\n")
    policy.write_text(
        policy.read_text()
        .replace("wait: 20s", "wait: 1s")
        .replace("pending_ttl: 1h", "pending_ttl: 2s")
    )
    proxy = start_proxy(tmp_path / "state", [policy], *_args(), env=TOKEN_ENV)
    try:
        host = NAMES[9]
        response = _get(proxy, f"http://{host}:{upstreams.http.port}/late")
        assert response.headers["x-egress-warden-reason"] == "approval_pending"
        (held,) = receiver.wait("/expiry", event="held")
        item_id = held.body["item"]["id"]
        (expired,) = receiver.wait("/expiry", event="resolved", item__id=item_id, timeout=15)
        assert expired.body["resolution"]["decision"] == "expired"
        assert expired.body["resolution"]["by"] is None
    finally:
        proxy.stop()


def test_an_approval_for_all_tells_of_each_agents_item(
    upstreams: Upstreams, receiver: Receiver, tmp_path: Path
) -> None:
    agents = tmp_path / "agents.yaml"
    registry = AgentRegistry(agents)
    tokens = {name: registry.add(name) for name in ("alice", "bob")}
    policy = _policy(tmp_path / "policy.yaml", upstreams, f"    - url: {receiver.url}/all\n")
    policy.write_text(policy.read_text().replace("required: false", "required: true"))
    proxy = start_proxy(
        tmp_path / "state", [policy], *_args(), "--agents", str(agents), env=TOKEN_ENV
    )
    try:
        url = f"http://{NAMES[10]}:{upstreams.http.port}/both"
        waiting = []
        for name, token in tokens.items():
            out: list[httpx.Response] = []

            def run(name: str = name, token: str = token, out: list[httpx.Response] = out) -> None:
                target = httpx.Proxy(proxy.url, auth=(name, token))
                with httpx.Client(proxy=target, trust_env=False, timeout=40) as client:
                    out.append(client.get(url))

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            waiting.append((thread, out))
            wait_pending(proxy, NAMES[10], agent=name)
        held = receiver.wait("/all", count=2, event="held")
        assert {p.body["item"]["agent"] for p in held} == {"alice", "bob"}
        alice = next(p.body["item"]["id"] for p in held if p.body["item"]["agent"] == "alice")
        approve(proxy, alice, grant_for="all")
        for thread, out in waiting:
            thread.join(30)
            assert out and out[0].status_code == 200
        resolved = receiver.wait("/all", count=2, event="resolved")
        assert {p.body["item"]["agent"] for p in resolved} == {"alice", "bob"}
        assert {p.body["resolution"]["for"] for p in resolved} == {"all"}
        assert all(p.body["resolution"]["released"] == 1 for p in resolved)
    finally:
        proxy.stop()


def test_requirements_targets_fire_and_outcomes_are_telemetry(
    upstreams: Upstreams, receiver: Receiver, tmp_path: Path
) -> None:
    """Webhooks in the admins' requirements file fire although the policy names none, and
    each delivery is an `egress.notify` telemetry record (sent, with the target's origin)."""
    policy = tmp_path / "policy.yaml"
    ports = sorted({80, 443, upstreams.http.port})
    policy.write_text(
        f"version: 1\ndefault: ask\nallow: [allowed.test, {ALLOWED_IP}/32]\n"
        f"network: {{ports: {ports}}}\nauth: {{required: false}}\n"
        "approval: {wait: 20s, pending_ttl: 1h}\n"
    )
    requirements = tmp_path / "requirements.yaml"
    requirements.write_text(
        f"version: 1\napproval:\n  notify:\n    - url: {receiver.url}/required/x\n"
    )
    proc = start_proxy(
        tmp_path / "state", [policy], "--requirements", str(requirements), *_args(), env=TOKEN_ENV
    )
    try:
        host = NAMES[11]
        thread, out = _background(proc, f"http://{host}:{upstreams.http.port}/req")
        item = wait_pending(proc, host)
        receiver.wait("/required/x", event="held", item__id=item["id"])
        approve(proc, item["id"])
        thread.join(30)
        receiver.wait("/required/x", event="resolved", item__id=item["id"])
        deadline = time.monotonic() + 5
        sent: list[dict[str, Any]] = []
        while time.monotonic() < deadline and len(sent) < 2:
            sent = [
                line
                for line in list(proc.lines)
                if line.get("event") == "egress.notify"
                and line.get("egress.approval.id") == item["id"]
                and line.get("egress.notify.outcome") == "sent"
            ]
            time.sleep(0.05)
        assert {line["egress.notify.event"] for line in sent} == {"held", "resolved"}
        assert all(line["egress.notify.target"] == receiver.url for line in sent)  # no path
    finally:
        proc.stop()
    response = out[0]
    assert isinstance(response, httpx.Response) and response.status_code == 200
