"""Reading a PEFT LoRA adapter directory into :class:`AdapterWeights`, and what an adapter may hold
beyond ``A`` / ``B``: DoRA magnitudes and ``modules_to_save`` replacement modules, served per batch
row. :mod:`services.inference.lora_batch` (the slot tables, which re-export the reader) applies them.

**DoRA** (Liu et al. 2024, arXiv:2402.09353; PEFT ``tuners/lora/dora.py``). A DoRA layer computes::

    m   = magnitude / ||W + s * B @ A||_row      # [out]; the norm is detached: a constant at inference
    y   = base(x) + (m - 1) * (base(x) - bias) + m * s * B(A(x))
        = m * (base(x) - bias + s * B(A(x))) + bias

``W`` is the (dequantized, for 4/8-bit bases) base weight and the norm is per output feature. ``m``
depends only on the adapter and the base, so :func:`dora_scales` computes it once when the adapter
is read; the slot tables hold one ``[out]`` vector per slot and layer (ones for other slots), and a
DoRA row costs one extra multiply of its layer output.

**modules_to_save** (PEFT ``ModulesToSaveWrapper``): the adapter carries full copies of some
modules (a trained ``lm_head`` or ``embed_tokens``; any ``nn.Linear`` / ``nn.Embedding``). Rows of
such an adapter get the module's output recomputed with the adapter's weights for their rows only
(:class:`ModuleReplacements`, a forward hook); other rows keep the base module's output. The
weights live in per-slot side tables, not in the fixed-rank LoRA tables. On a model with tied
input/output embeddings the replacement of one of them leaves the other as in the base, as in
PEFT (with ``ensure_weight_tying`` PEFT saves both modules, and both are replaced).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

MAGNITUDE_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$")
"""PEFT's key of a DoRA magnitude vector (``[out_features]``)."""
_PEFT_PREFIX = "base_model.model."

MAX_ABS_WEIGHT = 1e6
"""The largest LoRA weight or scaling magnitude accepted (trained ones are below ~10). In ``stack``
mode every row multiplies every resident adapter's columns and a mask zeroes the foreign ones, so a
NaN, an infinity, or a weight large enough that ``x @ A`` overflows float32 would reach every row of
the batch (0 x inf = NaN), not just the adapter's own; such adapters are refused when loaded."""

_PEFT_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_OUTPUT_HEADS = frozenset({"lm_head", "embed_out", "output_layer"})


@dataclass
class AdapterWeights:
    """The LoRA weights of one adapter version, as the engine consumes them.

    Attributes:
        ref: identity of this exact version (``name@version`` or a content hash). The engine keys
            its slots by ``ref``: two objects with the same ref are assumed to hold the same weights,
            so a reloaded adapter must get a new ref or it will be served from the old slot.
        rank: the largest rank over the layers (the slot table must have ``max_rank >= rank``).
        scaling: the delta multiplier (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rsLoRA).
        layers: base-model module name (``model.layers.0.self_attn.q_proj``) -> ``(A, B)`` with
            ``A`` ``[r, in_features]`` and ``B`` ``[out_features, r]``.
        layer_scaling: per-module scalings that differ from ``scaling`` (PEFT ``rank_pattern`` /
            ``alpha_pattern``); modules not listed use ``scaling``.
        dora_scale: DoRA layers -> ``magnitude / ||W + s * B @ A||_row`` (``[out_features]``, the
            detached per-output factor; see ``lora_options``); empty for plain LoRA.
        modules_to_save: replaced modules -> parameter name -> tensor (PEFT ``modules_to_save``,
            e.g. ``lm_head`` -> ``{"weight": [vocab, hidden]}``).
    """

    ref: str
    rank: int
    scaling: float
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    layer_scaling: dict[str, float] = field(default_factory=dict)
    dora_scale: dict[str, torch.Tensor] = field(default_factory=dict)
    modules_to_save: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def scaling_for(self, module_name: str) -> float:
        """The scaling of one module."""
        return self.layer_scaling.get(module_name, self.scaling)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held: A and B, DoRA factors, replacement modules (what an adapter
        cache budgets against)."""
        tensors = [t for pair in self.layers.values() for t in pair]
        tensors += list(self.dora_scale.values())
        tensors += [t for params in self.modules_to_save.values() for t in params.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def _linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a layer LoRA can wrap, or None for anything else."""
    if isinstance(module, nn.Linear):  # bnb Linear4bit / Linear8bitLt subclass nn.Linear
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D":
        # transformers' Conv1D keeps its sizes as plain int attributes ``nx`` (in) and ``nf`` (out).
        nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
        if isinstance(nx, int) and isinstance(nf, int):
            return nx, nf
    return None


