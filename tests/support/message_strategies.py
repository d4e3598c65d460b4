"""Hypothesis strategies and full examples for every message, built from the type annotations.

``message_strategy(cls)`` walks ``msgspec.inspect.type_info(cls)``, so a field
or message added later is covered without touching this module; a field of a
type it does not know fails loudly instead of being skipped.
``example_message(cls)`` builds one deterministic instance whose every field
differs from its default, so a round trip exercises each field.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import msgspec.inspect as mi
from hypothesis import strategies as st

from hostdev.messages.base import PROTOCOL_VERSION, Message
from hostdev.messages.codec import MESSAGE_TYPES
from hostdev.messages.pci_address import PciAddress

_INT64 = (-(2**63), 2**63 - 1)


def pci_addresses() -> st.SearchStrategy[PciAddress]:
    """Every valid PCI address, canonical."""
    return st.builds(
        PciAddress.from_parts,
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFF),
        st.integers(0, 0x1F),
        st.integers(0, 0x7),
    )


def strings(kind: mi.StrType) -> st.SearchStrategy[str]:
    """Every string within the type's limits: its length and its pattern."""
    low = kind.min_length or 0
    high = kind.max_length if kind.max_length is not None else 12
    if kind.pattern is None:
        return st.text(min_size=low, max_size=min(high, max(low, 12)))
    # The protocol's patterns end in a lookahead Hypothesis cannot generate from;
    # generate from the rest, then keep what the whole pattern accepts.
    body = kind.pattern.removesuffix("(?!\\n)")
    pattern = re.compile(kind.pattern)
    return st.from_regex(body, fullmatch=True).filter(
        lambda text: low <= len(text) <= high and pattern.search(text) is not None)


def strategy_for(kind: mi.Type) -> st.SearchStrategy[Any]:
    """Returns a strategy for values of one msgspec type."""
    if isinstance(kind, mi.Metadata):
        return strategy_for(kind.type)
    if isinstance(kind, mi.StrType):
        return strings(kind)
    if isinstance(kind, mi.IntType):
        low = kind.ge if kind.ge is not None else _INT64[0]
        high = kind.le if kind.le is not None else _INT64[1]
        return st.integers(low, high)
    if isinstance(kind, mi.FloatType):
        # JSON has no NaN or infinity; msgspec would send them as null.
        return st.floats(min_value=kind.ge, max_value=kind.le,
                         allow_nan=False, allow_infinity=False)
    if isinstance(kind, mi.BoolType):
        return st.booleans()
    if isinstance(kind, mi.NoneType):
        return st.none()
    if isinstance(kind, mi.LiteralType):
        return st.sampled_from(kind.values)
    if isinstance(kind, mi.CustomType) and kind.cls is PciAddress:
        return pci_addresses()
    if isinstance(kind, (mi.VarTupleType, mi.ListType)):
        size = min(3, kind.max_length) if kind.max_length is not None else 3
        items = st.lists(strategy_for(kind.item_type), max_size=size)
        return items.map(tuple) if isinstance(kind, mi.VarTupleType) else items
    if isinstance(kind, mi.UnionType):
        return st.one_of([strategy_for(member) for member in kind.types])
    if isinstance(kind, mi.StructType):
        return struct_strategy(kind)
    raise TypeError(f"no strategy for {kind!r}: teach tests/support/message_strategies.py")


def struct_strategy(info: mi.StructType) -> st.SearchStrategy[Any]:
    """Builds instances of a struct: required fields always, optional ones sometimes."""
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in info.fields:
        if field.name == "v":
            strategy: st.SearchStrategy[Any] = st.just(PROTOCOL_VERSION)
        else:
            strategy = strategy_for(field.type)
        (required if field.required else optional)[field.name] = strategy
    return st.fixed_dictionaries(required, optional=optional).map(lambda kw: info.cls(**kw))


def message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    """Generates messages of one type."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return struct_strategy(info)


def any_message() -> st.SearchStrategy[Message]:
    """Generates messages of every type of the protocol."""
    return st.one_of([message_strategy(cls) for cls in MESSAGE_TYPES.values()])


def example_value(kind: mi.Type, default: Any = msgspec.NODEFAULT) -> Any:
    """Returns one deterministic value of ``kind`` that differs from ``default``."""
    if isinstance(kind, mi.Metadata):
        return example_value(kind.type, default)
    if isinstance(kind, mi.StrType):
        pattern = re.compile(kind.pattern or "")
        return next(text for text in ("example", "0x8086", "0" * 64) if pattern.search(text))
    if isinstance(kind, mi.IntType):
        return 7 if default != 7 else 8
    if isinstance(kind, mi.FloatType):
        return 2.5 if default != 2.5 else 3.5
    if isinstance(kind, mi.BoolType):
        return default is not True
    if isinstance(kind, mi.LiteralType):
        return next(value for value in reversed(kind.values) if value != default)
    if isinstance(kind, mi.CustomType) and kind.cls is PciAddress:
        return PciAddress("28:00.1")
    if isinstance(kind, (mi.VarTupleType, mi.ListType)):
        items = [example_value(kind.item_type)]
        return tuple(items) if isinstance(kind, mi.VarTupleType) else items
    if isinstance(kind, mi.UnionType):
        members = [m for m in kind.types if not isinstance(m, mi.NoneType)]
        return example_value(members[0], default)
    if isinstance(kind, mi.StructType):
        return kind.cls(**{
            field.name: example_value(field.type, field.default)
            for field in kind.fields
        })
    raise TypeError(f"no example for {kind!r}: teach tests/support/message_strategies.py")


def example_message(cls: type[Message]) -> Message:
    """Returns one instance of ``cls`` with every field set, each unlike its default."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    values = {
        field.name: example_value(field.type, field.default)
        for field in info.fields
        if field.name != "v"
    }
    return cls(**values)
