"""``hostdev job show|wait`` and the ``--wait`` every job-creating command offers.

A request that starts a job is answered ``JobAccepted`` at once; :func:`accepted`
either says how to follow the job or, with ``--wait``, polls it until it
finishes (exit status 1 when it failed).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Final, TextIO

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.errors import RemoteError
from hostdev.messages.values import JobRow, JobState
from hostdev.mgmt.cli.plumbing import Requester, command, expect, print_json, render_table, show

#: The states a job does not leave.
FINAL_JOB_STATES: Final[tuple[JobState, ...]] = ("succeeded", "failed")


def add_job_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                     common: argparse.ArgumentParser) -> None:
    """Adds ``job show`` and ``job wait``."""
    job = subparsers.add_parser("job", help="follow jobs")
    job_sub = job.add_subparsers(dest="job_command", required=True)
    sub = job_sub.add_parser("show", parents=[common], help="show one job")
    sub.add_argument("job_id", type=int)
    sub.set_defaults(func=command(_job_show))
    sub = job_sub.add_parser("wait", parents=[common], help="wait until a job finishes")
    sub.add_argument("job_id", type=int)
    sub.add_argument("--for", dest="wait_s", type=float, default=300.0,
                     help="give up after this many seconds (default 300)")
    sub.set_defaults(func=command(_job_wait))


def accepted(args: argparse.Namespace, request: Requester, answer: Message,
             out: TextIO, what: str) -> int:
    """Reports the job ``answer`` accepted, or with ``--wait`` waits for it to finish."""
    answer = expect(answer, api.JobAccepted)
    if not args.wait:
        if args.json:
            print_json(answer, out)
        else:
            out.write(f"{what}: job {answer.job_id} accepted"
                      + (f" (vm {answer.vm_uuid})" if answer.vm_uuid else "")
                      + f"; follow it with: hostdev job wait {answer.job_id}\n")
        return 0
    return wait_for_job(args, request, answer.job_id, args.timeout + 300.0, out)


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
    show(args, job, out, lambda: _job_rows([job], out))
    return 0 if job.state != "failed" else 1


def wait_for_job(args: argparse.Namespace, request: Requester, job_id: int, wait_s: float,
                 out: TextIO) -> int:
    """Polls a job until it finishes or ``wait_s`` passes; prints it; 1 unless it succeeded."""
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        job = _get_job(request, job_id, args.timeout)
        if job.state in FINAL_JOB_STATES:
            break
        if time.monotonic() >= deadline:
            print(f"error: job {job_id} is still {job.state} (step {job.step or '-'}) after "
                  f"{wait_s:g} s; check again with: hostdev job show {job_id}",
                  file=sys.stderr)
            return 1
        time.sleep(delay)  # polling an API: the job finishes on another process
        delay = min(delay * 1.5, 1.0)
    show(args, job, out, lambda: _job_rows([job], out))
    if job.state == "failed":
        print(f"error: job {job_id} ({job.kind}) failed: {job.details}", file=sys.stderr)
        return 1
    return 0


def _job_wait(args: argparse.Namespace, request: Requester, out: TextIO) -> int:
    return wait_for_job(args, request, args.job_id, args.wait_s, out)
