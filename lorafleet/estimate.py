"""Memory estimate for a run config without loading any weights.

The model is built on the meta device from its config alone, so parameters are counted exactly
(for any architecture transformers knows) and the trainable count follows the method: LoRA's
``rank * (in + out)`` per adapted linear layer, the chosen blocks for ``freeze``, the prefixes for
P-tuning. The trainer service uses this to refuse a job that cannot fit before launching it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lorafleet.config import RunConfig
from lorafleet.errors import ModelLoadError
from lorafleet.families import detect_family, get_family
from lorafleet.memory import MemoryEstimate, estimate_training_memory
from lorafleet.method_specs import (
    TRAINS_ALL,
    TRAINS_BLOCKS,
    TRAINS_LORA,
    TRAINS_PROMPT,
    method_spec,
    quantization_for,
)


def meta_model(config: RunConfig) -> tuple[torch.nn.Module, Any]:
    """The model of ``config.model`` with every tensor on the meta device (no memory, no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lorafleet.models import load_model_config

    m = config.model
    try:
        hf_config = load_model_config(m)  # Baichuan / ChatGLM: the native config, nothing converted
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=m.trust_remote_code)
    except Exception as e:  # transformers raises OSError / ValueError / KeyError for bad configs
        raise ModelLoadError(f"model.name_or_path={m.name_or_path!r}: cannot read its config: {e}") from e
    return model, hf_config


def trainable_parameter_count(model: torch.nn.Module, config: RunConfig) -> int:
    """Parameters the method trains, counted on a (meta) model before any wrapping."""
    return _COUNTERS[method_spec(config.method).trains](model, config)


def _count_all(model: torch.nn.Module, config: RunConfig) -> int:
    return sum(p.numel() for p in model.parameters())


def _count_blocks(model: torch.nn.Module, config: RunConfig) -> int:
    from lorafleet.models import find_layer_prefixes

    fz = config.freeze
    patterns = list(fz.trainable_modules) or find_layer_prefixes(model)[-fz.trainable_layers :]
    return sum(p.numel() for n, p in model.named_parameters() if any(pat in n for pat in patterns))


def _count_prompt(model: torch.nn.Module, config: RunConfig) -> int:
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    pt = config.ptuning
    if pt.mode == "prefix":
        base = pt.num_virtual_tokens * layers * 2 * hidden
        if pt.prefix_projection:
            base = (
                pt.num_virtual_tokens * hidden
                + hidden * pt.encoder_hidden_size * 2
                + pt.encoder_hidden_size * layers * 2 * hidden
            )
        return base
    return pt.num_virtual_tokens * hidden + 2 * hidden * pt.encoder_hidden_size


def _count_lora(model: torch.nn.Module, config: RunConfig) -> int:
    from lorafleet.models import resolve_lora_targets

    family = (
        detect_family(model.config, config.model.name_or_path)
        if config.model.family == "auto"
        else get_family(config.model.family)
    )
    targets = set(resolve_lora_targets(model, family, config.lora.target_modules))
    count = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and hasattr(module, "in_features") and hasattr(module, "out_features"):
            count += config.lora.rank * (int(module.in_features) + int(module.out_features))
    return count


_COUNTERS: dict[str, Callable[[torch.nn.Module, RunConfig], int]] = {
    TRAINS_ALL: _count_all,
    TRAINS_BLOCKS: _count_blocks,
    TRAINS_PROMPT: _count_prompt,
    TRAINS_LORA: _count_lora,
}
"""How many parameters each ``MethodSpec.trains`` makes trainable."""


def model_dims(hf_config: Any) -> dict[str, int | None]:
    """Sizes from a model config under every spelling in use (ChatGLM ``num_layers``, GPT-2 ``n_embd``...)."""

    def pick(*names: str) -> int | None:
        for name in names:
            value = getattr(hf_config, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    return {
        "num_layers": pick("num_hidden_layers", "num_layers", "n_layer"),
        "hidden_size": pick("hidden_size", "d_model", "n_embd"),
        "vocab_size": pick("vocab_size", "padded_vocab_size"),
        "intermediate_size": pick("intermediate_size", "ffn_hidden_size", "n_inner"),
        "num_heads": pick("num_attention_heads", "n_head", "num_heads"),
    }


def estimate_run(
    config: RunConfig, hf_config: Any, total_params: int, trainable_params: int, seq_len: int, world_size: int
) -> MemoryEstimate:
    """Estimate memory for ``config`` given the parameter counts (counted, or measured on a loaded model)."""
    d, t = config.distributed, config.train
    dims = model_dims(hf_config)
    return estimate_training_memory(
        total_params=total_params,
        trainable_params=trainable_params,
        num_layers=dims["num_layers"] or 1,
        hidden_size=dims["hidden_size"] or 1,
        vocab_size=dims["vocab_size"] or 1,
        method=config.method,
        dtype=config.model.dtype,
        quantization=quantization_for(config),
        batch_size=t.per_device_batch_size,
        seq_len=seq_len,
        gradient_checkpointing=t.gradient_checkpointing,
        zero_stage=max(d.deepspeed_stage, 0),
        world_size=world_size,
        offload_optimizer=d.offload_optimizer,
        offload_param=d.offload_param,
        intermediate_size=dims["intermediate_size"],
        num_heads=dims["num_heads"],
        device="cuda" if torch.cuda.is_available() else "cpu",
    )


def estimate_for_config(
    config: RunConfig, seq_len: int | None = None, world_size: int | None = None
) -> MemoryEstimate:
    """Estimate per-device and host memory of the run ``config`` describes, without loading weights."""
    model, hf = meta_model(config)
    d = config.distributed
    return estimate_run(
        config,
        hf,
        total_params=sum(p.numel() for p in model.parameters()),
        trainable_params=trainable_parameter_count(model, config),
        seq_len=seq_len or config.data.max_source_length + config.data.max_target_length,
        world_size=world_size or d.nproc_per_node * d.nnodes,
    )
