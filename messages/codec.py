"""Encoding and strict decoding of every message through one tagged union."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from typing import Any, Union

import msgspec
import msgspec.inspect as mi

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
from hostdev.messages.values import DomainInfo

#: Classes that group messages but are never sent on their own.
_ABSTRACT: tuple[type[Message], ...] = (api.ApiRequest, api.ApiResponse, events.Event)


def _concrete(module: Any) -> list[type[Message]]:
    found = []
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, Message)
            and value.__module__ == module.__name__
            and value not in _ABSTRACT
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

_EXAMPLE = '{"type": "<MessageType>", "v": 1, ...}'


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, PciAddress):
        return str(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


#: The longest text taken for a PCI address: the full form with room for spaces.
_MAX_PCI_ADDRESS = 32


def _dec_hook(kind: type, obj: Any) -> Any:
    if kind is PciAddress:
        if not isinstance(obj, str):
            raise ValueError(
                f"a PCI address must be a string such as 0000:28:00.1, got {type(obj).__name__}"
            )
        if len(obj) > _MAX_PCI_ADDRESS:  # keeps a huge value out of the reason
            raise ValueError(f"a PCI address is at most {_MAX_PCI_ADDRESS} characters, such as "
                             f"0000:28:00.1; got {len(obj)}")
        try:
            return PciAddress(obj)
        except PciAddressError as exc:
            # msgspec turns ValueError into a ValidationError with the field path.
            raise ValueError(str(exc)) from None
    raise NotImplementedError(f"cannot decode {kind!r}")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(AnyMessage, dec_hook=_dec_hook)


class _Envelope(msgspec.Struct):
    type: Any = msgspec.UNSET
    v: Any = msgspec.UNSET


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_PATH = re.compile(r" - at `(?P<path>[^`]+)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`$")
_SEGMENT = re.compile(r"\.(?P<name>[^.\[]+)|\[(?P<index>\d+)\]")


def encode(message: Message) -> bytes:
    """Serialises a message to its JSON body."""
    return _encoder.encode(message)


def domains_digest(domains: Sequence[DomainInfo]) -> str:
    """Returns the SHA-256 (hex) of a domain report, the same for the same domains in any order.

    An agent sends it with each ping (``PingRoutingCommand.domains_digest``).
    """
    ordered = sorted(domains, key=lambda domain: domain.uuid)
    return hashlib.sha256(_encoder.encode(ordered)).hexdigest()


def decode(body: bytes | bytearray | memoryview | str) -> Message:
    """Decodes a body into its typed message.

    Only ``DecodeError`` subclasses (a ``MessageError``) escape, whatever the body.

    Raises:
        MalformedBodyError: the body is not a JSON object.
        UnknownTypeError: ``type`` is missing or names no message.
        UnsupportedVersionError: ``v`` is not this build's major version.
        InvalidFieldError: a field is missing, unknown or of the wrong type or value.
    """
    try:
        message: Message = _decoder.decode(body)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise _explain(body, exc) from None
    except UnicodeError as exc:  # a str body holding lone surrogates
        raise MalformedBodyError(
            f"body is not valid UTF-8 text ({exc}); expected a JSON object such as {_EXAMPLE}"
        ) from None
    except RecursionError:
        raise _too_deep() from None
    if message.v != PROTOCOL_VERSION:
        raise _version_error(type(message).__name__, message.v)
    return message


def _version_error(name: str, version: int) -> UnsupportedVersionError:
    return UnsupportedVersionError(
        f"{name} at $.v: protocol version {version} is not supported; this build speaks "
        f"version {PROTOCOL_VERSION} only (expected v={PROTOCOL_VERSION}); upgrade the "
        "receiver, or have the sender speak this version",
        message_type=name,
        field="$.v",
    )


def _too_deep() -> MalformedBodyError:
    return MalformedBodyError(
        "body nests JSON objects or arrays too deeply to decode (no message nests more "
        f"than a few levels); expected {_EXAMPLE}"
    )


def _json(value: object) -> str:
    """Shows a decoded JSON value as the sender wrote it (``null``, ``true``, ``"1"``)."""
    return msgspec.json.encode(value).decode()


def _explain(body: bytes | bytearray | memoryview | str, exc: Exception) -> DecodeError:
    """Turns msgspec's error into ours, naming the message, the field and what was expected."""
    try:
        envelope = _envelope_decoder.decode(body)
    except msgspec.ValidationError as inner:
        return MalformedBodyError(
            f"body is valid JSON but not an object ({inner}); expected {_EXAMPLE}"
        )
    except msgspec.DecodeError as inner:
        return MalformedBodyError(f"body is not valid JSON ({inner}); expected {_EXAMPLE}")
    except RecursionError:
        return _too_deep()
    name = envelope.type
    if name is msgspec.UNSET:
        return UnknownTypeError(
            f"message has no 'type' field (expected the message's type name: {_EXAMPLE})",
            field="$.type",
        )
    if not isinstance(name, str) or name not in MESSAGE_TYPES:
        return UnknownTypeError(
            f"unknown message type {_json(name)} in field 'type' (expected one of the "
            f"{len(MESSAGE_TYPES)} types of protocol version {PROTOCOL_VERSION}, such as "
            "'StartCommand'; `hostdev schema` lists them)",
            message_type=name if isinstance(name, str) else _json(name),
            field="$.type",
        )
    version = envelope.v
    if version is not msgspec.UNSET:
        if not isinstance(version, int) or isinstance(version, bool):
            return InvalidFieldError(
                f"{name} at $.v: the protocol version is {_json(version)} "
                f"(expected an integer, {PROTOCOL_VERSION})",
                message_type=name,
                field="$.v",
            )
        if version != PROTOCOL_VERSION:
            return _version_error(name, version)
    return _field_error(name, str(exc), body)


