"""Benchmarks the hostdev bus against raw kombu on the same broker, in one run.

Figures (medians of interleaved rounds, in a vhost of its own; who goes
first alternates, so both sides share the noise of a busy machine):
- ``rpc``: sequential request/response calls per second over direct reply-to;
  the server runs in another process. hostdev: ``Bus.request`` against a
  ``Bus.consume`` handler (decode, dispatch, answer, confirm, ack). Raw: a
  kombu Producer/Consumer pair doing the same round trip with manual acks.
- ``publish``: persistent commands per second through ``hostdev.commands`` to
  a quorum queue, publisher confirms on. hostdev: ``send_to_agent`` +
  ``wait_for_confirms`` with its window of 100 (and ``mandatory``, so an
  unroutable command is dead-lettered). Raw: a kombu Producer on a
  confirm-mode channel with 100 confirms in flight (kombu's own
  ``confirm_publish`` waits for each one).
- ``consume``: the same persistent commands consumed, decoded and acked.

Both sides do the same work: each encodes every message it sends and decodes
every body it receives exactly once, and both consumers ack the way the bus
does: one ``multiple`` ack after 16 messages or when no more are waiting.

Prints a table, then ``metric=NAME value=NUMBER unit=UNIT`` lines; ratios are
hostdev/raw (goal >= 0.8). Run: ``.venv/bin/python bench/bus.py`` (needs a local
RabbitMQ and rabbitmqctl; the run gets a vhost of its own, see ``scratch.py``).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import statistics
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import kombu
from scratch import vhost

from hostdev.messages.api import ListPciDevicesRequest, PciDeviceList
from hostdev.messages.bus import Bus, BusConfig
from hostdev.messages.codec import decode, encode
from hostdev.messages.commands import StartCommand
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.runtime.logging import configure_logging
from hostdev.messages.values import PciDeviceRow, VmSpec

RPC_ROUNDS = 10
RPC_SLICE = 0.4
PUBLISH_COUNT = 3000
ROUNDS = 8
ACK_BATCH = 16  # as the bus: one multiple ack per 16 messages, or when none is waiting
RAW_API_QUEUE = "bench.raw.api"
RAW_CMD_QUEUE = "bench.raw.agent"
QUORUM = {"x-queue-type": "quorum"}
# Raw publishes go through the same topic exchange as hostdev's commands.
COMMANDS = kombu.Exchange("hostdev.commands", type="topic", durable=True, passive=True)

ANSWER = PciDeviceList(devices=tuple(
    PciDeviceRow(id=i, host_guid="6f1c0b1e-host", host_name="kvm-01",
                 address=PciAddress(f"28:00.{i}"), name="10GE", state="free")
    for i in range(3)))
COMMAND = StartCommand(vm=VmSpec(uuid=str(uuid.uuid4()), name="bench-vm", cpus=4,
                                 memory_mb=8192,
                                 pci_devices=(PciAddress("28:00.1"), PciAddress("28:00.2"))))


# -- servers (run in a child process) ---------------------------------------------


def hostdev_server(url: str, ready: Any, stop: Any) -> None:
    """Serves ListPciDevicesRequest with the hostdev bus until ``stop`` is set."""
    bus = Bus(BusConfig(url=url))
    bus.connect()
    bus.declare_mgmt_queues()
    bus.consume("hostdev.api", {ListPciDevicesRequest: lambda msg, inc: ANSWER})
    bus.call_every(0.2, lambda: bus.stop() if stop.is_set() else None)
    ready.set()
    bus.run()
    bus.close()


def raw_server(url: str, ready: Any, stop: Any) -> None:
    """Serves the same round trip with plain kombu until ``stop`` is set."""
    with kombu.Connection(url) as conn:
        channel = conn.channel()
        channel.basic_qos(0, 50, False)
        producer = kombu.Producer(channel)
        queue = kombu.Queue(RAW_API_QUEUE, durable=True, queue_arguments=QUORUM,
                            channel=channel)
        queue.declare()

        def on_request(_body: Any, message: Any) -> None:
            decode(message.body)
            producer.publish(encode(ANSWER), routing_key=message.properties["reply_to"],
                             correlation_id=message.properties["message_id"],
                             content_type="application/json", content_encoding="binary",
                             delivery_mode=2, serializer=None)
            message.ack()

        with kombu.Consumer(channel, [queue], callbacks=[on_request], accept=None):
            ready.set()
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.2)


def start_server(target: Callable[[str, Any, Any], None], url: str) -> tuple[Any, Any]:
    ctx = mp.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=target, args=(url, ready, stop), daemon=True)
    proc.start()
    if not ready.wait(30):
        raise RuntimeError(f"{target.__name__} did not start")
    return proc, stop


# -- measurements -------------------------------------------------------------------


def rate_of(call: Callable[[], None], seconds: float) -> float:
    """Returns how many sequential ``call()`` complete per second over ``seconds``."""
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        calls += 1
    return calls / (time.perf_counter() - start)


def hostdev_caller(stack: contextlib.ExitStack, url: str) -> Callable[[], None]:
    """Returns one hostdev request/response round trip as a function."""
    bus = Bus(BusConfig(url=url))
    stack.callback(bus.close)
    request = ListPciDevicesRequest()

    def call() -> None:
        bus.request(request, timeout=5)

    return call


def raw_caller(stack: contextlib.ExitStack, url: str) -> Callable[[], None]:
    """Returns the same round trip written with plain kombu."""
    request = ListPciDevicesRequest()
    replies: list[Any] = []
    conn = stack.enter_context(kombu.Connection(url))
    channel = conn.channel()
    producer = kombu.Producer(channel)
    reply_queue = kombu.Queue("amq.rabbitmq.reply-to", no_ack=True, channel=channel)
    stack.enter_context(kombu.Consumer(channel, [reply_queue], no_ack=True, accept=None,
                                       on_message=replies.append))

    def call() -> None:
        mid = str(uuid.uuid4())
        producer.publish(encode(request), routing_key=RAW_API_QUEUE,
                         reply_to="amq.rabbitmq.reply-to", message_id=mid,
                         content_type="application/json",
                         content_encoding="binary", delivery_mode=2, serializer=None)
        while True:
            conn.drain_events(timeout=5)
            if replies and replies[-1].properties.get("correlation_id") == mid:
                decode(replies.pop().body)
                return

    return call


def measure_rpc(url: str, figures: dict[str, list[float]]) -> None:
    """Alternates short slices of both clients so they share the machine's noise."""
    with contextlib.ExitStack() as stack:
        callers = {"rpc_raw": raw_caller(stack, url), "rpc_hostdev": hostdev_caller(stack, url)}
        for call in callers.values():
            for _ in range(200):
                call()
        names = list(callers)
        for round_ in range(RPC_ROUNDS):
            for name in names if round_ % 2 == 0 else reversed(names):
                figures[name].append(rate_of(callers[name], RPC_SLICE))


