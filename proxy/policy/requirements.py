"""Admin-managed requirements: a floor and caps that no policy file can lift (SPEC section 3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from proxy.policy.load import PolicyErrors, load_policies, load_policy_file, merge_refusal
from proxy.policy.match import RuleSet
from proxy.policy.model import (
    AgentPolicy,
    AutoApproveSection,
    DefaultAction,
    EffectivePolicy,
    Floor,
    Mode,
    PolicyDocument,
    RequirementsFile,
    Scope,
    min_default,
)


def load_requirements(path: str | Path) -> PolicyDocument:
    """Load a requirements file (the policy schema plus managed_only and max_default)."""
    return load_policy_file(path, schema=RequirementsFile)


def _union(*rulesets: RuleSet) -> RuleSet:
    return RuleSet.build(rule for ruleset in rulesets for rule in ruleset)


def apply_requirements(
    policy: EffectivePolicy, requirements: PolicyDocument
) -> tuple[EffectivePolicy, list[str]]:
    """Apply the floor and caps to `policy`; return it with one warning per capped setting."""
    spec = requirements.spec
    assert isinstance(spec, RequirementsFile)
    given = spec.model_fields_set
    warnings: list[str] = []
    floor_deny = RuleSet.build(requirements.deny)
    managed_allow = RuleSet.build(requirements.allow)

    managed_only = spec.managed_only
    allow = managed_allow if managed_only else _union(policy.allow, managed_allow)
    if managed_only and len(policy.allow):
        warnings.append(
            f"managed_only: {len(policy.allow)} allow rule(s) outside the requirements are ignored"
        )

    cap = spec.max_default
    if managed_only:
        cap = min_default(cap, DefaultAction.DENY) if cap is not None else DefaultAction.DENY
        # managed_only never asks: ask becomes deny
        cap = DefaultAction.DENY if cap is DefaultAction.ASK else cap

    def capped(default: DefaultAction, where: str) -> DefaultAction:
        if cap is None or default.looseness <= cap.looseness:
            return default
        warnings.append(f"{where}: default {default.value!r} capped to {cap.value!r}")
        return cap

    default = capped(policy.default, "default")
    agents = {
        agent_id: AgentPolicy(
            default=capped(section.default, f"agents.{agent_id}.default")
            if section.default is not None
            else None,
            allow=RuleSet.empty() if managed_only else section.allow,
            deny=section.deny,
        )
        for agent_id, section in policy.agents.items()
    }
    for agent_id, rules in requirements.agents.items():
        # the requirements' per-agent rules are a floor (deny) and managed allows too
        current = agents.get(agent_id) or AgentPolicy(None, RuleSet.empty(), RuleSet.empty())
        agents[agent_id] = AgentPolicy(
            default=capped(rules.default, f"agents.{agent_id}.default")
            if rules.default is not None
            else current.default,
            allow=_union(current.allow, RuleSet.build(rules.allow)),
            deny=current.deny,
        )

    mode = policy.mode
    if "mode" in given and spec.mode is not policy.mode:
        warnings.append(f"mode: pinned to {spec.mode.value!r} by the requirements")
        mode = spec.mode
    elif "mode" in given:
        mode = spec.mode

    approval = policy.approval
    if "approval" in given and "scopes" in spec.approval.model_fields_set:
        allowed = frozenset(spec.approval.scopes)
        kept = approval.scopes & allowed
        if kept != approval.scopes:
            dropped = ", ".join(sorted(s.value for s in approval.scopes - allowed))
            warnings.append(f"approval.scopes: {dropped} not allowed by the requirements")
        if not kept:
            kept = allowed
        approval = replace(approval, scopes=kept)
    if "approval" in given and "auto" in spec.approval.model_fields_set:
        approval = replace(approval, auto=_cap_auto(approval.auto, spec.approval.auto, warnings))
    # Webhooks the admins set up in the requirements always fire, besides the policy's own.
    if "approval" in given and "notify" in spec.approval.model_fields_set:
        approval = replace(approval, notify=(*spec.approval.notify, *approval.notify))
    if "approval" in given and "console_url" in spec.approval.model_fields_set:
        approval = replace(approval, console_url=spec.approval.console_url)

    ports, block_private = policy.ports, policy.block_private
    if "network" in given:
        network_given = spec.network.model_fields_set
        if "block_private" in network_given and spec.network.block_private and not block_private:
            warnings.append("network.block_private: pinned to true by the requirements")
            block_private = True
        if "ports" in network_given:
            allowed_ports = frozenset(spec.network.ports)
            if not ports <= allowed_ports:
                extra = ", ".join(str(p) for p in sorted(ports - allowed_ports))
                warnings.append(f"network.ports: {extra} not allowed by the requirements")
            ports = ports & allowed_ports or allowed_ports

    floor = Floor(
        deny=floor_deny,
        agents_deny={
            agent_id: RuleSet.build(rules.deny)
            for agent_id, rules in requirements.agents.items()
            if rules.deny
        },
        ports=frozenset(spec.network.ports)
        if "network" in given and "ports" in spec.network.model_fields_set
        else None,
        default_cap=cap,
        mode=spec.mode if "mode" in given else Mode.ENFORCE,
    )
    lifetime = policy.max_tunnel_lifetime
    if "network" in given and "max_tunnel_lifetime" in spec.network.model_fields_set:
        cap_life = spec.network.max_tunnel_lifetime
        if cap_life is not None and (lifetime is None or lifetime > cap_life):
            lifetime = cap_life
    effective = replace(
        policy,
        max_tunnel_lifetime=lifetime,
        mode=mode,
        default=default,
        allow=allow,
        floor=floor,
        ports=ports,
        block_private=block_private,
        approval=approval,
        agents=agents,
        files=(*policy.files, requirements.file),
        managed_only=managed_only,
        inspect=(*policy.inspect, *requirements.inspect),
        mode_pinned="mode" in given,
        agents_file=(
            str(Path(requirements.file).parent / spec.auth.agents_file)
            if spec.auth.agents_file is not None
            else policy.agents_file
        ),
        auth_required=(
            spec.auth.required if spec.auth.required is not None else policy.auth_required
        ),
        refusal=merge_refusal(policy.refusal, spec.refusal),  # the requirements' words win
    )
    return effective, warnings


def load_effective(
    policy_paths: Sequence[str | Path], requirements_path: str | Path | None = None
) -> tuple[EffectivePolicy, list[str]]:
    """Policies merged, then the requirements applied; PolicyErrors lists every file's errors."""
    errors = []
    policy: EffectivePolicy | None = None
    requirements: PolicyDocument | None = None
    try:
        policy = load_policies(policy_paths)
    except PolicyErrors as exc:
        errors.extend(exc.errors)
    if requirements_path is not None:
        try:
            requirements = load_requirements(requirements_path)
        except PolicyErrors as exc:
            errors.extend(exc.errors)
    if errors or policy is None:
        raise PolicyErrors(errors)
    if requirements is None:
        return policy, []
    return apply_requirements(policy, requirements)


_SCOPE_ORDER = (Scope.ONCE, Scope.SESSION, Scope.ALWAYS)


def _cap_auto(
    auto: AutoApproveSection, cap: AutoApproveSection, warnings: list[str]
) -> AutoApproveSection:
    """The requirements' `approval.auto` caps the policy's: it may forbid automatic approval,
    lower its scope and narrow `for: all` to `for: agent`."""
    given = cap.model_fields_set
    enabled = auto.enabled and ("enabled" not in given or cap.enabled)
    if auto.enabled and not enabled:
        warnings.append("approval.auto: automatic approval forbidden by the requirements")
    scope = auto.scope
    if "scope" in given and _SCOPE_ORDER.index(cap.scope) < _SCOPE_ORDER.index(scope):
        warnings.append(f"approval.auto.scope: capped to {cap.scope.value!r} by the requirements")
        scope = cap.scope
    grant_for = auto.grant_for
    if "grant_for" in given and cap.grant_for == "agent" and grant_for == "all":
        warnings.append("approval.auto.for: capped to 'agent' by the requirements")
        grant_for = "agent"
    return AutoApproveSection.model_validate({"enabled": enabled, "scope": scope, "for": grant_for})
