"""The built-in rule reviewer: documented signals, no network (never a DNS query).

Signals and what each argues for (every one configurable; see docs/auto-review.md):
- deny: `ip_literal`, `port` (not a standard port), `category:<name>` (a category the policy
  lists: paste sites, file drops, tunnels), `lookalike` (the confusable skeleton of the name, or
  of one of its parent domains, equals an allowed or trusted host it is not), `encoded_label`
  (a label that looks like encoded data: hex, base32, high entropy; or too many labels),
  `risky_tld` (a TLD the organisation lists);
- escalate: `mixed_script` (a label mixing scripts), `long_label`, `rate` (the agent asked for
  too many new destinations in the window: an approval becomes an escalation);
- approve: `trusted` (a trusted pattern matched and no deny signal fired).
A name under a trusted pattern is not checked for encoded labels: CDN and storage hosts carry
hashes in their labels (the main false-positive source), and a trusted zone's name servers are
not the agent's to read.
"""

from __future__ import annotations

import contextlib
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from functools import lru_cache

import idna

from proxy.hosts import Host
from proxy.policy.match import PatternKind, RuleSet, parse_pattern
from proxy.policy.model import Action, Rule, RulesReviewerSection
from proxy.review.chain import RateWindow, Review, ReviewOutcome, ReviewRequest, Signal, now

_HEX = re.compile(r"[0-9a-f]+")
_BASE32 = re.compile(r"[a-z2-7]+")
_ENTROPY_MIN_LENGTH = 16


def _prototype(char: str) -> str:
    """The character `char` is confused with, as one ASCII letter or digit when the Unicode
    confusables table (via confusable-homoglyphs) has one; otherwise `char` itself."""
    # Imported when a rules reviewer first looks at a name (~40 ms and its tables), not at start.
    from confusable_homoglyphs import confusables  # type: ignore[import-untyped]

    candidates = {char} if char.isascii() else set()
    for glyph in confusables.confusables_data.get(char, ()):
        text = glyph["c"].strip("\u200e")
        if len(text) == 1 and text.isascii() and (text.islower() or text.isdigit()):
            candidates.add(text)
    if not candidates:
        folded = unicodedata.normalize("NFKC", char).lower()
        return folded if folded.isascii() else char
    return min(candidates)


@lru_cache(maxsize=4096)
def _prototype_cached(char: str) -> str:
    return _prototype(char)


def unicode_name(name: str) -> str:
    """A punycode host name as people read it (labels that do not decode stay as they are)."""
    labels = []
    for label in name.split("."):
        if label.startswith("xn--"):
            try:
                label = idna.decode(label)
            except idna.IDNAError:
                with contextlib.suppress(UnicodeError):
                    label = label.encode("ascii").decode("idna")
        labels.append(label)
    return ".".join(labels)


def skeleton(name: str) -> str:
    """The confusable skeleton of a host name (punycode or Unicode): two names that look the
    same have the same skeleton."""
    return "".join(_prototype_cached(c) for c in unicode_name(name).lower())


def entropy(text: str) -> float:
    """Shannon entropy of `text`'s characters, in bits per character."""
    if not text:
        return 0.0
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def known_hosts(rules: Iterable[Rule], trusted: Iterable[str]) -> tuple[str, ...]:
    """The host names a lookalike could imitate: the fixed part of every name pattern allowed
    by the policy or trusted by the reviewer (exact names and wildcard bases)."""
    names: list[str] = []
    for pattern in [*(r.pattern for r in rules), *trusted]:
        try:
            parsed = parse_pattern(pattern)
        except ValueError:
            continue
        if parsed.kind in (PatternKind.ADDRESS, PatternKind.GLOB):
            continue
        names.append(".".join(reversed(parsed.labels)))
    return tuple(dict.fromkeys(names))


