"""The bounded memory of answers by message id."""

from __future__ import annotations

import pytest

from hostdev.agent.recent_commands import RecentCommands
from hostdev.messages.commands import StopAnswer


def test_the_answer_of_a_known_id_is_returned_and_the_oldest_forgotten() -> None:
    """Answers are kept by message id up to the size; ids without value are never kept."""
    recent = RecentCommands(size=2)
    first, second, third = (StopAnswer(vm_uuid=f"vm{n}") for n in range(3))
    recent.remember("a", first)
    recent.remember("b", second)
    recent.remember(None, third)
    assert recent.answer_of("a") is first and recent.answer_of(None) is None
    recent.remember("c", third)
    assert (recent.answer_of("a"), recent.answer_of("c"), len(recent)) == (None, third, 2)


def test_a_size_below_one_is_refused() -> None:
    """A memory of no answers would silently drop nothing: refused with the reason."""
    with pytest.raises(ValueError, match="at least one"):
        RecentCommands(size=0)
