"""Exponential backoff with jitter, capped: how both daemons space out their retries.

Used for the agent's announcements until management answers, and for a
daemon's bounded attempts to reach the broker or the database at start-up.
The jitter keeps a fleet of agents restarted together from retrying in step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

log = structlog.get_logger()

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delays that double from ``first_s`` up to ``max_s``, each with jitter.

    Attributes:
        first_s: the delay before the first retry (before jitter).
        max_s: the ceiling of the delay.
        jitter: the fraction of each delay drawn at random: a delay ``d``
            becomes uniform in ``[d * (1 - jitter), d]``.
    """

    first_s: float = 1.0
    max_s: float = 30.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.first_s <= 0 or self.max_s < self.first_s or not 0 <= self.jitter <= 1:
            raise ValueError(f"Backoff needs 0 < first_s <= max_s and 0 <= jitter <= 1 "
                             f"(got {self.first_s}, {self.max_s}, {self.jitter})")

    def ceiling(self, retry: int) -> float:
        """Returns the delay before retry number ``retry`` (0-based) without jitter."""
        return min(self.max_s, self.first_s * 2.0 ** min(retry, 62))

    def delay(self, retry: int, draw: Callable[[float, float], float] = random.uniform
              ) -> float:
        """Returns the delay before retry number ``retry`` (0-based), jitter applied."""
        top = self.ceiling(retry)
        return float(draw(top * (1 - self.jitter), top))


def retry(fn: Callable[[], T], *, transient: Callable[[Exception], bool], what: str,
          attempts: int = 4, backoff: Backoff | None = None,
          wait: Callable[[float], None] = time.sleep) -> T:
    """Returns ``fn()``, calling it again after a transient failure, ``attempts`` times at most.

    A daemon starting before its broker or database is reachable waits for it
    a little (1, 2, 4 s by default), then gives up so its supervisor decides.

    Args:
        fn: the attempt.
        transient: tells whether a failure may go away by itself.
        what: what is being reached, for the log line of each retry.
        attempts: calls at most, the first included.
        backoff: the delays between calls (default 1 s doubling, at most 8 s).
        wait: sleeps; tests pass a recorder.

    Raises:
        Exception: what the last call raised, or a permanent failure at once.
    """
    backoff = backoff or Backoff(first_s=1.0, max_s=8.0)
    for attempt in range(1, attempts):
        try:
            return fn()
        except Exception as exc:
            if not transient(exc):
                raise
            delay = backoff.delay(attempt - 1)
            log.warning("start_retrying", what=what, error=str(exc), attempt=attempt,
                        attempts=attempts, retry_in_s=round(delay, 2))
            wait(delay)
    return fn()
