"""Tests of the Java-properties reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostdev.messages.runtime.properties import PropertiesError, parse_properties, read_properties


def test_separators_comments_and_line_numbers() -> None:
    """Keys split on =, : or whitespace; comments are skipped; lines are kept."""
    entries = parse_properties("# comment\na=1\n  ! other\nb : two words\nc three\n", "f")
    assert [(p.key, p.value, p.line) for p in entries] == [
        ("a", "1", 2), ("b", "two words", 4), ("c", "three", 5)]


def test_backslash_continues_a_line_and_keeps_its_first_line_number() -> None:
    """A trailing backslash joins the next line; the entry keeps the first line's number."""
    (entry,) = parse_properties("pci.devices=28:00.1|10GE,\\\n    28:00.2|10GE\n")
    assert entry.value == "28:00.1|10GE,28:00.2|10GE"
    assert entry.line == 1


def test_escaped_separator_belongs_to_the_key() -> None:
    """An escaped = is part of the key."""
    (entry,) = parse_properties("a\\=b=c\n")
    assert (entry.key, entry.value) == ("a=b", "c")


def test_error_names_file_line_text_and_expectation() -> None:
    """Property.error builds a message with file, line, offending text and expectation."""
    (entry,) = parse_properties("\nping.interval=soon\n", "/etc/hostdev/agent.properties")
    error = entry.error("a number of seconds, e.g. 60")
    assert str(error) == ("/etc/hostdev/agent.properties:2: 'soon': a number of seconds, e.g. 60")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """A missing file says so and tells how to point at one."""
    with pytest.raises(PropertiesError, match="does not exist; pass --config"):
        read_properties(tmp_path / "absent.properties")
