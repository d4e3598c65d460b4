"""Exponential backoff with jitter, capped: how both daemons space out their retries.

Used for the agent's announcements until management answers, and for a
daemon's bounded attempts to reach the broker or the database at start-up.
The jitter keeps a fleet of agents restarted together from retrying in step.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


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
        return min(self.max_s, self.first_s * 2 ** min(retry, 62))

    def delay(self, retry: int, draw: Callable[[float, float], float] = random.uniform
              ) -> float:
        """Returns the delay before retry number ``retry`` (0-based), jitter applied."""
        top = self.ceiling(retry)
        return draw(top * (1 - self.jitter), top)
