"""Editing a file a policy includes reloads the policy, as editing the policy itself does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import ALLOWED_IP, Upstreams, resolve_args
from tests.support.clients import raw_request
from tests.support.control import TOKEN_ENV
from tests.support.proxy import start_proxy

pytestmark = pytest.mark.e2e


def test_an_edited_include_is_reloaded(tmp_path: Path, upstreams: Upstreams) -> None:
    preset = tmp_path / "presets" / "extra.yaml"
    preset.parent.mkdir()
    preset.write_text("version: 1\nallow: [evilallowed.test]\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"version: 1\ninclude: [presets/extra.yaml]\ndefault: deny\nallow: [{ALLOWED_IP}/32]\n"
        f"network: {{ports: [{upstreams.http.port}]}}\n"
    )
    proxy = start_proxy(tmp_path / "state", [policy], *resolve_args(), env=TOKEN_ENV)
    try:
        target = f"evilallowed.test:{upstreams.http.port}"
        head = f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n"
        assert raw_request(proxy.proxy_port, head).status == 200
        preset.write_text("version: 1\nallow: [other.test]\n")
        deadline = time.monotonic() + 10
        while raw_request(proxy.proxy_port, head).status == 200:
            assert time.monotonic() < deadline, "the edited include was not reloaded"
            time.sleep(0.3)
        assert raw_request(proxy.proxy_port, head).headers["x-egress-warden-reason"] == (
            "default_deny"
        )
    finally:
        proxy.stop()
