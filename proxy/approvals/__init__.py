"""Approvals: holding requests for a decision, and deciding them.

Small parts with one job each, composed by `ApprovalQueue` (queue.py):
- model.py      outcomes, verdicts, results and errors (closed codes; no HTTP here)
- waiters.py    the requests held in this process and the sweeper that notices clients leaving
- pending.py    the local copy of the shared pending queue, and its limits
- reviewing.py  the review tier (proxy/review's reviewers) carried out like an approver
- granting.py   grants made by approvals, once passes, revocation
- fleet.py      typed, versioned messages between replicas sharing one store
- present.py    the API and event-stream shapes
"""

from proxy.approvals.model import (
    POLICY_APPROVER,
    ApprovalError,
    ApprovalErrorCode,
    AutoReviewed,
    HoldResult,
    Outcome,
    ResolveResult,
    Verdict,
    grant_pattern,
    pending_key,
    verdict_from_record,
)
from proxy.approvals.present import describe, review_json, review_trail, with_review_trails
from proxy.approvals.queue import ApprovalQueue

__all__ = [
    "POLICY_APPROVER",
    "ApprovalError",
    "ApprovalErrorCode",
    "ApprovalQueue",
    "AutoReviewed",
    "HoldResult",
    "Outcome",
    "ResolveResult",
    "Verdict",
    "describe",
    "grant_pattern",
    "pending_key",
    "review_json",
    "review_trail",
    "verdict_from_record",
    "with_review_trails",
]
