"""The decision order (SPEC section 3), as a pure function: no sockets."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from proxy.decide import Decision, Reason, Tier, Verdict, decide
from proxy.facts import RequestFacts, Transport
from proxy.hosts import IPAddress, canonicalize_host
from proxy.netguard import Listener, NetGuard
from proxy.policy.load import load_policies
from proxy.policy.model import EffectivePolicy

GUARD = NetGuard([Listener(ipaddress.ip_address("127.0.0.1"), 8080)])


def _policy(tmp_path: Path, text: str) -> EffectivePolicy:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return load_policies([path])


def _facts(host: str, port: int = 443, agent: str | None = None) -> RequestFacts:
    return RequestFacts(
        request_id="t",
        raw_host=host,
        host=canonicalize_host(host),
        port=port,
        transport=Transport.HTTPS_CONNECT,
        method="CONNECT",
        agent=agent,
    )


def _decide(
    facts: RequestFacts, policy: EffectivePolicy, address: IPAddress | None = None
) -> Decision:
    return decide(facts, policy, grants=(), guard=GUARD, address=address)


BASE = """\
version: 1
default: ask
allow:
  - github.com
  - "**.example.org"
  - 10.20.0.0/16
  - internal.example.com
  - "api.example.com:8443"
deny:
  - "bad.example.org"
agents:
  ci-bot: {default: deny, allow: [ci.example.net], deny: [github.com]}
