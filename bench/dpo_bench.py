"""DPO benchmark: lorafleet's preference loop against trl's ``DPOTrainer`` + PEFT LoRA, same run.

Run as:
    make bench            (or: .venv/bin/python -m bench.dpo_bench [--steps 60 --batch 8 --repeats 3])

Method. Both sides train a fresh LoRA with DPO (sigmoid loss, the base with the adapter disabled as
the reference) on the same offline tiny llama and the exact same token sequences: the bench
tokenizes the bundled preference data (``lorafleet.datagen.generate_preference_datasets``) once with
lorafleet's template and masking, and trl's trainer receives those ids (its own tokenization step is
skipped, so tokenizer differences cannot move the figures). Same LoRA rank / alpha / dropout /
targets, batch, steps, learning rate and schedule, β, max lengths, fp32, no gradient
checkpointing, and the same number of torch threads. lorafleet runs through its real entry point
(``python -m services.trainer.recipe`` with ``stage: dpo``); trl runs in this file's ``--worker``
mode. Each run is its own subprocess, so its peak RSS (``ru_maxrss`` from ``wait4``) is its own;
the configurations alternate (lorafleet first on even passes, trl first on odd ones) so that a slow
spell of a shared machine hits both, and each reports its median pass.

Tokens. Both sides count, per training micro-batch, the same logical tokens: the non-padding tokens
of the ``[chosen rows; rejected rows]`` batch, ``attention_mask.sum()``, i.e. Σ (2·|prompt| +
|chosen| + |rejected|) over the pairs trained on. trl's forward processes exactly these (each prompt
once per answer); lorafleet's computes each prompt once and both answers on its KV cache
(``lorafleet.preference_prefix``), so it runs fewer tokens through the model for the same count:
the figure is pairs' worth of work per second, not model tokens per second. lorafleet's loop counts
this itself; the trl worker counts it in a wrapper around trl's collator (:func:`batch_tokens`, the
one definition). Time is the training loop only: lorafleet's from its
first step to its last, trl's from ``on_train_begin`` to ``on_train_end`` (optimizer already built).

Accuracy. After each run, :func:`heldout_metrics` scores the held-out pairs with the trained adapter
(the same function and batches for both): ``preference_accuracy`` is the fraction of pairs whose
chosen answer has the higher summed log-prob under the policy, ``reward_accuracy`` the fraction whose
implicit DPO reward margin β·(Δ_chosen - Δ_rejected) is positive.

Writes ``bench/results_dpo.json`` and prints a table (``python -m bench.report --results
bench/results_dpo.json`` renders it as Markdown).
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
import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "dpo"
RESULTS = ROOT / "bench" / "results_dpo.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = ("lorafleet", "trl")


def batch_tokens(batch: dict[str, Any]) -> int:
    """Logical tokens of a DPO micro-batch: the non-padding tokens of its chosen and rejected rows."""
    return int(batch["attention_mask"].sum())


def _run(cmd: list[str], log: Path, threads: int) -> tuple[int, int, float]:
    """Run ``cmd``; return (exit code, peak RSS bytes of that child alone, wall seconds)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, time.perf_counter() - t0


def _ensure_assets(model: str | None) -> tuple[str, dict[str, Path]]:
    from lorafleet.datagen import generate_preference_datasets

    data = generate_preference_datasets(str(ROOT / ".cache" / "data"))
    if model:
        return model, data
    from lorafleet.tiny import build_tiny_model

    path = ROOT / ".cache" / "tiny" / "llama"
    build_tiny_model(str(path), arch="llama", pretrain_steps=300)
    return str(path), data


