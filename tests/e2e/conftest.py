"""Fixtures of the end-to-end tests: whole deployments of real hostdev processes.

``make_e2e_stack`` (module scope) builds a ``Stack`` (tests/support/e2e_stack.py)
on a fresh vhost and MariaDB database; every stack it made is stopped and
dropped when the module ends. A module builds its own module-scoped fixture
on it, e.g. three simulated hosts and two management daemons::

    @pytest.fixture(scope="module")
    def stack(make_e2e_stack):
        created = make_e2e_stack(mgmt=2, hosts={"a": {"10GE": 4}, "b": {"10GE": 4}})
        yield created
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack

import pytest

from tests.support.e2e_stack import Stack, e2e_stack

StackFactory = Callable[..., Stack]


@pytest.fixture(scope="module")
def make_e2e_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackFactory]:
    """Builds stacks: ``make(mgmt=N, hosts={name: {device name: count}}, ...)``."""
    with ExitStack() as cleanup:

        def make(*, mgmt: int = 1, hosts: Mapping[str, Mapping[str, int]] | None = None,
                 mgmt_properties: Mapping[str, str] | None = None,
                 prefix: str = "e2e") -> Stack:
            stack = cleanup.enter_context(e2e_stack(
                tmp_path_factory.mktemp(prefix), prefix=prefix,
                mgmt_properties=mgmt_properties))
            for _ in range(mgmt):
                stack.start_mgmt()
            for name, devices in (hosts or {}).items():
                stack.start_host(name, devices)
            if hosts:
                stack.wait_hosts_up()
            return stack

        yield make
