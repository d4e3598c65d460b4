"""Whatever arrives, ``decode`` returns a message or raises a MessageError, nothing else."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from hostdev.messages.codec import MESSAGE_TYPES, decode, encode
from hostdev.messages.errors import DecodeError, MessageError
from tests.support.message_strategies import any_message

JSON_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = sorted({
    field.encode_name
    for cls in MESSAGE_TYPES.values()
    for field in msgspec.structs.fields(cls)
})


def decode_or_message_error(raw: bytes | str) -> None:
    """Decodes ``raw``; a MessageError is fine, anything else fails the test."""
    try:
        decoded = decode(raw)
    except MessageError as exc:
        assert isinstance(exc, DecodeError)
        assert str(exc)
        return
    assert type(decoded).__name__ in MESSAGE_TYPES


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_random_bytes(raw: bytes) -> None:
    """Random bytes never make ``decode`` raise anything but a MessageError."""
    decode_or_message_error(raw)


@settings(max_examples=300)
@given(JSON_VALUES)
def test_random_json(value: Any) -> None:
    """Random JSON values never make ``decode`` raise anything but a MessageError."""
    decode_or_message_error(json.dumps(value).encode())


@settings(max_examples=300)
@given(
    st.sampled_from(sorted(MESSAGE_TYPES)),
    st.one_of(st.just(1), JSON_SCALARS),
    st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), JSON_VALUES,
                    max_size=6),
)
def test_random_objects_with_a_real_type(name: str, version: Any, fields: dict[str, Any]
                                         ) -> None:
    """Objects naming a real type with random fields decode or raise a MessageError."""
    decode_or_message_error(json.dumps({**fields, "type": name, "v": version}).encode())


@settings(max_examples=200)
@given(any_message(), st.data())
def test_mutated_messages(message: Any, data: st.DataObject) -> None:
    """A valid body with one field dropped, replaced or added decodes or raises MessageError."""
    body = json.loads(encode(message))
    keys = sorted(body)
    action = data.draw(st.sampled_from(["drop", "replace", "add"]))
    key = data.draw(st.sampled_from(keys)) if action != "add" else data.draw(
        st.sampled_from(FIELD_NAMES) | st.text(max_size=6))
    if action == "drop":
        del body[key]
    else:
        body[key] = data.draw(JSON_VALUES)
    decode_or_message_error(json.dumps(body).encode())


@settings(max_examples=100)
@given(st.text(st.characters(exclude_categories=()), max_size=40)
       | st.builds("{{\"type\": \"{}\"}}".format, st.text(st.characters(exclude_categories=()))))
def test_random_text_bodies(raw: str) -> None:
    """A ``str`` body of any text, lone surrogates included, decodes or raises a MessageError."""
    decode_or_message_error(raw)
