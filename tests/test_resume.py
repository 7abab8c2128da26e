"""Resume: a training process killed with SIGKILL after a checkpoint, started again, continues from
that step, and its final adapter matches an uninterrupted run. Plain PyTorch and DeepSpeed ZeRO-2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafleet.checkpoint import list_checkpoints
from lorafleet.distributed import launch_command, launch_environment
from lorafleet.runlog import read_records
from tests.training_utils import free_port, training_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY, KILL_AFTER = 40, 5, 10


def _command(tmp: Path, tiny_llama, data, name: str, stage: int) -> tuple[list[str], Path]:
    config = training_config(
        tmp / name,
        tiny_llama,
        data,
        lora={"dropout": 0.1},  # dropout on: the RNG state must be restored too
        train={"max_steps": STEPS, "save_steps": SAVE_EVERY, "save_total_limit": 2, "resume": "auto"},
        distributed={"deepspeed_stage": stage, "master_port": free_port()},
        output={"adapter_name": name},
    )
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    if stage < 0:
        return [sys.executable, "-m", "services.trainer.recipe", str(path)], Path(config.output.run_dir)
    return launch_command(config.distributed, [str(path)]), Path(config.output.run_dir)


def _adapter(tmp: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(tmp / name / "adapters" / name / "1" / "adapter_model.safetensors"))


def _kill_after_checkpoint(cmd: list[str], run_dir: Path) -> int:
    """Start training, SIGKILL its whole process group right after a checkpoint at >= KILL_AFTER."""
    proc = subprocess.Popen(
        cmd,
        env=launch_environment(),
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = run_dir / "trainer_log.jsonl"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            saved = (
                [r["step"] for r in read_records(log) if r.get("event") == "checkpoint_saved"]
                if log.exists()
                else []
            )
            if saved and saved[-1] >= KILL_AFTER:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return saved[-1]
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.02)
        raise AssertionError("no checkpoint within 300 s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("stage", [-1, 2], ids=["plain", "zero2"])
def test_sigkill_then_restart_continues_and_matches(stage, tmp_path, tiny_llama, bundled_data):
    cmd, run_dir = _command(tmp_path, tiny_llama, bundled_data, "interrupted", stage)
    killed_at = _kill_after_checkpoint(cmd, run_dir)
    assert list_checkpoints(run_dir), "a complete checkpoint must survive the kill"
    last_complete = int(list_checkpoints(run_dir)[-1].name.split("-")[1])
    assert last_complete >= killed_at

    subprocess.run(cmd, env=launch_environment(), cwd=ROOT, check=True, timeout=600, capture_output=True)
    records = read_records(run_dir / "trainer_log.jsonl")
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == last_complete
    after = records[records.index(resumed[0]) :]
    steps_after = [r["step"] for r in after if "event" not in r]
    assert steps_after[0] > last_complete and steps_after[-1] == STEPS

    ref_cmd, _ = _command(tmp_path, tiny_llama, bundled_data, "uninterrupted", stage)
    subprocess.run(ref_cmd, env=launch_environment(), cwd=ROOT, check=True, timeout=600, capture_output=True)
    resumed_weights, reference = _adapter(tmp_path, "interrupted"), _adapter(tmp_path, "uninterrupted")
    assert resumed_weights.keys() == reference.keys()
    for key, ref in reference.items():
        assert torch.allclose(resumed_weights[key], ref, atol=1e-5, rtol=1e-4), key
