"""The committed JSON Schemas match the code, validate real messages, and `hostdev schema` works."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from hostdev.messages.codec import MESSAGE_TYPES, encode, json_schema
from hostdev.messages.errors import UnknownTypeError
from hostdev.messages.schema_export import (
    SCHEMA_DIR,
    UNION_NAME,
    schema_names,
    schema_text,
    stale_schemas,
    write_schemas,
)
from hostdev.mgmt.cli import main
from tests.support.message_strategies import any_message, example_message


def test_committed_schemas_match_the_code() -> None:
    """messages/schema/ holds exactly what the message types generate today."""
    problems = stale_schemas(SCHEMA_DIR)
    assert not problems, (
        "the committed JSON Schemas drifted from the message types; run `make schema` "
        "and commit messages/schema/:\n" + "\n".join(problems)
    )


def test_one_file_per_message_plus_the_union() -> None:
    """There is a ``<Type>.json`` for every message and ``AnyMessage.json``."""
    files = {path.stem for path in SCHEMA_DIR.glob("*.json")}
    assert files == {*MESSAGE_TYPES, UNION_NAME}
    assert schema_names()[-1] == UNION_NAME


@pytest.mark.parametrize("name", [*sorted(MESSAGE_TYPES), UNION_NAME])
def test_each_schema_declares_dialect_and_pins_version(name: str) -> None:
    """Each schema names its dialect, and every message in it pins ``v`` to 1."""
    schema = json.loads(schema_text(name))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    for def_name, definition in schema["$defs"].items():
        if def_name in MESSAGE_TYPES:
            assert definition["properties"]["v"]["const"] == 1
            assert definition["properties"]["type"] == {"enum": [def_name]}
            assert definition["additionalProperties"] is False


def test_unknown_schema_name() -> None:
    """Asking for a schema of no message raises UnknownTypeError listing the real ones."""
    with pytest.raises(UnknownTypeError, match="StartCommand"):
        json_schema("RebootCommand")


def test_drift_is_detected(tmp_path: Path) -> None:
    """A changed, missing or extra file is reported with the file name."""
    write_schemas(tmp_path)
    assert stale_schemas(tmp_path) == []
    (tmp_path / "StopCommand.json").write_text("{}\n")
    (tmp_path / "StartCommand.json").unlink()
    (tmp_path / "RebootCommand.json").write_text("{}\n")
    problems = "\n".join(stale_schemas(tmp_path))
    assert "StopCommand.json: differs" in problems
    assert "StartCommand.json: missing" in problems
    assert "RebootCommand.json: no such message" in problems


def test_write_removes_schemas_of_vanished_messages(tmp_path: Path) -> None:
    """Writing leaves exactly the current schema files in the directory."""
    (tmp_path / "RebootCommand.json").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("kept\n")
    written = write_schemas(tmp_path)
    assert {path.name for path in written} == {path.name for path in tmp_path.glob("*.json")}
    assert (tmp_path / "notes.txt").exists()


def test_cli_prints_one_schema(capsys: pytest.CaptureFixture[str]) -> None:
    """``hostdev schema StopCommand`` prints that message's committed schema."""
    assert main(["schema", "StopCommand"]) == 0
    assert capsys.readouterr().out == (SCHEMA_DIR / "StopCommand.json").read_text()


def test_cli_prints_the_union_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    """``hostdev schema`` prints the union of every message."""
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == UNION_NAME


def test_cli_lists_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--list`` names every schema, ``--write`` writes them, ``--check`` finds drift."""
    assert main(["schema", "--list"]) == 0
    assert capsys.readouterr().out.split() == schema_names()
    assert main(["schema", "--write", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.json"))) == len(schema_names())
    assert main(["schema", "--check", str(tmp_path)]) == 0
    (tmp_path / "StopCommand.json").write_text("{}\n")
    capsys.readouterr()
    assert main(["schema", "--check", str(tmp_path)]) == 1
    assert "run `make schema`" in capsys.readouterr().out


def test_cli_unknown_name_fails_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown NAME exits 1 with the error on stderr, no traceback."""
    assert main(["schema", "RebootCommand"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hostdev: unknown message type 'RebootCommand'")
    assert "Traceback" not in err


def test_cli_without_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    """``hostdev`` alone prints usage listing the schema command and exits 2."""
    assert main([]) == 2
    assert "schema" in capsys.readouterr().err


def _validator(name: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


@pytest.mark.parametrize("name", sorted(MESSAGE_TYPES))
def test_examples_validate_against_their_committed_schema(name: str) -> None:
    """What hostdev sends validates against the schema another language would use."""
    body = json.loads(encode(example_message(MESSAGE_TYPES[name])))
    _validator(name).validate(body)
    _validator(UNION_NAME).validate(body)


@settings(max_examples=100)
@given(any_message())
def test_generated_messages_validate_against_the_union(message: Any) -> None:
    """Any generated message validates against AnyMessage.json."""
    _validator(UNION_NAME).validate(json.loads(encode(message)))


def test_schema_rejects_what_decode_rejects() -> None:
    """An unknown field, a wrong v and a bad PCI address fail the schema too."""
    jsonschema = pytest.importorskip("jsonschema")
    validator = _validator("AttachPciDevicesCommand")
    good = {"type": "AttachPciDevicesCommand", "v": 1, "vm_uuid": "u", "addresses": ["28:00.1"]}
    validator.validate(good)
    for bad in ({**good, "extra": 1}, {**good, "v": 2}, {**good, "addresses": ["28:20.0"]},
                {**good, "addresses": ["28:00.8"]}):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)
