"""Build tiny base models offline: a byte-level BPE tokenizer trained on local text, a small LLaMA,
Qwen2 or GPT-NeoX model initialised from a config, optionally pre-trained a few hundred steps so that
it writes words of its corpus. Tests, examples and the demo fine-tune these instead of hub models.

Run as::

    python -m lorafleet.tiny --arch llama --out .cache/tiny/llama --pretrain-steps 300

A build is idempotent: a directory already holding a complete build with the same settings is
returned as is. Builds go to a temporary sibling directory that is renamed into place at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from lorafleet.templates import TEMPLATE_SPECIAL_TOKENS
from lorafleet.tiny_source import SOURCE_ARCHS, write_source_checkpoint

MANIFEST_NAME = "lorafleet_tiny.json"
"""File in a built model directory saying how it was built."""
COMPLETE_MARKER = ".lorafleet_tiny_complete"
"""Written last: a directory without it is an unfinished build."""
NATIVE_ARCHS = ("llama", "qwen2", "gpt_neox")
"""Architectures transformers implements, built through its own classes (and optionally pre-trained)."""
ARCHS = (*NATIVE_ARCHS, *SOURCE_ARCHS)
"""Architectures ``build_tiny_model`` can build; the ``SOURCE_ARCHS`` in their original published
layout (``lorafleet.tiny_source``), random-initialised."""
_FORMAT_VERSION = 1 + 1  # bumped: CJK-per-character pre-tokenizer

# Markers of every prompt template (ChatML, Llama 3, ChatGLM2/3, Baichuan/Baichuan2...) become single
# ids, as in the real tokenizers; templates.py is the one source of the list.
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "</s>", "<pad>", "<unk>", *TEMPLATE_SPECIAL_TOKENS)
"""Special tokens of every tiny tokenizer: bos, eos, pad, unk, then the template markers."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Qwen-style ChatML chat template given to tiny tokenizers."""


# CJK ideographs, CJK punctuation and full-width forms.
_CJK_CHAR = r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]"


def train_tokenizer(
    corpus: str, vocab_size: int = 3000, special_tokens: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus``.

    Byte-level BPE never needs an unknown token, so any text (Chinese included) round-trips exactly
    through encode and decode. The vocabulary stays smaller than ``vocab_size`` when the corpus has
    fewer merges to learn.

    Args:
        corpus: training text.
        vocab_size: upper bound on the vocabulary, special tokens and the 256 bytes included.
        special_tokens: extra special tokens, added after ``DEFAULT_SPECIAL_TOKENS``.

    Returns:
        A fast tokenizer with bos ``<s>``, eos ``</s>``, pad ``<pad>``, unk ``<unk>``, the markers as
        additional special tokens, and a ChatML ``chat_template``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    names = list(dict.fromkeys([*DEFAULT_SPECIAL_TOKENS, *(special_tokens or [])]))
    # "sop" is plain letters: single_word keeps it from matching inside words such as "Aesop".
    added = [AddedToken(t, special=True, normalized=False, single_word=t.isalnum()) for t in names]
    backend = Tokenizer(models.BPE())
    # Each CJK character (and full-width punctuation) is its own pre-token, as BERT and most Chinese
    # tokenizers do. Without it BPE happily merges whole memorised Chinese sentences into one token,
    # and a model trained on them cannot generalise to a sentence it has not seen.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CJK_CHAR), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([corpus], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=names[4:],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,  # would turn "a ." into "a." and break round trips
        model_max_length=1024,
    )


def _model_config(arch: str, vocab: int, tokenizer: Any, sizes: dict[str, int]) -> Any:
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = {
        "vocab_size": vocab,
        "hidden_size": sizes["hidden_size"],
        "intermediate_size": sizes["intermediate_size"],
        "num_hidden_layers": sizes["num_layers"],
        "num_attention_heads": sizes["num_heads"],
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "llama":
        return LlamaConfig(**common, num_key_value_heads=sizes["num_kv_heads"])
    if arch == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=sizes["num_kv_heads"])
    return GPTNeoXConfig(**common)


