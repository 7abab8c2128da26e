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

``--merge`` instead writes a standalone Hugging Face model directory: the adapter merged into its
base (``merge_adapter``), its chat template as the tokenizer's ``chat_template``, loadable by plain
transformers, vLLM or TGI; ``--publish NAME`` publishes it as a ``full_model`` artifact.

Run as::

    lorafleet export NAME@VERSION --layout original --out DIR [--root .cache/adapters]
    lorafleet export NAME@VERSION --merge [--dtype bf16|fp16|fp32] (--out DIR | --publish NAME)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafleet.errors import AdapterError

FUSED_NAMES = {"baichuan": "self_attn.W_pack", "chatglm": "self_attention.query_key_value"}
"""The fused q/k/v projection of each original layout, relative to a decoder layer."""

_RENAMES = {
    "baichuan": {
        "self_attn.o_proj": "self_attn.o_proj",
        "mlp.gate_proj": "mlp.gate_proj",
        "mlp.up_proj": "mlp.up_proj",
        "mlp.down_proj": "mlp.down_proj",
    },
    "chatglm": {
        "self_attn.o_proj": "self_attention.dense",
        "mlp.gate_up_proj": "mlp.dense_h_to_4h",
        "mlp.down_proj": "mlp.dense_4h_to_h",
    },
}
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


# ---------------------------------------------------------------------------------------------
# Merge: a standalone Hugging Face model directory


MERGE_DTYPES = ("bf16", "fp16", "fp32")
"""Dtypes ``--merge`` writes; the merge itself always runs in fp32."""
MERGE_RECORD = "lorafleet_merge.json"
"""Written beside a merged model exported with ``--out``: what was merged and how (the published
form records the same in its manifest's ``source``)."""
_QUANTIZED = ("nf4", "int8")


@dataclass(frozen=True)
class MergeResult:
    """What ``merge_adapter`` wrote and how."""

    path: Path
    """The model directory (``--out``, or the staging directory before publishing)."""
    source: dict[str, Any]
    """The merge record: ``kind`` ``merge``, the adapter, dtypes, and ``dequantized`` when the base
    was quantized in training (stored in ``lorafleet_merge.json`` / the manifest's ``source``)."""

    @property
    def notice(self) -> str:
        """The line the CLI prints about a quantized base: empty when the base was not quantized."""
        return str(self.source.get("dequantized", ""))


def jinja_chat_template(template: Any) -> str:
    """The tokenizer ``chat_template`` (Jinja) that renders a conversation exactly as the lorafleet
    ``template`` does (``lorafleet.templates.render_turns``), so a merged model served elsewhere
    (vLLM, TGI, ``apply_chat_template``) gets the prompt format it was trained on.

    Every literal becomes a quoted Jinja expression (``{{ "..." }}``) and every tag strips whitespace,
    so the ``trim_blocks`` / ``lstrip_blocks`` options transformers renders with change nothing. A
    generation prompt needs nothing extra: a lorafleet user turn already ends where the answer starts.
    """

    def piece(fmt: str, slots: dict[str, str]) -> str:
        out, pos = [], 0
        for match in re.finditer(r"\{(query|answer|system|n|bos|eos)\}", fmt):
            if match.start() > pos:
                out.append("{{ " + json.dumps(fmt[pos : match.start()], ensure_ascii=False) + " }}")
            out.append(slots[match[1]])
            pos = match.end()
        if pos < len(fmt):
            out.append("{{ " + json.dumps(fmt[pos:], ensure_ascii=False) + " }}")
        return "".join(out)

    common = {"bos": "{{ bos_token }}", "eos": "{{ eos_token }}", "n": "{{ ns.n }}"}
    system = (
        piece(template.system_format, {**common, "system": "{{ ns.system }}"})
        if template.system_format
        else ""
    )
    query = "{{ message['content'] }}"
    if template.system_in_query and system:
        query = "{%- if ns.n == 1 and ns.system -%}" + system + "{%- endif -%}" + query
    return "".join(
        [
            "{%- set ns = namespace(system="
            + json.dumps(template.default_system, ensure_ascii=False)
            + ", n=0) -%}",
            "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}{%- endif -%}",
            piece(template.prefix, common),
            ("{%- if ns.system -%}" + system + "{%- endif -%}")
            if system and not template.system_in_query
            else "",
            "{%- for message in messages -%}",
            "{%- if message['role'] == 'user' -%}",
            ("{%- if ns.n > 0 -%}" + piece(template.separator, common) + "{%- endif -%}")
            if template.separator
            else "",
            "{%- set ns.n = ns.n + 1 -%}",
            piece(template.user_format, {**common, "query": query}),
            "{%- elif message['role'] == 'assistant' -%}",
            piece(template.assistant_format, {**common, "answer": "{{ message['content'] }}"}),
            "{%- endif -%}",
            "{%- endfor -%}",
        ]
    )


