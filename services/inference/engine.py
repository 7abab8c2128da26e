"""The generation engine: continuous batching of requests for many LoRA adapters over one base model.

One background thread owns the model and runs the decode loop. Each iteration:

1. drops rows whose request was cancelled (their adapter slot was already released by ``cancel``);
2. admits waiting requests, round-robin over the adapters that have requests waiting (so a burst
   for one adapter cannot starve the others), while the batch has room and an adapter slot can be
   found; loads adapters into free slots (least recently used slot first);
3. prefills the admitted prompts together (left-padded) and emits their first token (keeping the
   logits of every prompt position only when an admitted request asked for prompt logprobs);
4. merges their KV cache into the running batch and runs ONE decode step for every row, rows of
   different adapters and base rows in the same forward (``LoraSlots`` applies each row's delta);
5. emits tokens, and removes finished rows from the batch.

KV cache layout: one transformers ``DynamicCache`` for the running batch, every row right-aligned
(left padding). Joining pads the shorter side on the left with zeros and concatenates on the batch
dimension; leaving selects the remaining rows and trims columns that are padding in every row. Each
row keeps its own length, from which the attention mask (padding masked) and position ids (the
row's own token count) are built, so every row computes what it would compute alone.

Prompt adapters (``prompt_adapters.PromptAdapter``: prefix tuning / P-tuning v2, P-tuning, prompt
tuning) take no adapter slot: their rows are base rows for the LoRA hooks (slot -1) whose cache
holds the adapter's virtual keys and values in front of the prompt (``pad | virtual | prompt``),
as PeftModel's does. The prefill forward starts from a cache prefilled with every admitted row's
virtual KV (right-aligned in the prefix columns, masked elsewhere) and shifts each row's position
ids by its virtual tokens; afterwards each row's columns are compacted so its cached tokens are
contiguous and right-aligned again. Decoding is unchanged: a row's length counts its virtual
tokens, and so does ``max_context``.

Adapter slots (``slot_pool.SlotPool``) are reference-counted by in-flight requests; when no slot
can be had, the request waits. Tokens are picked by ``processors.pick_tokens``; a request that asked
for logprobs gets them from its own row's raw logits (``processors.token_logprobs``), so rows of
other adapters in the same batch neither change nor pay for them.

The engine works in token ids and tensors only: text and stop strings are the plane's
(``detokenizer.py``), which reaches in through ``GenerationRequest.stop_check``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from services.inference.errors import (
    EngineClosedError,
    NonFiniteLogitsError,
    PromptTooLongError,
    QueueFullError,
    RequestFailedError,
)
from services.inference.lora_batch import AdapterWeights, LoraSlots, Mode
from services.inference.processors import Pick, TokenSampler, pick_tokens, token_logprobs
from services.inference.prompt_adapters import KvLayout, PromptAdapter, compute_prompt_kv, virtual_tokens
from services.inference.requests import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineObserver,
    GenerationRequest,
    GenerationResult,
    RequestHandle,
    TokenLogprob,
)
from services.inference.reward_heads import ScoreJob, score_forward
from services.inference.slot_pool import SlotPool

logger = logging.getLogger(__name__)

_BASE_KEY = ""  # waiting-queue key of base-model requests


class _Seq:
    """Engine-side state of one request."""

    def __init__(self, handle: RequestHandle, request: GenerationRequest, stop_ids: frozenset[int]) -> None:
        self.handle = handle
        self.prompt = [int(t) for t in request.prompt_ids]
        self.adapter = request.adapter
        self.key = request.adapter.ref if request.adapter is not None else _BASE_KEY
        self.virtual = virtual_tokens(request.adapter)  # prompt adapters' tokens in front of the prompt
        self.max_new_tokens = request.params.new_tokens
        self.stop_ids = stop_ids
        self.stop_check = request.stop_check
        self.sampler = TokenSampler(request.params)
        self.logprobs = request.params.logprobs
        self.prompt_logprobs_k = request.params.prompt_logprobs
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # set at prefill when asked
        self.generated: list[int] = []
        self.slot = -1
        self.slot_held = False
        self.cancelled = False
        self.length = 0  # tokens in the KV cache for this row
        self.last_token_at = 0.0
        self.admitted_at = 0.0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt + self.generated


class Engine:
    """Continuous-batching generation over one base model with many LoRA adapters.

    Args:
        model: a transformers causal LM (fp32/bf16/fp16 or bitsandbytes 4/8-bit); put in eval mode.
        num_slots: adapters resident at once (see ``LoraSlots``).
        max_rank: the largest adapter rank accepted.
        target_modules: linear layers adapters may adapt; None = all but the output head.
        max_batch_size: rows decoded together.
        max_queued: requests waiting for admission before ``submit`` raises ``QueueFullError``.
        max_context: tokens a sequence (prompt + generated) may hold; None = the model's
            ``max_position_embeddings``.
        max_prefill_tokens: prompt tokens prefilled per iteration (at least one request is always
            admitted); bounds how long one iteration stalls the running rows.
        lora_dtype: dtype of the slot tables (float32 matches PEFT).
        lora_mode: ``auto``, ``group`` or ``gather`` (see ``lora_batch``).
        observer: metric hooks.
        eos_token_ids: end-of-sequence tokens when the model's generation config names none (the
            tokenizer's, say).
        start: start the loop thread now (else call ``start()``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_slots: int = 8,
        max_rank: int = 64,
        target_modules: Sequence[str] | None = None,
        max_batch_size: int = 32,
        max_queued: int = 1024,
        max_context: int | None = None,
        max_prefill_tokens: int = 4096,
        lora_dtype: torch.dtype = torch.float32,
        lora_mode: Mode = "auto",
        observer: EngineObserver | None = None,
        eos_token_ids: Sequence[int] = (),
        start: bool = True,
    ) -> None:
        if max_batch_size < 1 or max_queued < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queued >= 0")
        self.model = model.eval()
        from transformers import PreTrainedConfig

        config = getattr(model, "config", None)
        # The KV cache is built from the config (layer types: full or sliding-window attention).
        self._model_config: PreTrainedConfig | None = config if isinstance(config, PreTrainedConfig) else None
        model_ctx = getattr(config, "max_position_embeddings", None)
        if max_context is None and model_ctx is None:
            raise ValueError("the model config has no max_position_embeddings; pass max_context")
        self.max_context = int(min(x for x in (max_context, model_ctx) if x is not None))
        get_embeddings = getattr(model, "get_input_embeddings", None)
        embeddings = get_embeddings() if callable(get_embeddings) else None
        vocab = getattr(embeddings, "num_embeddings", None) or getattr(config, "vocab_size", None)
        if not isinstance(vocab, int):
            raise ValueError("cannot tell the model's vocabulary size (no input embeddings, no vocab_size)")
        self.vocab_size = vocab
        self.slots = LoraSlots(model, target_modules, num_slots, max_rank, lora_dtype, lora_mode)
        try:
            self.kv_layout: KvLayout | None = KvLayout.of(config)
            """The base's KV cache shape per layer; None = prompt adapters cannot be served."""
        except ValueError:
            self.kv_layout = None
        self._slot_pool = SlotPool(
            self.slots, lambda ref, seconds, ok: self._notify("on_adapter_load", ref, seconds, ok)
        )
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.max_prefill_tokens = max_prefill_tokens
        self.observer = observer or EngineObserver()
        self.device = next(model.parameters()).device
        gen_config = getattr(model, "generation_config", None)
        eos = getattr(gen_config, "eos_token_id", None)
        if eos is None:
            eos = list(eos_token_ids)
        self.eos_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = getattr(gen_config, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else (min(self.eos_ids) if self.eos_ids else 0)
        """The token id that fills padding positions (the model's pad token, else its smallest eos)."""

        self._cond = threading.Condition()
        self._waiting: OrderedDict[str, deque[_Seq]] = OrderedDict()
        self._rr_order: list[str] = []  # adapter keys in round-robin order
        self._rr_next = 0
        self._num_waiting = 0
        self._cancelled: list[_Seq] = []
        self._closed = False
        # Loop-thread state.
        self._running: list[_Seq] = []
        self._cache: Any = None
        self._ids = itertools.count()
        self._counters = {"steps": 0, "tokens_generated": 0, "requests_finished": 0, "prefills": 0}
        self._thread: threading.Thread | None = None
        self._adapters_seen: tuple[tuple[str, ...], ...] | None = None  # last on_adapters payload
        self._score_jobs: deque[ScoreJob] = deque()  # reward-model scoring, drained between steps
        self._notify("on_capacity", max_batch_size, num_slots)
        if start:
            self.start()

    # ------------------------------------------------------------------------------------------
    # Public API

    def start(self) -> None:
        """Start the decode loop thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lorafleet-engine", daemon=True)
            self._thread.start()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; returns at once with its handle.

        Raises:
            PromptTooLongError: empty prompt, or no room for one generated token within
                ``max_context``.
            ValueError: a prompt token id outside the vocabulary (it would fail the whole batch's
                forward, not just this request), invalid sampling parameters, stop strings without
                a ``stop_check``, or the adapter does not fit this engine (rank, modules, shapes).
            QueueFullError: ``max_queued`` requests are waiting.
            EngineClosedError: after ``close()``.
        """
        n = len(request.prompt_ids)
        if n == 0:
            raise PromptTooLongError("the prompt is empty; give at least one token")
        virtual = virtual_tokens(request.adapter)
        if n + virtual >= self.max_context:
            with_virtual = f" after the prompt adapter's {virtual} virtual tokens" if virtual else ""
            raise PromptTooLongError(
                f"the prompt has {n} tokens; the model's context is {self.max_context} tokens, so a prompt "
                f"may have at most {self.max_context - 1 - virtual}{with_virtual}"
            )
        bad = [t for t in request.prompt_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt_ids holds {len(bad)} token id(s) outside the vocabulary [0, {self.vocab_size}), "
                f"e.g. {bad[0]}"
            )
        problems = request.params.validate()
        if problems:
            raise ValueError("invalid sampling params: " + "; ".join(str(p) for p in problems))
        if request.params.stop and request.stop_check is None:
            raise ValueError(
                "stop strings need a stop_check (the engine sees token ids only; see detokenizer.py)"
            )
        if request.adapter is not None:
            self.check_adapter(request.adapter)
        stop_ids = frozenset(request.params.stop_token_ids) | (
            frozenset() if request.params.ignore_eos else self.eos_ids
        )
        rid = request.request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(rid, n, self.cancel)
        seq = _Seq(handle, request, stop_ids)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if self._num_waiting >= self.max_queued:
                raise QueueFullError(
                    f"{self._num_waiting} requests are waiting (max_queued={self.max_queued})"
                )
            if seq.key not in self._waiting:
                self._waiting[seq.key] = deque()
                self._rr_order.append(seq.key)
            self._waiting[seq.key].append(seq)
            self._num_waiting += 1
            self._cond.notify_all()
        return handle

    def check_adapter(self, adapter: AdapterWeights | PromptAdapter) -> None:
        """Raise ValueError when ``adapter`` does not fit this engine: a LoRA adapter's rank,
        modules and shapes against the slot tables, a prompt adapter's KV against the base."""
        if isinstance(adapter, PromptAdapter):
            if self.kv_layout is None:
                raise ValueError(
                    "this base's config does not describe its KV cache; prompt adapters cannot run on it"
                )
            adapter.check_fits(self.kv_layout)
        else:
            self.slots.validate(adapter)

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        """Submit and wait (convenience for tests and scripts)."""
        return self.submit(request).result(timeout)

    def cancel(self, handle: RequestHandle) -> None:
        """Stop generating for ``handle``; its adapter slot is released before this returns (a
        queued request just leaves the queue). No-op once it is done."""
        with self._cond:
            if handle.done:
                return
            for key, pending in self._waiting.items():
                for seq in pending:
                    if seq.handle is handle:
                        pending.remove(seq)
                        self._num_waiting -= 1
                        self._drop_key_if_empty(key)
                        self._finish(seq, FINISH_CANCELLED)
                        self._cond.notify_all()  # the loop republishes the queue's adapters
                        return
            for seq in self._running:
                if seq.handle is handle and not seq.cancelled:
                    seq.cancelled = True
                    self._release_slot(seq)  # the loop drops the row before it loads any adapter
                    self._cancelled.append(seq)
                    self._finish(seq, FINISH_CANCELLED)
                    self._cond.notify_all()
                    return

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests not finished fail with ``EngineClosedError``. Unhooks the model."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            leftovers = [s for p in self._waiting.values() for s in p] + self._running
            self._waiting.clear()
            self._num_waiting = 0
            self._running = []
        for seq in leftovers:
            seq.handle.finish(FINISH_ERROR, EngineClosedError("the engine was closed"))
        while self._score_jobs:
            self._score_jobs.popleft().fail(EngineClosedError("the engine was closed"))
        self.slots.remove()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """A snapshot: counters, queue sizes, and per slot its adapter ref and in-flight users."""
        with self._cond:
            return {
                **self._counters,
                "waiting": self._num_waiting,
                "running": len(self._running),
                "slots": self._slot_pool.snapshot(),
            }

    # ------------------------------------------------------------------------------------------
    # Slots and admission (called with _cond held)

    def _publish_adapters(self) -> None:
        """Call ``on_adapters`` when the adapters of the running rows, the waiting requests or the
        slots changed since the last call (loop thread, ``_cond`` held)."""
        running = tuple(sorted({s.key for s in self._running if s.key != _BASE_KEY}))
        waiting = tuple(sorted(k for k, pending in self._waiting.items() if pending and k != _BASE_KEY))
        resident = tuple(sorted(slot["ref"] for slot in self._slot_pool.snapshot() if slot["ref"]))
        payload = (running, waiting, resident)
        if payload != self._adapters_seen:
            self._adapters_seen = payload
            self._notify("on_adapters", running, waiting, resident)

    def _drop_key_if_empty(self, key: str) -> None:
        if not self._waiting.get(key):
            self._waiting.pop(key, None)
            idx = self._rr_order.index(key)
            self._rr_order.pop(idx)
            if idx < self._rr_next:
                self._rr_next -= 1

    def _acquire_slot(self, seq: _Seq) -> bool:
        """Give ``seq`` a slot for its adapter; False when every slot is busy with other adapters.

        Raises:
            RequestFailedError: the adapter could not be copied into a slot.
        """
        if seq.adapter is None or isinstance(seq.adapter, PromptAdapter):
            seq.slot = -1  # the base for the LoRA hooks; a prompt adapter lives in the row's cache
            return True
        slot = self._slot_pool.acquire(seq.adapter)
        if slot is None:
            return False
        seq.slot, seq.slot_held = slot, True
        return True

    def _release_slot(self, seq: _Seq) -> None:
        if seq.slot_held:
            self._slot_pool.release(seq.slot)
            seq.slot_held = False

    def _admit(self) -> list[_Seq]:
        """Pick waiting requests round-robin over adapter keys while the batch has room."""
        room = self.max_batch_size - len(self._running)
        admitted: list[_Seq] = []
        budget = self.max_prefill_tokens
        blocked: set[str] = set()
        while room > 0 and self._rr_order and len(blocked) < len(self._rr_order):
            if self._rr_next >= len(self._rr_order):
                self._rr_next = 0
            key = self._rr_order[self._rr_next]
            pending = self._waiting[key]
            seq = pending[0]
            if key in blocked or (admitted and len(seq.prompt) > budget):
                blocked.add(key)
                self._rr_next += 1
                continue
            try:
                got = self._acquire_slot(seq)
            except RequestFailedError as e:
                pending.popleft()
                self._num_waiting -= 1
                self._finish(seq, FINISH_ERROR, e)
                got = None
            if got is False:
                blocked.add(key)
                self._rr_next += 1
                continue
            if got:
                pending.popleft()
                self._num_waiting -= 1
                admitted.append(seq)
                room -= 1
                budget -= len(seq.prompt)
            if not pending:
                self._drop_key_if_empty(key)  # the next key slides into _rr_next
            else:
                self._rr_next += 1
        return admitted

    # ------------------------------------------------------------------------------------------
    # The loop

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._closed or self._running or self._num_waiting or self._score_jobs):
                        self._publish_adapters()
                        self._cond.wait()
                    if self._closed:
                        return
                    cancelled, self._cancelled = self._cancelled, []
                    if cancelled:
                        self._remove_rows([s for s in self._running if s.cancelled])
                    admitted = self._admit()
                    waiting = self._num_waiting
                self._drain_score_jobs()
                if not admitted and not self._running:
                    # Everything waiting is blocked on slots held by nobody running: cannot happen
                    # unless all waiting requests failed; loop again to re-check.
                    self._notify("on_queue", waiting, 0)
                    with self._cond:
                        self._publish_adapters()
                    time.sleep(0.001)
                    continue
                began = time.perf_counter()
                prefill_tokens = sum(len(s.prompt) for s in admitted)
                if admitted:
                    try:
                        self._prefill(admitted)
                    except Exception as e:  # fails the admitted rows only: the running cache is untouched
                        logger.exception("prefill failed; failing %d requests", len(admitted))
                        self._fail([s for s in admitted if s not in self._running], e)
                if self._running:
                    try:
                        self._decode_step()
                    except Exception as e:  # a model error fails the batch, not the engine
                        logger.exception("decode step failed; failing %d requests", len(self._running))
                        with self._cond:
                            failed, self._running, self._cache = self._running, [], None
                        self._fail(failed, e)
                        continue
                self._counters["steps"] += 1
                adapters = len({s.key for s in self._running if s.key != _BASE_KEY})  # LoRA or prompt
                self._notify(
                    "on_step", len(self._running), adapters, prefill_tokens, time.perf_counter() - began
                )
                with self._cond:  # what holds now: requests may have queued during the step
                    waiting = self._num_waiting
                    self._publish_adapters()
                self._notify("on_queue", waiting, len(self._running))

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        logits_to_keep: int = 1,
    ) -> Any:
        """One model forward; ``logits_to_keep=0`` keeps the logits of every position."""
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        return out

    def _prefill(self, admitted: list[_Seq]) -> None:
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
                    self._fail([seq], e)
            return
        picks, logprobs = self._sample(admitted, logits)
        survivors = [
            i
            for i, (seq, pick, logprob) in enumerate(zip(admitted, picks, logprobs, strict=True))
            if not self._accept(seq, pick, logprob)
        ]
        n = len(admitted)
        if len(survivors) < n:
            with self._cond:
                for i in range(n):
                    if i not in survivors:
                        self._release_slot(admitted[i])
            if not survivors:
                return
            sel = torch.tensor(survivors, device=self.device)
            for layer in self._layers(cache):
                layer.keys = layer.keys.index_select(0, sel)
                layer.values = layer.values.index_select(0, sel)
        self._join([admitted[i] for i in survivors], cache)

    def _prefill_forward(self, admitted: list[_Seq]) -> tuple[torch.Tensor, Any]:
        """The prefill forward of ``admitted``: last-position logits ``[rows, vocab]`` and the cache."""
        from transformers import DynamicCache

        width = max(len(s.prompt) for s in admitted)
        n = len(admitted)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, seq in enumerate(admitted):
            ids[i, width - len(seq.prompt) :] = torch.tensor(seq.prompt)
            mask[i, width - len(seq.prompt) :] = 1
            seq.length = seq.virtual + len(seq.prompt)
            seq.admitted_at = time.monotonic()
        # PeftModel shifts a prompt adapter's real tokens by its virtual tokens.
        shift = torch.tensor([s.virtual for s in admitted])[:, None]
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + shift
        cache = DynamicCache(config=self._model_config)
        if any(s.virtual for s in admitted):
            mask = torch.cat([self._prefill_virtual(admitted, cache), mask], dim=1)
        self.slots.set_rows(torch.tensor([s.slot for s in admitted]))
        want_prompt = any(s.prompt_logprobs_k is not None for s in admitted)
        out = self._forward(ids, mask, positions, cache, logits_to_keep=0 if want_prompt else 1)
        self._counters["prefills"] += 1
        if want_prompt:
            for i, seq in enumerate(admitted):
                if seq.prompt_logprobs_k is not None:
                    seq.prompt_logprobs = _prompt_logprobs(out.logits[i], seq.prompt, seq.prompt_logprobs_k)
        if n > 1 and bool((mask == 0).any()):
            # Padded positions hold keys/values of pad tokens; zero them so nothing non-finite can
            # leak through a masked attention weight.
            keep = mask.bool().to(self.device)[:, None, :, None]
            for layer in self._layers(cache):
                layer.keys = torch.where(keep, layer.keys, 0.0)
                layer.values = torch.where(keep, layer.values, 0.0)
            if mask.shape[1] > width:
                _compact_rows(self._layers(cache), mask.to(self.device))
        return out.logits[:, -1, :], cache

    def _prefill_virtual(self, admitted: list[_Seq], cache: Any) -> torch.Tensor:
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
                self.slots.set_rows(None)
                compute_prompt_kv(self.model, adapter, self._model_config)
        layout = self.kv_layout
        assert layout is not None  # submit refuses prompt adapters otherwise
        first = next(a for a in adapters if a is not None)
        dtype = first.keys[0].dtype
        shape = (len(admitted), layout.kv_heads, width, layout.head_dim)
        for layer in range(layout.layers):
            keys = torch.zeros(shape, dtype=dtype, device=self.device)
            values = torch.zeros(shape, dtype=dtype, device=self.device)
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

    def _join(self, seqs: list[_Seq], cache: Any) -> None:
        """Append rows (with their cache) to the running batch, left-padding the narrower side."""
        with self._cond:
            if not self._running:
                self._running, self._cache = list(seqs), cache
                self._trim()
                return
            old_layers, new_layers = self._layers(self._cache), self._layers(cache)
            t_old, t_new = old_layers[0].keys.shape[-2], new_layers[0].keys.shape[-2]
            width = max(t_old, t_new)
            for old, new in zip(old_layers, new_layers, strict=True):
                old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
                old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
            self._running.extend(seqs)

    def _remove_rows(self, leaving: list[_Seq]) -> None:
        """Drop rows from the batch and its cache (slots are released by the caller)."""
        if not leaving:
            return
        gone = {id(s) for s in leaving}
        keep = [i for i, s in enumerate(self._running) if id(s) not in gone]
        self._running = [self._running[i] for i in keep]
        if not self._running:
            self._cache = None
            return
        sel = torch.tensor(keep, device=self.device)
        for layer in self._layers(self._cache):
            layer.keys = layer.keys.index_select(0, sel)
            layer.values = layer.values.index_select(0, sel)
        self._trim()

    def _trim(self) -> None:
        """Drop leading cache columns that are padding in every row."""
        layers = self._layers(self._cache)
        width = layers[0].keys.shape[-2]
        needed = max(s.length for s in self._running)
        if needed < width:
            for layer in layers:
                layer.keys = layer.keys[:, :, width - needed :, :]
                layer.values = layer.values[:, :, width - needed :, :]

    def _decode_step(self) -> None:
        rows = self._running
        width = self._layers(self._cache)[0].keys.shape[-2]
        lengths = torch.tensor([s.length for s in rows])
        ids = torch.tensor([[s.generated[-1]] for s in rows])
        mask = (torch.arange(width + 1)[None, :] >= (width - lengths)[:, None]).long()
        positions = lengths[:, None]
        self.slots.set_rows(torch.tensor([s.slot for s in rows]))
        out = self._forward(ids, mask, positions, self._cache)
        for seq in rows:
            seq.length += 1
        picks, logprobs = self._sample(rows, out.logits[:, -1, :])
        finished = [
            seq
            for seq, pick, logprob in zip(rows, picks, logprobs, strict=True)
            if self._accept(seq, pick, logprob)
        ]
        if finished:
            with self._cond:
                for seq in finished:
                    self._release_slot(seq)
                self._remove_rows(finished)

    # ------------------------------------------------------------------------------------------
    # Reward-model scoring (``reward_heads``): no generation, one forward per drain

    def submit_score(self, job: ScoreJob) -> ScoreJob:
        """Queue a scoring job; the loop thread runs it between decode steps (the LoRA hooks'
        per-row state belongs to that thread). Wait with ``job.result()``.

        Raises:
            PromptTooLongError: an empty row, or one over ``max_context`` tokens.
            ValueError: a token id outside the vocabulary, or an adapter that does not fit.
            QueueFullError: ``max_queued`` jobs are waiting.
            EngineClosedError: after ``close()``.
        """
        for i, row in enumerate(job.rows):
            if not row or len(row) > self.max_context:
                raise PromptTooLongError(
                    f"row {i} has {len(row)} tokens; a scored row needs 1 to {self.max_context} tokens"
                )
            if not all(0 <= int(t) < self.vocab_size for t in row):
                raise ValueError(f"row {i} holds a token id outside the vocabulary [0, {self.vocab_size})")
        if job.adapter is not None:
            self.slots.validate(job.adapter)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if len(self._score_jobs) >= max(self.max_queued, 1):
                raise QueueFullError(f"{len(self._score_jobs)} scoring jobs are waiting")
            self._score_jobs.append(job)
            self._cond.notify_all()
        return job

    def _take_score_jobs(self) -> list[ScoreJob]:
        """Jobs for this drain, each holding its adapter's slot, within ``max_prefill_tokens`` (at
        least one); jobs whose adapter finds no free slot wait for the next drain."""
        taken: list[ScoreJob] = []
        waiting: deque[ScoreJob] = deque()
        budget = self.max_prefill_tokens
        with self._cond:
            while self._score_jobs:
                job = self._score_jobs.popleft()
                if taken and job.tokens > budget:
                    waiting.append(job)
                    continue
                try:
                    slot = self._slot_pool.acquire(job.adapter) if job.adapter is not None else -1
                except RequestFailedError as e:
                    job.fail(e)
                    continue
                if slot is None:
                    waiting.append(job)
                    continue
                job.slot = slot
                taken.append(job)
                budget -= job.tokens
            self._score_jobs = waiting
        return taken

    def _drain_score_jobs(self) -> None:
        """Score the queued jobs in one padded forward, rows of different adapters together; if it
        raises, each job runs alone so a bad one fails by itself."""
        if not self._score_jobs:
            return
        jobs = self._take_score_jobs()
        began = time.perf_counter()
        groups = [jobs]
        while groups:
            group = groups.pop()
            try:
                self.slots.set_rows(torch.tensor([job.slot for job in group for _ in job.rows]))
                scores = score_forward(self.model, group, self.pad_id, self.device)
                for job, job_scores in zip(group, scores, strict=True):
                    job.finish(job_scores)
            except Exception as e:
                if len(group) > 1:
                    logger.exception("scoring %d jobs failed; retrying them one by one", len(group))
                    groups.extend([job] for job in group)
                    continue
                logger.exception("scoring failed")
                group[0].fail(RequestFailedError(f"scoring failed: {type(e).__name__}"))
        with self._cond:
            for job in jobs:
                if job.slot >= 0:
                    self._slot_pool.release(job.slot)
        done = [job for job in jobs if job.error is None]
        rows = sum(len(job.rows) for job in done)
        self._notify("on_score", rows, sum(job.tokens for job in done), time.perf_counter() - began)

    # ------------------------------------------------------------------------------------------
    # Tokens

    @staticmethod
    def _sample(seqs: list[_Seq], logits: torch.Tensor) -> tuple[list[Pick], list[TokenLogprob | None]]:
        """The next token of each row (``[rows, vocab]`` logits), each by its request's sampler (a
        row that failed gets its error instead), and, for the rows that asked, its logprobs from
        that row's raw logits alone."""
        picks = pick_tokens([s.sampler for s in seqs], lambda i: seqs[i].all_ids, logits)
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        rows = [
            i
            for i, (s, p) in enumerate(zip(seqs, picks, strict=True))
            if s.logprobs is not None and isinstance(p, int)
        ]
        if rows:
            selected = logits.index_select(0, torch.tensor(rows, device=logits.device))
            tokens = [int(picks[i]) for i in rows]  # type: ignore[arg-type]
            ks = [int(seqs[i].logprobs or 0) for i in rows]
            for i, logprob in zip(rows, token_logprobs(selected, tokens, ks), strict=True):
                logprobs[i] = logprob
        return picks, logprobs

    def _accept(self, seq: _Seq, pick: Pick, logprob: TokenLogprob | None = None) -> bool:
        """Record a generated token, stream it, and say whether the request is finished; a failed
        pick (or a failing ``stop_check``) finishes this request alone with its error."""
        if seq.cancelled:
            return True  # cancelled during this step: drop the row, emit nothing
        if not isinstance(pick, int):
            if isinstance(pick, NonFiniteLogitsError) and seq.adapter is not None:
                pick = NonFiniteLogitsError(
                    f"the model with adapter {seq.adapter.ref} produced NaN or infinite logits for this request"
                )
            with self._cond:
                self._finish(seq, FINISH_ERROR, pick)
            return True
        token = pick
        now = time.monotonic()
        handle = seq.handle
        first = not seq.generated
        if first:
            handle.first_token_at = now
            self._notify("on_first_token", now - handle.submitted_at, seq.admitted_at - handle.submitted_at)
        else:
            self._notify("on_token", now - seq.last_token_at)
        seq.last_token_at = now
        seq.generated.append(token)
        self._counters["tokens_generated"] += 1
        reason = None
        try:
            stop = token in seq.stop_ids or (seq.stop_check is not None and seq.stop_check(token))
        except Exception as e:  # the caller's stop check fails its own request only
            logger.exception("stop_check failed for request %s", handle.request_id)
            self._emit(seq, token, logprob, first)
            with self._cond:
                self._finish(seq, FINISH_ERROR, RequestFailedError(f"stop check failed: {type(e).__name__}"))
            return True
        if stop:
            reason = FINISH_STOP
        elif (
            len(seq.generated) >= seq.max_new_tokens
            or seq.virtual + len(seq.prompt) + len(seq.generated) >= self.max_context
        ):
            reason = FINISH_LENGTH
        self._emit(seq, token, logprob, first)
        if reason is None:
            return False
        with self._cond:
            self._finish(seq, reason)
        return True

    @staticmethod
    def _emit(seq: _Seq, token: int, logprob: TokenLogprob | None, first: bool) -> None:
        """Stream one token, its logprob when asked, and the prompt's logprobs with the first."""
        seq.handle.emit(
            (token,), (logprob,) if logprob is not None else (), seq.prompt_logprobs if first else None
        )

    def _fail(self, seqs: list[_Seq], error: Exception) -> None:
        """Fail ``seqs`` (not in the running batch) with ``error``, freeing their slots."""
        wrapped = (
            error
            if isinstance(error, RequestFailedError)
            else RequestFailedError(f"generation failed: {error}")
        )
        with self._cond:
            for seq in seqs:
                self._release_slot(seq)
                self._finish(seq, FINISH_ERROR, wrapped)

    def _finish(self, seq: _Seq, reason: str, error: BaseException | None = None) -> None:
        if seq.handle.done:
            return
        seq.handle.finish(reason, error)
        self._counters["requests_finished"] += 1
        self._notify(
            "on_finish",
            reason,
            len(seq.prompt),
            len(seq.generated),
            time.monotonic() - seq.handle.submitted_at,
        )

    def _notify(self, hook: str, *args: Any) -> None:
        try:
            getattr(self.observer, hook)(*args)
        except Exception:
            logger.exception("engine observer %s failed", hook)


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
