"""Render the benchmarks' figures in ``bench/results.json`` as the README's Markdown tables.

Run as:
    .venv/bin/python -m bench.report                       (bench/results.json, keys ``training``, ``inference``)
    .venv/bin/python -m bench.report --results FILE        (another results file, e.g. a wider model)
    .venv/bin/python -m bench.report --dpo-results FILE    (the DPO benchmark's file, default bench/results_dpo.json)
    .venv/bin/python -m bench.report --long-results FILE   (the long-prompt benchmark's, default bench/results_long.json)

The README quotes this output verbatim, so its figures are the file's, not retyped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results.json"
DPO_RESULTS = Path(__file__).resolve().parent / "results_dpo.json"
LONG_RESULTS = Path(__file__).resolve().parent / "results_long.json"
LABELS = {
    "lorafleet": "**lorafleet** (continuous batching, mixed adapters)",
    "naive_peft": "PEFT, one request at a time (`set_adapter` + `generate`)",
    "static_peft_mixed": "PEFT static batches (`generate(adapter_names=...)`)",
    "lorafleet_base_only": "lorafleet engine, base model only (ceiling)",
}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}"


TRAINING_LABELS = {
    "lorafleet": "**lorafleet**",
    "hf_trainer": "HF Trainer + PEFT",
    "hf_trainer_group_by_length": "HF Trainer + PEFT, `group_by_length=True`",
}


def training_table(result: dict[str, Any]) -> str:
    """The training runs (median pass of each) and the ratio line."""
    lines = [
        "| run | tokens/s: median (passes) | peak RSS MiB: median (passes) | held-out loss |",
        "|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        passes = ", ".join(f"{v:.0f}" for v in run.get("passes_tokens_per_s", []))
        lines.append(
            f"| {TRAINING_LABELS.get(name, name)} | {run['tokens_per_s']:.0f}"
            + (f" ({passes})" if passes else "")
            + f" | {run['peak_rss_bytes'] / 2**20:.0f}"
            + (
                f" ({', '.join(f'{v / 2**20:.0f}' for v in run['passes_peak_rss_bytes'])})"
                if "passes_peak_rss_bytes" in run
                else ""
            )
            + f" | {run['eval_loss']:.4f} |"
        )
    return (
        "\n".join(lines)
        + f"\n\n`tokens_per_s_ratio_vs_hf` **{result['tokens_per_s_ratio_vs_hf']:.2f}**, "
        + f"`peak_rss_ratio_vs_hf` **{result['peak_rss_ratio_vs_hf']:.2f}**, "
        + f"`final_loss_rel_diff` **{result['final_loss_rel_diff'] * 100:.1f} %**; against HF with "
        + f"`group_by_length` the throughput ratio is {result['tokens_per_s_ratio_vs_hf_group_by_length']:.2f}."
    )


DPO_LABELS = {"lorafleet": "**lorafleet** (its own loop)", "trl": "trl `DPOTrainer` + PEFT"}


def dpo_table(result: dict[str, Any]) -> str:
    """The DPO runs (median pass of each), their held-out accuracy, and the ratio line."""
    lines = [
        "| run | tokens/s: median (passes) | peak RSS MiB: median (passes) | held-out preference acc. "
        "| held-out reward acc. |",
        "|---|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        tps = ", ".join(f"{v:.0f}" for v in run["passes_tokens_per_s"])
        rss = ", ".join(f"{v / 2**20:.0f}" for v in run["passes_peak_rss_bytes"])
        lines.append(
            f"| {DPO_LABELS.get(name, name)} | {run['tokens_per_s']:.0f} ({tps}) "
            f"| {run['peak_rss_bytes'] / 2**20:.0f} ({rss}) "
            f"| {run['preference_accuracy'] * 100:.1f} % | {run['reward_accuracy'] * 100:.1f} % |"
        )
    return (
        "\n".join(lines)
        + f"\n\n`tokens_per_s_ratio_vs_trl` **{result['tokens_per_s_ratio_vs_trl']:.2f}** (target >= 1.3), "
        + f"`peak_rss_ratio_vs_trl` **{result['peak_rss_ratio_vs_trl']:.2f}** (target <= 1.0), "
        + f"held-out preference accuracy difference **{result['preference_accuracy_diff_points']:+.1f} points** "
        + "(target within 2)."
    )


def inference_table(result: dict[str, Any]) -> str:
    """The per-configuration table and the ratio lines, one block per adapter count."""
    lines = [
        "| adapters | configuration | tokens/s | requests/s | TTFT p50 / p99 ms | latency p50 / p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    ratios = []
    for n, block in result["by_adapters"].items():
        for name, run in block["runs"].items():
            lines.append(
                f"| {n} | {LABELS.get(name, name)} | {run['tokens_per_s']:.0f} | {run['requests_per_s']:.1f} "
                f"| {_ms(run['ttft_p50_s'])} / {_ms(run['ttft_p99_s'])} "
                f"| {_ms(run['latency_p50_s'])} / {_ms(run['latency_p99_s'])} |"
            )
        same = block.get("outputs_identical", {})
        parts = [
            f"{key} **{block[key]:.2f}**"
            for key in ("ratio_vs_naive", "ratio_vs_static_mixed", "mixed_vs_base")
            if key in block
        ]
        identical = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items())
        ratios.append(
            f"- {n} adapter(s): {', '.join(parts)}"
            + (f" (same tokens as lorafleet: {identical})" if identical else "")
        )
    targets = result.get("targets_at_8_adapters")
    out = "\n".join(lines) + "\n\n" + "\n".join(ratios)
    if targets:
        out += "\n\nTargets at 8 adapters: " + ", ".join(f"{k} >= {v}" for k, v in targets.items()) + "."
    return out


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def long_table(model: str, result: dict[str, Any]) -> str:
    """One model of the long-prompt benchmark: every configuration per workload (median pass),
    then the ratios each target reads."""
    lines = [
        "| workload | configuration | tokens/s (passes) | TTFT p50 / p99 s | ITL p50 / p99 s | worst stall s "
        "| peak PSS / RSS MiB | KV peak / budget MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for workload, entry in result["workloads"].items():
        for name, run in entry["runs"].items():
            passes = ", ".join(f"{v:.1f}" for v in run.get("passes_tokens_per_s", []))
            kv = f"{run['kv_peak_used_mb']:.0f} / {run['kv_budget_mb']:.0f}" if "kv_budget_mb" in run else "-"
            lines.append(
                f"| {workload} | {name} | **{run['tokens_per_s']:.1f}** ({passes}) "
                f"| {_s(run['ttft_p50_s'])} / {_s(run['ttft_p99_s'])} "
                f"| {_s(run['itl_p50_s'], 3)} / {_s(run['itl_p99_s'], 3)} | {_s(run['itl_max_s'])} "
                f"| {run['peak_pss_mb']:.0f} / {run['peak_rss_mb']:.0f} | {kv} |"
            )
        parts = []
        vs = entry.get("lorafleet_over_vllm") or {}
        if vs:
            parts.append(
                "over vllm_cpu: "
                + ", ".join(
                    f"{k} {v:.2f}x" for k, v in vs.items() if k in ("tokens_per_s", "ttft_p99_s", "itl_p99_s")
                )
            )
        same = entry.get("outputs_identical")
        if same:
            parts.append(f"identical outputs {same['identical']}/{same['total']}")
        reuse = entry.get("prefix_reuse_speedup")
        if reuse:
            parts.append(f"prefix reuse: TTFT p50 {reuse['ttft_p50']:.2f}x better than off")
        padded = entry.get("paged_over_padded")
        if padded:
            parts.append(f"paged over the padded layout: tokens/s {padded['tokens_per_s']:.2f}x")
        if parts:
            ratios.append(f"- {model} / {workload}: " + "; ".join(parts))
    return "\n".join(lines) + ("\n\n" + "\n".join(ratios) if ratios else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--dpo-results", type=Path, default=DPO_RESULTS)
    ap.add_argument("--long-results", type=Path, default=LONG_RESULTS)
    args = ap.parse_args(argv)
    data = json.loads(args.results.read_text())
    if "training" not in data and "inference" not in data:
        print(f"{args.results}: no 'training' or 'inference' key (run `make bench` first)", file=sys.stderr)
        return 1
    if "training" in data:
        print("Training\n\n" + training_table(data["training"]) + "\n")
    if "inference" in data:
        print("Inference\n\n" + inference_table(data["inference"]))
    if args.dpo_results.is_file():
        print("\nDPO\n\n" + dpo_table(json.loads(args.dpo_results.read_text())))
    if args.long_results.is_file():
        for model, entry in json.loads(args.long_results.read_text()).get("models", {}).items():
            if entry.get("workloads"):
                print(f"\nLong prompts, {model}\n\n" + long_table(model, entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
