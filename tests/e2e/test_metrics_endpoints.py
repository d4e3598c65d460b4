"""Both daemons serve /metrics on metrics.port: scraped over HTTP from real processes."""

from __future__ import annotations

import re
import socket
import urllib.request

import pytest

from tests.support.waiting import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb, pytest.mark.libvirt, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _sample(text: str, line: str) -> float | None:
    """Returns the value of the exposition line starting with ``line`` (None if absent)."""
    match = re.search(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else None


def test_mgmt_and_agent_serve_metrics(make_e2e_stack) -> None:  # type: ignore[no-untyped-def]
    """hostdev-mgmt shows the host and its devices; hostdev-agent its handled messages."""
    mgmt_port, agent_port = _free_port(), _free_port()
    stack = make_e2e_stack(mgmt=1, mgmt_properties={"metrics.port": str(mgmt_port)},
                           prefix="metrics")
    stack.start_host("m1", {"10GE": 2, "GPU": 1},
                     agent_properties={"metrics.port": str(agent_port)})
    stack.wait_hosts_up()
    mgmt = _scrape(mgmt_port)
    assert _sample(mgmt, "hostdev_inventory_up") == 1
    assert _sample(mgmt, 'hostdev_hosts{status="Up"}') == 1
    assert _sample(mgmt, 'hostdev_pci_devices{name="10GE",state="free"}') == 2
    assert _sample(mgmt, 'hostdev_pci_devices{name="GPU",state="free"}') == 1
    assert _sample(mgmt, 'hostdev_messages_handled_total{outcome="ack",'
                         'type="StartupRoutingCommand"}') == 1
    assert _sample(mgmt, "hostdev_bus_reconnects_total") == 0
    def agent_answered() -> str | None:
        text = _scrape(agent_port)
        key = 'hostdev_messages_handled_total{outcome="ack",type="StartupAnswer"}'
        return text if _sample(text, key) else None

    agent = wait_for(agent_answered, timeout=15,
                     what="the agent to count the StartupAnswer it handled")
    assert "hostdev_agent_command_duration_seconds" in agent
