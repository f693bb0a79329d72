"""The decision: a pure function of (request facts, effective policy, grants, guard, address).

Order (SPEC section 3; the first step that applies wins):
1. invalid request or host, failed authentication, loops            -> deny (GUARD)
2. any matching deny: requirements floor, policy, agent, grants     -> deny
3. destination port not allowed                                      -> deny `port`
4. address private (or the proxy itself) and not exempted by an IP/CIDR allow -> deny (GUARD)
5. matching allow: policy (with the requirements' allows), agent, grants -> allow
6. default: allow | deny | ask (hold)

Audit mode relaxes only what the user policy's own rules decide (POLICY tier); the requirements'
floor (FLOOR tier) only under a `mode: audit` in the requirements file; never the GUARD tier.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.facts import RequestFacts
from proxy.hosts import IPAddress
from proxy.netguard import AddressClass, NetGuard
from proxy.policy.match import RuleSet
from proxy.policy.model import AgentPolicy, DefaultAction, EffectivePolicy, Mode, Rule
from proxy.verdicts import Decision, Reason, Tier, Verdict

_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")

__all__ = ["Decision", "GrantRules", "Reason", "Tier", "Verdict", "apply_mode", "decide"]


@dataclass(frozen=True, slots=True)
class GrantRules:
    """Runtime grants compiled into matchers, applied after the policy's own rules."""

    allow: RuleSet
    deny: RuleSet


def _first_match(rulesets: Sequence[RuleSet], facts: RequestFacts) -> Rule | None:
    assert facts.host is not None
    for ruleset in rulesets:
        rule = ruleset.match(facts.host, facts.port)
        if rule is not None:
            return rule
    return None


def _first_address_match(rulesets: Sequence[RuleSet], ip: IPAddress, port: int) -> Rule | None:
    for ruleset in rulesets:
        rule = ruleset.match_address(ip, port)
        if rule is not None:
            return rule
    return None


def _rule_decision(verdict: Verdict, rule: Rule, tier: Tier) -> Decision:
    """A decision by `rule`, carrying its pattern and `file:line` (or grant id)."""
    allowed = verdict is Verdict.ALLOW
    return Decision(
        verdict,
        Reason.ALLOW_RULE if allowed else Reason.DENY_RULE,
        rule.pattern,
        rule.source,
        f"{'allowed' if allowed else 'denied'} by rule {rule.pattern!r}",
        tier,
    )


def _deny_match(
    rulesets: Sequence[RuleSet], facts: RequestFacts, address: IPAddress | None
) -> Rule | None:
    rule = _first_match(rulesets, facts)
    if rule is None and address is not None:
        rule = _first_address_match(rulesets, address, facts.port)
    return rule


def decide(
    facts: RequestFacts,
    policy: EffectivePolicy,
    *,
    grants: Sequence[GrantRules],
    guard: NetGuard,
    address: IPAddress | None,
) -> Decision:
    """Decide in the SPEC order, then apply the mode to the tier that decided.

    `address` is the IP that will be dialled, or None before resolution (only an IP literal's
    own address is checked then): callers resolve a name only when this first pass allows it,
    and decide again with the address before dialling (the gate does both).
    """
    decision = _decide_enforced(facts, policy, grants, guard, address)
    relaxed = apply_mode(decision, policy)
    if relaxed is not decision and facts.host is not None:
        # Audit mode lets a refusal through, but never to the proxy itself or a private
        # address: the guard (step 4) still runs on what an earlier step would have refused.
        agent = policy.agents.get(facts.agent) if facts.agent is not None else None
        guarded = _network_guard(facts, policy, _allow_sets(policy, agent, grants), guard, address)
        if guarded is not None:
            return guarded
    return relaxed


def apply_mode(decision: Decision, policy: EffectivePolicy) -> Decision:
    """Audit mode turns a refusal into `would_deny` only for the tiers its file may relax."""
    if decision.verdict is Verdict.ALLOW or decision.tier is Tier.GUARD:
        return decision
    if decision.tier is Tier.FLOOR:
        mode = policy.floor.mode if policy.floor is not None else Mode.ENFORCE
    else:
        mode = policy.mode
    if mode is not Mode.AUDIT:
        return decision
    return Decision(
        Verdict.ALLOW,
        Reason.WOULD_DENY,
        decision.rule,
        decision.source,
        f"audit mode: would {decision.verdict.value} ({decision.reason.value})",
        decision.tier,
    )


def _allow_sets(
    policy: EffectivePolicy, agent: AgentPolicy | None, grants: Sequence[GrantRules]
) -> list[RuleSet]:
    allow_sets = [policy.allow]
    if agent is not None:
        allow_sets.append(agent.allow)
    if not policy.managed_only:  # managed_only: only the requirements' allows count
        allow_sets.extend(g.allow for g in grants)
    return allow_sets


