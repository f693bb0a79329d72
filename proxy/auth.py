"""Who is asking: the agent identity from proxy credentials, verified against the registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proxy.agents import AgentRegistry
from proxy.identity import Identity
from proxy.policy.model import EffectivePolicy

CREDENTIALS_REQUIRED = "proxy credentials required"
# One text for an unknown agent and a wrong token (SPEC section 4): the answer, the log line and
# the audit row must not tell a prober which agent ids exist.
INVALID_CREDENTIALS = "invalid proxy credentials"


@dataclass(frozen=True, slots=True)
class Caller:
    """The identified caller; `failure` says why authentication failed (then agent is None)."""

    agent: str | None = None
    session: str | None = None
    failure: str | None = None


class Authenticator:
    """With a registry, claimed identities must verify; `required` refuses anonymous callers.

    Without a registry nothing can verify a claimed id, so every caller is anonymous: a name in
    the credentials never selects a per-agent policy unless its token was checked.
    """

    def __init__(self, registry: AgentRegistry | None = None, required: bool = False) -> None:
        self.registry = registry
        self.required = required

    def identify(self, identity: Identity | None) -> Caller:
        if identity is None:
            return Caller(failure=CREDENTIALS_REQUIRED) if self.required else Caller()
        if self.registry is None:
            return Caller(failure=INVALID_CREDENTIALS) if self.required else Caller()
        if not self.registry.verify(identity.agent, identity.secret):
            return Caller(failure=INVALID_CREDENTIALS)
        return Caller(identity.agent, identity.session)


def check_identity_config(policy: EffectivePolicy, registry_path: Path | None) -> str | None:
    """Why `policy` cannot be enforced with this agents registry, or None when it can.

    Per-agent sections apply only to authenticated agents; with no registry to authenticate
    against they could only ever be selected by an unverified name, so the policy is refused.
    """
    sections = set(policy.agents)
    if policy.floor is not None:
        sections |= set(policy.floor.agents_deny)
    if not sections:
        return None
    names = ", ".join(repr(a) for a in sorted(sections)[:5])
    if len(sections) > 5:
        names += f" and {len(sections) - 5} more"
    if registry_path is None:
        where = "no agents file is configured"
    elif not registry_path.is_file():
        where = f"the agents file {registry_path} does not exist"
    else:
        return None
    return (
        f"per-agent policy sections ({names}) need an agents registry, but {where}: "
        "per-agent rules apply only to authenticated agents. Create one with "
        "`egress-warden agents add ID` (or point `run --agents FILE` or `auth.agents_file` "
        "at one), or remove the `agents:` sections"
    )
