"""Reading what the broker sent: whole frames only, from a buffer filled in chunks.

py-amqp's own TCP transport runs over one end of a socket pair; the test
writes AMQP frames into the other end, so no broker is needed.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from amqp.exceptions import UnexpectedFrame
from amqp.transport import TCPTransport

from hostdev.messages.bus.amqp_message import CONNECTION_ERRORS, drain_ready, wait_readable


def frame(payload: bytes, *, kind: int = 1, channel: int = 1) -> bytes:
    """Returns one AMQP frame: type, channel, payload size, payload, end octet."""
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


class FrameConnection:
    """The part of ``amqp.Connection`` the reader uses; each frame counts as a method.

    A frame whose payload is ``read-next`` makes the handler read the next frame
    itself, as py-amqp does when a callback publishes (it drains pending events).
    """

    def __init__(self, transport: TCPTransport) -> None:
        self.transport = transport
        self.payloads: list[bytes] = []

    @property
    def sock(self) -> socket.socket:
        return self.transport.sock

    def on_inbound_frame(self, frame: tuple[int, int, bytes]) -> bool:
        payload = bytes(frame[2])
        self.payloads.append(payload)
        if payload == b"read-next":
            self.payloads.append(b"inner:" + bytes(self.transport.read_frame()[2]))
        return True


@pytest.fixture
def pair() -> Iterator[tuple[Any, socket.socket]]:
    """A FrameConnection on py-amqp's TCP transport, and the broker's end of the socket."""
    ours, broker = socket.socketpair()
    transport = TCPTransport("localhost:5672")
    transport.sock = ours
    transport._setup_transport()
    yield FrameConnection(transport), broker
    ours.close()
    broker.close()


def test_a_frame_split_across_reads_is_parsed_once_whole(
        pair: tuple[Any, socket.socket]) -> None:
    """Half a frame waits in the buffer; the rest completes it, and no byte is lost."""
    conn, broker = pair
    first, second = frame(b"a" * 100), frame(b"b" * 10)
    broker.sendall(first[:50])
    assert drain_ready(conn) == 0
    broker.sendall(first[50:] + second)
    assert drain_ready(conn) == 2
    assert conn.payloads == [b"a" * 100, b"b" * 10]


def test_a_frame_larger_than_one_read_chunk_arrives_whole(
        pair: tuple[Any, socket.socket]) -> None:
    """A body frame of 100 kB (many recv() chunks) is parsed as one frame."""
    conn, broker = pair
    body = bytes(range(256)) * 400
    broker.sendall(frame(body) + frame(b"next"))
    done = 0
    while done < 2:
        assert wait_readable(conn, None, 5.0)
        done += drain_ready(conn)
    assert conn.payloads == [body, b"next"]


def test_frames_left_in_the_buffer_count_as_readable(pair: tuple[Any, socket.socket]) -> None:
    """Stopped at its limit with frames buffered, the reader is not left waiting on the socket."""
    conn, broker = pair
    broker.sendall(frame(b"1") + frame(b"2") + frame(b"3"))
    assert wait_readable(conn, None, 5.0)
    assert drain_ready(conn, limit=1) == 1
    # Everything sent is buffered by now: only the buffer can make this true at once.
    assert wait_readable(conn, None, 0.0)
    assert drain_ready(conn) == 2
    assert conn.payloads == [b"1", b"2", b"3"]
    assert not wait_readable(conn, None, 0.0)


def test_a_closed_connection_is_a_connection_error(pair: tuple[Any, socket.socket]) -> None:
    """The broker closing the socket surfaces as ConnectionError (recoverable)."""
    conn, broker = pair
    broker.sendall(frame(b"last"))
    broker.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionError):
        drain_ready(conn)
    assert conn.payloads == [b"last"]


def test_a_read_made_while_a_frame_is_handled_continues_with_the_next_frame(
        pair: tuple[Any, socket.socket]) -> None:
    """The frames after the one being handled stay in py-amqp's buffer, in order."""
    conn, broker = pair
    broker.sendall(frame(b"read-next") + frame(b"2") + frame(b"3"))
    assert wait_readable(conn, None, 5.0)
    drain_ready(conn)
    assert conn.payloads == [b"read-next", b"inner:2", b"3"]


def test_a_frame_without_its_end_octet_is_refused(pair: tuple[Any, socket.socket]) -> None:
    """A corrupt frame raises UnexpectedFrame, which the bus treats as a lost connection."""
    conn, broker = pair
    broker.sendall(frame(b"ok") + frame(b"bad")[:-1] + b"\x00")
    assert wait_readable(conn, None, 5.0)
    with pytest.raises(UnexpectedFrame):
        drain_ready(conn)
    assert conn.payloads == [b"ok"]
    assert issubclass(UnexpectedFrame, CONNECTION_ERRORS)


def test_a_dead_letter_copy_is_marked_as_ours_and_fits_in_a_frame() -> None:
    """The copy names our login twice, drops the sender's hostdev and x-death headers, caps all."""
    import amqp

    from hostdev.messages.bus.amqp_message import dead_letter_copy
    from hostdev.messages.bus.contract import DEAD_LETTERED_BY_HEADER, HEADER_LIMIT, REASON_HEADER

    original = amqp.Message(b"{}", user_id="agent-a", expiration="1000", application_headers={
        DEAD_LETTERED_BY_HEADER: "hostdev-mgmt", "x-hostdev-user-id": "agent-b",
        "x-death": [{"queue": "hostdev.mgmt"}], "x-first-death-queue": "hostdev.mgmt",
        "trace": "t-1"})
    original.delivery_info = {"exchange": "hostdev.commands", "routing_key": "mgmt.a.Ping"}
    copy = dead_letter_copy(original, queue="hostdev.mgmt", reason="r" * 1_000_000,
                            user_id="hostdev-mgmt")
    headers = copy.properties["application_headers"]
    assert copy.properties["user_id"] == headers[DEAD_LETTERED_BY_HEADER] == "hostdev-mgmt"
    assert headers["x-hostdev-user-id"] == "agent-a"
    assert "x-death" not in headers and "x-first-death-queue" not in headers
    assert headers["trace"] == "t-1"
    assert len(headers[REASON_HEADER].encode()) <= HEADER_LIMIT
    assert "expiration" not in copy.properties


def test_a_sender_without_user_id_cannot_name_one_in_a_dead_letter() -> None:
    """A forged x-hostdev-user-id header is dropped, not passed on as the sender."""
    import amqp

    from hostdev.messages.bus.amqp_message import dead_letter_copy

    original = amqp.Message(b"{}", application_headers={"x-hostdev-user-id": "agent-b"})
    copy = dead_letter_copy(original, queue="q", reason="why", user_id="hostdev-mgmt")
    assert "x-hostdev-user-id" not in copy.properties["application_headers"]


def test_huge_sender_headers_are_dropped_from_a_dead_letter() -> None:
    """Headers over 64 kB are replaced by a note, so the copy still fits in one frame."""
    import amqp

    from hostdev.messages.bus.amqp_message import dead_letter_copy

    original = amqp.Message(b"{}", application_headers={"big": "b" * 100_000})
    copy = dead_letter_copy(original, queue="q", reason="why", user_id="hostdev-mgmt")
    headers = copy.properties["application_headers"]
    assert "big" not in headers and "x-hostdev-headers-dropped" in headers
