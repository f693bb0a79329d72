"""The webhook reviewer: POSTs the review request as JSON to the organisation's service.

The answer must be `{"outcome": "approve"|"deny"|"escalate", "rationale": "...", "scope":
"once"|"session"|"always" (optional)}`; a timeout, a connection error, a status other than
2xx or an answer that does not fit the schema escalates. Nothing here ever approves on error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from proxy.policy.model import Scope, WebhookReviewerSection
from proxy.review.chain import Review, ReviewOutcome, ReviewRequest

if TYPE_CHECKING:  # imported when a webhook reviewer is configured (a lighter start without)
    import httpx

RATIONALE_LIMIT = 1000  # characters of a remote rationale that are kept
ANSWER_LIMIT = 64 * 1024  # bytes of an answer that are read


class ReviewAnswer(BaseModel):
    """The strict answer schema shared by the webhook and LLM reviewers."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    outcome: Literal["approve", "deny", "escalate"]
    rationale: Annotated[StrictStr, Field(min_length=1)]
    scope: Scope | None = None


def review_from_answer(reviewer: str, answer: ReviewAnswer) -> Review:
    rationale = answer.rationale.strip()[:RATIONALE_LIMIT] or "(no rationale)"
    return Review(reviewer, ReviewOutcome(answer.outcome), rationale, scope=answer.scope)


def escalation(reviewer: str, why: str) -> Review:
    return Review(reviewer, ReviewOutcome.ESCALATE, why[:RATIONALE_LIMIT])


class WebhookReviewer:
    """Asks a configured URL; see the module docstring for the contract."""

    name = "webhook"

    def __init__(
        self, settings: WebhookReviewerSection, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings
        self._transport = transport

    async def review(self, request: ReviewRequest) -> Review:
        import httpx

        s = self.settings
        try:
            # trust_env=False: the review service is reached directly, never through a proxy
            # taken from the environment (which could be this proxy itself).
            async with httpx.AsyncClient(
                timeout=s.timeout, trust_env=False, transport=self._transport
            ) as client:
                response = await client.post(
                    s.url, json={"review": request.as_json()}, headers=s.headers
                )
        except httpx.TimeoutException:
            return escalation(self.name, f"no answer within {s.timeout:g}s")
        except httpx.HTTPError as exc:
            return escalation(self.name, f"webhook unreachable: {type(exc).__name__}")
        if not 200 <= response.status_code < 300:
            return escalation(self.name, f"webhook answered HTTP {response.status_code}")
        body = response.content[:ANSWER_LIMIT]
        try:
            answer = ReviewAnswer.model_validate_json(body)
        except ValidationError as exc:
            return escalation(self.name, f"malformed answer ({exc.error_count()} errors)")
        return review_from_answer(self.name, answer)
