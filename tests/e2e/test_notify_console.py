"""A notification's console link opens the admin console on that item (real Chromium, real
proxy, real webhook receiver): the approver follows the link, signs in and decides it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import playwright.sync_api as playwright_api
import pytest

from tests.conftest import Upstreams
from tests.e2e.test_notify import NAMES, Receiver, _args, _background, _policy, start_receiver
from tests.support.browser import chromium
from tests.support.control import TOKEN, TOKEN_ENV, wait_pending
from tests.support.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

CHROMIUM = chromium()

expect = playwright_api.expect


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = start_receiver()
    yield rec
    rec.close()


@pytest.fixture(scope="module")
def proxy(
    upstreams: Upstreams, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("notify-console")
    policy = _policy(tmp / "policy.yaml", upstreams, f"    - url: {receiver.url}/link\n")
    proc = start_proxy(tmp / "state", [policy], *_args(), env=TOKEN_ENV)
    yield proc
    proc.stop()


@pytest.fixture
def page(proxy: ProxyProcess) -> Iterator[Any]:
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        yield page
        browser.close()
        assert not problems, problems


def test_the_link_selects_its_item_and_a_approves_it(
    proxy: ProxyProcess, receiver: Receiver, upstreams: Upstreams, page: Any
) -> None:
    port = upstreams.http.port
    _first, first_out = _background(proxy, f"http://{NAMES[7]}:{port}/one")
    wait_pending(proxy, NAMES[7])
    thread, out = _background(proxy, f"http://{NAMES[8]}:{port}/two")
    item = wait_pending(proxy, NAMES[8])
    (post,) = receiver.wait("/link", event="held", item__id=item["id"])
    link = post.body["console_url"]
    assert link == f"{proxy.control_url}/#pending/{item['id']}"

    page.goto(link)
    page.get_by_label("Control token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    chosen = page.locator(f'#queue li[data-id="{item["id"]}"]')
    expect(chosen).to_have_attribute("aria-current", "true")  # the second item, not the first
    expect(page.locator("#queue li.selected")).to_have_count(1)
    page.locator("body").press("a")  # decide the selected item: approve, once
    thread.join(30)
    response = out[0]
    assert isinstance(response, httpx.Response) and response.status_code == 200
    assert not first_out  # the other item still waits
    receiver.wait("/link", event="resolved", item__id=item["id"])


def test_a_link_to_a_decided_item_says_so(
    proxy: ProxyProcess, receiver: Receiver, page: Any
) -> None:
    page.goto(f"{proxy.control_url}/#pending/0123456789ab")
    page.get_by_label("Control token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#status")).to_contain_text("0123456789ab is no longer pending")
