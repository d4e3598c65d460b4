"""A burst of API requests from several clients, each following its jobs to their end.

``run_burst(url, items)`` hands the work items to ``clients`` threads, each
with its own ``Bus`` on ``url`` (a ``;`` list fails over like the daemons'):
an item is a list of requests (deploy a VM, then stop it...) sent one after
the other, each answered ``JobAccepted`` and followed with ``GetJobRequest``
until the job ends. Every answer, refusal and exception is recorded, so a
test can assert that no accepted job was lost and none is stuck. ``at``
calls a function (stopping a node) on its own thread once that many
requests were accepted, while the burst goes on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.bus import Bus, BusConfig
from hostdev.messages.errors import RemoteError

#: How long a client follows one job before it calls it stuck.
JOB_DEADLINE_S = 180.0
#: How long one request may take, failovers included.
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Outcome:
    """One request of the burst: what it asked, the job it got, how the job ended."""

    request: Message
    job_id: int | None = None
    state: str = ""
    details: str = ""
    error: str = ""
    accepted_at: float = 0.0


@dataclass
class Burst:
    """What the burst did: every request's outcome, and when the ``at`` action ran."""

    outcomes: list[Outcome] = field(default_factory=list)
    action_started: float = 0.0
    action_wall: float = 0.0  # time.time() when the action started, to compare with logs
    action_done: float = 0.0
    action_error: str = ""
    seconds: float = 0.0

    def failures(self) -> list[str]:
        """Every request that was refused, raised, or whose job did not succeed."""
        return [f"{type(o.request).__name__} {o.request}: job {o.job_id} {o.state} "
                f"{o.details} {o.error}".strip()
                for o in self.outcomes if o.error or o.state != "succeeded"]

    def jobs(self) -> list[int]:
        """The ids of every accepted job."""
        return [o.job_id for o in self.outcomes if o.job_id is not None]


def run_burst(url: str, items: Sequence[Sequence[Message]], *, clients: int = 16,
              at: tuple[int, Callable[[], None]] | None = None) -> Burst:
    """Runs the items on ``clients`` threads; returns the burst once every thread is done."""
    burst = Burst()
    lock = threading.Lock()
    queue = list(reversed(items))
    accepted = 0
    action_thread: threading.Thread | None = None

    def action() -> None:
        assert at is not None
        burst.action_started, burst.action_wall = time.monotonic(), time.time()
        try:
            at[1]()
        except Exception as exc:  # reported by the test, which asserts it is empty
            burst.action_error = repr(exc)
        burst.action_done = time.monotonic()

    def on_accepted() -> None:
        nonlocal accepted, action_thread
        with lock:
            accepted += 1
            if at is not None and accepted == at[0]:
                action_thread = threading.Thread(target=action, name="burst-action")
                action_thread.start()

    def follow(bus: Bus, outcome: Outcome) -> None:
        deadline = time.monotonic() + JOB_DEADLINE_S
        assert outcome.job_id is not None
        while time.monotonic() < deadline:
            answer = bus.request(api.GetJobRequest(job_id=outcome.job_id),
                                 timeout=REQUEST_TIMEOUT_S)
            assert isinstance(answer, api.JobList) and answer.jobs, answer
            row = answer.jobs[0]
            if row.state in ("succeeded", "failed"):
                outcome.state, outcome.details = row.state, row.details
                return
            time.sleep(0.1)  # polling another process's job, as a client does
        outcome.state = "stuck"

    def client(number: int) -> None:
        bus = Bus(BusConfig(url=url, app_id=f"burst-{number}"))
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    item = queue.pop()
                for request in item:
                    outcome = Outcome(request)
                    with lock:
                        burst.outcomes.append(outcome)
                    try:
                        answer = bus.request(request, timeout=REQUEST_TIMEOUT_S)
                        assert isinstance(answer, api.JobAccepted), answer
                        outcome.job_id, outcome.accepted_at = answer.job_id, time.monotonic()
                        on_accepted()
                        follow(bus, outcome)
                    except RemoteError as exc:
                        outcome.error = f"refused: {exc.reason}"
                    except Exception as exc:  # reported by the test through failures()
                        outcome.error = repr(exc)
                    if outcome.state != "succeeded":
                        break  # the item's next request needs this one done
        finally:
            bus.close()

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,), name=f"burst-{n}")
               for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if action_thread is not None:
        action_thread.join()
    burst.seconds = time.monotonic() - start
    return burst
