"""Write a LoRA adapter trained on a converted Baichuan / ChatGLM model back in the original key layout.

A model converted by ``lorafleet.convert`` has separate ``q_proj`` / ``k_proj`` / ``v_proj`` where the
original has one fused projection (Baichuan's ``W_pack``, ChatGLM's ``query_key_value``). Users of
the original remote-code model load adapters with PEFT on those fused names. The fused adapter is
exact: with LoRA pairs ``(A_x [r_x, h], B_x [o_x, r_x])`` and scalings ``s_x`` for x in q, k, v,

    W_fused + s * B @ A  ==  stack_rows(W_q + s_q B_q A_q, W_k + s_k B_k A_k, W_v + s_v B_v A_v)

holds for ``A = stack_rows(A_q, A_k, A_v)`` [r_q + r_k + r_v, h] and the block-diagonal
``B = diag(B_q * s_q/s, B_k * s_k/s, B_v * s_v/s)`` [o_q + o_k + o_v, r_q + r_k + r_v]: the fused
rank is 3r for equal ranks. ``s`` is set to 1 through the fused module's ``alpha_pattern`` (alpha
= rank, or sqrt(rank) with rsLoRA), so each block keeps its own scaling exactly; a projection the
adapter did not target contributes zero rows of ``B``. The other modules only change name
(ChatGLM: ``o_proj -> dense``, ``gate_up_proj -> dense_h_to_4h``, ``down_proj -> dense_4h_to_h``).

Refused, with the reason: DoRA (its magnitude vector normalises each fused row block differently),
trained biases, ``modules_to_save`` (a trained Baichuan2 head is no longer a ``NormHead``),
embedding or head LoRA.

Run as::

    lorafleet export NAME@VERSION --layout original --out DIR [--root .cache/adapters]
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from lorafleet.errors import AdapterError

FUSED_NAMES = {"baichuan": "self_attn.W_pack", "chatglm": "self_attention.query_key_value"}
"""The fused q/k/v projection of each original layout, relative to a decoder layer."""

_RENAMES = {
    "baichuan": {"self_attn.o_proj": "self_attn.o_proj", "mlp.gate_proj": "mlp.gate_proj",
                 "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj"},
    "chatglm": {"self_attn.o_proj": "self_attention.dense", "mlp.gate_up_proj": "mlp.dense_h_to_4h",
                "mlp.down_proj": "mlp.dense_4h_to_h"},
}  # fmt: skip
_LAYER_PREFIX = {
    "baichuan": "base_model.model.model.layers.",
    "chatglm": "base_model.model.transformer.encoder.layers.",
}
_NATIVE_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
_QKV = ("q_proj", "k_proj", "v_proj")


def layout_kind(family: str) -> str:
    """``baichuan`` or ``chatglm`` for a family name.

    Raises:
        AdapterError: a family without an original layout to export to.
    """
    for kind in FUSED_NAMES:
        if family.startswith(kind):
            return kind
    raise AdapterError(
        f"family {family!r} has no original layout to export to; --layout original covers "
        "baichuan, baichuan2, chatglm2 and chatglm3 adapters"
    )


def _check_config(config: dict[str, Any]) -> None:
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r} (only LORA adapters fuse)")
    if config.get("use_dora"):
        problems.append("use_dora=true (DoRA's magnitude vector does not fuse across q/k/v)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config.get('bias')!r} (trained biases are not exported)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']!r} (a trained head or embedding)")
    if problems:
        raise AdapterError("cannot export to the original layout: " + "; ".join(problems))


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's LoRA scaling for one module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(pattern, module):
            alpha = float(value)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def fuse_adapter(
    state: dict[str, torch.Tensor], config: dict[str, Any], family: str, qkv_rows: list[int] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The original-layout adapter state dict and config of a native-layout LoRA adapter.

    Args:
        state: ``adapter_model.safetensors`` of the adapter over the converted model.
        config: its ``adapter_config.json``.
        family: ``baichuan``, ``baichuan2``, ``chatglm2`` or ``chatglm3``.
        qkv_rows: output rows of q, k, v; needed only when the adapter leaves one of them out
            (Baichuan: hidden each; ChatGLM: heads*d, groups*d, groups*d).

    Returns:
        ``(state, config)`` for PEFT over the original model.

    Raises:
        AdapterError: a configuration that does not fuse exactly, or an unexpected key.
    """
    kind = layout_kind(family)
    _check_config(config)
    layers: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _NATIVE_KEY.match(key)
        if match is None:
            raise AdapterError(f"adapter tensor {key!r} has no place in the original {kind} layout")
        index, block, leaf, ab = int(match[1]), match[2], match[3], match[4]
        if leaf in _QKV:
            layers.setdefault(index, {}).setdefault(leaf, {})[ab] = tensor
            continue
        original = _RENAMES[kind].get(f"{block}.{leaf}")
        if original is None:
            raise AdapterError(f"adapter tensor {key!r}: {block}.{leaf} has no original {kind} module")
        out[f"{_LAYER_PREFIX[kind]}{index}.{original}.lora_{ab}.weight"] = tensor
    fused_ranks = set()
    for index, parts in sorted(layers.items()):
        a, b = _fuse_layer(parts, config, qkv_rows, index)
        fused_ranks.add(a.shape[0])
        stem = f"{_LAYER_PREFIX[kind]}{index}.{FUSED_NAMES[kind]}"
        out[f"{stem}.lora_A.weight"], out[f"{stem}.lora_B.weight"] = a, b
    return out, _original_config(config, kind, fused_ranks)


