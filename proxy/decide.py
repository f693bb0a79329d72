"""The decision: a pure function of (request facts, effective policy, grants, address)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxy.facts import RequestFacts
from proxy.hosts import IPAddress
from proxy.netguard import AddressClass, NetGuard
from proxy.policy.match import RuleSet
from proxy.policy.model import DefaultAction, EffectivePolicy, Mode, Rule
from proxy.verdicts import Decision, Reason, Tier, Verdict

__all__ = ["Decision", "GrantRules", "Reason", "Tier", "Verdict", "decide"]


@dataclass(frozen=True, slots=True)
class GrantRules:
    """Runtime grants compiled into matchers, applied after the policy's own rules."""

    allow: RuleSet
    deny: RuleSet


def _rule_decision(verdict: Verdict, reason: Reason, rule: Rule, detail: str) -> Decision:
    return Decision(verdict, reason, rule.pattern, rule.source, detail)


def _first_match(rulesets: Sequence[RuleSet], facts: RequestFacts) -> Rule | None:
    assert facts.host is not None
    for ruleset in rulesets:
        rule = ruleset.match(facts.host, facts.port)
        if rule is not None:
            return rule
    return None


def decide(
    facts: RequestFacts,
    policy: EffectivePolicy,
    *,
    grants: Sequence[GrantRules] = (),
    address: IPAddress | None = None,
    guard: NetGuard | None = None,
) -> Decision:
    """Decide in the SPEC order; the first step that applies wins.

    `address` is the IP that will be dialled (None before resolution: the network step is
    skipped, so callers resolve only when this first pass does not already deny).
    """
    decision = _decide_enforced(facts, policy, grants, address, guard)
    if policy.mode is Mode.AUDIT and decision.verdict is not Verdict.ALLOW:
        if decision.reason in (
            Reason.INVALID_HOST,
            Reason.INVALID_REQUEST,
            Reason.DNS_FAILURE,
            Reason.AUTH_REQUIRED,
        ):
            return decision  # nothing sensible can be dialled: stays denied even in audit
        return Decision(
            Verdict.ALLOW,
            Reason.WOULD_DENY,
            decision.rule,
            decision.source,
            f"audit mode: would {decision.verdict.value} ({decision.reason.value})",
        )
    return decision


def _decide_enforced(
    facts: RequestFacts,
    policy: EffectivePolicy,
    grants: Sequence[GrantRules],
    address: IPAddress | None,
    guard: NetGuard | None,
) -> Decision:
    # 1. invalid request or host
    if facts.invalid is not None:
        reason = Reason(facts.invalid)
        return Decision(Verdict.DENY, reason, detail=facts.invalid_detail or reason.value)
    if facts.host is None:
        return Decision(Verdict.DENY, Reason.INVALID_HOST, detail="invalid host")

    agent = policy.agents.get(facts.agent) if facts.agent is not None else None

    # 2. any matching deny wins: policy, the agent's section, runtime grants
    deny_sets = [policy.deny]
    if agent is not None:
        deny_sets.append(agent.deny)
    deny_sets.extend(g.deny for g in grants)
    rule = _first_match(deny_sets, facts)
    if rule is None and address is not None:
        rule = _first_address_match(deny_sets, address, facts.port)
    if rule is not None:
        return _rule_decision(
            Verdict.DENY, Reason.DENY_RULE, rule, f"denied by rule {rule.pattern!r}"
        )

    allow_sets = [policy.allow]
    if agent is not None:
        allow_sets.append(agent.allow)
    if not policy.managed_only:  # managed_only: only the requirements' allows count
        allow_sets.extend(g.allow for g in grants)
    allow_rule = _first_match(allow_sets, facts)

    # 3. port: allowed when listed in network.ports or named by a matching allow rule
    port_named = allow_rule is not None and allow_rule.port == facts.port
    if facts.port not in policy.ports and not port_named:
        return Decision(Verdict.DENY, Reason.PORT, detail=f"port {facts.port} is not allowed")

    # 4. the address actually dialled must not be private unless an IP/CIDR allow covers it
    ip = facts.host.ip if facts.host.ip is not None else address
    if ip is not None and guard is not None:
        klass = guard.classify(ip, facts.port)
        if klass is AddressClass.SELF:
            return Decision(
                Verdict.DENY,
                Reason.PRIVATE_NETWORK,
                detail=f"{ip} is the proxy itself",
            )
        if klass is not AddressClass.PUBLIC and policy.block_private:
            exempt = _first_address_match(allow_sets, ip, facts.port)
            if exempt is None:
                return Decision(
                    Verdict.DENY,
                    Reason.PRIVATE_NETWORK,
                    detail=f"{ip} is a {klass.value} address",
                )

    # 5. matching allow
    if allow_rule is not None:
        return _rule_decision(
            Verdict.ALLOW, Reason.ALLOW_RULE, allow_rule, f"allowed by rule {allow_rule.pattern!r}"
        )

    # 6. default: only misses are ever offered for approval
    default = policy.default
    if agent is not None and agent.default is not None:
        default = agent.default
    if default is DefaultAction.ALLOW:
        return Decision(
            Verdict.ALLOW, Reason.DEFAULT_ALLOW, detail="no rule matched; default allow"
        )
    if default is DefaultAction.DENY:
        return Decision(Verdict.DENY, Reason.DEFAULT_DENY, detail="no rule allows it")
    return Decision(Verdict.HOLD, Reason.DEFAULT_ASK, detail="no rule matched; approval needed")


def _first_address_match(rulesets: Sequence[RuleSet], ip: IPAddress, port: int) -> Rule | None:
    for ruleset in rulesets:
        rule = ruleset.match_address(ip, port)
        if rule is not None:
            return rule
    return None
