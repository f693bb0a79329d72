"""Persisted records: runtime grants, pending items, approval history and decision audit rows."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from proxy.policy.model import Action, Scope


class GrantFor(StrEnum):
    """Who an approval applies to."""

    AGENT = "agent"
    ALL = "all"


class Resolution(StrEnum):
    """How a pending item ended."""

    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Grant:
    """A runtime allow/deny rule made by an approval or directly over the control API.

    scope SESSION grants live in memory only (until the session ends or the process restarts);
    scope ALWAYS grants are persisted by the store.
    """

    id: str
    pattern: str
    action: Action
    scope: Scope
    agent: str | None  # None: applies to every agent
    created_by: str
    note: str
    created_at: float  # unix seconds
    expires_at: float | None = None
    session: str | None = None  # for session grants made for one agent's session


@dataclass(frozen=True, slots=True)
class PendingItem:
    """One destination waiting for a decision: one per (agent, host, port)."""

    id: str
    host: str
    port: int
    scheme: str
    method: str
    agent: str | None
    session: str | None
    first_seen: float
    last_seen: float
    count: int
    expires_at: float
    review: str | None = None  # the auto-review trail (JSON) that escalated it to humans
    justification: str | None = None  # why the agent says it needs it (bounded, as sent)


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    """One approval-history row: requested, approved, denied or expired."""

    id: str  # the pending item id
    state: str  # requested | approved | denied | expired
    host: str
    port: int
    agent: str | None
    scope: Scope | None
    grant_for: GrantFor | None
    approver: str | None
    reviewer: str | None  # human | auto (a policy change) | rules | webhook | llm
    note: str
    wait_ms: int | None
    at: float
    grant_id: str | None = None  # the grant an approval or denial created, if any
    review: str | None = None  # an automatic outcome's review (JSON: reviewer, rationale, ...)


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One decision audit row."""

    request_id: str
    at: float
    decision: str  # allow | deny | hold
    reason: str
    host: str
    port: int
    method: str
    transport: str
    agent: str | None
    session: str | None
    rule: str | None
    source: str | None
    client_address: str | None
    peer_address: str | None
    mode: str
    path: str | None = None
    pending_id: str | None = None
