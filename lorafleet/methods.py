"""Applying a training method to a model: wrap or freeze it, and save the artifact it publishes.

What each method trains and publishes is its row in ``lorafleet.method_specs``; this module turns a
spec's ``trains`` into PEFT wrapping or ``requires_grad`` flags, and its ``artifact_kind`` into files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafleet.config import RunConfig
from lorafleet.errors import ConfigError, FieldProblem
from lorafleet.families import Family
from lorafleet.fastpath import use_fast_lora_dropout
from lorafleet.method_specs import (
    ARTIFACT_FULL_MODEL,
    TRAINS_ALL,
    TRAINS_BLOCKS,
    TRAINS_LORA,
    TRAINS_PROMPT,
    method_spec,
    quantization_for,
)
from lorafleet.models import find_layer_prefixes, resolve_lora_targets

_Prepared = tuple[Any, dict[str, Any]]
"""A preparation's result: the model to train and the method facts for the manifest."""


@dataclass
class PreparedModel:
    model: Any
    """The model to train (a PeftModel for PEFT methods)."""
    kind: str
    """Artifact kind for the manifest: the method's ``MethodSpec.artifact_kind``."""
    details: dict[str, Any] = field(default_factory=dict)
    """Method facts for the manifest and run record (target modules, trained layers...)."""


def prepare_model(model: torch.nn.Module, config: RunConfig, family: Family) -> PreparedModel:
    """Wrap or freeze ``model`` for ``config.method``; trainable parameters end up in fp32.

    Raises:
        ConfigError: options that do not fit this model (no matching module, no such layer).
    """
    spec = method_spec(config.method)
    trained_model, details = _PREPARE[spec.trains](model, config, family)
    prepared = PreparedModel(trained_model, spec.artifact_kind, details)
    if config.train.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        prepared.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Trainable weights in fp32 (LLaMA-Factory's upcast): bf16 Adam updates of small LoRA weights
    # round to zero; frozen weights keep their storage dtype.
    for p in prepared.model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return prepared


def _prepare_all(model: torch.nn.Module, config: RunConfig, family: Family) -> _Prepared:
    for p in model.parameters():
        p.requires_grad_(True)
    return model, {}


def _prepare_lora(model: torch.nn.Module, config: RunConfig, family: Family) -> _Prepared:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    lo = config.lora
    targets = resolve_lora_targets(model, family, lo.target_modules)
    if quantization_for(config) != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_config = PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=lo.rank,
        lora_alpha=lo.alpha,  # type: ignore[arg-type]  # PEFT takes any number: scale = alpha / r
        lora_dropout=lo.dropout,
        target_modules=targets,
        modules_to_save=lo.modules_to_save or None,
        use_dora=lo.use_dora,
        use_rslora=lo.use_rslora,
    )
    peft_model = get_peft_model(model, peft_config)
    use_fast_lora_dropout(peft_model)
    return peft_model, {"target_modules": sorted(targets)}


def _prepare_ptuning(model: torch.nn.Module, config: RunConfig, family: Family) -> _Prepared:
    from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model

    pt = config.ptuning
    peft_config: Any
    if pt.mode == "prefix":
        peft_config = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=pt.num_virtual_tokens,
            prefix_projection=pt.prefix_projection,
            encoder_hidden_size=pt.encoder_hidden_size,
        )
    else:
        peft_config = PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=pt.num_virtual_tokens,
            encoder_hidden_size=pt.encoder_hidden_size,
        )
    return get_peft_model(model, peft_config), {"mode": pt.mode}


def _prepare_freeze(model: Any, config: RunConfig, family: Family) -> _Prepared:
    fz = config.freeze
    names = [n for n, _ in model.named_parameters()]
    if fz.trainable_modules:
        patterns = list(fz.trainable_modules)
        unmatched = [pat for pat in patterns if not any(pat in n for n in names)]
        if unmatched:
            raise ConfigError(
                [
                    FieldProblem(
                        "freeze.trainable_modules", unmatched, f"match no parameter; e.g. {names[:3]} ..."
                    )
                ]
            )
    else:
        prefixes = find_layer_prefixes(model)
        if fz.trainable_layers > len(prefixes):
            raise ConfigError(
                [
                    FieldProblem(
                        "freeze.trainable_layers",
                        fz.trainable_layers,
                        f"the model has only {len(prefixes)} layers",
                    )
                ]
            )
        patterns = prefixes[-fz.trainable_layers :]
    trained = 0
    for name, p in model.named_parameters():
        on = any(pat in name for pat in patterns)
        p.requires_grad_(on)
        trained += int(on)
    if fz.train_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(True)
    return model, {"trainable_patterns": patterns, "trainable_tensors": trained}


_PREPARE: dict[str, Callable[[Any, RunConfig, Family], _Prepared]] = {
    TRAINS_LORA: _prepare_lora,
    TRAINS_PROMPT: _prepare_ptuning,
    TRAINS_BLOCKS: _prepare_freeze,
    TRAINS_ALL: _prepare_all,
}
"""How each ``MethodSpec.trains`` makes a model trainable."""


def save_artifact(
    model: Any,
    tokenizer: Any,
    out_dir: Path,
    kind: str,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the artifact a method publishes into ``out_dir``.

    PEFT kinds write ``adapter_config.json`` + ``adapter_model.safetensors``; ``full_model`` writes a
    complete transformers model directory with its tokenizer. Safetensors only, never pickle.

    Args:
        state_dict: weights gathered from ZeRO-3 shards, when the live parameters are partitioned.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind != ARTIFACT_FULL_MODEL:
        # Given a gathered full state dict, PEFT keeps only this adapter's keys itself.
        model.save_pretrained(
            str(out_dir), state_dict=state_dict, safe_serialization=True, save_embedding_layers=False
        )
    else:
        model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
