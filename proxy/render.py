"""Text an agent can influence, made fit for where it goes: a person's terminal (`safe_text`),
a store or a JSON answer (`storable_text`); and the edge's check on a request method
(`is_http_token`). Escapes are for reading, not for round trips: a backslash is kept as is."""

from __future__ import annotations

import re
from typing import Final

# Stored audit fields are capped: a 64 KiB path is no more useful to a reader than its start.
FIELD_LIMIT: Final = 2000

# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# Printable by str.isprintable(), yet invisible or blank where they stand, so they can hide text
# or pass for nothing: combining grapheme joiner, Hangul fillers, Khmer inherent vowels,
# Mongolian variation selectors, braille blank, variation selectors (which can also smuggle
# bytes); the tag block is listed whatever this Python's Unicode version assigns in it.
# Everything not printable is escaped anyway: controls (C0, DEL, C1), format characters (bidi
# embeddings, overrides and isolates, LRM/RLM/ALM, zero-width space and joiners, word joiner,
# BOM, tags), separators other than the space, lone surrogates, private-use and unassigned.
_INVISIBLE: Final = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2800\u3164\ufe00-\ufe0f\uffa0"
    "\U000e0000-\U000e007f\U000e0100-\U000e01ef]"
)

# What no store takes as text: lone surrogates (undecodable bytes kept by `surrogateescape`
# are not valid UTF-8) and NUL (PostgreSQL refuses it in text).
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")


def _escape(char: str) -> str:
    """A visible escape for one code point; a byte kept by `surrogateescape` shows as itself."""
    point = ord(char)
    if 0xDC80 <= point <= 0xDCFF:
        return f"\\x{point - 0xDC00:02x}"
    if point <= 0xFF:
        return f"\\x{point:02x}"
    if point <= 0xFFFF:
        return f"\\u{point:04x}"
    return f"\\U{point:08x}"


def _shows_as_itself(char: str) -> bool:
    return char.isprintable() and _INVISIBLE.match(char) is None


def safe_text(value: str) -> str:
    """`value` for a terminal: every control, bidi, invisible or format character and every lone
    surrogate escaped (`\\x1b`, `\\u202e`), so one value prints as one honest line."""
    if value.isprintable() and _INVISIBLE.search(value) is None:
        return value
    return "".join(char if _shows_as_itself(char) else _escape(char) for char in value)


def storable_text(value: str, limit: int | None = FIELD_LIMIT) -> str:
    """`value` as any store and any JSON encoder take it: lone surrogates and NUL escaped, then
    cut to `limit` characters (marker included) when there is a limit. Valid text within the
    limit comes back unchanged."""
    text = value
    # str.isascii() is O(1) in CPython: the common case skips the scan.
    unsafe = "\x00" in text if text.isascii() else _UNSTORABLE.search(text) is not None
    if unsafe:
        text = _UNSTORABLE.sub(lambda match: _escape(match.group()), text)
    if limit is None or len(text) <= limit:
        return text
    marker = f"...[truncated, {len(text)} chars]"
    return text[: max(0, limit - len(marker))] + marker


def is_http_token(method: str) -> bool:
    """True when `method` is an RFC 9110 token (what a request method must be)."""
    return _TOKEN.fullmatch(method) is not None
