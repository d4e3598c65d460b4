"""Java-properties files (``agent.properties``, ``mgmt.properties``), with line numbers.

Both daemons read their configuration in the original's syntax; the reader
keeps the line each key came from so every configuration error can name its
file and line. The value parsers below (durations, choices, booleans, URLs, ports,
patterns) are the one kit both daemons build their keys from, so the same kind
of value is accepted, and refused with the same words, in either file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hostdev.messages.errors import MessageError


class PropertiesError(MessageError, ValueError):
    """A properties file is unreadable or a line is malformed; names file and line."""

    def __init__(self, path: str, line: int, text: str, expected: str) -> None:
        super().__init__(f"{path}:{line}: {text!r}: {expected}")
        self.path = path
        self.line = line
        self.text = text
        self.expected = expected


@dataclass(frozen=True)
class Property:
    """One ``key=value`` entry and where it stood."""

    key: str
    value: str
    path: str
    line: int

    def error(self, expected: str, text: str | None = None) -> PropertiesError:
        """Builds the error for this entry: file, line, offending text, what is expected."""
        return PropertiesError(self.path, self.line, self.value if text is None else text, expected)


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}
_DURATION = re.compile(r"^(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>ms|s|m|h)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float | None:
    """Returns seconds for ``500ms``, ``30s``, ``5m``, ``1h`` or a bare number; None if invalid."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        return None
    return float(match["number"]) * _UNIT_SECONDS[match["unit"]]


def duration(prop: Property) -> float:
    """Parses a positive duration (``500ms``, ``30s``, ``5m``, ``1h`` or seconds) into seconds.

    Raises:
        PropertiesError: the value is no duration or not above zero.
    """
    seconds = parse_duration(prop.value)
    if seconds is None or seconds <= 0:
        raise prop.error(f"{prop.key} must be a positive duration: a number of seconds or "
                         "one with a unit, e.g. 30, 2.5s, 500ms, 5m, 1h")
    return seconds


def choice(*options: str) -> Callable[[Property], str]:
    """Returns a parser accepting one of ``options``, case-insensitively, in lower case."""
    def parse(prop: Property) -> str:
        value = prop.value.lower()
        if value not in options:
            raise prop.error(f"{prop.key} must be one of {', '.join(options)}")
        return value
    return parse


def url(schemes: Sequence[str], expected: str, *,
        separator: str | None = None) -> Callable[[Property], str]:
    """Returns a parser accepting URLs of ``schemes`` (any ``scheme://`` when empty).

    Args:
        schemes: the accepted schemes, without ``://``.
        expected: what a good value looks like, for the error text.
        separator: splits a value holding several URLs (``;`` for AMQP
            failover); each one must be valid and the error names the bad one.
    """
    prefixes = tuple(f"{scheme}://" for scheme in schemes)

    def parse(prop: Property) -> str:
        parts = prop.value.split(separator) if separator else [prop.value]
        for part in (p.strip() for p in parts):
            valid = part.startswith(prefixes) if prefixes else "://" in part
            if not valid:
                raise prop.error(f"{prop.key} must be {expected}", text=part or prop.value)
        return prop.value
    return parse


def boolean(prop: Property) -> bool:
    """Parses ``true`` or ``false`` (case-insensitive).

    Raises:
        PropertiesError: the value is neither.
    """
    value = prop.value.strip().lower()
    if value not in ("true", "false"):
        raise prop.error(f"{prop.key} must be true or false")
    return value == "true"


def port_or_off(prop: Property) -> int | None:
    """Parses a TCP port from 1 to 65535, or ``off`` (None)."""
    value = prop.value.lower()
    if value == "off":
        return None
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise prop.error(f"{prop.key} must be a TCP port from 1 to 65535, or off")
    return int(value)


def matching(pattern: re.Pattern[str], expected: str) -> Callable[[Property], str]:
    """Returns a parser accepting a value that ``pattern`` matches in full."""
    def parse(prop: Property) -> str:
        if not pattern.fullmatch(prop.value):
            raise prop.error(f"{prop.key} must be {expected}")
        return prop.value
    return parse


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Yields (first line number, logical line) joining backslash continuations."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.lstrip() if pending else raw
        if not pending:
            stripped = line.lstrip()
            if not stripped or stripped[0] in "#!":
                continue
            start = number
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            pending.append(line[:-1])
            continue
        pending.append(line)
        yield start, "".join(pending)
        pending = []
    if pending:
        yield start, "".join(pending)


def _unescape(text: str) -> str:
    out: list[str] = []
    chars = iter(text)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        nxt = next(chars, "")
        if nxt == "u":
            code = "".join(next(chars, "") for _ in range(4))
            out.append(chr(int(code, 16)) if len(code) == 4 else "\\u" + code)
        else:
            out.append(_ESCAPES.get(nxt, nxt))
    return "".join(out)


def _split(line: str) -> tuple[str, str]:
    line = line.lstrip()
    index = 0
    while index < len(line):
        char = line[index]
        if char == "\\":
            index += 2
            continue
        if char in "=: \t\f":
            break
        index += 1
    key = line[:index]
    rest = line[index:].lstrip(" \t\f")
    if rest[:1] in ("=", ":"):
        rest = rest[1:].lstrip(" \t\f")
    return _unescape(key), _unescape(rest)


def parse_properties(text: str, path: str = "<string>") -> list[Property]:
    """Parses Java-properties text into entries, in file order.

    Comments start with ``#`` or ``!``; separators are ``=``, ``:`` or
    whitespace; a trailing backslash continues a line.
    """
    return [
        Property(key=key, value=value.strip(), path=path, line=line)
        for line, logical in _logical_lines(text)
        for key, value in [_split(logical)]
    ]


def read_text(path: str | Path, sample: str = "the sample in etc/") -> str:
    """Reads a properties file's text; a missing or unreadable file is a clear error.

    Args:
        path: the file.
        sample: where a sample to start from lives, for the error text.
    """
    name = str(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PropertiesError(name, 0, name, "the file does not exist; pass --config PATH "
                              f"or create it from {sample}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PropertiesError(name, 0, name, f"the file cannot be read: {exc}") from None


def read_properties(path: str | Path, sample: str = "the sample in etc/") -> list[Property]:
    """Reads and parses a properties file; a missing file is a clear error."""
    return parse_properties(read_text(path, sample), str(path))
