"""Events are data: one object per decision or lifecycle change, rendered by each sink."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from proxy.facts import RequestFacts
from proxy.hosts import IPAddress
from proxy.policy.model import Mode
from proxy.verdicts import Decision

Attributes = dict[str, Any]


@dataclass(frozen=True, slots=True)
class DecisionEvent:
    """`egress.decision`: one per decided request."""

    facts: RequestFacts
    decision: Decision
    mode: Mode
    address: IPAddress | None = None
    pending_id: str | None = None
    at: float = field(default_factory=time.time)

    name = "egress.decision"

    def attributes(self) -> Attributes:
        """The SPEC section 6 attribute names and values (absent values are left out)."""
        f, d = self.facts, self.decision
        attrs: Attributes = {
            "egress.decision": d.verdict.value,
            "egress.reason": d.reason.value,
            "egress.mode": self.mode.value,
            "egress.request_id": f.request_id,
            "network.transport.protocol": f.transport.value,
            "server.address": f.host.name if f.host is not None else f.raw_host,
            "server.port": f.port,
            "http.request.method": f.method,
        }
        optional: Attributes = {
            "egress.rule": d.rule,
            "egress.rule.source": d.source,
            "egress.detail": d.detail or None,
            "url.path": f.path,
            "client.address": f.client_address,
            "egress.agent.id": f.agent,
            "session.id": f.session,
            "network.peer.address": str(self.address) if self.address is not None else None,
            "egress.approval.id": self.pending_id,
        }
        attrs.update({k: v for k, v in optional.items() if v is not None})
        return attrs


@dataclass(frozen=True, slots=True)
class PolicyEvent:
    """`egress.policy`: a policy was loaded, rejected, or capped."""

    state: str  # loaded | rejected | warning
    files: tuple[str, ...]
    error: str | None = None
    extra: Attributes = field(default_factory=dict)

    name = "egress.policy"

    def attributes(self) -> Attributes:
        attrs: Attributes = {
            "egress.policy.state": self.state,
            "egress.policy.files": list(self.files),
        }
        if self.error is not None:
            attrs["error.message"] = self.error
        attrs.update(self.extra)
        return attrs


@dataclass(frozen=True, slots=True)
class ApprovalEvent:
    """`egress.approval`: a pending item was requested, approved, denied or expired."""

    state: str  # requested | approved | denied | expired
    pending_id: str
    host: str
    port: int
    agent: str | None = None
    session: str | None = None
    scope: str | None = None
    grant_for: str | None = None
    reviewer: str | None = None  # human | auto (policy change) | rules | webhook | llm
    approver: str | None = None
    wait_ms: int | None = None
    note: str | None = None
    request_id: str | None = None
    traceparent: str | None = None
    rationale: str | None = None  # an auto-reviewer's stated reason
    signals: tuple[str, ...] = ()  # the review signals it used

    name = "egress.approval"

    def attributes(self) -> Attributes:
        attrs: Attributes = {
            "egress.approval.state": self.state,
            "egress.approval.id": self.pending_id,
            "server.address": self.host,
            "server.port": self.port,
        }
        optional: Attributes = {
            "egress.agent.id": self.agent,
            "session.id": self.session,
            "egress.approval.scope": self.scope,
            "egress.approval.for": self.grant_for,
            "egress.approval.reviewer": self.reviewer,
            "egress.approval.approver": self.approver,
            "egress.approval.wait_ms": self.wait_ms,
            "egress.approval.note": self.note or None,
            "egress.request_id": self.request_id,
            "egress.approval.rationale": self.rationale,
            "egress.approval.signals": list(self.signals) if self.signals else None,
        }
        attrs.update({k: v for k, v in optional.items() if v is not None})
        return attrs


@dataclass(frozen=True, slots=True)
class ConnectionCloseEvent:
    """`egress.connection.close`: an admitted connection ended."""

    request_id: str
    host: str
    port: int
    bytes_sent: int  # client -> upstream
    bytes_received: int  # upstream -> client
    duration_ms: int
    transport: str
    agent: str | None = None
    session: str | None = None
    traceparent: str | None = None

    name = "egress.connection.close"

    def attributes(self) -> Attributes:
        attrs: Attributes = {
            "egress.request_id": self.request_id,
            "server.address": self.host,
            "server.port": self.port,
            "egress.bytes.sent": self.bytes_sent,
            "egress.bytes.received": self.bytes_received,
            "egress.duration_ms": self.duration_ms,
            "network.transport.protocol": self.transport,
        }
        if self.agent is not None:
            attrs["egress.agent.id"] = self.agent
        if self.session is not None:
            attrs["session.id"] = self.session
        return attrs


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    """`egress.notify`: one notification sent, given up on, or dropped (queue full)."""

    outcome: str  # sent | failed | dropped
    event: str  # held | resolved
    pending_id: str
    target: str  # the target's origin only: a webhook URL's path may be its secret
    attempts: int = 0
    status: int | None = None
    error: str | None = None

    name = "egress.notify"

    def attributes(self) -> Attributes:
        attrs: Attributes = {
            "egress.notify.outcome": self.outcome,
            "egress.notify.event": self.event,
            "egress.approval.id": self.pending_id,
            "egress.notify.target": self.target,
            "egress.notify.attempts": self.attempts,
        }
        if self.status is not None:
            attrs["http.response.status_code"] = self.status
        if self.error is not None:
            attrs["error.message"] = self.error
        return attrs
