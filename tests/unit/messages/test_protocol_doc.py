"""docs/protocol.md keeps up with the code: every message is in its catalogue."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostdev.messages.base import PROTOCOL_VERSION
from hostdev.messages.codec import MESSAGE_TYPES

DOC = Path(__file__).resolve().parents[3] / "docs" / "protocol.md"


@pytest.mark.parametrize("name", sorted(MESSAGE_TYPES))
def test_every_message_is_in_the_catalogue(name: str) -> None:
    """Each message type appears in a table row of docs/protocol.md."""
    rows = [line for line in DOC.read_text(encoding="utf-8").splitlines()
            if line.startswith("|")]
    assert any(f"`{name}`" in row for row in rows), (
        f"{name} is missing from the message catalogue in docs/protocol.md (section 3)"
    )


def test_documented_version_is_the_code_version() -> None:
    """The page's example bodies carry the protocol version the code speaks."""
    assert f'"v": {PROTOCOL_VERSION}' in DOC.read_text(encoding="utf-8")
