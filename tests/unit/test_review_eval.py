"""The labelled evaluation set (tests/data/review-cases.yaml) through the rule reviewer of the
shipped policies/examples/auto-review.yaml: no `bad` case is ever approved automatically, and
the counts published in docs/auto-review.md are the ones this run produces."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.facts import RequestFacts, Transport
from proxy.hosts import canonicalize_host
from proxy.policy.load import load_policies
from proxy.policy.model import EffectivePolicy, RulesReviewerSection
from proxy.review.chain import ChainResult, ReviewChain
from proxy.review.runner import AutoDecision, AutoReviewer

REPO = Path(__file__).resolve().parents[2]
CASES = REPO / "tests" / "data" / "review-cases.yaml"
POLICY = REPO / "policies" / "examples" / "auto-review.yaml"
DOC = REPO / "docs" / "auto-review.md"
LABELS = ("good", "unfamiliar", "bad")
OUTCOMES = ("approve", "deny", "escalate")


def load_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = yaml.safe_load(CASES.read_text(encoding="utf-8"))["cases"]
    return cases


def rules_only(policy: EffectivePolicy) -> ReviewChain:
    """The shipped chain's rule reviewers (the webhook and LLM entries need a service)."""
    reviewer = AutoReviewer()
    chain = reviewer.chain_for(policy)
    return ReviewChain([r for r in chain.reviewers if r.name == "rules"])


async def outcome_of(
    case: dict[str, Any], index: int, policy: EffectivePolicy, chain: ReviewChain
) -> str:
    host = canonicalize_host(case["host"])
    facts = RequestFacts(
        request_id=f"eval-{index}",
        raw_host=case["host"],
        host=host,
        port=case.get("port", 443),
        transport=Transport.HTTPS_CONNECT,
        method="CONNECT",
        scheme="https",
        agent=f"eval-{index}",  # one agent per case: the rate signal is tested elsewhere
    )
    tier = AutoReviewer()
    result = await chain.run(tier.request_for(facts))
    settled = tier.settle(result, facts.agent, policy)
    if isinstance(settled, AutoDecision):
        return settled.result.outcome.value
    assert isinstance(settled, ChainResult)
    return settled.outcome.value


async def evaluate() -> tuple[Counter[tuple[str, str]], list[tuple[str, str, str]]]:
    policy = load_policies([POLICY])
    chain = rules_only(policy)
    counts: Counter[tuple[str, str]] = Counter()
    rows: list[tuple[str, str, str]] = []
    for index, case in enumerate(load_cases()):
        outcome = await outcome_of(case, index, policy, chain)
        counts[(case["label"], outcome)] += 1
        rows.append((case["label"], case["host"], outcome))
    return counts, rows


def test_eval_set_is_large_and_labelled() -> None:
    cases = load_cases()
    assert len(cases) >= 150
    assert {c["label"] for c in cases} == set(LABELS)
    assert len({(c["host"], c.get("port", 443)) for c in cases}) == len(cases)


def test_shipped_policy_has_a_rule_reviewer_and_no_llm_by_default() -> None:
    policy = load_policies([POLICY])
    kinds = [r.kind for r in policy.approval.review]
    assert kinds == ["rules"]
    assert isinstance(policy.approval.review[0], RulesReviewerSection)


async def test_no_bad_case_is_approved_automatically() -> None:
    _, rows = await evaluate()
    approved_bad = [(host, outcome) for label, host, outcome in rows if label == "bad"]
    assert [h for h, o in approved_bad if o == "approve"] == []
    # and every bad case is decided or escalated for a reason, not by accident
    assert all(o in ("deny", "escalate") for _, o in approved_bad)


async def test_routine_hosts_are_approved_and_unfamiliar_ones_not_denied() -> None:
    _, rows = await evaluate()
    assert [h for label, h, o in rows if label == "good" and o != "approve"] == []
    assert [h for label, h, o in rows if label == "unfamiliar" and o == "deny"] == []


async def test_published_counts_match_this_run() -> None:
    counts, _ = await evaluate()
    text = DOC.read_text(encoding="utf-8")
    for label in LABELS:
        match = re.search(rf"^\| {label} \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", text, re.M)
        assert match is not None, f"docs/auto-review.md has no counts row for {label!r}"
        published = tuple(int(n) for n in match.groups())
        measured = (
            sum(counts[(label, o)] for o in OUTCOMES),
            *(counts[(label, o)] for o in OUTCOMES),
        )
        assert published == measured, (
            f"{label}: docs say total/approve/deny/escalate = {published}, run gives {measured}"
        )


@pytest.mark.parametrize("label", LABELS)
async def test_print_outcomes(label: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Not an assertion of its own: `pytest -s -k print_outcomes` lists every case's outcome."""
    _, rows = await evaluate()
    for row_label, host, outcome in rows:
        if row_label == label:
            print(f"{label:<10} {outcome:<9} {host}")
    assert any(row_label == label for row_label, _, _ in rows)
