"""`check --json` and `policy validate --json`: machine-readable answers with the same exit
codes as the text forms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli import main


def test_check_json_carries_decision_reason_and_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ndefault: ask\ndeny: [evil.example]\n")
    assert main(["check", "https://evil.example/", "--policy", str(policy), "--json"]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert answer["decision"] == "deny" and answer["reason"] == "deny_rule"
    assert answer["rule"] == "evil.example" and answer["source"] == f"{policy}:3"
    assert main(["check", "https://new.example/", "--policy", str(policy), "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["decision"] == "hold"


def test_policy_validate_json_lists_every_error_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("version: 1\n")
    bad.write_text("version: 1\nallow: ['*']\nbogus: 1\n")
    assert main(["policy", "validate", str(good), str(bad), "--json"]) == 2
    results = json.loads(capsys.readouterr().out)
    assert [r["ok"] for r in results] == [True, False]
    assert {e["line"] for e in results[1]["errors"]} == {2, 3}


def test_agents_json_add_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    agents = str(tmp_path / "agents.yaml")
    assert main(["agents", "add", "bot", "--file", agents, "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["agent"] == "bot" and len(added["token"]) > 30
    assert main(["agents", "list", "--file", agents, "--json"]) == 0
    assert [a["agent"] for a in json.loads(capsys.readouterr().out)] == ["bot"]
    assert main(["agents", "revoke", "bot", "--file", agents, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] is True
    assert main(["agents", "revoke", "bot", "--file", agents, "--json"]) == 1