def _token_stream(corpus: str, tokenizer: Any) -> torch.Tensor:
    """The corpus as one id sequence, eos after each paragraph. Shape [n_tokens]."""
    paragraphs = [p.strip() for p in corpus.split("\n\n") if p.strip()]
    ids: list[int] = []
    # The backend directly: the wrapper warns about texts longer than model_max_length.
    for encoding in tokenizer.backend_tokenizer.encode_batch(paragraphs, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _windows(stream: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    return torch.stack([stream[s : s + length] for s in starts.tolist()])  # [batch, length]


@torch.no_grad()
def _mean_loss(model: Any, batches: torch.Tensor) -> float:
    model.eval()
    loss = sum(float(model(input_ids=b, labels=b).loss) for b in batches) / len(batches)
    model.train()
    return loss


def _pretrain(model: Any, stream: torch.Tensor, settings: dict[str, Any]) -> dict[str, Any]:
    """Causal-LM pre-training on random windows of the stream: AdamW, warmup then cosine decay."""
    steps, batch_size = settings["pretrain_steps"], settings["batch_size"]
    length = min(settings["seq_len"], len(stream))
    gen = torch.Generator().manual_seed(settings["seed"])
    last_start = len(stream) - length
    # Fixed evaluation windows spread over the corpus: [4, 8, length]
    eval_starts = torch.linspace(0, last_start, 32).long()
    eval_batches = _windows(stream, eval_starts, length).view(4, 8, length)
    initial = _mean_loss(model, eval_batches)
    if steps == 0:
        return {"initial_loss": initial, "final_loss": initial, "pretrain_seconds": 0.0}
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"], betas=(0.9, 0.95))
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    began = time.perf_counter()
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, last_start + 1, (batch_size,), generator=gen)
        batch = _windows(stream, starts, length)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - began
    return {
        "initial_loss": initial,
        "final_loss": _mean_loss(model, eval_batches),
        "pretrain_seconds": seconds,
    }


def _settings(arch: str, corpus: str, **values: Any) -> dict[str, Any]:
    if arch not in ARCHS:
        from lorafleet.errors import ConfigError, FieldProblem

        raise ConfigError([FieldProblem("arch", arch, f"must be one of {list(ARCHS)}")])
    if arch in SOURCE_ARCHS and values["pretrain_steps"]:
        from lorafleet.errors import ConfigError, FieldProblem

        raise ConfigError(
            [
                FieldProblem(
                    "pretrain_steps", values["pretrain_steps"], f"must be 0 for the original-layout {arch}"
                )
            ]
        )
    hidden, heads = values["hidden_size"], values["num_heads"]
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_heads {heads}")
    if values["intermediate_size"] is None:
        # LLaMA's SwiGLU uses ~8/3 of the hidden size (rounded to 32); GPT-NeoX's GELU MLP 4x.
        mlp = 4 * hidden if arch == "gpt_neox" else 32 * math.ceil(hidden * 8 / 3 / 32)
        values["intermediate_size"] = mlp
    if values["num_kv_heads"] is None:
        values["num_kv_heads"] = heads
    corpus_sha256 = hashlib.sha256(corpus.encode("utf-8")).hexdigest()
    return {"format": _FORMAT_VERSION, "arch": arch, **values, "corpus_sha256": corpus_sha256}


def _is_complete(out: Path, settings: dict[str, Any]) -> bool:
    manifest = out / MANIFEST_NAME
    if not (out / COMPLETE_MARKER).is_file() or not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("settings") == settings
    except ValueError:
        return False


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    corpus: str | None = None,
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 3000,
    pretrain_steps: int = 0,
    seq_len: int = 128,
    batch_size: int = 8,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> Path:
    """Build (or find already built) a tiny base model directory.

    Args:
        out_dir: directory to hold the model, tokenizer and ``lorafleet_tiny.json``.
        arch: ``llama``, ``qwen2``, ``gpt_neox``, or an original layout: ``baichuan2``, ``baichuan``,
            ``chatglm3``, ``chatglm2`` (see ``lorafleet.tiny_source``).
        corpus: tokenizer and pre-training text; None uses ``lorafleet.datagen.corpus_text(seed)``.
        hidden_size: model width.
        num_layers: transformer blocks.
        num_heads: attention heads.
        num_kv_heads: key/value heads for llama, qwen2 and chatglm (grouped / multi-query attention);
            None = num_heads.
        intermediate_size: MLP width; None = 8/3 x hidden (llama, qwen2) or 4 x hidden (gpt_neox).
        vocab_size: tokenizer vocabulary bound (the model's vocabulary is the tokenizer's real size).
        pretrain_steps: causal-LM steps on the corpus; 0 leaves the random initialisation (the only
            choice for the original layouts).
        seq_len: tokens per pre-training window.
        batch_size: windows per pre-training step.
        learning_rate: peak AdamW learning rate.
        seed: seed of the initialisation and of the pre-training batches.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: unknown ``arch``.
        FileExistsError: ``out_dir`` holds something that is not a tiny build.
    """
    if corpus is None:
        from lorafleet.datagen import corpus_text

        corpus = corpus_text(seed=seed)
    settings = _settings(
        arch,
        corpus,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        pretrain_steps=pretrain_steps,
        seq_len=seq_len,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
    )
    out = Path(out_dir)
    if _is_complete(out, settings):
        return out
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise FileExistsError(f"{out} exists and is not a lorafleet tiny model; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _build_into(tmp, corpus, settings)
        _move_into_place(tmp, out, settings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build_into(tmp: Path, corpus: str, settings: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    if settings["arch"] in SOURCE_ARCHS:
        tmp.mkdir(parents=True)
        facts = write_source_checkpoint(tmp, settings["arch"], corpus, settings)
        _write_manifest(tmp, settings, facts, {}, corpus)
        return
    tokenizer = train_tokenizer(corpus, settings["vocab_size"])
    torch.manual_seed(settings["seed"])
    config = _model_config(settings["arch"], len(tokenizer), tokenizer, settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    stats = _pretrain(model, _token_stream(corpus, tokenizer), settings)
    model.eval()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    facts = {"vocab_size": len(tokenizer), "num_parameters": sum(p.numel() for p in model.parameters())}
    _write_manifest(tmp, settings, facts, stats, corpus)


def _write_manifest(
    tmp: Path, settings: dict[str, Any], facts: dict[str, Any], stats: dict[str, float], corpus: str
) -> None:
    manifest = {
        "settings": settings,
        "arch": settings["arch"],
        "hidden_size": settings["hidden_size"],
        "num_layers": settings["num_layers"],
        "num_heads": settings["num_heads"],
        **facts,
        "pretrain_steps": settings["pretrain_steps"],
        "seed": settings["seed"],
        **{k: round(v, 4) for k, v in stats.items()},
        "corpus_chars": len(corpus),
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    (tmp / COMPLETE_MARKER).write_text("ok\n", encoding="utf-8")


def _move_into_place(tmp: Path, out: Path, settings: dict[str, Any]) -> None:
    """Rename the finished build to ``out``, setting aside an older build there first."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        # Another process finished the same build first: theirs is as good as ours.
        if not _is_complete(out, settings):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The ``lorafleet_tiny.json`` of a built model directory."""
    data: dict[str, Any] = json.loads((Path(model_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    return data


def sample_text(model_dir: str | Path, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt`` by the model in ``model_dir`` (the new text only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def main(argv: list[str] | None = None) -> int:
    """Command line: build a tiny model and print where it is and how big it is."""
    parser = argparse.ArgumentParser(prog="lorafleet tiny", description="Build a tiny offline base model.")
    parser.add_argument("--arch", choices=ARCHS, default="llama")
    parser.add_argument("--out", default=None, help="output directory (default .cache/tiny/<arch>)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument(
        "--pretrain-steps", type=int, default=None, help="default 300; 0 for the original layouts"
    )
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--corpus-file", default=None, help="UTF-8 text to train on (default: datagen corpus)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--sample", default="", help="print a greedy continuation of this prompt")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f".cache/tiny/{args.arch}")
    corpus = Path(args.corpus_file).read_text(encoding="utf-8") if args.corpus_file else None
    began = time.perf_counter()
    path = build_tiny_model(
        out,
        args.arch,
        corpus,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        pretrain_steps=(0 if args.arch in SOURCE_ARCHS else 300)
        if args.pretrain_steps is None
        else args.pretrain_steps,
        seed=args.seed,
    )
    info = read_manifest(path)
    size_mb = sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e6
    layout = "original layout, random init" if args.arch in SOURCE_ARCHS else "native"
    loss = f"pretrain loss {info['initial_loss']} -> {info['final_loss']}" if "initial_loss" in info else ""
    print(
        f"{info['arch']} model ({layout}) at {path}: {info['num_parameters']:,} parameters, "
        f"{size_mb:.1f} MB, vocab {info['vocab_size']}, {loss} ({info['pretrain_steps']} steps), "
        f"ready in {time.perf_counter() - began:.1f} s"
    )
    if args.sample:
        print(f"sample: {args.sample}{sample_text(path, args.sample)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
