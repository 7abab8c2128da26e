"""Training methods as a table: one ``MethodSpec`` per method, read by every consumer.

Config validation, the memory estimate, the recipe, the manifest and the dashboard form ask a
method's spec (``method_spec(config.method)``) instead of comparing method names, so a new method
is a new row here plus, only when it trains something new, its preparation in ``lorafleet.methods``.

| method   | base weights            | trains                                        | publishes (kind)         | served |
|----------|-------------------------|-----------------------------------------------|--------------------------|--------|
| lora     | fp32 / bf16 / fp16, or  | LoRA A/B (+ DoRA magnitudes, modules_to_save) | PEFT adapter (lora)      | yes (*)|
|          | model.quantization      |                                               |                          |        |
| qlora    | 4-bit nf4, double quant | LoRA A/B                                      | PEFT adapter (lora)      | yes (*)|
| lora8bit | 8-bit                   | LoRA A/B                                      | PEFT adapter (lora)      | yes (*)|
| freeze   | as loaded, unquantized  | the last N blocks or named modules            | full model (full_model)  | yes (+)|
| full     | as loaded, unquantized  | everything                                    | full model (full_model)  | yes (+)|
| ptuning  | as loaded, unquantized  | prefixes (P-tuning v2) or prompt encoder      | PEFT prompt (ptuning)    | yes (#)|

(*) with DoRA and ``modules_to_save`` too; a ``lora`` option that ``LORA_OPTION_SERVABLE`` marks
False would be refused. What is not served yet is refused at submit / ``lorafleet train``
(``serving_problems``), not after training.
(+) as a base model of its own, ``name@version`` (``services/inference/published_models.py``).
(#) as per-row virtual-token KV in the mixed batches (``services/inference/prompt_adapters.py``).

Stages (``stage``; ``lorafleet.preference``): every method trains ``sft``. The LoRA methods also
train ``dpo``, ``kto`` and ``rm``, with the base (adapters disabled) or a frozen copy of the starting
SFT adapter as the reference policy: no second model. ``freeze`` and ``full`` train ``dpo`` and
``kto`` with a separate frozen reference model (optionally precomputed); their ``rm`` (a full value
model) and every stage of ``ptuning`` are not offered yet.

Stdlib only: ``lorafleet.config`` reads this table and must import without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorafleet.errors import ConfigError, FieldProblem

if TYPE_CHECKING:
    from lorafleet.config import RunConfig

ZERO_STAGES = (-1, 0, 1, 2, 3)
"""-1 trains without DeepSpeed; 0-3 are the ZeRO stages."""

STAGES = ("sft", "dpo", "kto", "rm")
"""Training stages: supervised fine-tuning, pairwise preference (DPO and its variants), unpaired
preference (KTO), reward model (pairwise ranking with a scalar head)."""
PREFERENCE_STAGES = ("dpo", "kto", "rm")
_PAIR_COLUMNS = ("prompt_column", "chosen_column", "rejected_column")
STAGE_OPTIONS: dict[str, tuple[str, ...]] = {
    "sft": (),
    "dpo": (
        "loss",
        "beta",
        "gamma",
        "label_smoothing",
        "sft_adapter",
        "precompute_reference",
        *_PAIR_COLUMNS,
    ),
    "kto": (
        "beta",
        "desirable_weight",
        "undesirable_weight",
        "sft_adapter",
        "prompt_column",
        "completion_column",
        "label_column",
    ),
    "rm": _PAIR_COLUMNS,
}
"""The ``preference`` options each stage reads: a job that sets another is refused, the dashboard's
form shows only these, and the CLI submits only these."""
_LORA_STAGES = STAGES
_REFERENCE_MODEL_STAGES = ("sft", "dpo", "kto")

TRAINS_LORA = "lora"
"""LoRA A/B matrices added to the chosen linear layers; options in the ``lora`` config section."""
TRAINS_PROMPT = "ptuning"
"""Virtual-token prompts (prefix tuning or a prompt encoder); options in the ``ptuning`` section."""
TRAINS_BLOCKS = "freeze"
"""The base's own weights in the chosen blocks, the rest frozen; options in the ``freeze`` section."""
TRAINS_ALL = "all"
"""Every weight of the base; no options section."""

