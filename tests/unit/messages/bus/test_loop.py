"""Tests of the loop scheduler (timers, calls from other threads, waking) and the wake pipe."""

from __future__ import annotations

import select
import threading
from collections.abc import Iterator

import pytest

from hostdev.messages.bus.loop import LoopScheduler, WakePipe


@pytest.fixture
def pipe() -> Iterator[WakePipe]:
    made = WakePipe()
    yield made
    made.close()


@pytest.fixture
def loop(pipe: WakePipe) -> LoopScheduler:
    return LoopScheduler(wake=pipe.wake)


def test_calls_from_another_thread_run_in_order_and_wake_the_loop(
        loop: LoopScheduler, pipe: WakePipe) -> None:
    """call_soon from any thread wakes the loop (the pipe) and runs the calls in order."""
    ran: list[int] = []
    thread = threading.Thread(target=lambda: [loop.call_soon(lambda n=n: ran.append(n))
                                              for n in range(3)])
    thread.start()
    thread.join()
    readable, _, _ = select.select([pipe.fd], [], [], 1.0)
    assert readable
    pipe.clear()
    assert select.select([pipe.fd], [], [], 0)[0] == []
    assert loop.next_wait(None, 5.0) == 0.0
    assert loop.run_due() is True
    assert ran == [0, 1, 2]
    assert loop.run_due() is False


def test_a_failing_call_is_logged_and_the_next_still_runs(loop: LoopScheduler) -> None:
    """An exception in a queued call does not stop the ones after it."""
    ran: list[str] = []
    def boom() -> None:
        raise ValueError("callback bug")

    loop.call_soon(boom)
    loop.call_soon(lambda: ran.append("after"))
    loop.run_due()
    assert ran == ["after"]


def test_reraised_errors_escape(loop: LoopScheduler) -> None:
    """Errors listed in ``reraise`` (lost connections) propagate to the loop."""
    strict = LoopScheduler(reraise=(ConnectionError,))
    strict.call_soon(lambda: (_ for _ in ()).throw(ConnectionError("gone")))
    with pytest.raises(ConnectionError):
        strict.run_due()


def test_next_wait_is_bounded_by_timer_deadline_and_cap(loop: LoopScheduler) -> None:
    """The loop may block until the next timer, the deadline or the cap, whichever is first."""
    import time

    assert loop.next_wait(None, 2.0) == 2.0
    loop.call_every(0.5, lambda: None)
    assert 0.0 < loop.next_wait(None, 2.0) <= 0.5
    assert loop.next_wait(time.monotonic() + 0.1, 2.0) <= 0.1


def test_stop_sets_the_flag_and_wakes(loop: LoopScheduler, pipe: WakePipe) -> None:
    """stop() is visible to the loop and wakes a blocked select()."""
    loop.stop()
    assert loop.stopping.is_set()
    assert select.select([pipe.fd], [], [], 1.0)[0]


def test_timers_run_on_the_given_clock() -> None:
    """A timer is due when the scheduler's clock says so, not the wall clock."""
    now = [100.0]
    ran: list[float] = []
    loop = LoopScheduler(clock=lambda: now[0])
    loop.call_every(30.0, lambda: ran.append(now[0]))
    assert loop.run_due() is False
    assert loop.next_wait(None, 60.0) == 30.0
    now[0] = 130.0
    assert loop.run_due() is True
    assert ran == [130.0]
