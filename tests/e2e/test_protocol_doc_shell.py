"""The amqp-tools script of docs/protocol.md lists the hosts of a real management daemon."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.e2e.conftest import StackFactory
from tests.support.project import ROOT
from tests.support.rabbitmq import rabbitmqctl

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb, pytest.mark.libvirt, pytest.mark.slow]

DOC = ROOT / "docs" / "protocol.md"
SECTION = "### From the shell, with amqp-tools"


def shell_example() -> str:
    """Returns the ```sh block of the amqp-tools section of docs/protocol.md, as written."""
    text = DOC.read_text(encoding="utf-8")
    assert SECTION in text, f"docs/protocol.md lost its section {SECTION!r}"
    match = re.search(r"```sh\n(.*?)```", text[text.index(SECTION):], re.S)
    assert match, "the amqp-tools section of docs/protocol.md lost its ```sh example"
    return match.group(1)


def test_the_documented_amqp_tools_script_gets_the_host_list(
    make_e2e_stack: StackFactory,
) -> None:
    """The script, run by sh, prints management's HostList and deletes its reply queue."""
    for tool in ("amqp-declare-queue", "amqp-publish", "amqp-consume", "amqp-delete-queue"):
        assert shutil.which(tool), f"{tool} is missing: `make setup` installs amqp-tools"
    stack = make_e2e_stack(hosts={"kvm-shell": {"10GE": 2}}, prefix="protocol-shell")
    done = subprocess.run(["sh", "-c", shell_example()], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOSTDEV_AMQP_URL": stack.vhost.url},
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert answer["type"] == "HostList" and answer["result"] == "ok"
    hosts = {host["name"]: host for host in answer["hosts"]}
    assert hosts["kvm-shell"]["status"] == "Up"
    assert hosts["kvm-shell"]["total_devices"] == 2
    queues = rabbitmqctl("list_queues", "--silent", "-p", stack.vhost.name, "name")
    assert not [q for q in queues.split() if q.startswith("list-hosts.")]
