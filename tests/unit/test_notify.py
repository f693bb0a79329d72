"""The notifier's core: payloads, retry timing, and the bounded per-target queue (the HTTP side
is an in-process httpx transport here; tests/e2e/test_notify.py uses a real server)."""

from __future__ import annotations

import asyncio
import email.utils
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest

from proxy.approvals.model import Outcome, Verdict
from proxy.approvals.notify import (
    MAX_DELAY,
    ItemResolution,
    NotificationEvent,
    Notifier,
    console_link,
    json_payload,
    parse_retry_after,
    retry_delay,
    retryable,
    slack_payload,
)
from proxy.policy.model import ApprovalSettings, NotifyTargetSection, Scope
from proxy.records import GrantFor, PendingItem

ITEM = PendingItem(
    id="abc123",
    host="api.example.test",
    port=443,
    scheme="https",
    method="CONNECT",
    agent="alice",
    session="s1",
    first_seen=1000.0,
    last_seen=1000.0,
    count=1,
    expires_at=4600.0,
    justification="need the <!channel> docs & more",
)
APPROVED = ItemResolution.of(
    Verdict(Outcome.APPROVED, "abc123", Scope.SESSION, GrantFor.AGENT, "bob", "human", "ok"), 2
)


def target(**kw: Any) -> NotifyTargetSection:
    return NotifyTargetSection.model_validate({"url": "http://hook.test/in", "backoff": 0, **kw})


def settings(*targets: NotifyTargetSection, console: str | None = None) -> ApprovalSettings:
    return ApprovalSettings(notify=tuple(targets), console_url=console)


# -- pure parts -----------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    low = [retry_delay(n, 1.0, rand=lambda a, b: a) for n in range(1, 5)]
    high = [retry_delay(n, 1.0, rand=lambda a, b: b) for n in range(1, 5)]
    assert low == [0.5, 1.0, 2.0, 4.0]
    assert high == [1.0, 2.0, 4.0, 8.0]
    assert retry_delay(30, 1.0) <= MAX_DELAY


def test_retry_after_wins_over_backoff_and_is_capped() -> None:
    assert retry_delay(1, 1.0, retry_after=7.0) == 7.0
    assert retry_delay(1, 1.0, retry_after=10_000.0) == MAX_DELAY


def test_retry_after_parses_seconds_and_http_dates() -> None:
    assert parse_retry_after("12", now=0) == 12.0
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(date, now=1_000_000) == pytest.approx(30.0)
    assert parse_retry_after("soon", now=0) is None
    assert parse_retry_after(None, now=0) is None


def test_only_5xx_408_and_429_are_retried() -> None:
    assert retryable(500) and retryable(503) and retryable(408) and retryable(429)
    assert not retryable(400) and not retryable(401) and not retryable(404)
    assert not retryable(302)


def test_console_link_points_at_the_item() -> None:
    assert console_link("https://warden.example", "x1") == "https://warden.example/#pending/x1"
    assert (
        console_link("https://warden.example/ops/#old", "x1")
        == "https://warden.example/ops/#pending/x1"
    )
    assert console_link(None, "x1") is None


def test_json_payload_has_the_documented_fields() -> None:
    held = json_payload(
        "held", ITEM, waiting=1, resolution=None, link="L", notification_id="n", at=5.0
    )
    assert held["type"] == "egress-warden.notification" and held["version"] == 1
    assert held["event"] == "held" and held["resolution"] is None
    assert held["item"]["destination"] == "api.example.test:443"
    assert held["item"]["expires_at"] == 4600.0 and held["item"]["waiting"] == 1
    assert held["console_url"] == "L"
    done = json_payload(
        "resolved", ITEM, waiting=2, resolution=APPROVED, link=None, notification_id="n", at=6.0
    )
    assert done["resolution"] == {
        "decision": "approved",
        "scope": "session",
        "for": "agent",
        "by": "bob",
        "reviewer": "human",
        "note": "ok",
        "released": 2,
    }
    json.dumps(done)  # serialisable as is


def test_slack_payload_escapes_what_the_agent_wrote() -> None:
    body = slack_payload("held", ITEM, waiting=1, resolution=None, link="https://w.example/#p")
    assert set(body) == {"text", "blocks"}
    assert "api.example.test:443" in body["text"] and "<https://w.example/#p|" in body["text"]
    rendered = json.dumps(body["blocks"])
    assert "<!channel>" in rendered  # shown, but only in plain_text blocks:
    for block in body["blocks"]:
        texts = [block["text"]] if "text" in block else block["fields"]
        for text in texts:
            if "<!channel>" in text["text"]:
                assert text["type"] == "plain_text"
    v6 = slack_payload("held", replace(ITEM, host="::1"), waiting=1, resolution=None, link=None)
    assert "[::1]:443" in v6["text"]


def test_slack_resolution_says_who_decided() -> None:
    body = slack_payload("resolved", ITEM, waiting=0, resolution=APPROVED, link=None)
    assert "approved by bob (session, for agent)" in body["text"]
    expired = slack_payload(
        "resolved", ITEM, waiting=0, resolution=ItemResolution.expired(), link=None
    )
    assert "expired" in expired["text"]


