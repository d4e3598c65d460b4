"""structlog set-up for both daemons and the CLI, and per-message context binding.

Only entry points call :func:`configure_logging`; library modules just do
``log = structlog.get_logger()``. While the bus runs a handler it binds
``message_id`` and ``correlation_id`` (:func:`bound_message`) so every line
the handler logs carries them.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import Token
from typing import Any, TextIO

import structlog
from structlog.contextvars import bind_contextvars, reset_contextvars
from structlog.typing import Processor

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}


def parse_level(level: str | int) -> int:
    """Returns the numeric level of ``debug``/``info``/``warning``/``error``/``critical``.

    Raises:
        ValueError: the name is none of those.
    """
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; expected one of "
                         "debug, info, warning, error, critical") from None


#: Fields that differ between repeats of the same warning and so do not tell them apart.
VOLATILE_FIELDS = frozenset({"timestamp", "message_id", "correlation_id", "attempt",
                             "attempts", "retry_in_s"})


class RepeatLimiter:
    """A structlog processor that lets the same warning through once per interval.

    Two lines are the same when they have the same level, event and fields
    (bar :data:`VOLATILE_FIELDS`). A line at warning level or above that
    was emitted less than ``interval_s`` ago is dropped and counted; the next
    one emitted carries ``suppressed`` (how many were dropped meanwhile), so
    a storm of identical warnings costs one line per interval, not one each.
    Lines below warning always pass.
    """

    def __init__(self, interval_s: float = 60.0, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        #: last emission time and repeats dropped since, per line key
        self._seen: dict[tuple[object, ...], tuple[float, int]] = {}

    def __call__(self, _logger: Any, method_name: str,
                 event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        level = logging.ERROR if method_name == "exception" else _LEVELS.get(method_name, 0)
        if level < logging.WARNING:
            return event_dict
        key = (method_name, *sorted((k, repr(v)) for k, v in event_dict.items()
                                    if k not in VOLATILE_FIELDS))
        now = self._clock()
        with self._lock:
            emitted, dropped = self._seen.get(key, (None, 0))
            if emitted is not None and now - emitted < self.interval_s:
                self._seen[key] = (emitted, dropped + 1)
                raise structlog.DropEvent
            if len(self._seen) >= self.max_keys:
                self._forget_older_than(now - self.interval_s)
            self._seen[key] = (now, 0)
        if dropped:
            event_dict["suppressed"] = dropped
        return event_dict

    def _forget_older_than(self, cutoff: float) -> None:
        # Keys whose interval has passed hold nothing worth keeping but a count,
        # which is given up rather than letting the table grow without bound.
        self._seen = {k: v for k, v in self._seen.items() if v[0] >= cutoff}
        if len(self._seen) >= self.max_keys:
            self._seen.clear()


def configure_logging(level: str | int = "info", *, stream: TextIO | None = None,
                      json: bool | None = None) -> None:
    """Configures structlog (and the stdlib loggers of kombu/amqp) to write to ``stream``.

    Args:
        level: the lowest level written.
        stream: where lines go; stderr by default.
        json: JSON lines when True, coloured console lines when False; None picks
            JSON unless ``stream`` is a terminal (journald and log files get JSON).

    Identical warnings (and worse) are written at most once a minute
    (:class:`RepeatLimiter`).
    """
    out = stream if stream is not None else sys.stderr
    numeric = parse_level(level)
    if json is None:
        json = not (hasattr(out, "isatty") and out.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
        tail: list[Processor] = [structlog.processors.dict_tracebacks]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=hasattr(out, "isatty") and out.isatty())
        tail = []
    structlog.configure(
        processors=[*shared, RepeatLimiter(), structlog.processors.StackInfoRenderer(), *tail,
                    renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # kombu and py-amqp log through the stdlib; render their lines the same way.
    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail, renderer],
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
    ))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_hostdev", False):
            root.removeHandler(old)
    handler._hostdev = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    # kombu, amqp and pika are chatty at INFO: only their warnings, unless debugging.
    root.setLevel(numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING))


class BoundMessage:
    """Binds a message's ids to every log line while entered; see :func:`bound_message`.

    A plain context manager rather than a generator one: the bus enters one
    per delivery, and this saves about a microsecond each over
    ``contextlib.contextmanager``.
    """

    __slots__ = ("_context", "_tokens")

    def __init__(self, context: dict[str, Any]) -> None:
        self._context = context
        self._tokens: Mapping[str, Token[Any]] = {}

    def __enter__(self) -> None:
        self._tokens = bind_contextvars(**self._context)

    def __exit__(self, *exc_info: object) -> None:
        # Resetting with the tokens restores what was bound before (nested bindings).
        reset_contextvars(**self._tokens)


def bound_message(message_id: str | None, correlation_id: str | None,
                  **extra: Any) -> BoundMessage:
    """Binds ``message_id``, ``correlation_id`` (and ``extra``) to every log line inside."""
    return BoundMessage({"message_id": message_id, "correlation_id": correlation_id, **extra})


def debug_enabled() -> bool:
    """Tells whether debug lines are written now, for a debug line costly to build.

    Asking the configured wrapper class costs a fraction of a debug call that is
    then dropped: every call on a module's lazy logger assembles a bound logger
    first (loggers are not cached, so a later ``configure_logging`` applies).
    """
    wrapper = structlog.get_config()["wrapper_class"]
    is_enabled_for = getattr(wrapper, "is_enabled_for", None)
    # structlog's filtering loggers answer from the class (the method ignores self).
    return is_enabled_for is None or bool(is_enabled_for(wrapper, logging.DEBUG))