def _field_error(name: str, text: str,
                 body: bytes | bytearray | memoryview | str = b"") -> InvalidFieldError:
    """Builds the error for one bad field out of msgspec's ``<problem> - at `<path>```."""
    path = "$"
    match = _PATH.search(text)
    if match:
        path = match["path"]
        text = text[: match.start()]
    cls = MESSAGE_TYPES[name]
    missing, unknown = _MISSING.match(text), _UNKNOWN.match(text)
    if missing:
        field = missing["field"]
        where = _type_at(cls, path + "." + field)
        expected = _describe(where) if where is not None else "a value"
        problem = f"required field `{field}` is missing (expected {expected})"
        path = path + "." + field
    elif unknown:
        field = unknown["field"]
        owner = _type_at(cls, path)
        known = ", ".join(_field_names(owner)) if owner is not None else "the documented fields"
        problem = f"unknown field `{field}` (expected only: {known})"
        path = path + "." + field
    else:
        where = _type_at(cls, path)
        problem = _over_limit(path, text, body) or text
        if where is not None and (problem is not text or "expected" not in text.lower()):
            problem = f"{problem} (expected {_describe(where)})"
    return InvalidFieldError(f"{name} at {path}: {problem}", message_type=name, field=path)


_LIMIT = re.compile(r"^Expected `(?P<kind>\w+)` (?P<rule>of length |matching regex )?"
                    r"(?P<op>[<>]=?)? ?(?P<bound>.*)$")
_WORDS = {"<=": "at most", ">=": "at least", "<": "less than", ">": "more than"}


def _over_limit(path: str, text: str, body: bytes | bytearray | memoryview | str) -> str | None:
    """Says which limit a value broke: ``name`` is 300 characters long; at most 64."""
    match = _LIMIT.match(text)
    if match is None or (match["rule"] is None and match["op"] is None):
        return None
    field = path.rsplit(".", 1)[-1]
    value = _value_at(body, path)
    if match["rule"] == "matching regex ":
        return f"`{field}` {_shown(value)} has a character or form the field does not allow"
    if match["rule"] == "of length ":
        size = f"{len(value)} characters long" if isinstance(value, str) else (
            f"has {len(value)} items" if isinstance(value, list) else "")
        size = size if size.startswith("has") else f"is {size}"
        return f"`{field}` {size}; {_WORDS[match['op']]} {match['bound']}"
    return f"`{field}` is {_shown(value)}; {_WORDS[match['op']]} {match['bound']}"


def _value_at(body: bytes | bytearray | memoryview | str, path: str) -> Any:
    """Returns the JSON value at a msgspec path of the body, or None."""
    try:
        value = msgspec.json.decode(body)
        for segment in _SEGMENT.finditer(path.removeprefix("$")):
            value = value[segment["name"]] if segment["name"] else value[int(segment["index"])]
    except (msgspec.DecodeError, LookupError, TypeError, ValueError, RecursionError):
        return None
    return value


def _shown(value: Any) -> str:
    """Shows a value as JSON, cut to 40 characters so a huge field stays out of the reason."""
    text = _json(value) if not isinstance(value, int) or abs(value) < 10**40 else "a huge number"
    return text if len(text) <= 40 else text[:37] + "..."


@functools.cache
def _struct_info(cls: type[Message]) -> mi.Type:
    return mi.type_info(cls)


