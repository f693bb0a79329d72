"""Named admins: the registry file, personal tokens as control API callers, the CLI, and the
control API's Host check."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from proxy.admins import (
    AdminRegistry,
    AdminsFileError,
    PersonalTokens,
    admins_path,
    control_verifier,
)
from proxy.cli import main
from proxy.control.access import Caller, Role
from proxy.control.guard import host_allowed


def test_add_stores_a_salted_hash_in_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "admins.yaml"
    registry = AdminRegistry.load(path)
    token = registry.add("erin", Role.VIEWER)
    assert token.startswith("ewa_") and len(token) > 40
    text = path.read_text()
    assert token not in text and token[4:] not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = AdminRegistry.load(path)
    entry = again.find(token.encode())
    assert entry is not None and (entry.name, entry.role) == ("erin", Role.VIEWER)
    assert again.find(b"ewa_not-a-token") is None
    assert again.find(token[:-1].encode()) is None


def test_rotating_replaces_the_token_and_role(tmp_path: Path) -> None:
    registry = AdminRegistry(tmp_path / "admins.yaml")
    old = registry.add("erin", Role.VIEWER)
    new = registry.add("erin", Role.ADMIN)
    assert registry.find(old.encode()) is None
    entry = registry.find(new.encode())
    assert entry is not None and entry.role is Role.ADMIN
    assert len(registry) == 1


@pytest.mark.parametrize("name", ["admin", "Policy", "", "-x", "a b", "x" * 65, "é"])
def test_reserved_and_malformed_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(AdminsFileError):
        AdminRegistry(tmp_path / "admins.yaml").add(name)


@pytest.mark.parametrize(
    "body",
    [
        "version: 2\nadmins: {}\n",
        "- a list\n",
        "version: 1\nadmins: {erin: {salt: '00', hash: x}}\n",  # no role
        "version: 1\nadmins: {erin: {salt: '00', hash: x, role: root}}\n",
        "version: 1\nadmins: {erin: {salt: zz, hash: x, role: viewer}}\n",
        "version: 1\nadmins: {'a b': {salt: '00', hash: x, role: viewer}}\n",
    ],
)
def test_a_bad_file_is_refused_with_its_name(tmp_path: Path, body: str) -> None:
    path = tmp_path / "admins.yaml"
    path.write_text(body)
    with pytest.raises(AdminsFileError, match=r"admins\.yaml"):
        AdminRegistry.load(path)


def test_personal_tokens_follow_the_file(tmp_path: Path) -> None:
    path = tmp_path / "admins.yaml"
    verify = PersonalTokens(path)
    assert verify(b"anything", None) is None  # no file: nobody
    token = AdminRegistry.load(path).add("erin", Role.APPROVER)
    # The approver header does not rename a named admin.
    assert verify(token.encode(), "mallory") == Caller("erin", Role.APPROVER)
    AdminRegistry.load(path).revoke("erin")
    assert verify(token.encode(), None) is None
    other = AdminRegistry.load(path).add("frank", Role.VIEWER)
    assert verify(other.encode(), None) == Caller("frank", Role.VIEWER)
    path.write_text("version: [broken\n")  # a bad edit keeps the last good registry
    assert verify(other.encode(), None) == Caller("frank", Role.VIEWER)


def test_control_verifier_knows_the_bootstrap_token_and_personal_ones(tmp_path: Path) -> None:
    bootstrap = "b" * 40
    personal = AdminRegistry.load(admins_path(tmp_path)).add("erin", Role.VIEWER)
    verify = control_verifier(bootstrap, tmp_path)
    assert verify(bootstrap.encode(), None) == Caller("admin", Role.ADMIN)
    assert verify(bootstrap.encode(), "dana") == Caller("dana", Role.ADMIN)
    assert verify(personal.encode(), None) == Caller("erin", Role.VIEWER)
    assert verify(b"b" * 39, None) is None


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out) if "--json" in argv else out


def test_admins_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = str(tmp_path / "state")
    code, added = _cli(
        capsys, "admins", "add", "erin", "--role", "viewer", "--state-dir", state, "--json"
    )
    assert code == 0 and added["role"] == "viewer"
    code, _ = _cli(capsys, "admins", "add", "gus", "--state-dir", state)  # default: approver
    assert code == 0
    code, listing = _cli(capsys, "admins", "list", "--state-dir", state, "--json")
    assert [(a["name"], a["role"]) for a in listing] == [("erin", "viewer"), ("gus", "approver")]
    assert "token" not in json.dumps(listing)
    verify = PersonalTokens(admins_path(Path(state)))
    assert verify(added["token"].encode(), None) == Caller("erin", Role.VIEWER)
    code, text = _cli(capsys, "admins", "revoke", "erin", "--state-dir", state)
    assert code == 0 and "revoked" in text
    assert verify(added["token"].encode(), None) is None
    assert main(["admins", "revoke", "erin", "--state-dir", state]) == 1
    assert main(["admins", "add", "admin", "--state-dir", state]) == 2
    assert stat.S_IMODE(os.stat(admins_path(Path(state))).st_mode) == 0o600


def _scope(host: bytes | None, server: tuple[str, int | None] = ("127.0.0.1", 8081)) -> Any:
    headers = [(b"host", host)] if host is not None else []
    return {"type": "http", "scheme": "http", "server": server, "headers": headers}


@pytest.mark.parametrize(
    ("host", "server", "names", "allowed"),
    [
        (b"127.0.0.1:8081", ("127.0.0.1", 8081), (), True),
        (b"LOCALHOST:8081", ("127.0.0.1", 8081), (), True),
        (b"[::1]:8081", ("::1", 8081), (), True),
        (b"10.0.0.5:8081", ("10.0.0.5", 8081), (), True),  # the address it arrived on
        (b"console.example:8081", ("127.0.0.1", 8081), ("console.example",), True),
        (b"console.example", ("127.0.0.1", 8081), ("Console.Example",), True),
        (b"console.example:9999", ("127.0.0.1", 8081), ("console.example:9999",), True),
        (b"127.0.0.1", ("127.0.0.1", 80), (), True),
        (b"127.0.0.1", ("127.0.0.1", 8081), (), True),  # a page cannot send it to this port
        (b"localhost", ("127.0.0.1", 8081), (), True),
        (b"127.0.0.1:8081", ("control.test", None), (), False),
        (b"control.test", ("control.test", None), (), True),
        (b"127.0.0.1:9999", ("127.0.0.1", 8081), (), False),
        (b"attacker.example:8081", ("127.0.0.1", 8081), ("console.example",), False),
        (b"localhost.attacker.example:8081", ("127.0.0.1", 8081), (), False),
        (b"", ("127.0.0.1", 8081), (), False),
        (None, ("127.0.0.1", 8081), (), True),  # no browser omits Host
    ],
)
def test_host_allowed(
    host: bytes | None, server: tuple[str, int], names: tuple[str, ...], allowed: bool
) -> None:
    assert host_allowed(_scope(host, server), names) is allowed


def test_two_host_headers_are_refused() -> None:
    scope = _scope(b"127.0.0.1:8081")
    scope["headers"].append((b"host", b"127.0.0.1:8081"))
    assert not host_allowed(scope, ())
