"""Baseline for the training benchmark: the plain HF Trainer + PEFT script people write by hand.

Run as (the benchmark does it):
    python -m bench.hf_baseline --model DIR --examples FILE.jsonl --out DIR --steps N --batch B [--group-by-length]

It trains on pre-tokenized examples (``input_ids`` / ``labels`` lists, the exact token sequences
lorafleet trains on) with transformers' defaults: random sampler, ``DataCollatorForSeq2Seq``
padding to the longest sample of each batch, the Trainer loop. Writes ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--examples", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--group-by-length", action="store_true")
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in Path(args.examples).read_text().splitlines() if line.strip()]
    train = [
        {"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]), "labels": r["labels"]}
        for r in rows
    ]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=args.dropout,
            target_modules=args.targets.split(","),
        ),
    )
    tokens = {"n": 0}

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def counting_collator(features):
        tokens["n"] += sum(len(f["input_ids"]) for f in features)
        return collator(features)

    targs = TrainingArguments(
        output_dir=str(Path(args.out) / "trainer"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=int(
            args.steps * 0.05
        ),  # transformers 5 dropped warmup_ratio; same rounding as lorafleet
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length"
        if args.group_by_length
        else "random",  # transformers 5 name
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=counting_collator)
    t0 = time.perf_counter()
    out = trainer.train()
    runtime = time.perf_counter() - t0
    model.save_pretrained(str(Path(args.out) / "adapter"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "train_runtime_s": runtime,
        "train_tokens": tokens["n"],
        "tokens_per_s": tokens["n"] / runtime,
        "train_loss_last": losses[-1] if losses else None,
        "train_loss_mean": out.training_loss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