def _config_tree(args: argparse.Namespace, model: str, data: dict[str, Path], out: Path) -> dict[str, Any]:
    """The lorafleet run config; the trl worker receives the same values."""
    return {
        "model": {"name_or_path": model, "dtype": "fp32"},
        "stage": "dpo",
        "data": {
            "train_file": str(data["preference_train"]),
            "validation_file": str(data["preference_validation"]),
            "template": "llama2",
            "max_source_length": args.max_source_length,
            "max_target_length": args.max_target_length,
        },
        "method": "lora",
        "lora": {"rank": args.rank, "alpha": args.alpha, "dropout": 0.0, "target_modules": TARGETS},
        "preference": {"loss": "sigmoid", "beta": args.beta},
        "train": {
            "max_steps": args.steps,
            "per_device_batch_size": args.batch,
            "learning_rate": args.lr,
            "lr_scheduler": "constant",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": args.seed,
            "logging_steps": max(1, args.steps // 10),
            "num_threads": args.threads,
            "resume": "never",
            "predict_with_generate": False,
        },
        "output": {
            "run_dir": str(out / "run"),
            "adapters_root": str(out / "adapters"),
            "adapter_name": "bench-dpo",
        },
    }


def _tokenized(tree: dict[str, Any]) -> tuple[list[Any], list[Any], int]:
    """(train pairs, held-out pairs, pad id) as lorafleet's recipe tokenizes them."""
    from lorafleet import preference_data, templates
    from lorafleet.config import config_from_dict
    from lorafleet.models import load_tokenizer

    config = config_from_dict(tree)
    tokenizer = load_tokenizer(config.model)
    template = templates.get_template(config.data.template, tokenizer)
    out = []
    for path in (config.data.train_file, str(config.data.validation_file)):
        samples, _ = preference_data.load_preference_samples(path, config.preference, "dpo")
        pairs, _ = preference_data.tokenize_preference(samples, tokenizer, template, config.data)
        out.append(pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return out[0], out[1], pad


@torch.no_grad()
def heldout_metrics(
    model_dir: str, adapter_dir: Path, pairs: list[Any], pad: int, beta: float
) -> dict[str, float]:
    """Held-out preference figures of one trained LoRA adapter (the same code for every run)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafleet import preference

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ranks, margins = [], []
    for start in range(0, len(pairs), 16):
        batch = preference.collate_pairs(pairs[start : start + 16], pad)
        half = batch["input_ids"].shape[0] // 2
        policy = preference.forward_logps(model, batch)
        reward = beta * (policy - preference.reference_logps(model, batch))
        ranks.append(policy[:half] - policy[half:])
        margins.append(reward[:half] - reward[half:])
    rank, margin = torch.cat(ranks), torch.cat(margins)
    return {
        "preference_accuracy": float((rank > 0).float().mean()),
        "reward_accuracy": float((margin > 0).float().mean()),
        "mean_margin": float(margin.mean()),
    }


# ----------------------------------------------------------------------------- trl worker


def trl_worker(spec_path: Path) -> None:
    """Train DPO with trl's ``DPOTrainer`` + PEFT per the bench's spec file; write ``result.json``."""
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    out = Path(spec["out"])
    rows = [json.loads(line) for line in Path(spec["pairs"]).read_text().splitlines() if line.strip()]

    class PretokenizedDPOTrainer(DPOTrainer):
        """trl's trainer on the bench's token ids: its text tokenization step is skipped."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # type: ignore[no-untyped-def]
            return dataset

    class Clock(TrainerCallback):
        start = end = 0.0

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            Clock.start = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            Clock.end = time.perf_counter()

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=spec["rank"],
        lora_alpha=spec["alpha"],
        lora_dropout=0.0,
        target_modules=spec["targets"],
    )
    targs = DPOConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=spec["batch"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=spec["beta"],
        loss_type=["sigmoid"],
        max_length=spec["max_length"],
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=spec["seed"],
        logging_steps=max(1, spec["steps"] // 10),
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = PretokenizedDPOTrainer(
        model=model,
        args=targs,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Clock()],
    )
    collate = trainer.data_collator
    counted = {"tokens": 0}

    def counting_collator(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(examples)
        counted["tokens"] += batch_tokens(batch)
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    trained: Any = trainer.model
    trained.save_pretrained(str(out / "adapter"))
    runtime = Clock.end - Clock.start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "train_tokens": counted["tokens"],
        "train_runtime_s": runtime,
        "tokens_per_s": counted["tokens"] / runtime,
        "train_steps": trainer.state.global_step,
        "train_loss_last": losses[-1] if losses else None,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- the benchmark


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--repeats", type=int, default=3, help="passes per configuration, alternating")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-source-length", type=int, default=64)
    ap.add_argument("--max-target-length", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of both")
    ap.add_argument("--model", default=None, help="base model dir (default: the offline tiny llama)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--work-dir", type=Path, default=OUT)
    ap.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "trl":
        trl_worker(args.spec)
        return 0
    for name in ("steps", "batch", "repeats", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    model, data = _ensure_assets(args.model)
    # A fresh directory: the recipe would otherwise publish next to stale adapters of earlier runs.
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    train, held_out, pad = _tokenized(_config_tree(args, model, data, args.work_dir))
    pairs_file = args.work_dir / "pairs.jsonl"
    with open(pairs_file, "w") as f:
        for e in train:
            f.write(
                json.dumps(
                    {"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids}
                )
                + "\n"
            )

    def lorafleet_pass(out: Path) -> dict[str, Any]:
        config = out / "dpo.yaml"
        config.write_text(yaml.safe_dump(_config_tree(args, model, data, out), sort_keys=False))
        log = out / "lorafleet.log"
        code, rss, wall = _run(
            [sys.executable, "-m", "services.trainer.recipe", str(config)], log, args.threads
        )
        if code != 0:
            raise SystemExit(f"lorafleet run failed (exit {code}); see {log}")
        final = json.loads((out / "run" / "final_metrics.json").read_text())
        adapter = sorted((out / "adapters" / "bench-dpo").iterdir(), key=lambda p: int(p.name))[-1]
        return {
            "tokens_per_s": final["train_tokens_per_s"],
            "train_tokens": final["train_tokens"],
            "train_runtime_s": final["train_runtime_s"],
            "train_steps": final["train_steps"],
            "peak_rss_bytes": rss,
            "wall_s": wall,
            **heldout_metrics(model, adapter, held_out, pad, args.beta),
        }

    def trl_pass(out: Path) -> dict[str, Any]:
        spec = {
            "model": model,
            "pairs": str(pairs_file),
            "out": str(out),
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "beta": args.beta,
            "rank": args.rank,
            "alpha": args.alpha,
            "targets": TARGETS,
            "seed": args.seed,
            "threads": args.threads,
            "max_length": args.max_source_length + args.max_target_length,
        }
        (out / "spec.json").write_text(json.dumps(spec, indent=2))
        log = out / "trl.log"
        cmd = [sys.executable, "-m", "bench.dpo_bench", "--worker", "trl", "--spec", str(out / "spec.json")]
        code, rss, wall = _run(cmd, log, args.threads)
        if code != 0:
            raise SystemExit(f"trl run failed (exit {code}); see {log}")
        res = json.loads((out / "result.json").read_text())
        return {
            "tokens_per_s": res["tokens_per_s"],
            "train_tokens": res["train_tokens"],
            "train_runtime_s": res["train_runtime_s"],
            "train_steps": res["train_steps"],
            "peak_rss_bytes": rss,
            "wall_s": wall,
            **heldout_metrics(model, out / "adapter", held_out, pad, args.beta),
        }

    runners = {"lorafleet": lorafleet_pass, "trl": trl_pass}
    passes: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    for k in range(args.repeats):
        order = CONFIGS if k % 2 == 0 else CONFIGS[::-1]
        for name in order:
            out = args.work_dir / f"pass{k}" / name
            out.mkdir(parents=True, exist_ok=True)
            passes[name].append(runners[name](out))
        print(
            f"pass {k + 1}/{args.repeats}: "
            + ", ".join(
                f"{n} {v[-1]['tokens_per_s']:.0f} tok/s {v[-1]['peak_rss_bytes'] / 2**20:.0f} MiB"
                for n, v in passes.items()
            ),
            flush=True,
        )

    runs: dict[str, dict[str, Any]] = {}
    for name, done in passes.items():
        ordered = sorted(done, key=lambda r: r["tokens_per_s"])
        runs[name] = dict(ordered[(len(ordered) - 1) // 2])  # the median pass by tokens/s
        runs[name]["passes_tokens_per_s"] = [r["tokens_per_s"] for r in done]
        runs[name]["peak_rss_bytes"] = _median([r["peak_rss_bytes"] for r in done])
        runs[name]["passes_peak_rss_bytes"] = [r["peak_rss_bytes"] for r in done]
        runs[name]["passes_preference_accuracy"] = [r["preference_accuracy"] for r in done]
    lf, tr = runs["lorafleet"], runs["trl"]
    result = {
        "tokens_per_s_ratio_vs_trl": lf["tokens_per_s"] / tr["tokens_per_s"],
        "peak_rss_ratio_vs_trl": lf["peak_rss_bytes"] / tr["peak_rss_bytes"],
        "preference_accuracy_diff_points": 100 * (lf["preference_accuracy"] - tr["preference_accuracy"]),
        "targets": {
            "tokens_per_s_ratio_vs_trl": ">= 1.3",
            "peak_rss_ratio_vs_trl": "<= 1.0",
            "preference_accuracy_diff_points": "within +-2",
        },
        "runs": runs,
        "method": {
            "model": model,
            "loss": "sigmoid (DPO), reference = base with the adapter disabled",
            "steps": args.steps,
            "batch_pairs": args.batch,
            "learning_rate": args.lr,
            "lr_scheduler": "constant",
            "beta": args.beta,
            "lora": {"rank": args.rank, "alpha": args.alpha, "dropout": 0.0, "targets": TARGETS},
            "max_source_length": args.max_source_length,
            "max_target_length": args.max_target_length,
            "dtype": "fp32",
            "gradient_checkpointing": False,
            "torch_threads": args.threads,
            "train_pairs": len(train),
            "heldout_pairs": len(held_out),
            "repeats": f"{args.repeats} passes per configuration, alternating order; the median pass",
            "tokens": (
                "logical tokens of the pairs: sum of 2*|prompt| + |chosen| + |rejected| "
                "(lorafleet computes each prompt once; trl once per answer)"
            ),
            "versions": _versions(),
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
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'run':<12}{'tok/s':>10}{'peak RSS MiB':>14}{'pref acc':>10}{'reward acc':>12}")
    for name, r in runs.items():
        print(
            f"{name:<12}{r['tokens_per_s']:>10.0f}{r['peak_rss_bytes'] / 2**20:>14.0f}"
            f"{r['preference_accuracy']:>10.3f}{r['reward_accuracy']:>12.3f}"
        )
    print(json.dumps({k: v for k, v in result.items() if k.endswith(("_trl", "_points"))}, indent=2))
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "trl")}


if __name__ == "__main__":
    sys.exit(main())
