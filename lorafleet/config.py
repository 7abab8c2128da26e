"""Run configuration: one dataclass per concern, loaded from YAML with ``key=value`` overrides.

A config file mirrors these dataclasses section by section::

    model: {name_or_path: .cache/tiny/llama, dtype: fp32}
    data: {train_file: data/train.jsonl, template: auto}
    method: lora
    lora: {rank: 16, alpha: 32}
    train: {max_steps: 100, learning_rate: 2.0e-3}

Overrides use dotted paths (``train.learning_rate=1e-4``, ``lora.target_modules=[q_proj,v_proj]``),
their values parsed as YAML scalars. A key must name one field exactly (lowercase ASCII
``section.field``); values and config files are YAML without anchors or aliases, nested at most
:data:`lorafleet.safe_yaml.MAX_YAML_DEPTH` deep, so a small input cannot expand into a large one. ``validate_config``
checks every field at once and raises one ``ConfigError`` naming each bad field and value: each
field's documented range, and for every field a hard bound (:data:`NUMERIC_BOUNDS`, finite floats,
bounded storable strings) that keeps any accepted config inside what the trainer API can carry.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafleet.config_checks import (
    DTYPES,
    FORMATS,
    LAUNCHERS,
    MAX_LIST_ITEM_CHARS,
    MAX_LIST_ITEMS,
    MAX_STRING_CHARS,
    NUMERIC_BOUNDS,
    PTUNING_MODES,
    QUANTIZATIONS,
    SCHEDULERS,
    STRING_LIMITS,
    validate_config,
)
from lorafleet.errors import ConfigError, FieldProblem
from lorafleet.safe_yaml import MAX_YAML_DEPTH, UnsafeYamlError, load_bounded_yaml


@dataclass
class ModelConfig:
    name_or_path: str = ".cache/tiny/llama"
    """Local directory or hub id of the base model."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ignored for local paths."""
    family: str = "auto"
    """Model family from the registry (llama, qwen2, ...); ``auto`` detects it from the config."""
    dtype: str = "fp32"
    """Weights and compute dtype: fp32, bf16 or fp16."""
    quantization: str = "none"
    """Load the base quantized: none, nf4 (4-bit NormalFloat, double quant) or int8."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (Baichuan, ChatGLM). Only when asked for."""
    attn_implementation: str | None = None
    """Attention kernel (sdpa, eager, flash_attention_2); None lets transformers choose."""


@dataclass
class DataConfig:
    train_file: str = ""
    """JSON or JSONL file of training samples."""
    validation_file: str | None = None
    """Optional JSON/JSONL file for eval loss and generation metrics."""
    validation_split: float = 0.0
    """Fraction of the training file held out for validation when no validation_file is given."""
    format: str = "auto"
    """alpaca (instruction/input/output), messages (multi-turn), columns (prompt/response_column)."""
    prompt_column: str = "input"
    """Prompt column for the ``columns`` format (PromptCBLUE uses ``input``)."""
    response_column: str = "target"
    """Response column for the ``columns`` format (PromptCBLUE uses ``target``)."""
    system_column: str | None = None
    """Optional column holding a per-sample system prompt (``columns`` format)."""
    template: str = "auto"
    """Prompt template; ``auto`` uses the family's default, ``tokenizer`` the tokenizer's own."""
    system: str | None = None
    """System prompt used when a sample has none; None keeps the template's default."""
    max_source_length: int = 256
    """Prompt tokens kept per turn (left part truncated beyond it)."""
    max_target_length: int = 256
    """Response tokens kept per turn (right part truncated beyond it)."""
    train_on_prompt: bool = False
    """Compute the loss on prompt tokens too."""
    mask_history: bool = False
    """Train only on the last assistant turn of multi-turn samples."""
    packing: bool = False
    """Pack samples into rows of ``packing_length`` tokens; attention stays within each sample."""
    packing_length: int = 1024
    """Row length when packing."""
    max_bad_fraction: float = 0.0
    """Refuse to train when more than this fraction of rows is invalid (0 = any bad row refuses)."""
    max_samples: int | None = None
    """Use at most this many training samples (after validation)."""