"""


def test_deny_beats_allow(tmp_path: Path) -> None:
    d = _decide(_facts("bad.example.org"), _policy(tmp_path, BASE))
    assert (d.verdict, d.reason, d.rule) == (Verdict.DENY, Reason.DENY_RULE, "bad.example.org")
    assert d.source is not None and d.source.endswith("p.yaml:10")


def test_private_address_beats_allow(tmp_path: Path) -> None:
    policy = _policy(tmp_path, BASE)
    d = _decide(_facts("github.com"), policy, address=ipaddress.ip_address("192.168.1.5"))
    assert (d.verdict, d.reason) == (Verdict.DENY, Reason.PRIVATE_NETWORK)


def test_cidr_allow_exempts_resolved_private_address(tmp_path: Path) -> None:
    policy = _policy(tmp_path, BASE)
    d = _decide(
        _facts("internal.example.com"),
        policy,
        address=ipaddress.ip_address("10.20.3.4"),
    )
    assert (d.verdict, d.reason, d.rule) == (
        Verdict.ALLOW,
        Reason.ALLOW_RULE,
        "internal.example.com",
    )


def test_cidr_exemption_does_not_allow_an_unlisted_name(tmp_path: Path) -> None:
    policy = _policy(tmp_path, BASE)
    d = _decide(_facts("other.example.com"), policy, address=ipaddress.ip_address("10.20.3.4"))
    assert d.verdict is Verdict.HOLD


def test_ip_literal_in_allowed_cidr_is_allowed(tmp_path: Path) -> None:
    d = _decide(_facts("10.20.0.7"), _policy(tmp_path, BASE))
    assert (d.verdict, d.rule) == (Verdict.ALLOW, "10.20.0.0/16")


def test_proxy_itself_is_denied_even_inside_an_allowed_cidr(tmp_path: Path) -> None:
    policy = _policy(tmp_path, "version: 1\nallow: [127.0.0.0/8]\nnetwork: {ports: [8080]}\n")
    d = _decide(_facts("127.0.0.1", 8080), policy)
    assert (d.verdict, d.reason) == (Verdict.DENY, Reason.PRIVATE_NETWORK)


def test_only_misses_ask(tmp_path: Path) -> None:
    policy = _policy(tmp_path, BASE)
    assert _decide(_facts("unknown.example.net"), policy).verdict is Verdict.HOLD
    assert _decide(_facts("github.com"), policy).verdict is Verdict.ALLOW
    assert _decide(_facts("bad.example.org"), policy).verdict is Verdict.DENY


def test_port_not_listed_is_denied_before_allow(tmp_path: Path) -> None:
    d = _decide(_facts("github.com", 22), _policy(tmp_path, BASE))
    assert (d.verdict, d.reason) == (Verdict.DENY, Reason.PORT)


def test_rule_with_port_allows_that_port(tmp_path: Path) -> None:
    policy = _policy(tmp_path, BASE)
    assert _decide(_facts("api.example.com", 8443), policy).verdict is Verdict.ALLOW
    assert _decide(_facts("api.example.com", 8444), policy).reason is Reason.PORT


@pytest.mark.parametrize(
    "default,verdict", [("allow", Verdict.ALLOW), ("deny", Verdict.DENY), ("ask", Verdict.HOLD)]
)
def test_default_applies_to_misses(tmp_path: Path, default: str, verdict: Verdict) -> None:
    policy = _policy(tmp_path, f"version: 1\ndefault: {default}\n")
    assert _decide(_facts("x.example.net"), policy).verdict is verdict


def test_agent_section_overrides_default_and_adds_rules(tmp_path: Path) -> None:
    policy = _policy(tmp_path, BASE)
    assert _decide(_facts("unknown.example.net", agent="ci-bot"), policy).verdict is Verdict.DENY
    assert _decide(_facts("ci.example.net", agent="ci-bot"), policy).verdict is Verdict.ALLOW
    assert _decide(_facts("github.com", agent="ci-bot"), policy).verdict is Verdict.DENY
    assert _decide(_facts("ci.example.net", agent="other"), policy).verdict is Verdict.HOLD


def test_audit_mode_allows_but_records_would_deny(tmp_path: Path) -> None:
    policy = _policy(tmp_path, BASE.replace("default: ask", "mode: audit\ndefault: deny"))
    d = _decide(_facts("bad.example.org"), policy)
    assert (d.verdict, d.reason, d.rule) == (Verdict.ALLOW, Reason.WOULD_DENY, "bad.example.org")


def test_wildcard_apex_rule_covers_apex(tmp_path: Path) -> None:
    assert _decide(_facts("example.org"), _policy(tmp_path, BASE)).verdict is Verdict.ALLOW


AUDIT = """\
version: 1
mode: audit
default: deny
deny: [bad.example.org]
network: {ports: [443]}
"""


@pytest.mark.parametrize(
    ("host", "port"),
    [("bad.example.org", 443), ("github.com", 22), ("unknown.example.net", 443)],
)
def test_audit_mode_never_relaxes_into_a_private_address(
    tmp_path: Path, host: str, port: int
) -> None:
    policy = _policy(tmp_path, AUDIT)
    public = _decide(_facts(host, port), policy, ipaddress.ip_address("93.184.216.34"))
    assert (public.verdict, public.reason) == (Verdict.ALLOW, Reason.WOULD_DENY)
    private = _decide(_facts(host, port), policy, ipaddress.ip_address("10.0.0.8"))
    assert (private.verdict, private.reason) == (Verdict.DENY, Reason.PRIVATE_NETWORK)


def test_audit_mode_keeps_the_requirements_floor(tmp_path: Path) -> None:
    from proxy.policy.requirements import load_effective

    policy_file, floor_file = tmp_path / "p.yaml", tmp_path / "r.yaml"
    policy_file.write_text(AUDIT)
    floor_file.write_text("version: 1\ndeny: [floor.example.org]\n")
    policy, _ = load_effective([policy_file], floor_file)
    d = _decide(_facts("floor.example.org"), policy)
    assert (d.verdict, d.reason, d.tier) == (Verdict.DENY, Reason.DENY_RULE, Tier.FLOOR)
    relaxed = _decide(_facts("bad.example.org"), policy)
    assert (relaxed.verdict, relaxed.reason) == (Verdict.ALLOW, Reason.WOULD_DENY)
