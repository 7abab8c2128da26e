"""Preference tuning learns the bundled task: a task outcome on the tiny llama, not a timing.

The bundled preference task (``lorafleet.datagen.preference_tables``) tags each correct answer with
the asked letter and that letter's check digit; the rejected answer carries the other digit. A
model that has not learned the rule ranks about half the held-out pairs right; DPO, started from a
published SFT adapter (whose frozen copy is the reference policy), must rank at least 90 % of them
right. Held-out prompts never occur in the training file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorafleet import adapters
from lorafleet.config import config_from_dict
from lorafleet.datagen import generate_preference_datasets
from services.trainer.preference_recipe import run_preference
from services.trainer.recipe import run_training

pytestmark = pytest.mark.integration


def _sft_adapter(tmp_path: Path, model: Path, data: dict[str, Path]) -> str:
    """Publish a short LoRA SFT run on the bundled alpaca rows; returns its ``name@version``."""
    config = config_from_dict(
        {
            "model": {"name_or_path": str(model)},
            "data": {
                "train_file": str(data["alpaca_train"]),
                "format": "alpaca",
                "max_source_length": 64,
                "max_target_length": 16,
            },
            "method": "lora",
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
            "train": {
                "max_steps": 20,
                "per_device_batch_size": 8,
                "learning_rate": 5e-3,
                "lr_scheduler": "constant",
                "logging_steps": 5,
                "predict_with_generate": False,
                "resume": "never",
            },
            "output": {
                "run_dir": str(tmp_path / "sft_run"),
                "adapters_root": str(tmp_path / "adapters"),
                "adapter_name": "sft",
            },
        }
    )
    published = run_training(config, progress=False).published
    assert published is not None
    return published.ref


def _preference_config(tmp_path: Path, model: Path, pref: dict[str, Path], stage: str, **extra: Any) -> Any:
    tree: dict[str, Any] = {
        "model": {"name_or_path": str(model)},
        "stage": stage,
        "data": {
            "train_file": str(pref["preference_train"]),
            "validation_file": str(pref["preference_validation"]),
            "max_source_length": 64,
            "max_target_length": 16,
        },
        "method": "lora",
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "preference": {"beta": 0.1},
        "train": {
            "max_steps": 30,
            "per_device_batch_size": 8,
            "learning_rate": 5e-3,
            "lr_scheduler": "constant",
            "logging_steps": 5,
            "resume": "never",
        },
        "output": {
            "run_dir": str(tmp_path / f"{stage}_run"),
            "adapters_root": str(tmp_path / "adapters"),
            "adapter_name": stage,
        },
    }
    for key, value in extra.items():
        tree[key].update(value)
    return config_from_dict(tree)


def test_dpo_from_an_sft_adapter_learns_the_held_out_preference(
    tmp_path: Path, tiny_llama: Path, bundled_data: dict[str, Path]
) -> None:
    sft_ref = _sft_adapter(tmp_path, tiny_llama, bundled_data)
    pref = generate_preference_datasets(str(tmp_path / "pref"))
    config = _preference_config(tmp_path, tiny_llama, pref, "dpo", preference={"sft_adapter": sft_ref})
    metrics = run_preference(config, progress=False)["metrics"]
    # The SFT adapter has not learned the rule: about half the held-out pairs ranked right.
    assert 0.3 <= metrics["initial_preference_accuracy"] <= 0.7, metrics
    assert metrics["preference_accuracy"] >= 0.9, metrics
    assert metrics["reward_accuracy"] >= 0.9 and metrics["mean_margin"] > 0, metrics
    published = adapters.get_adapter(tmp_path / "adapters", "dpo")
    assert published.manifest.extra["stage"] == "dpo"
    assert published.manifest.extra["started_from"] == sft_ref


def rm_config(tmp_path: Path, model: Path, pref: dict[str, Path]) -> Any:
    """The reward-model run of ``examples/rm.yaml``: LoRA at 1e-3 (at the 5e-3 that suits DPO, Adam's
    unit-size steps on the value head's weak, noisy gradient drift the adapter until both answers
    score alike and the loss sits at ln 2)."""
    return _preference_config(
        tmp_path, model, pref, "rm", train={"max_steps": 150, "learning_rate": 1e-3, "logging_steps": 50}
    )


def test_reward_model_learns_the_held_out_preference(tmp_path: Path, tiny_llama: Path) -> None:
    pref = generate_preference_datasets(str(tmp_path / "pref"))
    metrics = run_preference(rm_config(tmp_path, tiny_llama, pref), progress=False)["metrics"]
    # A fresh value head ranks about half the held-out pairs right; the trained one at least 90 %.
    assert 0.3 <= metrics["initial_preference_accuracy"] <= 0.7, metrics
    assert metrics["preference_accuracy"] >= 0.9 and metrics["mean_margin"] > 0, metrics
    published = adapters.get_adapter(tmp_path / "adapters", "rm")
    assert published.manifest.extra["stage"] == "rm"
    assert published.manifest.extra["value_head"] == "score"