@dataclass
class LoraConfig:
    rank: int = 8
    """Rank of the LoRA update; memory grows linearly with it."""
    alpha: float = 16.0
    """Scaling numerator: the update is scaled by alpha / rank (alpha / sqrt(rank) with rsLoRA)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "auto"
    """Module names to adapt; ``auto`` = the family's default, ``all-linear`` = every linear but the head."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained fully and saved with the adapter (e.g. ``lm_head``, ``embed_tokens``)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA, arXiv:2402.09353)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(rank) (arXiv:2312.03732)."""


@dataclass
class FreezeConfig:
    trainable_layers: int = 2
    """Train the last N transformer blocks (ignored when trainable_modules is set)."""
    trainable_modules: list[str] = field(default_factory=list)
    """Name prefixes or substrings of the parameters to train, e.g. ``layers.27.``, ``layers.26.``."""
    train_embeddings: bool = False
    """Also train the input embeddings and the output head."""


@dataclass
class PtuningConfig:
    mode: str = "prefix"
    """``prefix``: P-tuning v2 / prefix tuning (deep prompts); ``p_tuning``: input-layer prompt encoder."""
    num_virtual_tokens: int = 16
    """Number of learned virtual tokens."""
    encoder_hidden_size: int = 128
    """Hidden size of the prompt encoder (p_tuning) or prefix projection (prefix, when enabled)."""
    prefix_projection: bool = False
    """Reparameterise prefixes through an MLP (P-tuning v2's option)."""


@dataclass
class PreferenceConfig:
    """Options of the preference stages (``stage: dpo | kto | rm``); ``lorafleet.preference`` has the math."""

    loss: str = "sigmoid"
    """dpo stage's loss: sigmoid (DPO), ipo, orpo or simpo (orpo and simpo need no reference)."""
    beta: float = 0.1
    """Temperature β: how far the policy may move from the reference (DPO/IPO/KTO), reward scale (ORPO/SimPO)."""
    gamma: float = 0.5
    """SimPO's target reward margin γ (only ``loss: simpo``)."""
    label_smoothing: float = 0.0
    """Probability ε that a pair's preference label is flipped (conservative DPO, SimPO); in [0, 0.5)."""
    desirable_weight: float = 1.0
    """KTO's weight λ_D on desirable rows."""
    undesirable_weight: float = 1.0
    """KTO's weight λ_U on undesirable rows."""
    sft_adapter: str = ""
    """Published adapter ``name@version`` to start from; its frozen copy is the reference policy."""
    precompute_reference: bool = False
    """full/freeze: score the data with the reference model once before training, then free it."""
    prompt_column: str = "prompt"
    """Prompt column of pairwise and KTO rows (or a ``messages`` list ending with a user turn)."""
    chosen_column: str = "chosen"
    """Preferred answer column of pairwise rows."""
    rejected_column: str = "rejected"
    """Dispreferred answer column of pairwise rows."""
    completion_column: str = "completion"
    """Answer column of KTO rows."""
    label_column: str = "label"
    """KTO rows' desirability column: true/false (or "desirable"/"undesirable")."""


