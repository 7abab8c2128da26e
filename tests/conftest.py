"""Shared fixtures: a tiny byte-level BPE tokenizer trained on the bundled corpus, bundled data, the
tiny llama, and the engine / LoRA-batch tests' real PEFT adapters, prompts and PEFT references."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lorafleet.datagen import corpus_text, generate_datasets
from lorafleet.templates import TEMPLATE_SPECIAL_TOKENS
from services.inference.engine import Engine
from tests.inference_utils import ADAPTERS, TEXTS, References, load_base, save_lora_adapter

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab about 2000) on the bundled zh+en corpus, with every template marker."""
    specials = ["<pad>", "<unk>", "<s>", "</s>", *TEMPLATE_SPECIAL_TOKENS]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus_text().splitlines(), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


@pytest.fixture
def tmp_data(tmp_path: Path) -> dict[str, Path]:
    """The bundled datasets written into a fresh temporary directory."""
    return generate_datasets(str(tmp_path / "data"))


@pytest.fixture(scope="session")
def bundled_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundled datasets, written once per session."""
    return generate_datasets(str(tmp_path_factory.mktemp("bundled") / "data"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small llama (hidden 64, 2 layers), briefly pre-trained on the bundled corpus; built once.

    Pre-training matters: from random init the frozen head (std 0.02) and RMSNorm cap every logit
    shift near 1.3 nats, so no adapter could learn anything."""
    from lorafleet.tiny import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "llama",
        arch="llama",
        hidden_size=64,
        num_layers=2,
        vocab_size=1200,
        pretrain_steps=60,
    )


# ---------------------------------------------------------------------------------------------
# Engine and LoRA-batch tests: adapters, prompts and reference generations, made once per module


@pytest.fixture
def make_engine(tiny_llama: Path) -> Iterator[Callable[..., Engine]]:
    """Engines over fresh base copies (the engine hooks its model in place); closed at teardown."""
    engines: list[Engine] = []

    def make(quantization: str = "none", **kwargs: Any) -> Engine:
        engine = Engine(load_base(tiny_llama, quantization=quantization), **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: save_lora_adapter(tiny_llama, root / name, rank=rank, targets=targets, seed=seed)
        for name, (rank, targets, seed) in ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def prompts(tiny_llama: Path) -> list[list[int]]:
    tokenizer: Any = AutoTokenizer.from_pretrained(str(tiny_llama))
    out = [list(tokenizer.encode(t, add_special_tokens=True)) for t in TEXTS]
    assert len({len(p) for p in out}) >= 4, "prompts must have different lengths"
    return out


@pytest.fixture(scope="module")
def eos_id(tiny_llama: Path) -> int:
    base = load_base(tiny_llama)
    eos = base.generation_config.eos_token_id
    assert isinstance(eos, int)
    return eos


@pytest.fixture(scope="module")
def refs(tiny_llama: Path, adapter_dirs: dict[str, Path], eos_id: int) -> References:
    return References(tiny_llama, adapter_dirs, "none", eos_id)


@pytest.fixture(scope="module")
def nf4_refs(tiny_llama: Path, adapter_dirs: dict[str, Path], eos_id: int) -> References:
    pytest.importorskip("bitsandbytes")
    return References(tiny_llama, adapter_dirs, "nf4", eos_id)
