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

DoRA adapters add a per-slot factor ``m`` (``[out]`` per layer, ones for other slots) that scales
their rows' output, ``y = m * (base - bias + delta) + bias`` (``group`` uses PEFT's own expression);
``modules_to_save`` replace whole modules for their rows (``lora_options.ModuleReplacements``).

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

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

# The adapter reader lives in lora_options; re-exported here, where the engine's users import it.
from services.inference.lora_options import (
    MAX_ABS_WEIGHT,
    AdapterWeights,
    ModuleReplacements,
    adapter_weights_from_peft_dir,
    check_magnitudes,
    is_bnb,
    linear_layers,
)

GATHER_THRESHOLD = 2
"""``auto`` mode switches from per-slot groups to a batched mode above this many adapters."""

STACK_MAX_COLS_RATIO = 1.0
"""``auto`` uses ``stack`` while its packed tables have at most this many columns per input feature
of the narrowest adapted layer (C = the sum of the resident adapters' ranks ``<= ratio x
in_features``), else ``gather``."""

Mode = Literal["auto", "group", "gather", "stack"]


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
        # DoRA: per slot the factor m = magnitude / ||W + s*B@A|| ([out]; ones for plain LoRA slots
        # and the zero slot), applied as y = m * (base - bias + delta) + bias (lora_options).
        self.mag = torch.ones(s + 1, out_features, dtype=dt, device=device)
        self.dora = [False] * s
        bias = getattr(module, "bias", None)
        self.bias: torch.Tensor | None = bias if isinstance(bias, torch.Tensor) else None
        # Layers with equal keys (ranks and scalings of every slot) have the same packed column
        # layout, so they share one ``stack`` mask per forward.
        self.pack_key: tuple[tuple[int, ...], tuple[float, ...]] = (tuple(self.ranks), tuple(self.scaling_f))
        # PEFT's bitsandbytes layers cast the delta to the output dtype before adding; its plain
        # Linear adds in the LoRA dtype and casts the sum (differs only for bf16/fp16 bases).
        self.cast_before_add = is_bnb(module)
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

    def _dora(self, base: torch.Tensor, lora: torch.Tensor, slot: int) -> torch.Tensor:
        """PEFT's DoRA output of one slot's rows: ``base + (m - 1) * (base - bias) + m * lora * s``
        (``lora`` = ``B(A(x))`` unscaled), in PEFT's operation order, cast to the base's dtype."""
        m = self.mag[slot]
        plain = base if self.bias is None else base - self.bias
        return (base + ((m - 1) * plain + m * lora * self.scaling_f[slot])).to(base.dtype)

    def _scale_dora_rows(self, z: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``z`` (base + LoRA delta, ``[rows, ..., out]``) with each DoRA row's factor applied:
        ``m * (z - bias) + bias``; rows of other slots have m = 1 and stay exactly as they are."""
        m = self.mag.index_select(0, slots).view(z.shape[0], *([1] * (z.dim() - 2)), self.out_features)
        if self.bias is None:
            return (z * m).to(dtype)
        return (z + (m - 1) * (z - self.bias)).to(dtype)

    def _apply_groups(self, x: torch.Tensor, out: torch.Tensor, plan: _RowPlan) -> torch.Tensor | None:
        changed = False
        for slot, rows, whole in plan.groups:
            r = self.ranks[slot]
            if r == 0:
                continue
            a = self.a_t[slot, :, :r].t().contiguous()  # PEFT's lora_A.weight [r, in]
            b = self.b_t[slot, :r].t().contiguous()  # PEFT's lora_B.weight [out, r]
            xs = (x if whole else x.index_select(0, rows)).to(a.dtype)
            base = out if whole else out.index_select(0, rows)
            if self.dora[slot]:
                new = self._dora(base, F.linear(F.linear(xs, a), b), slot)
            else:  # with ``whole``: no selection, exactly PEFT's single-adapter path
                new = self._add(base, F.linear(F.linear(xs, a), b) * self.scaling_f[slot])
            out = new if whole else out.index_copy(0, rows, new)
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
        z = self._add(out, delta.reshape(*shape[:-1], self.out_features))
        if any(self.dora[s] for s in plan.distinct):
            return self._scale_dora_rows(z, slots, out.dtype)
        return z

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
            z = torch.addmm(out2, h, self.packed_b).view(out.shape)
        else:
            z = self._add(out2, torch.mm(h, self.packed_b)).view(out.shape)
        if any(self.dora[s] for s in plan.distinct):
            return self._scale_dora_rows(z, plan.gather_slots, out.dtype)
        return z

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

    def load(
        self,
        slot: int,
        a: torch.Tensor | None,
        b: torch.Tensor | None,
        scaling: float,
        dora_scale: torch.Tensor | None = None,
    ) -> None:
        self.a_t[slot].zero_()
        self.b_t[slot].zero_()
        self.mag[slot].fill_(1.0)
        self.dora[slot] = dora_scale is not None and a is not None
        if self.dora[slot]:
            assert dora_scale is not None
            self.mag[slot].copy_(dora_scale)
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
    adapter. Not thread-safe: one thread loads slots and runs forwards. An adapter's DoRA factors go
    into the same per-layer tables; its ``modules_to_save`` (any unquantized ``nn.Linear`` /
    ``nn.Embedding`` of the model, ``lm_head`` included) into ``replacements``.

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
        self.replacements = ModuleReplacements(model, num_slots)
        """``modules_to_save`` of the resident adapters, per slot (``lora_options``)."""
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
        for name, scale in weights.dora_scale.items():
            layer = self.layers.get(name)
            if name not in weights.layers or layer is None or scale.shape != (layer.out_features,):
                raise ValueError(
                    f"adapter {weights.ref!r}: DoRA factor of {name!r} {list(scale.shape)} matches no "
                    "LoRA layer of the adapter"
                )
        both = sorted(set(weights.modules_to_save) & set(weights.layers))
        if both:
            raise ValueError(f"adapter {weights.ref!r}: {both} are both LoRA-adapted and replaced")
        self.replacements.validate(weights.ref, weights.modules_to_save)

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
                    layer.load(
                        slot, pair[0], pair[1], weights.scaling_for(name), weights.dora_scale.get(name)
                    )
        self.replacements.load(slot, weights.modules_to_save)
        self.refs[slot] = weights.ref
        self._slot_rank[slot] = weights.rank

    def clear(self, slot: int) -> None:
        """Zero ``slot``; rows still pointing at it get the base model's output."""
        self._check_slot(slot)
        with torch.no_grad():
            for layer in self.layers.values():
                layer.load(slot, None, None, 0.0)
        self.replacements.clear(slot)
        self.refs[slot] = None
        self._slot_rank[slot] = 0

    def set_rows(self, slot_ids: torch.Tensor | None) -> None:
        """Set the slot of each batch row (LongTensor ``[batch]``, -1 = base) for the next forwards."""
        if slot_ids is None:
            self._plan = None
            self.replacements.clear_rows()
            return
        ids = slot_ids.detach().to("cpu", torch.long).view(-1)
        if ids.numel() and (int(ids.max()) >= self.num_slots or int(ids.min()) < -1):
            raise ValueError(f"slot ids must be in [-1, {self.num_slots}), got {ids.tolist()}")
        active = (ids >= 0).nonzero().view(-1)
        if active.numel() == 0:
            self._plan = None
            self.replacements.clear_rows()
            return
        row_slots = ids.index_select(0, active)
        distinct = sorted(set(row_slots.tolist()))
        whole = len(distinct) == 1 and active.numel() == ids.numel()
        device = next(iter(self.layers.values())).a_t.device
        self.replacements.set_rows(ids, device)
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
        self.replacements.remove()
        self._plan = None

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")


__all__ = [
    "GATHER_THRESHOLD",
    "MAX_ABS_WEIGHT",
    "STACK_MAX_COLS_RATIO",
    "AdapterWeights",
    "LoraSlots",
    "Mode",
    "adapter_weights_from_peft_dir",
    "check_magnitudes",
    "linear_layers",
]
