"""Fixtures of the agent's integration tests: a vhost per module, agent processes."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import (
    SAMPLE_DEVICES,
    MgmtObserver,
    sample_spec,
    write_properties,
    write_spec,
)
from tests.support.processes import Daemon
from tests.support.rabbitmq import Vhost, amqp_vhost


@pytest.fixture(scope="module")
def vhost() -> Iterator[Vhost]:
    """A RabbitMQ vhost of this module's own (rabbitmqctl is slow: one per module)."""
    with amqp_vhost("agent") as created:
        yield created


AgentRunner = Callable[..., tuple[Daemon, MgmtObserver]]


@pytest.fixture
def run_agent(vhost: Vhost, tmp_path: Path) -> Iterator[AgentRunner]:
    """Starts ``hostdev-agent`` on a simulated host with an observer playing management."""
    started: list[tuple[Daemon, MgmtObserver]] = []

    def run(ping: str = "1h", **spec: Any) -> tuple[Daemon, MgmtObserver]:
        guid = str(uuid.uuid4())
        uri = write_spec(tmp_path, sample_spec(f"sim-{guid[:8]}", **spec))
        config = write_properties(tmp_path, (
            f"guid={guid}\nname=it-host\namqp.url={vhost.url}\namqp.queue.type=classic\n"
            f"libvirt.uri={uri}\npci.devices={SAMPLE_DEVICES}\nping.interval={ping}\n"
            "log.format=json\nlog.level=info\n"), f"agent-{guid[:8]}.properties")
        observer = MgmtObserver(vhost.url, guid)  # bound before the agent announces
        daemon = Daemon(f"agent-{guid[:8]}", ["hostdev-agent", "--config", str(config)],
                        tmp_path).start()
        started.append((daemon, observer))
        return daemon, observer

    yield run
    for daemon, observer in started:
        code = daemon.stop()
        observer.close()
        assert code == 0, f"agent exited with {code}:\n{daemon.tail()}"
