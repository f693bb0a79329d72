"""The YAML files that hold hashed tokens (agents, admins): read and validated the same way,
written atomically with mode 0600. Each registry keeps its own entry format."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from proxy.statedir import make_private_dir


def read_section(
    path: Path, section: str, what: str, error: Callable[[str], Exception]
) -> dict[str, Any]:
    """The `section:` mapping of a `version: 1` file ({} when the file does not exist);
    `error(message)` builds the exception raised for an unreadable or malformed file."""
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise error(f"{path}: cannot read {what} file: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != 1:
        raise error(f"{path}: expected a mapping with 'version: 1' and '{section}:'")
    raw = data.get(section) or {}
    if not isinstance(raw, dict):
        raise error(f"{path}: '{section}' must be a mapping of name to entry")
    return raw


def write_section(
    path: Path, section: str, entries: Mapping[str, Mapping[str, Any]], header: str
) -> None:
    """Write atomically (temp file + rename), mode 0600. A new directory is private; an
    existing one may be the admin's own (the file can sit next to a policy) and is left as is."""
    make_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{section}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(f"# {header}\n")
            yaml.safe_dump(
                {"version": 1, section: {k: dict(v) for k, v in entries.items()}},
                handle,
                sort_keys=True,
            )
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
