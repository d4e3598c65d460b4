"""Claims under a NUMA policy on MariaDB: the shared contract suite (see tests/support)."""

from __future__ import annotations

import pytest

from tests.support.numa_contract import NumaClaimContract

pytestmark = pytest.mark.mariadb


class TestNumaClaimsOnMariaDb(NumaClaimContract):
    """Runs the NUMA claim contract against MariaDB."""
