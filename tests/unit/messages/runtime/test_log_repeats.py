"""Repeated identical warnings are written once per interval, with a count of the rest."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from hostdev.messages.runtime.logging import RepeatLimiter, configure_logging


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_hostdev", False)]:
        root.removeHandler(handler)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def passes(limiter: RepeatLimiter, level: str, **fields: Any) -> dict[str, Any] | None:
    """Runs one line through the limiter; returns it, or None when dropped."""
    try:
        return dict(limiter(None, level, dict(fields)))
    except structlog.DropEvent:
        return None


def test_a_repeat_within_the_interval_is_dropped_and_counted_on_the_next_line() -> None:
    """Five identical warnings in a minute give one line; the next minute's says 4 dropped."""
    clock = Clock()
    limiter = RepeatLimiter(60.0, clock=clock)
    lines = [passes(limiter, "warning", event="bus_reconnect_failed", url="amqp://x")
             for _ in range(5)]
    assert lines[0] == {"event": "bus_reconnect_failed", "url": "amqp://x"}
    assert lines[1:] == [None] * 4
    clock.now = 60.0
    assert passes(limiter, "warning", event="bus_reconnect_failed", url="amqp://x") == {
        "event": "bus_reconnect_failed", "url": "amqp://x", "suppressed": 4}
    assert passes(limiter, "warning", event="bus_reconnect_failed", url="amqp://x") is None


def test_lines_differing_in_a_key_field_or_level_are_each_written() -> None:
    """Another event, another field value or another level is another line."""
    limiter = RepeatLimiter(60.0, clock=Clock())
    assert passes(limiter, "warning", event="e", host="a")
    assert passes(limiter, "warning", event="e", host="b")
    assert passes(limiter, "error", event="e", host="a")
    assert passes(limiter, "warning", event="f", host="a")
    assert passes(limiter, "exception", event="e", host="a")
    assert passes(limiter, "exception", event="e", host="a") is None


def test_volatile_fields_do_not_make_a_line_new() -> None:
    """message_id, timestamps and attempt counters differ between repeats of one warning."""
    limiter = RepeatLimiter(60.0, clock=Clock())
    assert passes(limiter, "warning", event="e", message_id="m-1", attempts=1,
                  timestamp="t1")
    assert passes(limiter, "warning", event="e", message_id="m-2", attempts=2,
                  timestamp="t2") is None


def test_info_and_debug_lines_are_never_limited() -> None:
    """Only warnings and worse are rate-limited."""
    limiter = RepeatLimiter(60.0, clock=Clock())
    assert all(passes(limiter, level, event="e") for level in ("info", "debug") * 3)


def test_the_table_of_keys_stays_bounded() -> None:
    """Past max_keys, keys whose interval has passed are forgotten."""
    clock = Clock()
    limiter = RepeatLimiter(1.0, max_keys=10, clock=clock)
    for n in range(10):
        passes(limiter, "warning", event="e", n=n)
    clock.now = 5.0
    assert passes(limiter, "warning", event="e", n=10)
    assert len(limiter._seen) == 1


def test_configure_logging_writes_a_storm_of_one_warning_once() -> None:
    """Both daemons' logging drops the repeats of an identical warning."""
    out = io.StringIO()
    configure_logging("info", stream=out, json=True)
    log = structlog.get_logger()
    for n in range(100):
        log.warning("bus_reconnect_failed", url="amqp://x", attempt=n)
        log.info("tick", n=n)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines].count("bus_reconnect_failed") == 1
    assert [line["event"] for line in lines].count("tick") == 100
