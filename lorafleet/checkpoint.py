"""Resumable checkpoints in a run directory, under plain PyTorch and under DeepSpeed.

Layout::

    <run_dir>/checkpoints/step-000050/
        trainer_state.json        step, epoch, micro-batches done in the epoch, tokens seen
        rng-rank{R}.pt            every rank's RNG state (dropout must replay identically)
        trainable.safetensors     plain PyTorch: the trainable parameters only
        optimizer.pt scheduler.pt plain PyTorch
        deepspeed/                DeepSpeed: engine.save_checkpoint (ZeRO shards of every rank)
        COMPLETE                  written last

A checkpoint is written under ``step-XXXXXX.tmp`` and renamed once complete, so a process killed
with SIGKILL mid-save leaves at worst a ``.tmp`` directory that is ignored and removed: resume
always starts from the last complete checkpoint (the peers' users' top resume complaint is a
half-written checkpoint that crashes the restart).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
MARKER = "COMPLETE"


@dataclass
class TrainerState:
    """Where training stands; enough to continue exactly."""

    global_step: int = 0
    epoch: int = 0
    micro_batches_done: int = 0
    """Micro-batches of ``epoch`` already consumed (the data order is a function of seed and epoch)."""
    tokens_seen: int = 0
    world_size: int = 1


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / MARKER).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def last_checkpoint(run_dir: str | Path) -> Path | None:
    done = list_checkpoints(run_dir)
    return done[-1] if done else None


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Delete checkpoint directories left half-written by a killed run; return what was removed."""
    root = checkpoints_dir(run_dir)
    removed: list[Path] = []
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and (child.name.endswith(".tmp") or not (child / MARKER).is_file()):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def staging_path(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:06d}.tmp"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_rank_files(stage_dir: Path, rank: int) -> None:
    """Every rank writes its own RNG state into the staging directory."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), stage_dir / f"rng-rank{rank}.pt")


def save_plain(stage_dir: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Rank 0 of a plain PyTorch run: trainable weights, optimizer and scheduler state."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), str(stage_dir / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), stage_dir / "optimizer.pt")
    torch.save(scheduler.state_dict(), stage_dir / "scheduler.pt")


def finalize(stage_dir: Path, state: TrainerState, keep: int) -> Path:
    """Rank 0, after every rank has written: mark complete, rename into place, rotate old ones."""
    (stage_dir / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    marker = stage_dir / MARKER
    with open(marker, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    final = stage_dir.with_name(f"step-{state.global_step:06d}")
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage_dir, final)
    for old in list_checkpoints(stage_dir.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> TrainerState:
    return TrainerState(**json.loads((ckpt / "trainer_state.json").read_text()))


def load_plain(ckpt: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Restore trainable weights, optimizer and scheduler of a plain PyTorch run."""
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint {ckpt} has parameters this model lacks: {missing[:5]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))


def load_rng(ckpt: Path, rank: int) -> None:
    path = ckpt / f"rng-rank{rank}.pt"
    if path.is_file():
        # The RNG state holds a Python tuple from random.getstate(); our own file, written above.
        _set_rng_state(torch.load(path, weights_only=False))
