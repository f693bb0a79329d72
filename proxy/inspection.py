"""Method and path rules for hosts under `inspect:` (TLS-intercepted), as a pure function.

Path rules are only as good as the path they see: `/%73ecret`, `//secret`, `/./secret` and
`/x/../secret` all reach `/secret` on the server. So the request path is normalised once
(`normalise_path`) and a path whose meaning depends on how the server decodes it is refused.
"""

from __future__ import annotations

import re
import string
from fnmatch import fnmatchcase

from proxy.policy.model import InspectRule
from proxy.verdicts import Decision, Reason, Tier, Verdict

_HEX = frozenset(string.hexdigits)
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# Left as they are in a normalised path: unreserved, sub-delims, ":", "@" and "/" (RFC 3986 3.3).
_RAW_OK = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
_DOUBLE_ENCODED = re.compile(r"%25[0-9A-Fa-f]{2}")
_SLASHES = re.compile(r"/{2,}")


class AmbiguousPath(ValueError):
    """The path could reach different resources depending on how a server decodes it."""


def normalise_path(raw: str, *, asterisk: bool = False) -> str:
    """The request target's path in one canonical spelling, or `AmbiguousPath`.

    Drops the query; decodes escaped unreserved characters (other escapes stay, hex upper-cased,
    raw characters outside the RFC 3986 path set get escaped as UTF-8); removes dot segments
    (RFC 3986 5.2.4); merges repeated slashes. `asterisk` admits the `*` of `OPTIONS *`.
    """
    path = raw.partition("?")[0]
    if "#" in path:
        # Never sent by a client; a server that keeps it would see `/x#/../secret` as `/secret`.
        raise AmbiguousPath("fragment (#) in the request target")
    if path == "*" and asterisk:
        return path
    if not path.startswith("/"):
        raise AmbiguousPath(f"path {_shown(path)} does not start with /")
    canonical = _canonical_escapes(path)
    if _DOUBLE_ENCODED.search(canonical):
        raise AmbiguousPath("double-encoded escape (%25 followed by hex digits)")
    segments = canonical.split("/")[1:]
    if any(";" in s and s.partition(";")[0] in (".", "..") for s in segments):
        # Tomcat-style servers strip `;params` and then resolve `..;` as `..`.
        raise AmbiguousPath("dot segment with ;parameters")
    # `/a//../b` is `/b` to a server that merges slashes first and `/a/b` to one that does not.
    merged_first = _remove_dot_segments(_SLASHES.sub("/", canonical))
    dots_first = _SLASHES.sub("/", _remove_dot_segments(canonical))
    if merged_first != dots_first:
        raise AmbiguousPath("'..' after an empty segment (depends on slash merging)")
    return dots_first


def decide_inspected(rule: InspectRule, method: str, path: str) -> Decision:
    """Deny an ambiguous path, a method not listed, or a path matching a `deny_paths` glob.

    The globs (case-sensitive, as the admin wrote them) match the normalised path.
    """
    try:
        normalised = normalise_path(path, asterisk=method.upper() == "OPTIONS")
    except AmbiguousPath as error:
        return Decision(
            Verdict.DENY,
            Reason.INVALID_REQUEST,
            detail=f"ambiguous request path: {error}",
            tier=Tier.GUARD,
        )
    if rule.methods is not None and method.upper() not in rule.methods:
        allowed = ", ".join(sorted(rule.methods))
        return Decision(
            Verdict.DENY,
            Reason.METHOD,
            rule.host,
            rule.source,
            f"method {method} not allowed on {rule.host} (allowed: {allowed})",
            Tier.POLICY,
        )
    for pattern in rule.deny_paths:
        if fnmatchcase(normalised, pattern):
            return Decision(
                Verdict.DENY,
                Reason.DENY_RULE,
                pattern,
                rule.source,
                f"path denied by {pattern!r}",
                Tier.POLICY,
            )
    return Decision(
        Verdict.ALLOW, Reason.ALLOW_RULE, rule.host, rule.source, "allowed by inspect rule"
    )


def _canonical_escapes(path: str) -> str:
    """Decode escaped unreserved characters, escape the rest in upper-case UTF-8 hex."""
    out: list[str] = []
    i = 0
    while i < len(path):
        if path[i] != "%":
            _check_character(path[i], escaped=False)
            out.append(path[i] if path[i] in _RAW_OK else _escape(path[i]))
            i += 1
            continue
        # A run of escapes is decoded together: one character may span several bytes.
        run = bytearray()
        while i < len(path) and path[i] == "%":
            pair = path[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise AmbiguousPath(f"malformed escape {_shown(path[i : i + 3])}")
            run.append(int(pair, 16))
            i += 3
        try:
            text = run.decode("utf-8")  # strict: overlong forms such as %C0%AF are errors
        except UnicodeDecodeError:
            raise AmbiguousPath(f"escapes {_hex(run)} are not valid UTF-8") from None
        for character in text:
            _check_character(character, escaped=True)
            out.append(character if character in _UNRESERVED else _escape(character))
    return "".join(out)


def _check_character(character: str, *, escaped: bool) -> None:
    code = ord(character)
    if code < 0x20 or code == 0x7F:
        raise AmbiguousPath(f"control character {code:#04x} in the path")
    if character == "\\":
        raise AmbiguousPath("backslash in the path (a separator to some servers)")
    if character == "/" and escaped:
        raise AmbiguousPath("encoded slash (%2F) in the path")


def _escape(character: str) -> str:
    try:
        data = character.encode("utf-8")
    except UnicodeEncodeError:  # a byte that was not UTF-8 on the wire (surrogateescape)
        raise AmbiguousPath("raw bytes in the path are not valid UTF-8") from None
    return _hex(data)


def _hex(data: bytes | bytearray) -> str:
    return "".join(f"%{byte:02X}" for byte in data)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for a path that starts with `/`, a segment at a time."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment in (".", ".."):
            if segment == ".." and out:
                out.pop()
            if last:
                out.append("")  # `/a/.` and `/a/b/..` end in a slash: `/a/`
        else:
            out.append(segment)
    return "/" + "/".join(out)


def _shown(text: str) -> str:
    return repr(text[:40])
