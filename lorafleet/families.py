"""Model-family registry: LoRA target modules, default prompt template and loading needs per family.

A family groups the checkpoints that share module names and a chat format. ``detect_family`` maps a
transformers config (plus the checkpoint's name, for families that share a ``model_type``) to one of
them; unknown architectures get the ``generic`` family, which adapts every linear layer but the head.

Adding a family: append a ``Family`` to ``_REGISTRY`` with its ``model_types``, the LoRA targets from
the model's module names, and a template name that ``lorafleet.templates`` knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.errors import ConfigError, FieldProblem
from lorafleet.templates import TEMPLATES

ALL_LINEAR = "all-linear"
"""LoRA target spec meaning every linear layer except the output head."""

_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BAICHUAN_TARGETS = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")
_FUSED_QKV_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
# Baichuan and ChatGLM converted to native Llama / Glm (lorafleet.convert): the fused projections
# become q/k/v, ChatGLM's dense_h_to_4h becomes Glm's gate_up_proj: the same weights under the
# native module names (``models.resolve_lora_targets`` picks them for a converted model).
_BAICHUAN_CONVERTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_CHATGLM_CONVERTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
SOURCE_CONFIG_KEY = "lorafleet_source"
"""Config attribute a converted Baichuan / ChatGLM checkpoint carries: ``{"layout", "family"}``."""

# Baichuan2's tokenizer has 125696 entries; Baichuan-7B/13B have 64000.
_BAICHUAN2_VOCAB = 125696
# Llama 3 (and 3.1/3.2/3.3) use a 128256-token tiktoken vocabulary; Llama 2 has 32000.
_LLAMA3_MIN_VOCAB = 128000
# Tokenizer files read for hints are small; skip anything unexpectedly large.
_MAX_HINT_FILE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Family:
    """What lorafleet needs to know about one model family."""

    name: str
    """Registry key, the value of ``model.family``."""
    model_types: tuple[str, ...]
    """``config.model_type`` values of this family."""
    lora_targets: tuple[str, ...] | str
    """Leaf module names LoRA adapts by default, or ``all-linear``."""
    template: str
    """Default prompt template name: a key of ``lorafleet.templates.TEMPLATES``."""
    needs_remote_code: bool = False
    """Checkpoints ship their own modelling code (``auto_map``); loading needs ``trust_remote_code``."""
    name_hints: tuple[str, ...] = ()
    """Lower-case substrings of the checkpoint name (or config ``_name_or_path``) that select this
    family among those sharing a ``model_type``."""
    file_hints: tuple[str, ...] = ()
    """Strings whose presence in a local checkpoint's tokenizer files (``tokenizer_config.json``,
    ``tokenization_*.py``) selects this family among those sharing a ``model_type``."""
    min_vocab_size: int | None = None
    """A vocabulary at least this large also selects this family among those sharing a model_type."""
    exact_vocab_size: int | None = None
    """A vocabulary of exactly this size also selects this family among those sharing a model_type."""
    description: str = ""
    """Checkpoints this family covers, for humans."""
    converted_lora_targets: tuple[str, ...] | None = None
    """LoRA targets of this family's checkpoints once ``lorafleet.convert`` has mapped them onto a
    native architecture (the same weights as ``lora_targets``, under the native module names)."""

    def __post_init__(self) -> None:
        # A family that names a template lorafleet does not implement fails at import, not at training.
        if self.template not in TEMPLATES:
            raise ValueError(
                f"family {self.name!r}: template {self.template!r} is not in {sorted(TEMPLATES)}"
            )


_REGISTRY: tuple[Family, ...] = (
    # Order matters within a model_type: hinted variants first, the plain default last.
    Family(
        "llama3",
        ("llama",),
        _LLAMA_TARGETS,
        "llama3",
        name_hints=("llama-3", "llama3", "llama_3"),
        min_vocab_size=_LLAMA3_MIN_VOCAB,
        description="Llama 3 / 3.1 / 3.2 / 3.3 and their fine-tunes",
    ),
    Family(
        "belle",
        ("llama",),
        _LLAMA_TARGETS,
        "belle",
        name_hints=("belle",),
        description="BELLE LLaMA-based checkpoints (Human:/Belle: format)",
    ),
    Family(
        "llama",
        ("llama",),
        _LLAMA_TARGETS,
        "llama2",
        description="LLaMA / Llama 2, Chinese-LLaMA-Alpaca, Open-LLaMA, TigerBot",
    ),
    Family("mistral", ("mistral", "mixtral"), _LLAMA_TARGETS, "llama2", description="Mistral / Mixtral"),
    Family(
        "qwen2",
        ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"),
        _LLAMA_TARGETS,
        "qwen",
        description="Qwen1.5 / Qwen2 / Qwen2.5 / Qwen3 (ChatML)",
    ),
    Family("gpt_neox", ("gpt_neox",), _FUSED_QKV_TARGETS, "default", description="Pythia, GPT-NeoX"),
    Family(
        "falcon",
        ("falcon", "RefinedWeb", "RefinedWebModel"),
        _FUSED_QKV_TARGETS,
        "default",
        description="Falcon",
    ),
    Family("bloom", ("bloom",), _FUSED_QKV_TARGETS, "default", description="BLOOM / BLOOMZ"),
    Family(
        "baichuan2",
        ("baichuan",),
        _BAICHUAN_TARGETS,
        "baichuan2",
        converted_lora_targets=_BAICHUAN_CONVERTED_TARGETS,
        needs_remote_code=True,
        name_hints=("baichuan2", "baichuan-2", "baichuan_2"),
        exact_vocab_size=_BAICHUAN2_VOCAB,
        description="Baichuan2-7B/13B",
    ),
    Family(
        "baichuan",
        ("baichuan",),
        _BAICHUAN_TARGETS,
        "baichuan",
        converted_lora_targets=_BAICHUAN_CONVERTED_TARGETS,
        needs_remote_code=True,
        description="Baichuan-7B, Baichuan-13B",
    ),
    Family(
        "chatglm3",
        ("chatglm",),
        _FUSED_QKV_TARGETS,
        "chatglm3",
        converted_lora_targets=_CHATGLM_CONVERTED_TARGETS,
        needs_remote_code=True,
        name_hints=("chatglm3", "chatglm-3", "chatglm_3"),
        # ChatGLM3's tokenizer code defines role tokens ChatGLM2's lacks.
        file_hints=("<|observation|>",),
        description="ChatGLM3-6B",
    ),
    Family(
        "chatglm2",
        ("chatglm",),
        _FUSED_QKV_TARGETS,
        "chatglm2",
        converted_lora_targets=_CHATGLM_CONVERTED_TARGETS,
        needs_remote_code=True,
        description="ChatGLM2-6B",
    ),
)

GENERIC = Family(
    "generic",
    (),
    ALL_LINEAR,
    "default",
    description="Any other causal LM: LoRA on every linear layer but the head",
)
"""Fallback for model types the registry does not know."""

FAMILIES: dict[str, Family] = {f.name: f for f in (*_REGISTRY, GENERIC)}
"""Every registered family by name, ``generic`` included."""


def get_family(name: str) -> Family:
    """Look a family up by name.

    Args:
        name: a registry key such as ``llama`` or ``chatglm3``.

    Returns:
        The registered family.

    Raises:
        ConfigError: on ``model.family`` when the name is not registered.
    """
    family = FAMILIES.get(name)
    if family is None:
        raise ConfigError(
            [FieldProblem("model.family", name, f"unknown family; known: {sorted(FAMILIES)} or 'auto'")]
        )
    return family


def detect_family(config: Any, name_or_path: str = "") -> Family:
    """Pick the family of a checkpoint from its config and name.

    ``model_type`` selects the candidates. Families that share one (baichuan / baichuan2,
    chatglm2 / chatglm3, llama / llama3 / belle) are told apart by name hints in ``name_or_path`` or
    the config's ``_name_or_path``, then by a local checkpoint's tokenizer files, then by vocabulary
    size; otherwise the plain family wins. A checkpoint converted by ``lorafleet.convert`` names its
    family in its config (``lorafleet_source``).

    Args:
        config: a transformers ``PretrainedConfig`` (anything with ``model_type``).
        name_or_path: the checkpoint's hub id or local directory.

    Returns:
        The matching family, or ``GENERIC`` for unknown model types.
    """
    source = getattr(config, SOURCE_CONFIG_KEY, None)
    if isinstance(source, dict) and source.get("family") in FAMILIES:
        # A Baichuan / ChatGLM checkpoint converted to Llama / Glm keeps its own family and template.
        return FAMILIES[source["family"]]
    model_type = str(getattr(config, "model_type", "") or "")
    candidates = [f for f in _REGISTRY if model_type in f.model_types]
    if not candidates:
        return GENERIC
    names = " ".join((name_or_path, str(getattr(config, "_name_or_path", "") or ""))).lower()
    vocab = _vocab_size(config)
    for family in candidates:
        if any(hint in names for hint in family.name_hints):
            return family
    if any(f.file_hints for f in candidates):
        tokenizer_text = _local_tokenizer_text(name_or_path)
        for family in candidates:
            if any(hint in tokenizer_text for hint in family.file_hints):
                return family
    for family in candidates:
        if vocab is not None and family.exact_vocab_size is not None and vocab == family.exact_vocab_size:
            return family
        if vocab is not None and family.min_vocab_size is not None and vocab >= family.min_vocab_size:
            return family
    # The default of a model_type is the one a name or vocabulary cannot select.
    plain = [
        f for f in candidates if not (f.name_hints or f.file_hints or f.min_vocab_size or f.exact_vocab_size)
    ]
    return plain[0] if plain else candidates[-1]


def _vocab_size(config: Any) -> int | None:
    # ChatGLM configs call it padded_vocab_size.
    for key in ("vocab_size", "padded_vocab_size"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _local_tokenizer_text(name_or_path: str) -> str:
    """Text of a local checkpoint's tokenizer config and code; empty for hub ids and missing paths."""
    if not name_or_path:
        return ""
    root = Path(name_or_path)
    if not root.is_dir():
        return ""
    parts = []
    for path in sorted([root / "tokenizer_config.json", *root.glob("tokenization_*.py")]):
        if path.is_file() and path.stat().st_size < _MAX_HINT_FILE_BYTES:
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)
