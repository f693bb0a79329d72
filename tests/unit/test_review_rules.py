"""The rule reviewer: every signal, positive and negative."""

from __future__ import annotations

import base64
import secrets
from typing import Any

from proxy.hosts import canonicalize_host
from proxy.policy.model import RulesReviewerSection
from proxy.review.chain import RateWindow, ReviewOutcome, ReviewRequest
from proxy.review.rules import RulesReviewer, entropy, skeleton

ALLOWED = ("github.com", "crates.io")


def reviewer(clock: list[float] | None = None, **settings: Any) -> RulesReviewer:
    fields: dict[str, Any] = {
        "kind": "rules",
        "trusted": ["**.readthedocs.io", "**.cloudfront.net", "proxy.golang.org"],
        "categories": {"paste": ["**.pastebin.test"], "tunnel": ["**.ngrok.example"]},
        "risky_tlds": ["zip", ".mov"],
        **settings,
    }
    ticks = clock if clock is not None else [0.0]
    return RulesReviewer(
        RulesReviewerSection.model_validate(fields), ALLOWED, RateWindow(), lambda: ticks[0]
    )


def request(name: str, port: int = 443, agent: str | None = "alice") -> ReviewRequest:
    return ReviewRequest(canonicalize_host(name), port, "CONNECT", "https", agent=agent)


def judge(name: str, port: int = 443, **settings: Any) -> tuple[ReviewOutcome, set[str], str]:
    review = reviewer(**settings).judge(request(name, port))
    return review.outcome, {s.name for s in review.signals}, review.rationale


def b32_label(n: int = 60) -> str:
    return base64.b32encode(secrets.token_bytes(64)).decode().lower().rstrip("=")[:n]


# -- trusted -----------------------------------------------------------------------------------


def test_trusted_pattern_is_approved_with_the_pattern_as_reason() -> None:
    outcome, signals, rationale = judge("docs.readthedocs.io")
    assert outcome is ReviewOutcome.APPROVE and signals == {"trusted"}
    assert "**.readthedocs.io" in rationale


def test_untrusted_name_without_signal_escalates() -> None:
    outcome, signals, _ = judge("docs.unknown-vendor.example")
    assert outcome is ReviewOutcome.ESCALATE and signals == set()


def test_otherwise_approve_approves_a_name_without_signal() -> None:
    outcome, _, rationale = judge("docs.unknown-vendor.example", otherwise="approve")
    assert outcome is ReviewOutcome.APPROVE and "otherwise" in rationale


# -- IP literals and ports -----------------------------------------------------------------------


def test_ip_literal_is_denied() -> None:
    for name in ("93.184.216.34", "2001:db8::1"):
        outcome, signals, rationale = judge(name)
        assert outcome is ReviewOutcome.DENY and "ip_literal" in signals, name
        assert "ip_literal" in rationale


def test_ip_literal_signal_can_be_turned_off() -> None:
    outcome, signals, _ = judge("93.184.216.34", deny_ip_literals=False)
    assert outcome is ReviewOutcome.ESCALATE and "ip_literal" not in signals


def test_non_standard_port_is_denied_even_on_a_trusted_host() -> None:
    outcome, signals, rationale = judge("docs.readthedocs.io", port=8443)
    assert outcome is ReviewOutcome.DENY and "port" in signals and "8443" in rationale
    assert judge("docs.readthedocs.io", port=80)[0] is ReviewOutcome.APPROVE


def test_port_signal_follows_the_configured_ports() -> None:
    assert judge("x.unknown.example", port=8443, standard_ports=[443, 8443])[0] is (
        ReviewOutcome.ESCALATE
    )
    assert judge("x.unknown.example", port=22, deny_other_ports=False)[0] is ReviewOutcome.ESCALATE


# -- lookalikes -----------------------------------------------------------------------------------


def test_mixed_script_lookalike_of_an_allowed_host_is_denied() -> None:
    # Cyrillic small letter byelorussian-ukrainian i (U+0456) for Latin 'i'
    outcome, signals, rationale = judge("g\u0456thub.com")
    assert outcome is ReviewOutcome.DENY and {"lookalike", "mixed_script"} <= signals
    assert "github.com" in rationale


def test_punycode_spelling_of_a_lookalike_is_denied() -> None:
    puny = canonicalize_host("\u0441rates.io").name  # Cyrillic small letter es (U+0441)
    assert puny.startswith("xn--")
    outcome, signals, rationale = judge(puny)
    assert outcome is ReviewOutcome.DENY and "lookalike" in signals and "crates.io" in rationale


def test_lookalike_of_a_trusted_host_and_under_a_lookalike_parent_is_denied() -> None:
    assert "lookalike" in judge("pr\u043exy.golang.org")[1]  # Cyrillic small letter o (U+043E)
    assert "lookalike" in judge("api.g\u0456thub.com")[1]


def test_digit_for_letter_lookalike_is_denied() -> None:
    outcome, signals, rationale = judge("proxy.go1ang.org")  # '1' for 'l'
    assert outcome is ReviewOutcome.DENY and "lookalike" in signals
    assert "proxy.golang.org" in rationale


def test_genuine_idn_and_the_real_host_are_not_lookalikes() -> None:
    outcome, signals, _ = judge("b\u00fccher.example")  # a single-script IDN
    assert outcome is ReviewOutcome.ESCALATE and signals == set()
    assert "lookalike" not in judge("github.com")[1]
    assert "lookalike" not in judge("githubstatus.com")[1]


