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
:data:`MAX_YAML_DEPTH` deep, so a small input cannot expand into a large one. ``validate_config``
checks every field at once and raises one ``ConfigError`` naming each bad field and value: each
field's documented range, and for every field a hard bound (:data:`NUMERIC_BOUNDS`, finite floats,
bounded storable strings) that keeps any accepted config inside what the trainer API can carry.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafleet.errors import ConfigError, FieldProblem
from lorafleet.method_specs import (
    METHOD_SPECS,
    METHODS,
    TRAINS_BLOCKS,
    TRAINS_LORA,
    TRAINS_PROMPT,
    ZERO_STAGES,
)

DTYPES = ("fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "nf4", "int8")
SCHEDULERS = ("cosine", "linear", "constant")
LAUNCHERS = ("torchrun", "deepspeed")
FORMATS = ("auto", "alpaca", "messages", "columns")
PTUNING_MODES = ("prefix", "p_tuning")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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
MAX_YAML_DEPTH = 16
"""Nesting of YAML collections in an override value or config file; a run config needs 3."""
MAX_CONFIG_FILE_BYTES = 1024 * 1024
_KEY_RE = re.compile(r"[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*")


class _UnsafeYamlError(yaml.YAMLError):
    """YAML that could cost far more to load than its size: anchors, aliases, deep nesting."""


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses anchors and aliases and nests at most :data:`MAX_YAML_DEPTH` deep.

    Aliases let a few hundred bytes expand exponentially ("billion laughs"); deep nesting makes
    PyYAML's recursive composer overflow the stack. A run config needs neither.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _UnsafeYamlError("YAML anchors and aliases (&name, *name) are not accepted")
        if self._depth >= MAX_YAML_DEPTH:
            raise _UnsafeYamlError(f"YAML nested more than {MAX_YAML_DEPTH} levels deep is not accepted")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass


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
_INT32_MAX = 2**31 - 1
_MAX_STEPS = 10_000_000
_MAX_TOKENS = 262_144

NUMERIC_BOUNDS: dict[str, tuple[float, float]] = {
    "data.validation_split": (0.0, 1.0),
    "data.max_source_length": (1, _MAX_TOKENS),
    "data.max_target_length": (1, _MAX_TOKENS),
    "data.packing_length": (16, _MAX_TOKENS),
    "data.max_bad_fraction": (0.0, 1.0),
    "data.max_samples": (1, _INT32_MAX),
    "lora.rank": (1, 1024),
    "lora.alpha": (0.0, 100_000.0),
    "lora.dropout": (0.0, 1.0),
    "freeze.trainable_layers": (0, 4096),
    "ptuning.num_virtual_tokens": (1, 512),
    "ptuning.encoder_hidden_size": (1, 65_536),
    "train.epochs": (0.0, 1000.0),
    "train.max_steps": (0, _MAX_STEPS),
    "train.per_device_batch_size": (1, 4096),
    "train.gradient_accumulation_steps": (1, 4096),
    "train.learning_rate": (0.0, 1.0),
    "train.warmup_ratio": (0.0, 1.0),
    "train.weight_decay": (0.0, 100.0),
    "train.max_grad_norm": (0.0, 1e6),
    "train.seed": (0, _INT32_MAX),
    "train.logging_steps": (1, _MAX_STEPS),
    "train.eval_steps": (0, _MAX_STEPS),
    "train.save_steps": (0, _MAX_STEPS),
    "train.save_total_limit": (1, 1000),
    "train.max_new_tokens": (1, 4096),
    "train.max_eval_samples": (0, 1_000_000),
    "train.num_threads": (0, 1024),
    "distributed.deepspeed_stage": (-1, 3),
    "distributed.nproc_per_node": (1, 1024),
    "distributed.nnodes": (1, 4096),
    "distributed.node_rank": (0, 4095),
    "distributed.master_port": (1, 65_535),
}
"""Hard bounds of every numeric field, checked after the field's own (documented) checks: they catch
overflow (``epochs=1e9``, ``max_steps=2**31-1``) and keep every value inside what the trainer API's
proto fields carry (int32 at most), so an accepted config can always be stored and read back.
Floats must also be finite."""

MAX_STRING_CHARS = 4096
"""Characters of a string field (a path at most PATH_MAX) unless :data:`STRING_LIMITS` says less."""
STRING_LIMITS: dict[str, int] = {
    "model.revision": 256,
    "model.family": 64,
    "model.attn_implementation": 64,
    "data.prompt_column": 256,
    "data.response_column": 256,
    "data.system_column": 256,
    "data.system": 8192,
    "distributed.master_addr": 255,
}
MAX_LIST_ITEMS = 256
"""Entries of a list field (module names); each entry at most :data:`MAX_LIST_ITEM_CHARS`."""
MAX_LIST_ITEM_CHARS = 256


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
        return _load_yaml(raw)
    except _UnsafeYamlError as e:
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
            loaded = _load_yaml(p.read_text(encoding="utf-8"))
        except _UnsafeYamlError as e:
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


def _check(problems: list[FieldProblem], ok: bool, field_path: str, value: Any, message: str) -> None:
    """Record ``message`` for a field unless ``ok`` or the field already has a problem."""
    if not ok and all(p.field != field_path for p in problems):
        problems.append(FieldProblem(field_path, value, message))


def _leaf_values(c: RunConfig) -> dict[str, Any]:
    tree = c.to_dict()
    out: dict[str, Any] = {}
    for path in _FIELD_TYPES:
        section, _, name = path.rpartition(".")
        out[path] = tree[section][name] if section else tree[name]
    return out


def _storable(text: str) -> bool:
    """Text a store, a YAML file and a protobuf string can all carry: UTF-8 encodable, no NUL."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _check_storage(values: dict[str, Any], p: list[FieldProblem]) -> None:
    """Finite floats, and strings (lists of strings) of bounded size that can be stored as text."""
    for path, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            p.append(FieldProblem(path, value, "must be a finite number"))
        elif isinstance(value, str):
            limit = STRING_LIMITS.get(path, MAX_STRING_CHARS)
            if len(value) > limit:
                p.append(FieldProblem(path, value, f"at most {limit} characters"))
            elif not _storable(value):
                p.append(FieldProblem(path, value, "must be text without NUL characters or lone surrogates"))
        elif isinstance(value, list):
            if len(value) > MAX_LIST_ITEMS:
                p.append(FieldProblem(path, f"<{len(value)} items>", f"at most {MAX_LIST_ITEMS} items"))
            elif any(len(v) > MAX_LIST_ITEM_CHARS or not _storable(v) for v in value):
                message = f"each entry at most {MAX_LIST_ITEM_CHARS} characters of text, no NUL"
                p.append(FieldProblem(path, value, message))


def _number_text(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _check_bounds(values: dict[str, Any], p: list[FieldProblem]) -> None:
    for path, (low, high) in NUMERIC_BOUNDS.items():
        value = values[path]
        if value is not None:
            message = f"must be in [{_number_text(low)}, {_number_text(high)}]"
            _check(p, low <= value <= high, path, value, message)


def _is_path(path: str, kind: str) -> bool:
    """Whether ``path`` is an existing file or directory; False for names the OS refuses (too long)."""
    try:
        return Path(path).is_dir() if kind == "dir" else Path(path).is_file()
    except (OSError, ValueError):
        return False


def validate_config(c: RunConfig) -> None:
    """Check every field and their combinations; raise one ConfigError listing all problems.

    Storage checks come first (finite numbers, bounded storable text), each field's own checks next,
    the hard :data:`NUMERIC_BOUNDS` last; a field is reported once, by the first check it fails.
    """
    p: list[FieldProblem] = []
    values = _leaf_values(c)
    _check_storage(values, p)
    _check(p, c.method in METHODS, "method", c.method, f"must be one of {list(METHODS)}")
    m = c.model
    _check(p, bool(m.name_or_path.strip()), "model.name_or_path", m.name_or_path, "must not be empty")
    _check(p, m.dtype in DTYPES, "model.dtype", m.dtype, f"must be one of {list(DTYPES)}")
    _check(
        p,
        m.quantization in QUANTIZATIONS,
        "model.quantization",
        m.quantization,
        f"must be one of {list(QUANTIZATIONS)}",
    )
    _validate_data(c.data, p)
    _validate_methods(c, p)
    _validate_train(c.train, p)
    _validate_distributed(c, p)
    o = c.output
    _check(p, bool(o.run_dir.strip()), "output.run_dir", o.run_dir, "must not be empty")
    if o.adapter_name:
        _check(
            p,
            bool(_NAME_RE.fullmatch(o.adapter_name)) and ".." not in o.adapter_name,
            "output.adapter_name",
            o.adapter_name,
            "must be 1-64 characters of letters, digits, '.', '_', '-', start with a letter or digit, no '..'",
        )
    if o.version != "auto":
        _check(
            p,
            bool(re.fullmatch(r"[1-9][0-9]{0,9}", o.version)) and int(o.version) <= _INT32_MAX,
            "output.version",
            o.version,
            f"must be 'auto' or a positive integer up to {_INT32_MAX}",
        )
    _check_bounds(values, p)
    if p:
        raise ConfigError(p)


def _validate_data(d: DataConfig, p: list[FieldProblem]) -> None:
    _check(p, bool(d.train_file.strip()), "data.train_file", d.train_file, "must name a JSON or JSONL file")
    _check(p, d.format in FORMATS, "data.format", d.format, f"must be one of {list(FORMATS)}")
    _check(
        p, 0.0 <= d.validation_split < 1.0, "data.validation_split", d.validation_split, "must be in [0, 1)"
    )
    _check(p, d.max_source_length > 0, "data.max_source_length", d.max_source_length, "must be > 0")
    _check(p, d.max_target_length > 0, "data.max_target_length", d.max_target_length, "must be > 0")
    _check(
        p, 0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", d.max_bad_fraction, "must be in [0, 1]"
    )
    _check(p, d.packing_length >= 16, "data.packing_length", d.packing_length, "must be >= 16")
    if d.max_samples is not None:
        _check(p, d.max_samples > 0, "data.max_samples", d.max_samples, "must be > 0 or null")
    _check(p, bool(d.prompt_column), "data.prompt_column", d.prompt_column, "must not be empty")
    _check(p, bool(d.response_column), "data.response_column", d.response_column, "must not be empty")
    from lorafleet.templates import TEMPLATES

    known = ["auto", "tokenizer", *TEMPLATES]
    _check(p, d.template in known, "data.template", d.template, f"must be one of {known}")


def _validate_methods(c: RunConfig, p: list[FieldProblem]) -> None:
    """Check what the method's spec allows, then the options of its config section."""
    spec = METHOD_SPECS.get(c.method)
    if spec is None:
        return  # validate_config reported the unknown method
    own = spec.base_quantization
    why = (
        f"method {spec.name} loads the base in {own}; leave quantization as none or {own}"
        if own is not None
        else f"method {spec.name} trains unquantized weights; quantized bases need lora or qlora"
    )
    q = c.model.quantization
    _check(p, spec.accepts_quantization(q), "model.quantization", q, why)
    stage = c.distributed.deepspeed_stage
    _check(
        p,
        stage not in ZERO_STAGES or stage in spec.deepspeed_stages,
        "distributed.deepspeed_stage",
        stage,
        f"{spec.name} does not support ZeRO-{stage} ({spec.deepspeed_reason})",
    )
    if own is not None:
        _check(
            p,
            stage != 3 or c.model.dtype != "fp32",
            "model.dtype",
            c.model.dtype,
            "ZeRO-3 with a quantized base needs bf16 or fp16 storage",
        )
    if spec.options_section is not None:
        _OPTION_CHECKS[spec.options_section](c, p)


def _validate_lora(c: RunConfig, p: list[FieldProblem]) -> None:
    lo = c.lora
    _check(p, 1 <= lo.rank <= 1024, "lora.rank", lo.rank, "must be in [1, 1024]")
    _check(p, lo.alpha > 0, "lora.alpha", lo.alpha, "must be > 0")
    _check(p, 0.0 <= lo.dropout < 1.0, "lora.dropout", lo.dropout, "must be in [0, 1)")
    if isinstance(lo.target_modules, list):
        _check(
            p,
            len(lo.target_modules) > 0,
            "lora.target_modules",
            lo.target_modules,
            "must list at least one module, or be 'auto' / 'all-linear'",
        )
    else:
        _check(
            p,
            lo.target_modules in ("auto", "all-linear"),
            "lora.target_modules",
            lo.target_modules,
            "must be 'auto', 'all-linear' or a list of module names",
        )


def _validate_freeze(c: RunConfig, p: list[FieldProblem]) -> None:
    f = c.freeze
    _check(
        p,
        f.trainable_layers >= 1 or bool(f.trainable_modules),
        "freeze.trainable_layers",
        f.trainable_layers,
        "must be >= 1 unless freeze.trainable_modules is set",
    )


def _validate_ptuning(c: RunConfig, p: list[FieldProblem]) -> None:
    pt = c.ptuning
    _check(p, pt.mode in PTUNING_MODES, "ptuning.mode", pt.mode, f"must be one of {list(PTUNING_MODES)}")
    _check(
        p,
        1 <= pt.num_virtual_tokens <= 512,
        "ptuning.num_virtual_tokens",
        pt.num_virtual_tokens,
        "must be in [1, 512]",
    )
    _check(
        p,
        pt.encoder_hidden_size >= 1,
        "ptuning.encoder_hidden_size",
        pt.encoder_hidden_size,
        "must be >= 1",
    )


_OPTION_CHECKS = {
    TRAINS_LORA: _validate_lora,
    TRAINS_BLOCKS: _validate_freeze,
    TRAINS_PROMPT: _validate_ptuning,
}
"""The checks of each method-options section (``MethodSpec.options_section``)."""


def _validate_train(t: TrainConfig, p: list[FieldProblem]) -> None:
    _check(p, t.epochs > 0 or t.max_steps > 0, "train.epochs", t.epochs, "must be > 0 when max_steps is 0")
    _check(p, t.max_steps >= 0, "train.max_steps", t.max_steps, "must be >= 0")
    _check(
        p,
        1 <= t.per_device_batch_size <= 4096,
        "train.per_device_batch_size",
        t.per_device_batch_size,
        "must be in [1, 4096]",
    )
    _check(
        p,
        t.gradient_accumulation_steps >= 1,
        "train.gradient_accumulation_steps",
        t.gradient_accumulation_steps,
        "must be >= 1",
    )
    _check(p, 0 < t.learning_rate < 1, "train.learning_rate", t.learning_rate, "must be in (0, 1)")
    _check(
        p,
        t.lr_scheduler in SCHEDULERS,
        "train.lr_scheduler",
        t.lr_scheduler,
        f"must be one of {list(SCHEDULERS)}",
    )
    _check(p, 0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", t.warmup_ratio, "must be in [0, 1)")
    _check(p, t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    _check(p, t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, "must be >= 0")
    _check(p, t.logging_steps >= 1, "train.logging_steps", t.logging_steps, "must be >= 1")
    _check(p, t.eval_steps >= 0, "train.eval_steps", t.eval_steps, "must be >= 0")
    _check(p, t.save_steps >= 0, "train.save_steps", t.save_steps, "must be >= 0")
    _check(p, t.save_total_limit >= 1, "train.save_total_limit", t.save_total_limit, "must be >= 1")
    _check(
        p,
        t.resume in ("auto", "never") or _is_path(t.resume, "dir"),
        "train.resume",
        t.resume,
        "must be 'auto', 'never' or an existing checkpoint directory",
    )
    _check(p, 1 <= t.max_new_tokens <= 4096, "train.max_new_tokens", t.max_new_tokens, "must be in [1, 4096]")
    _check(p, t.max_eval_samples >= 0, "train.max_eval_samples", t.max_eval_samples, "must be >= 0")
    _check(p, t.num_threads >= 0, "train.num_threads", t.num_threads, "must be >= 0")


def _validate_distributed(c: RunConfig, p: list[FieldProblem]) -> None:
    d = c.distributed
    _check(
        p,
        d.deepspeed_stage in ZERO_STAGES,
        "distributed.deepspeed_stage",
        d.deepspeed_stage,
        "must be -1 (no DeepSpeed) or a ZeRO stage 0, 1, 2, 3",
    )
    _check(
        p, d.launcher in LAUNCHERS, "distributed.launcher", d.launcher, f"must be one of {list(LAUNCHERS)}"
    )
    _check(p, d.nproc_per_node >= 1, "distributed.nproc_per_node", d.nproc_per_node, "must be >= 1")
    _check(p, d.nnodes >= 1, "distributed.nnodes", d.nnodes, "must be >= 1")
    _check(
        p, 0 <= d.node_rank < max(d.nnodes, 1), "distributed.node_rank", d.node_rank, "must be in [0, nnodes)"
    )
    _check(p, 1 <= d.master_port <= 65535, "distributed.master_port", d.master_port, "must be a TCP port")
    if d.offload_optimizer:
        _check(
            p,
            d.deepspeed_stage in (1, 2, 3),
            "distributed.offload_optimizer",
            d.offload_optimizer,
            "needs ZeRO stage 1, 2 or 3",
        )
    if d.offload_param:
        _check(p, d.deepspeed_stage == 3, "distributed.offload_param", d.offload_param, "needs ZeRO stage 3")
    if d.deepspeed_config:
        _check(
            p,
            _is_path(d.deepspeed_config, "file"),
            "distributed.deepspeed_config",
            d.deepspeed_config,
            "file not found",
        )