# -- the notifier ---------------------------------------------------------------------------


class Recorder:
    """An httpx transport answering from a script of statuses (then 200), recording bodies."""

    def __init__(self, statuses: list[int] | None = None, headers: dict[str, str] | None = None):
        self.statuses = list(statuses or [])
        self.headers = headers or {}
        self.requests: list[httpx.Request] = []
        self.gate: asyncio.Event | None = None  # set: requests wait for it

    def transport(self) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            if self.gate is not None:
                await self.gate.wait()
            status = self.statuses.pop(0) if self.statuses else 200
            return httpx.Response(status, headers=self.headers if status != 200 else {})

        return httpx.MockTransport(handle)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]


def make(
    recorder: Recorder,
    current: Callable[[], ApprovalSettings],
    reports: list[NotificationEvent],
    sleeps: list[float] | None = None,
    environ: dict[str, str] | None = None,
) -> Notifier:
    async def sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    return Notifier(
        current,
        "http://127.0.0.1:8081/",
        report=reports.append,
        transport=recorder.transport(),
        environ=environ or {},
        sleep=sleep,
    )


async def settle(notifier: Notifier, reports: list[NotificationEvent], count: int) -> None:
    for _ in range(500):
        if len(reports) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(reports)} reports, wanted {count}: {reports}")


async def test_held_and_resolved_are_posted_in_order() -> None:
    recorder, reports = Recorder(), []
    config = settings(target())
    notifier = make(recorder, lambda: config, reports)
    notifier.held(ITEM)
    notifier.resolved(ITEM, APPROVED)
    await settle(notifier, reports, 2)
    assert [b["event"] for b in recorder.bodies()] == ["held", "resolved"]
    assert recorder.bodies()[0]["console_url"] == "http://127.0.0.1:8081/#pending/abc123"
    assert [r.outcome for r in reports] == ["sent", "sent"]
    assert notifier.stats["sent"] == 2
    await notifier.close()


async def test_events_filter_and_policy_console_url() -> None:
    recorder, reports = Recorder(), []
    config = settings(target(events=["resolved"]), console="https://w.example/")
    notifier = make(recorder, lambda: config, reports)
    notifier.held(ITEM)
    notifier.resolved(ITEM, APPROVED)
    await settle(notifier, reports, 1)
    await asyncio.sleep(0.05)
    assert [b["event"] for b in recorder.bodies()] == ["resolved"]
    assert recorder.bodies()[0]["console_url"] == "https://w.example/#pending/abc123"
    await notifier.close()


async def test_500s_are_retried_with_backoff_until_sent() -> None:
    recorder, reports, sleeps = Recorder([500, 503]), [], []
    config = settings(target(backoff=1.0))
    notifier = make(recorder, lambda: config, reports, sleeps)
    notifier.held(ITEM)
    await settle(notifier, reports, 1)
    assert len(recorder.requests) == 3
    assert reports[0].outcome == "sent" and reports[0].attempts == 3
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0
    ids = {b["id"] for b in recorder.bodies()}
    assert len(ids) == 1  # the same notification each time: receivers can de-duplicate
    assert notifier.stats["retried"] == 2
    await notifier.close()


async def test_attempts_are_bounded() -> None:
    recorder, reports, sleeps = Recorder([500] * 10), [], []
    config = settings(target(attempts=3))
    notifier = make(recorder, lambda: config, reports, sleeps)
    notifier.held(ITEM)
    await settle(notifier, reports, 1)
    assert len(recorder.requests) == 3 and len(sleeps) == 2
    assert reports[0].outcome == "failed" and reports[0].status == 500
    await notifier.close()


async def test_a_4xx_gives_up_at_once_but_429_honours_retry_after() -> None:
    recorder, reports, sleeps = Recorder([404]), [], []
    config = settings(target())
    notifier = make(recorder, lambda: config, reports, sleeps)
    notifier.held(ITEM)
    await settle(notifier, reports, 1)
    assert len(recorder.requests) == 1 and reports[0].outcome == "failed" and sleeps == []
    await notifier.close()

    recorder, reports, sleeps = Recorder([429], {"Retry-After": "42"}), [], []
    notifier = make(recorder, lambda: config, reports, sleeps)
    notifier.held(ITEM)
    await settle(notifier, reports, 1)
    assert sleeps == [42.0] and reports[0].outcome == "sent" and reports[0].attempts == 2
    await notifier.close()


async def test_a_full_queue_drops_and_counts_without_waiting() -> None:
    recorder, reports = Recorder(), []
    recorder.gate = asyncio.Event()  # the webhook hangs
    config = settings(target(queue=2, timeout=60))
    notifier = make(recorder, lambda: config, reports)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(10):
        notifier.held(ITEM)
    assert loop.time() - started < 0.05  # the hooks never wait on the webhook
    await asyncio.sleep(0.05)
    # the queue holds two (the worker had not run yet), the rest is dropped
    dropped = [r for r in reports if r.outcome == "dropped"]
    assert len(dropped) == 8 and notifier.stats["dropped"] == 8
    assert len(recorder.requests) == 1  # the first is in flight, hanging
    notifier.held(ITEM)  # room again: one queued behind it
    assert notifier.stats["dropped"] == 8
    recorder.gate.set()
    await settle(notifier, reports, 11)
    assert notifier.stats["sent"] == 3
    await notifier.close()