def test_mixed_script_label_without_a_known_target_escalates() -> None:
    outcome, signals, _ = judge("p\u0430yments-portal.example")  # Cyrillic small letter a (U+0430)
    assert outcome is ReviewOutcome.ESCALATE and signals == {"mixed_script"}


def test_lookalike_signal_can_be_turned_off() -> None:
    assert "lookalike" not in judge("g\u0456thub.com", lookalikes=False)[1]


def test_skeleton_maps_confusables_to_ascii() -> None:
    assert skeleton("g\u0456thub.com") == skeleton("github.com")
    assert skeleton("paypa1.example") == skeleton("paypal.example")
    assert skeleton("ci.example") != skeleton("cl.example")


# -- encoded data -------------------------------------------------------------------------------


def test_60_character_base32_label_is_denied() -> None:
    label = b32_label(60)
    outcome, signals, rationale = judge(f"{label}.exfil.example")
    assert outcome is ReviewOutcome.DENY and "encoded_label" in signals
    assert "base32" in rationale


def test_hex_label_is_denied() -> None:
    outcome, signals, rationale = judge(f"{secrets.token_hex(16)}.t.example")
    assert outcome is ReviewOutcome.DENY and "encoded_label" in signals and "hex" in rationale


def test_high_entropy_base64ish_label_is_denied() -> None:
    outcome, signals, rationale = judge("q9x2mz7kp4w8rt6v3ny5.data.example")
    assert outcome is ReviewOutcome.DENY and "encoded_label" in signals and "entropy" in rationale


def test_many_labels_are_denied() -> None:
    outcome, signals, rationale = judge("a.b.c.d.e.f.g.h.i.example")
    assert outcome is ReviewOutcome.DENY and "encoded_label" in signals and "labels" in rationale


def test_ordinary_long_names_are_not_encoded() -> None:
    for name in (
        "my-very-long-project-name-documentation.example.org",
        "pkg-containers.githubusercontent.example",
        "s3.dualstack.us-east-1.amazonaws.example",
        "r1---sn-4g5e6nsz.gvt1.example",
        "e1234.a.akamaiedge.example",
        "registry-1.docker.example",
        "d111111abcdef8.cdn-provider.example",  # a short CDN distribution id
    ):
        assert "encoded_label" not in judge(name)[1], name


def test_long_plain_label_escalates_not_denies() -> None:
    name = "the-documentation-site-for-a-project-with-a-long-name.example"
    outcome, signals, _ = judge(name)
    assert outcome is ReviewOutcome.ESCALATE and signals == {"long_label"}


def test_cdn_hashes_under_a_trusted_domain_are_approved() -> None:
    # The documented false-positive handling: trusted zones are exempt from encoded labels.
    name = f"{secrets.token_hex(16)}.cloudfront.net"
    assert judge(name)[0] is ReviewOutcome.APPROVE
    assert judge(f"{secrets.token_hex(16)}.cloudfront.example")[0] is ReviewOutcome.DENY


def test_encoded_label_signal_can_be_turned_off() -> None:
    name = f"{secrets.token_hex(16)}.t.example"
    assert "encoded_label" not in judge(name, encoded={"enabled": False})[1]


def test_entropy_is_bits_per_character() -> None:
    assert entropy("aaaa") == 0.0
    assert abs(entropy("abcd") - 2.0) < 1e-9


# -- risky TLDs and categories --------------------------------------------------------------------


def test_risky_tld_is_denied_and_others_are_not() -> None:
    for name in ("release-notes.zip", "video.mov"):
        outcome, signals, _ = judge(name)
        assert outcome is ReviewOutcome.DENY and signals == {"risky_tld"}, name
    assert "risky_tld" not in judge("release-notes.example")[1]


def test_listed_category_is_denied_with_its_name() -> None:
    outcome, signals, rationale = judge("pastebin.test")
    assert outcome is ReviewOutcome.DENY and signals == {"category:paste"}
    assert "paste" in rationale
    assert judge("abc.ngrok.example")[1] == {"category:tunnel"}
    assert not any(s.startswith("category") for s in judge("pastebin-like.example")[1])


# -- rate --------------------------------------------------------------------------------------


def test_many_new_destinations_in_the_window_escalate_a_trusted_one() -> None:
    clock = [100.0]
    rules = reviewer(clock, rate={"max_new": 3, "window": "60s"})
    outcomes = [rules.judge(request(f"p{i}.readthedocs.io")).outcome for i in range(5)]
    assert outcomes[:3] == [ReviewOutcome.APPROVE] * 3
    assert outcomes[3:] == [ReviewOutcome.ESCALATE] * 2
    last = rules.judge(request("p9.readthedocs.io"))
    assert "rate" in {s.name for s in last.signals} and "rate" in last.rationale
    # another agent has its own window; the same agent recovers once the window passes
    assert rules.judge(request("x.readthedocs.io", agent="bob")).outcome is ReviewOutcome.APPROVE
    clock[0] += 61
    assert rules.judge(request("y.readthedocs.io")).outcome is ReviewOutcome.APPROVE


def test_rate_signal_can_be_turned_off() -> None:
    rules = reviewer(rate={"enabled": False})
    outcomes = {rules.judge(request(f"p{i}.readthedocs.io")).outcome for i in range(30)}
    assert outcomes == {ReviewOutcome.APPROVE}


def test_deny_signal_wins_over_trusted() -> None:
    outcome, signals, _ = judge("docs.readthedocs.io", port=2222)
    assert outcome is ReviewOutcome.DENY and {"trusted", "port"} <= signals
