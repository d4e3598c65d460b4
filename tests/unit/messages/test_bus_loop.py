"""Tests of the loop scheduler: timers, calls from other threads, waking."""

from __future__ import annotations

import select
import threading
from collections.abc import Iterator

import pytest

from hostdev.messages.bus.loop import LoopScheduler


@pytest.fixture
def loop() -> Iterator[LoopScheduler]:
    scheduler = LoopScheduler()
    yield scheduler
    scheduler.close()


def test_calls_from_another_thread_run_in_order_and_wake_the_loop(loop: LoopScheduler) -> None:
    """call_soon from any thread makes the wake fd readable and runs the calls in order."""
    ran: list[int] = []
    thread = threading.Thread(target=lambda: [loop.call_soon(lambda n=n: ran.append(n))
                                              for n in range(3)])
    thread.start()
    thread.join()
    readable, _, _ = select.select([loop.wake_fd], [], [], 1.0)
    assert readable
    loop.clear_wake()
    assert select.select([loop.wake_fd], [], [], 0)[0] == []
    assert loop.next_wait(None, 5.0) == 0.0
    loop.run_due()
    assert ran == [0, 1, 2]


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
    strict.close()


def test_next_wait_is_bounded_by_timer_deadline_and_cap(loop: LoopScheduler) -> None:
    """The loop may block until the next timer, the deadline or the cap, whichever is first."""
    import time

    assert loop.next_wait(None, 2.0) == 2.0
    loop.call_every(0.5, lambda: None)
    loop.clear_wake()
    assert 0.0 < loop.next_wait(None, 2.0) <= 0.5
    assert loop.next_wait(time.monotonic() + 0.1, 2.0) <= 0.1


def test_stop_sets_the_flag_and_wakes(loop: LoopScheduler) -> None:
    """stop() is visible to the loop and wakes a blocked select()."""
    loop.stop()
    assert loop.stopping.is_set()
    assert select.select([loop.wake_fd], [], [], 1.0)[0]
