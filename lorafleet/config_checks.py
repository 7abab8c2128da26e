"""The checks of a run config: each field's documented range, the combinations a method allows, and
hard bounds on every field so that any accepted config can be stored and carried by the trainer API.

``validate_config`` runs them all and raises one ``ConfigError`` naming each bad field and value.
Storage checks come first (finite numbers, bounded storable text), each field's own checks next,
the hard :data:`NUMERIC_BOUNDS` last; a field is reported once, by the first check it fails.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.adapters import MAX_VERSION
from lorafleet.errors import ConfigError, FieldProblem
from lorafleet.method_specs import (
    ARTIFACT_FULL_MODEL,
    METHOD_SPECS,
    METHODS,
    PREFERENCE_STAGES,
    STAGES,
    TRAINS_BLOCKS,
    TRAINS_LORA,
    TRAINS_PROMPT,
    ZERO_STAGES,
)

if TYPE_CHECKING:
    from lorafleet.config import DataConfig, RunConfig, TrainConfig

DTYPES = ("fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "nf4", "int8")
SCHEDULERS = ("cosine", "linear", "constant")
LAUNCHERS = ("torchrun", "deepspeed")
FORMATS = ("auto", "alpaca", "messages", "columns")
PTUNING_MODES = ("prefix", "p_tuning")
PREFERENCE_LOSSES = ("sigmoid", "ipo", "orpo", "simpo")
_REFERENCE_FREE_LOSSES = ("orpo", "simpo")  # lorafleet.preference.REFERENCE_FREE_LOSSES (no torch here)
_ADAPTER_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}@[1-9][0-9]{0,9}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
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
    "lora.rank": (0, 1024),
    "lora.alpha": (0.0, 100_000.0),
    "lora.dropout": (0.0, 1.0),
    "freeze.trainable_layers": (0, 4096),
    "ptuning.num_virtual_tokens": (0, 512),
    "ptuning.encoder_hidden_size": (0, 65_536),
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
    "preference.beta": (0.0, 1000.0),
    "preference.gamma": (0.0, 1000.0),
    "preference.label_smoothing": (0.0, 0.5),
    "preference.desirable_weight": (0.0, 1000.0),
    "preference.undesirable_weight": (0.0, 1000.0),
    "distributed.deepspeed_stage": (-1, 3),
    "distributed.nproc_per_node": (1, 1024),
    "distributed.nnodes": (1, 4096),
    "distributed.node_rank": (0, 4095),
    "distributed.master_port": (1, 65_535),
}
"""Hard bounds of every numeric field, checked after the field's own (documented) checks: they catch
overflow (``epochs=1e9``, ``max_steps=2**31-1``) and keep every value inside what the trainer API's
proto fields carry (int32 at most), so an accepted config can always be stored and read back.
Floats must also be finite. They apply to every section, also the options sections the method does
not use, whose own checks run only for their method (hence lower bounds of 0 there)."""

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
    "preference.sft_adapter": 128,
    "preference.prompt_column": 256,
    "preference.chosen_column": 256,
    "preference.rejected_column": 256,
    "preference.completion_column": 256,
    "preference.label_column": 256,
    "distributed.master_addr": 255,
}
MAX_LIST_ITEMS = 256
"""Entries of a list field (module names); each entry at most :data:`MAX_LIST_ITEM_CHARS`."""
MAX_LIST_ITEM_CHARS = 256


def _check(problems: list[FieldProblem], ok: bool, field_path: str, value: Any, message: str) -> None:
    """Record ``message`` for a field unless ``ok`` or the field already has a problem."""
    if not ok and all(p.field != field_path for p in problems):
        problems.append(FieldProblem(field_path, value, message))


def _leaf_values(c: RunConfig) -> dict[str, Any]:
    """Dotted path -> value of every leaf field (sections are the dict-valued top-level entries)."""
    out: dict[str, Any] = {}
    for key, value in c.to_dict().items():
        if isinstance(value, dict):
            out.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            out[key] = value
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
    _validate_stage(c, p)
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
            bool(re.fullmatch(r"[1-9][0-9]{0,9}", o.version)) and int(o.version) <= MAX_VERSION,
            "output.version",
            o.version,
            f"must be 'auto' or a positive integer up to {MAX_VERSION}",
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


def _validate_preference_zero3(c: RunConfig, p: list[FieldProblem]) -> None:
    """Preference stages under ZeRO-3 with a method that needs a separate reference model.

    LoRA methods take the base with the adapter disabled as the reference, partitioned with the
    policy. ``full``/``freeze`` load a second, frozen model: ZeRO-3 would keep it whole on every
    rank, undoing what ZeRO-3 saves, so DPO must score the data with it once and free it
    (``preference.precompute_reference``); KTO cannot precompute (its KL rows pair prompts anew each
    batch) and is refused. ZeRO 0-2 replicate the weights anyway and keep the reference model.
    """
    spec = METHOD_SPECS.get(c.method)
    if c.distributed.deepspeed_stage != 3 or spec is None or spec.artifact_kind != ARTIFACT_FULL_MODEL:
        return
    if c.stage == "kto":
        _check(
            p,
            False,
            "distributed.deepspeed_stage",
            3,
            f"stage kto with method {spec.name} keeps a whole reference model on every rank under "
            "ZeRO-3; use ZeRO-2, or a LoRA method (the reference is then the base itself)",
        )
    elif c.stage == "dpo" and c.preference.loss not in _REFERENCE_FREE_LOSSES:
        _check(
            p,
            c.preference.precompute_reference,
            "preference.precompute_reference",
            c.preference.precompute_reference,
            f"must be true for method {spec.name} under ZeRO-3: the reference model scores the data "
            "once and is freed, instead of staying whole on every rank",
        )


def _validate_stage(c: RunConfig, p: list[FieldProblem]) -> None:
    """The stage, whether the method trains it, and the preference options it uses."""
    _check(p, c.stage in STAGES, "stage", c.stage, f"must be one of {list(STAGES)}")
    if c.stage not in STAGES:
        return
    spec = METHOD_SPECS.get(c.method)
    if spec is not None:
        _check(
            p,
            c.stage in spec.stages,
            "stage",
            c.stage,
            f"method {spec.name} trains the stages {list(spec.stages)}",
        )
    if c.stage not in PREFERENCE_STAGES:
        return
    o = c.preference
    _validate_preference_zero3(c, p)
    if c.stage == "dpo":
        _check(
            p,
            o.loss in PREFERENCE_LOSSES,
            "preference.loss",
            o.loss,
            f"must be one of {list(PREFERENCE_LOSSES)}",
        )
    if c.stage in ("dpo", "kto"):
        _check(p, o.beta > 0, "preference.beta", o.beta, "must be > 0")
    if c.stage == "dpo" and o.loss == "simpo":
        _check(p, o.gamma >= 0, "preference.gamma", o.gamma, "must be >= 0")
    _check(
        p,
        0.0 <= o.label_smoothing < 0.5,
        "preference.label_smoothing",
        o.label_smoothing,
        "must be in [0, 0.5)",
    )
    if c.stage == "kto":
        _check(p, o.desirable_weight > 0, "preference.desirable_weight", o.desirable_weight, "must be > 0")
        _check(
            p, o.undesirable_weight > 0, "preference.undesirable_weight", o.undesirable_weight, "must be > 0"
        )
    if o.sft_adapter:
        _check(
            p,
            bool(_ADAPTER_REF_RE.fullmatch(o.sft_adapter)) and ".." not in o.sft_adapter,
            "preference.sft_adapter",
            o.sft_adapter,
            "must be a published adapter as name@version (e.g. demo-sft@1)",
        )
        _check(
            p,
            spec is None or spec.trains == TRAINS_LORA,
            "preference.sft_adapter",
            o.sft_adapter,
            "only the LoRA methods start from a published adapter",
        )
    if o.precompute_reference:
        _check(
            p,
            spec is None or spec.artifact_kind == "full_model",
            "preference.precompute_reference",
            o.precompute_reference,
            "only full and freeze load a separate reference model to precompute from",
        )


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
