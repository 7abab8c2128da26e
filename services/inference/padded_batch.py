"""The padded KV layout: the engine's fallback for models the paged cache cannot drive.

``kv_cache.paged_attention`` needs a model whose attention modules go through transformers'
attention interface (Llama, Qwen, Glm, GPT-NeoX and most others); ALiBi models (BLOOM, Falcon)
compute their own attention, so they run on this layout, as the engine did before the block cache.

One transformers ``DynamicCache`` for the running batch, every row right-aligned (left padding).
Admitted prompts are prefilled together, left-padded to the longest. Joining pads the shorter side on
the left with zeros and concatenates on the batch dimension; leaving selects the remaining rows and
trims columns that are padding in every row. Each row keeps its own length, from which the
attention mask (padding masked) and position ids (the row's own token count) are built, so every
row computes what it would compute alone.

Prompt adapters: the prefill forward starts from a cache prefilled with every admitted row's virtual
KV (right-aligned in the prefix columns, masked elsewhere) and shifts each row's position ids by its
virtual tokens; afterwards each row's columns are compacted so its cached tokens are contiguous and
right-aligned again (``pad | virtual | prompt``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from services.inference.processors import token_logprobs
from services.inference.prompt_adapters import PromptAdapter, compute_prompt_kv
from services.inference.requests import TokenLogprob
from services.inference.sequence import Seq

if TYPE_CHECKING:
    from services.inference.engine import Engine

logger = logging.getLogger(__name__)


class PaddedBatch:
    """The running batch's rows in one left-padded ``DynamicCache`` (loop thread only)."""

    paged = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cache: Any = None

    def fits(self, seq: Seq, admitted: list[Seq]) -> bool:
        """Admission: the prompts admitted together stay within ``max_prefill_tokens`` (one
        request is always admitted)."""
        budget = self.engine.max_prefill_tokens - sum(len(s.prompt) for s in admitted)
        return not admitted or len(seq.prompt) <= budget

    def unreserve(self, seq: Seq) -> None:
        """Nothing is reserved at admission in this layout."""

    def usage(self) -> tuple[int, int]:
        """Rows in use and batch rows: the only limit of this layout."""
        return len(self.engine._running), self.engine.max_batch_size

    def reset(self) -> None:
        self.cache = None

    def step(self, admitted: list[Seq]) -> int:
        """Prefill the admitted prompts (a failure fails them only), then one decode step for every
        running row (a failure there fails the batch). Returns the prompt tokens prefilled."""
        engine = self.engine
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as e:  # fails the admitted rows only: the running cache is untouched
                logger.exception("prefill failed; failing %d requests", len(admitted))
                engine._fail([s for s in admitted if s not in engine._running], e)
        if engine._running:
            try:
                self._decode_step()
            except Exception as e:  # a model error fails the batch, not the engine
                logger.exception("decode step failed; failing %d requests", len(engine._running))
                with engine._cond:
                    failed, engine._running, self.cache = engine._running, [], None
                engine._fail(failed, e)
        return sum(len(s.prompt) for s in admitted)

    def _prefill(self, admitted: list[Seq]) -> None:
        """Prefill new prompts as one left-padded batch, emit first tokens, merge survivors.

        When the batched forward raises, each prompt is prefilled alone, so the one that breaks the
        forward fails by itself (nothing was emitted or cached before the forward).
        """
        try:
            logits, cache = self._prefill_forward(admitted)
        except Exception:
            if len(admitted) == 1:
                raise
            logger.exception("prefill of %d requests failed; retrying them one by one", len(admitted))
            for seq in admitted:
                try:
                    self._prefill([seq])
                except Exception as e:
                    logger.exception("prefill of request %s failed", seq.handle.request_id)
                    self.engine._fail([seq], e)
            return
        picks, logprobs = self.engine._sample(admitted, logits)
        survivors = [
            i
            for i, (seq, pick, logprob) in enumerate(zip(admitted, picks, logprobs, strict=True))
            if not self.engine._accept(seq, pick, logprob)
        ]
        n = len(admitted)
        if len(survivors) < n:
            with self.engine._cond:
                for i in range(n):
                    if i not in survivors:
                        self.engine._release_slot(admitted[i])
            if not survivors:
                return
            sel = torch.tensor(survivors, device=self.engine.device)
            for layer in self._layers(cache):
                layer.keys = layer.keys.index_select(0, sel)
                layer.values = layer.values.index_select(0, sel)
        self._join([admitted[i] for i in survivors], cache)

    def _prefill_forward(self, admitted: list[Seq]) -> tuple[torch.Tensor, Any]:
        """The prefill forward of ``admitted``: last-position logits ``[rows, vocab]`` and the cache."""
        from transformers import DynamicCache

        width = max(len(s.prompt) for s in admitted)
        n = len(admitted)
        ids = torch.full((n, width), self.engine.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, seq in enumerate(admitted):
            ids[i, width - len(seq.prompt) :] = torch.tensor(seq.prompt)
            mask[i, width - len(seq.prompt) :] = 1
            seq.length = seq.virtual + len(seq.prompt)
            seq.admitted_at = time.monotonic()
        # PeftModel shifts a prompt adapter's real tokens by its virtual tokens.
        shift = torch.tensor([s.virtual for s in admitted])[:, None]
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + shift
        cache = DynamicCache(config=self.engine._model_config)
        if any(s.virtual for s in admitted):
            mask = torch.cat([self._prefill_virtual(admitted, cache), mask], dim=1)
        self.engine.slots.set_rows(torch.tensor([s.slot for s in admitted]))
        want_prompt = any(s.prompt_logprobs_k is not None for s in admitted)
        out = self.engine._forward(ids, mask, positions, cache, logits_to_keep=0 if want_prompt else 1)
        self.engine._counters["prefills"] += 1
        if want_prompt:
            for i, seq in enumerate(admitted):
                if seq.prompt_logprobs_k is not None:
                    seq.prompt_logprobs = _prompt_logprobs(out.logits[i], seq.prompt, seq.prompt_logprobs_k)
        if n > 1 and bool((mask == 0).any()):
            # Padded positions hold keys/values of pad tokens; zero them so nothing non-finite can
            # leak through a masked attention weight.
            keep = mask.bool().to(self.engine.device)[:, None, :, None]
            for layer in self._layers(cache):
                layer.keys = torch.where(keep, layer.keys, 0.0)
                layer.values = torch.where(keep, layer.values, 0.0)
            if mask.shape[1] > width:
                _compact_rows(self._layers(cache), mask.to(self.engine.device))
        return out.logits[:, -1, :], cache

    def _prefill_virtual(self, admitted: list[Seq], cache: Any) -> torch.Tensor:
        """Fill ``cache`` with the admitted rows' virtual KV: ``V`` = the most virtual tokens of any
        row, each row's right-aligned in those columns (zeros elsewhere). P-tuning / prompt-tuning
        adapters get their KV computed here first, once (the plain base, on this thread).

        Returns:
            The prefix's attention mask ``[rows, V]``.
        """
        width = max(s.virtual for s in admitted)
        mask = torch.zeros((len(admitted), width), dtype=torch.long)
        adapters = [s.adapter if isinstance(s.adapter, PromptAdapter) else None for s in admitted]
        for adapter in adapters:
            if adapter is not None and not adapter.has_kv:
                self.engine.slots.set_rows(None)
                compute_prompt_kv(self.engine.model, adapter, self.engine._model_config)
        layout = self.engine.kv_layout
        assert layout is not None  # submit refuses prompt adapters otherwise
        first = next(a for a in adapters if a is not None)
        dtype = first.keys[0].dtype
        shape = (len(admitted), layout.kv_heads, width, layout.head_dim)
        for layer in range(layout.layers):
            keys = torch.zeros(shape, dtype=dtype, device=self.engine.device)
            values = torch.zeros(shape, dtype=dtype, device=self.engine.device)
            for i, adapter in enumerate(adapters):
                if adapter is not None:
                    nv = adapter.num_virtual_tokens
                    keys[i, :, width - nv :] = adapter.keys[layer]
                    values[i, :, width - nv :] = adapter.values[layer]
                    mask[i, width - nv :] = 1
            cache.update(keys, values, layer)
        return mask

    def _layers(self, cache: Any) -> list[Any]:
        layers = list(cache.layers)
        for layer in layers:
            if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
                raise NotImplementedError("sliding-window or non-dynamic KV caches are not supported")
        return layers

    def _join(self, seqs: list[Seq], cache: Any) -> None:
        """Append rows (with their cache) to the running batch, left-padding the narrower side."""
        with self.engine._cond:
            if not self.engine._running:
                self.engine._running, self.cache = list(seqs), cache
                self._trim()
                return
            old_layers, new_layers = self._layers(self.cache), self._layers(cache)
            t_old, t_new = old_layers[0].keys.shape[-2], new_layers[0].keys.shape[-2]
            width = max(t_old, t_new)
            for old, new in zip(old_layers, new_layers, strict=True):
                old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
                old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
            self.engine._running.extend(seqs)

    def remove(self, leaving: list[Seq]) -> None:
        """Drop rows from the batch and its cache (slots are released by the caller)."""
        if not leaving:
            return
        gone = {id(s) for s in leaving}
        keep = [i for i, s in enumerate(self.engine._running) if id(s) not in gone]
        self.engine._running = [self.engine._running[i] for i in keep]
        if not self.engine._running:
            self.cache = None
            return
        sel = torch.tensor(keep, device=self.engine.device)
        for layer in self._layers(self.cache):
            layer.keys = layer.keys.index_select(0, sel)
            layer.values = layer.values.index_select(0, sel)
        self._trim()

    def _trim(self) -> None:
        """Drop leading cache columns that are padding in every row."""
        layers = self._layers(self.cache)
        width = layers[0].keys.shape[-2]
        needed = max(s.length for s in self.engine._running)
        if needed < width:
            for layer in layers:
                layer.keys = layer.keys[:, :, width - needed :, :]
                layer.values = layer.values[:, :, width - needed :, :]

    def _decode_step(self) -> None:
        rows = self.engine._running
        width = self._layers(self.cache)[0].keys.shape[-2]
        lengths = torch.tensor([s.length for s in rows])
        ids = torch.tensor([[s.generated[-1]] for s in rows])
        mask = (torch.arange(width + 1)[None, :] >= (width - lengths)[:, None]).long()
        positions = lengths[:, None]
        self.engine.slots.set_rows(torch.tensor([s.slot for s in rows]))
        out = self.engine._forward(ids, mask, positions, self.cache)
        for seq in rows:
            seq.length += 1
        picks, logprobs = self.engine._sample(rows, out.logits[:, -1, :])
        finished = [
            seq
            for seq, pick, logprob in zip(rows, picks, logprobs, strict=True)
            if self.engine._accept(seq, pick, logprob)
        ]
        if finished:
            with self.engine._cond:
                for seq in finished:
                    self.engine._release_slot(seq)
                self.remove(finished)


def _compact_rows(layers: list[Any], mask: torch.Tensor) -> None:
    """Move each row's cached tokens (``mask`` 1, ``[rows, T]``) to the right end of its columns, in
    order, with the masked (zeroed) columns before them: ``pad | virtual | pad | prompt`` becomes
    ``pad | virtual | prompt``, the layout decode steps assume."""
    order = torch.argsort(mask, dim=1, stable=True)  # zeros first, each group in its own order
    if bool((order == torch.arange(mask.shape[1], device=mask.device)).all()):
        return
    for layer in layers:
        index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad a ``[batch, heads, seq, dim]`` tensor with zeros to ``width`` positions."""
    missing = width - t.shape[-2]
    if missing <= 0:
        return t
    pad = torch.zeros(*t.shape[:-2], missing, t.shape[-1], dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=-2)


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> tuple[TokenLogprob, ...]:
    """Every prompt token's logprob from one row's prefill logits ``[width, vocab]`` (left-padded:
    the prompt fills the last ``len(prompt)`` positions). The logits at position ``p`` predict the
    token at ``p + 1``, so token ``j >= 1`` reads position ``width - len(prompt) + j - 1``; token 0
    has no logprob."""
    n = len(prompt)
    width = logits.shape[0]
    first = TokenLogprob(prompt[0], None, ())
    if n == 1:
        return (first,)
    rest = token_logprobs(logits[width - n : width - 1], prompt[1:], [k] * (n - 1))
    return (first, *rest)
