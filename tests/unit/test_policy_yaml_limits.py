"""Policy YAML that expands without bound (alias bombs) is rejected fast, with FILE:LINE."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from proxy.policy.load import PolicyErrors, load_policy_file

# The classic "billion laughs": 373 bytes, 9 levels of 9 aliases each, ~10^9 nodes expanded.
BILLION_LAUGHS = """\
version: 1
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
allow: *i
"""


def _rejected(path: Path) -> tuple[PolicyErrors, float]:
    start = time.perf_counter()
    with pytest.raises(PolicyErrors) as caught:
        load_policy_file(path)
    return caught.value, time.perf_counter() - start


def test_billion_laughs_is_rejected_fast_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BILLION_LAUGHS)
    error, elapsed = _rejected(path)
    # A bug guard, not a benchmark: unbounded, this took 16 s and 890 MB.
    assert elapsed < 2.0, f"alias bomb took {elapsed:.2f}s to reject"
    [only] = error.errors
    assert only.file == str(path)
    # levels a-d expand to 8,289 repeated values; e's aliases cross 10,000
    assert only.line == 6
    assert "alias" in only.message
    assert "anchor at line 5" in only.message  # &d, which the aliases on line 6 expand
    assert str(only).startswith(f"{path}:6: ")


def test_wide_alias_bomb_in_an_agent_section_names_the_line_using_it(tmp_path: Path) -> None:
    hosts = ", ".join(f"h{i}.example.com" for i in range(200))
    uses = ", ".join(["*hosts"] * 200)  # 40,000 values from one line
    path = tmp_path / "wide.yaml"
    path.write_text(f"version: 1\nallow: &hosts [{hosts}]\nagents:\n  bot:\n    deny: [{uses}]\n")
    error, elapsed = _rejected(path)
    assert elapsed < 2.0
    [only] = error.errors
    assert (only.file, only.line) == (str(path), 5)
    assert "anchor at line 2" in only.message


def test_merge_key_bomb_is_rejected(tmp_path: Path) -> None:
    levels = ["x0: &x0 {" + ", ".join(f"k{i}: v" for i in range(10)) + "}"]
    for n in range(1, 8):
        merged = ", ".join(f"m{i}: *x{n - 1}" for i in range(10))
        levels.append(f"x{n}: &x{n} {{{merged}}}")
    path = tmp_path / "merge.yaml"
    path.write_text("version: 1\n" + "\n".join(levels) + "\n")
    error, elapsed = _rejected(path)
    assert elapsed < 2.0
    assert "alias" in error.errors[0].message


def test_modest_aliases_still_load(tmp_path: Path) -> None:
    path = tmp_path / "shared.yaml"
    hosts = "\n".join(f"  - h{i}.example.com" for i in range(500))
    agents = "\n".join(f"  bot{i}: {{default: deny, allow: *shared}}" for i in range(10))
    path.write_text(f"version: 1\nallow: &shared\n{hosts}\nagents:\n{agents}\n")
    doc = load_policy_file(path)
    assert len(doc.allow) == 500
    assert len(doc.agents["bot9"].allow) == 500  # 5,000 values through aliases
    assert doc.agents["bot9"].allow[0].source == f"{path}:3"  # the anchored item's own line


def test_large_policy_without_aliases_is_not_limited(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    rules = "\n".join(f"  - h{i}.example.com" for i in range(100_000))
    path.write_text(f"version: 1\ndefault: deny\nallow:\n{rules}\n")
    doc = load_policy_file(path)
    assert len(doc.allow) == 100_000


def test_deep_nesting_is_still_rejected_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("version: 1\nallow: " + "[" * 100 + "]" * 100 + "\n")
    error, _ = _rejected(path)
    [only] = error.errors
    assert only.line == 2
    assert "nests too deeply" in only.message
