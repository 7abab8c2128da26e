"""Training benchmark: a lorafleet LoRA run against the plain HF Trainer + PEFT script, same run.

Run as:
    make bench            (or: .venv/bin/python -m bench.train_bench [--steps 60 --batch 16])

Method. Both sides train the same tiny offline model on the exact same token sequences (lorafleet
tokenizes the bundled PromptCBLUE-like data once and hands the sequences to the baseline), with the
same LoRA rank/alpha/dropout/targets, batch size, steps, learning rate, schedule and seed. Each run
is its own subprocess so that its peak RSS (``ru_maxrss`` from ``wait4``) is its alone. Throughput
is real (non-padding) tokens per second of the training loop. The final loss is compared as the
token-weighted loss of each published adapter on the held-out set, computed by this script with
one function for both. A second baseline enables HF's ``group_by_length`` so the report shows how
much of the gap is batching. Each of the three runs is repeated ``--repeats`` times (default 3),
interleaved run by run so that a slow spell of a shared machine hits them alike, and each reports
its median pass by tokens/s and, separately, its median peak RSS (every pass's figures are kept in
``passes_tokens_per_s`` / ``passes_peak_rss_bytes``).

Writes ``bench/results.json`` (key ``training``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "training"
RESULTS = ROOT / "bench" / "results.json"


def _run(cmd: list[str], log: Path) -> tuple[int, int, float]:
    """Run ``cmd``; return (exit code, peak RSS bytes of that child alone, wall seconds)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    return code, usage.ru_maxrss * 1024, wall


def _ensure_assets() -> None:
    from lorafleet.datagen import generate_datasets
    from lorafleet.tiny import build_tiny_model

    generate_datasets(str(ROOT / ".cache" / "data"))
    build_tiny_model(str(ROOT / ".cache" / "tiny" / "llama"), arch="llama", pretrain_steps=300)


