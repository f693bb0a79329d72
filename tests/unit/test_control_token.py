"""The control token `run` serves with: long enough, and never a placeholder from the docs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.control.token import (
    MIN_TOKEN_CHARS,
    PLACEHOLDER_TOKENS,
    TOKEN_ENV,
    WeakTokenError,
    load_control_token,
    token_problem,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def test_short_tokens_are_refused() -> None:
    assert token_problem("x" * (MIN_TOKEN_CHARS - 1)) == (
        f"is {MIN_TOKEN_CHARS - 1} characters long; at least {MIN_TOKEN_CHARS} are required"
    )
    assert token_problem("s3cret") is not None
    assert token_problem("a" * MIN_TOKEN_CHARS) is None


@pytest.mark.parametrize("placeholder", sorted(PLACEHOLDER_TOKENS))
def test_documented_placeholders_are_refused(placeholder: str) -> None:
    assert token_problem(placeholder) == "is a documented placeholder"
    assert token_problem(placeholder + "x" * 40) == "is a documented placeholder"


def test_every_placeholder_shown_in_docs_and_deploy_files_is_refused() -> None:
    # Anything in README/docs/docker that looks like a stand-in for a token must be refused.
    pattern = re.compile(r"(?i)\b(?:CHANGE-?ME|REPLACE-WITH)[\w.-]*")
    files = [REPO / "README.md", *(REPO / "docs").rglob("*.md"), *(REPO / "docker").rglob("*")]
    found = {
        m.group(0) for f in files if f.is_file() for m in pattern.finditer(f.read_text("utf-8"))
    }
    for word in found:
        assert token_problem(word) is not None, word


def test_generated_token_is_long_enough(tmp_path: Path, no_token_env: None) -> None:
    token = load_control_token(tmp_path / "state")
    assert len(token) >= MIN_TOKEN_CHARS and token_problem(token) is None
    assert load_control_token(tmp_path / "state") == token


def test_weak_env_token_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "short-secret")
    with pytest.raises(WeakTokenError) as info:
        load_control_token(tmp_path)
    assert f"${TOKEN_ENV}" in str(info.value) and "12 characters" in str(info.value)
    assert "short-secret" not in str(info.value)


def test_weak_token_file_names_the_file(tmp_path: Path, no_token_env: None) -> None:
    (tmp_path / "control-token").write_text("CHANGE-ME-control-token-use-openssl-rand-hex-32\n")
    with pytest.raises(WeakTokenError) as info:
        load_control_token(tmp_path)
    assert str(tmp_path / "control-token") in str(info.value)
    assert "placeholder" in str(info.value)
