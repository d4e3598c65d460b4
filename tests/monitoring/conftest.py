"""Fixtures of the monitoring tests: promtool, from Debian's prometheus package."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def promtool() -> str:
    """Returns promtool's path; fails (not skips) when it is missing: `make setup` installs it."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make setup` installs Debian's prometheus package")
    return path
