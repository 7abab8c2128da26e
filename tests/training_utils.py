"""Helpers for tests that run the training recipe: configs on the tiny model and bundled data."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import torch

from lorafleet.config import RunConfig, config_from_dict


def training_config(
    tmp_path: Path,
    model: Path,
    datasets: dict[str, Path],
    method: str = "lora",
    **sections: dict[str, Any] | str,
) -> RunConfig:
    """A short run of ``method`` on the PromptCBLUE-like task; sections override the defaults."""
    tree: dict[str, Any] = {
        "model": {"name_or_path": str(model)},
        "data": {
            "train_file": str(datasets["cblue_train"]),
            "validation_file": str(datasets["cblue_validation"]),
            "format": "columns",
            "max_source_length": 96,
            "max_target_length": 8,
            "max_samples": 160,
        },
        "method": method,
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "train": {
            "max_steps": 12,
            "per_device_batch_size": 8,
            "learning_rate": 1e-2,
            "lr_scheduler": "constant",
            "logging_steps": 2,
            "predict_with_generate": False,
            "resume": "never",
        },
        "output": {
            "run_dir": str(tmp_path / "run"),
            "adapters_root": str(tmp_path / "adapters"),
            "adapter_name": f"t-{method}",
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return config_from_dict(tree)


def probe_batch(tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    """A right-padded batch of a few texts for comparing logits."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:48] for t in texts]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    return {"input_ids": input_ids, "attention_mask": mask}


def free_port() -> int:
    """A free TCP port on loopback (for a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
