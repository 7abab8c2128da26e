"""Static checks of a published PEFT LoRA adapter directory, before any weight is loaded: safetensors
only (pickle is never read), a LoRA ``adapter_config.json``, a rank within the server's cap, target
modules that exist in the base model, and no tensor the server would not use (LoRA ``A`` / ``B``,
DoRA magnitudes with ``use_dora``, and ``modules_to_save`` copies are served). The tensor table is
read from the safetensors header alone. :mod:`services.inference.registry` runs these (after the manifest and file-hash checks) on
every adapter before its first use; its errors are in ``errors.py``.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from services.inference.errors import AdapterIncompatibleError, AdapterLoadError

SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight files in a pickle format: unpickling runs arbitrary code, so they are never loaded."""
PEFT_PREFIX = "base_model.model."
_MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_LISTED = 5
"""Problems quoted in one error message."""


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file, read without loading (or trusting) any tensor data."""
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"header length {length} is implausible")
        raw = f.read(length)
    if len(raw) < length:
        raise ValueError("header is truncated")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    return header


def _lora_modules_and_rank(header: Mapping[str, Any]) -> tuple[set[str], int]:
    """Base-model module paths the LoRA tensors attach to, and the largest rank among them.

    PEFT keys look like ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``;
    ``lora_A`` is ``[rank, in_features]``.
    """
    modules: set[str] = set()
    rank = 0
    for key, info in header.items():
        if ".lora_" not in key:
            continue
        module = key.removeprefix(PEFT_PREFIX).split(".lora_", 1)[0]
        modules.add(module)
        shape = info.get("shape") if isinstance(info, dict) else None
        if ".lora_A." in key and isinstance(shape, list) and shape and isinstance(shape[0], int):
            rank = max(rank, shape[0])
    return modules, rank


def _config_rank(config: Mapping[str, Any]) -> int:
    ranks = [config.get("r")]
    pattern = config.get("rank_pattern")
    if isinstance(pattern, dict):
        ranks.extend(pattern.values())
    return max((r for r in ranks if isinstance(r, int) and not isinstance(r, bool)), default=0)


def _missing_targets(targets: Any, module_names: frozenset[str]) -> list[str]:
    """Entries of PEFT's ``target_modules`` that match no module of the base, with PEFT's own rules:
    a list entry matches a module path equal to it or ending in ``.<entry>``; a string is a regex
    that must fully match some path. ``all-linear`` cannot be checked by name (the tensor check
    covers it)."""
    if targets is None or targets == "all-linear":
        return []
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error:
            return [targets]
        return [] if any(pattern.fullmatch(m) for m in module_names) else [targets]
    leaves = {m.rsplit(".", 1)[-1] for m in module_names}
    return [
        t
        for t in targets
        if not (t in leaves or t in module_names or any(m.endswith("." + t) for m in module_names))
    ]


def check_weights_format(ref: str, path: Path) -> None:
    """Refuse a directory without ``adapter_model.safetensors``, naming any pickle weights found."""
    if (path / SAFETENSORS_WEIGHTS).is_file():
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterLoadError(
            f"adapter {ref} has only pickle weights ({', '.join(pickles)}) and no "
            f"{SAFETENSORS_WEIGHTS}; pickle is never loaded because unpickling can run arbitrary "
            "code: republish with safetensors (PEFT save_pretrained(safe_serialization=True))"
        )
    raise AdapterLoadError(f"adapter {ref} has no {SAFETENSORS_WEIGHTS}")


def _option_problems(
    header: Mapping[str, Any], config: Mapping[str, Any], skip: Collection[str]
) -> tuple[list[str], set[str]]:
    """Tensors the server would not use (DoRA magnitudes without ``use_dora``; anything neither
    LoRA, DoRA nor named by a ``modules_to_save`` entry), and the ``modules_to_save`` modules it
    must find in the base (all but those ``skip`` names)."""

    def named(entry: str, module: str) -> bool:
        return module == entry or module.endswith("." + entry)

    entries = [str(e) for e in (config.get("modules_to_save") or [])]
    unknown: list[str] = []
    replaced: set[str] = set()
    for key in header:
        if ".lora_magnitude_vector" in key:
            if not config.get("use_dora"):
                unknown.append(f"{key} (a DoRA magnitude, but use_dora is {config.get('use_dora')!r})")
            continue
        if ".lora_" in key:
            continue
        module = key.removeprefix(PEFT_PREFIX).rpartition(".")[0]
        # With ensure_weight_tying PEFT also saves the modules tied to a named one (lm_head with
        # embed_tokens); which modules are tied shows only in the weights, so the loader checks it.
        tied = bool(config.get("ensure_weight_tying")) and bool(entries)
        if not key.startswith(PEFT_PREFIX) or not (tied or any(named(e, module) for e in entries)):
            unknown.append(key)
        elif not any(named(s, module) for s in skip):
            replaced.add(module)
    return unknown, replaced


def check_lora(
    ref: str,
    path: Path,
    *,
    max_rank: int,
    module_names: frozenset[str],
    base_model: str,
    skip_modules_to_save: Collection[str] = (),
) -> int:
    """PEFT type, rank cap, target modules and tensor names, from ``adapter_config.json`` and the
    tensor table, without loading any tensor. ``module_names`` are the base's module paths,
    ``base_model`` names it in messages; ``skip_modules_to_save`` are ``modules_to_save`` entries
    the loader leaves out (a reward model's ``score`` head), so the base need not have them.

    Returns:
        The adapter's largest rank.

    Raises:
        AdapterLoadError: unreadable config or weights, no LoRA tensors.
        AdapterIncompatibleError: not LoRA, rank over the cap, tensors the server would not use
            (named), modules the base does not have (named).
    """
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AdapterLoadError(f"adapter {ref}: {ADAPTER_CONFIG} is missing or unreadable: {e}") from e
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterIncompatibleError(
            f"adapter {ref} is a PEFT {peft_type!r} adapter; this server serves LoRA ('LORA') only"
        )
    try:
        header = _read_safetensors_header(path / SAFETENSORS_WEIGHTS)
    except (OSError, ValueError) as e:
        raise AdapterLoadError(f"adapter {ref}: {SAFETENSORS_WEIGHTS} is unreadable: {e}") from e
    modules, tensor_rank = _lora_modules_and_rank(header)
    if not modules:
        raise AdapterLoadError(f"adapter {ref}: {SAFETENSORS_WEIGHTS} holds no LoRA tensors")
    unknown, replaced = _option_problems(header, config, skip_modules_to_save)
    if unknown:
        shown = ", ".join(unknown[:MAX_LISTED]) + (" ..." if len(unknown) > MAX_LISTED else "")
        raise AdapterIncompatibleError(
            f"adapter {ref} holds {len(unknown)} tensor(s) this server does not serve (not LoRA, DoRA or "
            f"modules_to_save {config.get('modules_to_save')!r}): {shown}"
        )
    rank = max(_config_rank(config), tensor_rank)
    if rank > max_rank:
        raise AdapterIncompatibleError(
            f"adapter {ref} has LoRA rank {rank}, above this server's max_rank {max_rank}"
        )
    missing = _missing_targets(config.get("target_modules"), module_names)
    missing += sorted(m for m in modules | replaced if m not in module_names)
    if missing:
        shown = ", ".join(missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else "")
        raise AdapterIncompatibleError(
            f"adapter {ref} targets {len(missing)} module(s) that base model {base_model!r} "
            f"does not have: {shown}"
        )
    return rank