def is_bnb(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def linear_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear layer LoRA may adapt: qualified name -> ``(in_features, out_features)``.

    The output head is excluded (its name, or being ``get_output_embeddings()``), as PEFT's
    ``all-linear`` does.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    found: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        feats = _linear_features(module)
        if feats is None or module is head or name.rsplit(".", 1)[-1] in _OUTPUT_HEADS:
            continue
        found[name] = feats
    return found


def adapter_weights_from_peft_dir(
    path: str | Path, ref: str, base_model: nn.Module, skip_modules_to_save: Collection[str] = ()
) -> AdapterWeights:
    """Read a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Checks everything that would otherwise make the adapter serve wrong outputs silently: the PEFT
    type, variants this engine does not implement (LoRA bias, embedding LoRA, trainable tokens),
    that every weight names a linear layer of ``base_model`` with matching shapes, and that the
    adapter adapts at least one layer (vLLM once served the base for an adapter matching none).
    DoRA magnitudes become per-layer factors (``AdapterWeights.dora_scale``, computed here from the
    base's weights) and ``modules_to_save`` tensors replacement modules (``lora_options``).

    Args:
        path: the adapter directory.
        ref: identity to give the result (see ``AdapterWeights.ref``).
        base_model: the base model the adapter will run on (module names and shapes; the weights of
            DoRA layers, for their norms).
        skip_modules_to_save: ``modules_to_save`` entries to leave out (names or dotted suffixes),
            such as a reward model's value head ``score``, which a causal LM base does not have.
            Any other module the base lacks is refused, naming it.

    Returns:
        The weights as float tensors on the CPU, in the dtype they were saved in (DoRA factors in
        float32).

    Raises:
        ValueError: missing or unreadable files, a pickle-only adapter, a non-LoRA or unsupported
            LoRA variant, unknown modules, mismatched shapes.
    """
    from safetensors.torch import load_file

    root = Path(path)
    config_path = root / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"{root}: no adapter_config.json; not a PEFT adapter directory")
    try:
        config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{config_path}: not valid JSON: {e}") from e
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(
            f"{root}: peft_type {config.get('peft_type')!r} is not LORA; only LoRA adapters are served"
        )
    unsupported = [
        what
        for what, on in (
            ("LoRA bias (lora_bias)", config.get("lora_bias")),
            ("trainable_token_indices", config.get("trainable_token_indices")),
        )
        if on
    ]
    if unsupported:
        raise ValueError(f"{root}: unsupported LoRA variant: {', '.join(unsupported)}")
    weights_path = root / "adapter_model.safetensors"
    if not weights_path.is_file():
        if (root / "adapter_model.bin").is_file():
            raise ValueError(f"{root}: only adapter_model.bin (pickle) found; re-save with safetensors")
        raise ValueError(f"{root}: no adapter_model.safetensors")
    tensors = load_file(str(weights_path))

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY_RE.match(key)
        magnitude = MAGNITUDE_KEY_RE.match(key)
        if match is not None:
            pairs.setdefault(match["module"], {})[match["ab"]] = tensor
        elif magnitude is not None:
            magnitudes[magnitude["module"]] = tensor
        else:
            others[key] = tensor
    if not pairs:
        raise ValueError(f"{root}: the adapter holds no LoRA weights")
    if bool(magnitudes) != bool(config.get("use_dora")):
        raise ValueError(
            f"{root}: use_dora is {config.get('use_dora')!r} in adapter_config.json but the weights hold "
            f"{len(magnitudes)} DoRA magnitude vector(s)"
        )
    saved = split_modules_to_save(others, config, base_model, skip_modules_to_save, str(root))
    both = sorted(set(saved) & set(pairs))
    if both:
        raise ValueError(f"{root}: modules {both} are both LoRA-adapted and in modules_to_save")

    available = linear_layers(base_model)
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    rslora = bool(config.get("use_rslora", False))
    rank_pattern: dict[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}

    def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
        # PEFT's rule: the key matches the module name or a dotted suffix of it.
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return default

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scalings: dict[str, float] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{root}: module {module!r} has lora_{next(iter(ab))} but not its pair")
        if module not in available:
            raise ValueError(
                f"{root}: module {module!r} is not a linear layer of the base model "
                f"(adapter trained on another architecture?)"
            )
        a, b = ab["A"], ab["B"]
        in_features, out_features = available[module]
        r = int(a.shape[0])
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (out_features, r):
            raise ValueError(
                f"{root}: {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a "
                f"{in_features}->{out_features} layer"
            )
        expected_r = int(pattern_value(rank_pattern, module, r_default))
        if r != expected_r:
            raise ValueError(f"{root}: {module}: rank {r} but adapter_config.json says {expected_r}")
        alpha = float(pattern_value(alpha_pattern, module, alpha_default))
        # The same float expressions PEFT uses, so scalings are bit-identical.
        scalings[module] = alpha / math.sqrt(r) if rslora else alpha / r
        layers[module] = (a, b)
    default_scaling = alpha_default / math.sqrt(r_default) if rslora else alpha_default / r_default
    weights = AdapterWeights(
        ref=ref,
        rank=max(a.shape[0] for a, _ in layers.values()),
        scaling=default_scaling,
        layers=layers,
        layer_scaling={m: s for m, s in scalings.items() if s != default_scaling},
        dora_scale=dora_scales(base_model, layers, magnitudes, scalings, str(root)) if magnitudes else {},
        modules_to_save=saved,
    )
    check_magnitudes(weights, str(root))
    return weights


