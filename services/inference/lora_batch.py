"""Batched multi-LoRA application: one forward over a batch whose rows use different adapters.

Every LoRA-target linear layer of the base model (``nn.Linear``, bitsandbytes ``Linear4bit`` /
``Linear8bitLt``, transformers ``Conv1D``) gets a forward hook that adds, per row, the delta of that
row's adapter slot::

    y = base(x) + scaling_s * (x @ A_s^T) @ B_s^T        (nothing for rows with slot -1: the base)

Adapter weights live in per-layer *slot tables* of fixed size (``num_slots`` x ``max_rank``, plus
one always-zero slot for base rows), so loading an adapter is a copy into preallocated memory (no
per-request model copies, no module surgery, no reallocation), and adapters of different ranks share
one table: a rank-r adapter fills the first r columns of ``A^T`` / rows of ``B^T`` and the rest stay
zero.

Three ways to apply the deltas over the same tables:

* ``group``: rows are grouped by slot; per distinct slot two matmuls at the slot's real rank on its
  rows (``index_select`` / ``index_copy``, skipped when every row uses that slot). The arithmetic is
  exactly PEFT's (same ``F.linear`` calls on contiguous ``[r, in]`` / ``[out, r]`` weights, same
  scaling and dtype casts), so tokens equal a plain ``PeftModel`` bit for bit.
* ``gather``: every row gathers its slot's ``A^T`` / ``B^T`` (base rows gather the zero slot) and
  the deltas are two ``bmm`` calls at the batch's largest real rank (smaller ranks multiply by
  zero padding); no row selection or scatter. The number of operations no longer grows with the
  number of distinct adapters in the batch (Punica's BGMV idea).
* ``stack``: every resident adapter's ``A^T`` packed side by side at its real rank (``[in, C]``,
  C = the sum of resident ranks) and its ``B^T`` stacked (``[C, out]``). One matmul gives every row
  ``x @ A^T`` for every slot, a ``[rows, C]`` mask keeps the row's own slot's columns (times its
  scaling; all zero for base rows) and one ``addmm`` adds the delta: three operations per layer
  and no per-row weight copies, at the price of multiplying every row by all C columns.

``gather`` and ``stack`` round differently from PEFT only in summation order (logits within 1e-4).

``auto`` (the default) picks by measurement (``tests`` check all three against PEFT; the per-forward
timings behind the thresholds are in bench/README.md, "LoRA modes of a decode step"):

* at most ``GATHER_THRESHOLD`` distinct adapters in the batch: ``group`` (fewest operations then);
* more, while C <= ``STACK_MAX_COLS_RATIO`` x the narrowest adapted layer's input size: ``stack``
  for decode steps (one token per row: one matmul over every slot's packed columns beats a gather
  per row) and ``gather`` for prefills, where a row's many tokens share one gathered table while
  ``stack`` would multiply each of them by every slot's columns;
* more resident rank than that: ``gather`` (the packed columns outgrow the layer itself).

At these sizes the cost is per-operation overhead and the padded arithmetic; on a GPU the same
choice would be made by kernels (S-LoRA's MBGMM, Punica's SGMV), which this CPU build has none of.

Why our own batched LoRA and not PEFT's ``model.generate(..., adapter_names=[...])``: measured by
``bench/inference_bench.py`` (configuration ``static_peft_mixed`` against ``lorafleet``, same
requests, same run); the figures are in ``bench/results.json`` (key ``inference``) and the table in
the README. PEFT's mixed batch loops over the distinct adapters in every layer with boolean-mask
indexing and re-checks its adapter bookkeeping per call, and its adapter set is fixed at
``generate`` time, so it cannot add or drop rows between decode steps (no continuous batching)
anyway. Our hooks do one index computation per step (``set_rows``) and reuse it in every layer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

GATHER_THRESHOLD = 2
"""``auto`` mode switches from per-slot groups to a batched mode above this many adapters."""

STACK_MAX_COLS_RATIO = 1.0
"""``auto`` uses ``stack`` while its packed tables have at most this many columns per input feature
of the narrowest adapted layer (C = the sum of the resident adapters' ranks ``<= ratio x
in_features``), else ``gather``."""

MAX_ABS_WEIGHT = 1e6
"""The largest LoRA weight or scaling magnitude accepted (trained ones are below ~10). In ``stack``
mode every row multiplies every resident adapter's columns and a mask zeroes the foreign ones, so a
NaN, an infinity, or a weight large enough that ``x @ A`` overflows float32 would reach every row of
the batch (0 x inf = NaN), not just the adapter's own; such adapters are refused when loaded."""

