"""The operator commands of ``hostdev``: hosts, devices, offerings, VMs, jobs, explain.

Every command is one API request over AMQP (request/response). Output is a
table for people, or JSON with ``--json`` for scripts; errors are one line a
person understands, with exit status 1 (2 for usage errors, as argparse does).
``add_commands(subparsers)`` hooks them into the ``hostdev`` parser.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO, TypeVar

import msgspec

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.errors import BusError, MessageError, RemoteError, RequestTimeout
from hostdev.messages.runtime.logging import configure_logging
from hostdev.messages.values import JobRow, JobState
from hostdev.mgmt.api.offerings import format_pci_requests

#: Sends one request and returns the typed answer (raises RemoteError/RequestTimeout).
Requester = Callable[[Message, float], Message]

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"

_T = TypeVar("_T", bound=Message)


def expect(answer: Message, kind: type[_T]) -> _T:
    """Returns ``answer`` as ``kind``, or says plainly that management answered something else.

    Raises:
        BusError: the answer is of another type (usually hostdev and
            hostdev-mgmt of different versions).
    """
    if not isinstance(answer, kind):
        raise BusError(f"management answered {type(answer).__name__} where {kind.__name__} "
                       "was expected; are the hostdev CLI and hostdev-mgmt the same version?")
    return answer
_FINAL_JOB_STATES: tuple[JobState, ...] = ("succeeded", "failed")


def _common() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--amqp-url", default=None,
                        help="broker URL (default: $HOSTDEV_AMQP_URL, amqp.url of --config, "
                             f"or {DEFAULT_AMQP_URL})")
    parent.add_argument("--config", default=None,
                        help="read amqp.url from this mgmt.properties")
    parent.add_argument("--json", action="store_true", help="print JSON for scripts")
    parent.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for management to answer (default 10)")
    return parent


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds the operator commands; each sets ``func`` to a callable taking the namespace."""
    common = _common()
    sub = subparsers.add_parser("hosts", parents=[common], help="list hosts")
    sub.set_defaults(func=_cmd(_hosts))

    sub = subparsers.add_parser("devices", parents=[common], help="list PCI devices")
    sub.add_argument("--host", help="only this host (name or guid)")
    sub.add_argument("--free", action="store_true", help="only free devices")
    sub.set_defaults(func=_cmd(_devices))

    sub = subparsers.add_parser("offerings", parents=[common], help="list service offerings")
    sub.set_defaults(func=_cmd(_offerings))

    offering = subparsers.add_parser("offering", help="manage service offerings")
    offering_sub = offering.add_subparsers(dest="offering_command", required=True)
    sub = offering_sub.add_parser("create", parents=[common], help="create an offering")
    sub.add_argument("name")
    sub.add_argument("--cpus", type=int, default=1)
    sub.add_argument("--memory", type=int, default=512, help="MiB")
    sub.add_argument("--pci", default="", help="PCI devices by name: 10GE,10GE or 10GE:2")
    sub.add_argument("--migration-policy", choices=("forbid", "detach-attach"), default=None)
    sub.set_defaults(func=_cmd(_offering_create))

    vm = subparsers.add_parser("vm", help="deploy, start, stop, destroy and list VMs")
    vm_sub = vm.add_subparsers(dest="vm_command", required=True)
    sub = vm_sub.add_parser("deploy", parents=[common], help="create and start a VM")
    sub.add_argument("name")
    sub.add_argument("--offering", required=True)
    sub.add_argument("--avoid", action="append", default=[], help="a host to avoid (repeat)")
    sub.add_argument("--wait", action="store_true", help="wait until the job finishes")
    sub.set_defaults(func=_cmd(_vm_deploy))
    for verb, help_text in (("start", "start a stopped VM"), ("stop", "stop a running VM"),
                            ("destroy", "stop and remove a VM, releasing its devices")):
        sub = vm_sub.add_parser(verb, parents=[common], help=help_text)
        sub.add_argument("vm", help="VM name or uuid")
        sub.add_argument("--wait", action="store_true", help="wait until the job finishes")
        if verb == "stop":
            sub.add_argument("--force", action="store_true", help="power off at once")
        sub.set_defaults(func=_cmd(_vm_change), verb=verb)
    sub = vm_sub.add_parser("list", parents=[common], help="list VMs")
    sub.set_defaults(func=_cmd(_vm_list))
    from hostdev.mgmt.migration_cli import add_vm_commands  # it imports this module back

    add_vm_commands(vm_sub, common)

    job = subparsers.add_parser("job", help="follow jobs")
    job_sub = job.add_subparsers(dest="job_command", required=True)
    sub = job_sub.add_parser("show", parents=[common], help="show one job")
    sub.add_argument("job_id", type=int)
    sub.set_defaults(func=_cmd(_job_show))
    sub = job_sub.add_parser("wait", parents=[common], help="wait until a job finishes")
    sub.add_argument("job_id", type=int)
    sub.add_argument("--for", dest="wait_s", type=float, default=300.0,
                     help="give up after this many seconds (default 300)")
    sub.set_defaults(func=_cmd(_job_wait))

    sub = subparsers.add_parser("explain", parents=[common],
                                help="say why each host would take or refuse an offering")
    sub.add_argument("offering")
    sub.add_argument("--avoid", action="append", default=[])
    sub.set_defaults(func=_cmd(_explain))


