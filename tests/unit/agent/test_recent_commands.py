"""The bounded memory of answers by message id."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostdev.agent.recent_commands import RecentCommands
from hostdev.messages.codec import encode
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


def test_the_answers_survive_a_restart_on_the_same_file(tmp_path: Path) -> None:
    """A second memory on the same path (the restarted agent) knows the first one's answers."""
    path = tmp_path / "state" / "recent-commands.json"
    first = RecentCommands(path=path)
    answer = StopAnswer(vm_uuid="vm1", state="stopped", boot_id="b0", seq=7)
    first.remember("c1", answer)
    assert RecentCommands(path=path).answer_of("c1") == answer
    assert not list(path.parent.glob(".recent-commands.json.*"))  # no temporary file left


def test_the_file_keeps_only_the_most_recent_answers(tmp_path: Path) -> None:
    """The file is bounded: ``persisted`` answers, the newest ones."""
    path = tmp_path / "recent-commands.json"
    recent = RecentCommands(path=path, persisted=2)
    for n in range(5):
        recent.remember(f"c{n}", StopAnswer(vm_uuid=f"vm{n}"))
    reloaded = RecentCommands(path=path)
    assert (len(reloaded), reloaded.answer_of("c2"), reloaded.answer_of("c4")) == (
        2, None, StopAnswer(vm_uuid="vm4"))


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 9, "answers": []}',
                                     b'{"version": 1, "answers": [{"id": "c", "answer": {}}]}'])
def test_a_corrupt_file_is_reported_with_its_path_and_ignored(
        tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    """The agent starts with an empty memory and says which file it ignored."""
    path = tmp_path / "recent-commands.json"
    path.write_bytes(content)
    recent = RecentCommands(path=path)
    assert len(recent) == 0
    out = capsys.readouterr().out
    assert "recent_commands_corrupt" in out and str(path) in out
    recent.remember("c1", StopAnswer(vm_uuid="vm1"))  # and the next answer replaces the file
    assert RecentCommands(path=path).answer_of("c1") == StopAnswer(vm_uuid="vm1")


def test_a_file_that_cannot_be_written_keeps_the_memory_in_the_process(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A state directory that is a file: the answer is still remembered, the error logged."""
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    recent = RecentCommands(path=blocker / "recent-commands.json")
    recent.remember("c1", StopAnswer(vm_uuid="vm1"))
    assert recent.answer_of("c1") == StopAnswer(vm_uuid="vm1")
    out = capsys.readouterr().out
    assert "recent_commands_not_saved" in out and str(blocker) in out


def test_each_answer_is_appended_and_the_file_rewritten_at_twice_its_size(
        tmp_path: Path) -> None:
    """One line per new answer, not the whole file; at 2 x ``persisted`` lines, the newest only."""
    path = tmp_path / "recent-commands.json"
    recent = RecentCommands(path=path, persisted=3)
    lines = []
    for n in range(7):
        recent.remember(f"c{n}", StopAnswer(vm_uuid=f"vm{n}"))
        lines.append(len(path.read_bytes().splitlines()))
    # header + answers: 1 written at first, appended up to 6, then rewritten to the newest 3
    assert lines == [2, 3, 4, 5, 6, 7, 4]
    reloaded = RecentCommands(path=path, persisted=3)
    assert [reloaded.answer_of(f"c{n}") for n in (3, 4, 6)] == [None, StopAnswer(vm_uuid="vm4"),
                                                                StopAnswer(vm_uuid="vm6")]


def test_an_append_cut_short_by_a_crash_is_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    """The cut line's answer was never published; the next answer rewrites the file whole."""
    path = tmp_path / "recent-commands.json"
    recent = RecentCommands(path=path)
    for n in range(3):
        recent.remember(f"c{n}", StopAnswer(vm_uuid=f"vm{n}"))
    whole = path.read_bytes()
    path.write_bytes(whole[:-9])  # the last append stopped before its end
    restarted = RecentCommands(path=path)
    assert (len(restarted), restarted.answer_of("c1"), restarted.answer_of("c2")) == (
        2, StopAnswer(vm_uuid="vm1"), None)
    restarted.remember("c3", StopAnswer(vm_uuid="vm3"))
    again = RecentCommands(path=path)
    assert [again.answer_of(f"c{n}") for n in (0, 2, 3)] == [
        StopAnswer(vm_uuid="vm0"), None, StopAnswer(vm_uuid="vm3")]


def test_a_version_1_file_is_read(tmp_path: Path) -> None:
    """The agent before this format wrote one document; its answers still count after an upgrade."""
    path = tmp_path / "recent-commands.json"
    answer = StopAnswer(vm_uuid="vm1", state="stopped", boot_id="b0", seq=7)
    path.write_bytes(b'{"version":1,"answers":[{"id":"c1","answer":%s}]}' % encode(answer))
    recent = RecentCommands(path=path)
    assert recent.answer_of("c1") == answer
    recent.remember("c2", StopAnswer(vm_uuid="vm2"))
    assert RecentCommands(path=path).answer_of("c1") == answer


def test_a_failed_append_is_logged_and_the_next_answer_rewrites_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A line that may be half written is never appended to: the file is rewritten whole."""
    path = tmp_path / "recent-commands.json"
    recent = RecentCommands(path=path)
    recent.remember("c1", StopAnswer(vm_uuid="vm1"))

    def full_disk(_handle: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fdatasync", full_disk)
        recent.remember("c2", StopAnswer(vm_uuid="vm2"))
    assert "recent_commands_not_saved" in capsys.readouterr().out
    recent.remember("c3", StopAnswer(vm_uuid="vm3"))
    reloaded = RecentCommands(path=path)
    assert [reloaded.answer_of(f"c{n}") for n in (1, 2, 3)] == [
        StopAnswer(vm_uuid=f"vm{n}") for n in (1, 2, 3)]
    assert path.read_bytes().count(b"\n") == 4  # rewritten: header and three whole lines