def _network_guard(
    facts: RequestFacts,
    policy: EffectivePolicy,
    allow_sets: Sequence[RuleSet],
    guard: NetGuard,
    address: IPAddress | None,
) -> Decision | None:
    """Step 4: a refusal when the dialled address is the proxy itself, or private without an
    explicit IP/CIDR allow; None when it may be dialled (or is not known yet)."""
    assert facts.host is not None
    ip = facts.host.ip if facts.host.ip is not None else address
    if ip is None and (facts.host.name == "localhost" or facts.host.name.endswith(".localhost")):
        ip = _LOOPBACK  # RFC 6761: always loopback, known without asking anyone
    if ip is None:
        return None
    klass = guard.classify(ip, facts.port)
    if klass is AddressClass.SELF:
        return Decision(
            Verdict.DENY,
            Reason.PRIVATE_NETWORK,
            detail=f"{ip} is the proxy itself",
            tier=Tier.GUARD,
        )
    exempt = klass is AddressClass.PUBLIC or not policy.block_private
    if not exempt and _first_address_match(allow_sets, ip, facts.port) is None:
        return Decision(
            Verdict.DENY,
            Reason.PRIVATE_NETWORK,
            detail=f"{ip} is a {klass.value} address",
            tier=Tier.GUARD,
        )
    return None


def _decide_enforced(
    facts: RequestFacts,
    policy: EffectivePolicy,
    grants: Sequence[GrantRules],
    guard: NetGuard,
    address: IPAddress | None,
) -> Decision:
    # 1. invalid request or host, failed authentication
    if facts.invalid is not None:
        reason = facts.invalid
        return Decision(
            Verdict.DENY, reason, detail=facts.invalid_detail or reason.value, tier=Tier.GUARD
        )
    if facts.host is None:
        return Decision(Verdict.DENY, Reason.INVALID_HOST, detail="invalid host", tier=Tier.GUARD)

    agent = policy.agents.get(facts.agent) if facts.agent is not None else None
    floor = policy.floor

    # 2. any matching deny wins: the requirements' floor first, then policy, agent, grants
    if floor is not None:
        floor_sets = [floor.deny]
        if facts.agent is not None and facts.agent in floor.agents_deny:
            floor_sets.append(floor.agents_deny[facts.agent])
        rule = _deny_match(floor_sets, facts, address)
        if rule is not None:
            return _rule_decision(Verdict.DENY, rule, Tier.FLOOR)
    deny_sets = [policy.deny]
    if agent is not None:
        deny_sets.append(agent.deny)
    deny_sets.extend(g.deny for g in grants)
    rule = _deny_match(deny_sets, facts, address)
    if rule is not None:
        # A runtime deny grant is an approver's explicit word: audit mode does not lift it.
        tier = Tier.FLOOR if rule.source.startswith("grant:") else Tier.POLICY
        return _rule_decision(Verdict.DENY, rule, tier)

    allow_sets = _allow_sets(policy, agent, grants)
    allow_rule = _first_match(allow_sets, facts)

    # 3. port: allowed when listed in network.ports or named by a matching allow rule
    port_named = allow_rule is not None and allow_rule.port == facts.port
    if facts.port not in policy.ports and not port_named:
        capped = floor is not None and floor.ports is not None and facts.port not in floor.ports
        return Decision(
            Verdict.DENY,
            Reason.PORT,
            detail=f"port {facts.port} is not allowed",
            tier=Tier.FLOOR if capped else Tier.POLICY,
        )

    # 4. the address actually dialled must not be private unless an IP/CIDR allow covers it
    guarded = _network_guard(facts, policy, allow_sets, guard, address)
    if guarded is not None:
        return guarded

    # 5. matching allow
    if allow_rule is not None:
        return _rule_decision(Verdict.ALLOW, allow_rule, Tier.POLICY)

    # 6. default: only misses are ever offered for approval
    default = policy.default
    if agent is not None and agent.default is not None:
        default = agent.default
    cap = floor.default_cap if floor is not None else None
    tier = Tier.FLOOR if cap is not None and default.looseness >= cap.looseness else Tier.POLICY
    if default is DefaultAction.ALLOW:
        return Decision(
            Verdict.ALLOW, Reason.DEFAULT_ALLOW, detail="no rule matched; default allow"
        )
    if default is DefaultAction.DENY:
        return Decision(Verdict.DENY, Reason.DEFAULT_DENY, detail="no rule allows it", tier=tier)
    return Decision(
        Verdict.HOLD, Reason.DEFAULT_ASK, detail="no rule matched; approval needed", tier=tier
    )
