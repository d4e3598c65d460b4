"""Fixtures of the end-to-end tests: whole deployments of real hostdev processes.

``make_e2e_stack`` (module scope) builds a ``Stack`` (tests/support/e2e_stack.py)
on a fresh vhost and MariaDB database; every stack it made is stopped and
dropped when the module ends. A module builds its own module-scoped fixture
on it, e.g. three simulated hosts and two management daemons::

    @pytest.fixture(scope="module")
    def stack(make_e2e_stack):
        created = make_e2e_stack(mgmt=2, hosts={"a": {"10GE": 4}, "b": {"10GE": 4}})
        yield created

When a test fails, the report carries each daemon's warnings and errors and
the end of its log (a section per daemon), so a failure in CI can be read
after its temporary directories are gone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import ExitStack

import pytest
from pluggy import Result

from tests.support.e2e_stack import Stack, e2e_stack

StackFactory = Callable[..., Stack]

#: How many warnings and errors, and how many last lines, a failed test's report keeps per log.
_NOTABLE_LINES = 60
_LAST_LINES = 15


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None],
) -> Generator[None, Result[pytest.TestReport], None]:
    """Adds the logs of the failed test's stack to its report."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for stack in {id(v): v for v in getattr(item, "funcargs", {}).values()
                  if isinstance(v, Stack)}.values():
        for daemon in [*stack.mgmts, *(host.daemon for host in stack.hosts.values())]:
            notable = [json.dumps(r) for r in daemon.records()
                       if r.get("level") in ("warning", "error", "critical")]
            report.sections.append((f"log of {daemon.name}", "\n".join(
                [*notable[-_NOTABLE_LINES:], "-- last lines --", daemon.tail(_LAST_LINES)])))


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
