"""Helpers shared by the inference tests (engine, gRPC server): tiny bases, real PEFT adapters, and
reference generations from a plain ``PeftModel``.

Everything is local and small: bases come from ``lorafleet.tiny`` (the ``tiny_llama`` fixture), and
adapters are real PEFT LoRA directories (``adapter_config.json`` + ``adapter_model.safetensors``)
with random non-zero ``B`` (``init_lora_weights=False``), so every adapter really changes outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lorafleet.config import ModelConfig
from lorafleet.models import load_model


def load_base(model_dir: str | Path, quantization: str = "none", dtype: str = "fp32") -> Any:
    """Load a base causal LM on the CPU in eval mode, the way the services do.

    ``quantization="nf4"`` goes through ``lorafleet.models.load_model``, which disables the
    bitsandbytes CPU repack (shared/STACK.md); ``dtype`` is the compute dtype of the non-quantized
    parts (fp32 keeps comparisons exact).
    """
    cfg = ModelConfig(name_or_path=str(model_dir), dtype=dtype, quantization=quantization)
    return load_model(cfg, for_training=False, device_map="cpu").eval()


def save_lora_adapter(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 8,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
    alpha: int | None = None,
    use_rslora: bool = False,
) -> Path:
    """Write a PEFT LoRA adapter for the base at ``model_dir`` with random non-zero A and B.

    Args:
        model_dir: the base model directory (a fresh fp32 copy is loaded, so callers' models stay
            unwrapped).
        out_dir: where ``save_pretrained`` writes (safetensors).
        rank: LoRA rank.
        targets: PEFT ``target_modules``.
        seed: seeds the random A and B.
        alpha: ``lora_alpha``; None = ``2 * rank``.
        use_rslora: scale by ``alpha / sqrt(rank)``.

    Returns:
        ``out_dir`` as a Path.
    """
    from peft import LoraConfig, get_peft_model

    base = load_base(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        target_modules=list(targets),
        init_lora_weights=False,  # random B: the adapter changes outputs from the first step
        use_rslora=use_rslora,
        lora_dropout=0.0,
    )
    get_peft_model(base, config).save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def peft_model(base: Any, adapter_dirs: dict[str, str | Path]) -> Any:
    """Wrap ``base`` (modified in place) in a ``PeftModel`` holding the named adapters, in eval mode.

    The first adapter is active; switch with ``set_adapter`` or mix with ``adapter_names=``.
    """
    from peft import PeftModel

    items = list(adapter_dirs.items())
    name, path = items[0]
    model = PeftModel.from_pretrained(base, str(path), adapter_name=name)
    for name, path in items[1:]:
        model.load_adapter(str(path), adapter_name=name)
    return model.eval()


@torch.inference_mode()
def greedy_tokens(
    model: Any, prompt_ids: Sequence[int], max_new_tokens: int, eos_id: int | None = None
) -> list[int]:
    """Greedy continuation of one unpadded prompt with HF ``generate``, cut after ``eos_id``.

    The reference an engine's tokens must equal: one request alone, no padding, no batch.
    """
    ids = torch.tensor([list(prompt_ids)])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=eos_id if eos_id is not None else 0,
    )
    tokens = out[0, ids.shape[1] :].tolist()
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id) + 1]
    return tokens


# The adapters, prompts and references of the engine and LoRA-batch tests (fixtures in conftest.py).

MAX_NEW = 12

# name -> (rank, target modules, seed): different ranks and different layers, so padded ranks and
# rows whose adapter does not touch a layer are both exercised.
ADAPTERS: dict[str, tuple[int, tuple[str, ...], int]] = {
    "a": (4, ("q_proj", "v_proj"), 1),
    "b": (8, ("q_proj", "k_proj", "v_proj", "o_proj"), 2),
    "c": (12, ("down_proj", "up_proj"), 3),
    "d": (8, ("q_proj", "v_proj", "gate_proj", "down_proj"), 4),
}
TEXTS = [
    "Hello",
    "The patient reports a headache and",
    "患者主诉头痛三天，伴有恶心",
    "Question: what is the diagnosis? Answer:",
    "A much longer prompt, so that left padding in the prefill batch is substantial: the quick brown fox",
    "发热",
]


class References:
    """Greedy tokens of a plain PeftModel per (adapter, prompt), computed lazily and cached."""

    def __init__(self, base_dir: Path, adapter_dirs: dict[str, Path], quantization: str, eos_id: int) -> None:
        self.base_dir, self.adapter_dirs, self.quantization, self.eos_id = (
            base_dir,
            adapter_dirs,
            quantization,
            eos_id,
        )
        self._models: dict[str | None, Any] = {}
        self._cache: dict[tuple[str | None, tuple[int, ...], int], list[int]] = {}

    def model(self, adapter: str | None) -> Any:
        if adapter not in self._models:
            base = load_base(self.base_dir, quantization=self.quantization)
            self._models[adapter] = (
                base if adapter is None else peft_model(base, {adapter: self.adapter_dirs[adapter]})
            )
        return self._models[adapter]

    def tokens(self, adapter: str | None, prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
        key = (adapter, tuple(prompt), max_new)
        if key not in self._cache:
            self._cache[key] = greedy_tokens(self.model(adapter), prompt, max_new, self.eos_id)
        return self._cache[key]
