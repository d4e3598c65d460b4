"""Tests of the structlog set-up and the per-message context."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from hostdev.messages.runtime.logging import (
    bound_message,
    configure_logging,
    debug_enabled,
    parse_level,
)


@pytest.fixture(autouse=True)
def _restore_structlog() -> object:
    yield None
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_hostdev", False)]:
        root.removeHandler(handler)


def test_json_lines_carry_the_bound_message_ids() -> None:
    """Off a terminal, lines are JSON and carry message_id/correlation_id while bound."""
    out = io.StringIO()
    configure_logging("info", stream=out)
    log = structlog.get_logger()
    with bound_message("m-1", "c-1", queue="hostdev.mgmt"):
        log.info("vm_started", vm="vm-1")
    log.info("after")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == "vm_started" and first["message_id"] == "m-1"
    assert first["correlation_id"] == "c-1" and first["queue"] == "hostdev.mgmt"
    assert first["level"] == "info" and "timestamp" in first
    assert "message_id" not in second


def test_a_nested_binding_restores_the_outer_one_on_exit() -> None:
    """Leaving an inner bound_message brings back the ids bound around it."""
    out = io.StringIO()
    configure_logging("info", stream=out)
    log = structlog.get_logger()
    with bound_message("outer", None, host="h1"):
        with bound_message("inner", "c-2"):
            log.info("in")
        log.info("out")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert (first["message_id"], first["correlation_id"], first["host"]) == ("inner", "c-2", "h1")
    assert (second["message_id"], second["correlation_id"]) == ("outer", None)


@pytest.mark.parametrize(("level", "enabled"), [("debug", True), ("info", False),
                                                 ("error", False)])
def test_debug_enabled_follows_the_configured_level(level: str, enabled: bool) -> None:
    """debug_enabled() says whether a debug line would be written, after each configure."""
    configure_logging(level, stream=io.StringIO())
    assert debug_enabled() is enabled


def test_debug_is_enabled_before_any_configuration() -> None:
    """structlog's defaults write every level, so debug lines are built then too."""
    structlog.reset_defaults()
    assert debug_enabled() is True


def test_level_filters_lower_levels() -> None:
    """Lines below the configured level are not written."""
    out = io.StringIO()
    configure_logging("warning", stream=out)
    structlog.get_logger().info("quiet")
    structlog.get_logger().warning("loud")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["loud"]


def test_console_renderer_when_asked() -> None:
    """json=False renders human-readable lines instead of JSON."""
    out = io.StringIO()
    configure_logging("info", stream=out, json=False)
    structlog.get_logger().info("hello", who="operator")
    line = out.getvalue()
    assert "hello" in line and "who" in line and not line.startswith("{")


def test_unknown_level_is_refused_with_the_choices() -> None:
    """An unknown level name raises ValueError listing the valid ones."""
    with pytest.raises(ValueError, match="debug, info, warning"):
        parse_level("loud")
