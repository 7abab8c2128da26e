"""What the trainer would publish but the inference service cannot serve is refused before training
(issue 17 section 2), driven by ``servable`` in ``lorafleet.method_specs``; and that table tells the
truth: every artifact it marks not servable is refused by the inference service's loader today, and
every one it marks servable is loaded (so whoever lands serving for a kind must flip its flag)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from lorafleet import method_specs
from lorafleet.config import RunConfig
from lorafleet.errors import ConfigError, LorafleetError
from lorafleet.method_specs import LORA_OPTION_SERVABLE, METHOD_SPECS, serving_problems
from services.trainer.launchers.base import Capacity
from services.trainer.store import JobRequest
from services.trainer.validation import validate_submission
from tests.inference_utils import load_base

SERVER = {"output.run_dir": "/srv/runs/j1/run", "output.adapters_root": "/srv/adapters"}

# The configs that make each artifact: a method, or LoRA with one option set.
OPTION_VALUES: dict[str, Any] = {"use_dora": True, "modules_to_save": ["lm_head"]}


def _config(method: str = "lora", **lora: Any) -> RunConfig:
    config = RunConfig(method=method)
    return dataclasses.replace(config, lora=dataclasses.replace(config.lora, **lora))


def test_serving_problems_follow_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    assert serving_problems(_config("lora")) == []
    for name, spec in METHOD_SPECS.items():
        problems = serving_problems(_config(name))
        assert [p.field for p in problems] == ([] if spec.servable else ["method"]), name
    for option, value in OPTION_VALUES.items():
        problems = serving_problems(_config("qlora", **{option: value}))
        assert [(p.field, p.value) for p in problems] == (
            [] if LORA_OPTION_SERVABLE[option] else [(f"lora.{option}", value)]
        )
    # Data-driven: flipping the flags is all it takes.
    monkeypatch.setitem(LORA_OPTION_SERVABLE, "use_dora", True)
    monkeypatch.setitem(METHOD_SPECS, "ptuning", dataclasses.replace(METHOD_SPECS["ptuning"], servable=True))
    assert serving_problems(_config("lora", use_dora=True)) == serving_problems(_config("ptuning")) == []
    assert method_specs.method_spec("ptuning").servable


def test_submit_job_refuses_what_cannot_be_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every method is servable now: mark ptuning not servable to exercise the refusal itself.
    monkeypatch.setitem(METHOD_SPECS, "ptuning", dataclasses.replace(METHOD_SPECS["ptuning"], servable=False))
    train = tmp_path / "train.jsonl"
    train.write_text('{"input": "q", "target": "a"}\n', encoding="utf-8")
    base = {"model": {"name_or_path": "org/model"}, "data": {"train_file": str(train)}}
    refused = [("method", {"method": "ptuning"}), ("lora", {"lora": {"use_dora": True}})]
    refused = [(f, c) for f, c in refused if serving_problems(_config(**_flat(c)))]
    assert refused, "everything is servable: nothing left to refuse"
    for _, changes in refused:
        with pytest.raises(ConfigError) as info:
            validate_submission(
                JobRequest(config={**base, **changes}), Capacity(), SERVER, check_memory=False
            )
        fields = [p.field for p in info.value.problems]
        assert any(f in ("spec.method", "spec.lora.use_dora") for f in fields), fields
        assert "cannot serve" in info.value.reason


def _flat(changes: dict[str, Any]) -> dict[str, Any]:
    return {"method": changes["method"]} if "method" in changes else dict(changes["lora"])


def test_lorafleet_train_refuses_before_training(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.cli import main

    monkeypatch.setitem(METHOD_SPECS, "ptuning", dataclasses.replace(METHOD_SPECS["ptuning"], servable=False))
    assert main(["train", "examples/ptuning.yaml"]) == 2
    err = capsys.readouterr().err
    assert "method='ptuning'" in err and "cannot serve" in err and "--no-serving-check" in err


def _peft_dir(base_dir: Path, out: Path, **options: Any) -> Path:
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    base = load_base(base_dir)
    if options.pop("prefix", False):
        config: Any = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    else:
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **options)
    get_peft_model(base, config).save_pretrained(str(out))
    return out


def test_the_table_matches_what_the_inference_loader_serves(tiny_llama: Path, tmp_path: Path) -> None:
    from services.inference.prompt_adapters import load_adapter

    base = load_base(tiny_llama)
    cases = {f"lora.{o}": ({o: v}, LORA_OPTION_SERVABLE[o]) for o, v in OPTION_VALUES.items()}
    cases["method ptuning"] = ({"prefix": True}, METHOD_SPECS["ptuning"].servable)
    cases["plain lora"] = ({}, METHOD_SPECS["lora"].servable)
    for label, (options, servable) in cases.items():
        path = _peft_dir(tiny_llama, tmp_path / label.replace(" ", "-"), **options)
        if servable:
            weights = load_adapter(path, label, base)  # the inference service's loader
            # Served means carried to the engine, not read and dropped.
            assert SERVED_AS.get(label, lambda w: True)(weights), label
        else:
            with pytest.raises((ValueError, LorafleetError)):
                load_adapter(path, label, base)


# What the loaded weights hold for each served LoRA option (the engine applies these per row).
SERVED_AS: dict[str, Any] = {
    "lora.use_dora": lambda w: set(w.dora_scale) == set(w.layers),
    "lora.modules_to_save": lambda w: set(w.modules_to_save) == {"lm_head"},
    "method ptuning": lambda w: w.num_virtual_tokens == 2 and len(w.keys) == len(w.values) > 0,
}
