"""The end-to-end demo on the embedded defaults (what `make demo` runs).

Run as:
    python -m services.demo [--steps N] [--keep-going]

1. writes the bundled datasets to ``.cache/data`` and builds the offline tiny llama in
   ``.cache/tiny/llama`` if they are missing (nothing is downloaded);
2. fine-tunes it with LoRA on the PromptCBLUE-like task (``examples/lora.yaml``), progress bar on;
3. publishes the adapter atomically to ``.cache/adapters/demo-cblue/<version>/``;
4. asks the held-out questions to the base model and to the adapter, prints answers side by side
   and both accuracies.

Today the demo drives the training recipe in-process; the inference-service issue routes it through
the trainer and inference gRPC services.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".cache" / "data"
TINY = ROOT / ".cache" / "tiny" / "llama"
ADAPTERS = ROOT / ".cache" / "adapters"


@torch.no_grad()
def answer_all(
    model: Any, tokenizer: Any, template: Any, prompts: list[str], max_new_tokens: int
) -> list[str]:
    """Greedy answers, 16 prompts per batch, left-padded."""
    from lorafleet import templates
    from services.trainer.recipe import strip_stop_strings

    stop_ids = templates.stop_token_ids(template, tokenizer)
    stops = templates.stop_strings(template, tokenizer)
    answers: list[str] = []
    model.eval()
    for i in range(0, len(prompts), 16):
        seqs = [templates.encode_prompt(template, tokenizer, [], p, None) for p in prompts[i : i + 16]]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids,
        )
        for row in out[:, width:]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            answers.append(strip_stop_strings(text, stops).strip())
    return answers


def _short(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=None, help="override train.epochs")
    ap.add_argument("--show", type=int, default=10, help="held-out questions printed side by side")
    ap.add_argument(
        "--out",
        default=None,
        help="directory for the run and the published adapter (default: runs/demo and .cache/adapters)",
    )
    args = ap.parse_args(argv)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafleet import data, templates
    from lorafleet.config import load_config
    from lorafleet.datagen import generate_datasets
    from lorafleet.models import load_tokenizer
    from lorafleet.scoring import exact_match
    from lorafleet.tiny import build_tiny_model
    from services.trainer.recipe import run_training

    t0 = time.perf_counter()
    print("== 1/4 assets: bundled datasets and the offline tiny base model")
    generate_datasets(str(DATA))
    build_tiny_model(str(TINY), arch="llama", pretrain_steps=300)
    print(f"   data in {DATA}, base model in {TINY}")

    print("== 2/4 fine-tuning with LoRA (examples/lora.yaml)")
    out = Path(args.out).resolve() if args.out else None
    overrides = [
        f"output.run_dir={out / 'run' if out else 'runs/demo'}",
        f"output.adapters_root={out / 'adapters' if out else ADAPTERS}",
        "output.adapter_name=demo-cblue",
        "train.resume=never",
        "train.save_steps=0",
    ]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    config = load_config(ROOT / "examples" / "lora.yaml", overrides)
    result = run_training(config, progress=True)
    pub = result.published
    assert pub is not None
    print(f"== 3/4 published {pub.name}@{pub.version} -> {pub.path}")
    print(
        f"   template {pub.manifest.template}, method {pub.manifest.method}, "
        f"train loss {result.metrics.get('train_loss', float('nan')):.3f}, "
        f"eval loss {result.metrics.get('eval_loss', float('nan')):.3f}"
    )

    print("== 4/4 held-out questions: base model vs adapter")
    tokenizer = load_tokenizer(config.model)
    template = templates.get_template(pub.manifest.template, tokenizer)
    held_out, _ = data.load_dataset(str(config.data.validation_file), config.data)
    prompts = [s.turns[-1][0] for s in held_out]
    golds = [s.turns[-1][1] for s in held_out]
    base = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32)
    base_answers = answer_all(base, tokenizer, template, prompts, config.train.max_new_tokens)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32), str(pub.path)
    )
    tuned_answers = answer_all(tuned, tokenizer, template, prompts, config.train.max_new_tokens)
    base_acc = sum(exact_match(a, g) for a, g in zip(base_answers, golds)) / len(golds)
    tuned_acc = sum(exact_match(a, g) for a, g in zip(tuned_answers, golds)) / len(golds)
    print(f"{'criterion (held out)':<42} {'gold':<10} {'base model':<22} {'adapter':<12}")
    for p, g, b, a in list(zip(prompts, golds, base_answers, tuned_answers))[: args.show]:
        sentence = p.split("\n")[1] if "\n" in p else p
        mark = "ok" if exact_match(a, g) else "x"
        print(
            f"{_short(sentence, 40):<42} {_short(g, 10):<10} {_short(b, 20):<22} {_short(a, 12):<12} {mark}"
        )
    print(
        f"\nheld-out accuracy over {len(golds)} questions: base model {base_acc:.1%}   adapter {tuned_acc:.1%}"
    )
    print(f"run records: {result.run_dir}/trainer_log.jsonl, loss plot {result.run_dir}/training_loss.png")
    print(f"demo done in {time.perf_counter() - t0:.0f} s")
    return 0 if tuned_acc > base_acc else 1


if __name__ == "__main__":
    sys.exit(main())
