"""`policy suggest`'s core: a recorded audit in, a tight policy out, which then decides the
recorded traffic as allowed and its near misses as not."""

from __future__ import annotations

from pathlib import Path

import yaml

from proxy.facts import facts_from_url
from proxy.grants import GrantIndex
from proxy.netguard import NetGuard
from proxy.policy.load import load_policies
from proxy.records import DecisionRecord
from proxy.suggest import records_from_json, render_policy, suggest
from proxy.verdicts import Verdict

T0 = 1_764_000_000.0


def row(
    host: str,
    port: int = 443,
    decision: str = "allow",
    reason: str = "would_deny",
    rule: str | None = None,
    at: float = T0,
) -> DecisionRecord:
    return DecisionRecord(
        request_id="r",
        at=at,
        decision=decision,
        reason=reason,
        host=host,
        port=port,
        method="CONNECT",
        transport="https_connect",
        agent=None,
        session=None,
        rule=rule,
        source=None,
        client_address="127.0.0.1",
        peer_address=None,
        mode="audit",
    )


# An audit-mode run: three siblings under svc.example, two under pair.example, an API on 8443,
# an IP, a deny rule's refusal, a held name, and names the network guard refused.
RECORDED = [
    row("a.svc.example", at=T0),
    row("a.svc.example", at=T0 + 60),
    row("b.svc.example", at=T0 + 10),
    row("c.svc.example", at=T0 + 20),
    row("one.pair.example"),
    row("two.pair.example"),
    row("api.solo.example", 8443),
    row("api.solo.example", 443),
    row("203.0.113.7", 443),
    row("paste.bad.example", reason="would_deny", rule="**.bad.example"),
    row("x.bad.example", decision="deny", reason="deny_rule", rule="**.bad.example"),
    row("wanted.example", decision="hold", reason="default_ask"),
    row("wanted.example", decision="deny", reason="approval_pending"),
    row("10.0.0.1", decision="deny", reason="private_network"),
]


def _allow_patterns(rows: list[DecisionRecord]) -> list[str]:
    return [r.pattern for r in suggest(rows).allow]


def test_three_siblings_become_a_wildcard_two_stay_exact() -> None:
    patterns = _allow_patterns(RECORDED)
    assert "*.svc.example" in patterns
    assert {"one.pair.example", "two.pair.example"} <= set(patterns)
    assert not any("pair.example" in p and p.startswith("*") for p in patterns)


def test_non_standard_port_is_kept_and_standard_port_is_plain() -> None:
    patterns = _allow_patterns(RECORDED)
    assert "api.solo.example:8443" in patterns
    assert "api.solo.example" in patterns
    assert "203.0.113.7" in patterns


def test_deny_rule_refusals_are_listed_under_deny_and_guard_refusals_are_not() -> None:
    result = suggest(RECORDED)
    assert [r.pattern for r in result.deny] == ["paste.bad.example", "x.bad.example"]
    everything = [r.pattern for r in (*result.allow, *result.deny, *result.held)]
    assert "10.0.0.1" not in everything


def test_held_names_are_listed_but_not_allowed() -> None:
    result = suggest(RECORDED)
    assert [r.pattern for r in result.held] == ["wanted.example"]
    assert "wanted.example" not in [r.pattern for r in result.allow]


def test_group_never_sweeps_in_a_refused_sibling() -> None:
    rows = [row(f"{n}.cdn.example") for n in ("a", "b", "c", "d")]
    rows.append(row("evil.cdn.example", decision="deny", reason="deny_rule", rule="evil.*"))
    patterns = _allow_patterns(rows)
    assert not any(p.startswith("*") for p in patterns)
    assert len(patterns) == 4


def test_group_never_sweeps_in_a_held_sibling() -> None:
    rows = [row(f"{n}.cdn.example") for n in ("a", "b", "c")]
    rows.append(row("new.cdn.example", decision="hold", reason="default_ask"))
    assert not any(p.startswith("*") for p in _allow_patterns(rows))


def test_held_then_approved_counts_as_allowed() -> None:
    rows = [
        row("later.example", decision="hold", reason="default_ask"),
        row("later.example", reason="approved"),
    ]
    result = suggest(rows)
    assert [r.pattern for r in result.allow] == ["later.example"]
    assert result.held == ()


def test_apex_reached_too_gives_double_star() -> None:
    rows = [row(n) for n in ("a.svc.example", "b.svc.example", "c.svc.example", "svc.example")]
    assert _allow_patterns(rows) == ["**.svc.example"]


def test_siblings_on_another_port_group_with_the_port() -> None:
    rows = [row(n, 8080) for n in ("a.svc.example", "b.svc.example", "c.svc.example")]
    rows.append(row("a.svc.example", 443))
    assert set(_allow_patterns(rows)) == {"*.svc.example:8080", "a.svc.example"}


def test_comment_counts_requests_and_first_last_use() -> None:
    text = render_policy(suggest(RECORDED))
    line = next(x for x in text.splitlines() if '"*.svc.example"' in x)
    assert "4 requests" in line
    assert "first 2025-11-24T16:00:00Z" in line and "last 2025-11-24T16:01:00Z" in line
    assert "a.svc.example, b.svc.example, c.svc.example" in line


def test_rendered_policy_is_valid_yaml_with_the_rules() -> None:
    data = yaml.safe_load(render_policy(suggest(RECORDED), since="24h"))
    assert data["version"] == 1 and data["default"] == "ask"
    assert "*.svc.example" in data["allow"]
    assert data["deny"] == ["paste.bad.example", "x.bad.example"]


def test_records_round_trip_through_api_json() -> None:
    from proxy.audit import record_json

    assert records_from_json([record_json(r) for r in RECORDED]) == RECORDED


def _verdict(policy_path: Path, url: str) -> Verdict:
    """What the suggested policy decides for `url`, by the pure decision (no network)."""
    from proxy.decide import decide

    policy = load_policies([policy_path])
    facts = facts_from_url(url, "GET", None)
    grants = GrantIndex().rules_for(None, None)
    return decide(facts, policy, grants=grants, guard=NetGuard([]), address=None).verdict


def test_suggested_policy_allows_exactly_the_recorded_traffic(tmp_path: Path) -> None:
    path = tmp_path / "suggested.yaml"
    path.write_text(render_policy(suggest(RECORDED)))
    recorded = [
        "https://a.svc.example",
        "https://b.svc.example",
        "https://c.svc.example",
        "https://one.pair.example",
        "https://two.pair.example",
        "https://api.solo.example:8443",
        "https://api.solo.example",
    ]
    near_misses = [
        "https://svc.example",  # the parent of a `*.` group
        "https://three.pair.example",  # a sibling of only two
        "https://pair.example",  # their parent
        "https://api.solo.example:8444",  # another port
        "https://one.pair.example:8443",  # a port only its neighbour used
        "https://solo.example",
        "https://wanted.example",  # held, never approved
        "https://paste.bad.example",  # refused by a deny rule
    ]
    for url in recorded:
        assert _verdict(path, url) is Verdict.ALLOW, url
    for url in near_misses:
        assert _verdict(path, url) is not Verdict.ALLOW, url
