"""Run records: append and read back, killed-writer tolerance, resume, ETA, plot, final metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.runlog import (
    LOG_NAME,
    RunRecorder,
    metric_records,
    plot_loss,
    read_records,
    smooth,
    write_final_metrics,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_records_are_appended_one_json_line_each(tmp_path: Path) -> None:
    with RunRecorder(tmp_path, 10, progress=False) as rec:
        rec.write_event("run_started", run_id="abc", world_size=1, skipped=None)
        for step in (1, 2, 3):
            rec.log(
                {
                    "step": step,
                    "loss": 2.0 / step,
                    "learning_rate": 1e-4,
                    "eval_loss": None,
                    "tokens": 100 * step,
                }
            )
    lines = (tmp_path / LOG_NAME).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert first["event"] == "run_started" and first["run_id"] == "abc" and "skipped" not in first
    records = read_records(tmp_path)
    assert [r.get("step") for r in records] == [None, 1, 2, 3]
    last = records[-1]
    assert last["loss"] == pytest.approx(2 / 3) and last["tokens"] == 300 and last["total_steps"] == 10
    assert last["percent"] == 30.0
    assert "eval_loss" not in last  # missing values are left out, not null
    assert last["peak_memory_bytes"] > 10 * 2**20
    assert {"elapsed_s", "eta_s", "time"} <= set(last)
    assert rec.records()[-1] == last


def test_nonfinite_values_are_named_not_written(tmp_path: Path) -> None:
    with RunRecorder(tmp_path, 4, progress=False) as rec:
        rec.log({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "learning_rate": 1e-3})
    text = (tmp_path / LOG_NAME).read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = read_records(tmp_path)[0]
    assert "loss" not in record and sorted(record["nonfinite"]) == ["grad_norm", "loss"]


def test_eta_from_rate_since_start(tmp_path: Path) -> None:
    clock = FakeClock()
    with RunRecorder(tmp_path, 10, progress=False, clock=clock) as rec:
        clock.now += 20.0
        r = rec.log({"step": 2, "loss": 1.0})
        assert r["elapsed_s"] == pytest.approx(20.0)
        assert r["eta_s"] == pytest.approx(8 * 10.0)  # 10 s per step, 8 steps left
        clock.now += 80.0
        r = rec.log({"step": 10, "loss": 0.5})
        assert r["eta_s"] == 0.0 and r["percent"] == 100.0


def test_resume_appends_and_gives_a_sane_eta(tmp_path: Path) -> None:
    clock = FakeClock()
    with RunRecorder(tmp_path, 100, progress=False, clock=clock) as rec:
        for step in range(1, 8):
            clock.now += 60.0  # a slow first attempt: a minute per step
            rec.log({"step": step, "loss": 3.0 - 0.1 * step})
    # The process is killed mid-line after step 7; the last checkpoint was at step 5.
    with open(tmp_path / LOG_NAME, "a", encoding="utf-8") as f:
        f.write('{"step": 8, "loss": 2.')
    clock2 = FakeClock(5.0)
    with RunRecorder(tmp_path, 100, progress=False, resume_step=5, clock=clock2) as rec2:
        assert [r["step"] for r in rec2.records()] == [1, 2, 3, 4, 5]
        clock2.now += 2.0
        r = rec2.log({"step": 6, "loss": 2.0})
        rec2.write_event("resumed", step=5)
    # ETA uses the rate since the restart (2 s/step), not the whole run's or the first attempt's.
    assert r["eta_s"] == pytest.approx(94 * 2.0)
    assert r["elapsed_s"] == pytest.approx(5 * 60.0 + 2.0)
    records = read_records(tmp_path)
    steps = [x.get("step") for x in records if "event" not in x]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 6]  # the truncated line is skipped, the new one is whole
    assert records[-1]["event"] == "resumed"
    # The replayed step 6 wins over the first attempt's.
    assert [x["step"] for x in metric_records(records)] == [1, 2, 3, 4, 5, 6, 7]
    assert metric_records(records)[5]["loss"] == 2.0


def test_read_records_tolerates_truncated_last_line_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / LOG_NAME
    path.write_bytes(b'{"step": 1, "loss": 1.5}\n{"step": 2, "lo')
    assert read_records(path) == [{"step": 1, "loss": 1.5}]
    path.write_bytes(b'{"step": 1}\n{"step": 2, "note": "\xe4\xbd')  # cut inside a UTF-8 character
    assert read_records(path) == [{"step": 1}]
    assert read_records(tmp_path / "absent.jsonl") == []


def test_non_main_rank_writes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunRecorder(run, 10, is_main=False, progress=True) as rec:
        rec.log({"step": 1, "loss": 1.0})
        rec.write_event("finished")
        assert len(rec.records()) == 1
    assert not run.exists()


def test_progress_bar_shows_loss_lr_and_throughput(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with RunRecorder(tmp_path, 5, progress=True) as rec:
        rec.log({"step": 5, "loss": 1.2345, "learning_rate": 2e-4, "tokens_per_s": 1234.0})
    err = capsys.readouterr().err
    assert "5/5" in err and "loss=1.2345" in err and "lr=2.00e-04" in err and "tok/s=1234" in err


def test_plot_loss_writes_a_png(tmp_path: Path) -> None:
    assert plot_loss(tmp_path) is None  # nothing logged yet
    with RunRecorder(tmp_path, 40, progress=False) as rec:
        for step in range(1, 41):
            record: dict[str, float] = {"step": step, "loss": 3.0 / step + 0.1 * (step % 3)}
            if step % 10 == 0:
                record["eval_loss"] = 3.5 / step
            rec.log(record)
        rec.write_event("finished")
    png = plot_loss(tmp_path)
    assert png == tmp_path / "training_loss.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(tmp_path.glob(".training_loss.*"))


def test_smooth_follows_trend_and_keeps_length() -> None:
    values = [float(i % 2) for i in range(200)]  # 0, 1, 0, 1 ...
    out = smooth(values)
    assert len(out) == 200 and smooth([]) == []
    assert max(out[100:]) - min(out[100:]) < 0.2  # the zig-zag is flattened
    assert smooth([2.0, 4.0])[0] == 2.0


def test_write_final_metrics_atomic_and_strict_json(tmp_path: Path) -> None:
    path = write_final_metrics(tmp_path / "run", {"eval_loss": 1.25, "eval_perplexity": float("inf"), "n": 3})
    assert json.loads(path.read_text()) == {"eval_loss": 1.25, "eval_perplexity": None, "n": 3}
    write_final_metrics(tmp_path / "run", {"eval_loss": 1.0})
    assert json.loads(path.read_text()) == {"eval_loss": 1.0}
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["final_metrics.json"]