def _fuse_layer(
    parts: dict[str, dict[str, torch.Tensor]], config: dict[str, Any], qkv_rows: list[int] | None, index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-stacked A [sum r, h] and block-diagonal B [sum o, sum r] of one layer, fused scaling 1."""
    present = [name for name in _QKV if name in parts]
    if len(present) < 3 and qkv_rows is None:
        raise AdapterError(
            f"layer {index}: the adapter targets only {present}; the original base's config is needed "
            "for the sizes of the others (pass the base directory)"
        )
    rows = qkv_rows or [parts[name]["B"].shape[0] for name in _QKV]
    a_blocks, scaled_b = [], []
    for name in present:
        a, b = parts[name]["A"], parts[name]["B"]
        scale = _scaling(config, f"layers.{index}.{name}", a.shape[0])
        a_blocks.append(a)
        scaled_b.append((b.float() * scale).to(b.dtype))
    a_fused = torch.cat(a_blocks, dim=0)
    b_fused = torch.zeros(sum(rows), a_fused.shape[0], dtype=scaled_b[0].dtype)
    row_start = dict(zip(_QKV, (0, rows[0], rows[0] + rows[1]), strict=True))
    col = 0
    for name, b in zip(present, scaled_b, strict=True):
        if b.shape[0] != rows[_QKV.index(name)]:
            raise AdapterError(
                f"layer {index} {name}: lora_B has {b.shape[0]} rows, the base has {rows[_QKV.index(name)]}"
            )
        b_fused[row_start[name] : row_start[name] + b.shape[0], col : col + b.shape[1]] = b
        col += b.shape[1]
    return a_fused, b_fused


def _original_config(config: dict[str, Any], kind: str, fused_ranks: set[int]) -> dict[str, Any]:
    leaf = FUSED_NAMES[kind].rsplit(".", 1)[1]
    renames = {n.rsplit(".", 1)[1]: o.rsplit(".", 1)[1] for n, o in _RENAMES[kind].items()}
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        raise AdapterError(f"target_modules={targets!r} is a pattern; export needs a list of module names")
    new_targets = sorted({leaf if t in _QKV else renames.get(t, t) for t in targets})
    out = dict(config)
    out["target_modules"] = new_targets
    rank_pattern = {
        k: v for k, v in (config.get("rank_pattern") or {}).items() if not any(q in k for q in _QKV)
    }
    alpha_pattern = {
        k: v for k, v in (config.get("alpha_pattern") or {}).items() if not any(q in k for q in _QKV)
    }
    if fused_ranks:
        if len(fused_ranks) != 1:
            raise AdapterError(f"the fused {leaf} ranks differ across layers: {sorted(fused_ranks)}")
        (rank,) = fused_ranks
        # Scaling 1 on the fused module: each block of B already carries its own scaling.
        rank_pattern[leaf] = rank
        alpha_pattern[leaf] = math.sqrt(rank) if config.get("use_rslora") else float(rank)
    out["rank_pattern"], out["alpha_pattern"] = rank_pattern, alpha_pattern
    return out


def export_original(
    adapter_dir: str | Path, out_dir: str | Path, family: str, base_dir: str | Path | None = None
) -> Path:
    """Write the original-layout version of the LoRA adapter in ``adapter_dir`` to ``out_dir``.

    Args:
        adapter_dir: a PEFT adapter directory over the converted model.
        out_dir: where ``adapter_config.json`` and ``adapter_model.safetensors`` go (must not exist
            or be empty).
        family: the adapter's family (``baichuan2``, ``chatglm3``...).
        base_dir: the original checkpoint directory: recorded as ``base_model_name_or_path`` and
            read for q/k/v sizes when the adapter leaves some out.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        AdapterError: missing files, a non-empty ``out_dir``, or an adapter that does not fuse exactly.
    """
    from safetensors.torch import load_file, save_file

    source, target = Path(adapter_dir), Path(out_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (source / name).is_file():
            raise AdapterError(f"{str(source)!r} has no {name}")
    if target.exists() and any(target.iterdir()):
        raise AdapterError(f"export output {str(target)!r} exists and is not empty")
    config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
    state, new_config = fuse_adapter(
        load_file(str(source / "adapter_model.safetensors")), config, family, _qkv_rows(base_dir, family)
    )
    if base_dir is not None:
        new_config["base_model_name_or_path"] = str(base_dir)
    target.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    (target / "adapter_config.json").write_text(json.dumps(new_config, indent=2), encoding="utf-8")
    return target


def _qkv_rows(base_dir: str | Path | None, family: str) -> list[int] | None:
    if base_dir is None or not (Path(base_dir) / "config.json").is_file():
        return None
    from lorafleet.convert import chatglm_qkv_sizes, read_config

    config = read_config(base_dir)
    if layout_kind(family) == "chatglm":
        return chatglm_qkv_sizes(config)
    hidden = config.get("hidden_size")
    return [hidden] * 3 if isinstance(hidden, int) else None


def main(argv: list[str] | None = None) -> int:
    """``lorafleet export NAME@V --layout original --out DIR``: a published adapter in the original layout."""
    from lorafleet.adapters import get_adapter, parse_adapter_ref

    parser = argparse.ArgumentParser(prog="lorafleet export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="NAME or NAME@VERSION of a published LoRA adapter")
    parser.add_argument("--layout", choices=("original",), required=True, help="key layout to write")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--root", default=".cache/adapters", help="adapters root")
    args = parser.parse_args(argv)
    name, version = parse_adapter_ref(args.ref)
    published = get_adapter(args.root, name, version)
    manifest = published.manifest
    if manifest.kind != "lora":
        raise AdapterError(f"{published.ref} is a {manifest.kind!r} artifact; only LoRA adapters export")
    base = manifest.base_model.get("path") if manifest.base_model.get("kind") == "local" else None
    out = export_original(published.path, args.out, manifest.family, base)
    print(f"{published.ref} ({manifest.family}) -> original layout at {out}")
    return 0
