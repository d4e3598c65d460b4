"""The operator commands of ``hostdev``: devices, offerings, VMs, explain (and hosts, jobs).

Every command is one API request over AMQP (request/response). Output is a
table for people, or JSON with ``--json`` for scripts; errors are one line a
person understands, with exit status 1 (2 for usage errors, as argparse does).
``add_commands(subparsers)`` hooks them, the host, job and migration commands
into the ``hostdev`` parser.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, TextIO, get_args

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import NumaPolicy, PciDeviceRow
from hostdev.mgmt.api.offerings import format_pci_requests
from hostdev.mgmt.cli.host_commands import add_host_commands
from hostdev.mgmt.cli.job_commands import accepted, add_job_commands
from hostdev.mgmt.cli.migration_commands import add_vm_commands
from hostdev.mgmt.cli.plumbing import (
    Requester,
    command,
    common_options,
    expect,
    render_table,
    show,
)
from hostdev.mgmt.cli.template_commands import add_template_commands, add_vm_show_command


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds the operator commands; each sets ``func`` to a callable taking the namespace."""
    common = common_options()
    add_host_commands(subparsers, common)

    sub = subparsers.add_parser("devices", parents=[common], help="list PCI devices")
    sub.add_argument("--host", help="only this host (name or guid)")
    sub.add_argument("--free", action="store_true", help="only free devices")
    sub.set_defaults(func=command(_devices))

    device = subparsers.add_parser("device", help="take a PCI device out of service or back")
    device_sub = device.add_subparsers(dest="device_command", required=True)
    for verb, help_text in (("disable", "never offer a free device again (refused while held)"),
                            ("enable", "offer a disabled device again")):
        sub = device_sub.add_parser(verb, parents=[common], help=help_text)
        sub.add_argument("host", help="host name or guid")
        sub.add_argument("address", help="PCI address, e.g. 0000:28:00.1 or 28:00.1")
        if verb == "disable":
            sub.add_argument("--reason", default="", help="why, shown by 'hostdev devices'")
        sub.set_defaults(func=command(_device_change), enabled=verb == "enable")

    sub = subparsers.add_parser("offerings", parents=[common], help="list service offerings")
    sub.set_defaults(func=command(_offerings))

    offering = subparsers.add_parser("offering", help="manage service offerings")
    offering_sub = offering.add_subparsers(dest="offering_command", required=True)
    sub = offering_sub.add_parser("create", parents=[common], help="create an offering")
    sub.add_argument("name")
    sub.add_argument("--cpus", type=int, default=1)
    sub.add_argument("--memory", type=int, default=512, help="MiB")
    sub.add_argument("--pci", default="", help="PCI devices by name: 10GE,10GE or 10GE:2")
    sub.add_argument("--migration-policy", choices=("forbid", "detach-attach"), default=None)
    sub.add_argument("--template", default=None,
                     help="the domain template its VMs are built from (default: minimal)")
    sub.add_argument("--numa-policy", choices=get_args(NumaPolicy), default=None,
                     help="put all of a VM's devices on one NUMA node: required (or refuse "
                     "the host), preferred (when the host can), none (default)")
    sub.set_defaults(func=command(_offering_create))

    vm = subparsers.add_parser("vm", help="deploy, start, stop, destroy and list VMs")
    vm_sub = vm.add_subparsers(dest="vm_command", required=True)
    sub = vm_sub.add_parser("deploy", parents=[common], help="create and start a VM")
    sub.add_argument("name")
    sub.add_argument("--offering", required=True)
    sub.add_argument("--avoid", action="append", default=[], help="a host to avoid (repeat)")
    sub.add_argument("--wait", action="store_true", help="wait until the job finishes")
    sub.set_defaults(func=command(_vm_deploy))
    for verb, help_text in (("start", "start a stopped VM"), ("stop", "stop a running VM"),
                            ("destroy", "stop and remove a VM, releasing its devices")):
        sub = vm_sub.add_parser(verb, parents=[common], help=help_text)
        sub.add_argument("vm", help="VM name or uuid")
        sub.add_argument("--wait", action="store_true", help="wait until the job finishes")
        if verb == "stop":
            sub.add_argument("--force", action="store_true", help="power off at once")
        sub.set_defaults(func=command(_vm_change), verb=verb)
    sub = vm_sub.add_parser("list", parents=[common], help="list VMs")
    sub.set_defaults(func=command(_vm_list))
    add_vm_commands(vm_sub, common)
    add_vm_show_command(vm_sub, common)
    add_job_commands(subparsers, common)
    add_template_commands(subparsers, common)

    sub = subparsers.add_parser("explain", parents=[common],
                                help="say why each host would take or refuse an offering")
    sub.add_argument("offering")
    sub.add_argument("--avoid", action="append", default=[])
    sub.set_defaults(func=command(_explain))


