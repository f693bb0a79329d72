"""Inspected path rules see one canonical path: spellings of a denied path are denied or refused."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.inspection import AmbiguousPath, decide_inspected, normalise_path
from proxy.policy.model import InspectRule
from proxy.verdicts import Reason, Tier, Verdict

SECRET = InspectRule(
    host="api.example.test",
    methods=frozenset({"GET", "HEAD", "OPTIONS"}),
    deny_paths=("/secret*",),
    source="p.yaml:9",
)
UNRESERVED = string.ascii_letters + string.digits + "-._~"
ESCAPED_UNRESERVED = re.compile(
    "|".join(f"%{ord(c):02X}" for c in UNRESERVED)
    + "|"
    + "|".join(f"%{ord(c):02x}" for c in UNRESERVED)
)


# --- the bypasses from the issue, and their cousins ---------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/secret",
        "/%73ecret",
        "/%73%65%63%72%65%74",
        "//secret",
        "///secret/x",
        "/./secret",
        "/x/../secret",
        "/x/y/../../secret",
        "/../secret",
        "/%2e/secret",
        "/x/%2E%2E/secret",
        "/x/.%2e/secret",
        "/x/./../secret?y=1",
        "/secret?x=/public",
    ],
)
def test_spellings_of_a_denied_path_are_denied_by_the_rule(path: str) -> None:
    d = decide_inspected(SECRET, "GET", path)
    assert (d.verdict, d.reason, d.rule, d.source) == (
        Verdict.DENY,
        Reason.DENY_RULE,
        "/secret*",
        "p.yaml:9",
    )
    assert d.tier is Tier.POLICY


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/x%2Fsecret", "encoded slash"),
        ("/x%2fsecret", "encoded slash"),
        ("/x%5C..%5Csecret", "backslash"),
        ("/x\\..\\secret", "backslash"),
        ("/secret%00.png", "control character 0x00"),
        ("/a%0Db", "control character 0x0d"),
        ("/a%7Fb", "control character 0x7f"),
        ("/a\tb", "control character 0x09"),
        ("/a\x7fb", "control character 0x7f"),
        ("/a%", "malformed escape"),
        ("/a%G1", "malformed escape"),
        ("/a%4", "malformed escape"),
        ("/a%4/b", "malformed escape"),
        ("/%2573ecret", "double-encoded"),
        ("/x%252Fsecret", "double-encoded"),
        ("/x%25%32%46secret", "double-encoded"),
        ("/x%C0%AFsecret", "not valid UTF-8"),
        ("/x%E0%80%AFsecret", "not valid UTF-8"),
        ("/x%C1%9Csecret", "not valid UTF-8"),
        ("/%C0%AE%C0%AE/secret", "not valid UTF-8"),
        ("/x%FFsecret", "not valid UTF-8"),
        ("/caf%C3", "not valid UTF-8"),
        ("/x\udcffsecret", "not valid UTF-8"),  # a raw 0xFF byte as mitmproxy hands it over
        ("secret", "does not start with /"),
        ("", "does not start with /"),
        ("?x=1", "does not start with /"),
        ("*", "does not start with /"),
        ("/x#/../secret", "fragment"),
        ("/x/..;/secret", "dot segment with ;parameters"),
        ("/x/.;a/secret", "dot segment with ;parameters"),
        ("/secret//..", "slash merging"),
        ("/x//../secret", "slash merging"),
    ],
)
def test_ambiguous_paths_are_refused_as_invalid_requests(path: str, why: str) -> None:
    d = decide_inspected(SECRET, "GET", path)
    assert (d.verdict, d.reason, d.tier) == (Verdict.DENY, Reason.INVALID_REQUEST, Tier.GUARD)
    assert d.detail.startswith("ambiguous request path: ") and why in d.detail
    with pytest.raises(AmbiguousPath, match=re.escape(why)):
        normalise_path(path)


def test_ambiguous_path_is_refused_before_the_method_is_looked_at() -> None:
    d = decide_inspected(SECRET, "POST", "/a%2Fb")
    assert (d.reason, d.tier) == (Reason.INVALID_REQUEST, Tier.GUARD)


def test_unlisted_method_is_a_policy_decision() -> None:
    d = decide_inspected(SECRET, "DELETE", "/public")
    assert (d.verdict, d.reason, d.tier) == (Verdict.DENY, Reason.METHOD, Tier.POLICY)


def test_asterisk_target_is_only_for_options() -> None:
    assert decide_inspected(SECRET, "OPTIONS", "*").verdict is Verdict.ALLOW
    assert decide_inspected(SECRET, "GET", "*").reason is Reason.INVALID_REQUEST
    assert normalise_path("*", asterisk=True) == "*"


def test_patterns_stay_case_sensitive() -> None:
    assert decide_inspected(SECRET, "GET", "/SECRET").verdict is Verdict.ALLOW
    assert decide_inspected(SECRET, "GET", "/%53ECRET").verdict is Verdict.ALLOW


# --- legitimate paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("/repos/a/b", "/repos/a/b"),
        ("/repos/a/b?x=1&y=%2F", "/repos/a/b"),
        ("/a%20b", "/a%20b"),
        ("/a b", "/a%20b"),
        ("/caf%C3%A9", "/caf%C3%A9"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/café", "/caf%C3%A9"),
        ("/%E2%82%AC/%F0%9F%98%80", "/%E2%82%AC/%F0%9F%98%80"),
        ("/~user", "/~user"),
        ("/%7Euser/%41-%5f.%2D", "/~user/A-_.-"),
        ("/", "/"),
        ("/a/", "/a/"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/a//b", "/a/b"),
        ("/a;v=1/b", "/a;v=1/b"),
        ("/x:y@z!$&'()*+,=", "/x:y@z!$&'()*+,="),
        ("/100%25", "/100%25"),
        ("/100%25/x", "/100%25/x"),
        ("/a%3Fb%23c", "/a%3Fb%23c"),
        ("/a%3fb", "/a%3Fb"),
        ("/..a/.b/a..", "/..a/.b/a.."),
    ],
)
def test_legitimate_paths_normalise_to_one_spelling(raw: str, normalised: str) -> None:
    assert normalise_path(raw) == normalised
    assert decide_inspected(SECRET, "GET", raw).verdict is Verdict.ALLOW


def test_existing_callers_still_pass_the_query_along() -> None:
    d = decide_inspected(SECRET, "GET", "/repos/a/b?path=/secret")
    assert (d.verdict, d.reason, d.source) == (Verdict.ALLOW, Reason.ALLOW_RULE, "p.yaml:9")


# --- properties ---------------------------------------------------------------------------


@st.composite
def spelled(draw: st.DrawFn, text: str) -> str:
    """`text` with each character left raw or percent-encoded in upper or lower-case hex."""
    out = []
    for character in text:
        style = draw(st.sampled_from(["raw", "upper", "lower"]))
        escape = f"%{ord(character):02X}"
        out.append(character if style == "raw" else escape if style == "upper" else escape.lower())
    return "".join(out)


NAMES = st.text(UNRESERVED + "!$&'()*+,=:@", min_size=1, max_size=6).filter(
    lambda name: name not in (".", "..")
)
SEGMENTS = st.one_of(
    st.sampled_from(["", ".", ".."]).flatmap(spelled),
    NAMES.flatmap(spelled),
    st.sampled_from(["%20", "%C3%A9", "caf%c3%a9", "a%3fb", "%25", "a;b"]),
)
PATHS = st.lists(SEGMENTS, max_size=8).map(lambda segments: "/" + "/".join(segments))


def _normalised_or_none(path: str) -> str | None:
    try:
        return normalise_path(path)
    except AmbiguousPath:
        return None


@given(PATHS)
@example("/a/./b/../../c/")
@example("/%2E%2e/./%7e")
def test_normalise_is_idempotent_and_leaves_no_dot_segments_or_slash_runs(path: str) -> None:
    once = _normalised_or_none(path)
    if once is None:
        return
    assert normalise_path(once) == once
    assert once.startswith("/")
    for residue in ("//", "/./", "/../"):
        assert residue not in once
    assert not once.endswith(("/.", "/.."))
    assert not ESCAPED_UNRESERVED.search(once)
    assert re.findall(r"%..", once) == [e.upper() for e in re.findall(r"%..", once)]


def _rfc_remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 as written there (an input and an output buffer), for comparison."""
    source, output = path, ""
    while source:
        if source.startswith(("../", "./")):
            source = source.partition("/")[2]
        elif source.startswith("/./") or source == "/.":
            source = "/" + source[3:]
        elif source.startswith("/../") or source == "/..":
            source = "/" + source[4:]
            output = output[: max(output.rfind("/"), 0)]
        elif source in (".", ".."):
            source = ""
        else:
            cut = source.find("/", 1)
            cut = len(source) if cut < 0 else cut
            output, source = output + source[:cut], source[cut:]
    return output


