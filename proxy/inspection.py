"""Method and path rules for hosts under `inspect:` (TLS-intercepted), as a pure function."""

from __future__ import annotations

from fnmatch import fnmatchcase

from proxy.policy.model import InspectRule
from proxy.verdicts import Decision, Reason, Verdict


def decide_inspected(rule: InspectRule, method: str, path: str) -> Decision:
    """Allow unless the method is not listed or the path matches a `deny_paths` glob."""
    path_only = path.partition("?")[0] or "/"
    if rule.methods is not None and method.upper() not in rule.methods:
        allowed = ", ".join(sorted(rule.methods))
        return Decision(
            Verdict.DENY,
            Reason.METHOD,
            rule.host,
            rule.source,
            f"method {method} not allowed on {rule.host} (allowed: {allowed})",
        )
    for pattern in rule.deny_paths:
        if fnmatchcase(path_only, pattern):
            return Decision(
                Verdict.DENY, Reason.DENY_RULE, pattern, rule.source, f"path denied by {pattern!r}"
            )
    return Decision(
        Verdict.ALLOW, Reason.ALLOW_RULE, rule.host, rule.source, "allowed by inspect rule"
    )
