"""The webhook and LLM reviewers against real local servers: every failure escalates."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from proxy.hosts import canonicalize_host
from proxy.policy.model import LlmReviewerSection, Scope, WebhookReviewerSection
from proxy.review.chain import ReviewOutcome, ReviewRequest, Signal
from proxy.review.llm import LlmReviewer
from proxy.review.webhook import WebhookReviewer
from tests.support.review_servers import ReviewServer, start_chat_completions, start_webhook


@pytest.fixture(scope="module")
def webhook() -> Iterator[ReviewServer]:
    server = start_webhook()
    yield server
    server.close()


@pytest.fixture(scope="module")
def chat() -> Iterator[ReviewServer]:
    server = start_chat_completions()
    yield server
    server.close()


def request(name: str) -> ReviewRequest:
    return ReviewRequest(
        canonicalize_host(name),
        443,
        "CONNECT",
        "https",
        agent="alice",
        session="s1",
        justification="need the docs",
        signals=(Signal("long_label", "x", ReviewOutcome.ESCALATE),),
    )


def hook(server: ReviewServer, timeout: float = 1.0) -> WebhookReviewer:
    return WebhookReviewer(
        WebhookReviewerSection(
            kind="webhook", url=server.url + "/review", timeout=timeout, headers={"X-Key": "k"}
        )
    )


def llm(server: ReviewServer, timeout: float = 1.0) -> LlmReviewer:
    return LlmReviewer(
        LlmReviewerSection(
            kind="llm",
            url=server.url + "/v1",
            model="local-test",
            api_key_env="EGRESS_WARDEN_TEST_LLM_KEY",
            timeout=timeout,
        )
    )


@pytest.mark.parametrize("outcome", ["approve", "deny", "escalate"])
async def test_webhook_answers_decide(webhook: ReviewServer, outcome: str) -> None:
    review = await hook(webhook).review(request(f"{outcome}.vendor.example"))
    assert review.reviewer == "webhook" and review.outcome is ReviewOutcome(outcome)
    assert review.rationale == f"webhook says {outcome} for {outcome}.vendor.example"


async def test_webhook_receives_the_review_request(webhook: ReviewServer) -> None:
    webhook.received.clear()
    await hook(webhook).review(request("approve.vendor.example"))
    sent = webhook.received[-1]
    body = sent["body"]["review"]
    assert body["host"] == "approve.vendor.example" and body["port"] == 443
    assert body["agent"] == "alice" and body["session"] == "s1"
    assert body["justification"] == "need the docs"
    assert body["signals"][0]["name"] == "long_label"
    assert sent["headers"]["X-Key"] == "k"


async def test_webhook_scope_is_passed_on(webhook: ReviewServer) -> None:
    review = await hook(webhook).review(request("once.vendor.example"))
    assert review.outcome is ReviewOutcome.APPROVE and review.scope is Scope.ONCE


@pytest.mark.parametrize("kind", ["garbage", "schema", "error"])
async def test_webhook_bad_answers_escalate(webhook: ReviewServer, kind: str) -> None:
    review = await hook(webhook).review(request(f"{kind}.vendor.example"))
    assert review.outcome is ReviewOutcome.ESCALATE


async def test_webhook_timeout_escalates(webhook: ReviewServer) -> None:
    started = time.monotonic()
    review = await hook(webhook, timeout=0.5).review(request("slow.vendor.example"))
    assert review.outcome is ReviewOutcome.ESCALATE and "0.5s" in review.rationale
    assert time.monotonic() - started < 2.5


async def test_webhook_unreachable_escalates() -> None:
    server = start_webhook()
    url = server.url
    server.close()
    reviewer = WebhookReviewer(WebhookReviewerSection(kind="webhook", url=url, timeout=1.0))
    review = await reviewer.review(request("approve.vendor.example"))
    assert review.outcome is ReviewOutcome.ESCALATE and "unreachable" in review.rationale


@pytest.mark.parametrize("outcome", ["approve", "deny", "escalate"])
async def test_llm_valid_answers_decide(chat: ReviewServer, outcome: str) -> None:
    review = await llm(chat).review(request(f"{outcome}.vendor.example"))
    assert review.reviewer == "llm" and review.outcome is ReviewOutcome(outcome)


async def test_llm_request_carries_prompt_schema_and_key(
    chat: ReviewServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EGRESS_WARDEN_TEST_LLM_KEY", "sk-local-test")
    chat.received.clear()
    await llm(chat).review(request("approve.vendor.example"))
    sent = chat.received[-1]
    body = sent["body"]
    assert body["model"] == "local-test" and body["response_format"] == {"type": "json_object"}
    assert body["messages"][0]["role"] == "system" and "JSON" in body["messages"][0]["content"]
    user = json.loads(body["messages"][1]["content"])["review_request"]
    assert user["host"] == "approve.vendor.example" and user["justification"] == "need the docs"
    headers = {k.lower(): v for k, v in sent["headers"].items()}
    assert headers["authorization"] == "Bearer sk-local-test"


@pytest.mark.parametrize("kind", ["garbage", "schema", "error", "refuse"])
async def test_llm_invalid_answers_escalate(chat: ReviewServer, kind: str) -> None:
    review = await llm(chat).review(request(f"{kind}.vendor.example"))
    assert review.outcome is ReviewOutcome.ESCALATE, review


async def test_llm_timeout_escalates(chat: ReviewServer) -> None:
    started = time.monotonic()
    review = await llm(chat, timeout=0.5).review(request("slow.vendor.example"))
    assert review.outcome is ReviewOutcome.ESCALATE
    assert time.monotonic() - started < 2.5


async def test_reviewers_ignore_proxy_variables(
    webhook: ReviewServer, chat: ReviewServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The proxy's own environment may point at the proxy: reviewers are reached directly.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert (await hook(webhook).review(request("approve.v.example"))).outcome is (
        ReviewOutcome.APPROVE
    )
    assert (await llm(chat).review(request("approve.v.example"))).outcome is ReviewOutcome.APPROVE