def publish_hostdev(bus: Bus) -> float:
    start = time.perf_counter()
    for _ in range(PUBLISH_COUNT):
        bus.send_to_agent("bench", COMMAND)
    bus.wait_for_confirms()
    return PUBLISH_COUNT / (time.perf_counter() - start)


def consume_hostdev(bus: Bus, queue: str) -> float:
    handled = [0]

    def on_start(_msg: StartCommand, _inc: Any) -> None:
        handled[0] += 1

    bus.consume(queue, {StartCommand: on_start})
    start = time.perf_counter()
    bus.run(until=lambda: handled[0] >= PUBLISH_COUNT, timeout=60)
    bus.wait_for_confirms()
    return handled[0] / (time.perf_counter() - start)


def publish_raw(conn: kombu.Connection) -> float:
    channel = conn.channel()
    channel.confirm_select()
    confirmed = [0]

    def on_ack(tag: int, _multiple: bool) -> None:
        # One queue: the broker confirms in order, so the highest tag is the watermark.
        confirmed[0] = max(confirmed[0], tag)

    channel.events["basic_ack"].add(on_ack)
    producer = kombu.Producer(channel, exchange=COMMANDS, routing_key="agent.rawbench.StartCommand")
    start = time.perf_counter()
    for sent in range(1, PUBLISH_COUNT + 1):
        producer.publish(encode(COMMAND), content_type="application/json",
                         content_encoding="binary", delivery_mode=2, serializer=None,
                         type="StartCommand",
                         message_id=str(uuid.uuid4()))
        while sent - confirmed[0] >= 100:
            conn.drain_events(timeout=5)
    while confirmed[0] < PUBLISH_COUNT:
        conn.drain_events(timeout=5)
    rate = PUBLISH_COUNT / (time.perf_counter() - start)
    channel.close()
    return rate


