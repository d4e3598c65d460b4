"""Runs long commands (a live migration) off the bus loop thread.

The bus runs handlers on its loop thread, which also sends the AMQP
heartbeats (docs/bus-contract.md, "Threads and blocking"): a migration that
takes longer than two heartbeats would cost the connection. So the handler of
such a command starts a worker thread and returns at once (the delivery is
acked); the worker's answer is published from the loop thread with
``call_soon_threadsafe``, with ``correlation_id`` = the command's message id,
exactly as a returned answer would be.

What MUST hold:

- One worker per key (the VM): a redelivered command whose work is still
  running is dropped (logged); once it answered, the answer is remembered in
  ``recent`` as it is published, so the pipeline (``hostdev.agent.pipeline``)
  answers the same message id again without running it: a re-published
  command never migrates a VM a second time.
- A worker that fails without an answer (libvirt itself failed) publishes
  nothing: management does not guess, it settles the job from the host's next
  reports (docs/migration.md).
- The command is acked when the worker starts: an agent killed meanwhile loses
  it, and its next ``StartupRoutingCommand`` tells management where the
  domain is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from hostdev.agent.errors import HypervisorError
from hostdev.agent.recent_commands import RecentCommands
from hostdev.messages.base import Message
from hostdev.messages.bus.contract import Incoming
from hostdev.messages.runtime.logging import bound_message

log = structlog.get_logger()


class AnswerBus(Protocol):
    """The part of the bus a background command needs."""

    def send_to_mgmt(self, guid: str, message: Message, *, correlation_id: str | None = None,
                     message_id: str | None = None) -> str: ...
    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None: ...


class BackgroundCommands:
    """Starts one worker thread per long command and answers from the loop thread."""

    def __init__(self, bus: AnswerBus, guid: str, recent: RecentCommands) -> None:
        self._bus = bus
        self._guid = guid
        self._recent = recent
        self._running: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def runner(self, run: Callable[[Any], Message],
               key: Callable[[Any], str]) -> Callable[[Any, Incoming], None]:
        """Returns the pipeline step that runs ``run(message)`` on a worker thread.

        The step answers nothing itself (the delivery is acked); a repeat of an
        answered command never gets here (the pipeline answers it from
        ``recent``), and one whose work still runs is dropped.
        """
        def start(message: Any, incoming: Incoming) -> None:
            name = key(message)
            with self._lock:
                if name in self._running:
                    log.info("command_already_running", type=type(message).__name__, key=name,
                             redelivered=incoming.redelivered)
                    return None
                worker = threading.Thread(
                    target=self._work, args=(run, message, incoming.message_id,
                                             incoming.correlation_id, name),
                    name=f"hostdev-{type(message).__name__}-{name[:8]}", daemon=True)
                self._running[name] = worker
            log.info("command_started_in_background", type=type(message).__name__, key=name)
            worker.start()
            return None
        return start

    def _work(self, run: Callable[[Any], Message], message: Any, message_id: str | None,
              correlation_id: str | None, name: str) -> None:
        try:
            with bound_message(message_id, correlation_id, host=self._guid, vm=name):
                try:
                    answer = run(message)
                except HypervisorError as exc:
                    log.error("background_command_failed", type=type(message).__name__,
                              error=str(exc), hint="management settles it from the reports")
                    return
                except Exception:
                    log.exception("background_command_crashed", type=type(message).__name__)
                    return
                log.info("command_answered", type=type(answer).__name__,
                         result=getattr(answer, "result", ""))

                def publish() -> None:  # on the loop thread, like every bus call
                    self._recent.remember(message_id, answer)
                    self._bus.send_to_mgmt(self._guid, answer, correlation_id=message_id)
                self._bus.call_soon_threadsafe(publish)
        finally:
            with self._lock:
                self._running.pop(name, None)
                self._idle.notify_all()

    def running(self) -> tuple[str, ...]:
        """Returns the keys of the commands still running."""
        with self._lock:
            return tuple(self._running)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Waits until no command runs; returns False on timeout (for tests and shutdown)."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._running, timeout=timeout)