def _devices(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.ListPciDevicesRequest(host=args.host, free_only=args.free),
                     args.timeout)
    devices = expect(answer, api.PciDeviceList).devices
    return show(args, devices, out, lambda: _device_rows(devices, out))


def _device_rows(devices: Sequence[PciDeviceRow], out: TextIO) -> None:
    render_table(("HOST", "ADDRESS", "NAME", "STATE", "VM", "NUMA", "GROUP", "PF/VF", "REASON"),
                 [(d.host_name, d.address, d.name, d.state, d.vm_uuid, d.numa_node,
                   _group(d), _sriov(d), d.reason) for d in devices], out)


def _group(device: PciDeviceRow) -> str:
    """Returns the IOMMU group and, in brackets, how many devices it has."""
    if device.iommu_group is None:
        return ""
    return f"{device.iommu_group} ({max(len(device.iommu_members), 1)})"


def _sriov(device: PciDeviceRow) -> str:
    """Returns the SR-IOV relation: the PF of a VF, or how many VFs a PF has."""
    if device.physical_function is not None:
        return f"VF of {device.physical_function}"
    if device.virtual_functions:
        return f"PF, {len(device.virtual_functions)} VFs"
    return ""


def _device_change(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    message = api.SetPciDeviceEnabledRequest(
        host=args.host, address=PciAddress(args.address), enabled=args.enabled,
        reason="" if args.enabled else args.reason)
    device = expect(request(message, args.timeout), api.DeviceStateChanged).device
    return show(args, device, out, lambda: _device_rows((device,), out))


def _offering_rows(offerings: Sequence[Any], out: TextIO) -> None:
    render_table(("NAME", "CPUS", "MEMORY_MB", "PCI", "MIGRATION", "NUMA", "TEMPLATE"),
                 [(o.name, o.cpus, o.memory_mb, format_pci_requests(o.pci_requests),
                   o.migration_policy, o.numa_policy, o.template) for o in offerings], out)


def _offerings(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    return _show_offerings(args, request(api.ListOfferingsRequest(), args.timeout), out)


def _show_offerings(args: argparse.Namespace, answer: Message, out: TextIO) -> int:
    offerings = expect(answer, api.OfferingList).offerings
    return show(args, offerings, out, lambda: _offering_rows(offerings, out))


def _offering_create(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.CreateOfferingRequest(
        name=args.name, cpus=args.cpus, memory_mb=args.memory, pci_devices=args.pci,
        migration_policy=args.migration_policy, numa_policy=args.numa_policy,
        template=args.template), args.timeout)
    return _show_offerings(args, answer, out)


def _vm_deploy(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.DeployVmRequest(name=args.name, offering=args.offering,
                                         avoid=tuple(args.avoid)), args.timeout)
    return accepted(args, request, answer, out, f"deploy {args.name}")


def _vm_change(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    message: Message
    if args.verb == "start":
        message = api.StartVmRequest(vm=args.vm)
    elif args.verb == "stop":
        message = api.StopVmRequest(vm=args.vm, force=args.force)
    else:
        message = api.DestroyVmRequest(vm=args.vm)
    return accepted(args, request, request(message, args.timeout), out,
                     f"{args.verb} {args.vm}")


def _vm_list(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.ListVmsRequest(), args.timeout)
    vms = expect(answer, api.VmList).vms
    return show(args, vms, out, lambda: render_table(
        ("NAME", "UUID", "STATE", "OFFERING", "HOST", "PCI", "NUMA"),
        [(v.name, v.uuid, v.state, v.offering, v.host_name, ",".join(v.pci_devices),
          v.numa_node) for v in vms], out))


def _explain(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.ExplainPlacementRequest(offering=args.offering,
                                                 avoid=tuple(args.avoid)), args.timeout)
    explained = expect(answer, api.PlacementExplanation)
    return show(args, explained, out, lambda: render_table(
        ("HOST", "GUID", "VERDICT", "REASON"),
        [(v.host_name, v.host_guid, "accepted" if v.accepted else "rejected", v.reason)
         for v in explained.verdicts], out))
