"""Fixtures of the agent's unit tests: simulated hosts that close themselves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent import HostFactory, host_factory


@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[HostFactory]:
    """Opens simulated hosts from ``sample_spec`` (name, overrides) and closes them after."""
    yield from host_factory(tmp_path)
