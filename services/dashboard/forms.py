"""The job submit form as data: its fields (each a JobSpec path) and the spec they build.

The form validates nothing itself: the trainer does, and its INVALID_ARGUMENT lists every problem by
spec field, which the page shows under the field of the same path. An empty field is left unset in
the spec, so the server applies the recipe's default (the same defaults as a YAML run config).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorafleet.config import DTYPES, FORMATS, PTUNING_MODES, QUANTIZATIONS, SCHEDULERS, PreferenceConfig
from lorafleet.config_checks import PREFERENCE_LOSSES
from lorafleet.method_specs import (
    METHOD_SPECS,
    METHODS,
    STAGE_OPTIONS,
    STAGES,
    TRAINS_BLOCKS,
    TRAINS_LORA,
    TRAINS_PROMPT,
    methods_with_options,
)
from lorafleet.templates import TEMPLATES
from lorafleet.v1 import trainer_pb2 as pb

DEFAULT = "(server default)"
"""The first option of every select: leave the field unset."""

LORA_METHODS = methods_with_options(TRAINS_LORA)
FREEZE_METHODS = methods_with_options(TRAINS_BLOCKS)
PTUNING_METHODS = methods_with_options(TRAINS_PROMPT)
_QUANTIZATION_HELP = (
    ", ".join(f"{s.name} implies {s.base_quantization}" for s in METHOD_SPECS.values() if s.base_quantization)
    + "."
)


@dataclass(frozen=True)
class FormField:
    path: str
    """JobSpec path without ``spec.``: ``lora.rank``; the key of its error list and its widget."""
    label: str
    kind: str
    """text, int, float, select, bool (a select: default / yes / no), list (comma-separated),
    labels (k=v, comma-separated)."""
    default: Any = None
    """Pre-filled value; None = empty (unset)."""
    options: tuple[str, ...] = ()
    help: str = ""
    methods: tuple[str, ...] = ()
    """Only sent for these methods; empty = always."""
    stages: tuple[str, ...] = ()
    """Only shown and sent for these stages; empty = always."""


def _select(
    path: str, label: str, options: tuple[str, ...] | list[str], help: str = "", **kw: Any
) -> FormField:
    return FormField(path, label, "select", options=(DEFAULT, *options), help=help, **kw)


STAGE_PATH = "stage"
"""The stage select: outside the form's batch, so that choosing a stage redraws its options."""
DEFAULT_STAGE = "sft"
_PREFERENCE_LABELS = {
    "loss": "Loss variant (dpo)",
    "beta": "beta",
    "gamma": "gamma (SimPO margin)",
    "sft_adapter": "Start from SFT adapter",
    "precompute_reference": "Precompute reference log-probs",
}
_PREFERENCE_HELP = {
    "loss": "sigmoid = DPO; ipo; orpo and simpo need no reference policy.",
    "beta": "How far the policy may move from the reference (DPO/IPO/KTO); reward scale (ORPO/SimPO).",
    "gamma": "SimPO's target reward margin (loss simpo only).",
    "label_smoothing": "Probability that a pair's label is flipped (conservative DPO, SimPO): [0, 0.5).",
    "sft_adapter": "A published adapter as name@version; its frozen copy is the reference policy.",
    "precompute_reference": "full/freeze only: score the data with the reference model once, then free it.",
    "label_column": "KTO rows' desirability: true/false or desirable/undesirable.",
}
_KIND_OF_TYPE = {"str": "text", "float": "float", "int": "int", "bool": "bool"}


def _preference_fields() -> list[FormField]:
    """One field per ``PreferenceConfig`` option, shown for the stages that read it (``STAGE_OPTIONS``)."""
    out = []
    for f in dataclasses.fields(PreferenceConfig):
        stages = tuple(stage for stage, names in STAGE_OPTIONS.items() if f.name in names)
        label = _PREFERENCE_LABELS.get(f.name, f.name.replace("_", " ").capitalize())
        help_text = _PREFERENCE_HELP.get(f.name, "")
        path = f"preference.{f.name}"
        if f.name == "loss":
            out.append(_select(path, label, PREFERENCE_LOSSES, help_text, stages=stages))
            continue
        kind = _KIND_OF_TYPE[str(f.type)]
        options = (DEFAULT, "yes", "no") if kind == "bool" else ()
        out.append(FormField(path, label, kind, options=options, help=help_text, stages=stages))
    return out


STAGE_FIELD = FormField(
    STAGE_PATH,
    "Stage",
    "select",
    DEFAULT_STAGE,
    options=STAGES,
    help="sft = supervised; dpo = pairwise preference (DPO, IPO, ORPO, SimPO); kto = unpaired "
    "preference; rm = reward model. The form shows the options of the chosen stage.",
)


def methods_for_stage(stage: str) -> tuple[str, ...]:
    """The methods that train ``stage`` (``MethodSpec.stages``), in the table's order."""
    return tuple(name for name, spec in METHOD_SPECS.items() if stage in spec.stages)


def visible(f: FormField, stage: str) -> bool:
    """Whether the form shows ``f`` when ``stage`` is chosen."""
    return not f.stages or stage in f.stages


