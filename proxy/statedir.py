"""The state directory's permissions: it holds the control token, the agents registry and the
database, so only the proxy's own user may list or enter it (0700)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

STATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def secure_state_dir(path: Path) -> None:
    """Create `path` (and missing parents) with mode 0700, or tighten an existing one to 0700.

    The mode is set with chmod, so it does not depend on the umask. Missing parents get the
    umask's usual mode (they may be shared, like `~/.local/state`). A directory owned by another
    user is left as it is (an admin's choice, e.g. a group-shared volume). Raises OSError when
    the directory cannot be created.
    """
    path = Path(path).expanduser()
    path.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    info = path.stat()
    if stat.S_IMODE(info.st_mode) != STATE_DIR_MODE and info.st_uid == os.geteuid():
        os.chmod(path, STATE_DIR_MODE)


def make_private_dir(path: Path) -> None:
    """Create `path` with mode 0700 if it is missing; leave an existing directory as it is.

    For directories that may be the user's own (an agents file next to a policy in a working
    tree): a new one is private, an existing one is not ours to change.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        secure_state_dir(path)


def create_private_file(path: Path) -> None:
    """Make sure `path` exists with mode 0600: created so whatever the umask, or tightened (see
    `tighten_private_file`) if it exists. Never truncates."""
    # O_NONBLOCK: a FIFO planted at `path` fails at once instead of hanging the open.
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        _tighten(fd)
    finally:
        os.close(fd)


def tighten_private_file(path: Path) -> None:
    """Set an existing file of ours to 0600; one owned by another user is left as it is (an
    admin's choice, e.g. a group-shared database). Raises FileNotFoundError if it is missing."""
    info = os.stat(path)
    if _needs_tightening(info):
        os.chmod(path, PRIVATE_FILE_MODE)


def _tighten(fd: int) -> None:
    if _needs_tightening(os.fstat(fd)):
        os.fchmod(fd, PRIVATE_FILE_MODE)


def _needs_tightening(info: os.stat_result) -> bool:
    # Exactly 0600 (the owner reads and writes, nobody else anything), on our own files only.
    return stat.S_IMODE(info.st_mode) != PRIVATE_FILE_MODE and info.st_uid == os.geteuid()
