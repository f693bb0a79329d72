"""Debian's chromium for the console tests (Playwright drives it; its own browser download
cannot work here). A missing browser fails the run (CI installs it), never skips."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def chromium() -> str:
    """The chromium executable, or fail the importing test module."""
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("Debian's chromium is not installed (apt-get install chromium)", pytrace=False)