_PEFT_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_OUTPUT_HEADS = frozenset({"lm_head", "embed_out", "output_layer"})

Mode = Literal["auto", "group", "gather", "stack"]


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
    """

    ref: str
    rank: int
    scaling: float
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    layer_scaling: dict[str, float] = field(default_factory=dict)

    def scaling_for(self, module_name: str) -> float:
        """The scaling of one module."""
        return self.layer_scaling.get(module_name, self.scaling)

    @property
    def nbytes(self) -> int:
        """Bytes of all A and B tensors (what an adapter cache budgets against)."""
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.layers.values()
        )


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


def _is_bnb(module: nn.Module) -> bool:
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


def adapter_weights_from_peft_dir(path: str | Path, ref: str, base_model: nn.Module) -> AdapterWeights:
    """Read a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Checks everything that would otherwise make the adapter serve wrong outputs silently: the PEFT
    type, variants this engine does not implement (DoRA, LoRA bias, ``modules_to_save``, embedding
    LoRA), that every weight names a linear layer of ``base_model`` with matching shapes, and that
    the adapter adapts at least one layer (vLLM once served the base for an adapter matching none).

    Args:
        path: the adapter directory.
        ref: identity to give the result (see ``AdapterWeights.ref``).
        base_model: the base model the adapter will run on (only module names and shapes are read).

    Returns:
        The weights as float tensors on the CPU, in the dtype they were saved in.

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
            ("DoRA (use_dora)", config.get("use_dora")),
            ("LoRA bias (lora_bias)", config.get("lora_bias")),
            ("modules_to_save", config.get("modules_to_save")),
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
    for key, tensor in tensors.items():
        match = _PEFT_KEY_RE.match(key)
        if match is None:
            raise ValueError(f"{root}: unexpected tensor {key!r} (embedding LoRA, biases or extra modules?)")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    if not pairs:
        raise ValueError(f"{root}: the adapter holds no LoRA weights")

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


