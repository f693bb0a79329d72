"""The state directory is 0700 and the files in it 0600, whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.agents import AgentRegistry
from proxy.control.token import TOKEN_ENV, load_or_create_token
from proxy.policy.model import Action, Scope
from proxy.records import Grant
from proxy.statedir import (
    create_private_file,
    make_private_dir,
    secure_state_dir,
    tighten_private_file,
)
from proxy.store.sqlite import SqliteStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o000, 0o022], ids=["umask000", "umask022"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under a permissive umask: modes must not depend on it."""
    value: int = request.param
    previous = os.umask(value)
    try:
        yield value
    finally:
        os.umask(previous)


@pytest.fixture
def no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def test_secure_state_dir_creates_0700_with_parents(tmp_path: Path, umask: int) -> None:
    state = tmp_path / "a" / "b" / "state"
    secure_state_dir(state)
    assert state.is_dir()
    assert mode(state) == 0o700


def test_secure_state_dir_tightens_an_existing_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    (state / "keep").write_text("x")
    secure_state_dir(state)
    assert mode(state) == 0o700
    assert (state / "keep").read_text() == "x"  # contents untouched


def test_make_private_dir_creates_0700_but_leaves_an_existing_directory(
    tmp_path: Path, umask: int
) -> None:
    new = tmp_path / "new"
    make_private_dir(new)
    assert mode(new) == 0o700
    existing = tmp_path / "existing"
    existing.mkdir()
    os.chmod(existing, 0o755)
    make_private_dir(existing)
    assert mode(existing) == 0o755


def test_private_file_is_created_0600_and_loose_ones_tightened(tmp_path: Path, umask: int) -> None:
    fresh = tmp_path / "fresh"
    create_private_file(fresh)
    assert mode(fresh) == 0o600
    loose = tmp_path / "loose"
    loose.write_text("data")
    os.chmod(loose, 0o666)
    create_private_file(loose)
    assert mode(loose) == 0o600
    assert loose.read_text() == "data"  # never truncated
    os.chmod(loose, 0o644)
    tighten_private_file(loose)
    assert mode(loose) == 0o600
    with pytest.raises(FileNotFoundError):
        tighten_private_file(tmp_path / "missing")


def test_generated_control_token_is_0600_in_a_0700_dir(
    tmp_path: Path, umask: int, no_token_env: None
) -> None:
    state = tmp_path / "state"
    token = load_or_create_token(state)
    assert mode(state) == 0o700
    path = state / "control-token"
    assert mode(path) == 0o600
    assert path.read_text().strip() == token


def test_existing_token_and_state_dir_are_tightened(tmp_path: Path, no_token_env: None) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    path = state / "control-token"
    path.write_text("old-token\n")
    os.chmod(path, 0o644)
    assert load_or_create_token(state) == "old-token"
    assert mode(state) == 0o700
    assert mode(path) == 0o600


def test_agents_file_is_0600_and_a_new_directory_0700(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "state" / "agents.yaml"
    registry = AgentRegistry(path)
    token = registry.add("bot")
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert AgentRegistry.load(path).verify("bot", token)


async def test_sqlite_database_and_wal_files_are_0600(tmp_path: Path, umask: int) -> None:
    db = tmp_path / "state" / "warden.db"
    store = await SqliteStore.open(db)
    try:
        await store.add_grant(
            Grant(
                id="g1",
                pattern="a.example.com",
                action=Action.ALLOW,
                scope=Scope.ALWAYS,
                agent=None,
                created_by="test",
                note="",
                created_at=1.0,
                expires_at=None,
                session=None,
            )
        )
        side = [db.with_name(db.name + suffix) for suffix in ("-wal", "-shm")]
        assert all(p.exists() for p in side), "WAL mode keeps -wal and -shm files while open"
        for path in (db, *side):
            assert mode(path) == 0o600, path
        assert mode(db.parent) == 0o700  # created by the store
    finally:
        await store.close()


async def test_sqlite_tightens_loose_files_left_by_an_older_version(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    db = shared / "warden.db"
    first = await SqliteStore.open(db)  # holds -wal and -shm open
    try:
        side = [db.with_name(db.name + suffix) for suffix in ("-wal", "-shm")]
        for path in (db, *side):
            os.chmod(path, 0o644)
        second = await SqliteStore.open(db)
        await second.close()
        for path in (db, *side):
            assert mode(path) == 0o600, path
    finally:
        await first.close()
    assert mode(shared) == 0o755  # an existing directory given by --store is not the store's
