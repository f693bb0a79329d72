"""A starting policy from the decision audit (`egress-warden policy suggest`), for a human to
review: the destinations the recorded traffic reached, as few rules as stay tight.

- What was let through (allowed by a rule, approved, or passed by audit mode) becomes an
  allow rule; a port other than 80/443 is kept in the rule (`host:port`).
- Three or more sibling names under one parent, on the same port, become `*.parent`
  (`**.parent` when the parent itself was reached too) unless a refused or held name lies
  under that parent: grouping must never sweep in what the audit shows was kept out.
- Destinations a deny rule refused (or would have, in audit mode) are listed under `deny`.
- Held requests nobody approved are listed as comments: wanted, maybe, but never allowed.
Each rule carries a comment: how many requests it covers and its first and last use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from proxy.hosts import Host, InvalidHost, canonicalize_host
from proxy.records import DecisionRecord
from proxy.verdicts import Reason

STANDARD_PORTS = frozenset({80, 443})
MIN_SIBLINGS = 3  # fewer siblings than this are listed one by one

# Refusals that say nothing about what the policy should allow: the request itself was bad, or a
# guard (private network, the proxy itself, authentication) refused it whatever the rules say.
_GUARD_REASONS = frozenset(
    {
        Reason.INVALID_HOST,
        Reason.INVALID_REQUEST,
        Reason.INVALID_METHOD,
        Reason.HOST_MISMATCH,
        Reason.PRIVATE_NETWORK,
        Reason.AUTH_REQUIRED,
        Reason.DNS_FAILURE,
        Reason.REVOKED,
        Reason.METHOD,
    }
)


@dataclass(slots=True)
class Usage:
    """How often a destination (or a rule covering several) was used, and when."""

    count: int = 0
    first: float = float("inf")
    last: float = float("-inf")
    hosts: set[str] = field(default_factory=set)

    def add(self, at: float, host: str, count: int = 1) -> None:
        self.count += count
        self.first = min(self.first, at)
        self.last = max(self.last, at)
        self.hosts.add(host)

    def merge(self, other: Usage) -> None:
        self.count += other.count
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)
        self.hosts |= other.hosts


@dataclass(frozen=True, slots=True)
class SuggestedRule:
    pattern: str
    usage: Usage
    note: str = ""  # e.g. the rule that refused it


@dataclass(frozen=True, slots=True)
class Suggestion:
    allow: tuple[SuggestedRule, ...]
    deny: tuple[SuggestedRule, ...]
    held: tuple[SuggestedRule, ...]  # held and never approved: listed for review, not allowed
    decisions: int  # audit rows read
    first: float | None
    last: float | None


def _host(text: str) -> Host | None:
    try:
        return canonicalize_host(text)
    except InvalidHost:
        return None


def _key_port(port: int) -> int | None:
    """The port a rule must name: None for the standard ports any plain rule allows."""
    return None if port in STANDARD_PORTS else port


def _with_port(host: Host, port: int | None) -> str:
    if port is None:
        return host.name
    if host.ip is not None and host.ip.version == 6:
        return f"[{host.name}]:{port}"
    return f"{host.name}:{port}"


def _refused_by_deny_rule(row: DecisionRecord) -> bool:
    if row.decision == "deny":
        return row.reason == Reason.DENY_RULE
    # Audit mode lets a refusal through as `would_deny`; a deny rule's names its rule.
    return row.reason == Reason.WOULD_DENY and row.rule is not None


def _passed(row: DecisionRecord) -> bool:
    return row.decision == "allow" and not _refused_by_deny_rule(row)


def _under(name: str, parent: str) -> bool:
    return name.endswith("." + parent)


def suggest(rows: Iterable[DecisionRecord]) -> Suggestion:
    """The minimal policy the recorded decisions call for (see the module docstring)."""
    allowed: dict[tuple[Host, int | None], Usage] = {}
    denied: dict[tuple[Host, int | None], Usage] = {}
    deny_rules: dict[tuple[Host, int | None], str] = {}
    held: dict[tuple[Host, int | None], Usage] = {}
    refused_names: set[str] = set()  # refused or held names: never swept into a group
    total = 0
    first: float | None = None
    last: float | None = None
    for row in rows:
        total += 1
        first = row.at if first is None else min(first, row.at)
        last = row.at if last is None else max(last, row.at)
        host = _host(row.host)
        if host is None:
            continue
        key = (host, _key_port(row.port))
        if _passed(row):
            allowed.setdefault(key, Usage()).add(row.at, host.name)
        elif _refused_by_deny_rule(row):
            denied.setdefault(key, Usage()).add(row.at, host.name)
            deny_rules.setdefault(key, row.rule or "")
            refused_names.add(host.name)
        elif row.decision == "hold" or row.reason in (
            Reason.APPROVAL_PENDING,
            Reason.APPROVAL_DENIED,
            Reason.APPROVAL_LIMIT,
            Reason.APPROVAL_UNAVAILABLE,
        ):
            if row.decision == "hold":  # count the request once: its later answer repeats it
                held.setdefault(key, Usage()).add(row.at, host.name)
            refused_names.add(host.name)
        elif row.reason not in _GUARD_REASONS:
            # default_deny, port, ...: refused, but no rule said so; kept out of groups.
            refused_names.add(host.name)
    allowed_names = {host.name for host, _ in allowed}
    refused_names -= allowed_names
    held = {k: v for k, v in held.items() if k not in allowed}
    return Suggestion(
        allow=tuple(_group(allowed, refused_names)),
        deny=tuple(
            SuggestedRule(_with_port(*key), usage, f"refused by rule '{deny_rules[key]}'")
            for key, usage in sorted(denied.items(), key=lambda kv: _sort_key(kv[0]))
            if key not in allowed
        ),
        held=tuple(
            SuggestedRule(_with_port(*key), usage)
            for key, usage in sorted(held.items(), key=lambda kv: _sort_key(kv[0]))
        ),
        decisions=total,
        first=first,
        last=last,
    )


def _sort_key(key: tuple[Host, int | None]) -> tuple[int, tuple[str, ...], int]:
    host, port = key
    return (0 if host.ip is None else 1, host.labels or (host.name,), port or 0)


def _group(allowed: dict[tuple[Host, int | None], Usage], refused: set[str]) -> list[SuggestedRule]:
    """Exact rules, with sibling names folded into wildcards where that stays tight."""
    remaining = dict(allowed)
    groups: dict[str, tuple[str, int | None, Usage]] = {}  # pattern -> (parent, port, usage)
    names = [(h, p) for h, p in allowed if h.ip is None]
    parents = {(h.name.split(".", 1)[1], p) for h, p in names if h.name.count(".") >= 2}
    # Deepest parents first, so `*.a.example.com` forms before `example.com` is considered.
    for parent, port in sorted(parents, key=lambda pp: (-pp[0].count("."), pp[0], pp[1] or 0)):
        siblings = [
            (h, p)
            for (h, p) in remaining
            if p == port and h.ip is None and h.name.split(".", 1)[-1] == parent
        ]
        if len({h.name for h, _ in siblings}) < MIN_SIBLINGS:
            continue
        if any(_under(name, parent) or name == parent for name in refused):
            continue  # a wildcard here would let through what was kept out
        apex = next(((h, p) for (h, p) in remaining if h.name == parent and p == port), None)
        usage = Usage()
        covered = [
            key
            for key in remaining
            if key[1] == port and key[0].ip is None and _under(key[0].name, parent)
        ]
        if apex is not None:
            covered.append(apex)
        for key in covered:
            usage.merge(remaining.pop(key))
        # A group formed deeper under this parent is covered by the wider one: fold it in.
        for pattern, (inner, inner_port, inner_usage) in list(groups.items()):
            if inner_port == port and _under(inner, parent):
                usage.merge(inner_usage)
                del groups[pattern]
        wildcard = ("**." if apex is not None else "*.") + parent
        groups[wildcard if port is None else f"{wildcard}:{port}"] = (parent, port, usage)
    rules = [SuggestedRule(pattern, usage) for pattern, (_, _, usage) in groups.items()]
    rules += [SuggestedRule(_with_port(*key), usage) for key, usage in remaining.items()]
    return sorted(rules, key=_rule_order)


def _rule_order(rule: SuggestedRule) -> tuple[int, tuple[str, ...]]:
    base = rule.pattern.lstrip("*.").rsplit(":", 1)[0] if "]" not in rule.pattern else rule.pattern
    host = _host(base)
    if host is None or host.ip is not None:
        return (1, (rule.pattern,))
    return (0, (*host.labels, rule.pattern))


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _comment(rule: SuggestedRule) -> str:
    usage = rule.usage
    noun = "request" if usage.count == 1 else "requests"
    text = f"{usage.count} {noun}, first {_when(usage.first)}, last {_when(usage.last)}"
    hosts = sorted(usage.hosts)
    if len(hosts) > 1 or (hosts and not rule.pattern.startswith(hosts[0])):
        shown = ", ".join(hosts[:5]) + (f" and {len(hosts) - 5} more" if len(hosts) > 5 else "")
        text += f"; seen: {shown}"
    if rule.note:
        text += f"; {rule.note}"
    return text


def render_policy(
    suggestion: Suggestion,
    *,
    since: str | None = None,
    agent: str | None = None,
    source: str = "the decision audit",
) -> str:
    """The suggestion as a policy file (YAML with comments) for a human to review."""
    scope = []
    if agent:
        scope.append(f"agent {agent}")
    if since:
        scope.append(f"the last {since}")
    window = ""
    if suggestion.first is not None and suggestion.last is not None:
        window = f", {_when(suggestion.first)} to {_when(suggestion.last)}"
    lines = [
        "# Suggested by `egress-warden policy suggest` from "
        f"{suggestion.decisions} decisions in {source}"
        + (f" ({', '.join(scope)})" if scope else "")
        + window
        + ".",
        "# Review every rule before you use it: it allows what the recorded traffic reached,",
        "# nothing more; wildcards stand for 3 or more sibling names. Check it with",
        "# `egress-warden policy validate FILE` and `egress-warden check URL --policy FILE`.",
        "version: 1",
        "mode: enforce",
        "default: ask",
    ]
    lines.append("allow:" if suggestion.allow else "allow: []")
    lines += [f"  - {json.dumps(r.pattern)}  # {_comment(r)}" for r in suggestion.allow]
    if suggestion.deny:
        lines.append("deny:")
        lines += [f"  - {json.dumps(r.pattern)}  # {_comment(r)}" for r in suggestion.deny]
    if suggestion.held:
        lines.append("# Held for approval and never approved (not allowed above):")
        lines += [f"#  - {json.dumps(r.pattern)}  # {_comment(r)}" for r in suggestion.held]
    return "\n".join(lines) + "\n"


def records_from_json(items: Sequence[dict[str, object]]) -> list[DecisionRecord]:
    """Decision rows as `GET /v1/decisions` returns them, back into records."""
    names = DecisionRecord.__dataclass_fields__
    return [DecisionRecord(**{k: v for k, v in item.items() if k in names}) for item in items]  # type: ignore[arg-type]
