"""Run configs: YAML + overrides, and a table of bad configs each with the error text users see."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorafleet.config import RunConfig, apply_overrides, config_from_dict, load_config
from lorafleet.deepspeed_config import build_deepspeed_config
from lorafleet.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"data": {"train_file": "x.jsonl"}}


def _cfg(**sections):
    tree = {"data": {"train_file": "x.jsonl"}}
    for key, value in sections.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return tree


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train_file: a.jsonl}\nmethod: lora\nlora: {rank: 4}\n")
    c = load_config(
        path,
        [
            "lora.rank=32",
            "train.learning_rate=1e-4",
            "lora.target_modules=[q_proj,v_proj]",
            "output.adapter_name=my-adapter",
            "train.max_steps=7",
        ],
    )
    assert c.lora.rank == 32
    assert c.train.learning_rate == pytest.approx(1e-4)
    assert c.lora.target_modules == ["q_proj", "v_proj"]
    assert c.output.adapter_name == "my-adapter"
    assert c.train.max_steps == 7


def test_apply_overrides_sets_yaml_values_and_lists_every_bad_item():
    tree = {"lora": {"rank": 4}}
    assert apply_overrides(tree, ["lora.rank=16", "train.seed=7", "model.name_or_path="]) is tree
    assert tree == {"lora": {"rank": 16}, "train": {"seed": 7}, "model": {"name_or_path": ""}}
    with pytest.raises(ConfigError) as err:
        apply_overrides(tree, ["no-equals", "lora.alpha=8", "also bad"])
    # A malformed key is named by its repr, so spaces and look-alike characters show.
    assert [p.field for p in err.value.problems] == ["'no-equals'", "'also bad'"]
    assert tree["lora"] == {"rank": 16, "alpha": 8}


def test_every_example_config_loads():
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(examples) >= 8
    for path in examples:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# Run:"), f"{path.name} must open with the command that runs it"
        load_config(path)


BAD_CONFIGS = [
    (_cfg(method="dpo"), "method='dpo': must be one of"),
    (_cfg(lora={"rank": 0}), "lora.rank=0: must be in [1, 1024]"),
    (_cfg(lora={"rank": "eight"}), "lora.rank='eight': must be an integer"),
    (_cfg(lora={"dropout": 1.5}), "lora.dropout=1.5: must be in [0, 1)"),
    (_cfg(lora={"target_modules": "some"}), "lora.target_modules='some': must be 'auto', 'all-linear'"),
    (_cfg(lora={"target_modules": []}), "lora.target_modules=[]: must list at least one module"),
    (_cfg(train={"learning_rate": 0}), "train.learning_rate=0.0: must be in (0, 1)"),
    (_cfg(train={"learning_rate": "fast"}), "train.learning_rate='fast': must be a number"),
    (_cfg(train={"per_device_batch_size": 0}), "train.per_device_batch_size=0: must be in [1, 4096]"),
    (_cfg(train={"lr_scheduler": "exp"}), "train.lr_scheduler='exp': must be one of"),
    (_cfg(train={"epochs": 0, "max_steps": 0}), "train.epochs=0.0: must be > 0 when max_steps is 0"),
    (_cfg(train={"resume": "/no/such/ckpt"}), "train.resume='/no/such/ckpt': must be 'auto', 'never'"),
    (_cfg(model={"dtype": "fp8"}), "model.dtype='fp8': must be one of"),
    (_cfg(model={"quantization": "nf4"}, method="full"), "model.quantization='nf4': method full trains"),
    (_cfg(method="qlora", model={"quantization": "int8"}), "model.quantization='int8': method qlora loads"),
    (_cfg(distributed={"deepspeed_stage": 4}), "distributed.deepspeed_stage=4: must be -1"),
    (
        _cfg(distributed={"offload_param": True, "deepspeed_stage": 2}),
        "distributed.offload_param=True: needs ZeRO stage 3",
    ),
    (_cfg(distributed={"offload_optimizer": True}), "distributed.offload_optimizer=True: needs ZeRO stage"),
    (_cfg(distributed={"node_rank": 2, "nnodes": 2}), "distributed.node_rank=2: must be in [0, nnodes)"),
    (_cfg(method="ptuning", distributed={"deepspeed_stage": 3}), "ptuning does not support ZeRO-3"),
    (_cfg(output={"adapter_name": "../escape"}), "output.adapter_name='../escape': must be 1-64 characters"),
    (_cfg(output={"adapter_name": "a/b"}), "output.adapter_name='a/b'"),
    (_cfg(output={"version": "latest"}), "output.version='latest': must be 'auto' or a positive integer"),
    (_cfg(data={"train_file": ""}), "data.train_file='': must name a JSON or JSONL file"),
    (_cfg(data={"format": "csv"}), "data.format='csv': must be one of"),
    (_cfg(data={"max_source_length": -1}), "data.max_source_length=-1: must be > 0"),
    (_cfg(lora={"rnak": 8}), "lora.rnak=8: unknown field"),
    (_cfg(colour="blue"), "colour='blue': unknown field"),
    (_cfg(freeze={"trainable_layers": 0}, method="freeze"), "freeze.trainable_layers=0: must be >= 1"),
]


@pytest.mark.parametrize("tree,expected", BAD_CONFIGS, ids=[e for _, e in BAD_CONFIGS])
def test_bad_config_names_field_and_value(tree, expected):
    with pytest.raises(ConfigError) as info:
        config_from_dict(tree)
    assert expected in str(info.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        config_from_dict(_cfg(lora={"rank": -1, "dropout": 2.0}, train={"learning_rate": 5.0}))
    fields = {p.field for p in info.value.problems}
    assert {"lora.rank", "lora.dropout", "train.learning_rate"} <= fields


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("config='/nope.yaml': file not found")):
        load_config("/nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=re.escape("must look like section.key=value")):
        load_config(None, ["data.train_file"])


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_auto_values_are_filled(stage):
    c = config_from_dict(
        _cfg(
            distributed={"deepspeed_stage": stage, "nproc_per_node": 2},
            train={"per_device_batch_size": 4, "gradient_accumulation_steps": 3, "max_grad_norm": 0.5},
        )
    )
    ds = build_deepspeed_config(c, world_size=2, hidden_size=64)
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == stage
    assert "auto" not in repr(ds)


def test_deepspeed_offload_and_user_file(tmp_path):
    c = config_from_dict(
        _cfg(distributed={"deepspeed_stage": 3, "offload_optimizer": True, "offload_param": True})
    )
    ds = build_deepspeed_config(c, world_size=1, hidden_size=64)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    user = tmp_path / "ds.json"
    user.write_text('{"train_micro_batch_size_per_gpu": "auto", "mystery": "auto"}')
    c = config_from_dict(_cfg(distributed={"deepspeed_stage": 2, "deepspeed_config": str(user)}))
    with pytest.raises(ConfigError, match="'auto' has no derivation for: mystery"):
        build_deepspeed_config(c, world_size=1, hidden_size=64)


def test_defaults_are_valid():
    assert isinstance(config_from_dict(dict(GOOD)), RunConfig)
