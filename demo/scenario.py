"""The demo's story, told through the ``hostdev`` CLI's own commands and tables.

Every step runs ``hostdev`` commands (``offering create``, ``vm deploy --wait``,
``explain``...) through the operator CLI's parser and functions with the
cloud's requester, so the demo sends the same API requests a person would,
and prints what the CLI prints. After each step: hosts, devices and VMs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
from dataclasses import dataclass, field
from typing import TextIO

from hostdev.demo.cloud import Cloud
from hostdev.messages.codec import encode
from hostdev.mgmt.cli.operator_commands import add_commands

#: How many GPU VMs the demo tries before it expects a refusal.
MAX_GPU_VMS = 10
_RULE = "=" * 78


@dataclass
class DemoReport:
    """What the demo did, for its caller (and tests)."""

    deployed: list[str] = field(default_factory=list)
    refused: str = ""
    refusal_reason: str = ""
    migrated: str = ""
    migration_note: str = ""
    stopped: str = ""


class Console:
    """Runs ``hostdev`` commands in this process, printing the command line and its output."""

    def __init__(self, cloud: Cloud, out: TextIO) -> None:
        self.cloud = cloud
        self.out = out
        self.parser = argparse.ArgumentParser(prog="hostdev")
        add_commands(self.parser.add_subparsers())
        #: The last error line the CLI printed (its stderr), '' after a success.
        self.last_error = ""

    def run(self, *argv: str) -> int:
        """Runs ``hostdev ARGV``; errors go to the demo's output as the CLI prints them."""
        self.out.write(f"\n$ hostdev {' '.join(argv)}\n")
        args = self.parser.parse_args(argv)
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            status: int = args.func(args, self.cloud.request, self.out)
        self.out.write(errors.getvalue())
        self.last_error = errors.getvalue().strip().removeprefix("error: ")
        return status


def _step(out: TextIO, number: int, title: str) -> None:
    out.write(f"\n{_RULE}\nStep {number}. {title}\n{_RULE}\n")


def _tables(console: Console) -> None:
    for argv in (("hosts",), ("devices",), ("vm", "list")):
        console.run(*argv)


def run_scenario(cloud: Cloud, out: TextIO) -> DemoReport:
    """Tells the whole story on ``cloud``; returns what happened."""
    report = DemoReport()
    con = Console(cloud, out)

    _step(out, 1, "Three simulated hosts announced their passthrough devices")
    out.write("kvm-01 has two dual-port 10GE NICs and a GPU; kvm-02 and kvm-03 one NIC and a\n"
              "GPU each. The two functions of a NIC share an IOMMU group (passed as a pair).\n")
    _tables(con)

    _step(out, 2, "Create offerings: what users ask for, by device name")
    con.run("offering", "create", "net-2x10ge", "--pci", "10GE,10GE",
            "--migration-policy", "detach-attach")
    con.run("offering", "create", "gpu-1", "--pci", "GPU", "--cpus", "4", "--memory", "8192")
    _tables(con)

    _step(out, 3, "Deploy three VMs with two 10GE NICs each (first fit)")
    for name in ("web-1", "web-2", "web-3"):
        if con.run("vm", "deploy", name, "--offering", "net-2x10ge", "--wait") == 0:
            report.deployed.append(name)
    _tables(con)

    _step(out, 4, "Deploy GPU VMs until the GPUs run out")
    for number in itertools.count(1):
        name = f"ml-{number}"
        if number > MAX_GPU_VMS:
            break
        if con.run("vm", "deploy", name, "--offering", "gpu-1", "--wait") != 0:
            report.refused = name
            report.refusal_reason = con.last_error
            out.write(f"\n=> {name} was refused and nothing was created. Why, host by host:\n")
            con.run("explain", "gpu-1")
            break
        report.deployed.append(name)
    _tables(con)

    _step(out, 5, "Live-migrate web-1 with detach-attach: its 10GE pair moves to another host")
    _migrate(con, cloud, "web-1", report)
    _tables(con)

    _step(out, 6, "Stop a VM: its devices are free again")
    if con.run("vm", "stop", "web-2", "--wait") == 0:
        report.stopped = "web-2"
    _tables(con)

    _step(out, 7, "Done")
    con.run("offerings")
    out.write(f"\nDeployed {len(report.deployed)} VMs ({', '.join(report.deployed)}); "
              f"refused {report.refused or 'none'}; "
              f"migrated {report.migrated or 'none'}; stopped {report.stopped or 'none'}.\n")
    return report


def _migrate(con: Console, cloud: Cloud, vm: str, report: DemoReport) -> None:
    """Shows the device mapping (dry run), migrates, and shows the AttachPciDevicesCommand."""
    if con.run("vm", "migrate", vm, "--dry-run") != 0:
        report.migration_note = f"migration: not available in this build ({con.last_error})"
        con.out.write(report.migration_note + "\n")
        return
    con.out.write("The destination's devices are reserved before the migration starts; the "
                  "source\nagent detaches the pair, libvirt migrates, the destination agent "
                  "attaches.\n")
    before = len(cloud.attach_commands())
    if con.run("vm", "migrate", vm, "--wait") == 0:
        report.migrated = vm
    else:
        report.migration_note = f"migration failed: {con.last_error}"
    sent = cloud.attach_commands()[before:]
    con.out.write(f"\nAttachPciDevicesCommand sent to the destination agent ({len(sent)}):\n")
    for key, command in sent:
        body = json.loads(encode(command))
        con.out.write(f"  routing key {key}\n  {json.dumps(body, sort_keys=True)}\n")
