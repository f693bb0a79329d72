"""Runtime grants: made by approvals or the control API, compiled into matchers per agent."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from proxy.decide import GrantRules
from proxy.policy.match import RuleSet, parse_pattern
from proxy.policy.model import Action, Rule, Scope
from proxy.records import Grant

CACHE_ENTRIES = 4096  # compiled (agent, session) rule sets kept at once


def grant_rule(grant: Grant) -> Rule:
    """The matcher rule for a grant; its source is the grant id."""
    parsed = parse_pattern(grant.pattern)
    return Rule(grant.pattern, grant.action, f"grant:{grant.id}", parsed.port)


class GrantIndex:
    """All live grants, with compiled rules cached per (agent, session)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.version = 0  # bumped on every change: open tunnels are re-checked when it moves
        self._clock = clock
        self._grants: dict[str, Grant] = {}
        self._cache: dict[tuple[str | None, str | None], tuple[GrantRules, ...]] = {}
        self._next_expiry: float | None = None

    def replace_persisted(self, grants: Iterable[Grant]) -> None:
        """Swap in the store's grants: it holds every scope, so every worker and replica
        enforces the same grants, and a revocation anywhere is a revocation everywhere."""
        kept = {g.id: g for g in grants}
        if kept != self._grants:
            self._grants = kept
            self._invalidate()

    def once_for(self, agent: str | None, pattern: str) -> list[Grant]:
        """One-shot passes (scope once) for this exact pattern that apply to `agent`."""
        now = self._clock()
        return [
            g
            for g in self._grants.values()
            if g.scope is Scope.ONCE
            and g.pattern == pattern
            and (g.agent is None or g.agent == agent)
            and (g.expires_at is None or g.expires_at > now)
        ]

    def add(self, grant: Grant) -> None:
        parse_pattern(grant.pattern)  # raises ValueError for a bad pattern before it is stored
        self._grants[grant.id] = grant
        self._invalidate()

    def remove(self, grant_id: str) -> Grant | None:
        grant = self._grants.pop(grant_id, None)
        if grant is not None:
            self._invalidate()
        return grant

    def all(self) -> list[Grant]:
        """Live session and always grants (one-shot passes are internal)."""
        now = self._clock()
        live = [
            g
            for g in self._grants.values()
            if g.scope is not Scope.ONCE and (g.expires_at is None or g.expires_at > now)
        ]
        return sorted(live, key=lambda g: g.created_at)

    def _invalidate(self) -> None:
        self.version += 1
        self._cache.clear()
        expiries = [g.expires_at for g in self._grants.values() if g.expires_at is not None]
        self._next_expiry = min(expiries) if expiries else None

    def rules_for(self, agent: str | None, session: str | None) -> tuple[GrantRules, ...]:
        """Compiled grant rules that apply to this agent and session (cached)."""
        if self._next_expiry is not None and self._clock() >= self._next_expiry:
            now = self._clock()
            for grant_id in [
                g.id
                for g in self._grants.values()
                if g.expires_at is not None and g.expires_at <= now
            ]:
                del self._grants[grant_id]
            self._invalidate()
        key = (agent, session)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._compile(agent, session)
            if len(self._cache) >= CACHE_ENTRIES:
                # An agent inventing a session id per request must not grow this without bound.
                self._cache.clear()
            self._cache[key] = cached
        return cached

    def _compile(self, agent: str | None, session: str | None) -> tuple[GrantRules, ...]:
        applicable = [
            g
            for g in self._grants.values()
            if g.scope is not Scope.ONCE
            and (g.agent is None or g.agent == agent)
            and (g.session is None or g.session == session)
        ]
        if not applicable:
            return ()
        allow = RuleSet.build(grant_rule(g) for g in applicable if g.action is Action.ALLOW)
        deny = RuleSet.build(grant_rule(g) for g in applicable if g.action is Action.DENY)
        return (GrantRules(allow=allow, deny=deny),)
