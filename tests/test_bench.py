"""The benchmark scripts' smoke tests: they run and write well-formed results (not their targets)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.integration
def test_inference_bench_quick(tmp_path: Path) -> None:
    """``bench.inference_bench --quick`` runs every configuration and writes well-formed results,
    merged into the results file next to an existing ``training`` key."""
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"training": {"kept": True}}))
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.inference_bench",
            "--quick",
            "--results",
            str(results),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(results.read_text())
    assert data["training"] == {"kept": True}
    inference = data["inference"]
    for key in ("machine", "model", "method", "when"):
        assert inference[key]
    assert inference["machine"]["torch"] == torch.__version__
    counts = inference["method"]["adapter_counts"]
    assert counts and set(inference["by_adapters"]) == {str(n) for n in counts}
    for entry in inference["by_adapters"].values():
        for ratio in ("ratio_vs_naive", "ratio_vs_static_mixed", "mixed_vs_base"):
            assert entry[ratio] > 0
        for config in ("lorafleet", "naive_peft", "static_peft_mixed", "lorafleet_base_only"):
            figures = entry["runs"][config]
            assert figures["requests"] == inference["method"]["requests"]
            assert figures["generated_tokens"] > 0
            for metric in ("tokens_per_s", "requests_per_s", "ttft_p50_s", "ttft_p99_s"):
                assert figures[metric] > 0
            assert figures["ttft_p99_s"] >= figures["ttft_p50_s"]
            assert figures["latency_p99_s"] >= figures["latency_p50_s"] >= figures["ttft_p50_s"]
        assert entry["ratio_vs_naive"] == pytest.approx(
            entry["runs"]["lorafleet"]["tokens_per_s"] / entry["runs"]["naive_peft"]["tokens_per_s"]
        )
