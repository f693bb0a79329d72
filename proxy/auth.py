"""Who is asking: the agent identity from proxy credentials, verified against the registry."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.agents import AgentRegistry
from proxy.identity import Identity


@dataclass(frozen=True, slots=True)
class Caller:
    """The identified caller; `failure` says why authentication failed (then agent is None)."""

    agent: str | None = None
    session: str | None = None
    failure: str | None = None


class Authenticator:
    """With a registry, claimed identities must verify; `required` refuses anonymous callers."""

    def __init__(self, registry: AgentRegistry | None = None, required: bool = False) -> None:
        self.registry = registry
        self.required = required

    def identify(self, identity: Identity | None) -> Caller:
        if identity is None:
            if self.required:
                return Caller(failure="proxy credentials required")
            return Caller()
        if self.registry is None:
            return Caller(identity.agent, identity.session)  # labels only: nothing to verify
        if not self.registry.verify(identity.agent, identity.secret):
            reason = "unknown agent" if identity.agent not in self.registry else "wrong token"
            return Caller(failure=f"invalid proxy credentials ({reason})")
        return Caller(identity.agent, identity.session)
