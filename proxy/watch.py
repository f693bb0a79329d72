"""Watching config files for changes: cheap polling of stat results, off the event loop.

Polling (rather than inotify) also sees Kubernetes ConfigMap updates, which swap a symlink.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

Signature = tuple[int, int, int] | None  # (mtime_ns, size, inode) or None when missing


def _signature(path: Path) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class FileWatcher:
    """Calls `on_change(changed_paths)` when any watched file's stat signature changes."""

    def __init__(
        self,
        paths: Sequence[Path],
        on_change: Callable[[list[Path]], Awaitable[None]],
        interval: float = 1.0,
    ) -> None:
        self._paths = list(paths)
        self._on_change = on_change
        self._interval = interval
        self._seen: dict[Path, Signature] = {}

    def _scan(self) -> dict[Path, Signature]:
        return {path: _signature(path) for path in self._paths}

    async def run(self) -> None:
        self._seen = await asyncio.to_thread(self._scan)
        while True:
            await asyncio.sleep(self._interval)
            current = await asyncio.to_thread(self._scan)
            changed = [p for p in self._paths if current[p] != self._seen.get(p)]
            self._seen = current
            if changed:
                await self._on_change(changed)
