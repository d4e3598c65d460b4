"""Each way a body can be wrong raises its MessageError subclass with a text that helps."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hostdev.messages.codec import MESSAGE_TYPES, decode
from hostdev.messages.errors import (
    DecodeError,
    InvalidFieldError,
    MalformedBodyError,
    MessageError,
    UnknownTypeError,
    UnsupportedVersionError,
)

VM = {"uuid": "u", "name": "vm1", "cpus": 1, "memory_mb": 512}


def body(**fields: Any) -> bytes:
    """Encodes a JSON object body from keyword fields (``type`` first)."""
    return json.dumps(fields).encode()


def decode_error(raw: bytes | str) -> DecodeError:
    """Decodes ``raw`` and returns the DecodeError it must raise."""
    with pytest.raises(DecodeError) as caught:
        decode(raw)
    return caught.value


# (body, error class, message type, field path, fragments the text must contain)
FIELD_CASES = [
    pytest.param(
        body(type="StopCommand", v=1), InvalidFieldError, "StopCommand", "$.vm_uuid",
        ["missing", "expected a string"], id="missing-field",
    ),
    pytest.param(
        body(type="StartCommand", vm={"uuid": "u", "name": "n", "cpus": 1}),
        InvalidFieldError, "StartCommand", "$.vm.memory_mb",
        ["missing", "expected an integer"], id="missing-nested-field",
    ),
    pytest.param(
        body(type="StopCommand", vm_uuid="u", colour="red"), InvalidFieldError, "StopCommand",
        "$.colour", ["unknown field", "expected only", "vm_uuid", "timeout_s"],
        id="unknown-field",
    ),
    pytest.param(
        body(type="StartCommand", vm={**VM, "gpu": True}), InvalidFieldError, "StartCommand",
        "$.vm.gpu", ["unknown field", "expected only", "memory_mb"], id="unknown-nested-field",
    ),
    pytest.param(
        body(type="StopCommand", vm_uuid=42), InvalidFieldError, "StopCommand", "$.vm_uuid",
        ["Expected `str`", "got `int`"], id="wrong-type",
    ),
    pytest.param(
        body(type="StartCommand", vm={**VM, "cpus": "two"}), InvalidFieldError, "StartCommand",
        "$.vm.cpus", ["Expected `int`", "got `str`"], id="wrong-nested-type",
    ),
    pytest.param(
        body(type="AttachPciDevicesCommand", vm_uuid="u", addresses="28:00.1"),
        InvalidFieldError, "AttachPciDevicesCommand", "$.addresses", ["Expected `array`"],
        id="string-for-array",
    ),
    pytest.param(
        body(type="StopAnswer", vm_uuid="u", state="asleep"), InvalidFieldError, "StopAnswer",
        "$.state", ["'asleep'", "expected one of", "'running'"], id="bad-enum-value",
    ),
    pytest.param(
        body(type="StopCommand", vm_uuid="u", v="1"), InvalidFieldError, "StopCommand", "$.v",
        ['"1"', "expected an integer"], id="v-not-an-integer",
    ),
    pytest.param(
        body(type="StopCommand", vm_uuid="u", v=None), InvalidFieldError, "StopCommand", "$.v",
        ["null", "expected an integer"], id="v-null",
    ),
    pytest.param(
        body(type="AttachPciDevicesCommand", vm_uuid="u", addresses=["28:00.1", "28:00.8"]),
        InvalidFieldError, "AttachPciDevicesCommand", "$.addresses[1]",
        ["'28:00.8'", "function", "expected [domain:]bus:slot.function"], id="bad-pci-function",
    ),
    pytest.param(
        body(type="StartupRoutingCommand", guid="g", name="h", cpus=4, memory_mb=1024,
             pci_devices=[{"address": "zz:00.0", "name": "10GE"}]),
        InvalidFieldError, "StartupRoutingCommand", "$.pci_devices[0].address",
        ["'zz:00.0'", "bus", "hexadecimal"], id="bad-pci-bus-nested",
    ),
    pytest.param(
        body(type="MigrateAnswer", vm_uuid="u", refused_device="28:20.0"), InvalidFieldError,
        "MigrateAnswer", "$.refused_device", ["'28:20.0'", "slot", "0x1f"],
        id="bad-pci-slot-optional",
    ),
    pytest.param(
        body(type="DetachPciDevicesCommand", vm_uuid="u", addresses=[2800]),
        InvalidFieldError, "DetachPciDevicesCommand", "$.addresses[0]",
        ["must be a string", "0000:28:00.1"], id="pci-not-a-string",
    ),
]


@pytest.mark.parametrize(("raw", "error", "message_type", "field", "fragments"), FIELD_CASES)
def test_field_errors_name_message_field_and_expectation(
    raw: bytes, error: type[DecodeError], message_type: str, field: str, fragments: list[str]
) -> None:
    """A bad field raises its subclass; the text names message, field path and expectation."""
    exc = decode_error(raw)
    assert type(exc) is error
    assert isinstance(exc, MessageError)
    assert exc.message_type == message_type
    assert exc.field == field
    text = str(exc)
    assert text.startswith(f"{message_type} at {field}: ")
    assert "expected" in text.lower()
    for fragment in fragments:
        assert fragment in text


@pytest.mark.parametrize("version", [0, 2, 99])
def test_unsupported_major_version(version: int) -> None:
    """Another major ``v`` raises UnsupportedVersionError naming message, field and v=1."""
    exc = decode_error(body(type="StopCommand", v=version, vm_uuid="u"))
    assert type(exc) is UnsupportedVersionError
    assert (exc.message_type, exc.field) == ("StopCommand", "$.v")
    assert f"protocol version {version} is not supported" in str(exc)
    assert "StopCommand" in str(exc) and "expected v=1" in str(exc)


def test_version_is_reported_before_the_fields_it_changed() -> None:
    """A v2 body with fields v1 does not know is a version error, not a field error."""
    exc = decode_error(body(type="StopCommand", v=2, vm_uuid="u", grace="soft"))
    assert type(exc) is UnsupportedVersionError


@pytest.mark.parametrize("raw", [b"", b"{", b'{"type": "StopCommand",', b"\xff\xfe", b"nul",
                                 b'{"type": "StopCommand", "vm_uuid": "u"} trailing'])
def test_malformed_json(raw: bytes) -> None:
    """A body that is not JSON raises MalformedBodyError saying what was expected."""
    exc = decode_error(raw)
    assert type(exc) is MalformedBodyError
    assert "not valid JSON" in str(exc)
    assert 'expected {"type": "<MessageType>", "v": 1' in str(exc)


@pytest.mark.parametrize("raw", [b"[]", b'"StopCommand"', b"42", b"null", b"true"])
def test_non_object(raw: bytes) -> None:
    """Valid JSON that is not an object raises MalformedBodyError naming what it got."""
    exc = decode_error(raw)
    assert type(exc) is MalformedBodyError
    assert "not an object" in str(exc) and "expected" in str(exc)


def test_lone_surrogate_in_str_body() -> None:
    """A str body that cannot be UTF-8 raises MalformedBodyError, not UnicodeEncodeError."""
    exc = decode_error('{"type": "\ud800"}')
    assert type(exc) is MalformedBodyError


def test_missing_type() -> None:
    """A body without ``type`` raises UnknownTypeError pointing at the field."""
    exc = decode_error(body(v=1, vm_uuid="u"))
    assert type(exc) is UnknownTypeError
    assert exc.field == "$.type"
    assert "no 'type' field" in str(exc) and "expected" in str(exc)


@pytest.mark.parametrize("name", ["RebootCommand", "stopcommand", "Message", "Answer",
                                  "ApiRequest", "ApiResponse", "Event", "PciDeviceInfo"])
def test_unknown_type(name: str) -> None:
    """A ``type`` that is no concrete message raises UnknownTypeError naming it."""
    exc = decode_error(body(type=name, v=1))
    assert type(exc) is UnknownTypeError
    assert exc.message_type == name and exc.field == "$.type"
    assert f"unknown message type \"{name}\"" in str(exc)
    assert f"one of the {len(MESSAGE_TYPES)} types" in str(exc)


@pytest.mark.parametrize("value", [1, None, ["StopCommand"], {"name": "StopCommand"}])
def test_type_that_is_not_a_string(value: object) -> None:
    """A non-string ``type`` raises UnknownTypeError showing the JSON it got."""
    exc = decode_error(body(type=value))
    assert type(exc) is UnknownTypeError
    assert json.dumps(value, separators=(",", ":")) in str(exc)


def test_errors_are_one_hierarchy() -> None:
    """Every decode error is a DecodeError and a MessageError, so callers catch one root."""
    for cls in (MalformedBodyError, UnknownTypeError, UnsupportedVersionError,
                InvalidFieldError):
        assert issubclass(cls, DecodeError) and issubclass(cls, MessageError)


@pytest.mark.parametrize("raw", [b'{"a":' * 100_000, '{"a":' * 100_000,
                                 b'{"type": "StopCommand", "vm_uuid": "u", "x": ' + b"[" * 100_000])
def test_deep_nesting(raw: bytes | str) -> None:
    """A body nested past the recursion limit raises MalformedBodyError, not RecursionError."""
    exc = decode_error(raw)
    assert type(exc) is MalformedBodyError
    assert "too deeply" in str(exc)
