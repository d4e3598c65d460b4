"""Encoding and strict decoding of every message through one tagged union."""

from __future__ import annotations

import re
from typing import Any, Union

import msgspec

from hostdev.messages import api, commands, events
from hostdev.messages.base import PROTOCOL_VERSION, Message
from hostdev.messages.errors import (
    DecodeError,
    InvalidFieldError,
    MalformedBodyError,
    PciAddressError,
    UnknownTypeError,
    UnsupportedVersionError,
)
from hostdev.messages.pci_address import PciAddress


def _concrete(module: Any) -> list[type[Message]]:
    found = []
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, Message)
            and value.__module__ == module.__name__
            and value.__doc__
            and not value.__name__.startswith(("Api", "Event"))
        ):
            found.append(value)
    return found


#: Every concrete message type, by its JSON ``type``.
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.__name__: cls
    for module in (commands, api, events)
    for cls in _concrete(module)
}

AnyMessage = Union[tuple(MESSAGE_TYPES.values())]  # type: ignore[valid-type]  # noqa: UP007


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, PciAddress):
        return str(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(kind: type, obj: Any) -> Any:
    if kind is PciAddress:
        if not isinstance(obj, str):
            raise ValueError(f"a PCI address must be a string, got {type(obj).__name__}")
        try:
            return PciAddress(obj)
        except PciAddressError as exc:
            # msgspec turns ValueError into a ValidationError with the field path.
            raise ValueError(str(exc)) from None
    raise NotImplementedError(f"cannot decode {kind!r}")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(AnyMessage, dec_hook=_dec_hook)


class _Envelope(msgspec.Struct):
    type: Any = None
    v: Any = None


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_PATH = re.compile(r" - at `(?P<path>[^`]+)`$")
_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")
_UNKNOWN = re.compile(r"unknown field `(?P<field>[^`]+)`")


def encode(message: Message) -> bytes:
    """Serialises a message to its JSON body."""
    return _encoder.encode(message)


def decode(body: bytes | bytearray | memoryview | str) -> Message:
    """Decodes a body into its typed message.

    Raises:
        MalformedBodyError: the body is not a JSON object.
        UnknownTypeError: ``type`` is missing or names no message.
        UnsupportedVersionError: ``v`` is not this build's major version.
        InvalidFieldError: a field is missing, unknown or of the wrong type.
    """
    try:
        message: Message = _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _explain(body, exc) from None
    if message.v != PROTOCOL_VERSION:
        raise _version_error(type(message).__name__, message.v)
    return message


def _version_error(name: str, version: object) -> UnsupportedVersionError:
    return UnsupportedVersionError(
        f"{name}: field 'v' is {version!r}, but this build speaks protocol version "
        f"{PROTOCOL_VERSION} only; upgrade the receiver or send v={PROTOCOL_VERSION}",
        message_type=name,
        field="v",
    )


def _explain(body: bytes | bytearray | memoryview | str, exc: Exception) -> DecodeError:
    """Turns msgspec's error into ours, naming the message, the field and what was expected."""
    try:
        envelope = _envelope_decoder.decode(body)
    except msgspec.DecodeError as inner:
        return MalformedBodyError(f"body is not valid JSON: {inner}")
    except msgspec.ValidationError:
        return MalformedBodyError("body is not a JSON object (expected {\"type\": ..., \"v\": 1, ...})")
    name = envelope.type
    if name is None:
        return UnknownTypeError("message has no 'type' field (expected the message's type name)",
                                field="type")
    if not isinstance(name, str) or name not in MESSAGE_TYPES:
        return UnknownTypeError(
            f"unknown message type {name!r} (expected one of the {len(MESSAGE_TYPES)} types "
            "of the protocol; see `hostdev schema`)",
            message_type=str(name),
            field="type",
        )
    if envelope.v is not None and envelope.v != PROTOCOL_VERSION:
        return _version_error(name, envelope.v)
    text = str(exc)
    field: str | None = None
    match = _PATH.search(text)
    if match:
        field = match["path"]
        text = text[: match.start()]
    for pattern in (_MISSING, _UNKNOWN):
        found = pattern.search(text)
        if found:
            field = (field or "$") + "." + found["field"]
    where = f" at {field}" if field else ""
    return InvalidFieldError(f"{name}{where}: {text}", message_type=name, field=field)


def _schema_hook(kind: type) -> dict[str, Any]:
    if kind is PciAddress:
        return {
            "type": "string",
            "title": "PciAddress",
            "description": "[domain:]bus:slot.function in hexadecimal, e.g. 0000:28:00.1",
            "pattern": r"^([0-9a-fA-F]{1,4}:)?[0-9a-fA-F]{1,2}:[01]?[0-9a-fA-F]\.[0-7]$",
        }
    raise NotImplementedError(f"no schema for {kind!r}")


def json_schema(name: str | None = None) -> dict[str, Any]:
    """Returns the JSON Schema of one message, or of the whole union when ``name`` is None."""
    if name is None:
        schema = msgspec.json.schema(AnyMessage, schema_hook=_schema_hook)
        schema["title"] = "AnyMessage"
        schema["description"] = "Every hostdev message; `type` selects which."
        return schema
    try:
        cls = MESSAGE_TYPES[name]
    except KeyError:
        raise UnknownTypeError(f"unknown message type {name!r}", message_type=name) from None
    return msgspec.json.schema(cls, schema_hook=_schema_hook)