@dataclass
class TrainConfig:
    epochs: float = 3.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 derives them from epochs."""
    per_device_batch_size: int = 8
    """Samples per micro-batch per process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 2.0e-4
    """Peak learning rate."""
    lr_scheduler: str = "cosine"
    """cosine, linear or constant (after warmup)."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming up linearly from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables it."""
    seed: int = 42
    """Seed for initialisation, shuffling and dropout."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    group_by_length: bool = True
    """Batch samples of similar length together to waste less compute on padding."""
    label_only_logits: bool = True
    """Run the output head only where a label is trained: the same loss, less compute and memory."""
    logging_steps: int = 5
    """Write a metrics record every N optimizer steps."""
    eval_steps: int = 0
    """Evaluate loss and perplexity every N steps (0 = only at the end)."""
    save_steps: int = 0
    """Write a resumable checkpoint every N steps (0 = none)."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints."""
    resume: str = "auto"
    """``auto`` resumes from the last complete checkpoint in the run dir, ``never`` starts over."""
    predict_with_generate: bool = True
    """At the end, generate on the validation set and report BLEU-4 / ROUGE / accuracy."""
    max_new_tokens: int = 64
    """Generation length cap for the final metrics."""
    max_eval_samples: int = 200
    """Validation samples used for generation metrics."""
    num_threads: int = 0
    """torch intra-op threads per process on CPU (0 = leave as is)."""


@dataclass
class DistributedConfig:
    deepspeed_stage: int = -1
    """ZeRO stage 0/1/2/3; -1 trains without DeepSpeed (plain PyTorch, DDP when several processes)."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON file; ``auto`` values are filled from the training arguments."""
    offload_optimizer: bool = False
    """ZeRO-2/3: keep optimizer state in CPU memory."""
    offload_param: bool = False
    """ZeRO-3: keep parameters in CPU memory."""
    launcher: str = "torchrun"
    """torchrun or deepspeed, when launched by ``lorafleet train``."""
    nproc_per_node: int = 1
    """Processes per node (one per GPU)."""
    nnodes: int = 1
    """Number of nodes."""
    node_rank: int = 0
    """This node's rank (from JOB_COMPLETION_INDEX on Kubernetes)."""
    master_addr: str = "127.0.0.1"
    """Address of rank 0."""
    master_port: int = 29500
    """Port of rank 0's rendezvous."""


@dataclass
class OutputConfig:
    run_dir: str = "runs/default"
    """Where checkpoints, records and the resolved config go."""
    adapters_root: str = ".cache/adapters"
    """The shared adapter volume: artifacts are published to <adapters_root>/<name>/<version>/."""
    adapter_name: str = ""
    """Name to publish under; empty = do not publish."""
    version: str = "auto"
    """Version to publish as; ``auto`` = the next integer version."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: str = "lora"
    """lora, qlora (nf4 base), lora8bit (int8 base), freeze, full, ptuning (``lorafleet.method_specs``)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    ptuning: PtuningConfig = field(default_factory=PtuningConfig)
    stage: str = "sft"
    """sft (supervised), dpo (pairwise preference), kto (unpaired preference), rm (reward model)."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MAX_OVERRIDES = 64
"""Overrides per config or job: more is a mistake or an attack, never a run."""
MAX_OVERRIDE_KEY_CHARS = 128
MAX_OVERRIDE_VALUE_CHARS = 4096
"""Characters of one override's YAML text; the longest legitimate value (a system prompt) fits."""
MAX_CONFIG_FILE_BYTES = 1024 * 1024
_KEY_RE = re.compile(r"[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*")


def _leaf_fields(cls: type, prefix: str = "") -> dict[str, str]:
    """Dotted path -> type text of every leaf field of a config dataclass."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        default = getattr(cls(), f.name)
        if dataclasses.is_dataclass(default):
            out.update(_leaf_fields(type(default), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = str(f.type)
    return out


_FIELD_TYPES = _leaf_fields(RunConfig)
OVERRIDE_KEYS = frozenset(_FIELD_TYPES)
"""Every key an override may name: the dotted path of each leaf field of :class:`RunConfig`."""
_SECTION_NAMES = frozenset(k.partition(".")[0] for k in OVERRIDE_KEYS if "." in k)
_MAX_ANY_INT = 2**63 - 1


def _key_label(key: str) -> str:
    """A key as an error's field name: itself when well-formed, else its repr, shortened."""
    text = key if _KEY_RE.fullmatch(key) and len(key) <= MAX_OVERRIDE_KEY_CHARS else repr(key)
    return text if len(text) <= 64 else text[:61] + "..."


