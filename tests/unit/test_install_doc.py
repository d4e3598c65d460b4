"""docs/install.md: the recipe that moves the broker definitions to a vhost of their own."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.support.project import ROOT

DOC = ROOT / "docs" / "install.md"
DEFINITIONS = ROOT / "etc" / "rabbitmq" / "definitions.json"
OUTPUT = "/tmp/hostdev-definitions.json"


def _sed_command() -> str:
    """Returns the documented ``sed ... > /tmp/hostdev-definitions.json`` command, joined."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("### A vhost of its own"):]
    match = re.search(r"^ +(sed .*?> " + re.escape(OUTPUT) + ")$", section, re.S | re.M)
    assert match, "docs/install.md lost the sed line of 'A vhost of its own'"
    return re.sub(r"\\\n\s*", "", match.group(1))


def test_the_vhost_recipe_moves_every_definition_and_nothing_else(tmp_path: Path) -> None:
    """The documented sed puts every vhost field on `hostdev` and changes nothing else."""
    output = tmp_path / "definitions.json"
    command = _sed_command().replace(OUTPUT, str(output))
    subprocess.run(["sh", "-c", command], cwd=ROOT, check=True, timeout=30)
    moved = json.loads(output.read_text())
    original = json.loads(DEFINITIONS.read_text())
    assert moved["vhosts"] == [{"name": "hostdev"}]
    sections = ("permissions", "policies", "exchanges", "queues", "bindings")
    for section in sections:
        assert {item["vhost"] for item in moved[section]} == {"hostdev"}, section
        for item in original[section]:
            item["vhost"] = "hostdev"
    original["vhosts"] = [{"name": "hostdev"}]
    assert moved == original
