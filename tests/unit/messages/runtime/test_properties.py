"""Tests of the Java-properties reader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hostdev.messages.runtime.properties import (
    PropertiesError,
    Property,
    choice,
    duration,
    matching,
    parse_properties,
    port_or_off,
    read_properties,
    url,
)


def entry(line: str) -> Property:
    (prop,) = parse_properties(f"# first\n{line}\n", "x.properties")
    return prop


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


@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 30.0), ("2.5s", 2.5), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0), (".5", 0.5),
    ("10 S", 10.0)])
def test_a_duration_is_seconds_with_an_optional_unit(text: str, seconds: float) -> None:
    """Bare numbers are seconds; ms, s, m and h scale them, in any case."""
    assert duration(entry(f"timeout.x={text}")) == seconds


@pytest.mark.parametrize("text", ["soon", "0", "-5", "0ms", "5d", ""])
def test_a_duration_that_is_not_positive_names_the_key_and_the_forms(text: str) -> None:
    """A bad or non-positive duration names file, line, text, key and the accepted forms."""
    with pytest.raises(PropertiesError) as info:
        duration(entry(f"timeout.x={text}"))
    assert (info.value.path, info.value.line, info.value.text) == ("x.properties", 2, text)
    assert info.value.expected.startswith("timeout.x must be a positive duration")
    assert "500ms" in info.value.expected


def test_a_choice_is_case_insensitive_and_lists_the_options() -> None:
    """A choice returns the lower-case option and refuses others listing them all."""
    parse = choice("json", "console")
    assert parse(entry("log.format=JSON")) == "json"
    with pytest.raises(PropertiesError, match=r"log\.format must be one of json, console"):
        parse(entry("log.format=xml"))


def test_a_url_list_names_the_bad_url() -> None:
    """Each URL of a list must have an accepted scheme; the error quotes the bad one."""
    parse = url(("amqp", "amqps"), "amqp://HOST", separator=";")
    value = "amqp://a//;amqps://b//"
    assert parse(entry(f"amqp.url={value}")) == value
    with pytest.raises(PropertiesError) as info:
        parse(entry("amqp.url=amqp://a//; http://b"))
    assert info.value.text == "http://b"
    assert info.value.expected == "amqp.url must be amqp://HOST"


def test_a_url_of_any_scheme_needs_one() -> None:
    """With no schemes given, any scheme:// is accepted and a bare word is not."""
    parse = url((), "a libvirt URI")
    assert parse(entry("libvirt.uri=qemu:///system")) == "qemu:///system"
    with pytest.raises(PropertiesError, match=r"libvirt\.uri must be a libvirt URI"):
        parse(entry("libvirt.uri=qemu"))


@pytest.mark.parametrize(("text", "port"), [("9100", 9100), ("off", None), ("OFF", None),
                                            ("1", 1), ("65535", 65535)])
def test_a_port_is_a_number_or_off(text: str, port: int | None) -> None:
    """A port is 1 to 65535, or off for none."""
    assert port_or_off(entry(f"metrics.port={text}")) == port


@pytest.mark.parametrize("text", ["0", "65536", "-1", "http", ""])
def test_a_bad_port_names_the_range(text: str) -> None:
    """Anything else is refused with the range."""
    with pytest.raises(PropertiesError, match=r"metrics\.port must be a TCP port from 1 to 65535"):
        port_or_off(entry(f"metrics.port={text}"))


def test_a_pattern_must_match_the_whole_value() -> None:
    """A value matching only in part is refused with the expectation given."""
    parse = matching(re.compile(r"[a-z]{1,3}"), "1 to 3 letters")
    assert parse(entry("name=abc")) == "abc"
    with pytest.raises(PropertiesError, match="name must be 1 to 3 letters"):
        parse(entry("name=abcd"))
