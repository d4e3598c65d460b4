"""Every message survives encode -> decode unchanged, as an example and under hypothesis."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostdev.messages import api, commands, events
from hostdev.messages.base import PROTOCOL_VERSION, Answer, Message
from hostdev.messages.codec import MESSAGE_TYPES, decode, encode
from hostdev.messages.pci_address import PciAddress
from tests.support.message_strategies import example_message, message_strategy

NAMES = sorted(MESSAGE_TYPES)


@pytest.mark.parametrize("name", NAMES)
def test_full_example_round_trips(name: str) -> None:
    """A message with every field set decodes back equal, of the same class."""
    message = example_message(MESSAGE_TYPES[name])
    decoded = decode(encode(message))
    assert type(decoded) is MESSAGE_TYPES[name]
    assert decoded == message


@pytest.mark.parametrize("name", NAMES)
def test_body_is_self_describing(name: str) -> None:
    """The JSON body carries ``type`` = the class name and ``v`` = the protocol version."""
    body = json.loads(encode(example_message(MESSAGE_TYPES[name])))
    assert body["type"] == name
    assert body["v"] == PROTOCOL_VERSION
    assert all(key == key.lower() for key in body if key != "type")


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25)
@given(data=st.data())
def test_generated_messages_round_trip(name: str, data: st.DataObject) -> None:
    """Any generated instance of each message type decodes back equal."""
    message = data.draw(message_strategy(MESSAGE_TYPES[name]))
    assert decode(encode(message)) == message


def test_union_covers_every_message_module() -> None:
    """Each concrete message of commands, api and events is in the union; bases are not."""
    for module in (commands, api, events):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Message) \
                    and value.__module__ == module.__name__:
                abstract = value in (api.ApiRequest, api.ApiResponse, events.Event)
                assert (value.__name__ in MESSAGE_TYPES) is not abstract, value
    assert "Message" not in MESSAGE_TYPES and "Answer" not in MESSAGE_TYPES


def test_messages_are_immutable() -> None:
    """Assigning to a field of a message raises instead of changing it."""
    message = commands.StopCommand(vm_uuid="u")
    with pytest.raises(AttributeError):
        message.vm_uuid = "other"  # type: ignore[misc]


def test_pci_addresses_decode_as_pci_address_in_canonical_form() -> None:
    """Short addresses in a body come back as ``PciAddress`` in the full form."""
    body = b'{"type": "AttachPciDevicesCommand", "v": 1, "vm_uuid": "u", "addresses": ["28:00.1"]}'
    message = decode(body)
    assert isinstance(message, commands.AttachPciDevicesCommand)
    assert message.addresses == ("0000:28:00.1",)
    assert isinstance(message.addresses[0], PciAddress)


def test_absent_v_reads_as_version_one() -> None:
    """A body without ``v`` is read as protocol version 1 (the documented rule)."""
    message = decode(b'{"type": "ListHostsRequest"}')
    assert message == api.ListHostsRequest()
    assert message.v == 1


@pytest.mark.parametrize("body", [
    b'{"type": "StopCommand", "vm_uuid": "u"}',
    bytearray(b'{"type": "StopCommand", "vm_uuid": "u"}'),
    memoryview(b'{"type": "StopCommand", "vm_uuid": "u"}'),
    '{"type": "StopCommand", "vm_uuid": "u"}',
])
def test_decode_accepts_bytes_bytearray_memoryview_and_str(body: bytes | str) -> None:
    """``decode`` takes a body in any of the buffer types a transport may hand over."""
    assert decode(body) == commands.StopCommand(vm_uuid="u")


def test_answers_report_ok() -> None:
    """``Answer.ok`` is true for result ok and false for an ``ErrorAnswer``."""
    assert commands.StopAnswer(vm_uuid="u").ok
    assert not commands.ErrorAnswer(details="boom").ok
    assert issubclass(commands.ErrorAnswer, Answer)


def test_field_order_of_example_is_stable() -> None:
    """The encoding is deterministic: the same message gives the same bytes."""
    message = example_message(commands.StartupRoutingCommand)
    assert encode(message) == encode(msgspec.structs.replace(message))
