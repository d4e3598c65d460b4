"""The agent's metrics: metrics.port in agent.properties and the command duration histogram."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from hostdev.agent.config import parse_config
from hostdev.agent.errors import ConfigError
from hostdev.agent.metrics import timed
from hostdev.messages.commands import StopAnswer, StopCommand


def _count(kind: str, result: str) -> float:
    return REGISTRY.get_sample_value("hostdev_agent_command_duration_seconds_count",
                                     {"type": kind, "result": result}) or 0.0


def test_metrics_port_is_off_by_default_and_parsed() -> None:
    """No key or ``off`` serves nothing; a port is an int; a bad one names file and line."""
    assert parse_config("").metrics_port is None
    assert parse_config("metrics.port=off\n").metrics_port is None
    assert parse_config("metrics.port=9464\n").metrics_port == 9464
    with pytest.raises(ConfigError, match=r"a\.properties:1: .*from 1 to 65535, or off"):
        parse_config("metrics.port=0\n", "a.properties")


def test_timed_observes_each_result() -> None:
    """An answered command counts under its result; a raising one under ``raised``."""
    ok, raised = _count("StopCommand", "error"), _count("StopCommand", "raised")
    stop = timed(lambda m: StopAnswer(result="error", vm_uuid=m.vm_uuid, details="no"))
    assert stop(StopCommand(vm_uuid="u1")).result == "error"

    def broken(message: StopCommand) -> StopAnswer:
        raise RuntimeError("libvirt went away")

    with pytest.raises(RuntimeError):
        timed(broken)(StopCommand(vm_uuid="u1"))
    assert _count("StopCommand", "error") == ok + 1
    assert _count("StopCommand", "raised") == raised + 1
