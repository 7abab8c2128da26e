"""Load base models and tokenizers, and inspect them: linear layers, LoRA targets, blocks, sizes.

``load_model`` / ``load_tokenizer`` take a ``ModelConfig`` and turn every failure into a
``ModelLoadError`` that says what to change. A 4-bit base gets bitsandbytes' CPU repack disabled right
after loading (see ``disable_bnb_cpu_repack``): without that, one eval-mode forward on a CPU with
avx512_bf16 silently corrupts the LoRA gradients of any training that follows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafleet.config import ModelConfig
from lorafleet.errors import ConfigError, FieldProblem, ModelLoadError
from lorafleet.families import ALL_LINEAR, SOURCE_CONFIG_KEY, Family, detect_family, get_family

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``model.dtype`` names and the torch dtypes they load as."""

OUTPUT_HEAD_NAMES = frozenset({"lm_head", "embed_out", "output_layer"})
"""Leaf names of output heads (LLaMA/Qwen, GPT-NeoX, ChatGLM); never LoRA targets by default."""

# Files whose bytes are the weights; training_args.bin is a pickle of arguments, not weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_NOT_WEIGHTS = frozenset({"training_args.bin"})
_FULL_HASH_LIMIT = 2 * 1024**3
# A transformer block's parameters start with "<container>.<index>."; the container name varies.
_LAYER_RE = re.compile(r"^((?:.+\.)?(?:layers|h|blocks|block|layer))\.(\d+)\.")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a ``model.dtype`` name.

    Raises:
        ConfigError: on ``model.dtype`` for unknown names.
    """
    if name not in DTYPES:
        raise ConfigError([FieldProblem("model.dtype", name, f"must be one of {list(DTYPES)}")])
    return DTYPES[name]


def resolve_family(cfg: ModelConfig, hf_config: Any) -> Family:
    """The family ``cfg.family`` names, or the detected one when it is ``auto``."""
    if cfg.family == "auto":
        return detect_family(hf_config, cfg.name_or_path)
    return get_family(cfg.family)


# ---------------------------------------------------------------------------------------------
# Where a model comes from, and whether it needs remote code


def _is_local(name_or_path: str) -> bool:
    """True for an existing directory; raises for missing paths and malformed hub ids."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model.name_or_path={name_or_path!r} is a file, not a model directory")
        return True
    looks_like_path = (
        name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    )
    if looks_like_path:
        raise ModelLoadError(
            f"model.name_or_path={name_or_path!r}: directory not found "
            "(for a local model give an existing directory; a hub id looks like 'namespace/name')"
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError as e:
        raise ModelLoadError(
            f"model.name_or_path={name_or_path!r} is neither an existing directory nor a well-formed "
            f"hub id: {e}"
        ) from e
    return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remote_code_reason(local_dir: Path, *, tokenizer: bool) -> str | None:
    """Why a local checkpoint needs its own Python code, or None if transformers has the classes."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = _read_json(local_dir / "config.json")
    model_type = config.get("model_type")
    if "auto_map" in config and model_type not in CONFIG_MAPPING:
        return f"its config.json has an auto_map and model_type {model_type!r} is not built into transformers"
    if tokenizer:
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        tok_config = _read_json(local_dir / "tokenizer_config.json")
        tok_class = tok_config.get("tokenizer_class")
        auto_map = tok_config.get("auto_map")
        if auto_map and isinstance(tok_class, str) and tokenizer_class_from_name(tok_class) is None:
            return f"its tokenizer class {tok_class!r} ships as code (tokenizer_config.json auto_map)"
    return None


def native_source(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` pointing at the native conversion of a local Baichuan / ChatGLM checkpoint, else ``cfg``.

    Baichuan2-7B / Baichuan-7B load as Llama and ChatGLM2/3-6B as Glm, converted once into
    ``lorafleet.convert.cache_root()`` (see ``lorafleet.convert``): their own modelling code never
    runs. A Baichuan / ChatGLM checkpoint no native architecture computes exactly (the ALiBi 13B
    models, ChatGLM-6B v1) loads only with ``model.trust_remote_code=true``, through its own code.

    Raises:
        ModelLoadError: such a checkpoint while ``model.trust_remote_code`` is false, naming the
            alternative; or a malformed Baichuan / ChatGLM checkpoint.
    """
    path = Path(cfg.name_or_path).expanduser()
    if not path.is_dir():
        return cfg
    from lorafleet.convert import native_checkpoint

    try:
        native = native_checkpoint(path)
    except ModelLoadError as e:
        if cfg.trust_remote_code:
            return cfg  # the explicit allow-list: the checkpoint's own code, as the user asked
        raise _unconvertible(cfg, path, e) from e
    return cfg if native is None else dataclasses.replace(cfg, name_or_path=str(native))


def _unconvertible(cfg: ModelConfig, path: Path, error: ModelLoadError) -> ModelLoadError:
    """``error`` (a refused Baichuan / ChatGLM layout), plus the remote-code way where it has one."""
    remote = _remote_code_reason(path, tokenizer=False)
    if remote is None:
        return error
    return ModelLoadError(f"{error.reason}. Otherwise: {_remote_code_message(cfg.name_or_path, remote)}")


def load_model_config(cfg: ModelConfig) -> Any:
    """The transformers config of the model ``load_model(cfg)`` builds, without reading any weights.

    For a local Baichuan / ChatGLM checkpoint this is the native Llama / Glm config computed from its
    ``config.json`` (``lorafleet.convert.native_config``, the config ``native_source`` loads): the
    checkpoint's own configuration code never runs and its weights are not converted, so a caller
    that needs only the architecture (the trainer's memory check on ``SubmitJob``) costs
    milliseconds even for a 7B checkpoint. Anything else goes through ``AutoConfig``.

    Raises:
        ModelLoadError: as ``native_source`` for a refused layout; a missing directory, a malformed
            hub id, or a config transformers cannot read (remote code included, unless allowed).
    """
    from transformers import AutoConfig

    local = _is_local(cfg.name_or_path)
    if local:
        from lorafleet.convert import detect_source_layout, native_config, read_config

        path = Path(cfg.name_or_path).expanduser()
        try:
            layout = detect_source_layout(path)
        except ModelLoadError as e:
            if not cfg.trust_remote_code:
                raise _unconvertible(cfg, path, e) from e
            layout = None
        if layout is not None:
            return native_config(layout, read_config(path))
    try:
        return AutoConfig.from_pretrained(cfg.name_or_path, **_source_kwargs(cfg, local))
    except Exception as e:
        raise _load_error("config", cfg, e) from e


def _refuse_remote_code(cfg: ModelConfig, local: bool, *, tokenizer: bool) -> None:
    if cfg.trust_remote_code or not local:
        return
    reason = _remote_code_reason(Path(cfg.name_or_path).expanduser(), tokenizer=tokenizer)
    if reason:
        raise ModelLoadError(_remote_code_message(cfg.name_or_path, reason))


def _remote_code_message(name_or_path: str, reason: str) -> str:
    return (
        f"{name_or_path!r} needs its own modelling code ({reason}); set model.trust_remote_code=true "
        "if you trust that code (Baichuan and ChatGLM checkpoints ship this way)"
    )


def _load_error(what: str, cfg: ModelConfig, e: Exception) -> ModelLoadError:
    text = str(e)
    if isinstance(e, ValueError) and "trust_remote_code" in text:
        return ModelLoadError(_remote_code_message(cfg.name_or_path, "the repository contains custom code"))
    return ModelLoadError(f"cannot load the {what} from {cfg.name_or_path!r}: {type(e).__name__}: {text}")


def _source_kwargs(cfg: ModelConfig, local: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if not local and cfg.revision:
        kwargs["revision"] = cfg.revision
    return kwargs


# ---------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(cfg: ModelConfig) -> Any:
    """Load the tokenizer of a base model and make sure it has a pad token.

    A missing pad token becomes the eos (else unk, else bos) token: adding a new token would add an
    embedding row the base was never trained with.

    Args:
        cfg: the ``model`` section of the run config.

    Returns:
        A transformers tokenizer.

    Raises:
        ModelLoadError: missing directory, malformed hub id, remote code needed while
            ``model.trust_remote_code`` is false, no usable pad token, or any load failure.
    """
    from transformers import AutoTokenizer

    local = _is_local(cfg.name_or_path)
    cfg = native_source(cfg)
    _refuse_remote_code(cfg, local, tokenizer=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, **_source_kwargs(cfg, local))
    except ModelLoadError:
        raise
    except Exception as e:
        raise _load_error("tokenizer", cfg, e) from e
    if tokenizer.pad_token is None:
        for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                break
        else:
            raise ModelLoadError(
                f"the tokenizer of {cfg.name_or_path!r} has no pad, eos, unk or bos token to pad with"
            )
    return tokenizer


def default_device_map() -> str | dict[str, str] | None:
    """Where a model goes when the caller does not say: this rank's GPU, else the CPU.

    Returns None under DeepSpeed ZeRO-3, which places (partitions) the weights itself.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return None
    if torch.cuda.is_available():
        return {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"}
    return "cpu"


def quantization_config(quantization: str, dtype: str = "bf16") -> Any:
    """The ``BitsAndBytesConfig`` for ``model.quantization``, or None for ``none``.

    nf4 is QLoRA's recipe: 4-bit NormalFloat, double quantization of the scales, bf16 compute
    (fp16 compute when the model dtype is fp16, for GPUs without bf16).
    """
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float16 if dtype == "fp16" else torch.bfloat16,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(
        [FieldProblem("model.quantization", quantization, "must be one of ['none', 'nf4', 'int8']")]
    )


def load_model(cfg: ModelConfig, *, for_training: bool, device_map: Any = None) -> Any:
    """Load a causal LM base model as ``cfg`` asks.

    Args:
        cfg: the ``model`` section of the run config (dtype, quantization, attention, remote code).
        for_training: turn the KV cache off (it only costs memory while training).
        device_map: passed to ``from_pretrained``; None picks ``default_device_map()``.

    Returns:
        The transformers model, with the bitsandbytes CPU repack disabled when it is 4-bit.

    Raises:
        ModelLoadError: missing directory, malformed hub id, remote code needed while
            ``model.trust_remote_code`` is false, or any load failure.
        ConfigError: unknown dtype or quantization.
    """
    from transformers import AutoModelForCausalLM

    local = _is_local(cfg.name_or_path)
    cfg = native_source(cfg)
    _refuse_remote_code(cfg, local, tokenizer=False)
    kwargs = _source_kwargs(cfg, local)
    kwargs["dtype"] = torch_dtype(cfg.dtype)
    quant = quantization_config(cfg.quantization, cfg.dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    placement = default_device_map() if device_map is None else device_map
    if placement is not None:
        kwargs["device_map"] = placement
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    except (ModelLoadError, ConfigError):
        raise
    except Exception as e:
        raise _load_error("model", cfg, e) from e
    if cfg.quantization == "nf4":
        patched = disable_bnb_cpu_repack(model)
        logger.debug("disabled the bitsandbytes CPU repack on %d Linear4bit modules", patched)
    if for_training:
        model.config.use_cache = False
    return model


def disable_bnb_cpu_repack(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference, and undo any repack done.

    bitsandbytes 0.50 ``Linear4bit.forward`` converts its weight in place to an AVX512-BF16 layout
    the first time it runs in eval mode without grad on a CPU that has avx512_bf16. Afterwards every
    matmul, training included, takes the inference-only kernel, and LoRA gradients come out None or
    wrong while the loss may still fall. Setting ``support_avx512bf16_for_cpu = False`` turns the
    conversion off; weights already converted are converted back with bitsandbytes' own inverse
    (the one its ``save`` and ``.cuda()`` use).

    Args:
        model: any module; bitsandbytes need not be installed.

    Returns:
        How many ``Linear4bit`` modules were patched (0 when there are none, or when this
        bitsandbytes has no such switch; that case is logged).
    """
    if "bitsandbytes" not in sys.modules:
        return 0  # nothing can be a Linear4bit if bitsandbytes was never imported
    import bitsandbytes as bnb

    patched = 0
    missing = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            missing += 1
            continue
        module.support_avx512bf16_for_cpu = False
        _unpack_cpu_weight(module)
        patched += 1
    if missing:
        logger.warning(
            "bitsandbytes %s: %d Linear4bit modules have no support_avx512bf16_for_cpu switch; "
            "check whether this version repacks weights on CPU inference",
            getattr(bnb, "__version__", "?"),
            missing,
        )
    return patched


def _unpack_cpu_weight(module: nn.Module) -> None:
    weight: Any = module.weight
    quant_state: Any = getattr(weight, "quant_state", None)
    if not getattr(quant_state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    # The inverse mutates and returns the same QuantState object, so module.quant_state stays valid.
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)


# ---------------------------------------------------------------------------------------------
# Inspection


def _linear_types() -> tuple[type[nn.Module], ...]:
    from transformers.pytorch_utils import Conv1D

    # bnb Linear4bit and Linear8bitLt subclass nn.Linear; GPT-2 style models use Conv1D.
    return (nn.Linear, Conv1D)


def _linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Qualified names and modules of the linear layers LoRA may adapt (not the head, not LoRA)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    found: list[tuple[str, nn.Module]] = []
    linear_types = _linear_types()
    for name, module in model.named_modules():
        if not isinstance(module, linear_types) or module is head:
            continue
        parts = name.split(".")
        if parts[-1] == "base_layer":
            # A PEFT-wrapped layer: the target is the wrapper's name (``...q_proj``).
            parts = parts[:-1]
        if parts[-1] in OUTPUT_HEAD_NAMES:
            continue
        # Layers PEFT itself added (lora_A, lora_B, modules_to_save copies) are not targets.
        if any(p.startswith("lora_") or p == "modules_to_save" for p in parts):
            continue
        found.append((".".join(parts), module))
    return found


def find_linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer except the output head, sorted and without repeats.

    Covers ``torch.nn.Linear``, bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` and transformers
    ``Conv1D``; skips ``lm_head`` / ``embed_out`` / ``output_layer`` and PEFT's own LoRA layers.
    """
    return sorted({name.rsplit(".", 1)[-1] for name, _ in _linear_modules(model)})


def resolve_lora_targets(model: nn.Module, family: Family, spec: list[str] | str) -> list[str]:
    """Turn ``lora.target_modules`` into the module names to give PEFT.

    Args:
        model: the loaded base model.
        family: its family; ``auto`` uses the family's targets.
        spec: ``auto``, ``all-linear`` or a list of module names (leaf names like ``q_proj``, or
            dotted suffixes like ``self_attn.q_proj``).

    Returns:
        The target names, sorted. For ``auto``: the family targets present in the model, or every
        linear layer if none of them is.

    Raises:
        ConfigError: on ``lora.target_modules`` when a given name matches no linear module; the
            message lists the linear modules that exist.
    """
    available = find_linear_module_names(model)
    if spec == "auto":
        if family.lora_targets == ALL_LINEAR:
            return available
        targets = family.lora_targets
        if family.converted_lora_targets and hasattr(getattr(model, "config", None), SOURCE_CONFIG_KEY):
            targets = family.converted_lora_targets  # a Baichuan / ChatGLM checkpoint converted to native
        present = [t for t in targets if t in available]
        if not present:
            logger.warning(
                "none of the %s family's LoRA targets %s is in this model; using all linear layers %s",
                family.name,
                list(family.lora_targets),
                available,
            )
            return available
        return sorted(present)
    if spec == ALL_LINEAR:
        return available
    names = [spec] if isinstance(spec, str) else list(spec)
    qualified = [name for name, _ in _linear_modules(model)]
    unmatched = [t for t in names if not any(q == t or q.endswith("." + t) for q in qualified)]
    if unmatched:
        raise ConfigError(
            [
                FieldProblem(
                    "lora.target_modules",
                    unmatched,
                    f"match no linear module of this model; its linear modules are {available}",
                )
            ]
        )
    return sorted(dict.fromkeys(names))


def find_layer_prefixes(model: nn.Module) -> list[str]:
    """Parameter-name prefixes of the transformer blocks, in layer order.

    Works from parameter names: ``model.layers.0.`` (LLaMA, Qwen2, Baichuan), ``gpt_neox.layers.0.``,
    ``transformer.h.0.`` (Falcon, BLOOM), ``transformer.encoder.layers.0.`` (ChatGLM). When several
    block stacks exist (a vision tower, say) the longest one is the language model's.
    """
    stacks: dict[str, set[int]] = {}
    for name, _ in model.named_parameters():
        match = _LAYER_RE.match(name)
        if match:
            stacks.setdefault(match.group(1), set()).add(int(match.group(2)))
    if not stacks:
        return []
    container = max(stacks, key=lambda c: len(stacks[c]))  # first seen wins a tie
    return [f"{container}.{i}." for i in sorted(stacks[container])]


def _real_numel(param: torch.Tensor) -> int:
    """Elements a parameter stands for; a 4-bit Params4bit packs two per stored byte."""
    if type(param).__name__ == "Params4bit":
        shape = getattr(getattr(param, "quant_state", None), "shape", None)
        if shape is not None:
            return math.prod(shape)
        return param.numel() * param.element_size() * 2
    return param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Total and trainable parameter counts, 4-bit packed weights counted at their real size.

    Returns:
        ``(total, trainable)``; tied weights count once.
    """
    total = trainable = 0
    for param in model.parameters():
        n = _real_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return total, trainable


def param_count_from_config(config: Any, *, trust_remote_code: bool = False) -> int:
    """Parameters of the causal LM a config describes, built on the meta device (no memory, no weights).

    Args:
        config: a transformers ``PretrainedConfig``.
        trust_remote_code: allow the config's own modelling code (``auto_map``).

    Returns:
        The parameter count, tied weights once.
    """
    from transformers import AutoModelForCausalLM

    # The meta device rather than accelerate's init_empty_weights: under transformers 5 the latter
    # leaves tied embeddings untied, counting them twice.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return count_parameters(model)[0]


# ---------------------------------------------------------------------------------------------
# Fingerprint


def base_model_fingerprint(name_or_path: str, revision: str | None) -> dict[str, Any]:
    """Identify a base model for an adapter manifest.

    A local directory is identified by a sha256 over ``config.json`` and every weight file: the full
    bytes when the weights total under 2 GiB (``hash_kind: full``), otherwise each file's size plus,
    for safetensors, its header (names, dtypes, shapes, offsets) (``hash_kind: headers``). A hub id
    is identified by id and revision. Compare two fingerprints with ``fingerprints_match``.

    Raises:
        ModelLoadError: a path that does not exist and is not a well-formed hub id.
    """
    if not _is_local(name_or_path):
        return {"kind": "hub", "id": name_or_path, "revision": revision}
    root = Path(name_or_path).expanduser().resolve()
    files = sorted(
        p
        for p in root.iterdir()
        if p.is_file()
        and (p.name == "config.json" or (p.suffix in _WEIGHT_SUFFIXES and p.name not in _NOT_WEIGHTS))
    )
    sizes = {p.name: p.stat().st_size for p in files}
    weight_bytes = sum(size for name, size in sizes.items() if name != "config.json")
    full = weight_bytes < _FULL_HASH_LIMIT
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{sizes[path.name]}\0".encode())
        if full or path.name == "config.json":
            _hash_file(digest, path)
        elif path.suffix == ".safetensors":
            digest.update(_safetensors_header(path))
    return {
        "kind": "local",
        "path": str(root),
        "sha256": digest.hexdigest(),
        "hash_kind": "full" if full else "headers",
        "files": sizes,
    }


def fingerprints_match(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two ``base_model_fingerprint`` results name the same weights (paths may differ)."""
    if a.get("kind") != b.get("kind"):
        return False
    if a.get("kind") == "hub":
        return a.get("id") == b.get("id") and a.get("revision") == b.get("revision")
    return a.get("sha256") == b.get("sha256") and a.get("hash_kind") == b.get("hash_kind")


def _hash_file(digest: Any, path: Path) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def _safetensors_header(path: Path) -> bytes:
    """The length prefix and JSON header of a safetensors file (its tensor table)."""
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return prefix
        (length,) = struct.unpack("<Q", prefix)
        return prefix + f.read(min(length, 100 * 1024 * 1024))
