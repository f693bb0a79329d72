"""The admins registry: named control API users with a role and a personal token, in
`<state>/admins.yaml` (0600), managed with `egress-warden admins`.

Shaped like the agents registry (proxy/agents.py): tokens are 256-bit random values stored as a
salted SHA-256, never in clear. The control API finds a caller by trying every entry (admins
are few): the work is the same whichever entry, if any, holds the token, so timing tells a
prober nothing. The proxy re-reads the file when it changes, so `admins add` and `revoke` take
effect without a restart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from proxy.control.access import BootstrapToken, Caller, Role, TokenVerifier, first_of
from proxy.registryfile import read_section, write_section

ADMIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
# Names the proxy records itself, or the bootstrap token's default name: not for a person.
RESERVED_NAMES = frozenset({"policy", "auto", "webhook", "human", "unknown", "system", "admin"})
ADMINS_FILE = "admins.yaml"
TOKEN_PREFIX = "ewa_"  # tells a personal control token from an agent token at a glance


class AdminsFileError(Exception):
    """The admins file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class AdminEntry:
    name: str
    role: Role
    salt: str  # hex
    hash: str  # hex sha256(salt bytes + token)
    created_at: str


def _digest(salt: str, token: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + token).hexdigest()


def admins_path(state_dir: Path) -> Path:
    return Path(state_dir) / ADMINS_FILE


class AdminRegistry:
    """Named admins, their roles and token hashes."""

    def __init__(self, path: Path | None, entries: dict[str, AdminEntry] | None = None) -> None:
        self.path = path
        self._entries = dict(entries or {})

    @classmethod
    def load(cls, path: Path) -> AdminRegistry:
        """Read `path`; a missing file is an empty registry."""
        raw = read_section(path, "admins", "admins", AdminsFileError)
        entries: dict[str, AdminEntry] = {}
        for name, entry in raw.items():
            if not isinstance(name, str) or not ADMIN_NAME.fullmatch(name):
                raise AdminsFileError(f"{path}: invalid admin name {name!r}")
            if not isinstance(entry, dict) or not {"salt", "hash", "role"} <= entry.keys():
                raise AdminsFileError(f"{path}: admin {name!r} needs 'role', 'salt' and 'hash'")
            try:
                role = Role(str(entry["role"]))
                bytes.fromhex(str(entry["salt"]))
            except ValueError as exc:
                raise AdminsFileError(f"{path}: admin {name!r}: {exc}") from exc
            entries[name] = AdminEntry(
                name, role, str(entry["salt"]), str(entry["hash"]), str(entry.get("created_at", ""))
            )
        return cls(path, entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entries(self) -> list[AdminEntry]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    def find(self, token: bytes) -> AdminEntry | None:
        """The entry whose token this is; every entry is hashed and compared, match or not."""
        found: AdminEntry | None = None
        for entry in self._entries.values():
            if hmac.compare_digest(_digest(entry.salt, token), entry.hash) and found is None:
                found = entry
        return found

    def add(self, name: str, role: Role = Role.APPROVER) -> str:
        """Create `name` (or rotate its token and set its role); returns the token, which is
        never stored."""
        if not ADMIN_NAME.fullmatch(name) or name.lower() in RESERVED_NAMES:
            raise AdminsFileError(
                f"invalid admin name {name!r}: letters, digits, '.', '_', '@', '+', '-' "
                f"(max 64), not one of {', '.join(sorted(RESERVED_NAMES))}"
            )
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._entries[name] = AdminEntry(name, role, salt, _digest(salt, token.encode()), now)
        self.save()
        return token

    def revoke(self, name: str) -> bool:
        if self._entries.pop(name, None) is None:
            return False
        self.save()
        return True

    def save(self) -> None:
        """Write atomically (temp file + rename), mode 0600."""
        if self.path is None:
            raise AdminsFileError("no admins file configured")
        write_section(
            self.path,
            "admins",
            {
                e.name: {
                    "role": e.role.value,
                    "salt": e.salt,
                    "hash": e.hash,
                    "created_at": e.created_at,
                }
                for e in self.entries()
            },
            "egress-warden admins: managed with `egress-warden admins`",
        )


class PersonalTokens:
    """A control API `TokenVerifier` over the admins file: the caller is the entry's name and
    role (the approver header is ignored: a named admin is who their token says).

    The file is re-read when its modification time, size or inode changes; a file that became
    unreadable or invalid keeps the last good registry (and a missing one is empty)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._registry = AdminRegistry(path)
        self._refresh()

    def _refresh(self) -> None:
        try:
            info = self.path.stat()
        except OSError:
            self._stamp, self._registry = None, AdminRegistry(self.path)
            return
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamp == self._stamp:
            return
        try:
            self._registry = AdminRegistry.load(self.path)
        except AdminsFileError:
            return  # keep the last good registry; the stamp stays old so it is tried again
        self._stamp = stamp

    def __call__(self, presented: bytes, label: str | None) -> Caller | None:
        self._refresh()
        entry = self._registry.find(presented)
        return Caller(entry.name, entry.role) if entry is not None else None


def control_verifier(token: str, state_dir: Path) -> TokenVerifier:
    """The control API's callers: the bootstrap `token` (role admin) or a personal token from
    `<state>/admins.yaml`."""
    return first_of(BootstrapToken(token), PersonalTokens(admins_path(state_dir)))