def _decode_unreserved(path: str) -> str:
    return re.sub(
        "%([0-9A-Fa-f]{2})",
        lambda m: chr(int(m[1], 16)) if chr(int(m[1], 16)) in UNRESERVED else m[0].upper(),
        path,
    )


@given(PATHS)
def test_normalise_agrees_with_rfc_3986_dot_removal_after_merging_slashes(path: str) -> None:
    # A server that decodes unreserved escapes and resolves dots (merging slashes first or not)
    # reaches the same resource as the one the rules saw.
    once = _normalised_or_none(path)
    if once is None:
        return
    decoded = _decode_unreserved(path)
    merged_first = _rfc_remove_dot_segments(re.sub("/{2,}", "/", decoded))
    dots_first = re.sub("/{2,}", "/", _rfc_remove_dot_segments(decoded))
    assert once == merged_first == dots_first


@given(st.lists(NAMES.flatmap(spelled), max_size=4), st.data())
def test_any_path_that_resolves_to_a_denied_one_is_denied(
    names: list[str], data: st.DataObject
) -> None:
    # Climb into `names`, back out with as many `..`, then into `secret`, with noise in between.
    steps = names + [".."] * len(names) + ["secret"]
    noisy = []
    for step in steps:
        noisy.extend(data.draw(st.lists(st.sampled_from([".", "%2e", ""]), max_size=2)))
        noisy.append(data.draw(spelled(step)))
    path = "/" + "/".join(noisy) + data.draw(st.sampled_from(["", "?q=1", "/x"]))
    d = decide_inspected(SECRET, "GET", path)
    assert d.verdict is Verdict.DENY
    assert d.reason in (Reason.DENY_RULE, Reason.INVALID_REQUEST)
