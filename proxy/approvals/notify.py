"""Notifications: webhooks told when a pending item is held and when it is resolved.

`approval.notify` lists the targets (docs/notifications.md). The queue calls `held` and
`resolved` on the replica that created / resolved the item (so a fleet notifies once); both only
put a ready payload on the target's bounded queue and return. One background task per target
drains its queue in order, retrying with jittered exponential backoff: a slow or unreachable
webhook never delays a hold or an approval, and a full queue drops (counted) instead.

Targets are admin-configured and may be any address: the notifier dials them directly (never
through a proxy from the environment, which could be this proxy) and follows no redirect.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from proxy.approvals.model import Verdict
from proxy.approvals.present import review_json
from proxy.policy.model import ApprovalSettings, NotifyOn, NotifyTargetSection
from proxy.records import PendingItem
from proxy.telemetry.events import NotificationEvent

if TYPE_CHECKING:  # httpx is imported when a webhook is configured (a lighter start without)
    import httpx

log = structlog.get_logger("egress-warden")

PAYLOAD_VERSION = 1
MAX_DELAY = 300.0  # seconds: the longest wait between two attempts (Retry-After included)
RETRY_STATUSES = frozenset({408, 429})  # the 4xx answers worth another attempt
USER_AGENT = "egress-warden-notify/1"


# -- what is told --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ItemResolution:
    """How an item ended: approved or denied (by whom, with what scope) or expired."""

    decision: str  # approved | denied | expired
    scope: str | None = None
    grant_for: str | None = None
    by: str | None = None  # the approver's name (a person, a reviewer, or "policy")
    reviewer: str | None = None  # human | auto | rules | webhook | llm
    note: str = ""
    released: int = 0  # requests the decision released on the resolving replica

    @classmethod
    def of(cls, verdict: Verdict, released: int) -> ItemResolution:
        return cls(
            verdict.outcome.value,
            verdict.scope.value,
            verdict.grant_for.value,
            verdict.approver,
            verdict.reviewer,
            verdict.note,
            released,
        )

    @classmethod
    def expired(cls) -> ItemResolution:
        return cls("expired")


def console_link(base: str | None, item_id: str) -> str | None:
    """The console's address for one item: `<base>/#pending/<id>` (the console selects it)."""
    if not base:
        return None
    import httpx

    parts = httpx.URL(base)
    path = parts.path or "/"
    return str(parts.copy_with(path=path, fragment=f"pending/{item_id}"))


def json_payload(
    event: NotifyOn,
    item: PendingItem,
    *,
    waiting: int,
    resolution: ItemResolution | None,
    link: str | None,
    notification_id: str,
    at: float,
) -> dict[str, Any]:
    """The generic JSON object (version 1; docs/notifications.md documents every field)."""
    return {
        "type": "egress-warden.notification",
        "version": PAYLOAD_VERSION,
        "id": notification_id,  # the same on every retry: receivers may de-duplicate by it
        "event": event,
        "at": at,
        "item": {
            "id": item.id,
            "destination": _destination(item),
            "host": item.host,
            "port": item.port,
            "scheme": item.scheme,
            "method": item.method,
            "agent": item.agent,
            "session": item.session,
            "justification": item.justification,
            "review": review_json(item.review),
            "first_seen": item.first_seen,
            "expires_at": item.expires_at,
            "count": item.count,
            "waiting": waiting,
        },
        "resolution": (
            None
            if resolution is None
            else {
                "decision": resolution.decision,
                "scope": resolution.scope,
                "for": resolution.grant_for,
                "by": resolution.by,
                "reviewer": resolution.reviewer,
                "note": resolution.note or None,
                "released": resolution.released,
            }
        ),
        "console_url": link,
    }


