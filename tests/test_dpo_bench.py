"""The DPO benchmark harness runs both configurations and writes well-formed results (not its targets)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.dpo_bench import batch_tokens
from bench.report import dpo_table

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def test_batch_tokens_counts_prompt_once_per_answer_and_no_padding() -> None:
    from lorafleet.preference import PairExample, collate_pairs

    pairs = [PairExample([1, 2, 3], [4, 5], [6]), PairExample([7], [8, 9, 10, 11], [12, 13])]
    batch = collate_pairs(pairs, pad_token_id=0)
    assert batch["input_ids"].shape == (4, 5)  # padded to the longest row
    assert batch_tokens(batch) == sum(
        2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs
    )


def test_dpo_bench_runs_both_configurations(tmp_path: Path, tiny_llama: Path) -> None:
    results = tmp_path / "results_dpo.json"
    steps, batch = 2, 2
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.dpo_bench",
            "--steps",
            str(steps),
            "--batch",
            str(batch),
            "--repeats",
            "1",
            "--threads",
            "1",
            "--model",
            str(tiny_llama),
            "--results",
            str(results),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(results.read_text())
    assert set(data["runs"]) == {"lorafleet", "trl"}
    assert data["machine"]["torch"] == torch.__version__
    assert data["method"]["steps"] == steps and data["method"]["batch_pairs"] == batch
    for name, run in data["runs"].items():
        assert run["train_steps"] == steps, name
        # every step trains `batch` pairs: at least 2 prompt tokens + 2 answer tokens each
        assert run["train_tokens"] >= steps * batch * 4, name
        assert run["tokens_per_s"] == pytest.approx(run["train_tokens"] / run["train_runtime_s"], rel=1e-2)
        assert run["peak_rss_bytes"] > 100 * 2**20, name
        assert len(run["passes_tokens_per_s"]) == 1 and len(run["passes_peak_rss_bytes"]) == 1
        for key in ("preference_accuracy", "reward_accuracy"):
            assert 0.0 <= run[key] <= 1.0, (name, key)
    lf, tr = data["runs"]["lorafleet"], data["runs"]["trl"]
    assert data["tokens_per_s_ratio_vs_trl"] == pytest.approx(lf["tokens_per_s"] / tr["tokens_per_s"])
    assert data["peak_rss_ratio_vs_trl"] == pytest.approx(lf["peak_rss_bytes"] / tr["peak_rss_bytes"])
    assert data["preference_accuracy_diff_points"] == pytest.approx(
        100 * (lf["preference_accuracy"] - tr["preference_accuracy"])
    )
    table = dpo_table(data)  # what `python -m bench.report` prints for the README
    assert f"**{data['tokens_per_s_ratio_vs_trl']:.2f}**" in table and "trl `DPOTrainer`" in table
