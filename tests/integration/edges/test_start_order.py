"""An agent started before management registers once management comes up."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.support.agent import SAMPLE_DEVICES, sample_spec, write_properties, write_spec
from tests.support.processes import Daemon
from tests.support.rabbitmq import amqp_vhost

pytestmark = [pytest.mark.rabbitmq, pytest.mark.libvirt]


def test_an_agent_started_first_announces_until_management_answers(tmp_path: Path) -> None:
    """The agent's first announcement is unroutable; a later one is answered by mgmt."""
    with amqp_vhost("order") as vhost:
        guid = str(uuid.uuid4())
        uri = write_spec(tmp_path, sample_spec("sim-order"))
        config = write_properties(tmp_path, (
            f"guid={guid}\nname=early\namqp.url={vhost.url}\namqp.queue.type=classic\n"
            f"libvirt.uri={uri}\npci.devices={SAMPLE_DEVICES}\nping.interval=1h\n"
            "log.format=json\nlog.level=info\n"))
        agent = Daemon("agent-early", ["hostdev-agent", "--config", str(config)],
                       tmp_path).start()
        mgmt = Daemon("mgmt-late", ["hostdev-mgmt", "run", "--db-url",
                                    f"sqlite:///{tmp_path}/mgmt.db", "--amqp-url", vhost.url],
                      tmp_path)
        try:
            agent.wait_log("startup_unanswered", timeout=30, host=guid)
            assert not any(r.get("event") == "startup_accepted" for r in agent.records())
            mgmt.start()
            agent.wait_log("startup_accepted", timeout=60, host=guid)
        finally:
            codes = (agent.stop(), mgmt.stop())
        assert codes == (0, 0), f"{agent.tail()}\n{mgmt.tail()}"