class _SlotLayer:
    """One wrapped linear layer: its slot tables and the hook that applies them.

    The tables are stored in the layout the batched path multiplies with: ``a_t[slot]`` is ``A^T``
    (``[in, max_rank]``) and ``b_t[slot]`` is ``B^T`` (``[max_rank, out]``), so a per-row gather gives
    ``bmm``-ready contiguous operands. They hold one extra, always-zero slot (index ``num_slots``)
    that base rows gather, so a mixed batch needs no row selection or scatter at all. The
    per-slot path copies the slot's ``A`` / ``B`` back to PEFT's layout (contiguous ``[r, in]`` /
    ``[out, r]``) so its ``F.linear`` calls are PEFT's exactly.
    """

    def __init__(
        self, owner: LoraSlots, name: str, module: nn.Module, feats: tuple[int, int], device: torch.device
    ) -> None:
        self.owner = owner
        self.name = name
        in_features, out_features = feats
        self.in_features, self.out_features = in_features, out_features
        s, r, dt = owner.num_slots, owner.max_rank, owner.dtype
        self.a_t = torch.zeros(s + 1, in_features, r, dtype=dt, device=device)
        self.b_t = torch.zeros(s + 1, r, out_features, dtype=dt, device=device)
        # The ``stack`` mode's packed tables: every resident slot's A^T side by side at its real
        # rank (``packed_a`` [in, C]) and its B^T stacked (``packed_b`` [C, out]); ``col_slot`` /
        # ``col_scale`` give each of the C columns its slot and scaling. Rebuilt on first use after
        # a load or clear (``_packed_stale``).
        self.packed_a = torch.zeros(in_features, 0, dtype=dt, device=device)
        self.packed_b = torch.zeros(0, out_features, dtype=dt, device=device)
        self.col_slot = torch.zeros(0, dtype=torch.long, device=device)
        self.col_scale = torch.zeros(0, dtype=dt, device=device)
        self._packed_stale = False
        self.scaling = torch.zeros(s + 1, dtype=dt, device=device)
        self.ranks = [0] * s  # 0 = this slot's adapter does not adapt this layer
        self.scaling_f = [0.0] * s
        # Layers with equal keys (ranks and scalings of every slot) have the same packed column
        # layout, so they share one ``stack`` mask per forward.
        self.pack_key: tuple[tuple[int, ...], tuple[float, ...]] = (tuple(self.ranks), tuple(self.scaling_f))
        # PEFT's bitsandbytes layers cast the delta to the output dtype before adding; its plain
        # Linear adds in the LoRA dtype and casts the sum (differs only for bf16/fp16 bases).
        self.cast_before_add = _is_bnb(module)
        self.handle: RemovableHandle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        plan = self.owner._plan
        if plan is None or not inputs:
            return None
        x = inputs[0]
        mode = plan.mode if x.dim() < 3 or x.shape[-2] == 1 else plan.multi_token_mode
        if mode == "stack":
            return self._apply_stack(x, out, plan)
        if mode == "gather":
            return self._apply_gather(x, out, plan)
        return self._apply_groups(x, out, plan)

    def _add(self, out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.cast_before_add:
            return out + delta.to(out.dtype)
        return (out + delta).to(out.dtype)

    def _apply_groups(self, x: torch.Tensor, out: torch.Tensor, plan: _RowPlan) -> torch.Tensor | None:
        changed = False
        for slot, rows, whole in plan.groups:
            r = self.ranks[slot]
            if r == 0:
                continue
            a = self.a_t[slot, :, :r].t().contiguous()  # PEFT's lora_A.weight [r, in]
            b = self.b_t[slot, :r].t().contiguous()  # PEFT's lora_B.weight [out, r]
            if whole:  # every row uses this slot: no selection, exactly PEFT's single-adapter path
                out = self._add(out, F.linear(F.linear(x.to(a.dtype), a), b) * self.scaling_f[slot])
            else:
                xs = x.index_select(0, rows).to(a.dtype)
                delta = F.linear(F.linear(xs, a), b) * self.scaling_f[slot]
                out = out.index_copy(0, rows, self._add(out.index_select(0, rows), delta))
            changed = True
        return out if changed else None

    def _apply_gather(self, x: torch.Tensor, out: torch.Tensor, plan: _RowPlan) -> torch.Tensor | None:
        r = max(self.ranks[s] for s in plan.distinct)
        if r == 0:
            return None
        slots = plan.gather_slots  # every row; base rows point at the zero slot
        a_t, b_t = self.a_t, self.b_t
        if r < self.owner.max_rank:  # multiply at the batch's largest real rank, not max_rank
            a_t, b_t = a_t[:, :, :r], b_t[:, :r]
        shape = x.shape
        xs = x.reshape(shape[0], -1, shape[-1]).to(a_t.dtype)  # [n, tokens, in]
        # Gathered per forward, not kept across decode steps: the per-row copies (batch x rank x
        # (in + out) per layer) would fall out of cache where the small slot tables stay in it.
        h = torch.bmm(xs, a_t.index_select(0, slots))  # [n, tokens, r]
        h = h * self.scaling.index_select(0, slots).view(-1, 1, 1)
        delta = torch.bmm(h, b_t.index_select(0, slots))  # [n, tokens, out]
        return self._add(out, delta.reshape(*shape[:-1], self.out_features))

    def _apply_stack(self, x: torch.Tensor, out: torch.Tensor, plan: _RowPlan) -> torch.Tensor | None:
        if max(self.ranks[s] for s in plan.distinct) == 0:
            return None
        if self._packed_stale:
            self._repack()
        mask = plan.stack_mask(self)  # [n, C]: the row's slot scaling on its slot's columns, else 0
        shape = x.shape
        n, cols = shape[0], self.packed_a.shape[1]
        x2 = x.reshape(-1, shape[-1]).to(self.packed_a.dtype)
        h = torch.mm(x2, self.packed_a)  # [n*tokens, C]: x @ A^T of every resident slot at once
        if h.shape[0] == n:
            h.mul_(mask)
        else:  # several tokens per row: one mask row per sequence, broadcast over its tokens
            h.view(n, -1, cols).mul_(mask.unsqueeze(1))
        out2 = out.reshape(-1, self.out_features)
        if out.dtype == h.dtype:
            return torch.addmm(out2, h, self.packed_b).view(out.shape)
        return self._add(out2, torch.mm(h, self.packed_b)).view(out.shape)

    def _repack(self) -> None:
        live = [k for k, r in enumerate(self.ranks) if r > 0]
        self.packed_a = torch.cat([self.a_t[k, :, : self.ranks[k]] for k in live] or [self.a_t[0, :, :0]], 1)
        self.packed_b = torch.cat([self.b_t[k, : self.ranks[k]] for k in live] or [self.b_t[0, :0]], 0)
        device = self.packed_a.device
        columns = [k for k in live for _ in range(self.ranks[k])]
        self.col_slot = torch.tensor(columns, dtype=torch.long, device=device)
        self.col_scale = torch.tensor(
            [self.scaling_f[k] for k in columns], dtype=self.packed_a.dtype, device=device
        )
        self._packed_stale = False

    def load(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        self.a_t[slot].zero_()
        self.b_t[slot].zero_()
        if a is None or b is None:
            self.ranks[slot], self.scaling_f[slot] = 0, 0.0
            self.scaling[slot] = 0.0
        else:
            r = a.shape[0]
            self.a_t[slot, :, :r].copy_(a.t())
            self.b_t[slot, :r].copy_(b.t())
            self.ranks[slot], self.scaling_f[slot] = r, scaling
            self.scaling[slot] = scaling
        self.pack_key = (tuple(self.ranks), tuple(self.scaling_f))
        self._packed_stale = True


@dataclass
class _RowPlan:
    """Which rows of the next forward use which slot; computed once, used by every layer.

    ``groups`` holds ``(slot, rows, whole)`` (``whole``: every row of the batch uses that slot),
    empty unless ``mode`` or ``multi_token_mode`` is ``group``;
    ``gather_slots`` is the slot of every row with base rows mapped to the always-zero slot
    (``num_slots``), which owns no packed column.
    """

    groups: list[tuple[int, torch.Tensor, bool]]
    distinct: list[int]
    gather_slots: torch.Tensor
    mode: Literal["group", "gather", "stack"]
    multi_token_mode: Literal["group", "gather", "stack"]  # for inputs of several tokens per row (prefill)
    _masks: dict[tuple[tuple[int, ...], tuple[float, ...]], torch.Tensor] = field(default_factory=dict)

    def stack_mask(self, layer: _SlotLayer) -> torch.Tensor:
        """``[rows, C]``: each packed column's scaling where the column belongs to the row's slot,
        else 0. Layers with the same packed layout share one mask per forward (usually all do)."""
        mask = self._masks.get(layer.pack_key)
        if mask is None:
            hit = layer.col_slot.unsqueeze(0) == self.gather_slots.unsqueeze(1)
            mask = hit.to(layer.col_scale.dtype).mul_(layer.col_scale)
            self._masks[layer.pack_key] = mask
        return mask


class LoraSlots:
    """Per-layer slot tables of LoRA weights, applied per batch row by forward hooks.

    Typical use (the engine does this)::

        slots = LoraSlots(model, None, num_slots=8, max_rank=16)
        slots.load(0, weights_a)
        slots.load(1, weights_b)
        slots.set_rows(torch.tensor([0, -1, 1, 0]))  # row 1 is the base model
        logits = model(input_ids).logits

    The row assignment applies to every forward until the next ``set_rows``; ``set_rows(None)`` (or
    all -1) makes the model the plain base again. Hooks cost nothing measurable when no row uses an
    adapter. Not thread-safe: one thread loads slots and runs forwards.

    Args:
        model: the base model; its modules are hooked in place (``remove()`` unhooks).
        target_module_names: which linear layers get tables: leaf names (``q_proj``), dotted suffixes
            (``self_attn.q_proj``) or qualified names; None = every linear layer but the output head.
            Adapters may only adapt layers listed here.
        num_slots: adapters resident at once.
        max_rank: the largest rank an adapter may have.
        dtype: dtype of the tables and of the LoRA arithmetic. float32 matches PEFT, which keeps
            adapters in float32 over bf16/fp16 and 4-bit bases (``autocast_adapter_dtype``).
        mode: ``group``, ``gather`` or ``auto`` (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        target_module_names: Iterable[str] | None,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype = torch.float32,
        mode: Mode = "auto",
    ) -> None:
        if num_slots < 1 or max_rank < 1:
            raise ValueError(f"num_slots ({num_slots}) and max_rank ({max_rank}) must be >= 1")
        if mode not in ("auto", "group", "gather", "stack"):
            raise ValueError(f"mode must be auto, group, gather or stack, not {mode!r}")
        self.num_slots, self.max_rank, self.dtype, self.mode = num_slots, max_rank, dtype, mode
        available = linear_layers(model)
        if target_module_names is None:
            chosen = list(available)
        else:
            wanted = list(target_module_names)
            chosen = [n for n in available if any(n == t or n.endswith("." + t) for t in wanted)]
            unmatched = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in available)]
            if unmatched:
                raise ValueError(f"target modules {unmatched} match no linear layer of the model")
        if not chosen:
            raise ValueError("the model has no linear layer to put LoRA slots on")
        modules = dict(model.named_modules())
        self.layers: dict[str, _SlotLayer] = {}
        for name in chosen:
            module = modules[name]
            param = next(module.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            self.layers[name] = _SlotLayer(self, name, module, available[name], device)
        self._min_in = min(layer.in_features for layer in self.layers.values())
        self.refs: list[str | None] = [None] * num_slots
        self._slot_rank = [0] * num_slots  # largest rank of each slot's adapter over its layers
        self._plan: _RowPlan | None = None

    def validate(self, weights: AdapterWeights) -> None:
        """Raise ValueError if ``weights`` cannot be loaded into a slot (rank, modules, shapes)."""
        if not weights.layers:
            raise ValueError(f"adapter {weights.ref!r} has no layers")
        for name, (a, b) in weights.layers.items():
            layer = self.layers.get(name)
            if layer is None:
                raise ValueError(
                    f"adapter {weights.ref!r} adapts {name!r}, which is not a LoRA target of this engine"
                )
            r = a.shape[0]
            if r > self.max_rank:
                raise ValueError(
                    f"adapter {weights.ref!r}: rank {r} at {name} exceeds max_rank {self.max_rank}"
                )
            if a.shape != (r, layer.in_features) or b.shape != (layer.out_features, r):
                raise ValueError(
                    f"adapter {weights.ref!r}: {name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                    f"{layer.in_features}->{layer.out_features}"
                )

    def load(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter into ``slot`` (replacing what was there). Validates first (shapes, and
        ``check_magnitudes``, once per copy rather than per request): on error the slot is unchanged."""
        self._check_slot(slot)
        self.validate(weights)
        check_magnitudes(weights)
        with torch.no_grad():
            for name, layer in self.layers.items():
                pair = weights.layers.get(name)
                if pair is None:
                    layer.load(slot, None, None, 0.0)
                else:
                    layer.load(slot, pair[0], pair[1], weights.scaling_for(name))
        self.refs[slot] = weights.ref
        self._slot_rank[slot] = weights.rank

    def clear(self, slot: int) -> None:
        """Zero ``slot``; rows still pointing at it get the base model's output."""
        self._check_slot(slot)
        with torch.no_grad():
            for layer in self.layers.values():
                layer.load(slot, None, None, 0.0)
        self.refs[slot] = None
        self._slot_rank[slot] = 0

    def set_rows(self, slot_ids: torch.Tensor | None) -> None:
        """Set the slot of each batch row (LongTensor ``[batch]``, -1 = base) for the next forwards."""
        if slot_ids is None:
            self._plan = None
            return
        ids = slot_ids.detach().to("cpu", torch.long).view(-1)
        if ids.numel() and (int(ids.max()) >= self.num_slots or int(ids.min()) < -1):
            raise ValueError(f"slot ids must be in [-1, {self.num_slots}), got {ids.tolist()}")
        active = (ids >= 0).nonzero().view(-1)
        if active.numel() == 0:
            self._plan = None
            return
        row_slots = ids.index_select(0, active)
        distinct = sorted(set(row_slots.tolist()))
        whole = len(distinct) == 1 and active.numel() == ids.numel()
        device = next(iter(self.layers.values())).a_t.device
        mode = self._choose(len(distinct))
        multi_token_mode = "gather" if self.mode == "auto" and mode == "stack" else mode
        # Row groups cost a few operations per distinct adapter: built only if a mode will read them.
        groups = (
            [(s, active[row_slots == s].to(device), whole) for s in distinct]
            if "group" in (mode, multi_token_mode)
            else []
        )
        self._plan = _RowPlan(
            groups=groups,
            distinct=distinct,
            gather_slots=torch.where(ids >= 0, ids, self.num_slots).to(device),
            mode=mode,
            multi_token_mode=multi_token_mode,
        )

    def _choose(self, n_distinct: int) -> Literal["group", "gather", "stack"]:
        if self.mode != "auto":
            return self.mode
        if n_distinct <= GATHER_THRESHOLD:
            return "group"
        if sum(self._slot_rank) <= STACK_MAX_COLS_RATIO * self._min_in:
            return "stack"
        return "gather"

    def remove(self) -> None:
        """Unhook every layer: the model is the plain base model again."""
        for layer in self.layers.values():
            layer.handle.remove()
        self._plan = None

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")