@torch.no_grad()
def _eval_loss(model_dir: str, adapter_dir: Path, examples: list[Any]) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafleet import data

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    total, count = 0.0, 0.0
    for i in range(0, len(examples), 16):
        batch = data.collate(examples[i : i + 16], pad_token_id=0)
        out = model(**batch)
        n = float((batch["labels"][:, 1:] != -100).sum())
        total += float(out.loss) * n
        count += n
    return total / max(count, 1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--repeats", type=int, default=3, help="passes per run, interleaved; the median is reported"
    )
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")

    from lorafleet import data, templates
    from lorafleet.config import load_config
    from lorafleet.models import load_tokenizer

    _ensure_assets()
    # A fresh directory: the recipe would otherwise find its own earlier adapter (same run id) and
    # skip training, and the "measurement" would be a stale file.
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"train.max_steps={args.steps}",
        f"train.per_device_batch_size={args.batch}",
        "train.predict_with_generate=false",
        "train.save_steps=0",
        "train.eval_steps=0",
        "train.logging_steps=5",
        "train.warmup_ratio=0.05",
        "train.lr_scheduler=cosine",
        "output.adapter_name=bench-lorafleet",
        "train.resume=never",
    ]
    config = load_config(ROOT / "examples" / "lora.yaml", overrides)
    tokenizer = load_tokenizer(config.model)
    template = templates.get_template("llama2", tokenizer)
    train, _ = data.tokenize_samples(
        data.load_dataset(config.data.train_file, config.data)[0], tokenizer, template, config.data
    )
    val, _ = data.tokenize_samples(
        data.load_dataset(str(config.data.validation_file), config.data)[0], tokenizer, template, config.data
    )
    examples_file = OUT / "examples.jsonl"
    with open(examples_file, "w") as f:
        for e in train:
            f.write(json.dumps({"input_ids": e.input_ids, "labels": e.labels}) + "\n")

    lo = config.lora
    hf_common = [
        sys.executable,
        "-m",
        "bench.hf_baseline",
        "--model",
        config.model.name_or_path,
        "--examples",
        str(examples_file),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--lr",
        str(config.train.learning_rate),
        "--rank",
        str(lo.rank),
        "--alpha",
        str(lo.alpha),
        "--dropout",
        str(lo.dropout),
        "--seed",
        str(config.train.seed),
    ]

    def lorafleet_pass(k: int) -> dict[str, Any]:
        out = OUT / f"pass{k}"
        code, rss, wall = _run(
            [
                sys.executable,
                "-m",
                "services.trainer.recipe",
                str(ROOT / "examples" / "lora.yaml"),
                *overrides,
                f"output.run_dir={out / 'lorafleet_run'}",
                f"output.adapters_root={out / 'adapters'}",
                "data.template=llama2",
            ],
            out / "lorafleet.log",
        )
        if code != 0:
            raise SystemExit(f"lorafleet run failed; see {out / 'lorafleet.log'}")
        final = json.loads((out / "lorafleet_run" / "final_metrics.json").read_text())
        versions = (out / "adapters" / "bench-lorafleet").iterdir()
        published = sorted(versions, key=lambda p: int(p.name))[-1]
        return {
            "tokens_per_s": final["train_tokens_per_s"],
            "train_tokens": final["train_tokens"],
            "train_runtime_s": final["train_runtime_s"],
            "peak_rss_bytes": rss,
            "wall_s": wall,
            "eval_loss": _eval_loss(config.model.name_or_path, published, val),
        }

    def hf_pass(name: str, extra: list[str], k: int) -> dict[str, Any]:
        out_dir = OUT / f"pass{k}" / name
        log = OUT / f"pass{k}" / f"{name}.log"
        code, rss, wall = _run([*hf_common, "--out", str(out_dir), *extra], log)
        if code != 0:
            raise SystemExit(f"{name} failed; see {log}")
        res = json.loads((out_dir / "result.json").read_text())
        return {
            "tokens_per_s": res["tokens_per_s"],
            "train_tokens": res["train_tokens"],
            "train_runtime_s": res["train_runtime_s"],
            "peak_rss_bytes": rss,
            "wall_s": wall,
            "eval_loss": _eval_loss(config.model.name_or_path, out_dir / "adapter", val),
        }

    passes: dict[str, list[dict[str, Any]]] = {
        "lorafleet": [],
        "hf_trainer": [],
        "hf_trainer_group_by_length": [],
    }
    for k in range(args.repeats):
        (OUT / f"pass{k}").mkdir(parents=True, exist_ok=True)
        passes["lorafleet"].append(lorafleet_pass(k))
        passes["hf_trainer"].append(hf_pass("hf_trainer", [], k))
        passes["hf_trainer_group_by_length"].append(
            hf_pass("hf_trainer_group_by_length", ["--group-by-length"], k)
        )
        print(
            f"pass {k + 1}/{args.repeats}: "
            + ", ".join(f"{n} {v[-1]['tokens_per_s']:.0f} tok/s" for n, v in passes.items()),
            flush=True,
        )
    runs: dict[str, dict[str, Any]] = {}
    for name, done in passes.items():
        ordered = sorted(done, key=lambda r: r["tokens_per_s"])
        runs[name] = dict(ordered[(len(ordered) - 1) // 2])  # the median pass (lower median if even)
        runs[name]["passes_tokens_per_s"] = [r["tokens_per_s"] for r in done]
        # Peak RSS is its own measurement (allocator and thread timing move it by some percent from
        # pass to pass): the median over the passes, every pass kept.
        rss = sorted(r["peak_rss_bytes"] for r in done)
        runs[name]["peak_rss_bytes"] = rss[(len(rss) - 1) // 2]
        runs[name]["passes_peak_rss_bytes"] = [r["peak_rss_bytes"] for r in done]

    lf, hf = runs["lorafleet"], runs["hf_trainer"]
    training = {
        "tokens_per_s_ratio_vs_hf": lf["tokens_per_s"] / hf["tokens_per_s"],
        "peak_rss_ratio_vs_hf": lf["peak_rss_bytes"] / hf["peak_rss_bytes"],
        "final_loss_rel_diff": abs(lf["eval_loss"] - hf["eval_loss"]) / hf["eval_loss"],
        "tokens_per_s_ratio_vs_hf_group_by_length": lf["tokens_per_s"]
        / runs["hf_trainer_group_by_length"]["tokens_per_s"],
        "runs": runs,
        "method": {
            "model": config.model.name_or_path,
            "steps": args.steps,
            "batch": args.batch,
            "repeats": f"{args.repeats} interleaved passes per run; the median pass is reported",
            "lora_rank": lo.rank,
            "train_rows": len(train),
            "eval_rows": len(val),
            "torch_threads": torch.get_num_threads(),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results["training"] = training
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'run':<28}{'tok/s':>10}{'peak RSS MiB':>14}{'eval loss':>11}")
    for name, r in runs.items():
        print(
            f"{name:<28}{r['tokens_per_s']:>10.0f}{r['peak_rss_bytes'] / 2**20:>14.0f}{r['eval_loss']:>11.4f}"
        )
    print(
        json.dumps({k: v for k, v in training.items() if k.endswith(("_hf", "_diff", "_length"))}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