# -- plumbing -------------------------------------------------------------------


def _amqp_url(args: argparse.Namespace) -> str:
    if args.amqp_url:
        return str(args.amqp_url)
    if os.environ.get("HOSTDEV_AMQP_URL"):
        return os.environ["HOSTDEV_AMQP_URL"]
    if args.config:
        from hostdev.mgmt.config import load_config
        return load_config(args.config).amqp_url
    return DEFAULT_AMQP_URL


def bus_requester(url: str) -> tuple[Requester, Callable[[], None]]:
    """Returns a requester over a real bus at ``url`` and the function that closes it."""
    from hostdev.messages.bus import Bus, BusConfig

    # No connect(): request() opens its own channel and declares nothing, so
    # the CLI works whatever queue type the daemons declared.
    bus = Bus(BusConfig(url=url, app_id="hostdev-cli"))
    return (lambda message, timeout: bus.request(message, timeout=timeout)), bus.close


Command = Callable[[argparse.Namespace, Requester, TextIO], int]


def _cmd(command: Command) -> Callable[..., int]:
    def run(args: argparse.Namespace, requester: Requester | None = None,
            out: TextIO | None = None) -> int:
        stream = out or sys.stdout
        close: Callable[[], None] = lambda: None  # noqa: E731
        try:
            if requester is None:
                # The bus logs its connection at info; a person wants only the answer.
                configure_logging("warning", json=False)
                requester, close = bus_requester(_amqp_url(args))
            return command(args, requester, stream)
        except RemoteError as exc:
            # The bus prefixes the request's type and id; a person needs the reason.
            reason = exc.reason.split("]: ", 1)[1] if "]: " in exc.reason else exc.reason
            print(f"error: {reason}", file=sys.stderr)
            return 1
        except RequestTimeout as exc:
            print(f"error: {exc} -- is hostdev-mgmt running and connected to the same "
                  "broker?", file=sys.stderr)
            return 1
        except (BusError, MessageError, OSError) as exc:
            print(f"error: cannot reach management over AMQP ({exc}); check --amqp-url "
                  "and that RabbitMQ is running", file=sys.stderr)
            return 1
        except ValueError as exc:  # config errors name file and line
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            close()
    return run


