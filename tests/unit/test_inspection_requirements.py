"""Pure-core rules: inspect method/path checks and requirements caps."""

from __future__ import annotations

from pathlib import Path

from proxy.decide import Reason, Verdict
from proxy.inspection import decide_inspected
from proxy.policy.model import DefaultAction, InspectRule, Mode, Scope
from proxy.policy.requirements import load_effective

RULE = InspectRule(
    host="api.github.com",
    methods=frozenset({"GET", "HEAD"}),
    deny_paths=("/repos/*/*/git/refs*",),
    source="p.yaml:7",
)


def test_listed_method_and_path_pass() -> None:
    assert decide_inspected(RULE, "GET", "/repos/a/b?x=1").verdict is Verdict.ALLOW


def test_unlisted_method_is_denied_with_the_rule_source() -> None:
    d = decide_inspected(RULE, "POST", "/repos/a/b")
    assert (d.verdict, d.reason, d.source) == (Verdict.DENY, Reason.METHOD, "p.yaml:7")


def test_denied_path_glob_matches_across_segments() -> None:
    d = decide_inspected(RULE, "GET", "/repos/o/r/git/refs/heads/main")
    assert (d.verdict, d.rule) == (Verdict.DENY, "/repos/*/*/git/refs*")
    assert decide_inspected(RULE, "GET", "/repos/o/r/git/trees").verdict is Verdict.ALLOW


def _files(tmp_path: Path, policy: str, requirements: str) -> tuple[Path, Path]:
    p, r = tmp_path / "p.yaml", tmp_path / "r.yaml"
    p.write_text(policy)
    r.write_text(requirements)
    return p, r


def test_max_default_caps_a_looser_default_with_a_warning(tmp_path: Path) -> None:
    p, r = _files(tmp_path, "version: 1\ndefault: allow\n", "version: 1\nmax_default: ask\n")
    policy, warnings = load_effective([p], r)
    assert policy.default is DefaultAction.ASK
    assert any("capped" in w for w in warnings)


def test_floor_deny_wins_over_user_allow(tmp_path: Path) -> None:
    p, r = _files(
        tmp_path, "version: 1\nallow: [x.example.com]\n", "version: 1\ndeny: [x.example.com]\n"
    )
    policy, _ = load_effective([p], r)
    from proxy.decide import decide
    from proxy.facts import facts_from_url
    from proxy.netguard import NetGuard

    facts = facts_from_url("https://x.example.com/", "GET", None)
    d = decide(facts, policy, grants=(), guard=NetGuard([]), address=None)
    assert (d.verdict, d.source) == (Verdict.DENY, f"{r}:2")


def test_managed_only_drops_user_allows_and_never_asks(tmp_path: Path) -> None:
    p, r = _files(
        tmp_path,
        "version: 1\ndefault: ask\nallow: [user.example.com]\n",
        "version: 1\nmanaged_only: true\nallow: [managed.example.com]\n",
    )
    policy, _ = load_effective([p], r)
    assert policy.default is DefaultAction.DENY and policy.managed_only
    assert [rule.pattern for rule in policy.allow] == ["managed.example.com"]


def test_pinned_mode_and_capped_scopes(tmp_path: Path) -> None:
    p, r = _files(
        tmp_path,
        "version: 1\nmode: audit\napproval: {scopes: [once, session, always]}\n",
        "version: 1\nmode: enforce\napproval: {scopes: [once]}\n",
    )
    policy, warnings = load_effective([p], r)
    assert policy.mode is Mode.ENFORCE and policy.mode_pinned
    assert policy.approval.scopes == frozenset({Scope.ONCE})
    assert len(warnings) == 2
