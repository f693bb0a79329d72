"""What approvals speak in: outcomes, verdicts, hold results and the errors a caller can act on
(closed codes; the control API maps them to HTTP statuses, the core knows none)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from proxy.policy.model import Scope
from proxy.records import ApprovalRecord, Grant, GrantFor, PendingItem
from proxy.review.chain import ChainResult

PendingKey = tuple[str | None, str, int]  # (agent, host, port)
POLICY_APPROVER = "policy"  # the approver recorded when a policy change resolves an item


class ApprovalErrorCode(StrEnum):
    """Why an approval request cannot be carried out (the API's `error` code)."""

    NOT_FOUND = "not_found"  # no such pending item (resolved, expired or never existed)
    SCOPE_NOT_ALLOWED = "scope_not_allowed"  # the scope is not one approvers may grant
    FOR_AGENT_WITHOUT_AGENT = "for_agent_without_agent"  # `for: agent` on an anonymous item
    STORE_UNAVAILABLE = "store_unavailable"  # the shared queue cannot be reached


class ApprovalError(Exception):
    """An approval request that cannot be carried out: a closed `code` and a detail for people."""

    def __init__(self, code: ApprovalErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class Outcome(StrEnum):
    APPROVED = "approved"
    DENIED = "denied"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What an approver (a person, a reviewer or a policy change) decided for an item."""

    outcome: Outcome
    pending_id: str
    scope: Scope
    grant_for: GrantFor
    approver: str
    reviewer: str
    note: str
    grant_id: str | None = None


@dataclass(frozen=True, slots=True)
class HoldResult:
    item: PendingItem
    verdict: Verdict | None  # None: no answer in time (or the client left)
    abandoned: bool = False
    draining: bool = False  # the proxy is shutting down: answered now, the item stays


@dataclass(frozen=True, slots=True)
class ResolveResult:
    item: PendingItem
    verdict: Verdict
    released: int
    grant: Grant | None  # the grant the resolution made, if any


@dataclass(frozen=True, slots=True)
class AutoReviewed:
    """What the review tier made of a held request: a verdict when it decided (approve or
    deny), else the escalated chain result that goes on the pending item for humans."""

    result: ChainResult
    verdict: Verdict | None


def pending_key(agent: str | None, host: str, port: int) -> PendingKey:
    return (agent, host, port)


def grant_pattern(host: str, port: int) -> str:
    """The exact-host pattern a grant for host:port uses."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def verdict_from_record(record: ApprovalRecord) -> Verdict | None:
    """Rebuild a verdict from the approval history (for requests held on another replica)."""
    if record.state not in (Outcome.APPROVED.value, Outcome.DENIED.value):
        return None
    return Verdict(
        Outcome(record.state),
        record.id,
        record.scope or Scope.ONCE,
        record.grant_for or GrantFor.AGENT,
        record.approver or "unknown",
        record.reviewer or "human",
        record.note,
        record.grant_id,
    )
