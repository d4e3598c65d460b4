"""The in-process demo runs to the end and tells the story it promises."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from hostdev.demo.cli import add_demo_command
from hostdev.demo.runner import run_in
from hostdev.mgmt.cli import main

pytestmark = pytest.mark.libvirt


def _last_table(output: str, command: str) -> str:
    """Returns the output of the last ``$ hostdev <command>`` in the demo's output."""
    start = output.rindex(f"$ hostdev {command}\n")
    end = output.find("\n$ ", start + 1)
    return output[start:end if end != -1 else len(output)]


def test_demo_runs_every_step_and_ends_consistent(tmp_path: Path) -> None:
    """The demo deploys until GPUs run out, shows the refusal, migrates web-1, stops web-2."""
    out = io.StringIO()
    report = run_in(tmp_path, out=out)
    text = out.getvalue()
    for number in range(1, 8):
        assert f"Step {number}." in text
    assert report.deployed == ["web-1", "web-2", "web-3", "ml-1", "ml-2", "ml-3"]
    assert report.refused == "ml-4"
    assert report.refusal_reason == ("no host has 1 x GPU free: kvm-01 has 0, kvm-02 has 0, "
                                     "kvm-03 has 0")
    assert f"error: {report.refusal_reason}" in text
    assert "kvm-01  demo-kvm-01  rejected  needs 1xGPU, 0 free" in text
    assert report.stopped == "web-2"
    vms = _last_table(text, "vm list")
    assert re.search(r"web-2 +\S+ +Stopped +net-2x10ge +- +-", vms)
    assert len(re.findall(r" Running ", vms)) == 5
    devices = _last_table(text, "devices")
    assert re.search(r"kvm-01 +0000:3d:00.0 +10GE +free", devices)  # web-2's pair came back
    assert re.search(r"kvm-01 +0000:28:00.0 +10GE +free", devices)  # web-1's, migrated
    assert len(re.findall(r" allocated ", devices)) == 7  # 2 + 2 NICs, 3 GPUs
    assert report.migrated == "web-1", report.migration_note
    assert re.search(r"10GE +0000:28:00.0 +0000:86:00.0\n10GE +0000:28:00.1 +0000:86:00.1", text)
    assert "AttachPciDevicesCommand sent to the destination agent (1)" in text
    assert "routing key agent.demo-kvm-03.AttachPciDevicesCommand" in text
    assert '"addresses": ["0000:86:00.0", "0000:86:00.1"]' in text
    assert re.search(r"web-1 +\S+ +Running +net-2x10ge +kvm-03 +0000:86:00.0,0000:86:00.1", vms)


def test_demo_refuses_a_database_that_is_not_empty(tmp_path: Path) -> None:
    """A second run on the same database stops at once and says it needs an empty one."""
    db_url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    run_in(tmp_path / "one", db_url=db_url, out=io.StringIO())
    from hostdev.demo.cloud import DemoError

    with pytest.raises(DemoError, match="needs an empty one"):
        run_in(tmp_path / "two", db_url=db_url, out=io.StringIO())


def test_hostdev_demo_command_is_registered(capsys: pytest.CaptureFixture[str]) -> None:
    """``hostdev demo --help`` is found through the entry point and names its options."""
    assert callable(add_demo_command)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--amqp-url" in capsys.readouterr().out