def check_magnitudes(weights: AdapterWeights, where: str | None = None) -> None:
    """Refuse weights or scalings that are NaN, infinite or above ``MAX_ABS_WEIGHT`` in magnitude.

    Raises:
        ValueError: naming the module (or the scaling) and the adapter.
    """
    where = where or f"adapter {weights.ref!r}"
    for name, (a, b) in weights.layers.items():
        scaling = weights.scaling_for(name)
        if not abs(scaling) <= MAX_ABS_WEIGHT:  # NaN fails too
            raise ValueError(f"{where}: {name}: scaling {scaling} is not finite or too large")
        for which, t in (("lora_A", a), ("lora_B", b)):
            if t.numel() and not bool(t.float().abs().max() <= MAX_ABS_WEIGHT):
                raise ValueError(
                    f"{where}: {name}: {which} holds values that are not finite or too large "
                    f"(|w| > {MAX_ABS_WEIGHT:g})"
                )
    extra = [(f"{n} DoRA factor", t) for n, t in weights.dora_scale.items()]
    extra += [
        (f"modules_to_save {m}.{p}", t) for m, ps in weights.modules_to_save.items() for p, t in ps.items()
    ]
    for what, t in extra:
        if t.numel() and not bool(t.float().abs().max() <= MAX_ABS_WEIGHT):
            raise ValueError(f"{where}: {what} holds values that are not finite or too large")


def replaceable_kind(module: nn.Module) -> str | None:
    """``linear`` / ``embedding`` for a module a ``modules_to_save`` entry may replace, else None
    (quantized bitsandbytes layers and other module types are not served)."""
    if is_bnb(module):
        return None
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _named(entry: str, module: str) -> bool:
    # PEFT's rule for modules_to_save entries: the module path or a dotted suffix of it.
    return module == entry or module.endswith("." + entry)


def split_modules_to_save(
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    base_model: nn.Module,
    skip: Collection[str],
    where: str,
) -> dict[str, dict[str, torch.Tensor]]:
    """The ``modules_to_save`` tensors among ``tensors`` (keys that are neither LoRA nor DoRA),
    grouped by module: ``model.embed_tokens`` -> ``{"weight": ...}``.

    Args:
        tensors: the adapter's non-LoRA, non-DoRA tensors (PEFT keys).
        config: ``adapter_config.json``.
        base_model: the base the adapter runs on.
        skip: ``modules_to_save`` entries to ignore (names or dotted suffixes, e.g. ``score``: a
            reward model's value head, which a causal LM base does not have).
        where: the adapter, for messages.

    Raises:
        ValueError: a tensor that no ``modules_to_save`` entry names, a module the base does not
            have (naming it), a module that cannot be replaced, or tensors that do not match the
            module's parameters.
    """
    entries = [str(e) for e in (config.get("modules_to_save") or [])]
    modules = dict(base_model.named_modules())
    tied = _tied_to_entries(modules, entries) if config.get("ensure_weight_tying") else set()
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module_name, _, param = key.removeprefix(_PEFT_PREFIX).rpartition(".")
        named = module_name in tied or any(_named(e, module_name) for e in entries)
        if not key.startswith(_PEFT_PREFIX) or not named:
            raise ValueError(
                f"{where}: unexpected tensor {key!r} (not LoRA, not DoRA, and no modules_to_save entry "
                f"{entries} names it)"
            )
        if any(_named(s, module_name) for s in skip):
            continue
        grouped.setdefault(module_name, {})[param] = tensor
    missing = sorted(m for m in grouped if m not in modules)
    if missing:
        raise ValueError(
            f"{where}: modules_to_save holds module(s) the base model does not have: {missing} "
            "(a reward model's value head? pass it in skip_modules_to_save)"
        )
    for name, params in grouped.items():
        check_replacement(modules[name], name, params, where)
    return grouped


