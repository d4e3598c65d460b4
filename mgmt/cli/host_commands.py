"""``hostdev host list|show|maintenance|activate`` (and ``hostdev hosts``): the host commands.

``maintenance HOST [--dry-run] [--stop] [--wait]`` takes a host out of
placement at once and moves its VMs off (a job); with ``--dry-run`` it prints
the plan (each VM, its destination, which destination device replaces which
source device, and the VMs whose offering forbids migration) and changes
nothing. ``activate HOST`` returns a host in maintenance to service.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TextIO

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.values import HostRow
from hostdev.mgmt.cli.job_commands import wait_for_job
from hostdev.mgmt.cli.plumbing import Requester, command, expect, print_json, render_table, show


def add_host_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                      common: argparse.ArgumentParser) -> None:
    """Adds ``hosts`` and ``host list|show|maintenance|activate``."""
    sub = subparsers.add_parser("hosts", parents=[common], help="list hosts")
    sub.set_defaults(func=command(_hosts))
    host = subparsers.add_parser("host", help="list hosts, put one into maintenance or back")
    host_sub = host.add_subparsers(dest="host_command", required=True)
    sub = host_sub.add_parser("list", parents=[common], help="list hosts")
    sub.set_defaults(func=command(_hosts))
    sub = host_sub.add_parser("show", parents=[common], help="show one host")
    sub.add_argument("host", help="host name or guid")
    sub.set_defaults(func=command(_host_show))
    sub = host_sub.add_parser("maintenance", parents=[common],
                              help="stop offering a host and move its VMs off")
    sub.add_argument("host", help="host name or guid")
    sub.add_argument("--dry-run", action="store_true",
                     help="print each VM's destination and device mapping; change nothing")
    sub.add_argument("--stop", action="store_true",
                     help="also stop the VMs whose offering forbids migration")
    sub.add_argument("--wait", action="store_true",
                     help="wait until the host is in maintenance (or the job fails)")
    sub.set_defaults(func=command(_host_maintenance))
    sub = host_sub.add_parser("activate", parents=[common],
                              help="return a host in maintenance to service")
    sub.add_argument("host", help="host name or guid")
    sub.set_defaults(func=command(_host_activate))


def _host_rows(hosts: Sequence[HostRow], out: TextIO) -> None:
    render_table(("NAME", "GUID", "STATUS", "CPUS", "MEMORY_MB", "FREE/TOTAL PCI", "FOREIGN",
                  "LAST PING", "REASON"),
                 [(h.name, h.guid, h.status, h.cpus, h.memory_mb,
                   f"{h.free_devices}/{h.total_devices}", h.foreign_domains, h.last_ping,
                   h.status_reason) for h in hosts], out)


def _show_hosts(args: argparse.Namespace, answer: Message, out: TextIO) -> int:
    hosts = expect(answer, api.HostList).hosts
    return show(args, hosts, out, lambda: _host_rows(hosts, out))


def _hosts(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    return _show_hosts(args, request(api.ListHostsRequest(), args.timeout), out)


def _host_show(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = expect(request(api.ListHostsRequest(host=args.host), args.timeout), api.HostList)
    if args.json:
        print_json(answer.hosts[0] if answer.hosts else None, out)
        return 0
    for h in answer.hosts:
        for label, value in (("name", h.name), ("guid", h.guid), ("status", h.status),
                             ("reason", h.status_reason or "-"), ("cpus", h.cpus),
                             ("memory_mb", h.memory_mb),
                             ("pci free/total", f"{h.free_devices}/{h.total_devices}"),
                             ("resets released devices", "yes" if h.reset_on_release else "no"),
                             ("foreign domains", h.foreign_domains),
                             ("last ping", h.last_ping or "-")):
            out.write(f"{label + ':':<26}{value}\n")
    return 0


def _host_maintenance(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    plan = expect(request(api.HostMaintenanceRequest(host=args.host, dry_run=args.dry_run,
                                                     stop=args.stop), args.timeout),
                  api.MaintenancePlan)
    if args.json and not args.wait:
        print_json(plan, out)
        return 0
    if not args.json:
        _plan_text(plan, out)
    if args.wait and plan.job_id is not None:
        return wait_for_job(args, request, plan.job_id, args.timeout + 600.0, out)
    return 0


def _plan_text(plan: api.MaintenancePlan, out: TextIO) -> None:
    out.write(("dry run: " if plan.dry_run else "") + f"{plan.details}\n")
    out.write("VMs moved off (detach-attach), each device: source -> destination:\n")
    rows: list[tuple[object, ...]] = []
    for move in plan.moves:
        rows.extend((move.vm_name, move.destination_name, move.job_id, d.name, d.source,
                     d.destination) for d in move.devices)
        if not move.devices:
            rows.append((move.vm_name, move.destination_name, move.job_id, None, None, None))
    render_table(("VM", "DESTINATION", "JOB", "DEVICE", "SOURCE", "DESTINATION ADDRESS"),
                 rows, out)
    out.write("VMs whose offering forbids migration (stopped only with --stop):\n")
    render_table(("VM", "OFFERING", "DEVICES", "STOP JOB"),
                 [(h.vm_name, h.offering, ",".join(h.devices), h.stop_job_id)
                  for h in plan.holds], out)
    for problem in plan.problems:
        out.write(f"cannot move now: {problem}\n")
    if plan.job_id is not None:
        out.write(f"maintenance job {plan.job_id}; follow it with: hostdev job wait "
                  f"{plan.job_id}\n")


def _host_activate(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    return _show_hosts(args, request(api.ActivateHostRequest(host=args.host), args.timeout),
                       out)
