"""Agent-influenced text on the approver's screen and in the store: `safe_text` escapes what a
terminal would act on or hide, `storable_text` what a store or JSON refuses, `is_http_token`
tells a method from anything else; and the CLI tables use them for every cell."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.control.client import render_decisions, render_grants, render_pending, render_resolution
from proxy.render import FIELD_LIMIT, is_http_token, safe_text, storable_text

# Any text, with the hard cases made likely: lone surrogates, undecodable bytes as
# `surrogateescape` keeps them, and controls a terminal acts on.
NASTY = "\x00\x1b\r\n\t\x7f\x85\x9b\u061c\u200b\u200e\u202e\u2066\u2069\u2028\ufeff\U000e0041"
any_text = st.one_of(
    st.text(
        st.one_of(
            st.characters(),
            st.integers(0xD800, 0xDFFF).map(chr),
            st.sampled_from(NASTY),
        )
    ),
    st.binary().map(lambda raw: raw.decode("utf-8", "surrogateescape")),
)

ESCAPED_IN_SCREEN = [
    ("\x1b", "\\x1b"),
    ("\r", "\\x0d"),
    ("\n", "\\x0a"),
    ("\t", "\\x09"),
    ("\x00", "\\x00"),
    ("\x7f", "\\x7f"),
    ("\x80", "\\x80"),
    ("\x9b", "\\x9b"),  # C1 CSI: a one-byte ESC [ on some terminals
    ("\x9f", "\\x9f"),
    *((chr(c), f"\\u{c:04x}") for c in range(0x202A, 0x202F)),  # embeddings and overrides
    *((chr(c), f"\\u{c:04x}") for c in range(0x2066, 0x206A)),  # isolates
    ("\u200e", "\\u200e"),
    ("\u200f", "\\u200f"),
    ("\u061c", "\\u061c"),
    ("\u200b", "\\u200b"),
    ("\u200c", "\\u200c"),
    ("\u200d", "\\u200d"),
    ("\u2060", "\\u2060"),
    ("\ufeff", "\\ufeff"),
    ("\u2028", "\\u2028"),
    ("\U000e0001", "\\U000e0001"),
    ("\U000e0041", "\\U000e0041"),  # TAG LATIN CAPITAL LETTER A
    ("\U000e007f", "\\U000e007f"),
    ("\ufe0f", "\\ufe0f"),
    ("\u3164", "\\u3164"),
    ("\udcff", "\\xff"),  # byte 0xff kept by surrogateescape
    ("\ud800", "\\ud800"),  # any other lone surrogate
]


@pytest.mark.parametrize(("char", "escape"), ESCAPED_IN_SCREEN)
def test_safe_text_escapes_what_a_terminal_acts_on_or_hides(char: str, escape: str) -> None:
    assert safe_text(f"a{char}b") == f"a{escape}b"


@pytest.mark.parametrize(
    "text", ["api.github.com", "GET", "/repos/o/r?q=1 2", "café", "日本語.example", "ñ̃", "a\\x1b"]
)
def test_safe_text_leaves_plain_text_alone(text: str) -> None:
    assert safe_text(text) == text


@given(any_text)
def test_safe_text_prints_one_visible_line(text: str) -> None:
    shown = safe_text(text)
    assert shown.isprintable()  # no control, format, separator, surrogate or unassigned char
    assert not re.search("[\u034f\u115f\u1160\u3164\ufe00-\ufe0f\uffa0]", shown)
    assert safe_text(shown) == shown
    shown.encode("utf-8")


@given(any_text)
def test_storable_text_is_taken_by_sqlite_and_json(text: str) -> None:
    stored = storable_text(text)
    assert len(stored) <= FIELD_LIMIT
    assert "\x00" not in stored
    stored.encode("utf-8")  # no lone surrogate left
    json.dumps({"v": stored}, ensure_ascii=False).encode("utf-8")
    with sqlite3.connect(":memory:") as db:
        db.execute("CREATE TABLE t (v TEXT)")
        db.execute("INSERT INTO t VALUES (?)", (stored,))
        assert db.execute("SELECT v FROM t").fetchone()[0] == stored


@given(
    st.text(
        st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
        max_size=FIELD_LIMIT,
    )
)
def test_storable_text_keeps_valid_text_within_the_limit(text: str) -> None:
    assert storable_text(text) == text


def test_storable_text_escapes_bytes_and_nul_and_marks_a_cut() -> None:
    assert storable_text("G\udcffT") == "G\\xffT"
    assert storable_text("a\x00b") == "a\\x00b"
    assert storable_text("\ud800") == "\\ud800"
    cut = storable_text("/" + "a" * 5000)
    assert len(cut) == FIELD_LIMIT
    assert cut.startswith("/aaa") and cut.endswith("...[truncated, 5001 chars]")
    assert storable_text("x" * 5000, None) == "x" * 5000


@pytest.mark.parametrize("method", ["GET", "CONNECT", "M-SEARCH", "PROPFIND", "X!#$%&'*+.^_`|~9"])
def test_http_tokens(method: str) -> None:
    assert is_http_token(method)


@pytest.mark.parametrize(
    "method",
    [
        "",
        "GE\x1bT",
        "G\udcffT",
        "G\xffT",
        "GET\x00",
        "GET\n",
        "GE T",
        "G(T",
        'G"T',
        "\uff27ET",
        "GET\t",
    ],
)
def test_not_http_tokens(method: str) -> None:
    assert not is_http_token(method)


# -- the CLI tables ------------------------------------------------------------------------------

ATTACK = "\x1b[2K\x1b[1A\x1b[8m\x1b]8;;http://x.test\x07\u202etrusted.test"


def _assert_screen_safe(screen: str) -> None:
    for line in screen.split("\n"):
        assert line.isprintable(), repr(line)
    assert "\x1b" not in screen and "\u202e" not in screen


def test_pending_table_escapes_every_agent_value_and_aligns_on_the_escaped_text() -> None:
    items = [
        {
            "id": "a1" + ATTACK,
            "host": "evil.test" + ATTACK,
            "port": 80,
            "method": "GE\x1bT",
            "agent": "bot\u200b",
            "count": 1,
            "waiting": 1,
            "first_seen": 0.0,
            "expires_at": None,
        },
        {"id": "b2", "host": "ok.test", "port": 443, "method": "CONNECT", "agent": "ci"},
    ]
    screen = render_pending(items, now=10.0)
    _assert_screen_safe(screen)
    assert "a1\\x1b[2K" in screen and "GE\\x1bT" in screen and "bot\\u200b" in screen
    assert "\\u202etrusted.test" in screen
    header, first, second = screen.split("\n")
    # Columns line up on the escaped text: the METHOD column starts at the same offset.
    column = header.index("METHOD")
    assert first[column:].startswith("GE\\x1bT") and second[column:].startswith("CONNECT")


def test_decisions_table_escapes_path_host_rule_and_reason() -> None:
    items = [
        {
            "at": 0.0,
            "decision": "hold",
            "reason": "default_ask\x1b[1A",
            "agent": None,
            "host": "held.test",
            "port": 80,
            "path": "/" + ATTACK,
            "rule": "r\u2066x",
        }
    ]
    screen = render_decisions(items)
    _assert_screen_safe(screen)
    assert "held.test:80/\\x1b[2K" in screen and "r\\u2066x" in screen


def test_grants_table_and_resolution_line_escape_notes_and_patterns() -> None:
    grant = {
        "id": "g\x1b1",
        "action": "allow",
        "pattern": "x.test\u202e",
        "scope": "always",
        "agent": "a\x9b",
        "created_by": "admin",
        "note": "line1\nline2\x1b[2J",
        "expires_at": None,
    }
    _assert_screen_safe(render_grants([grant], now=0.0))
    answer = {
        "resolution": "approved\x1b[2K",
        "id": "p\x1b",
        "scope": "once",
        "for": "all",
        "released": "1\x1b",
        "grant": grant,
    }
    line = render_resolution(answer, "p")
    _assert_screen_safe(line)
    assert "note" not in line and "x.test\\u202e" in line
