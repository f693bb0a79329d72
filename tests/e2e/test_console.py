"""The admin console in a real headless Chromium (Debian's `chromium`, driven by Playwright's
Python package with `executable_path`; no browser download) against the real proxy."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import playwright.sync_api as playwright_api
import pytest

from proxy.admins import AdminRegistry, admins_path
from proxy.agents import AgentRegistry
from proxy.control.access import Role
from tests.conftest import ALLOWED_IP, Upstreams, resolve_args, write_policy
from tests.support.browser import chromium
from tests.support.control import TOKEN, TOKEN_ENV, api, wait_pending
from tests.support.proxy import REPO, ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

CHROMIUM = chromium()

expect = playwright_api.expect
NAMES = [f"c{i}.console.test" for i in range(10)]
# The screenshots in docs/img are refreshed only on request (`EGRESS_WARDEN_SCREENSHOTS=1`): a
# plain test run must leave the working tree as it found it.
SCREENSHOTS = (
    REPO / "docs" / "img"
    if os.environ.get("EGRESS_WARDEN_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "egress-warden-console"
)


@dataclass
class Console:
    proxy: ProxyProcess
    agent_token: str
    viewer: str
    port: int  # the upstream's

    def url(self, index: int, path: str = "/") -> str:
        return f"http://{NAMES[index]}:{self.port}{path}"

    def agent_proxy(self, session: str) -> str:
        return f"http://alice~{session}:{self.agent_token}@{self.proxy.proxy_host}:{self.proxy.proxy_port}"


@pytest.fixture(scope="module")
def console(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("console")
    ports = sorted({80, 443, upstreams.http.port})
    policy = write_policy(
        tmp / "policy.yaml",
        upstreams,
        body=f"version: 1\ndefault: ask\nallow: [allowed.test, {ALLOWED_IP}/32]\n"
        f"network: {{ports: {ports}}}\napproval: {{wait: 20s, pending_ttl: 1h}}\n"
        "auth: {required: false}\n",
    )
    agents = tmp / "agents.yaml"
    agent_token = AgentRegistry(agents).add("alice")
    state = tmp / "state"
    viewer = AdminRegistry.load(admins_path(state)).add("vera", Role.VIEWER)
    extra = [*resolve_args(), "--agents", str(agents)]
    for name in NAMES:
        extra += ["--resolve", f"{name}:{ALLOWED_IP}"]
    proc = start_proxy(state, [policy], *extra, env=TOKEN_ENV)
    yield Console(proc, agent_token, viewer, upstreams.http.port)
    proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, console: Console) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on(
        "request",
        lambda r: None if r.url.startswith(console.proxy.control_url) else problems.append(r.url),
    )
    page.goto(console.proxy.control_url + "/")
    yield page
    context.close()
    # No script error, no CSP violation, no request anywhere but the control listener.
    assert not [p for p in problems if "401" not in p and "403" not in p], problems


def _sign_in(page: Any, token: str) -> None:
    page.get_by_label("Control token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#who")).to_contain_text("Signed in as")


def _curl(console: Console, index: int, session: str) -> subprocess.Popen[str]:
    """A held request: curl through the proxy as alice in `session` (prints the status)."""
    return subprocess.Popen(
        [
            *("curl", "-q", "-sS", "--noproxy", "", "-o", "/dev/null", "-w", "%{http_code}"),
            *("-x", console.agent_proxy(session), "--max-time", "60", console.url(index)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _asks(console: Console, index: int, session: str) -> bool:
    """Does a request now wait for approval? (it is denied from the API to let it go)"""
    result: list[int] = []

    def send() -> None:
        with httpx.Client(proxy=console.agent_proxy(session), trust_env=False, timeout=60) as c:
            result.append(c.get(console.url(index)).status_code)

    thread = threading.Thread(target=send)
    thread.start()
    try:
        item = wait_pending(console.proxy, NAMES[index], agent="alice", timeout=10)
    except AssertionError:
        thread.join()
        return False
    with api(console.proxy) as client:
        client.post(f"/v1/pending/{item['id']}/deny", json={"scope": "once", "for": "agent"})
    thread.join()
    return result == [403]


def test_a_wrong_token_shows_a_clear_sign_in_error(page: Any) -> None:
    page.get_by_label("Control token").fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#sign-in-error")).to_contain_text("not accepted")
    expect(page.locator("#app")).to_be_hidden()
    page.get_by_label("Control token").fill("")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#sign-in-error")).to_have_text("Enter a control token.")


def test_a_held_request_is_approved_from_the_queue(page: Any, console: Console) -> None:
    _sign_in(page, TOKEN)
    expect(page.locator("#live")).to_have_text("live")
    started = time.monotonic()
    curl = _curl(console, 0, "s1")
    try:
        item = page.locator("#queue li", has_text=NAMES[0])
        expect(item).to_be_visible(timeout=2000)
        assert time.monotonic() - started < 2.5
        expect(item).to_contain_text("alice")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "console-queue.png"))
        item.get_by_label(f"Scope for {NAMES[0]}").select_option("session")
        item.get_by_role("button", name="Approve").click()
        out, err = curl.communicate(timeout=15)
    finally:
        curl.kill()
    assert curl.returncode == 0 and out == "200", err
    expect(page.locator("#status")).to_contain_text("Approved")
    expect(page.locator("#queue li", has_text=NAMES[0])).to_have_count(0)
    with api(console.proxy) as client:
        grants = [g for g in client.get("/v1/grants").json() if NAMES[0] in g["pattern"]]
    assert [(g["scope"], g["agent"], g["session"], g["created_by"]) for g in grants] == [
        ("session", "alice", "s1", "admin")
    ]


def test_ending_a_session_in_the_page_ends_its_grant(page: Any, console: Console) -> None:
    _sign_in(page, TOKEN)
    curl = _curl(console, 1, "s2")
    try:
        item = page.locator("#queue li", has_text=NAMES[1])
        expect(item).to_be_visible(timeout=5000)
        page.keyboard.press("2")  # scope: session
        page.keyboard.press("a")
        out, err = curl.communicate(timeout=15)
    finally:
        curl.kill()
    assert out == "200", err
    page.get_by_role("tab", name="Sessions").click()
    row = page.locator("#sessions tbody tr", has_text="s2")
    expect(row).to_contain_text(NAMES[1])
    row.get_by_role("button", name="End session alice~s2").click()
    expect(page.locator("#status")).to_contain_text("1 session grant(s) revoked")
    assert _asks(console, 1, "s2")


def test_a_viewer_cannot_approve(browser: Any, console: Console) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844})  # a phone
    page = context.new_page()
    try:
        page.goto(console.proxy.control_url + "/")
        _sign_in(page, console.viewer)
        expect(page.locator("#who")).to_contain_text("vera (viewer)")
        curl = _curl(console, 2, "v")
        try:
            item = page.locator("#queue li", has_text=NAMES[2])
            expect(item).to_be_visible(timeout=5000)
            approve = item.get_by_role("button", name="Approve")
            expect(approve).to_be_disabled()
            # The live queue may re-render the row between two looks: measure when it is there.
            right = approve.evaluate("button => button.getBoundingClientRect().right")
            assert right <= 390  # fits a phone
            page.keyboard.press("a")
            expect(page.locator("#error")).to_contain_text("Not allowed for your role")
            with api(console.proxy) as client:
                assert NAMES[2] in {i["host"] for i in client.get("/v1/pending").json()}
        finally:
            curl.kill()
            curl.wait()
    finally:
        context.close()


def test_revoking_a_grant_in_the_page_makes_the_next_request_ask(
    page: Any, console: Console
) -> None:
    with api(console.proxy) as client:
        made = client.post("/v1/grants", json={"pattern": NAMES[3], "agent": "alice"})
        assert made.status_code == 201, made.text
    with httpx.Client(proxy=console.agent_proxy("r"), trust_env=False, timeout=30) as c:
        assert c.get(console.url(3)).status_code == 200
    _sign_in(page, TOKEN)
    page.get_by_role("tab", name="Grants").click()
    page.get_by_label("Filter").fill(NAMES[3])
    row = page.locator("#grants tbody tr", has_text=NAMES[3])
    expect(row).to_have_count(1)
    row.get_by_role("button", name=f"Revoke {NAMES[3]}").click()
    expect(page.locator("#status")).to_contain_text("Revoked")
    expect(page.locator("#grants tbody tr", has_text=NAMES[3])).to_have_count(0)
    assert _asks(console, 3, "r")


def test_decisions_and_dashboard(page: Any, console: Console) -> None:
    with httpx.Client(proxy=console.proxy.url, trust_env=False, timeout=30) as c:
        assert c.get(f"http://allowed.test:{console.port}/dash").status_code == 200
    _sign_in(page, TOKEN)
    page.get_by_role("tab", name="Decisions").click()
    page.get_by_label("Host").fill("allowed.test")
    page.get_by_role("button", name="Filter").click()
    row = page.locator("#decisions tbody tr", has_text="allowed.test").first
    expect(row).to_contain_text("allow")
    expect(row).to_contain_text("policy.yaml:")  # the deciding rule's file:line
    page.get_by_role("tab", name="Dashboard").click()
    expect(page.locator("#chart svg rect").first).to_be_visible()
    expect(page.locator("#top-agents")).to_contain_text("alice")
    page.screenshot(path=str(SCREENSHOTS / "console-dashboard.png"))
