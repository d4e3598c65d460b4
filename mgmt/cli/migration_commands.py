"""``hostdev vm migrate`` and ``hostdev vm attach-devices``: the migration commands.

``migrate VM [--to HOST] [--dry-run] [--wait]`` begins a live migration (a job),
or with ``--dry-run`` prints the destination and which destination device
stands in for which source device, changing nothing. ``attach-devices VM``
retries attaching the devices a VM holds but its host could not attach.
"""

from __future__ import annotations

import argparse
from typing import TextIO

from hostdev.messages import api
from hostdev.mgmt.cli.job_commands import accepted
from hostdev.mgmt.cli.plumbing import Requester, command, expect, print_json, render_table


def add_vm_commands(vm_sub: argparse._SubParsersAction[argparse.ArgumentParser],
                    common: argparse.ArgumentParser) -> None:
    """Adds ``migrate`` and ``attach-devices`` under ``hostdev vm``."""
    sub = vm_sub.add_parser("migrate", parents=[common],
                            help="live-migrate a VM, carrying its PCI devices over")
    sub.add_argument("vm", help="VM name or uuid")
    sub.add_argument("--to", dest="destination", default=None,
                     help="destination host (name or guid); default: placement chooses")
    sub.add_argument("--dry-run", action="store_true",
                     help="show the destination and the device mapping; change nothing")
    sub.add_argument("--wait", action="store_true", help="wait until the job finishes")
    sub.set_defaults(func=command(_vm_migrate))
    sub = vm_sub.add_parser("attach-devices", parents=[common],
                            help="retry attaching the devices a VM holds but lacks")
    sub.add_argument("vm", help="VM name or uuid")
    sub.add_argument("--wait", action="store_true", help="wait until the job finishes")
    sub.set_defaults(func=command(_vm_attach_devices))


def _vm_migrate(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.MigrateVmRequest(vm=args.vm, destination=args.destination,
                                       dry_run=args.dry_run), args.timeout)
    if not args.dry_run:
        return accepted(args, request, answer, out, f"migrate {args.vm}")
    answer = expect(answer, api.MigrationPlan)
    if args.json:
        print_json(answer, out)
        return 0
    out.write(f"dry run: {answer.details or args.vm} "
              f"(source {answer.source_guid}, destination {answer.destination_guid}); "
              "nothing was changed\n")
    render_table(("NAME", "SOURCE", "DESTINATION"),
                 [(m.name, m.source, m.destination) for m in answer.devices], out)
    return 0


def _vm_attach_devices(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.AttachVmDevicesRequest(vm=args.vm), args.timeout)
    return accepted(args, request, answer, out, f"attach devices of {args.vm}")
