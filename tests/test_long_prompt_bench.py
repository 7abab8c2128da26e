"""The long-prompt benchmark's harness: workloads, per-request timing figures, a smoke run.

The vLLM peer needs its own venv (``scripts/vllm_venv.sh``, minutes and gigabytes), so the smoke
run here covers the lorafleet configuration only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.long_prompt_bench import (
    MIXED_LENGTHS,
    SYSTEM_PROMPT_TOKENS,
    USER_TURN_TOKENS,
    compare,
    make_workload,
)
from bench.report import long_table
from bench.timing import TimedRequest, inter_token_gaps, timing_figures

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorafleet.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("long-bench") / "tiny"
    return build_tiny_model(out, arch="llama", hidden_size=64, num_layers=2, num_heads=1)


def _timed(submitted: float, times: list[float]) -> TimedRequest:
    r = TimedRequest([1, 2, 3], "a00", len(times))
    r.submitted, r.token_times, r.tokens = submitted, list(times), list(range(len(times)))
    return r


def test_inter_token_gaps_are_per_request() -> None:
    """Gaps are taken within each request, never across two requests' tokens."""
    reqs = [_timed(0.0, [1.0, 1.5, 3.5]), _timed(0.2, [0.4]), _timed(1.0, [2.0, 2.25])]
    assert inter_token_gaps(reqs) == [0.5, 2.0, 0.25]


def test_timing_figures_from_per_request_timings() -> None:
    # 100 requests: request i is submitted at i, its first token comes i/100 s later, then 3 more
    # tokens 0.01 s apart, except request 99 that stalls 5 s before its last token.
    reqs = []
    for i in range(100):
        first = i + i / 100
        times = [first, first + 0.01, first + 0.02, first + 0.03]
        if i == 99:
            times[-1] = first + 0.02 + 5.0
        reqs.append(_timed(float(i), times))
    f = timing_figures(reqs, wall=10.0, cpu=5.0)
    assert f["requests"] == 100 and f["generated_tokens"] == 400 and f["prompt_tokens"] == 300
    assert f["tokens_per_s"] == pytest.approx(40.0)
    assert f["tokens_per_cpu_s"] == pytest.approx(80.0)
    assert f["ttft_p50_s"] == pytest.approx(0.495)  # TTFTs are 0.00 .. 0.99
    assert f["ttft_p99_s"] == pytest.approx(0.9801)
    assert f["itl_p50_s"] == pytest.approx(0.01)
    assert f["itl_max_s"] == pytest.approx(5.0)
    assert f["itl_p99_s"] < 5.0  # one stall among 300 gaps is above the 99th percentile
    assert f["latency_p99_s"] >= f["latency_p50_s"] >= f["ttft_p50_s"]


def test_timing_figures_refuse_missing_token_times() -> None:
    r = _timed(0.0, [0.1, 0.2])
    r.tokens.append(7)
    with pytest.raises(RuntimeError, match="3 tokens has 2 token times"):
        timing_figures([r], wall=1.0, cpu=1.0)


def test_compare_is_lorafleet_over_vllm() -> None:
    ours = {"tokens_per_s": 30.0, "tokens_per_cpu_s": 60.0, "ttft_p50_s": 2.0, "itl_max_s": None}
    theirs = {"tokens_per_s": 20.0, "tokens_per_cpu_s": 80.0, "ttft_p50_s": 4.0, "itl_max_s": 1.0}
    assert compare({"lorafleet": ours, "vllm_cpu": theirs}) == {
        "tokens_per_s": 1.5,
        "tokens_per_cpu_s": 0.75,
        "ttft_p50_s": 0.5,
    }
    assert compare({"lorafleet": ours}) == {}


def test_mixed_workload_cycles_its_lengths(model_dir: Path) -> None:
    reqs = make_workload(model_dir, "mixed", 12, 8, 32)
    assert [len(r.prompt) for r in reqs] == [MIXED_LENGTHS[i % 4] for i in range(12)]
    assert [r.adapter for r in reqs] == [f"a{i % 8:02d}" for i in range(12)]
    assert len({tuple(r.prompt[1:17]) for r in reqs}) == 12  # no shared prefixes beyond BOS
    assert all(r.max_new_tokens == 32 for r in reqs)


