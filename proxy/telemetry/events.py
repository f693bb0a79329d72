"""Events are data: one object per decision or lifecycle change, rendered by each sink."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.decide import Decision
from proxy.facts import RequestFacts
from proxy.hosts import IPAddress
from proxy.policy.model import Mode

Attributes = dict[str, Any]


@dataclass(frozen=True, slots=True)
class DecisionEvent:
    """`egress.decision`: one per decided request."""

    facts: RequestFacts
    decision: Decision
    mode: Mode
    address: IPAddress | None = None

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
