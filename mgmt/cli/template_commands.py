"""``hostdev template create|list|show|delete`` and ``hostdev vm show``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TextIO

from hostdev.messages import api
from hostdev.messages.values import TemplateRow
from hostdev.mgmt.cli.plumbing import Requester, command, expect, print_json, render_table, show


def add_template_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                          common: argparse.ArgumentParser) -> None:
    """Adds ``hostdev template`` and its verbs."""
    template = subparsers.add_parser("template", help="manage libvirt domain templates")
    verbs = template.add_subparsers(dest="template_command", required=True)
    sub = verbs.add_parser("create", parents=[common],
                           help="upload a domain template (again: a new version)")
    sub.add_argument("name")
    sub.add_argument("--file", required=True, help="the libvirt <domain> XML")
    sub.set_defaults(func=command(_create))
    sub = verbs.add_parser("list", parents=[common], help="list templates (newest versions)")
    sub.set_defaults(func=command(_list))
    sub = verbs.add_parser("show", parents=[common], help="print a template's XML")
    sub.add_argument("name")
    sub.add_argument("--version", type=int, default=None, help="default: the newest")
    sub.set_defaults(func=command(_show))
    sub = verbs.add_parser("delete", parents=[common],
                           help="delete every version (refused while an offering uses it)")
    sub.add_argument("name")
    sub.set_defaults(func=command(_delete))


def add_vm_show_command(vm_sub: argparse._SubParsersAction[argparse.ArgumentParser],
                        common: argparse.ArgumentParser) -> None:
    """Adds ``hostdev vm show``."""
    sub = vm_sub.add_parser("show", parents=[common],
                            help="show one VM: host, devices, template, console file")
    sub.add_argument("vm", help="VM name or uuid")
    sub.set_defaults(func=command(_vm_show))


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read template file {path}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None


def _rows(args: argparse.Namespace, rows: tuple[TemplateRow, ...], out: TextIO) -> int:
    return show(args, rows, out, lambda: render_table(
        ("NAME", "VERSION", "CREATED", "OFFERINGS"),
        [(t.name, t.version, t.created_at, ",".join(t.offerings)) for t in rows], out))


def _create(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    message = api.CreateTemplateRequest(name=args.name, xml=_read(args.file))
    return _rows(args, expect(request(message, args.timeout), api.TemplateList).templates, out)


def _list(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.ListTemplatesRequest(), args.timeout)
    return _rows(args, expect(answer, api.TemplateList).templates, out)


def _show(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.ShowTemplateRequest(name=args.name, version=args.version),
                     args.timeout)
    templates = expect(answer, api.TemplateList).templates
    if args.json:
        print_json(templates, out)
        return 0
    for template in templates:
        out.write(f"# {template.name} version {template.version}, created "
                  f"{template.created_at}, offerings: {', '.join(template.offerings) or '-'}\n")
        out.write(template.xml if template.xml.endswith("\n") else template.xml + "\n")
    return 0


def _delete(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.DeleteTemplateRequest(name=args.name), args.timeout)
    deleted = expect(answer, api.TemplateList).templates
    return show(args, deleted, out, lambda: out.write(f"deleted template {args.name}\n"))


def _vm_show(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    vms = expect(request(api.ListVmsRequest(), args.timeout), api.VmList).vms
    found = [v for v in vms if args.vm in (v.uuid, v.name)]
    if not found:
        raise ValueError(f"no VM is named {args.vm!r} (nor has that uuid); list them with: "
                         "hostdev vm list")
    vm = found[-1]
    if args.json:
        print_json(vm, out)
        return 0
    template = f"{vm.template} version {vm.template_version}" if vm.template else \
        "- (minimal domain)"
    for label, value in (("name", vm.name), ("uuid", vm.uuid), ("state", vm.state),
                         ("offering", vm.offering), ("host", vm.host_name or "-"),
                         ("pci devices", ",".join(vm.pci_devices) or "-"),
                         ("template", template), ("console", vm.console_path or "-")):
        out.write(f"{label + ':':<13}{value}\n")
    return 0