def test_shared_prefix_workload_shares_one_system_prompt_per_adapter(model_dir: Path) -> None:
    reqs = make_workload(model_dir, "shared_prefix", 24, 8, 32)
    low, high = USER_TURN_TOKENS
    systems: dict[str, tuple[int, ...]] = {}
    for r in reqs:
        assert low <= len(r.prompt) - SYSTEM_PROMPT_TOKENS <= high
        assert systems.setdefault(r.adapter or "", tuple(r.prompt[:SYSTEM_PROMPT_TOKENS])) == tuple(
            r.prompt[:SYSTEM_PROMPT_TOKENS]
        )
    assert len(systems) == 8 and len(set(systems.values())) == 8
    assert len({tuple(r.prompt[SYSTEM_PROMPT_TOKENS:]) for r in reqs}) == 24  # the user turns differ


def test_short_workload_is_the_inference_benchmarks(model_dir: Path) -> None:
    reqs = make_workload(model_dir, "short", 16, 8, 32)
    assert all(1 <= len(r.prompt) <= 48 for r in reqs)  # cut at 8..48, corpus lines are shorter
    with pytest.raises(ValueError, match="workload='long'"):
        make_workload(model_dir, "long", 4, 8, 32)


@pytest.mark.integration
def test_long_prompt_bench_quick_without_vllm(tmp_path: Path) -> None:
    """A quick run without a vLLM venv still measures lorafleet, says why vLLM is missing, and
    keeps the other models' results."""
    results = tmp_path / "results_long.json"
    results.write_text(json.dumps({"models": {"other": {"kept": True}}}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.long_prompt_bench",
            "--quick",
            "--adapters",
            "2",  # 4 requests per adapter: the shared-prefix ones can reuse their system prompt
            "--vllm-python",
            str(tmp_path / "no-venv" / "python"),
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
    assert data["models"]["other"] == {"kept": True}
    quick = data["models"]["quick"]
    assert quick["vllm"] is None and "no-venv/python not found" in quick["vllm_missing"]
    assert set(quick["workloads"]) == {"short", "mixed", "shared_prefix"}
    assert quick["workloads"]["mixed"]["prompt_tokens"]["max"] == max(MIXED_LENGTHS)
    assert quick["workloads"]["shared_prefix"]["prompt_tokens"]["min"] >= SYSTEM_PROMPT_TOKENS
    for entry in quick["workloads"].values():
        run = entry["runs"]["lorafleet"]
        assert run["requests"] == quick["method"]["requests_per_pass"]
        assert run["generated_tokens"] > 0 and run["tokens_per_s"] > 0
        assert run["ttft_p99_s"] >= run["ttft_p50_s"] > 0
        assert run["itl_max_s"] >= run["itl_p99_s"] >= run["itl_p50_s"] >= 0
        assert run["peak_rss_mb"] >= run["peak_pss_mb"] > 0
        assert entry["lorafleet_over_vllm"] == {} and "outputs_identical" not in entry
    for key in ("machine", "targets_h1024_8_adapters"):
        assert data[key]
    shared = quick["workloads"]["shared_prefix"]
    assert set(shared["runs"]) == {"lorafleet", "lorafleet_no_prefix"}  # the ablation, same tokens
    assert shared["runs"]["lorafleet"]["prefix_hit_tokens"] > 0
    assert shared["runs"]["lorafleet_no_prefix"]["prefix_hit_tokens"] == 0
    assert shared["prefix_reuse_speedup"]["ttft_p50"] > 0
    assert set(quick["workloads"]["short"]["runs"]) == {"lorafleet", "lorafleet_padded"}
    lorafleet = quick["workloads"]["mixed"]["runs"]["lorafleet"]
    assert 0 < lorafleet["kv_peak_used_mb"] <= lorafleet["kv_budget_mb"]
    table = long_table("quick", quick)  # what `python -m bench.report` prints for the README
    assert "| shared_prefix | lorafleet_no_prefix |" in table and "prefix reuse: TTFT p50" in table
