"""Tiny offline base models: tokenizer training, builds per architecture, idempotence, pre-training."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafleet.errors import ConfigError
from lorafleet.tiny import (
    COMPLETE_MARKER,
    DEFAULT_SPECIAL_TOKENS,
    MANIFEST_NAME,
    NATIVE_ARCHS,
    build_tiny_model,
    main,
    read_manifest,
    sample_text,
    train_tokenizer,
)

torch.set_num_threads(2)

SMALL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 600}


def make_corpus(seed: int = 0, paragraphs: int = 160) -> str:
    """A few KB of simple Chinese and English sentences."""
    rng = random.Random(seed)
    zh = (
        ["小明", "老师", "我们", "医生"],
        ["喜欢", "正在学习", "每天阅读"],
        ["机器学习", "中国历史", "天气预报"],
    )
    en = (
        ["The teacher", "My friend", "A doctor"],
        ["likes", "is studying", "reads about"],
        ["machine learning", "the history of China", "the weather"],
    )
    out = []
    for _ in range(paragraphs):
        n = rng.randint(2, 4)
        if rng.random() < 0.5:
            out.append(
                "".join(rng.choice(zh[0]) + rng.choice(zh[1]) + rng.choice(zh[2]) + "。" for _ in range(n))
            )
        else:
            out.append(
                " ".join(f"{rng.choice(en[0])} {rng.choice(en[1])} {rng.choice(en[2])}." for _ in range(n))
            )
    return "\n\n".join(out)


@pytest.fixture(scope="module")
def corpus() -> str:
    return make_corpus()


@pytest.fixture(scope="module")
def tokenizer(corpus: str):
    return train_tokenizer(corpus, vocab_size=600)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, corpus: str) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", corpus, **SMALL)


ROUND_TRIP = [
    "今天天气很好，我们去公园散步吧。",
    "Machine learning is a branch of AI.  Two spaces, a tab\tand a newline\n.",
    "混合 mixed 文本 text ， 标点！？ “引号” 123 4.5%",
    "生僻字：龘靐齉爩 emoji 🙂 and accents: café naïve",
    " leading and trailing spaces ",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trips_exactly(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(tokenizer) -> None:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in DEFAULT_SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids), dict(zip(DEFAULT_SPECIAL_TOKENS, ids))
    assert len({i[0] for i in ids}) == len(DEFAULT_SPECIAL_TOKENS)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    # Template prefixes glue markers together: each must still come out as its own id.
    glued = tokenizer("[gMASK]sop<|user|>\n你好<|assistant|>", add_special_tokens=False)["input_ids"]
    assert glued[:3] == [tokenizer.convert_tokens_to_ids(t) for t in ("[gMASK]", "sop", "<|user|>")]
    # ...while the letters "sop" inside a word stay ordinary text.
    sop = tokenizer.convert_tokens_to_ids("sop")
    assert sop not in tokenizer("Aesop wrote fables", add_special_tokens=False)["input_ids"]


def test_extra_special_tokens_are_added(corpus: str) -> None:
    tok = train_tokenizer(corpus, vocab_size=600, special_tokens=["<|observation|>"])
    assert len(tok("<|observation|>", add_special_tokens=False)["input_ids"]) == 1
    assert "<|observation|>" in tok.all_special_tokens


def test_tokenizer_saves_and_reloads(tokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = ROUND_TRIP[0] + ROUND_TRIP[1]
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert reloaded.pad_token == "<pad>" and reloaded.eos_token == "</s>"
    assert len(reloaded) == len(tokenizer)
    messages = [{"role": "user", "content": "你好"}]
    prompt = reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("arch", NATIVE_ARCHS)
def test_each_arch_builds_and_runs_forward(arch: str, tmp_path: Path, corpus: str) -> None:
    out = build_tiny_model(tmp_path / arch, arch, corpus, **SMALL)
    assert (out / COMPLETE_MARKER).is_file() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary build dir left behind"
    manifest = read_manifest(out)
    assert manifest["arch"] == arch and manifest["hidden_size"] == 64 and manifest["num_layers"] == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tok) == manifest["vocab_size"]
    assert model.config.max_position_embeddings == 1024 and not model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    ids = tok("小明喜欢 machine learning", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_same_seed_gives_same_weights(tmp_path: Path, corpus: str, llama_dir: Path) -> None:
    again = build_tiny_model(tmp_path / "again", "llama", corpus, **SMALL)
    assert (again / "model.safetensors").read_bytes() == (llama_dir / "model.safetensors").read_bytes()


def test_rebuild_with_same_settings_is_a_no_op(llama_dir: Path, corpus: str) -> None:
    weights = llama_dir / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    began = time.perf_counter()
    assert build_tiny_model(llama_dir, "llama", corpus, **SMALL) == llama_dir
    assert time.perf_counter() - began < 0.5
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before


def test_changed_settings_rebuild_in_place(tmp_path: Path, corpus: str) -> None:
    out = build_tiny_model(tmp_path / "m", "llama", corpus, **SMALL)
    first = (out / "model.safetensors").read_bytes()
    build_tiny_model(out, "llama", corpus, **{**SMALL, "seed": 1})
    assert read_manifest(out)["seed"] == 1
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_incomplete_build_is_redone(tmp_path: Path, corpus: str) -> None:
    out = build_tiny_model(tmp_path / "m", "llama", corpus, **SMALL)
    (out / COMPLETE_MARKER).unlink()
    build_tiny_model(out, "llama", corpus, **SMALL)
    assert (out / COMPLETE_MARKER).is_file()


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path, corpus: str) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_model(foreign, "llama", corpus, **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_unknown_arch_is_a_config_error(tmp_path: Path, corpus: str) -> None:
    with pytest.raises(ConfigError, match="arch"):
        build_tiny_model(tmp_path / "x", "mamba", corpus, **SMALL)


def test_pretraining_lowers_the_loss(tmp_path: Path, corpus: str) -> None:
    out = build_tiny_model(tmp_path / "pre", "llama", corpus, **SMALL, pretrain_steps=60, seq_len=64)
    info = read_manifest(out)
    assert info["pretrain_steps"] == 60
    assert info["final_loss"] < 0.6 * info["initial_loss"], info
    # The corpus is Chinese and English sentences: a trained model continues with corpus words.
    text = sample_text(out, "The teacher", max_new_tokens=12)
    assert any(word in text for word in ("likes", "studying", "reads", "machine", "weather", "history")), text


def test_main_builds_from_a_corpus_file(
    tmp_path: Path, corpus: str, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text(corpus, encoding="utf-8")
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--hidden-size", "64", "--layers", "2", "--pretrain-steps", "0"]
    assert main([*argv, "--arch", "gpt_neox", "--corpus-file", str(corpus_file)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "parameters" in printed
    assert json.loads((out / MANIFEST_NAME).read_text())["arch"] == "gpt_neox"


def test_default_corpus_comes_from_datagen(tmp_path: Path) -> None:
    datagen = pytest.importorskip("lorafleet.datagen")
    out = build_tiny_model(tmp_path / "d", "llama", None, **SMALL)
    text = datagen.corpus_text(seed=0)
    assert read_manifest(out)["corpus_chars"] == len(text)