def slack_payload(
    event: NotifyOn,
    item: PendingItem,
    *,
    waiting: int,
    resolution: ItemResolution | None,
    link: str | None,
) -> dict[str, Any]:
    """A Slack incoming-webhook message: `text` (the notification line) and `blocks`.

    What an agent chose (host, session, justification) is escaped in mrkdwn and shown as
    plain text in the blocks, so it cannot mention a channel or forge a link."""
    dest = _destination(item)
    agent = item.agent or "(anonymous)"
    if resolution is None:
        headline = f"{agent} is waiting for {dest}: approval needed"
    elif resolution.decision == "expired":
        headline = f"{dest} for {agent} expired without a decision"
    else:
        headline = f"{dest} for {agent} was {resolution.decision} by {resolution.by or '?'}"
        if resolution.scope:
            headline += f" ({resolution.scope}, for {resolution.grant_for})"
    text = "egress-warden: " + _slack_escape(headline)
    if link:
        text += f" <{_slack_escape(link)}|open in the console>"
    fields: list[tuple[str, str | None]] = [
        ("Destination", dest),
        ("Agent", agent),
        ("Session", item.session),
        ("Method", item.method),
        (
            "Waiting" if resolution is None else "Released",
            str(waiting if resolution is None else resolution.released),
        ),
        ("Expires", _utc(item.expires_at) if resolution is None else None),
        ("Note", resolution.note if resolution is not None else None),
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": _plain(("egress-warden: " + headline)[:3000])},
        {
            "type": "section",
            "fields": [_plain(f"{name}: {value}"[:2000]) for name, value in fields if value],
        },
    ]
    if item.justification:
        blocks.append(
            {"type": "section", "text": _plain(f"Justification: {item.justification}"[:3000])}
        )
    if link:
        blocks.append(
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": f"<{_slack_escape(link)}|Open {_slack_escape(item.id)} in the console>",
                },
            }
        )
    return {"text": text, "blocks": blocks}


def _destination(item: PendingItem) -> str:
    return f"[{item.host}]:{item.port}" if ":" in item.host else f"{item.host}:{item.port}"


def _plain(text: str) -> dict[str, Any]:
    return {"type": "plain_text", "text": text, "emoji": False}


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


# -- retries ---------------------------------------------------------------------------------


