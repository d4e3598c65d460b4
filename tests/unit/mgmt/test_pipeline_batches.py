"""Tests of the pipeline's batch seam on a real SQLite database: trust per message, fallback."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import Engine

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import Incoming
from hostdev.messages.commands import PingRoutingCommand, StartupAnswer
from hostdev.mgmt.errors import Forbidden
from hostdev.mgmt.persistence.unit_of_work import TxContext, UnitOfWork
from hostdev.mgmt.pipeline import Pipeline, Route, always


def _incoming(guid: str) -> Incoming:
    return Incoming(message_id=f"m-{guid}", correlation_id=None, reply_to=None,
                    user_id="guest", routing_key=f"mgmt.{guid}.PingRoutingCommand",
                    redelivered=False)


def _refuse_gx(message: Any, _incoming: Incoming) -> None:
    if message.guid == "gx":
        raise Forbidden("gx may not speak")


def _reraise(_message: Any, _incoming: Incoming, exc: Exception) -> None:
    raise exc


def _pings(*guids: str) -> list[tuple[PingRoutingCommand, Incoming]]:
    return [(PingRoutingCommand(guid=guid), _incoming(guid)) for guid in guids]


def test_a_run_takes_what_it_can_and_hands_the_rest_to_the_route(engine: Engine) -> None:
    """Checked pings go to the batch work in one transaction; refused and untaken ones do not."""
    alone: list[str] = []
    batches: list[list[str]] = []

    def batch(tx: TxContext, items: Sequence[tuple[Any, Incoming]]) -> list[bool]:
        batches.append([message.guid for message, _ in items])
        return [message.guid != "gb" for message, _ in items]

    pipeline = Pipeline(UnitOfWork(engine), lambda m, i: {}, _refuse_gx, _reraise)
    handle = pipeline.batch_handler(
        PingRoutingCommand, Route(lambda tx, m, i: alone.append(m.guid)), batch)
    results = handle(_pings("ga", "gx", "gb"))
    assert batches == [["ga", "gb"]]
    assert alone == ["gb"]
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], Forbidden)


def test_a_failed_run_is_handled_one_message_at_a_time(engine: Engine) -> None:
    """When the run's transaction fails, each of its messages goes through its route alone."""
    alone: list[str] = []

    def broken(tx: TxContext, items: Sequence[tuple[Any, Incoming]]) -> list[bool]:
        raise RuntimeError("the batch statement failed")

    pipeline = Pipeline(UnitOfWork(engine), lambda m, i: {}, _refuse_gx, _reraise)
    handle = pipeline.batch_handler(
        PingRoutingCommand, Route(lambda tx, m, i: alone.append(m.guid)), broken)
    assert handle(_pings("ga", "gb")) == [None, None]
    assert alone == ["ga", "gb"]


def test_a_batch_refuses_a_route_that_records_ids(engine: Engine) -> None:
    """A route that records message ids cannot be batched: the batch keeps none."""
    pipeline = Pipeline(UnitOfWork(engine), lambda m, i: {}, _refuse_gx, _reraise)
    with pytest.raises(ValueError, match="record=never"):
        pipeline.batch_handler(PingRoutingCommand, Route(lambda tx, m, i: None, always),
                               lambda tx, items: [])


def test_a_batch_answer_is_sent_for_the_message_it_answers(engine: Engine) -> None:
    """A batch work may answer what it takes: the answer is the message's result."""
    answer = StartupAnswer(host_id=7, ping_interval_s=30)

    def batch(tx: TxContext, items: Sequence[tuple[Any, Incoming]]) -> list[bool | Message]:
        return [answer if message.guid == "ga" else False for message, _ in items]

    alone: list[str] = []
    pipeline = Pipeline(UnitOfWork(engine), lambda m, i: {}, _refuse_gx, _reraise)
    handle = pipeline.batch_handler(
        PingRoutingCommand, Route(lambda tx, m, i: alone.append(m.guid)), batch)
    assert handle(_pings("ga", "gb")) == [answer, None]
    assert alone == ["gb"]
