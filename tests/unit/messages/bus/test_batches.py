"""Tests of runs of deliveries handed to a batch handler (``contract.Batching``), in process."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import Batching, Incoming
from hostdev.messages.bus.in_process import FakeClock, InProcessBroker, InProcessBus
from hostdev.messages.bus.in_process_broker import Envelope
from hostdev.messages.commands import ErrorAnswer, StopAnswer, StopCommand
from hostdev.messages.errors import TransientError


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker(clock=FakeClock())


def _agent(broker: InProcessBroker) -> tuple[InProcessBus, str]:
    bus = InProcessBus(broker=broker)
    bus.connect()
    bus.declare_mgmt_queues()  # where error answers go
    return bus, bus.declare_agent_queue("g1")


def test_consecutive_deliveries_form_runs_that_another_type_ends(
        broker: InProcessBroker) -> None:
    """Stops in a row reach the batch handler together; an answer between them splits the run."""
    bus, queue = _agent(broker)
    calls: list[Any] = []

    def stops(items: Sequence[tuple[StopCommand, Incoming]]) -> list[Message | None]:
        calls.append([message.vm_uuid for message, _ in items])
        return [None] * len(items)

    bus.consume(queue, {ErrorAnswer: lambda m, i: calls.append(m.details)},
                {StopCommand: Batching(stops, max_size=3)})
    for name in ("a", "b"):
        bus.send_to_agent("g1", StopCommand(vm_uuid=name))
    bus.send_to_agent("g1", ErrorAnswer(details="between"))
    for name in ("c", "d", "e", "f"):
        bus.send_to_agent("g1", StopCommand(vm_uuid=name))
    broker.drain()
    assert calls == [["a", "b"], "between", ["c", "d", "e"], ["f"]]
    assert broker.pending(queue) == [] and broker.dead_letters() == []


def test_types_sharing_one_batching_share_runs(broker: InProcessBroker) -> None:
    """Two types given the same Batching come in one run, in queue order; another type ends it."""
    bus, queue = _agent(broker)
    calls: list[Any] = []

    def mixed(items: Sequence[tuple[Message, Incoming]]) -> list[Message | None]:
        calls.append([type(message).__name__ for message, _ in items])
        return [None] * len(items)

    shared = Batching(mixed, max_size=10)
    bus.consume(queue, {ErrorAnswer: lambda m, i: calls.append(m.details)},
                {StopCommand: shared, StopAnswer: shared})
    bus.send_to_agent("g1", StopCommand(vm_uuid="a"))
    bus.send_to_agent("g1", StopAnswer(vm_uuid="a", state="stopped"))
    bus.send_to_agent("g1", StopCommand(vm_uuid="b"))
    bus.send_to_agent("g1", ErrorAnswer(details="between"))
    bus.send_to_agent("g1", StopAnswer(vm_uuid="b", state="stopped"))
    broker.drain()
    assert calls == [["StopCommand", "StopAnswer", "StopCommand"], "between", ["StopAnswer"]]
    assert broker.pending(queue) == [] and broker.dead_letters() == []


def test_each_delivery_of_a_run_is_judged_alone(broker: InProcessBroker) -> None:
    """A refused item is dead-lettered, a transient one requeued; the others are acked."""
    bus, queue = _agent(broker)
    runs: list[list[str]] = []

    def stops(items: Sequence[tuple[StopCommand, Incoming]]) -> list[Message | Exception | None]:
        runs.append([message.vm_uuid for message, _ in items])
        verdicts: dict[str, Exception | None] = {
            "refused": ValueError("no such VM here"),
            "busy": TransientError("try later") if len(runs) == 1 else None}
        return [verdicts.get(message.vm_uuid) for message, _ in items]

    bus.consume(queue, {}, {StopCommand: Batching(stops)})
    for name in ("ok", "refused", "busy"):
        bus.send_to_agent("g1", StopCommand(vm_uuid=name))
    broker.drain()
    assert runs == [["ok", "refused", "busy"], ["busy"]]
    dead = broker.dead_letters()
    assert len(dead) == 1 and "ValueError: no such VM here" in dead[0].reason
    assert broker.pending(queue) == []


def test_an_undecodable_delivery_in_a_run_costs_no_other(broker: InProcessBroker) -> None:
    """Garbage between stops is dead-lettered with its reason; the stops around it are handled."""
    bus, queue = _agent(broker)
    handled: list[str] = []

    def stops(items: Sequence[tuple[StopCommand, Incoming]]) -> list[Message | None]:
        handled.extend(message.vm_uuid for message, _ in items)
        return [None] * len(items)

    bus.consume(queue, {}, {StopCommand: Batching(stops)})
    bus.send_to_agent("g1", StopCommand(vm_uuid="before"))
    broker.route(Envelope("hostdev.commands", "agent.g1.StopCommand", b"{not json", {}),
                 mandatory=True)
    bus.send_to_agent("g1", StopCommand(vm_uuid="after"))
    broker.drain()
    assert handled == ["before", "after"]
    dead = broker.dead_letters()
    assert len(dead) == 1 and "undecodable" in dead[0].reason


def test_a_batch_handler_that_raises_fails_each_delivery_of_its_run(
        broker: InProcessBroker) -> None:
    """A batch handler's own exception dead-letters every delivery of the run, with the reason."""
    bus, queue = _agent(broker)

    def broken(items: Sequence[tuple[StopCommand, Incoming]]) -> list[Message | None]:
        raise RuntimeError("handler bug")

    bus.consume(queue, {}, {StopCommand: Batching(broken)})
    for name in ("a", "b"):
        bus.send_to_agent("g1", StopCommand(vm_uuid=name))
    broker.drain()
    reasons = [d.reason for d in broker.dead_letters()]
    assert len(reasons) == 2 and all("handler bug" in r for r in reasons)


