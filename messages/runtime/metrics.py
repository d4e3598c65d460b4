"""Prometheus metrics of the bus, shared by both daemons, and the HTTP endpoint that serves them.

The counters live in prometheus-client's default registry, so every bus of a
process adds to them (the demo's management and agents count together):

- ``hostdev_messages_handled_total{type, outcome}``: deliveries by decoded
  message type (``undecodable`` when decoding failed) and what became of
  them: ``ack``, ``requeue`` (transient failure) or ``dead``;
- ``hostdev_messages_dead_lettered_total{type}``: those sent to ``hostdev.dead``;
- ``hostdev_bus_reconnects_total``: connections re-established after a loss.

``serve_metrics(port)`` starts the ``/metrics`` endpoint on a daemon thread;
each daemon calls it when ``metrics.port`` is set (off by default). Extra
collectors (management's inventory, computed at scrape time) are passed in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, Counter, start_http_server
from prometheus_client.metrics_core import Metric

log = structlog.get_logger()

MESSAGES_HANDLED = Counter(
    "hostdev_messages_handled", "Deliveries handled, by message type and outcome "
    "(ack, requeue, dead).", ["type", "outcome"])
MESSAGES_DEAD_LETTERED = Counter(
    "hostdev_messages_dead_lettered", "Deliveries sent to hostdev.dead, by message type.",
    ["type"])
BUS_RECONNECTS = Counter(
    "hostdev_bus_reconnects", "AMQP connections re-established after a loss.")

#: Type label of a delivery whose body did not decode.
UNDECODABLE = "undecodable"

F = TypeVar("F", bound=Callable[..., Any])


class _Outcome(Protocol):
    @property
    def action(self) -> str: ...

    @property
    def message_type(self) -> str | None: ...


OutcomeT = TypeVar("OutcomeT", bound=_Outcome)


_HANDLED: dict[tuple[str, str], Counter] = {}
_DEAD: dict[str, Counter] = {}


def count(outcome: OutcomeT) -> OutcomeT:
    """Counts one delivery's outcome by type and returns it.

    The labelled counters are looked up once per (type, outcome) and kept:
    ``labels()`` takes a lock and checks its arguments, on every delivery
    otherwise.
    """
    kind = outcome.message_type or UNDECODABLE
    action = outcome.action
    try:
        child = _HANDLED[kind, action]
    except KeyError:
        child = _HANDLED[kind, action] = MESSAGES_HANDLED.labels(kind, action)
    child.inc()
    if action == "dead":
        try:
            dead_child = _DEAD[kind]
        except KeyError:
            dead_child = _DEAD[kind] = MESSAGES_DEAD_LETTERED.labels(kind)
        dead_child.inc()
    return outcome


def count_outcome(handle: F) -> F:
    """Wraps a function returning a delivery's outcome to :func:`count` each one it returns."""

    @functools.wraps(handle)
    def counted(*args: Any, **kwargs: Any) -> Any:
        return count(handle(*args, **kwargs))
    return counted  # type: ignore[return-value]


def bus_reconnected() -> None:
    """Counts one re-established connection."""
    BUS_RECONNECTS.inc()


class Collector(Protocol):
    """What prometheus-client collects from: anything with ``collect()``."""

    def collect(self) -> Iterable[Metric]: ...


class _Union:
    """Collects from several collectors (the default registry and a daemon's own)."""

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self.collectors = tuple(collectors)

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


class MetricsServer:
    """The running ``/metrics`` endpoint; ``close()`` stops it."""

    def __init__(self, port: int, address: str, extra: Iterable[Collector]) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Union((REGISTRY, *extra)))
        self.registry = registry
        self._server, self._thread = start_http_server(port, addr=address, registry=registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        """Stops serving and closes the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(port: int | None, *, address: str = "0.0.0.0",
                  extra: Iterable[Collector] = ()) -> MetricsServer | None:
    """Serves ``/metrics`` on ``port`` (0: any free port); None when ``port`` is None.

    A port that cannot be bound is logged (``metrics_unavailable``) and the
    daemon runs on without metrics: they must not take a host's agent down.
    """
    if port is None:
        return None
    try:
        server = MetricsServer(port, address, extra)
    except OSError as exc:
        log.error("metrics_unavailable", port=port, address=address, error=str(exc),
                  hint="free the port or change metrics.port, then restart")
        return None
    log.info("metrics_serving", port=server.port, address=address)
    return server
