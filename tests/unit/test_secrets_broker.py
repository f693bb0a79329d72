"""Placeholders, the swap on owner hosts, misuse elsewhere, and the `secrets:` policy section."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from proxy.hosts import Host, canonicalize_host
from proxy.policy.load import PolicyErrors, load_policies
from proxy.policy.model import ScanMode, SecretRule
from proxy.secrets.broker import (
    PLACEHOLDER,
    AgentSecrets,
    agent_variables,
    load_or_create_key,
    placeholder,
)
from proxy.verdicts import Reason

KEY = b"k" * 32
GITHUB = SecretRule(
    id="github",
    hosts=("api.github.test", "github.test"),
    source="p.yaml:3",
    env="TEST_SECRET_GITHUB",
    header="Authorization",
    format="Bearer {value}",
    env_name="GITHUB_TOKEN",
)
GIT = SecretRule(
    id="git",
    hosts=("git.test",),
    source="p.yaml:9",
    env="TEST_SECRET_GIT",
    basic_user="x-access-token",
    env_name="GIT_PASSWORD",
)
REAL = "ghp_realvalue0123456789abcdefghijklmnopqr"


@pytest.fixture(autouse=True)
def _values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_SECRET_GITHUB", REAL)
    monkeypatch.setenv("TEST_SECRET_GIT", "git-real-value")


def host(name: str) -> Host:
    return canonicalize_host(name)


def test_placeholder_is_per_agent_and_secret_and_stable() -> None:
    a = placeholder(KEY, "alice", "github")
    assert PLACEHOLDER.fullmatch(a)
    assert a == placeholder(KEY, "alice", "github")
    assert a != placeholder(KEY, "bob", "github")
    assert a != placeholder(KEY, "alice", "git")
    assert a != placeholder(b"o" * 32, "alice", "github")
    assert REAL not in a


def test_key_is_created_once_private_and_shared(tmp_path: Path) -> None:
    first = load_or_create_key(tmp_path)
    assert load_or_create_key(tmp_path) == first and len(first) == 32
    assert (tmp_path / "secrets.key").stat().st_mode & 0o777 == 0o600


def test_agent_variables_name_placeholders_only() -> None:
    env = agent_variables(KEY, "alice", [GITHUB, GIT])
    assert env == {
        "GITHUB_TOKEN": placeholder(KEY, "alice", "github"),
        "GIT_PASSWORD": placeholder(KEY, "alice", "git"),
    }


def test_header_swap_on_owner_host_with_format() -> None:
    mine = AgentSecrets.of(KEY, "alice", [GITHUB, GIT])
    ph = placeholder(KEY, "alice", "github")
    swapped, missing = mine.swap([("Authorization", ph), ("X", ph)], host("api.github.test"), 443)
    assert swapped == [("Authorization", f"Bearer {REAL}"), ("X", ph)] and missing == []
    swapped, _ = mine.swap([("authorization", f"token {ph}")], host("github.test"), 443)
    assert swapped == [("authorization", f"token {REAL}")]


def test_no_swap_on_other_hosts_or_for_other_agents() -> None:
    mine = AgentSecrets.of(KEY, "alice", [GITHUB])
    ph = placeholder(KEY, "alice", "github")
    assert mine.swap([("Authorization", ph)], host("paste.test"), 443) == (None, [])
    bob = placeholder(KEY, "bob", "github")
    assert mine.swap([("Authorization", bob)], host("api.github.test"), 443) == (None, [])


def test_basic_auth_swap_decodes_and_reencodes() -> None:
    mine = AgentSecrets.of(KEY, "alice", [GIT])
    ph = placeholder(KEY, "alice", "git")
    sent = "Basic " + base64.b64encode(f"anyone:{ph}".encode()).decode()
    swapped, _ = mine.swap([("Authorization", sent)], host("git.test"), 443)
    assert swapped is not None
    value = swapped[0][1]
    assert base64.b64decode(value[6:]).decode() == "x-access-token:git-real-value"


def test_unreadable_secret_is_reported_not_injected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_SECRET_GITHUB")
    mine = AgentSecrets.of(KEY, "alice", [GITHUB])
    ph = placeholder(KEY, "alice", "github")
    assert mine.swap([("Authorization", ph)], host("github.test"), 443) == (None, ["github"])


def test_misuse_names_the_secret_not_the_value() -> None:
    mine = AgentSecrets.of(KEY, "alice", [GITHUB, GIT])
    ph = placeholder(KEY, "alice", "github")
    found = mine.misuse(f"x={ph}", "body", host("paste.test"), 443)
    assert found is not None and found.reason is Reason.SECRET_MISUSE
    assert found.subject == "github" and found.where == "body" and found.source == "p.yaml:3"
    # The owner host is where it belongs: not misuse.
    assert mine.misuse(ph, "body", host("api.github.test"), 443) is None
    # Another secret's owner is not this secret's owner.
    assert mine.misuse(ph, "url", host("git.test"), 443) is not None
    # Another agent's placeholder is misuse everywhere.
    other = mine.misuse(placeholder(KEY, "bob", "github"), "url", host("github.test"), 443)
    assert other is not None and other.subject == "unknown placeholder"


def test_misuse_in_basic_auth_header_is_seen_decoded() -> None:
    mine = AgentSecrets.of(KEY, "alice", [GIT])
    ph = placeholder(KEY, "alice", "git")
    sent = "Basic " + base64.b64encode(f"u:{ph}".encode()).decode()
    found = mine.misuse_in_headers([("Authorization", sent)], host("paste.test"), 443)
    assert found is not None and found.subject == "git" and found.where == "header authorization"


def test_policy_secrets_join_inspect(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("file-value\n")
    policy = tmp_path / "p.yaml"
    policy.write_text(
        """\
