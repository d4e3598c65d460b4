"""The agent's own Prometheus metric: how long each command took, by type and result.

``hostdev_agent_command_duration_seconds{type, result}`` times Start, Stop,
Migrate, Attach and Detach from delivery to answer (``result`` is the
answer's ``ok``/``error``, or ``raised`` when the handler failed before
answering); the pipeline (``hostdev.agent.pipeline``) wraps each command's
handler with ``timed``. The bus counters (``hostdev.messages.runtime.metrics``) and the endpoint
come with the bus; ``serve_agent_metrics`` starts it when ``metrics.port`` is set.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Histogram

from hostdev.messages.base import Message
from hostdev.messages.runtime.metrics import MetricsServer, serve_metrics

COMMAND_DURATION = Histogram(
    "hostdev_agent_command_duration_seconds", "Time from a command's delivery to its answer, "
    "by command type and result (ok, error, raised).", ["type", "result"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0))


def timed(run: Callable[[Any], Message]) -> Callable[[Any], Message]:
    """Wraps a command handler so each call is observed in the duration histogram."""
    @functools.wraps(run)
    def observed(message: Any) -> Message:
        started = time.perf_counter()
        result = "raised"
        try:
            answer = run(message)
            result = str(getattr(answer, "result", "ok"))
            return answer
        finally:
            COMMAND_DURATION.labels(type(message).__name__, result).observe(
                time.perf_counter() - started)
    return observed


def serve_agent_metrics(port: int | None) -> MetricsServer | None:
    """Serves ``/metrics`` (bus counters and command durations) when ``port`` is set."""
    return serve_metrics(port)