def _json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(msgspec.to_builtins(value, enc_hook=str), indent=2, sort_keys=True)
              + "\n")


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    """Writes a left-aligned table with a header line; ``-`` stands for nothing."""
    cells = [[("-" if c is None or c == "" else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                  + "\n")
    if not rows:
        out.write("(none)\n")


# -- commands -------------------------------------------------------------------


def _hosts(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.ListHostsRequest(), args.timeout)
    answer = expect(answer, api.HostList)
    if args.json:
        _json(answer.hosts, out)
        return 0
    render_table(("NAME", "GUID", "STATUS", "CPUS", "MEMORY_MB", "FREE/TOTAL PCI", "LAST PING"),
                 [(h.name, h.guid, h.status, h.cpus, h.memory_mb,
                   f"{h.free_devices}/{h.total_devices}", h.last_ping) for h in answer.hosts],
                 out)
    return 0


def _devices(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.ListPciDevicesRequest(host=args.host, free_only=args.free),
                     args.timeout)
    answer = expect(answer, api.PciDeviceList)
    if args.json:
        _json(answer.devices, out)
        return 0
    render_table(("HOST", "ADDRESS", "NAME", "STATE", "VM"),
                 [(d.host_name, d.address, d.name, d.state, d.vm_uuid)
                  for d in answer.devices], out)
    return 0


def _offering_rows(offerings: Sequence[Any], out: TextIO) -> None:
    render_table(("NAME", "CPUS", "MEMORY_MB", "PCI", "MIGRATION"),
                 [(o.name, o.cpus, o.memory_mb, format_pci_requests(o.pci_requests),
                   o.migration_policy) for o in offerings], out)


def _offerings(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.ListOfferingsRequest(), args.timeout)
    answer = expect(answer, api.OfferingList)
    if args.json:
        _json(answer.offerings, out)
    else:
        _offering_rows(answer.offerings, out)
    return 0


def _offering_create(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.CreateOfferingRequest(
        name=args.name, cpus=args.cpus, memory_mb=args.memory, pci_devices=args.pci,
        migration_policy=args.migration_policy), args.timeout)
    answer = expect(answer, api.OfferingList)
    if args.json:
        _json(answer.offerings, out)
    else:
        _offering_rows(answer.offerings, out)
    return 0


def _accepted(args: argparse.Namespace, request: Requester, answer: Message,
              out: TextIO, what: str) -> int:
    answer = expect(answer, api.JobAccepted)
    if not args.wait:
        if args.json:
            _json(answer, out)
        else:
            out.write(f"{what}: job {answer.job_id} accepted"
                      + (f" (vm {answer.vm_uuid})" if answer.vm_uuid else "")
                      + f"; follow it with: hostdev job wait {answer.job_id}\n")
        return 0
    return _wait(args, request, answer.job_id, args.timeout + 300.0, out)


def _vm_deploy(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.DeployVmRequest(name=args.name, offering=args.offering,
                                         avoid=tuple(args.avoid)), args.timeout)
    return _accepted(args, request, answer, out, f"deploy {args.name}")


def _vm_change(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    message: Message
    if args.verb == "start":
        message = api.StartVmRequest(vm=args.vm)
    elif args.verb == "stop":
        message = api.StopVmRequest(vm=args.vm, force=args.force)
    else:
        message = api.DestroyVmRequest(vm=args.vm)
    return _accepted(args, request, request(message, args.timeout), out,
                     f"{args.verb} {args.vm}")


def _vm_list(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.ListVmsRequest(), args.timeout)
    answer = expect(answer, api.VmList)
    if args.json:
        _json(answer.vms, out)
        return 0
    render_table(("NAME", "UUID", "STATE", "OFFERING", "HOST", "PCI"),
                 [(v.name, v.uuid, v.state, v.offering, v.host_name,
                   ",".join(v.pci_devices)) for v in answer.vms], out)
    return 0


def _job_rows(jobs: Sequence[JobRow], out: TextIO) -> None:
    render_table(("ID", "KIND", "STATE", "VM", "STEP", "DETAILS"),
                 [(j.id, j.kind, j.state, j.vm_uuid, j.step, j.details) for j in jobs], out)


def _get_job(request: Requester, job_id: int, timeout: float) -> JobRow:
    answer = request(api.GetJobRequest(job_id=job_id), timeout)
    answer = expect(answer, api.JobList)
    if not answer.jobs:
        raise RemoteError(f"job {job_id} does not exist", code="not_found")
    return answer.jobs[0]


def _job_show(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    job = _get_job(request, args.job_id, args.timeout)
    if args.json:
        _json(job, out)
    else:
        _job_rows([job], out)
    return 0 if job.state != "failed" else 1


def _wait(args: argparse.Namespace, request: Requester, job_id: int, wait_s: float,
          out: TextIO) -> int:
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        job = _get_job(request, job_id, args.timeout)
        if job.state in _FINAL_JOB_STATES:
            break
        if time.monotonic() >= deadline:
            print(f"error: job {job_id} is still {job.state} (step {job.step or '-'}) after "
                  f"{wait_s:g} s; check again with: hostdev job show {job_id}",
                  file=sys.stderr)
            return 1
        time.sleep(delay)  # polling an API: the job finishes on another process
        delay = min(delay * 1.5, 1.0)
    if args.json:
        _json(job, out)
    else:
        _job_rows([job], out)
    if job.state == "failed":
        print(f"error: job {job_id} ({job.kind}) failed: {job.details}", file=sys.stderr)
        return 1
    return 0


def _job_wait(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    return _wait(args, request, args.job_id, args.wait_s, out)


def _explain(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    answer = request(api.ExplainPlacementRequest(offering=args.offering,
                                                 avoid=tuple(args.avoid)), args.timeout)
    answer = expect(answer, api.PlacementExplanation)
    if args.json:
        _json(answer, out)
        return 0
    render_table(("HOST", "GUID", "VERDICT", "REASON"),
                 [(v.host_name, v.host_guid, "accepted" if v.accepted else "rejected",
                   v.reason) for v in answer.verdicts], out)
    return 0