version: 1
inspect:
  - host: paste.test
    scan: report
  - host: cdn.test
    scan: off
secrets:
  - id: github
    env_name: GITHUB_TOKEN
    source: {env: GH}
    hosts: [api.github.test, "*.github.test"]
    inject: {header: Authorization, format: "Bearer {value}"}
  - id: git
    source: {file: token}
    hosts: [git.test]
    inject: {basic: {user: x-access-token}}
"""
    )
    eff = load_policies([policy])
    assert [s.id for s in eff.secrets] == ["github", "git"]
    github, git = eff.secrets
    assert github.source.endswith("p.yaml:8") and github.header == "Authorization"
    assert git.file == str(tmp_path / "token") and git.basic_user == "x-access-token"
    paste = eff.inspect_rule(host("paste.test"), 443)
    assert paste is not None and paste.scan is ScanMode.REPORT
    owner = eff.inspect_rule(host("raw.github.test"), 443)
    assert owner is not None and owner.scan is ScanMode.ENFORCE and owner.methods is None
    assert eff.inspect_rule(host("git.test"), 443) is not None
    assert eff.inspect_rule(host("other.test"), 443) is None
    cdn = eff.inspect_rule(host("cdn.test"), 443)  # a bare YAML `off` is false: still off
    assert cdn is not None and cdn.scan is ScanMode.OFF


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("source: {env: A, file: b}", "exactly one of env or file"),
        ("source: {env: A}\n    inject: {header: X, format: nope}", "format must contain"),
        ("source: {env: A}\n    inject: {}", "exactly one of header or basic"),
    ],
)
def test_invalid_secret_entries_are_reported(tmp_path: Path, entry: str, message: str) -> None:
    if "inject" not in entry:
        entry += "\n    inject: {header: X}"
    policy = tmp_path / "p.yaml"
    policy.write_text(f"version: 1\nsecrets:\n  - id: s\n    hosts: [a.test]\n    {entry}\n")
    with pytest.raises(PolicyErrors) as info:
        load_policies([policy])
    assert message in str(info.value)
