"""Backoff delays and the bounded start-up retry."""

from __future__ import annotations

import pytest

from hostdev.messages.runtime.backoff import Backoff, retry


class Flaky(Exception):
    def __init__(self, transient: bool) -> None:
        super().__init__("transient" if transient else "permanent")
        self.transient = transient


def test_delays_double_up_to_the_ceiling_with_jitter_below_each() -> None:
    """Ceilings 1, 2, 4, 8, 8; each delay lies between half its ceiling and the ceiling."""
    backoff = Backoff(first_s=1.0, max_s=8.0, jitter=0.5)
    assert [backoff.ceiling(n) for n in range(5)] == [1, 2, 4, 8, 8]
    assert backoff.delay(3, draw=lambda low, high: low) == 4.0
    assert backoff.delay(3, draw=lambda low, high: high) == 8.0


def test_a_transient_failure_is_retried_a_bounded_number_of_times() -> None:
    """Four calls at most, with three waits between them; the last failure is raised."""
    calls: list[int] = []
    waits: list[float] = []

    def fail() -> None:
        calls.append(1)
        raise Flaky(transient=True)

    with pytest.raises(Flaky):
        retry(fail, transient=lambda e: isinstance(e, Flaky) and e.transient, what="x",
              attempts=4, wait=waits.append)
    assert len(calls) == 4 and len(waits) == 3


def test_a_permanent_failure_is_raised_at_once_and_success_returns() -> None:
    """No wait before a permanent failure; a later success returns its value."""
    waits: list[float] = []
    with pytest.raises(Flaky, match="permanent"):
        retry(lambda: (_ for _ in ()).throw(Flaky(transient=False)),
              transient=lambda e: isinstance(e, Flaky) and e.transient, what="x",
              wait=waits.append)
    assert waits == []
    results = iter([Flaky(transient=True), "ok"])

    def once_flaky() -> str:
        value = next(results)
        if isinstance(value, Exception):
            raise value
        return str(value)

    assert retry(once_flaky, transient=lambda e: True, what="x", wait=waits.append) == "ok"
    assert len(waits) == 1


def test_a_retry_count_past_the_float_range_waits_the_ceiling() -> None:
    """Hours of reconnect attempts (thousands of retries) never overflow the delay."""
    backoff = Backoff(first_s=0.2, max_s=30.0, jitter=1.0)
    assert backoff.ceiling(5000) == 30.0
    assert 0.0 <= backoff.delay(5000) <= 30.0
