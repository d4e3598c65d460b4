"""``hostdev template ...``, ``offering create --template`` and ``vm show`` on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.support.agent import TEMPLATES
from tests.support.mgmt_harness import Harness, devices
from tests.unit.mgmt.cli.test_operator_cli import _cli

TEMPLATE = TEMPLATES / "debian-bond.xml"


@pytest.fixture
def h(engine: Engine) -> Harness:
    """A service with h1 (2 x 10GE)."""
    harness = Harness(engine)
    harness.register("g1", "h1", devices(2))
    return harness


def test_create_list_show_delete(h: Harness) -> None:
    """A template is uploaded twice (version 2), listed, shown with its XML, deleted."""
    for version in ("1", "2"):
        status, text = _cli(h, "template", "create", "bond", "--file", str(TEMPLATE))
        assert status == 0 and text.splitlines()[1].split()[:2] == ["bond", version]
    status, text = _cli(h, "template", "list")
    assert status == 0 and text.splitlines()[1].split()[:2] == ["bond", "2"]
    status, text = _cli(h, "template", "show", "bond", "--version", "1")
    assert status == 0 and text.startswith("# bond version 1")
    assert TEMPLATE.read_text(encoding="utf-8") in text
    status, text = _cli(h, "template", "delete", "bond")
    assert status == 0 and text == "deleted template bond\n"


def test_a_missing_file_is_one_line_naming_it(h: Harness, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A template file that cannot be read: exit 1 and one line with its path."""
    missing = tmp_path / "nope.xml"
    status, _ = _cli(h, "template", "create", "bond", "--file", str(missing))
    assert status == 1
    assert capsys.readouterr().err == (f"error: cannot read template file {missing}: "
                                       "No such file or directory\n")


def test_a_refused_template_is_one_line_with_its_line_number(
        h: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A template with its own <hostdev>: exit 1, the line and the rule."""
    bad = tmp_path / "bad.xml"
    bad.write_text("<domain type='kvm'>\n<devices>\n<hostdev mode='subsystem' type='pci'/>\n"
                   "</devices>\n</domain>\n", encoding="utf-8")
    status, _ = _cli(h, "template", "create", "bad", "--file", str(bad))
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("error: template bad line 3: <hostdev> is hostdev's") and \
        err.count("\n") == 1


def test_vm_show_prints_template_version_and_console_file(h: Harness) -> None:
    """`vm show` names the template version and the console file of a templated VM."""
    _cli(h, "template", "create", "bond", "--file", str(TEMPLATE))
    status, _ = _cli(h, "offering", "create", "web", "--pci", "10GE", "--template", "bond")
    assert status == 0
    _cli(h, "vm", "deploy", "web1", "--offering", "web", "--wait", answer_jobs=True)
    status, text = _cli(h, "vm", "show", "web1")
    assert status == 0
    fields = dict(line.split(":", 1) for line in text.splitlines())
    assert fields["template"].strip() == "bond version 1"
    assert fields["console"].strip().startswith("/var/log/hostdev/console/")
    assert fields["host"].strip() == "h1" and fields["state"].strip() == "Running"
