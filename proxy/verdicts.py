"""Verdicts, reasons and decisions: the closed vocabulary every layer speaks (a leaf module)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    HOLD = "hold"


class Reason(StrEnum):
    """Why a request was decided as it was; the code agents and SIEMs see."""

    INVALID_HOST = "invalid_host"
    INVALID_REQUEST = "invalid_request"
    INVALID_METHOD = "invalid_method"  # not an HTTP token: answered 400
    HOST_MISMATCH = "host_mismatch"
    DENY_RULE = "deny_rule"
    PORT = "port"
    METHOD = "method"
    PRIVATE_NETWORK = "private_network"
    ALLOW_RULE = "allow_rule"
    DEFAULT_ALLOW = "default_allow"
    DEFAULT_DENY = "default_deny"
    DEFAULT_ASK = "default_ask"
    WOULD_DENY = "would_deny"
    DNS_FAILURE = "dns_failure"
    APPROVED = "approved"
    APPROVAL_PENDING = "approval_pending"
    APPROVAL_DENIED = "approval_denied"
    APPROVAL_UNAVAILABLE = "approval_unavailable"
    APPROVAL_LIMIT = "approval_limit"
    AUTH_REQUIRED = "auth_required"
    REVOKED = "revoked"  # an open tunnel closed: what admitted it was revoked, or it aged out
    SECRET_MISUSE = "secret_misuse"  # a brokered secret's placeholder on its way to another host
    SECRET_DETECTED = "secret_detected"  # a real credential on its way to a host not its owner


class Tier(StrEnum):
    """Who owns the step that decided: what audit mode may relax depends on it.

    GUARD: invalid requests, authentication and the network guards: never relaxed.
    FLOOR: the requirements' deny floor, port cap, managed_only and default cap: relaxed only
    by a `mode: audit` in the requirements file itself.
    POLICY: the user policy's own deny rules, ports and default: relaxed by `mode: audit`.
    """

    GUARD = "guard"
    FLOOR = "floor"
    POLICY = "policy"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome, always with its reason and, when a rule decided, the rule and its source."""

    verdict: Verdict
    reason: Reason
    rule: str | None = None
    source: str | None = None  # "file:line" or a grant id
    detail: str = ""
    tier: Tier = Tier.POLICY

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW
