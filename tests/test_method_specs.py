"""The method table: every method is accepted by config validation, has a memory model, is offered by
the dashboard form, and the table's facts match what the config refuses and what preparing a model
actually makes trainable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorafleet import adapters
from lorafleet.config import QUANTIZATIONS, RunConfig, config_from_dict
from lorafleet.errors import ConfigError
from lorafleet.estimate import estimate_for_config, trainable_parameter_count
from lorafleet.families import get_family
from lorafleet.memory import estimate_training_memory, rule_of_thumb_bytes
from lorafleet.method_specs import (
    METHOD_SPECS,
    METHODS,
    OPTION_SECTIONS,
    ZERO_STAGES,
    method_spec,
    methods_with_options,
    quantization_for,
)
from lorafleet.methods import prepare_model
from services.dashboard import forms

REPO = Path(__file__).resolve().parents[1]


def _tree(method: str, **sections: dict[str, Any]) -> dict[str, Any]:
    return {"data": {"train_file": "x.jsonl"}, "method": method, **sections}


def _problems(tree: dict[str, Any]) -> set[tuple[str, str]]:
    try:
        config_from_dict(tree)
    except ConfigError as e:
        return {(p.field, p.message) for p in e.problems}
    return set()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_accepted_by_config_validation(method: str) -> None:
    config = config_from_dict(_tree(method))
    assert config.method == method
    assert method_spec(method).name == method


def test_unknown_method_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        method_spec("dpo")
    assert info.value.problems[0].field == "method"
    assert "lora" in str(info.value)


# What each method lets model.quantization be: pinned here, independently of the table.
ACCEPTED_QUANTIZATIONS = {
    "lora": {"none", "nf4", "int8"},
    "qlora": {"none", "nf4"},
    "lora8bit": {"none", "int8"},
    "freeze": {"none"},
    "full": {"none"},
    "ptuning": {"none"},
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_quantization_refusals_follow_the_table(method: str, quantization: str) -> None:
    problems = _problems(_tree(method, model={"quantization": quantization}))
    refused = any(field == "model.quantization" for field, _ in problems)
    assert refused == (quantization not in ACCEPTED_QUANTIZATIONS[method]), problems
    assert not any(field != "model.quantization" for field, _ in problems), problems


def test_every_method_has_a_pinned_quantization_rule() -> None:
    assert set(ACCEPTED_QUANTIZATIONS) == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stage", ZERO_STAGES)
def test_deepspeed_stages_follow_the_table(method: str, stage: int) -> None:
    # fp32 + ZeRO-3 on a quantized base is refused on model.dtype; bf16 keeps this about the stage.
    problems = _problems(_tree(method, model={"dtype": "bf16"}, distributed={"deepspeed_stage": stage}))
    refused = method == "ptuning" and stage == 3
    assert bool(problems) == refused, problems
    if refused:
        assert problems == {
            ("distributed.deepspeed_stage", "ptuning does not support ZeRO-3 (PEFT prompt learning)")
        }


@pytest.mark.parametrize("method", METHODS)
def test_zero3_in_fp32_is_refused_only_for_methods_that_quantize_the_base(method: str) -> None:
    problems = _problems(_tree(method, distributed={"deepspeed_stage": 3}))
    refused = ("model.dtype", "ZeRO-3 with a quantized base needs bf16 or fp16 storage") in problems
    assert refused == (method in ("qlora", "lora8bit"))


def test_only_the_method_options_section_is_checked() -> None:
    bad = {"lora": {"rank": 0}, "freeze": {"trainable_layers": 0}, "ptuning": {"num_virtual_tokens": 0}}
    for method in METHODS:
        fields = {field for field, _ in _problems(_tree(method, **bad))}
        section = method_spec(method).options_section
        assert fields == ({f"{section}.{next(iter(bad[section]))}"} if section else set()), method


def test_quantization_for_applies_the_method_base() -> None:
    assert quantization_for(RunConfig(method="qlora")) == "nf4"
    assert quantization_for(RunConfig(method="lora8bit")) == "int8"
    lora = RunConfig(method="lora")
    lora.model.quantization = "int8"
    assert quantization_for(lora) == "int8"
    assert quantization_for(RunConfig(method="full")) == "none"


def test_artifact_kinds_are_manifest_kinds() -> None:
    assert {s.artifact_kind for s in METHOD_SPECS.values()} == set(adapters.KINDS)
    assert set(OPTION_SECTIONS) == {s.options_section for s in METHOD_SPECS.values()} - {None}
    assert methods_with_options("lora") == ("lora", "qlora", "lora8bit")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_a_memory_model(method: str) -> None:
    spec = method_spec(method)
    common: dict[str, Any] = {
        "total_params": 10**9,
        "trainable_params": 10**9 if spec.trains == "all" else 10**7,
        "num_layers": 16,
        "hidden_size": 2048,
        "vocab_size": 32000,
        "dtype": "bf16",
        "batch_size": 1,
        "seq_len": 512,
        "gradient_checkpointing": False,
        "zero_stage": 0,
        "world_size": 1,
        "offload_optimizer": False,
        "offload_param": False,
    }
    est = estimate_training_memory(method=method, quantization=spec.quantization("none"), **common)
    # 16-bit base weights that are trained keep an fp32 master copy; new adapter weights are fp32 already.
    assert (est.master_weights_bytes > 0) == spec.trains_base_weights
    assert est.assumptions["rule_of_thumb_bytes"] == rule_of_thumb_bytes(10**9, method, "none", "bf16")
    per_param = rule_of_thumb_bytes(10**9, method, "none", "bf16") / 10**9
    assert per_param == {"full": 8.0, "qlora": 0.5, "lora8bit": 1.0}.get(method, 2.0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,  # the prefix count assumes full-width k/v (no GQA)
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


COUNTED = [
    ("lora", {}),
    ("lora", {"lora": {"target_modules": ["q_proj", "v_proj"], "rank": 4}}),
    ("freeze", {"freeze": {"trainable_layers": 2}}),
    ("freeze", {"freeze": {"trainable_modules": ["layers.0.mlp"]}}),
    ("full", {}),
    ("ptuning", {"ptuning": {"mode": "prefix", "num_virtual_tokens": 8}}),
]


@pytest.mark.parametrize("method,sections", COUNTED, ids=[f"{m}-{i}" for i, (m, _) in enumerate(COUNTED)])
def test_counted_trainable_parameters_match_the_prepared_model(
    llama_dir: Path, method: str, sections: dict[str, Any]
) -> None:
    config = config_from_dict(_tree(method, model={"name_or_path": str(llama_dir)}, **sections))
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    counted = trainable_parameter_count(model, config)
    prepared = prepare_model(model, config, get_family("llama"))
    assert prepared.kind == method_spec(method).artifact_kind
    trainable = sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)
    assert counted == trainable > 0
    estimate = estimate_for_config(config)
    assert estimate.assumptions["trainable_params"] == counted
    assert estimate.assumptions["method"] == method


@pytest.mark.parametrize("method", ["qlora", "lora8bit"])
def test_quantized_lora_methods_count_like_lora(llama_dir: Path, method: str) -> None:
    tree = _tree(method, model={"name_or_path": str(llama_dir), "dtype": "bf16"})
    quantized = estimate_for_config(config_from_dict(tree))
    lora = estimate_for_config(config_from_dict({**tree, "method": "lora"}))
    assert quantized.assumptions["trainable_params"] == lora.assumptions["trainable_params"]
    assert quantized.assumptions["quantization"] == method_spec(method).base_quantization
    assert quantized.frozen_weights_bytes < lora.frozen_weights_bytes


def test_dashboard_form_offers_exactly_the_table() -> None:
    assert forms.FIELDS["method"].options == METHODS
    assert forms.FIELDS["method"].default in METHODS
    sections = {s.options_section for s in METHOD_SPECS.values()} - {None}
    for path, f in forms.FIELDS.items():
        section = path.split(".", 1)[0]
        if section in sections:
            assert f.methods == methods_with_options(section), path
        else:
            assert f.methods == (), path


@pytest.mark.parametrize("method", METHODS)
def test_dashboard_form_sends_only_the_method_options(method: str) -> None:
    values = {path: f.default for path, f in forms.FIELDS.items()}
    values.update({"method": method, "freeze.trainable_layers": 1, "ptuning.num_virtual_tokens": 4})
    spec = forms.build_spec(values)
    sent = {s for s in ("lora", "freeze", "ptuning") if spec.HasField(s)}
    section = method_spec(method).options_section
    assert sent == ({section} if section else set())


def test_config_imports_without_torch() -> None:
    code = "import sys, lorafleet.config, lorafleet.method_specs; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