def retry_delay(
    attempt: int,
    backoff: float,
    retry_after: float | None = None,
    rand: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): the server's
    Retry-After when it gave one, else `backoff` doubled per attempt with "equal jitter"
    (half fixed, half random, so replicas retrying together spread out); at most MAX_DELAY."""
    if retry_after is not None:
        return min(MAX_DELAY, max(0.0, retry_after))
    ceiling = min(MAX_DELAY, backoff * 2.0 ** (attempt - 1))
    return ceiling / 2 + rand(0.0, ceiling / 2)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date; None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now)
    return None


def retryable(status: int) -> bool:
    """5xx, 408 and 429 are tried again; any other non-2xx answer is final."""
    return status >= 500 or status in RETRY_STATUSES


# -- telemetry -------------------------------------------------------------------------------


def log_notification(event: NotificationEvent) -> None:
    """The default reporter: one structured log line per outcome."""
    level = "info" if event.outcome == "sent" else "warning"
    getattr(log, level)(event.name, **event.attributes())


# -- delivery --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Job:
    event: NotifyOn
    pending_id: str
    body: dict[str, Any]


class _Target:
    """One configured webhook: its resolved URL and headers, its queue and its worker."""

    def __init__(
        self,
        section: NotifyTargetSection,
        environ: Mapping[str, str],
        transport: httpx.AsyncBaseTransport | None,
    ) -> None:
        import httpx

        self.section = section
        self.problem: str | None = None
        self.url = _from_env(section.url, environ)
        self.headers = {"User-Agent": USER_AGENT}
        for name, ref in section.headers.items():
            value = _from_env(ref, environ)
            if value is None:
                self.problem = f"header {name}: environment variable {ref[4:]} is not set"
            else:
                self.headers[name] = value
        if self.url is None:
            self.problem = f"url: environment variable {section.url[4:]} is not set"
            self.label = section.url
        else:
            try:
                parsed = httpx.URL(self.url)
            except httpx.InvalidURL:
                parsed = httpx.URL()
            if parsed.scheme not in ("http", "https") or not parsed.host:
                self.problem = "url: the environment variable does not hold an http(s) URL"
                self.label = section.url
            else:
                self.label = f"{parsed.scheme}://{parsed.netloc.decode('ascii', 'replace')}"
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=section.queue)
        self.busy = False
        self.client = httpx.AsyncClient(
            timeout=section.timeout,
            trust_env=False,  # never through a proxy from the environment (this one, say)
            follow_redirects=False,  # a redirect could point anywhere, metadata included
            transport=transport,
        )
        self.task: asyncio.Task[None] | None = None

    def wants(self, event: NotifyOn) -> bool:
        return event in self.section.events


def _from_env(value: str, environ: Mapping[str, str]) -> str | None:
    """`value` itself, or the variable it names when it is `env:NAME` (None if unset)."""
    if value.startswith("env:"):
        found = environ.get(value[4:])
        return found if found else None
    return value


class Notifier:
    """Fires `approval.notify` webhooks without ever making the caller wait.

    `settings` returns the approval settings in force (re-read on every event, so a reload
    changes the targets); `console_url` is the console's address used when the policy sets no
    `approval.console_url`."""

    def __init__(
        self,
        settings: Callable[[], ApprovalSettings],
        console_url: str | None = None,
        *,
        report: Callable[[NotificationEvent], None] = log_notification,
        transport: httpx.AsyncBaseTransport | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._console_url = console_url
        self._report = report
        self._transport = transport
        self._environ = environ if environ is not None else os.environ
        self._clock = clock
        self._sleep = sleep
        self._targets: dict[str, _Target] = {}
        self._configured: tuple[NotifyTargetSection, ...] | None = None
        self._retiring: set[_Target] = set()  # no longer configured, still sending
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self.stats: Counter[str] = Counter()  # sent | failed | dropped | retried

    # -- the queue's hooks (never block, never raise) ------------------------------------

    def held(self, item: PendingItem, waiting: int = 1) -> None:
        """A new pending item (this replica created it)."""
        self._publish("held", item, waiting, None)

    def resolved(self, item: PendingItem, resolution: ItemResolution) -> None:
        """An item approved, denied or expired (this replica resolved or purged it)."""
        self._publish("resolved", item, resolution.released, resolution)

    def _publish(
        self,
        event: NotifyOn,
        item: PendingItem,
        waiting: int,
        resolution: ItemResolution | None,
    ) -> None:
        if self._closed:
            return
        try:
            self._enqueue(event, item, waiting, resolution)
        except Exception as exc:  # a notification must never break a hold or an approval
            log.warning("egress.notify", error=f"{type(exc).__name__}: {exc}")

    def _enqueue(
        self,
        event: NotifyOn,
        item: PendingItem,
        waiting: int,
        resolution: ItemResolution | None,
    ) -> None:
        settings = self._settings()
        targets = [t for t in self._current(settings.notify) if t.wants(event)]
        if not targets:
            return
        link = console_link(self._base_url(settings), item.id)
        notification_id = uuid.uuid4().hex
        at = self._clock()
        for target in targets:
            if target.section.format == "slack":
                body = slack_payload(event, item, waiting=waiting, resolution=resolution, link=link)
            else:
                body = json_payload(
                    event,
                    item,
                    waiting=waiting,
                    resolution=resolution,
                    link=link,
                    notification_id=notification_id,
                    at=at,
                )
            try:
                target.queue.put_nowait(_Job(event, item.id, body))
            except asyncio.QueueFull:
                self._outcome(
                    NotificationEvent("dropped", event, item.id, target.label, error="queue full")
                )
                continue
            if target.task is None:
                target.task = asyncio.get_running_loop().create_task(self._drain(target))

    def _base_url(self, settings: ApprovalSettings) -> str | None:
        if settings.console_url:
            return _from_env(settings.console_url, self._environ)
        return self._console_url

    def _current(self, sections: tuple[NotifyTargetSection, ...]) -> list[_Target]:
        """The targets for `sections`, reusing those whose configuration did not change and
        retiring (once idle) those no longer configured."""
        if sections is self._configured:
            return list(self._targets.values())
        wanted = {s.model_dump_json(): s for s in sections}
        for key in [k for k in self._targets if k not in wanted]:
            self._retire(key)
        for key, section in wanted.items():
            if key not in self._targets:
                self._targets[key] = _Target(section, self._environ, self._transport)
        self._configured = sections
        return [self._targets[k] for k in wanted]

    def _retire(self, key: str) -> None:
        target = self._targets.pop(key)
        if target.task is not None and (target.busy or not target.queue.empty()):
            self._retiring.add(target)  # what is queued still goes out, then the worker ends
            return
        if target.task is not None:
            target.task.cancel()
        closing = asyncio.get_running_loop().create_task(target.client.aclose())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _drain(self, target: _Target) -> None:
        while True:
            if target in self._retiring and target.queue.empty():
                self._retiring.discard(target)
                await target.client.aclose()
                return
            job = await target.queue.get()
            target.busy = True
            try:
                self._outcome(await self._deliver(target, job))
            except Exception as exc:  # never let one bad delivery end the worker
                self._outcome(
                    NotificationEvent(
                        "failed", job.event, job.pending_id, target.label, error=repr(exc)
                    )
                )
            finally:
                target.busy = False
                target.queue.task_done()

    async def _deliver(self, target: _Target, job: _Job) -> NotificationEvent:
        """Try up to `attempts` times; 2xx is done, a final 4xx gives up at once."""
        import httpx

        s = target.section

        def result(
            outcome: str, attempts: int, status: int | None, error: str | None
        ) -> NotificationEvent:
            return NotificationEvent(
                outcome, job.event, job.pending_id, target.label, attempts, status, error
            )

        if target.problem is not None:
            return result("failed", 0, None, target.problem)
        assert target.url is not None
        status: int | None = None
        error: str | None = None
        for attempt in range(1, s.attempts + 1):
            retry_after: float | None = None
            try:
                # The timeout bounds the whole attempt (httpx's bounds each read, so a server
                # dripping bytes could hold it for ever).
                async with (
                    asyncio.timeout(s.timeout),
                    # The answer's body is never read: only its status and headers count.
                    target.client.stream(
                        "POST", target.url, json=job.body, headers=target.headers
                    ) as response,
                ):
                    status, error = response.status_code, None
                if 200 <= status < 300:
                    return result("sent", attempt, status, None)
                if not retryable(status):
                    return result("failed", attempt, status, f"HTTP {status}: not retried")
                if status in (429, 503):
                    retry_after = parse_retry_after(
                        response.headers.get("retry-after"), self._clock()
                    )
                error = f"HTTP {status}"
            except TimeoutError:
                status, error = None, f"no answer within {s.timeout:g}s"
            except httpx.HTTPError as exc:
                status, error = None, f"{type(exc).__name__}: {exc}".rstrip(": ")
            if attempt < s.attempts:
                self.stats["retried"] += 1
                await self._sleep(retry_delay(attempt, s.backoff, retry_after))
        return result("failed", s.attempts, status, error)

    def _outcome(self, event: NotificationEvent) -> None:
        self.stats[event.outcome] += 1
        try:
            self._report(event)
        except Exception as exc:  # reporting must not end the worker either
            log.warning("egress.notify", error=f"report failed: {exc!r}")

    # -- shutdown --------------------------------------------------------------------------

    async def close(self, grace: float = 2.0) -> None:
        """Give queued notifications up to `grace` seconds to go out, then stop."""
        self._closed = True
        targets = [*self._targets.values(), *self._retiring]
        pending = [asyncio.ensure_future(t.queue.join()) for t in targets if t.task is not None]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for waiter in late:
                waiter.cancel()
        for target in targets:
            if target.task is not None:
                target.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await target.task
            await target.client.aclose()
        self._targets.clear()
        self._retiring.clear()