def check_override_key(key: str) -> str | None:
    """What is wrong with an override key, or None when it names a field of the run config.

    The grammar is strict (lowercase ``section.field`` in ASCII, nothing else), so a key is
    compared with others, such as the server-owned ones, exactly as written: no spacing, case,
    look-alike or empty-segment spelling of a key can reach a field under another name.
    """
    if len(key) > MAX_OVERRIDE_KEY_CHARS or not _KEY_RE.fullmatch(key):
        return "must be a known section.field key: lowercase ASCII letters, digits and '_', one '.'"
    if key in OVERRIDE_KEYS:
        return None
    section, _, name = key.partition(".")
    fields = sorted(k.partition(".")[2] for k in OVERRIDE_KEYS if k.startswith(f"{section}."))
    if not fields:
        return f"unknown section; expected one of {sorted(_SECTION_NAMES)}"
    if not name:
        return f"must name a field of the section, e.g. {section}.{fields[0]}"
    return f"unknown field; expected one of {fields}"


def parse_override_value(key: str, raw: str) -> Any:
    """The value of one override, read as YAML; text that is not YAML stays text.

    Raises:
        ConfigError: the text is too long, or uses anchors, aliases or deep nesting.
    """
    if len(raw) > MAX_OVERRIDE_VALUE_CHARS:
        raise ConfigError(
            [FieldProblem(_key_label(key), raw, f"at most {MAX_OVERRIDE_VALUE_CHARS} characters")]
        )
    if raw == "":
        return ""
    try:
        return load_bounded_yaml(raw)
    except UnsafeYamlError as e:
        raise ConfigError([FieldProblem(_key_label(key), raw, str(e))]) from None
    except (yaml.YAMLError, ValueError):
        return raw  # e.g. ``a: b: c`` or a number too long to convert: the text itself


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(
            [FieldProblem(_key_label(item), item, "an override must look like section.key=value")]
        )
    key, raw = item.split("=", 1)
    problem = check_override_key(key)
    if problem is not None:
        raise ConfigError([FieldProblem(_key_label(key), raw, problem)])
    return key, parse_override_value(key, raw)


def set_override(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set the field ``key`` (checked by :func:`check_override_key`) of a config tree to ``value``."""
    node = tree
    *parents, name = key.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[name] = value


def apply_overrides(tree: dict[str, Any], items: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a config tree in place, each value read as YAML.

    The same syntax as ``lorafleet train CONFIG key=value ...``: ``lora.rank=16`` sets an int,
    ``lora.target_modules=[q_proj,v_proj]`` a list, ``model.name_or_path=`` an empty string.
    Keys must name a field exactly (:func:`check_override_key`), once each; values are YAML without
    anchors or aliases, at most :data:`MAX_OVERRIDE_VALUE_CHARS` characters.

    Returns:
        ``tree``, for chaining.

    Raises:
        ConfigError: every bad item, and too many items.
    """
    items = list(items)
    problems: list[FieldProblem] = []
    if len(items) > MAX_OVERRIDES:
        problems.append(FieldProblem("overrides", len(items), f"at most {MAX_OVERRIDES} overrides"))
        items = items[:MAX_OVERRIDES]
    seen: set[str] = set()
    for item in items:
        try:
            key, value = _parse_override(item)
        except ConfigError as e:
            problems += e.problems
            continue
        if key in seen:
            problems.append(FieldProblem(key, item, "given more than once"))
            continue
        seen.add(key)
        set_override(tree, key, value)
    if problems:
        raise ConfigError(problems)
    return tree


def _build(cls: type, data: Any, prefix: str, problems: list[FieldProblem]) -> Any:
    """Build dataclass ``cls`` from a mapping, recording unknown keys and wrong types as problems."""
    if not isinstance(data, dict):
        problems.append(FieldProblem(prefix or "<root>", data, "expected a mapping"))
        return cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            problems.append(FieldProblem(path, value, f"unknown field; expected one of {sorted(known)}"))
            continue
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value if value is not None else {}, path, problems)
        else:
            kwargs[key] = _coerce(value, default, known[key].type, path, problems)
    return cls(**kwargs)


