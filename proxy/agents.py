"""The agents registry: agent id -> salted token hash, in a YAML file the admin manages.

Tokens are 256-bit random values, so a salted SHA-256 is enough (no password stretching is
needed for secrets that cannot be guessed) and verification stays cheap on the request path.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from proxy.registryfile import read_section, write_section

AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


_DUMMY_SALT = secrets.token_hex(16)
_DUMMY_HASH = hashlib.sha256(b"no such agent").hexdigest()


class AgentsFileError(Exception):
    """The agents file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class AgentEntry:
    agent: str
    salt: str  # hex
    hash: str  # hex sha256(salt bytes + token)
    created_at: str


def _digest(salt: str, token: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + token.encode()).hexdigest()


class AgentRegistry:
    """Known agents and their token hashes; `verify` is constant-time per agent."""

    def __init__(self, path: Path | None, entries: dict[str, AgentEntry] | None = None) -> None:
        self.path = path
        self._entries = dict(entries or {})

    @classmethod
    def load(cls, path: Path) -> AgentRegistry:
        """Read `path`; a missing file is an empty registry."""
        raw = read_section(path, "agents", "agents", AgentsFileError)
        entries: dict[str, AgentEntry] = {}
        for agent, entry in raw.items():
            if not isinstance(agent, str) or not AGENT_ID.fullmatch(agent):
                raise AgentsFileError(f"{path}: invalid agent id {agent!r}")
            if not isinstance(entry, dict) or not {"salt", "hash"} <= entry.keys():
                raise AgentsFileError(f"{path}: agent {agent!r} needs 'salt' and 'hash'")
            entries[agent] = AgentEntry(
                agent, str(entry["salt"]), str(entry["hash"]), str(entry.get("created_at", ""))
            )
        return cls(path, entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, agent: object) -> bool:
        return agent in self._entries

    def entries(self) -> list[AgentEntry]:
        return sorted(self._entries.values(), key=lambda e: e.agent)

    def verify(self, agent: str, token: str) -> bool:
        entry = self._entries.get(agent)
        if entry is None:
            # Hash anyway: an unknown id must cost what a wrong token costs, or timing tells
            # a prober which ids exist.
            hmac.compare_digest(_digest(_DUMMY_SALT, token), _DUMMY_HASH)
            return False
        return hmac.compare_digest(_digest(entry.salt, token), entry.hash)

    def add(self, agent: str) -> str:
        """Create (or rotate) `agent`'s token; returns the token, which is never stored."""
        if not AGENT_ID.fullmatch(agent):
            raise AgentsFileError(
                f"invalid agent id {agent!r}: letters, digits, '.', '_', '@', '-' (max 128)"
            )
        token = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._entries[agent] = AgentEntry(agent, salt, _digest(salt, token), now)
        self.save()
        return token

    def revoke(self, agent: str) -> bool:
        if self._entries.pop(agent, None) is None:
            return False
        self.save()
        return True

    def save(self) -> None:
        """Write atomically (temp file + rename), mode 0600."""
        if self.path is None:
            raise AgentsFileError("no agents file configured")
        write_section(
            self.path,
            "agents",
            {
                e.agent: {"salt": e.salt, "hash": e.hash, "created_at": e.created_at}
                for e in self.entries()
            },
            "egress-warden agents: managed with `egress-warden agents`",
        )
