"""Talking to a running instance's control API from tests."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.support.proxy import ProxyProcess

TOKEN = "test-control-token-0123456789abcdef"
TOKEN_ENV = {"EGRESS_WARDEN_CONTROL_TOKEN": TOKEN}


def api(proxy: ProxyProcess) -> httpx.Client:
    return httpx.Client(
        base_url=proxy.control_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        trust_env=False,
        timeout=30,
    )


def wait_pending(
    proxy: ProxyProcess,
    host: str,
    *,
    agent: str | None = None,
    waiting: int = 1,
    timeout: float = 15,
) -> dict[str, Any]:
    """Poll `GET /v1/pending` until `host` has at least `waiting` held requests."""
    deadline = time.monotonic() + timeout
    items: list[dict[str, Any]] = []
    with api(proxy) as client:
        while time.monotonic() < deadline:
            items = client.get("/v1/pending").json()
            for item in items:
                if item["host"] == host and item["agent"] == agent and item["waiting"] >= waiting:
                    return item
            time.sleep(0.05)
    raise AssertionError(f"{host} not pending with {waiting} waiting: {items}")


def approve(
    proxy: ProxyProcess, item_id: str, scope: str = "once", grant_for: str = "all"
) -> dict[str, Any]:
    """Approve `item_id`; "for": "agent" is refused (422) for an item no verified agent asked
    for, so per-agent tests pass grant_for="agent" explicitly."""
    with api(proxy) as client:
        response = client.post(
            f"/v1/pending/{item_id}/approve",
            json={"scope": scope, "for": grant_for, "note": "test"},
        )
    assert response.status_code == 200, response.text
    return response.json()


def deny(
    proxy: ProxyProcess, item_id: str, scope: str = "once", grant_for: str = "all"
) -> dict[str, Any]:
    with api(proxy) as client:
        response = client.post(
            f"/v1/pending/{item_id}/deny", json={"scope": scope, "for": grant_for}
        )
    assert response.status_code == 200, response.text
    return response.json()
