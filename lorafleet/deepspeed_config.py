"""DeepSpeed configs: the shipped ZeRO files, with their ``auto`` values filled from the run config.

The shipped files (``lorafleet/assets/deepspeed/zero{0,2,3}.json``) follow the convention the HF
integration made familiar: batch sizes, clipping and precision say ``auto`` and are derived here from
``TrainConfig`` so the DeepSpeed file and the training arguments can never disagree. A user file
passed as ``distributed.deepspeed_config`` is filled the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafleet.config import RunConfig
from lorafleet.errors import ConfigError, FieldProblem

SHIPPED_STAGES = (0, 2, 3)


def shipped_config_path(stage: int) -> Path:
    """Path of the shipped JSON for a ZeRO stage (stage 1 uses the stage-2 file with stage set to 1)."""
    name = f"zero{2 if stage == 1 else stage}.json"
    return Path(__file__).resolve().parent / "assets" / "deepspeed" / name


def _fill(node: Any, values: dict[str, Any], path: str, missing: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, values, f"{path}.{k}" if path else k, missing) for k, v in node.items()}
    if node == "auto":
        if path in values:
            return values[path]
        missing.append(path)
    return node


def build_deepspeed_config(config: RunConfig, world_size: int, hidden_size: int) -> dict[str, Any]:
    """Load the ZeRO config for this run and fill every ``auto`` value.

    Args:
        config: the run config; ``distributed.deepspeed_stage`` must be >= 0.
        world_size: number of training processes across all nodes.
        hidden_size: the model's hidden size, for ZeRO-3 bucket sizes (as the HF integration does).

    Raises:
        ConfigError: the file is unreadable, or an ``auto`` value has no known derivation.
    """
    d, t = config.distributed, config.train
    path = Path(d.deepspeed_config) if d.deepspeed_config else shipped_config_path(d.deepspeed_stage)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(
            [FieldProblem("distributed.deepspeed_config", str(path), f"unreadable: {e}")]
        ) from e
    values: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.per_device_batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.max_grad_norm,
        "fp16.enabled": config.model.dtype == "fp16",
        "bf16.enabled": config.model.dtype == "bf16",
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    missing: list[str] = []
    filled = _fill(raw, values, "", missing)
    if missing:
        raise ConfigError(
            [
                FieldProblem(
                    "distributed.deepspeed_config",
                    str(path),
                    f"'auto' has no derivation for: {', '.join(missing)}",
                )
            ]
        )
    zero = filled.setdefault("zero_optimization", {})
    if not d.deepspeed_config:
        zero["stage"] = d.deepspeed_stage
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    # Our own loop passes a torch optimizer (DeepSpeed's fused Adam would JIT-compile for a minute
    # on CPU); DeepSpeed must be told that this is intended.
    filled["zero_allow_untested_optimizer"] = True
    filled.setdefault("steps_per_print", 10**9)
    filled.setdefault("wall_clock_breakdown", False)
    return filled