def _tied_to_entries(modules: Mapping[str, nn.Module], entries: list[str]) -> set[str]:
    """Modules whose weight is the very tensor of a module the entries name (tied input/output
    embeddings): with ``ensure_weight_tying`` PEFT replaces those too and saves their copies."""
    named = [m for n, m in modules.items() if any(_named(e, n) for e in entries)]
    weights = {id(w) for m in named if isinstance(w := getattr(m, "weight", None), torch.Tensor)}
    return {
        n
        for n, m in modules.items()
        if isinstance(w := getattr(m, "weight", None), torch.Tensor) and id(w) in weights
    }


def check_replacement(module: nn.Module, name: str, params: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise ValueError unless ``params`` replace exactly the parameters of ``module`` (same names
    and shapes) and the module is an ``nn.Linear`` / ``nn.Embedding``."""
    if replaceable_kind(module) is None:
        raise ValueError(
            f"{where}: modules_to_save module {name!r} is a {type(module).__name__}; only unquantized "
            "nn.Linear and nn.Embedding modules are served"
        )
    own = {n: p for n, p in module.named_parameters(recurse=False)}
    if set(params) != set(own):
        raise ValueError(
            f"{where}: modules_to_save module {name!r} has tensors {sorted(params)}, but the base's "
            f"module has parameters {sorted(own)}"
        )
    for param, tensor in params.items():
        if tuple(tensor.shape) != tuple(own[param].shape):
            raise ValueError(
                f"{where}: modules_to_save {name}.{param} is {list(tensor.shape)}, but the base's is "
                f"{list(own[param].shape)}"
            )


@torch.no_grad()
def dora_scales(
    base_model: nn.Module,
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    magnitudes: Mapping[str, torch.Tensor],
    scalings: Mapping[str, float],
    where: str,
) -> dict[str, torch.Tensor]:
    """``m = magnitude / ||W + s * B @ A||_row`` per DoRA layer, on the CPU in float32 (PEFT's own
    operations: the norm of the dequantized weight plus ``s * B(A(I))^T``).

    Args:
        base_model: the base (4/8-bit layers are dequantized, as PEFT does).
        layers: module -> ``(A, B)``.
        magnitudes: module -> PEFT's ``lora_magnitude_vector`` ``[out]``; must cover ``layers``.
        scalings: module -> LoRA scaling.
        where: the adapter, for messages.

    Raises:
        ValueError: a layer without its magnitude (or the reverse), a wrong shape, a zero norm.
    """
    from peft.utils.integrations import dequantize_module_weight

    if set(magnitudes) != set(layers):
        odd = sorted(set(magnitudes) ^ set(layers))
        raise ValueError(
            f"{where}: DoRA needs a magnitude vector for exactly the LoRA layers; mismatch at {odd}"
        )
    modules = dict(base_model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for name, (a, b) in layers.items():
        module = modules[name]
        magnitude = magnitudes[name]
        if magnitude.shape != (b.shape[0],):
            raise ValueError(
                f"{where}: {name}: lora_magnitude_vector is {list(magnitude.shape)}, expected [{b.shape[0]}]"
            )
        weight = dequantize_module_weight(module).detach()
        if type(module).__name__ == "Conv1D":  # transformers' Conv1D stores [in, out]
            weight = weight.t()
        device = weight.device
        a32, b32 = a.to(device, torch.float32), b.to(device, torch.float32)
        eye = torch.eye(a32.shape[1], device=device, dtype=torch.float32)
        lora_weight = nn.functional.linear(nn.functional.linear(eye, a32), b32).t()  # [out, in]
        norm = torch.linalg.norm(weight.to(torch.float32) + scalings[name] * lora_weight, dim=1)
        if not bool((norm > 0).all()):
            raise ValueError(f"{where}: {name}: a row of W + s*B@A has zero norm; DoRA is undefined there")
        out[name] = (magnitude.to(device, torch.float32) / norm).cpu()
    return out


@dataclass
class _Rows:
    slot: int
    rows: torch.Tensor
    whole: bool


class _Replaced:
    """One module some resident adapter replaces: its hook and its per-slot parameters."""

    def __init__(self, owner: ModuleReplacements, name: str, module: nn.Module) -> None:
        self.owner, self.name, self.module = owner, name, module
        self.slots: list[dict[str, nn.Parameter] | None] = [None] * owner.num_slots
        # First among the module's hooks: LoRA slot hooks of other rows then add to this output.
        self.handle: RemovableHandle = module.register_forward_hook(self._hook, prepend=True)

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        plan = self.owner._plan
        if not plan or not inputs:
            return None
        x = inputs[0]
        changed = False
        for group in plan:
            params = self.slots[group.slot]
            if params is None:
                continue
            if group.whole:
                return self._forward(params, x).to(out.dtype)
            sub = self._forward(params, x.index_select(0, group.rows))
            out = out.index_copy(0, group.rows, sub.to(out.dtype))
            changed = True
        return out if changed else None

    def _forward(self, params: Mapping[str, nn.Parameter], x: torch.Tensor) -> torch.Tensor:
        """The module's own ``forward`` (not its hooks) with ``params`` in place of its parameters,
        so subclasses such as scaled embeddings compute as they do in the base."""
        module = self.module
        saved = {n: getattr(module, n) for n in params}
        try:
            for n, p in params.items():
                setattr(module, n, p)
            return module.forward(x)  # type: ignore[no-any-return]
        finally:
            for n, p in saved.items():
                setattr(module, n, p)


class ModuleReplacements:
    """Per-slot replacement modules (``modules_to_save``) applied to their adapter's rows only.

    Hooks are added to a module the first time a loaded adapter replaces it and stay until
    :meth:`remove`. Not thread-safe, like :class:`~services.inference.lora_batch.LoraSlots`.
    """

    def __init__(self, model: nn.Module, num_slots: int) -> None:
        self.model, self.num_slots = model, num_slots
        self._modules: dict[str, _Replaced] = {}
        self._plan: list[_Rows] | None = None
        self._slot_has = [False] * num_slots

    def validate(self, ref: str, modules: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Raise ValueError unless every replacement fits its module of this model."""
        if not modules:
            return
        named = dict(self.model.named_modules())
        for name, params in modules.items():
            module = named.get(name)
            if module is None:
                raise ValueError(f"adapter {ref!r} replaces {name!r}, which the base model does not have")
            check_replacement(module, name, params, f"adapter {ref!r}")

    @torch.no_grad()
    def load(self, slot: int, modules: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Put ``modules`` (module -> parameter -> tensor) into ``slot``, cast to each module's own
        dtype and device (PEFT's wrapper copies the base module, so computes in its dtype). Tensors
        already in that dtype and device are shared, not copied: nothing writes to them."""
        self.clear(slot)
        named = dict(self.model.named_modules()) if modules else {}
        for name, params in modules.items():
            replaced = self._modules.get(name)
            if replaced is None:
                replaced = self._modules[name] = _Replaced(self, name, named[name])
            own = dict(replaced.module.named_parameters(recurse=False))
            replaced.slots[slot] = {
                n: nn.Parameter(t.to(own[n].device, own[n].dtype), requires_grad=False)
                for n, t in params.items()
            }
        self._slot_has[slot] = bool(modules)

    def clear(self, slot: int) -> None:
        for replaced in self._modules.values():
            replaced.slots[slot] = None
        self._slot_has[slot] = False

    def set_rows(self, ids: torch.Tensor, device: torch.device) -> None:
        """Rows per slot for the next forwards (``ids`` ``[batch]`` on the CPU, -1 = base)."""
        distinct = sorted({int(s) for s in ids.tolist() if s >= 0 and self._slot_has[s]})
        if not distinct:
            self._plan = None
            return
        everyone = len(distinct) == 1 and bool((ids == distinct[0]).all())
        self._plan = [_Rows(s, (ids == s).nonzero().view(-1).to(device), everyone) for s in distinct]

    def clear_rows(self) -> None:
        self._plan = None

    def remove(self) -> None:
        for replaced in self._modules.values():
            replaced.handle.remove()
        self._modules.clear()
        self._plan = None


__all__ = [
    "MAGNITUDE_KEY_RE",
    "ModuleReplacements",
    "check_replacement",
    "dora_scales",
    "replaceable_kind",
    "split_modules_to_save",
]