SECTIONS: list[tuple[str, list[FormField]]] = [
    (
        "Base model",
        [
            FormField(
                "model.name_or_path",
                "Base model",
                "text",
                ".cache/tiny/llama",
                help="Directory on the trainer's machine, or a hub id (org/name).",
            ),
            _select("model.dtype", "dtype", DTYPES),
            _select("model.quantization", "Quantization", QUANTIZATIONS, help=_QUANTIZATION_HELP),
        ],
    ),
    (
        "Dataset",
        [
            FormField(
                "dataset.train_file",
                "Training data (JSONL path on the trainer)",
                "text",
                ".cache/data/cblue_train.jsonl",
            ),
            FormField(
                "dataset.validation_file", "Validation data", "text", ".cache/data/cblue_validation.jsonl"
            ),
            _select("dataset.format", "Format", FORMATS),
            _select(
                "dataset.template",
                "Template",
                ["auto", *sorted(TEMPLATES)],
                help="Use the same template for serving; the adapter's manifest records it.",
            ),
            FormField("dataset.max_source_length", "Max prompt tokens", "int", 128),
            FormField("dataset.max_target_length", "Max answer tokens", "int", 16),
            FormField("dataset.max_samples", "Max samples", "int"),
        ],
    ),
    (
        "Method",
        [
            FormField("method", "Method", "select", "lora", options=METHODS),
            FormField("lora.rank", "LoRA rank", "int", 8, methods=LORA_METHODS),
            FormField("lora.alpha", "LoRA alpha", "float", 16.0, methods=LORA_METHODS),
            FormField("lora.dropout", "LoRA dropout", "float", 0.05, methods=LORA_METHODS),
            FormField(
                "lora.target_modules",
                "Target modules",
                "list",
                methods=LORA_METHODS,
                help="Comma-separated; empty = the family's default; all-linear = every linear layer.",
            ),
            FormField("freeze.trainable_layers", "Trainable layers (freeze)", "int", methods=FREEZE_METHODS),
            _select("ptuning.mode", "P-tuning mode", PTUNING_MODES, methods=PTUNING_METHODS),
            FormField(
                "ptuning.num_virtual_tokens", "Virtual tokens (ptuning)", "int", methods=PTUNING_METHODS
            ),
        ],
    ),
    ("Preference stage", _preference_fields()),
    (
        "Hyper-parameters",
        [
            FormField("hyperparameters.epochs", "Epochs", "float"),
            FormField("hyperparameters.max_steps", "Max steps", "int", 40, help="Overrides epochs when set."),
            FormField("hyperparameters.per_device_batch_size", "Batch size per process", "int", 8),
            FormField("hyperparameters.gradient_accumulation_steps", "Gradient accumulation", "int"),
            FormField("hyperparameters.learning_rate", "Learning rate", "float", 2e-3),
            _select("hyperparameters.lr_scheduler", "LR schedule", SCHEDULERS),
            FormField("hyperparameters.warmup_ratio", "Warm-up ratio", "float"),
            FormField("hyperparameters.logging_steps", "Log every (steps)", "int", 2),
            FormField("hyperparameters.eval_steps", "Evaluate every (steps)", "int"),
            FormField("hyperparameters.num_threads", "CPU threads per process", "int"),
            FormField(
                "hyperparameters.predict_with_generate",
                "Score generations",
                "bool",
                options=(DEFAULT, "yes", "no"),
                help="Generate on the validation set at the end: BLEU-4, ROUGE-1/2/L, accuracy.",
            ),
            FormField("hyperparameters.max_eval_samples", "Max scored samples", "int"),
        ],
    ),
    (
        "Resources",
        [
            FormField("resources.nodes", "Nodes", "int"),
            FormField("resources.processes_per_node", "Processes per node", "int"),
            FormField("resources.gpus_per_node", "GPUs per node", "int"),
            _select("deepspeed.zero_stage", "DeepSpeed ZeRO stage", ("0", "1", "2", "3")),
            FormField("max_attempts", "Max attempts", "int"),
        ],
    ),
    (
        "Publish",
        [
            FormField(
                "adapter_name",
                "Adapter name",
                "text",
                "dash-lora",
                help="Published as <adapters_root>/<name>/<version>/; empty = not published.",
            ),
            FormField("labels", "Labels", "labels", help="k=v, comma-separated (owner=me, exp=a)."),
        ],
    ),
]

FIELDS: dict[str, FormField] = {f.path: f for _, fields in SECTIONS for f in fields}


def build_spec(values: Mapping[str, Any]) -> pb.JobSpec:
    """The JobSpec of the form's values (keyed by field path, the stage under ``STAGE_PATH``); empty
    values stay unset, and so do the options of another method or stage.

    Raises:
        ValueError: a labels entry without ``=`` (the only thing the form itself must parse).
    """
    spec = pb.JobSpec()
    method = values.get("method") or ""
    stage = values.get(STAGE_PATH) or DEFAULT_STAGE
    if stage != DEFAULT_STAGE:
        spec.stage = stage
    for path, f in FIELDS.items():
        value = values.get(path)
        if value is None or value == "" or value == DEFAULT or value == []:
            continue
        if (f.methods and method not in f.methods) or not visible(f, stage):
            continue
        *parents, name = path.split(".")
        msg: Any = spec
        for part in parents:
            msg = getattr(msg, part)
        if f.kind == "list":
            getattr(msg, name).extend(x.strip() for x in str(value).split(",") if x.strip())
        elif f.kind == "labels":
            for item in (x.strip() for x in str(value).split(",") if x.strip()):
                key, sep, val = item.partition("=")
                if not sep:
                    raise ValueError(f"labels: {item!r} is not key=value")
                getattr(msg, name)[key.strip()] = val.strip()
        elif f.kind == "bool":
            setattr(msg, name, value == "yes")
        elif f.kind == "int" or path == "deepspeed.zero_stage":
            setattr(msg, name, int(value))
        elif f.kind == "float":
            setattr(msg, name, float(value))
        else:
            setattr(msg, name, value)
    return spec
