"""Load Baichuan and ChatGLM checkpoints into native transformers architectures, no remote code.

Baichuan and ChatGLM publish their weights with their own modelling code (``auto_map``), written
for transformers 4.x. Running a checkpoint's Python inside a multi-tenant trainer is a security
risk, and that code is not a dependable path on transformers 5. Where the published equations are
those of an architecture transformers implements, the state dict converts exactly:

* **Baichuan2-7B, Baichuan-7B -> Llama** (``modeling_baichuan.py``): RMSNorm, RoPE with
  ``rotate_half`` over the whole head, SwiGLU ``down(silu(gate(x)) * up(x))``, multi-head attention.
  The fused ``W_pack`` [3*hidden, hidden] is the row stack of q, k and v, so it splits into
  ``q_proj`` / ``k_proj`` / ``v_proj``. Baichuan2's ``NormHead`` computes
  ``logits = h @ normalize(W, dim=1).T``; a frozen head is exactly ``lm_head`` with its rows
  L2-normalised once (Baichuan-7B has a plain head, copied as is).
* **ChatGLM3-6B, ChatGLM2-6B -> Glm** (``modeling_chatglm.py`` vs transformers' ``GlmForCausalLM``):
  RMSNorm, ``query_key_value`` with bias, laid out ``[q: heads*d | k: groups*d | v: groups*d]``
  (multi-query attention with ``multi_query_group_num`` key/value heads), RoPE on the first half
  of each head's ``d`` dims with interleaved pairs ``(x[2i], x[2i+1])`` rotated by
  ``theta_i = (10000 * rope_ratio) ** (-2i / (d/2))``, the rest passed through (Glm:
  ``partial_rotary_factor=0.5`` and its interleaved ``rotate_half``), SwiGLU
  ``dense_h_to_4h = [gate | up]`` (Glm's ``gate_up_proj``, same order), no biases elsewhere.

Refused, with the alternative named: Baichuan-13B / Baichuan2-13B (ALiBi attention over a
RMSNorm/SwiGLU decoder: no native transformers architecture has that combination; Bloom, MPT and
Falcon's ALiBi come with LayerNorm and a GELU MLP), ChatGLM-6B v1 (2-D positions of GLM-130B) and
ChatGLM variants whose config switches the equations away from Glm's (post-layernorm residual,
LayerNorm, biases on dense layers, P-tuning prefixes, quantized weights). Those stay on the
explicit ``model.trust_remote_code`` path.

The tokenizer comes from the checkpoint's SentencePiece ``tokenizer.model`` through transformers'
own converter (a tokenizers BPE with byte fallback, as ``LlamaTokenizer`` builds it), with the
model's dummy-prefix setting and ChatGLM's special tokens at ids ``n_pieces + i``.

Run as::

    lorafleet convert SRC_DIR OUT_DIR          # once, to a native checkpoint directory

``lorafleet.models.load_model`` / ``load_tokenizer`` convert at load time into a cache directory
keyed by the source's content hash (``$LORAFLEET_CONVERT_CACHE``, default
``~/.cache/lorafleet/converted``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafleet.errors import ModelLoadError

SOURCE_KEY = "lorafleet_source"
"""Key of a converted ``config.json`` recording the source layout and family."""
CONVERT_MANIFEST = "lorafleet_convert.json"
"""File in a converted directory: the source path and content hash, the layout."""
CACHE_ENV = "LORAFLEET_CONVERT_CACHE"
"""Environment variable naming the load-time conversion cache directory."""

CHATGLM2_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
"""ChatGLM2's special tokens, at ids ``n_pieces + i`` of its SentencePiece model (tokenization_chatglm)."""
CHATGLM3_SPECIAL_TOKENS = (
    *CHATGLM2_SPECIAL_TOKENS,
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
"""ChatGLM3 adds the role tokens after ChatGLM2's."""
BAICHUAN_MARKERS = ("<reserved_102>", "<reserved_103>", "<reserved_106>", "<reserved_107>")
"""Pieces of Baichuan's SentencePiece model its chat formats use as role markers."""

# The published Baichuan-13B / Baichuan2-13B shape; their configs have no max_position_embeddings.
_BAICHUAN_13B_SHAPE = (5120, 40)


@dataclass(frozen=True)
class SourceLayout:
    """An original (remote-code) checkpoint layout lorafleet converts."""

    name: str
    """``baichuan2``, ``baichuan``, ``chatglm3`` or ``chatglm2``."""
    family: str
    """The ``lorafleet.families`` family of the converted model."""
    native_model_type: str
    """transformers ``model_type`` it converts to: ``llama`` or ``glm``."""


LAYOUTS: dict[str, SourceLayout] = {
    "baichuan2": SourceLayout("baichuan2", "baichuan2", "llama"),
    "baichuan": SourceLayout("baichuan", "baichuan", "llama"),
    "chatglm3": SourceLayout("chatglm3", "chatglm3", "glm"),
    "chatglm2": SourceLayout("chatglm2", "chatglm2", "glm"),
}
"""Every convertible layout by name."""


# ---------------------------------------------------------------------------------------------
# Detection


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a directory; empty when missing or not a JSON object."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def detect_source_layout(model_dir: str | Path) -> SourceLayout | None:
    """The original layout of a local checkpoint, or None when it is not a Baichuan / ChatGLM one.

    Baichuan2 is told from Baichuan-1 by its config's ``z_loss_weight`` (only Baichuan2 configs have
    it), its 125,696-token vocabulary, or a ``baichuan2`` name; ChatGLM3 from ChatGLM2 by its role
    tokens in the tokenizer files or a ``chatglm3`` name.

    Raises:
        ModelLoadError: a Baichuan / ChatGLM checkpoint no native architecture computes exactly
            (ALiBi 13B models, ChatGLM-6B v1, ChatGLM configs off Glm's equations); the message
            names the alternative.
    """
    config = read_config(model_dir)
    model_type = config.get("model_type")
    if model_type == "baichuan":
        _refuse_alibi(model_dir, config)
        names = f"{model_dir} {config.get('_name_or_path', '')}".lower()
        is_v2 = "z_loss_weight" in config or config.get("vocab_size") == 125696 or "baichuan2" in names
        return LAYOUTS["baichuan2" if is_v2 else "baichuan"]
    if model_type == "chatglm":
        _refuse_chatglm_variant(model_dir, config)
        from lorafleet.families import detect_family

        family = detect_family(_AttrDict(config), str(model_dir))
        return LAYOUTS["chatglm3" if family.name == "chatglm3" else "chatglm2"]
    return None


class _AttrDict(dict[str, Any]):
    """A config dict readable as attributes, as ``detect_family`` reads configs."""

    def __getattr__(self, key: str) -> Any:
        return self.get(key)


def _refuse_alibi(model_dir: str | Path, config: dict[str, Any]) -> None:
    shape = (config.get("hidden_size"), config.get("num_hidden_layers"))
    if "max_position_embeddings" in config and shape != _BAICHUAN_13B_SHAPE:
        return
    raise ModelLoadError(
        f"{str(model_dir)!r} is a Baichuan-13B / Baichuan2-13B checkpoint (hidden_size={shape[0]}, "
        f"num_hidden_layers={shape[1]}, no max_position_embeddings): it uses ALiBi attention in a "
        "RMSNorm/SwiGLU decoder, which no native transformers architecture computes (Bloom, MPT and "
        "Falcon's ALiBi come with LayerNorm and GELU), so lorafleet does not convert it. Use "
        "Baichuan2-7B (converted to Llama), or set model.trust_remote_code=true to run the "
        "checkpoint's own modelling code if you trust it"
    )


def _refuse_chatglm_variant(model_dir: str | Path, config: dict[str, Any]) -> None:
    if "position_encoding_2d" in config or "ffn_hidden_size" not in config:
        raise ModelLoadError(
            f"{str(model_dir)!r} is a ChatGLM-6B (v1) checkpoint: its 2-D position encoding has no "
            "native transformers architecture. Use ChatGLM2-6B or ChatGLM3-6B (converted to Glm), or "
            "set model.trust_remote_code=true to run the checkpoint's own code if you trust it"
        )
    # Each switch moves the equations off transformers' Glm; the value Glm computes is on the right.
    required = {
        "rmsnorm": True,
        "apply_residual_connection_post_layernorm": False,
        "post_layer_norm": True,
        "add_bias_linear": False,
        "original_rope": True,
    }
    problems = [
        f"{key}={config[key]!r} (Glm computes {key}={want!r})"
        for key, want in required.items()
        if key in config and config[key] != want
    ]
    if config.get("pre_seq_len") is not None:
        problems.append(f"pre_seq_len={config['pre_seq_len']!r} (a P-tuning v2 prefix, not a base model)")
    if config.get("quantization_bit"):
        problems.append(
            f"quantization_bit={config['quantization_bit']!r} (weights quantized by its own code)"
        )
    if problems:
        raise ModelLoadError(
            f"{str(model_dir)!r}: this ChatGLM config does not match the native Glm architecture: "
            + "; ".join(problems)
            + ". Use the published ChatGLM2/3-6B config, or set model.trust_remote_code=true to run "
            "the checkpoint's own code if you trust it"
        )


# ---------------------------------------------------------------------------------------------
# Configs


def native_config(layout: SourceLayout, config: dict[str, Any]) -> Any:
    """The transformers config of the native model equal to an original config.

    Raises:
        ModelLoadError: a field the conversion needs is missing or not a positive integer.
    """
    from transformers import GlmConfig, LlamaConfig

    marker = {"layout": layout.name, "family": layout.family}
    if layout.native_model_type == "llama":
        hidden, heads = _int_field(config, "hidden_size"), _int_field(config, "num_attention_heads")
        llama = LlamaConfig(
            vocab_size=_int_field(config, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int_field(config, "intermediate_size"),
            num_hidden_layers=_int_field(config, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=heads,
            hidden_act=config.get("hidden_act", "silu"),
            max_position_embeddings=_int_field(config, "max_position_embeddings"),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            bos_token_id=config.get("bos_token_id", 1),
            eos_token_id=config.get("eos_token_id", 2),
            pad_token_id=config.get("pad_token_id", 0),
        )
        setattr(llama, SOURCE_KEY, marker)  # read back by families.detect_family
        return llama
    heads = _int_field(config, "num_attention_heads")
    groups = _int_field(config, "multi_query_group_num") if config.get("multi_query_attention") else heads
    head_dim = config.get("kv_channels") or _int_field(config, "hidden_size") // heads
    glm = GlmConfig(
        vocab_size=_int_field(config, "padded_vocab_size"),
        hidden_size=_int_field(config, "hidden_size"),
        intermediate_size=_int_field(config, "ffn_hidden_size"),
        num_hidden_layers=_int_field(config, "num_layers"),
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=int(head_dim),
        hidden_act="silu",
        max_position_embeddings=_int_field(config, "seq_length"),
        rms_norm_eps=float(config.get("layernorm_epsilon", 1e-5)),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * float(config.get("rope_ratio", 1.0)),
            "partial_rotary_factor": 0.5,
        },
        attention_bias=bool(config.get("add_qkv_bias", True)),
        tie_word_embeddings=False,
        pad_token_id=config.get("pad_token_id", 0),
        eos_token_id=config.get("eos_token_id", 2),
        bos_token_id=config.get("bos_token_id"),
    )
    setattr(glm, SOURCE_KEY, marker)  # read back by families.detect_family
    return glm


def _int_field(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(f"config.json field {key!r} must be a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# State dicts


def convert_tensor(
    layout: SourceLayout, config: dict[str, Any], key: str, tensor: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The native tensors one original tensor becomes (none for buffers the native model rebuilds).

    Baichuan: ``W_pack`` [3h, h] -> q/k/v [h, h] each; Baichuan2's ``lm_head`` rows normalised.
    ChatGLM: ``query_key_value`` [(heads + 2*groups)*d, h] (and its bias) -> q [heads*d, h],
    k and v [groups*d, h]; other keys renamed.

    Raises:
        ModelLoadError: a key the layout does not have, or a fused tensor of the wrong size.
    """
    if layout.native_model_type == "llama":
        return _baichuan_tensor(layout, config, key, tensor)
    return _chatglm_tensor(config, key, tensor)


def _baichuan_tensor(
    layout: SourceLayout, config: dict[str, Any], key: str, tensor: torch.Tensor
) -> dict[str, torch.Tensor]:
    if key.endswith(".self_attn.W_pack.weight"):
        hidden = _int_field(config, "hidden_size")
        if tensor.shape[0] != 3 * hidden:
            raise ModelLoadError(
                f"{key}: expected {3 * hidden} rows (3 x hidden_size), got {tuple(tensor.shape)}"
            )
        stem = key[: -len("W_pack.weight")]
        q, k, v = tensor.split(hidden, dim=0)
        return {f"{stem}q_proj.weight": q, f"{stem}k_proj.weight": k, f"{stem}v_proj.weight": v}
    if key == "lm_head.weight" and layout.name == "baichuan2":
        # NormHead: logits = h @ normalize(W).T; normalising in fp32 then casting back.
        normed = torch.nn.functional.normalize(tensor.float(), dim=1)
        return {key: normed.to(tensor.dtype)}
    if key.endswith("rotary_emb.inv_freq"):
        return {}
    return {key: tensor}


_CHATGLM_RENAMES = (
    ("transformer.embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    ("transformer.encoder.final_layernorm.weight", "model.norm.weight"),
    ("transformer.output_layer.weight", "lm_head.weight"),
)
_CHATGLM_LAYER_RENAMES = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    ("self_attention.dense.weight", "self_attn.o_proj.weight"),
    ("mlp.dense_h_to_4h.weight", "mlp.gate_up_proj.weight"),
    ("mlp.dense_4h_to_h.weight", "mlp.down_proj.weight"),
)
_CHATGLM_LAYER_PREFIX = "transformer.encoder.layers."


def _chatglm_tensor(config: dict[str, Any], key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    for old, new in _CHATGLM_RENAMES:
        if key == old:
            return {new: tensor}
    if key == "transformer.rotary_pos_emb.inv_freq":
        return {}  # Glm rebuilds it from rope_theta and partial_rotary_factor
    if key.startswith(_CHATGLM_LAYER_PREFIX):
        index, _, rest = key[len(_CHATGLM_LAYER_PREFIX) :].partition(".")
        stem = f"model.layers.{index}."
        for old, new in _CHATGLM_LAYER_RENAMES:
            if rest == old:
                return {stem + new: tensor}
        if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = tensor.split(chatglm_qkv_sizes(config), dim=0)
            return {f"{stem}self_attn.{n}_proj.{kind}": t for n, t in (("q", q), ("k", k), ("v", v))}
    raise ModelLoadError(f"unexpected tensor {key!r} in a ChatGLM checkpoint (shape {tuple(tensor.shape)})")


def chatglm_qkv_sizes(config: dict[str, Any]) -> list[int]:
    """Rows of q, k and v in ChatGLM's fused ``query_key_value``: heads*d, groups*d, groups*d."""
    heads = _int_field(config, "num_attention_heads")
    groups = _int_field(config, "multi_query_group_num") if config.get("multi_query_attention") else heads
    head_dim = int(config.get("kv_channels") or _int_field(config, "hidden_size") // heads)
    return [heads * head_dim, groups * head_dim, groups * head_dim]


def _weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight shards: safetensors when present, else PyTorch ``.bin`` files."""
    safetensors = sorted(model_dir.glob("*.safetensors"))
    if safetensors:
        return safetensors
    bins = sorted(p for p in model_dir.glob("*.bin") if p.name != "training_args.bin")
    if not bins:
        raise ModelLoadError(f"{str(model_dir)!r} holds no *.safetensors or *.bin weight files")
    return bins


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only: a .bin is a pickle; never run code from it.
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ModelLoadError(f"{str(path)!r} does not hold a state dict")
    return state


def iter_native_shards(model_dir: str | Path, layout: SourceLayout) -> Iterator[dict[str, torch.Tensor]]:
    """The converted state dict, one source shard at a time (peak memory: about two shards)."""
    root = Path(model_dir)
    config = read_config(root)
    for path in _weight_files(root):
        out: dict[str, torch.Tensor] = {}
        for key, tensor in _read_shard(path).items():
            for new_key, new_tensor in convert_tensor(layout, config, key, tensor).items():
                out[new_key] = new_tensor.contiguous()
        yield out


# ---------------------------------------------------------------------------------------------
# Tokenizer


def native_tokenizer(model_dir: str | Path, layout: SourceLayout) -> Any:
    """A transformers fast tokenizer equal to the checkpoint's SentencePiece model.

    transformers' converter turns ``tokenizer.model`` into a tokenizers BPE with byte fallback
    (``LlamaTokenizer``); the dummy prefix follows the model's own ``add_dummy_prefix``. ChatGLM's
    special tokens are appended at ids ``n_pieces + i`` as its tokenizer code numbers them. The
    ``[gMASK]sop`` prefix comes from the chatglm2 / chatglm3 prompt templates, which write it.

    Raises:
        ModelLoadError: no ``tokenizer.model`` in the directory.
    """
    from tokenizers import decoders, normalizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    root = Path(model_dir)
    if not (root / "tokenizer.model").is_file():
        raise ModelLoadError(f"{str(root)!r} has no tokenizer.model (the SentencePiece model to convert)")
    proto = _sentencepiece_proto(root / "tokenizer.model")
    # transformers' converter gives the pieces and merges as a byte-fallback BPE. The text handling
    # is set here to SentencePiece's own: spaces become "▁", and with add_dummy_prefix (ChatGLM) one
    # "▁" goes before every run of text between special tokens, even one that starts with a space
    # (the Metaspace pre-tokenizer would skip that one). Baichuan has no dummy prefix.
    converted = LlamaTokenizer.from_pretrained(str(root), clean_up_tokenization_spaces=False)
    backend = converted.backend_tokenizer
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    else:
        backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence(steps)
    backend.post_processor = None
    # A plain fast tokenizer: a reload reads tokenizer.json as written instead of rebuilding it.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=converted.bos_token,
        eos_token=converted.eos_token,
        unk_token=converted.unk_token,
        pad_token=converted.unk_token,
        clean_up_tokenization_spaces=False,
    )
    pieces = [p.piece for p in proto.pieces]
    if layout.native_model_type == "glm":
        special = CHATGLM3_SPECIAL_TOKENS if layout.name == "chatglm3" else CHATGLM2_SPECIAL_TOKENS
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
        expected = list(range(len(pieces), len(pieces) + len(special)))
        if tokenizer.convert_tokens_to_ids(list(special)) != expected:
            raise ModelLoadError(f"{str(root)!r}: ChatGLM special tokens did not land at ids {expected}")
    else:
        markers = [m for m in BAICHUAN_MARKERS if m in pieces]
        tokenizer.add_special_tokens({"additional_special_tokens": markers})
    return tokenizer


def _sentencepiece_proto(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto: Any = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    proto.ParseFromString(path.read_bytes())
    return proto


# ---------------------------------------------------------------------------------------------
# Whole checkpoints


def convert_checkpoint(src: str | Path, out: str | Path, *, dtype: str | None = None) -> Path:
    """Write the native checkpoint of an original Baichuan / ChatGLM directory to ``out``.

    Writes ``config.json`` (native, with a ``lorafleet_source`` record), ``model-*.safetensors``
    (one per source shard) and their index, the tokenizer, and ``lorafleet_convert.json``; into a
    temporary sibling renamed into place, so ``out`` is either absent or complete.

    Args:
        src: the original checkpoint directory.
        out: where the native checkpoint goes; must not exist or be empty.
        dtype: ``fp32`` / ``bf16`` / ``fp16`` to cast the weights to; None keeps the stored dtype.

    Returns:
        ``out`` as a Path.

    Raises:
        ModelLoadError: not a Baichuan / ChatGLM checkpoint, a refused one, a malformed one, or
            ``out`` filled by another process before the rename.
    """
    from safetensors.torch import save_file

    source, target = Path(src).expanduser(), Path(out).expanduser()
    layout = detect_source_layout(source)
    if layout is None:
        model_type = read_config(source).get("model_type")
        raise ModelLoadError(
            f"{str(source)!r} (model_type={model_type!r}) is not a Baichuan or ChatGLM checkpoint; "
            f"lorafleet converts {sorted(LAYOUTS)}"
        )
    if target.exists() and any(target.iterdir()):
        raise ModelLoadError(f"convert output {str(target)!r} exists and is not empty")
    cast = _cast_dtype(dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config = native_config(layout, read_config(source))
        index: dict[str, str] = {}
        shards = list(iter_native_shards(source, layout))
        for number, shard in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            if cast is not None:
                shard = {k: v.to(cast) if v.is_floating_point() else v for k, v in shard.items()}
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, name))
        _check_complete(layout, config, index)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": index}, indent=2), encoding="utf-8"
        )
        if cast is not None:
            config.dtype = cast
        config.save_pretrained(str(tmp))
        native_tokenizer(source, layout).save_pretrained(str(tmp))
        record = {"source": str(source.resolve()), "layout": layout.name, "family": layout.family}
        (tmp / CONVERT_MANIFEST).write_text(json.dumps(record, indent=2), encoding="utf-8")
        try:
            if target.exists():
                target.rmdir()  # empty (checked above) unless another conversion just landed
            os.rename(tmp, target)
        except OSError as e:
            raise ModelLoadError(
                f"convert output {str(target)!r} was filled by another process while converting: {e}"
            ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cast_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    from lorafleet.models import torch_dtype

    return torch_dtype(dtype)


def _check_complete(layout: SourceLayout, config: Any, index: dict[str, str]) -> None:
    """Every parameter the native model has must have come out of the source."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    missing = sorted(set(model.state_dict()) - set(index))
    extra = sorted(set(index) - set(model.state_dict()))
    if missing or extra:
        raise ModelLoadError(
            f"converting a {layout.name} checkpoint left native tensors missing {missing[:5]} "
            f"and unexpected {extra[:5]}"
        )


def cache_root() -> Path:
    """Where load-time conversions are kept: ``$LORAFLEET_CONVERT_CACHE`` or ~/.cache/lorafleet/converted."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lorafleet" / "converted")


def native_checkpoint(src: str | Path) -> Path | None:
    """The native checkpoint directory for ``src``: converted once into the cache, reused after.

    The cache key is the source's content hash (``lorafleet.models.base_model_fingerprint``), so
    a changed source converts again and two paths to the same weights share one conversion.

    Returns:
        The converted directory, or None when ``src`` is not a Baichuan / ChatGLM layout.

    Raises:
        ModelLoadError: a refused or malformed Baichuan / ChatGLM checkpoint.
    """
    layout = detect_source_layout(src)
    if layout is None:
        return None
    from lorafleet.models import base_model_fingerprint

    digest = base_model_fingerprint(str(src), None)["sha256"]
    target = cache_root() / f"{layout.name}-{digest[:24]}"
    if (target / CONVERT_MANIFEST).is_file():
        return target
    try:
        return convert_checkpoint(src, target)
    except ModelLoadError:
        if (target / CONVERT_MANIFEST).is_file():  # another process converted it first
            return target
        raise


def main(argv: list[str] | None = None) -> int:
    """``lorafleet convert SRC OUT``: write the native checkpoint of a Baichuan / ChatGLM directory."""
    parser = argparse.ArgumentParser(
        prog="lorafleet convert",
        description="Convert a Baichuan2/Baichuan-7B or ChatGLM2/3 checkpoint to a native transformers one.",
    )
    parser.add_argument(
        "src", help="the original checkpoint directory (config.json with model_type baichuan/chatglm)"
    )
    parser.add_argument("out", help="output directory (must not exist or be empty)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast the weights")
    args = parser.parse_args(argv)
    layout = detect_source_layout(args.src)
    out = convert_checkpoint(args.src, args.out, dtype=args.dtype)
    assert layout is not None  # convert_checkpoint raised otherwise
    print(f"{layout.name} checkpoint {args.src} -> native {layout.native_model_type} at {out}")
    return 0
