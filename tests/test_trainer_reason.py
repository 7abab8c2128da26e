"""Why a job is invalid reaches the user whichever rank found it (issue 16 item 10).

With two processes, the rank that fails first with exit status 2 makes torchrun stop the others, so
rank 0 may be killed before it prints ``error: ...``; the reason then never reached the log tail the
manager read. The failing rank itself now leaves the reason in its attempt directory. These tests
take the place of the race deterministically: only rank 1 runs, and rank 0 never prints.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.trainer import recipe
from services.trainer.launchers.base import REASON_FILE, attempt_dir, read_reason


def test_a_non_zero_rank_leaves_the_reason(tmp_path: Path, monkeypatch, capsys) -> None:
    job_dir = tmp_path / "jobs" / "j1"
    job_dir.mkdir(parents=True)
    config = job_dir / "config.yaml"
    config.write_text("data: {train_file: /nowhere/train.jsonl}\nmodel: {name_or_path: /nowhere}\n")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LORAFLEET_ATTEMPT", "3")
    assert recipe.main([str(config)]) == 2
    assert "error:" not in capsys.readouterr().err  # rank 1 prints nothing: the file is the channel
    reason = read_reason(attempt_dir(config, 3))
    assert "/nowhere" in reason and "\n" not in reason.strip()
    assert not list(attempt_dir(config, 3).glob("*.tmp"))


def test_no_reason_file_outside_a_managed_attempt(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("data: {train_file: /nowhere/train.jsonl}\n")
    monkeypatch.delenv("LORAFLEET_ATTEMPT", raising=False)
    assert recipe.main([str(config)]) == 2
    assert not list(tmp_path.rglob(REASON_FILE))


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_missing_or_empty_reason_reads_as_none(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / REASON_FILE).write_text(content)
    assert read_reason(tmp_path) == ""


def test_reason_is_bounded(tmp_path: Path) -> None:
    (tmp_path / REASON_FILE).write_bytes(b"\xff" + b"x" * 10_000)
    assert len(read_reason(tmp_path)) == 2000