def test_batching_refuses_sizes_that_cannot_work() -> None:
    """A run of no message, or a negative linger, is refused with the values named."""
    with pytest.raises(ValueError, match="max_size >= 1"):
        Batching(lambda items: [], max_size=0)


def test_a_lone_delivery_without_linger_is_handled_at_once(broker: InProcessBroker) -> None:
    """In the bus's own loop, a run with ``linger_s=0`` is handed over once nothing else waits."""
    bus, queue = _agent(broker)
    calls: list[Any] = []

    def stops(items: Sequence[tuple[StopCommand, Incoming]]) -> list[Message | None]:
        calls.append([message.vm_uuid for message, _ in items])
        return [None] * len(items)

    bus.consume(queue, {}, {StopCommand: Batching(stops, linger_s=0.0)})
    bus.send_to_agent("g1", StopCommand(vm_uuid="a"))
    started = time.monotonic()
    bus.run(until=lambda: bool(calls), timeout=30.0)
    # The loop returned because the run was handled, not at its timeout.
    assert calls == [["a"]] and time.monotonic() - started < 5.0


def test_interleaved_queues_collect_a_run_each_and_settle_in_the_order_taken(
        broker: InProcessBroker) -> None:
    """Deliveries of two queues taken in turns make one run per queue, not runs of one;
    they are settled in the order they were taken (acks keep delivery order)."""
    bus = InProcessBus(broker=broker)
    bus.connect()
    bus.declare_mgmt_queues()
    queues = {guid: bus.declare_agent_queue(guid) for guid in ("g1", "g2")}
    calls: list[tuple[str, list[str]]] = []
    taken: list[str] = []
    settled: list[str] = []

    def stops_of(guid: str) -> Any:
        def stops(items: Sequence[tuple[StopCommand, Incoming]]) -> list[Message | None]:
            calls.append((guid, [message.vm_uuid for message, _ in items]))
            return [None] * len(items)
        return stops

    for guid, queue in queues.items():
        bus.consume(queue, {}, {StopCommand: Batching(stops_of(guid), max_size=10)})
    link: Any = bus._link  # the order the bus takes and settles in
    take, ack = link.take, link.ack

    def spy_take() -> Any:
        delivery = take()
        if delivery is not None:
            taken.append(delivery.properties["message_id"])
        return delivery

    def spy_ack(delivery: Any) -> None:
        settled.append(delivery.properties["message_id"])
        ack(delivery)

    link.take, link.ack = spy_take, spy_ack
    for name in ("a", "b", "c"):
        bus.send_to_agent("g1", StopCommand(vm_uuid=name))
        bus.send_to_agent("g2", StopCommand(vm_uuid=name.upper()))
    broker.drain()
    assert sorted(calls) == [("g1", ["a", "b", "c"]), ("g2", ["A", "B", "C"])]
    assert len(taken) == 6 and settled == taken
    assert all(broker.pending(queue) == [] for queue in queues.values())


def test_another_type_on_one_queue_ends_every_run(broker: InProcessBroker) -> None:
    """A delivery that ends its own queue's run handles the other queue's run too, first."""
    bus = InProcessBus(broker=broker)
    bus.connect()
    bus.declare_mgmt_queues()
    queues = {guid: bus.declare_agent_queue(guid) for guid in ("g1", "g2")}
    calls: list[Any] = []

    def stops(items: Sequence[tuple[StopCommand, Incoming]]) -> list[Message | None]:
        calls.append(sorted(message.vm_uuid for message, _ in items))
        return [None] * len(items)

    for queue in queues.values():
        bus.consume(queue, {ErrorAnswer: lambda m, i: calls.append(m.details)},
                    {StopCommand: Batching(stops, max_size=10)})
    bus.send_to_agent("g1", StopCommand(vm_uuid="a"))
    bus.send_to_agent("g2", StopCommand(vm_uuid="b"))
    bus.send_to_agent("g1", ErrorAnswer(details="between"))
    broker.drain()
    # Both runs are handled before the error answer, in the order they began.
    assert calls == [["a"], ["b"], "between"]
