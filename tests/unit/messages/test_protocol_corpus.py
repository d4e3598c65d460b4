"""Bodies recorded at protocol v1 (tests/data/protocol-v1) still decode with today's code.

An agent, a management daemon or a client of an older release keeps sending
what it sent then; during a rolling upgrade the newer side must take it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hostdev.messages.base import PROTOCOL_VERSION
from hostdev.messages.codec import decode, encode
from tools.record_protocol_corpus import CORPUS, missing_types

RECORDED = sorted(CORPUS.glob("*.json"))


def _kept(recorded: Any, now: Any, where: str) -> list[str]:
    """Lists where ``now`` lost or changed a value of ``recorded`` (new fields are fine)."""
    if isinstance(recorded, dict):
        if not isinstance(now, dict):
            return [f"{where}: was an object, is {now!r}"]
        return [problem for key, value in recorded.items()
                for problem in (_kept(value, now[key], f"{where}.{key}") if key in now
                                else [f"{where}.{key}: dropped"])]
    if isinstance(recorded, list):
        if not isinstance(now, list) or len(now) != len(recorded):
            return [f"{where}: was {recorded!r}, is {now!r}"]
        return [p for i, (a, b) in enumerate(zip(recorded, now, strict=True))
                for p in _kept(a, b, f"{where}[{i}]")]
    return [] if recorded == now else [f"{where}: was {recorded!r}, is {now!r}"]


def test_the_corpus_records_every_message_type() -> None:
    """Each message type of the protocol has a recorded body (a new type: record it once)."""
    assert RECORDED, f"no corpus in {CORPUS}"
    assert missing_types() == [], "record them: .venv/bin/python tools/record_protocol_corpus.py"


@pytest.mark.parametrize("path", RECORDED, ids=lambda path: path.stem)
def test_a_recorded_body_decodes_and_keeps_every_value(path: Path) -> None:
    """The recorded body decodes to its type at this major version, every field's value kept."""
    body = path.read_bytes()
    message = decode(body)
    assert type(message).__name__ == path.stem
    assert message.v == PROTOCOL_VERSION
    assert _kept(json.loads(body), json.loads(encode(message)), path.stem) == []