ARTIFACT_LORA = "lora"
ARTIFACT_PROMPT = "ptuning"
ARTIFACT_FULL_MODEL = "full_model"
"""Artifact kinds a method publishes, as the manifest's ``kind`` names them (``lorafleet.adapters.KINDS``)."""


@dataclass(frozen=True)
class MethodSpec:
    """Everything lorafleet decides from the method's name."""

    name: str
    """The value of ``method`` in a run config or JobSpec."""
    trains: str
    """What becomes trainable: ``TRAINS_LORA``, ``TRAINS_PROMPT``, ``TRAINS_BLOCKS`` or ``TRAINS_ALL``.
    Picks the preparation (``lorafleet.methods``), the trainable-parameter count (``lorafleet.estimate``)
    and the config section that holds the method's options."""
    artifact_kind: str
    """What a run publishes: a PEFT adapter (``lora``), a PEFT prompt adapter (``ptuning``) or a full
    transformers model directory (``full_model``)."""
    base_quantization: str | None = None
    """Quantization the method always loads the base in (qlora: nf4); None = ``model.quantization``."""
    quantized_base: bool = False
    """Whether a quantized ``model.quantization`` is accepted: only methods that leave the base frozen
    and train new fp32 weights can sit on a quantized base."""
    deepspeed_stages: tuple[int, ...] = ZERO_STAGES
    """``distributed.deepspeed_stage`` values the method supports."""
    deepspeed_reason: str = ""
    """Why a stage outside ``deepspeed_stages`` is refused, for the error message."""
    trains_base_weights: bool = False
    """Memory model: the trained weights are the base's own, kept at storage width (a 16-bit working
    copy plus an fp32 master copy in bf16/fp16); otherwise they are new weights held in fp32."""
    full_model_rule: bool = False
    """Memory model: the per-billion rule of thumb uses the full-tuning row (18 B fp32, 8 B 16-bit
    per parameter) instead of the freeze/LoRA one (2 B, 1 B int8, 0.5 B nf4)."""
    description: str = ""
    """One line for humans (form help, docs)."""
    stages: tuple[str, ...] = ("sft",)
    """``stage`` values the method trains (see the module docstring)."""
    servable: bool = True
    """Whether the inference service serves what this method publishes (its ``artifact_kind``). A
    method that is not is refused when a job is submitted or ``lorafleet train`` starts
    (:func:`serving_problems`), never trained and then refused at serving. Set True when the
    inference service learns to serve the artifact kind."""

    @property
    def options_section(self) -> str | None:
        """The run config section holding this method's options (``lora``, ``ptuning``, ``freeze``)."""
        return None if self.trains == TRAINS_ALL else self.trains

    def quantization(self, configured: str) -> str:
        """The base's quantization for this method given ``model.quantization``."""
        return self.base_quantization or configured

    def accepts_quantization(self, configured: str) -> bool:
        """Whether ``model.quantization`` may be ``configured`` with this method."""
        if self.base_quantization is not None:
            return configured in ("none", self.base_quantization)
        return self.quantized_base or configured == "none"


METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "lora",
            TRAINS_LORA,
            ARTIFACT_LORA,
            quantized_base=True,
            stages=_LORA_STAGES,
            description="LoRA on the base as loaded (model.quantization may quantize it)",
        ),
        MethodSpec(
            "qlora",
            TRAINS_LORA,
            ARTIFACT_LORA,
            stages=_LORA_STAGES,
            base_quantization="nf4",
            quantized_base=True,
            description="LoRA on a 4-bit nf4 base (QLoRA, arXiv:2305.14314)",
        ),
        MethodSpec(
            "lora8bit",
            TRAINS_LORA,
            ARTIFACT_LORA,
            stages=_LORA_STAGES,
            base_quantization="int8",
            quantized_base=True,
            description="LoRA on an 8-bit base",
        ),
        MethodSpec(
            "freeze",
            TRAINS_BLOCKS,
            ARTIFACT_FULL_MODEL,
            servable=True,
            stages=_REFERENCE_MODEL_STAGES,
            trains_base_weights=True,
            description="train the last blocks (or named modules) of the base, the rest frozen",
        ),
        MethodSpec(
            "full",
            TRAINS_ALL,
            ARTIFACT_FULL_MODEL,
            servable=True,
            stages=_REFERENCE_MODEL_STAGES,
            trains_base_weights=True,
            full_model_rule=True,
            description="train every weight",
        ),
        MethodSpec(
            "ptuning",
            TRAINS_PROMPT,
            ARTIFACT_PROMPT,
            servable=True,
            deepspeed_stages=(-1, 0, 1, 2),
            deepspeed_reason="PEFT prompt learning",
            description="prefix tuning (P-tuning v2) or a prompt encoder (P-tuning)",
        ),
    )
}
"""Every training method, keyed by name, in the order forms and messages list them."""

LORA_OPTION_SERVABLE: dict[str, bool] = {"use_dora": True, "modules_to_save": True}
"""``lora`` options (``LoraOptions`` fields) that change what an adapter holds, and whether the
inference service serves adapters that use them: DoRA magnitude vectors, ``modules_to_save``
replacement modules. A False entry refuses the option when set (:func:`serving_problems`); flip it
when serving lands."""

METHODS: tuple[str, ...] = tuple(METHOD_SPECS)
"""Every method name."""

OPTION_SECTIONS: tuple[str, ...] = (TRAINS_LORA, TRAINS_PROMPT, TRAINS_BLOCKS)
"""Run config sections that hold one method family's options."""


def method_spec(name: str) -> MethodSpec:
    """The spec of method ``name``.

    Raises:
        ConfigError: ``name`` is not a method, naming the field ``method``.
    """
    spec = METHOD_SPECS.get(name)
    if spec is None:
        raise ConfigError([FieldProblem("method", name, f"must be one of {list(METHODS)}")])
    return spec


def methods_with_options(section: str) -> tuple[str, ...]:
    """The methods whose options live in config section ``section`` (``lora`` -> lora, qlora, ...)."""
    return tuple(s.name for s in METHOD_SPECS.values() if s.options_section == section)


def serving_problems(config: RunConfig) -> list[FieldProblem]:
    """Why the artifact ``config`` would publish cannot be served yet: a method whose spec is not
    ``servable``, or a ``lora`` option that ``LORA_OPTION_SERVABLE`` marks False and the config sets.

    Returns:
        One problem per reason, naming the run-config field and its value; empty when servable.
    """
    spec = method_spec(config.method)
    problems: list[FieldProblem] = []
    if not spec.servable:
        problems.append(
            FieldProblem(
                "method",
                config.method,
                f"publishes a {spec.artifact_kind!r} artifact that the inference service cannot serve yet; "
                "train a LoRA method (lora, qlora, lora8bit) to serve the result",
            )
        )
    if spec.options_section == TRAINS_LORA:
        for option, servable in LORA_OPTION_SERVABLE.items():
            value = getattr(config.lora, option)
            if value and not servable:
                problems.append(
                    FieldProblem(
                        f"lora.{option}",
                        value,
                        "the inference service cannot serve adapters that use it yet; leave it unset",
                    )
                )
    return problems


def quantization_for(config: RunConfig) -> str:
    """The quantization the base is loaded in: the method's own (qlora: nf4), else ``model.quantization``."""
    return method_spec(config.method).quantization(config.model.quantization)