class RulesReviewer:
    """Approves trusted destinations, denies the clearly risky, escalates the rest."""

    name = "rules"

    def __init__(
        self,
        settings: RulesReviewerSection,
        known: Iterable[str] = (),
        rate: RateWindow | None = None,
        clock: Callable[[], float] = now,
    ) -> None:
        self.settings = settings
        self._trusted = RuleSet.build(
            Rule(p, Action.ALLOW, f"review.trusted[{i}]") for i, p in enumerate(settings.trusted)
        )
        self._categories = {
            category: RuleSet.build(
                Rule(p, Action.DENY, f"review.categories.{category}") for p in patterns
            )
            for category, patterns in settings.categories.items()
        }
        self._risky_tlds = frozenset(_tld(t) for t in settings.risky_tlds)
        names = tuple(dict.fromkeys([*known, *known_hosts((), settings.trusted)]))
        self._known: dict[str, str] = {skeleton(n): n for n in names}
        self._rate = rate or RateWindow()
        self._clock = clock

    async def review(self, request: ReviewRequest) -> Review:
        return self.judge(request)

    def judge(self, request: ReviewRequest) -> Review:
        """The rule review of one request (pure but for the rate window)."""
        signals = self.signals(request.host, request.port)
        trusted = [s for s in signals if s.effect is ReviewOutcome.APPROVE]
        denies = [s for s in signals if s.effect is ReviewOutcome.DENY]
        rate = self._rate_signal(request)
        if rate is not None:
            signals.append(rate)
        if denies:
            rationale = "; ".join(f"{s.name}: {s.detail}" for s in denies)
            return Review(self.name, ReviewOutcome.DENY, rationale, tuple(signals))
        escalations = [s for s in signals if s.effect is ReviewOutcome.ESCALATE]
        if escalations:
            rationale = "; ".join(f"{s.name}: {s.detail}" for s in escalations)
            return Review(self.name, ReviewOutcome.ESCALATE, rationale, tuple(signals))
        if trusted:
            return Review(self.name, ReviewOutcome.APPROVE, trusted[0].detail, tuple(signals))
        if self.settings.otherwise == "approve":
            rationale = "no risk signal (review.otherwise: approve)"
            return Review(self.name, ReviewOutcome.APPROVE, rationale, tuple(signals))
        rationale = "not trusted and no risk signal: left to the next reviewer"
        return Review(self.name, ReviewOutcome.ESCALATE, rationale, tuple(signals))

    def signals(self, host: Host, port: int) -> list[Signal]:
        """Every static signal for host:port (the rate signal is separate: it has state)."""
        s = self.settings
        found: list[Signal] = []
        if host.ip is not None:
            if s.deny_ip_literals:
                found.append(
                    Signal("ip_literal", f"{host.name} is an IP address", ReviewOutcome.DENY)
                )
            return found + self._port_signals(port)
        found += self._port_signals(port)
        for category, rules in self._categories.items():
            rule = rules.match(host, port)
            if rule is not None:
                detail = f"{host.name} is a listed {category} service ({rule.pattern!r})"
                found.append(Signal(f"category:{category}", detail, ReviewOutcome.DENY))
        trusted = self._trusted.match(host, port)
        if s.lookalikes:
            found += self._lookalike_signals(host)
        if trusted is None:
            found += self._encoded_signals(host)
        tld = host.labels[0]
        if tld in self._risky_tlds:
            found.append(Signal("risky_tld", f".{tld} is listed as risky", ReviewOutcome.DENY))
        if trusted is not None:
            detail = f"trusted pattern {trusted.pattern!r}"
            found.append(Signal("trusted", detail, ReviewOutcome.APPROVE))
        return found

    def _port_signals(self, port: int) -> list[Signal]:
        ports = self.settings.standard_ports
        if not self.settings.deny_other_ports or port in ports:
            return []
        listed = ", ".join(str(p) for p in ports)
        return [
            Signal("port", f"port {port} is not a standard port ({listed})", ReviewOutcome.DENY)
        ]

    def _lookalike_signals(self, host: Host) -> list[Signal]:
        found: list[Signal] = []
        labels = host.name.split(".")
        readable = unicode_name(host.name)
        for k in range(2, len(labels) + 1):
            suffix = ".".join(labels[-k:])
            imitated = self._known.get(skeleton(suffix))
            if imitated is not None and imitated != suffix:
                detail = f"{readable!r} looks like {imitated!r} (same confusable skeleton)"
                found.append(Signal("lookalike", detail, ReviewOutcome.DENY))
                break
        for label in labels:
            if not label.startswith("xn--"):
                continue
            text = unicode_name(label)
            from confusable_homoglyphs import confusables

            if confusables.is_mixed_script(text):
                detail = f"label {text!r} mixes scripts"
                found.append(Signal("mixed_script", detail, ReviewOutcome.ESCALATE))
                break
        return found

    def _encoded_signals(self, host: Host) -> list[Signal]:
        e = self.settings.encoded
        if not e.enabled:
            return []
        found: list[Signal] = []
        labels = host.name.split(".")
        if len(labels) > e.max_labels:
            detail = f"{len(labels)} labels (more than {e.max_labels})"
            found.append(Signal("encoded_label", detail, ReviewOutcome.DENY))
        for label in labels[:-1]:  # the TLD carries no data
            why = self._encoded_label(label)
            if why is not None:
                shown = label if len(label) <= 24 else label[:20] + "…"
                found.append(Signal("encoded_label", f"{shown!r}: {why}", ReviewOutcome.DENY))
                break
        else:
            long = [label for label in labels if len(label) > e.max_label]
            if long:
                detail = f"a label of {len(long[0])} characters (more than {e.max_label})"
                found.append(Signal("long_label", detail, ReviewOutcome.ESCALATE))
        return found

    def _encoded_label(self, label: str) -> str | None:
        """Why `label` looks like encoded data, or None."""
        e = self.settings.encoded
        n = len(label)
        has_digit = any(c.isdigit() for c in label)
        has_alpha = any(c.isalpha() for c in label)
        if n >= e.hex_min and _HEX.fullmatch(label) and has_digit and has_alpha:
            return f"{n} hex characters"
        bits = entropy(label)
        if n >= e.base32_min and _BASE32.fullmatch(label) and has_digit:
            return f"{n} base32 characters, entropy {bits:.1f} bits/char"
        if n >= _ENTROPY_MIN_LENGTH and has_digit and has_alpha and bits >= e.min_entropy:
            digits = sum(c.isdigit() for c in label)
            if digits >= 3:
                return f"{n} characters, entropy {bits:.1f} bits/char, {digits} digits"
        if n > e.max_label and bits >= e.min_entropy + 0.5:
            return f"{n} characters, entropy {bits:.1f} bits/char"
        return None

    def _rate_signal(self, request: ReviewRequest) -> Signal | None:
        rate = self.settings.rate
        if not rate.enabled:
            return None
        count = self._rate.touch(
            request.agent, f"{request.host.name}:{request.port}", rate.window, self._clock()
        )
        if count <= rate.max_new:
            return None
        who = f"agent {request.agent!r}" if request.agent is not None else "anonymous callers"
        detail = (
            f"{who} asked for {count} new destinations within {rate.window:g}s "
            f"(more than {rate.max_new})"
        )
        return Signal("rate", detail, ReviewOutcome.ESCALATE)


def _tld(text: str) -> str:
    text = text.strip().lower().removeprefix("*.").removeprefix(".")
    if text.isascii():
        return text
    try:
        return idna.encode(text, uts46=True).decode("ascii")
    except idna.IDNAError:
        return text
