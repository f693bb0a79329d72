"""State store: runtime grants, pending items, approval history and the decision audit."""

from __future__ import annotations

from pathlib import Path

from proxy.store.base import (
    CHANNEL_GRANTS,
    CHANNEL_PENDING,
    CHANNEL_RESOLVED,
    CHANNELS,
    RESYNC_PAYLOAD,
    NotifyCallback,
    Store,
    StoreError,
)

__all__ = [
    "CHANNELS",
    "CHANNEL_GRANTS",
    "CHANNEL_PENDING",
    "CHANNEL_RESOLVED",
    "RESYNC_PAYLOAD",
    "NotifyCallback",
    "Store",
    "StoreError",
    "open_store",
    "sqlite_path",
]

_HINT = "use sqlite:///absolute/path.db, sqlite:relative/path.db or postgresql://..."


def sqlite_path(url: str) -> Path:
    """The file path in a `sqlite:` URL: sqlite:///abs/x.db -> /abs/x.db, sqlite:x.db -> x.db."""
    if not url.startswith("sqlite:"):
        raise StoreError(f"not a sqlite store URL; {_HINT}")
    rest = url.removeprefix("sqlite:")
    if rest.startswith("//"):
        rest = rest[2:]  # sqlite:///abs -> /abs ; sqlite://rel.db -> rel.db
    if not rest:
        raise StoreError(f"--store {url!r} names no database file; {_HINT}")
    return Path(rest).expanduser()


async def open_store(url: str) -> Store:
    """Open the store a `--store` URL names, creating and migrating it as needed."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        from proxy.store.sqlite import SqliteStore

        return await SqliteStore.open(sqlite_path(url))
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        from proxy.store.postgres import PostgresStore

        # asyncpg knows postgresql:// and postgres:// only; accept SQLAlchemy-style
        # postgresql+driver:// URLs too, since people copy them from other tools.
        return await PostgresStore.open("postgresql:" + url.split(":", 1)[1])
    # Never echo the whole URL: it may carry a password.
    shown = f"scheme {scheme!r}" if scheme else "a URL without a scheme"
    raise StoreError(f"unsupported --store {shown}; {_HINT}")
