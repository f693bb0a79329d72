"""The console's files: served without a token with a strict CSP, nothing inline, nothing from
another origin, and no HTML parsing of values in the script."""

from __future__ import annotations

import asyncio
import re
from importlib import resources

import httpx
import pytest

from proxy.control.app import ControlContext, create_app
from proxy.control.console import ASSETS

TOKEN = "console-test-token-0123456789abcdef"


def _get(path: str, host: str = "127.0.0.1:8081") -> httpx.Response:
    ctx = ControlContext(
        token=TOKEN,
        is_ready=lambda: True,
        policy=None,  # type: ignore[arg-type]
        approvals=None,  # type: ignore[arg-type]
        grants=None,  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        audit=None,  # type: ignore[arg-type]
        bus=None,  # type: ignore[arg-type]
        reload=None,  # type: ignore[arg-type]
        check=None,  # type: ignore[arg-type]
        rules_changed=None,  # type: ignore[arg-type]
    )

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8081") as c:
            return await c.get(path, headers={"Host": host})

    return asyncio.run(get())


def _text(name: str) -> str:
    return resources.files("proxy.control.console").joinpath(name).read_text(encoding="utf-8")


@pytest.mark.parametrize("path", sorted(ASSETS))
def test_assets_are_served_without_a_token_under_a_strict_csp(path: str) -> None:
    response = _get(path)
    assert response.status_code == 200
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-type"].split(";")[0] == ASSETS[path][1].split(";")[0]


def test_the_api_still_needs_the_token_and_a_known_host() -> None:
    assert _get("/v1/whoami").status_code == 401
    assert _get("/console/other.js").status_code == 401  # only the three files are public
    assert _get("/", host="rebound.example:8081").status_code == 421


def test_the_page_has_nothing_inline_and_nothing_from_elsewhere() -> None:
    html = _text("index.html")
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/console/console.js" defer>']
    assert "<style" not in html
    assert not re.search(r"\sstyle\s*=", html)
    assert not re.search(r"\son[a-z]+\s*=", html)
    for name in ("index.html", "console.js", "console.css"):
        urls = set(re.findall(r"https?://[^\s\"')]+", _text(name)))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)


def test_the_script_never_parses_values_as_html() -> None:
    script = _text("console.js")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    assert "new Function" not in script
    assert "new EventSource" not in script  # fetch() streaming, which can send the token
