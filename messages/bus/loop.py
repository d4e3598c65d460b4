"""The loop's own chores: timers, calls queued from other threads, waking, stopping.

Independent of AMQP: the bus asks it what is due and how long it may wait,
and waits on the AMQP socket and :attr:`LoopScheduler.wake_fd` together.
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
    """Timers and thread-safe queued calls for one loop thread, with a wake-up pipe."""

    def __init__(self, *, reraise: tuple[type[BaseException], ...] = ()) -> None:
        self._timers: list[tuple[float, int, float, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._soon: deque[Callable[[], None]] = deque()
        self._reraise = reraise
        self.stopping = threading.Event()
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(self._wake_w, False)

    def call_every(self, interval_s: float, fn: Callable[[], None]) -> None:
        """Schedules ``fn`` every ``interval_s`` seconds, the first after one interval."""
        heapq.heappush(self._timers, (time.monotonic() + interval_s, next(self._seq),
                                      interval_s, fn))
        self.wake()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Queues ``fn`` for the loop thread; callable from any thread."""
        self._soon.append(fn)  # deque.append is atomic
        self.wake()

    def stop(self) -> None:
        """Asks the loop to stop; callable from any thread."""
        self.stopping.set()
        self.wake()

    def run_due(self) -> None:
        """Runs every queued call, then every due timer; their exceptions are logged."""
        while self._soon:
            self._call(self._soon.popleft(), "call_soon")
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            due, seq, interval, fn = heapq.heappop(self._timers)
            nxt = due + interval if due + interval > now else now + interval  # no bursts
            heapq.heappush(self._timers, (nxt, seq, interval, fn))
            self._call(fn, "timer")

    def next_wait(self, deadline: float | None, cap: float) -> float:
        """Returns how long the loop may block: until the next timer, deadline or ``cap``."""
        if self._soon:
            return 0.0
        now = time.monotonic()
        wait = cap
        if self._timers:
            wait = min(wait, self._timers[0][0] - now)
        if deadline is not None:
            wait = min(wait, deadline - now)
        return max(0.0, wait)

    def wake(self) -> None:
        """Makes a loop blocked in select() on :attr:`wake_fd` return."""
        with contextlib.suppress(OSError):  # pipe full (already woken) or closed
            os.write(self._wake_w, b"x")

    def clear_wake(self) -> None:
        """Empties the wake-up pipe."""
        with contextlib.suppress(OSError):
            while os.read(self.wake_fd, 4096):
                pass

    def close(self) -> None:
        """Closes the pipe."""
        for fd in (self.wake_fd, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _call(self, fn: Callable[[], None], kind: str) -> None:
        try:
            fn()
        except self._reraise:
            raise
        except Exception:
            log.exception("bus_callback_failed", kind=kind,
                          callback=getattr(fn, "__qualname__", repr(fn)))
