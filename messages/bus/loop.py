"""The loop's own chores: timers, calls queued from other threads, waking, stopping.

Independent of any transport: the bus asks :class:`LoopScheduler` what is
due and how long it may wait, and the link waits that long. Waking a blocked
wait is the link's business (``wake``); :class:`WakePipe` is the way for a
link that blocks in ``poll()`` on a socket.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable

import structlog

log = structlog.get_logger()


class LoopScheduler:
    """Timers and thread-safe queued calls for one loop thread.

    Args:
        wake: makes the loop's blocked wait return; called from any thread.
        clock: the time timers run on.
        reraise: errors of a callback that must reach the loop (a lost
            connection) instead of being logged.
    """

    def __init__(self, *, wake: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic,
                 reraise: tuple[type[BaseException], ...] = ()) -> None:
        self._timers: list[tuple[float, int, float, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._soon: deque[Callable[[], None]] = deque()
        self._wake = wake
        self._clock = clock
        self._reraise = reraise
        self.stopping = threading.Event()

    def call_every(self, interval_s: float, fn: Callable[[], None]) -> None:
        """Schedules ``fn`` every ``interval_s`` seconds, the first after one interval."""
        heapq.heappush(self._timers, (self._clock() + interval_s, next(self._seq),
                                      interval_s, fn))
        self._wake()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Queues ``fn`` for the loop thread; callable from any thread."""
        self._soon.append(fn)  # deque.append is atomic
        self._wake()

    def stop(self) -> None:
        """Asks the loop to stop; callable from any thread."""
        self.stopping.set()
        self._wake()

    def run_due(self) -> bool:
        """Runs every queued call, then every due timer; their exceptions are logged.

        Returns:
            True if anything ran.
        """
        ran = False
        while self._soon:
            ran = True
            self._call(self._soon.popleft(), "call_soon")
        now = self._clock()
        while self._timers and self._timers[0][0] <= now:
            ran = True
            due, seq, interval, fn = heapq.heappop(self._timers)
            nxt = due + interval if due + interval > now else now + interval  # no bursts
            heapq.heappush(self._timers, (nxt, seq, interval, fn))
            self._call(fn, "timer")
        return ran

    def next_wait(self, deadline: float | None, cap: float) -> float:
        """Returns how long the loop may block: until the next timer, deadline or ``cap``.

        Args:
            deadline: a ``time.monotonic()`` instant, or None.
            cap: the longest wait.
        """
        if self._soon:
            return 0.0
        wait = cap
        if self._timers:
            wait = min(wait, self._timers[0][0] - self._clock())
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
        return max(0.0, wait)

    def _call(self, fn: Callable[[], None], kind: str) -> None:
        try:
            fn()
        except self._reraise:
            raise
        except Exception:
            log.exception("bus_callback_failed", kind=kind,
                          callback=getattr(fn, "__qualname__", repr(fn)))


class WakePipe:
    """A pipe whose read end a ``poll()`` can watch, to be woken from any thread."""

    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)

    def wake(self) -> None:
        """Makes a ``poll()`` on :attr:`fd` return."""
        with contextlib.suppress(OSError):  # pipe full (already woken) or closed
            os.write(self._write_fd, b"x")

    def clear(self) -> None:
        """Empties the pipe."""
        with contextlib.suppress(OSError):
            while os.read(self.fd, 4096):
                pass

    def close(self) -> None:
        """Closes both ends."""
        for fd in (self.fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