def consume_raw(conn: kombu.Connection) -> float:
    """Consumes, decodes and acks like the bus: read what is ready, ack in batches."""
    channel = conn.channel()
    channel.basic_qos(0, 50, False)
    inbox: deque[Any] = deque()
    tag = channel.basic_consume(RAW_CMD_QUEUE, callback=inbox.append)
    raw_conn = conn.connection
    handled = since_ack = 0
    start = time.perf_counter()
    while handled < PUBLISH_COUNT:
        if not inbox:
            raw_conn.drain_events(timeout=5)
            with contextlib.suppress(TimeoutError):
                for _ in range(1000):  # the frames already received, as the bus does
                    raw_conn.drain_events(timeout=0)
            continue
        message = inbox.popleft()
        decode(message.body)
        handled += 1
        since_ack += 1
        if not inbox or since_ack >= ACK_BATCH:
            channel.basic_ack(message.delivery_tag, multiple=True)
            since_ack = 0
    rate = handled / (time.perf_counter() - start)
    channel.basic_cancel(tag)
    channel.close()
    return rate


def main() -> None:
    configure_logging("warning")
    began = time.perf_counter()
    with vhost("bus") as url:
        figures: dict[str, list[float]] = {k: [] for k in (
            "rpc_hostdev", "rpc_raw", "publish_hostdev", "publish_raw",
            "consume_hostdev", "consume_raw")}

        servers = [start_server(hostdev_server, url), start_server(raw_server, url)]
        measure_rpc(url, figures)
        for proc, stop in servers:
            stop.set()
            proc.join(10)

        bus = Bus(BusConfig(url=url))
        bus.connect()
        agent_queue = bus.declare_agent_queue("bench")
        with kombu.Connection(url) as conn:
            kombu.Queue(RAW_CMD_QUEUE, exchange=COMMANDS, routing_key="agent.rawbench.#",
                        durable=True, queue_arguments=QUORUM,
                        channel=conn.default_channel).declare()
            for round_ in range(ROUNDS):
                # Each side publishes into an empty broker and then drains its own
                # queue; who goes first alternates, so neither sees the other's backlog.
                sides = [
                    lambda: (figures["publish_raw"].append(publish_raw(conn)),
                             figures["consume_raw"].append(consume_raw(conn))),
                    lambda: (figures["publish_hostdev"].append(publish_hostdev(bus)),
                             figures["consume_hostdev"].append(consume_hostdev(bus, agent_queue))),
                ]
                for side in sides if round_ % 2 == 0 else reversed(sides):
                    side()
        bus.close()
    report(figures, time.perf_counter() - began)


def report(figures: dict[str, list[float]], elapsed: float) -> None:
    med = {k: statistics.median(v) for k, v in figures.items()}
    rows = [("request/response, sequential", "rpc", "calls/s"),
            ("persistent publish, confirms on", "publish", "msg/s"),
            ("consume + decode + ack", "consume", "msg/s")]
    print(f"{'figure':34} {'hostdev':>10} {'raw kombu':>10} {'ratio':>6}  unit")
    for label, key, unit in rows:
        ratio = med[f"{key}_hostdev"] / med[f"{key}_raw"]
        print(f"{label:34} {med[f'{key}_hostdev']:10.0f} {med[f'{key}_raw']:10.0f} "
              f"{ratio:6.2f}  {unit}")
    print(f"(medians of {RPC_ROUNDS} interleaved slices for rpc, {ROUNDS} alternating rounds "
          f"otherwise; {elapsed:.0f} s in all)")
    for label, key, unit in rows:
        del label
        print(f"metric={key}_hostdev value={med[f'{key}_hostdev']:.0f} unit={unit}")
        print(f"metric={key}_raw_kombu value={med[f'{key}_raw']:.0f} unit={unit}")
        print(f"metric={key}_ratio value={med[f'{key}_hostdev'] / med[f'{key}_raw']:.3f} "
              "unit=ratio")


if __name__ == "__main__":
    main()
