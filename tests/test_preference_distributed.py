"""DPO under DeepSpeed ZeRO-2 and ZeRO-3 with 2 real processes (the real launcher, gloo on CPU).

Each run must finish with finite losses, identical LoRA weights on both ranks, the adapter published
once, and one metrics record per logging step (written by rank 0 only). The reference policy is the
base with the adapter disabled, run through the DeepSpeed engine (under ZeRO-3 it gathers the same
partitioned weights as the policy). The first distributed start JIT-compiles DeepSpeed's comm op
(about 40 s, then cached)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from lorafleet import adapters
from lorafleet.datagen import generate_preference_datasets
from lorafleet.distributed import launch_command, launch_environment
from lorafleet.runlog import read_records
from tests.training_utils import free_port, training_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
STEPS = 4


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_preference_datasets(str(tmp_path_factory.mktemp("pref")))


@pytest.mark.parametrize("stage", [2, 3])
def test_dpo_under_zero_with_two_ranks(
    stage: int, tmp_path: Path, tiny_llama: Path, preference_files: dict[str, Path]
) -> None:
    config = training_config(
        tmp_path,
        tiny_llama,
        {
            "cblue_train": preference_files["preference_train"],
            "cblue_validation": preference_files["preference_validation"],
        },
        stage="dpo",
        data={
            "format": "auto",
            "max_source_length": 64,
            "max_target_length": 16,
            "max_samples": 64,
        },
        preference={"beta": 0.1},
        train={"max_steps": STEPS, "per_device_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1},
        distributed={"deepspeed_stage": stage, "nproc_per_node": 2, "master_port": free_port()},
        output={"adapter_name": f"dpo-zero{stage}"},
    )
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    proc = subprocess.run(
        launch_command(config.distributed, [str(path)]),
        env=launch_environment(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run = Path(config.output.run_dir)
    records = read_records(run / "trainer_log.jsonl")
    steps = [r for r in records if "event" not in r]
    # One record per step: rank 0 alone writes, with the mean over both ranks' micro-batches.
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    # Step 1 is scored before any update: the fresh adapter (LoRA B = 0) is the reference itself, so
    # the engine's policy forward and the disabled-adapter forward must agree exactly.
    first = steps[0]
    assert abs(first["loss"] - math.log(2)) < 1e-5, first
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5, first
    assert steps[-1]["rewards/margins"] != 0.0
    for record in steps:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"):
            assert math.isfinite(record[key]), (key, record)
    started = [r for r in records if r.get("event") == "run_started"]
    assert len(started) == 1 and started[0]["world_size"] == 2
    finished = [r for r in records if r.get("event") == "run_finished"]
    assert len(finished) == 1
    digests = finished[0]["weights_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1], "ranks ended with different LoRA weights"
    assert json.loads((run / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == stage

    final = json.loads((run / "final_metrics.json").read_text())
    assert final["train_steps"] == STEPS and math.isfinite(final["mean_margin"])
    published = adapters.list_adapters(config.output.adapters_root)
    assert [(p.name, p.version) for p in published] == [(f"dpo-zero{stage}", 1)]
    assert published[0].manifest.extra["stage"] == "dpo"
    assert (published[0].path / "adapter_model.safetensors").is_file()
    # The adapter was trained: it is not the zero-initialised LoRA B.
    from safetensors.torch import load_file

    weights = load_file(str(published[0].path / "adapter_model.safetensors"))
    assert any(float(w.abs().max()) > 0 for name, w in weights.items() if "lora_B" in name)