def _dequantize_bnb(model: Any) -> int:
    """Replace every bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` of ``model`` by an fp32
    ``nn.Linear`` holding its dequantized weight: the exact weight the quantized base computed with
    in training, so an adapter merged into it gives the trained model (merging into the original
    fp16 checkpoint would not, and requantizing after the merge would round the update away:
    LlamaFactory#5171). Returns the count replaced."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            continue
        state = (
            getattr(module.weight, "quant_state", None)
            if isinstance(module, bnb.nn.Linear4bit)
            else module.state
        )
        weight = dequantize_bnb_weight(module.weight, state=state).float()  # type: ignore[arg-type]  # [out, in]
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = torch.nn.Parameter(module.bias.detach().float(), requires_grad=False)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, linear)
        replaced += 1
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # config, quantizer, method: a plain model now
    return replaced


def merge_adapter(published: Any, out_dir: str | Path, dtype: str = "bf16") -> MergeResult:
    """Merge a published LoRA / DoRA adapter into its base and write a standalone HF model directory.

    ``W' = W + s * B @ A`` for every adapted module (PEFT ``merge_and_unload``; DoRA rescales rows by
    its magnitude vector; ``modules_to_save`` replace their modules), computed in fp32 and then cast
    to ``dtype``. A base the adapter was trained over in 4 or 8 bits is loaded quantized as in
    training and dequantized to fp32 first (``_dequantize_bnb``), and the result says so.

    Writes ``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer with the
    adapter's template as its ``chat_template``, and ``lorafleet_merge.json``.

    Args:
        published: a ``lorafleet.adapters.PublishedAdapter`` of kind ``lora``.
        out_dir: the directory to write (must not exist or be empty).
        dtype: ``bf16``, ``fp16`` or ``fp32``: the stored weights' dtype.

    Returns:
        The merge result.

    Raises:
        AdapterImportError: another kind, an unknown dtype, a non-empty ``out_dir``, a base that is
            not available here.
    """
    from peft import PeftModel

    from lorafleet.config import ModelConfig
    from lorafleet.errors import AdapterImportError, FieldProblem
    from lorafleet.models import load_model, load_tokenizer, torch_dtype
    from lorafleet.templates import TEMPLATES

    manifest, target = published.manifest, Path(out_dir)
    problems = []
    if manifest.kind != "lora":
        problems.append(FieldProblem("kind", manifest.kind, f"{published.ref}: only LoRA adapters merge"))
    if dtype not in MERGE_DTYPES:
        problems.append(FieldProblem("dtype", dtype, f"must be one of {list(MERGE_DTYPES)}"))
    if target.exists() and any(target.iterdir()):
        problems.append(FieldProblem("out", str(target), "exists and is not empty"))
    base = manifest.base_model
    base_path = base.get("path") if base.get("kind") == "local" else base.get("id")
    if not base_path:
        problems.append(FieldProblem("base_model", base, "the manifest names no base"))
    if problems:
        raise AdapterImportError(problems, f"cannot merge {published.ref}")
    quantization = str((manifest.hyperparameters.get("model") or {}).get("quantization") or "none")
    model_cfg = ModelConfig(name_or_path=str(base_path), revision=base.get("revision"), dtype="fp32")
    model = load_model(
        dataclasses.replace(model_cfg, quantization=quantization if quantization in _QUANTIZED else "none"),
        for_training=False,
        device_map="cpu",
    )
    source: dict[str, Any] = {
        "kind": "merge",
        "adapter": published.ref,
        "adapter_method": manifest.method,
        "merge_dtype": "fp32",
        "dtype": dtype,
        "base_quantization": quantization,
    }
    if quantization in _QUANTIZED:
        count = _dequantize_bnb(model)
        source["dequantized"] = (
            f"the adapter was trained over a {quantization}-quantized base: its {count} quantized linear "
            f"layers were dequantized to fp32, the adapter merged in fp32 and the result written in {dtype}; "
            "the weights are the quantized base's plus the update, not the original checkpoint's"
        )
    merged = PeftModel.from_pretrained(model, str(published.path)).merge_and_unload()
    merged = merged.to(torch_dtype(dtype))
    merged.config.dtype = torch_dtype(dtype)
    target.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(target), safe_serialization=True)
    tokenizer = load_tokenizer(model_cfg)
    template = TEMPLATES.get(manifest.template)
    if template is not None and not template.use_chat_template:
        tokenizer.chat_template = jinja_chat_template(template)
    source["chat_template"] = manifest.template
    tokenizer.save_pretrained(str(target))
    (target / MERGE_RECORD).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return MergeResult(target, source)


def merge_and_publish(published: Any, adapters_root: str | Path, name: str, dtype: str = "bf16") -> Any:
    """Merge (``merge_adapter``) into a staging directory and publish it as a new version of ``name``,
    a ``full_model`` artifact whose manifest ``source`` records the merge.

    Returns:
        ``(PublishedAdapter, MergeResult)``.
    """
    import shutil

    from lorafleet import adapters

    staging = adapters.new_staging_dir(adapters_root, name)
    try:
        result = merge_adapter(published, staging, dtype)
        m = published.manifest
        manifest = adapters.Manifest(
            name=name,
            version=0,
            kind="full_model",
            method=m.method,
            base_model=m.base_model,
            family=m.family,
            template=m.template,
            hyperparameters=m.hyperparameters,
            created_at=adapters.utc_now(),
            source=result.source,
        )
        return adapters.publish(staging, adapters_root, name, manifest), result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``lorafleet export NAME@V --layout original --out DIR`` (a published adapter in the original
    layout) or ``lorafleet export NAME@V --merge [--dtype bf16] (--out DIR | --publish NAME)``."""
    from lorafleet.adapters import get_adapter, parse_adapter_ref

    parser = argparse.ArgumentParser(prog="lorafleet export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="NAME or NAME@VERSION of a published LoRA adapter")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--layout", choices=("original",), help="key layout to write")
    mode.add_argument("--merge", action="store_true", help="merge into the base: a standalone HF model")
    parser.add_argument("--dtype", choices=MERGE_DTYPES, default="bf16", help="--merge: stored weights dtype")
    parser.add_argument("--out", help="output directory (must not exist or be empty)")
    parser.add_argument("--publish", metavar="NAME", help="--merge: publish as a full-model artifact NAME")
    parser.add_argument("--root", default=".cache/adapters", help="adapters root")
    args = parser.parse_args(argv)
    if (args.out is None) == (args.publish is None) or (args.publish and not args.merge):
        parser.error("give exactly one of --out DIR or --publish NAME (--publish only with --merge)")
    name, version = parse_adapter_ref(args.ref)
    published = get_adapter(args.root, name, version)
    manifest = published.manifest
    if args.merge:
        if args.publish:
            merged, result = merge_and_publish(published, args.root, args.publish, args.dtype)
            print(
                f"{published.ref} merged into its base -> {merged.ref} (full model, {args.dtype}) at {merged.path}"
            )
        else:
            result = merge_adapter(published, args.out, args.dtype)
            print(f"{published.ref} merged into its base -> {result.path} ({args.dtype})")
        if result.notice:
            print(f"note: {result.notice}")
        return 0
    if manifest.kind != "lora":
        raise AdapterError(f"{published.ref} is a {manifest.kind!r} artifact; only LoRA adapters export")
    base = manifest.base_model.get("path") if manifest.base_model.get("kind") == "local" else None
    out = export_original(published.path, args.out, manifest.family, base)
    print(f"{published.ref} ({manifest.family}) -> original layout at {out}")
    return 0