def _type_at(cls: type[Message], path: str) -> mi.Type | None:
    """Resolves a msgspec path such as ``$.vm.pci_devices[0]`` to the type expected there."""
    current: mi.Type | None = _struct_info(cls)
    for segment in _SEGMENT.finditer(path.removeprefix("$")):
        current = _step(current, segment["name"], segment["index"])
        if current is None:
            return None
    return current


def _step(current: mi.Type | None, name: str | None, index: str | None) -> mi.Type | None:
    if isinstance(current, mi.Metadata):
        current = current.type
    if isinstance(current, mi.UnionType):  # e.g. ``Struct | None``: follow the struct
        structs = [t for t in current.types if isinstance(t, mi.StructType)]
        current = structs[0] if len(structs) == 1 else None
    if name is not None and isinstance(current, mi.StructType):
        return next((f.type for f in current.fields if f.encode_name == name), None)
    if index is not None and isinstance(current, (mi.VarTupleType, mi.ListType)):
        return current.item_type
    if index is not None and isinstance(current, mi.TupleType):
        position = int(index)
        return current.item_types[position] if position < len(current.item_types) else None
    return None


def _field_names(owner: mi.Type) -> list[str]:
    if isinstance(owner, mi.UnionType):
        owner = next((t for t in owner.types if isinstance(t, mi.StructType)), owner)
    if not isinstance(owner, mi.StructType):
        return []
    names = [owner.tag_field] if owner.tag_field else []
    return names + [f.encode_name for f in owner.fields]


def _describe(kind: mi.Type) -> str:
    """Says in words what a JSON value of this type looks like."""
    if isinstance(kind, mi.Metadata):
        rule = (kind.extra_json_schema or {}).get("description", "")
        words = _describe(kind.type)
        return f"{words}, {rule[:1].lower()}{rule[1:].rstrip('.')}" if rule else words
    simple = {
        mi.StrType: "a string",
        mi.IntType: "an integer",
        mi.FloatType: "a number",
        mi.BoolType: "true or false",
        mi.NoneType: "null",
        mi.AnyType: "any value",
    }
    for cls, words in simple.items():
        if isinstance(kind, cls):
            return words
    if isinstance(kind, mi.LiteralType):
        return "one of " + ", ".join(repr(value) for value in kind.values)
    if isinstance(kind, mi.CustomType) and kind.cls is PciAddress:
        return "a PCI address string such as 0000:28:00.1"
    if isinstance(kind, (mi.VarTupleType, mi.ListType)):
        return f"an array of {_describe(kind.item_type)}"
    if isinstance(kind, mi.UnionType):
        return " or ".join(_describe(member) for member in kind.types)
    if isinstance(kind, mi.StructType):
        return f"a {kind.cls.__name__} object"
    return type(kind).__name__.removesuffix("Type").lower()


def _schema_hook(kind: type) -> dict[str, Any]:
    if kind is PciAddress:
        return {
            "type": "string",
            "title": "PciAddress",
            "description": "[domain:]bus:slot.function in hexadecimal, e.g. 0000:28:00.1",
            "pattern": r"^([0-9a-fA-F]{1,4}:)?[0-9a-fA-F]{1,2}:[01]?[0-9a-fA-F]\.[0-7]$",
        }
    raise NotImplementedError(f"no schema for {kind!r}")


#: JSON Schema dialect of the exported schemas (msgspec emits 2020-12).
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema(name: str | None = None) -> dict[str, Any]:
    """Returns the JSON Schema of one message, or of the whole union when ``name`` is None.

    Raises:
        UnknownTypeError: ``name`` is not a message type.
    """
    if name is None:
        schema = msgspec.json.schema(AnyMessage, schema_hook=_schema_hook)
        schema["title"] = "AnyMessage"
        schema["description"] = "Every hostdev message; `type` selects which."
    else:
        try:
            cls = MESSAGE_TYPES[name]
        except KeyError:
            raise UnknownTypeError(
                f"unknown message type {name!r} (expected one of: {', '.join(MESSAGE_TYPES)})",
                message_type=name,
            ) from None
        schema = msgspec.json.schema(cls, schema_hook=_schema_hook)
    for def_name, definition in schema.get("$defs", {}).items():
        if def_name in MESSAGE_TYPES:
            definition["properties"]["v"] = {
                "description": "Protocol major version; a receiver refuses any other value. "
                "Absent means 1.",
                "type": "integer",
                "const": PROTOCOL_VERSION,
                "default": PROTOCOL_VERSION,
            }
    return {"$schema": SCHEMA_DIALECT, **schema}