async def test_a_hanging_webhook_times_out_per_attempt() -> None:
    recorder, reports = Recorder(), []
    recorder.gate = asyncio.Event()  # never set
    config = settings(target(timeout=0.05, attempts=2))
    notifier = make(recorder, lambda: config, reports)
    notifier.held(ITEM)
    await settle(notifier, reports, 1)
    assert reports[0].outcome == "failed" and "no answer within" in (reports[0].error or "")
    assert len(recorder.requests) == 2
    await notifier.close()


async def test_headers_come_from_the_environment() -> None:
    recorder, reports = Recorder(), []
    config = settings(target(headers={"Authorization": "env:HOOK_TOKEN"}))
    notifier = make(recorder, lambda: config, reports, environ={"HOOK_TOKEN": "Bearer s3cret"})
    notifier.held(ITEM)
    await settle(notifier, reports, 1)
    assert recorder.requests[0].headers["authorization"] == "Bearer s3cret"
    await notifier.close()


async def test_a_missing_variable_fails_without_sending_and_never_names_the_url() -> None:
    recorder, reports = Recorder(), []
    config = settings(target(url="env:SLACK_URL"), target(headers={"X-Key": "env:NOPE"}))
    notifier = make(recorder, lambda: config, reports)
    notifier.held(ITEM)
    await settle(notifier, reports, 2)
    assert recorder.requests == []
    assert {r.outcome for r in reports} == {"failed"}
    assert any("SLACK_URL is not set" in (r.error or "") for r in reports)
    assert any("NOPE is not set" in (r.error or "") for r in reports)
    await notifier.close()


async def test_the_target_origin_is_reported_not_the_url_path() -> None:
    recorder, reports = Recorder(), []
    config = settings(target(url="env:SLACK_URL"))
    env = {"SLACK_URL": "https://hooks.example.test/services/T0/B0/SECRET"}
    notifier = make(recorder, lambda: config, reports, environ=env)
    notifier.held(ITEM)
    await settle(notifier, reports, 1)
    assert str(recorder.requests[0].url) == env["SLACK_URL"]
    assert reports[0].target == "https://hooks.example.test"
    assert "SECRET" not in json.dumps(reports[0].attributes())
    await notifier.close()


async def test_a_reload_changes_the_targets() -> None:
    recorder, reports = Recorder(), []
    current = [settings(target(url="http://one.test/"))]
    notifier = make(recorder, lambda: current[0], reports)
    notifier.held(ITEM)
    await settle(notifier, reports, 1)
    current[0] = settings(target(url="http://two.test/", format="slack"))
    notifier.held(ITEM)
    await settle(notifier, reports, 2)
    assert [r.url.host for r in recorder.requests] == ["one.test", "two.test"]
    assert set(recorder.bodies()[1]) == {"text", "blocks"}
    current[0] = settings()
    notifier.held(ITEM)
    await asyncio.sleep(0.05)
    assert len(recorder.requests) == 2
    await notifier.close()


async def test_nothing_is_sent_after_close() -> None:
    recorder, reports = Recorder(), []
    config = settings(target())
    notifier = make(recorder, lambda: config, reports)
    await notifier.close()
    notifier.held(ITEM)
    await asyncio.sleep(0.05)
    assert recorder.requests == []


def test_the_policy_refuses_inline_header_values_and_other_schemes() -> None:
    with pytest.raises(ValueError, match="env:VARIABLE"):
        NotifyTargetSection.model_validate(
            {"url": "http://h.test/", "headers": {"Authorization": "Bearer x"}}
        )
    with pytest.raises(ValueError, match="http:// or https://"):
        NotifyTargetSection.model_validate({"url": "file:///etc/passwd"})
    with pytest.raises(ValueError, match="'json' or 'slack'"):
        NotifyTargetSection.model_validate({"url": "http://h.test/", "format": "teams"})


async def test_a_bad_url_or_console_url_in_the_environment_never_raises() -> None:
    recorder, reports = Recorder(), []
    config = settings(target(url="env:HOOK"), console="env:CONSOLE")
    env = {"HOOK": "not a url at all", "CONSOLE": "http://[::1"}
    notifier = make(recorder, lambda: config, reports, environ=env)
    notifier.held(ITEM)  # the console link cannot be built: logged, nothing raised
    config = settings(target(url="env:HOOK"))
    notifier.held(ITEM)
    await settle(notifier, reports, 1)
    assert reports[0].outcome == "failed" and "http(s) URL" in (reports[0].error or "")
    assert reports[0].target == "env:HOOK" and recorder.requests == []
    await notifier.close()