def _short_int(value: int) -> str:
    """An integer too long to print (Python refuses over 4300 digits) described by its size."""
    return f"<integer of {value.bit_length()} bits>"


def _coerce(value: Any, default: Any, type_text: Any, path: str, problems: list[FieldProblem]) -> Any:
    """Accept a YAML value for a field whose default tells its type; ints are fine for floats."""
    text = str(type_text)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_ANY_INT:
        problems.append(FieldProblem(path, _short_int(value), "is far out of range"))
        return default
    if value is None:
        if "None" in text:
            return None
        problems.append(FieldProblem(path, value, "must not be empty"))
        return default
    if isinstance(default, bool) or text == "bool":
        if isinstance(value, bool):
            return value
        problems.append(FieldProblem(path, value, "must be true or false"))
        return default
    if text.startswith("float") or isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string; users write it that way all the time.
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(FieldProblem(path, value, "must be a number"))
        return default
    if text.startswith("int") or (isinstance(default, int) and "None" not in text):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(FieldProblem(path, value, "must be an integer"))
        return default
    if text.startswith("list[str] | str"):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",")] if "," in value else value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        problems.append(FieldProblem(path, value, "must be a string or a list of strings"))
        return default
    if text.startswith("list[str]"):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        problems.append(FieldProblem(path, value, "must be a list of strings"))
        return default
    if "int | None" in text:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(FieldProblem(path, value, "must be an integer or null"))
        return default
    if not isinstance(value, str):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        problems.append(FieldProblem(path, value, "must be a string"))
        return default
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config, apply ``key=value`` overrides, validate, and return the config.

    Raises:
        ConfigError: listing every unknown field, wrong type and invalid value.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([FieldProblem("config", str(path), "file not found")])
        if p.stat().st_size > MAX_CONFIG_FILE_BYTES:
            raise ConfigError(
                [FieldProblem("config", str(path), f"larger than {MAX_CONFIG_FILE_BYTES} bytes")]
            )
        try:
            loaded = load_bounded_yaml(p.read_text(encoding="utf-8"))
        except UnsafeYamlError as e:
            raise ConfigError([FieldProblem("config", str(path), str(e))]) from None
        except (yaml.YAMLError, ValueError) as e:
            raise ConfigError([FieldProblem("config", str(path), f"not valid YAML: {e}")]) from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([FieldProblem("config", str(path), "the top level must be a mapping")])
        tree = loaded or {}
    apply_overrides(tree, overrides or [])
    return config_from_dict(tree)


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a nested mapping."""
    problems: list[FieldProblem] = []
    config = _build(RunConfig, tree, "", problems)
    if problems:
        raise ConfigError(problems)
    validate_config(config)
    return config


__all__ = [
    "DTYPES",
    "FORMATS",
    "LAUNCHERS",
    "MAX_CONFIG_FILE_BYTES",
    "MAX_LIST_ITEMS",
    "MAX_LIST_ITEM_CHARS",
    "MAX_OVERRIDES",
    "MAX_OVERRIDE_KEY_CHARS",
    "MAX_OVERRIDE_VALUE_CHARS",
    "MAX_STRING_CHARS",
    "MAX_YAML_DEPTH",
    "NUMERIC_BOUNDS",
    "OVERRIDE_KEYS",
    "PTUNING_MODES",
    "QUANTIZATIONS",
    "SCHEDULERS",
    "STRING_LIMITS",
    "DataConfig",
    "DistributedConfig",
    "FreezeConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "PtuningConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "check_override_key",
    "config_from_dict",
    "load_config",
    "parse_override_value",
    "set_override",
    "validate_config",
]
