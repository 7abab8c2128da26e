"""The generation engine: continuous batching of requests for many LoRA adapters over one base model.

One background thread owns the model and runs the loop. Each iteration:

1. drops rows whose request was cancelled (their adapter slot was already released by ``cancel``);
2. admits waiting requests, round-robin over the adapters that have requests waiting (so a burst
   for one adapter cannot starve the others), while the batch has room, the KV cache can hold the
   prompt and an adapter slot can be found; loads adapters into free slots (least recently used
   slot first);
3. runs the model over the batch, rows of different adapters and base rows in the same forward
   (``LoraSlots`` applies each row's delta), emits tokens and retires finished rows.

How step 3 holds the KV cache is the job of a *KV layout*:

* ``paged_batch.PagedBatch`` (the default): a block pool under a memory budget
  (``kv_cache.KvBlocks``) with prefix reuse; one packed, unpadded forward per iteration that
  decodes every running row and prefills prompt chunks of the new ones (``max_prefill_tokens`` per
  iteration), so long prompts neither cost padding nor stall the running streams.
* ``padded_batch.PaddedBatch``: one left-padded transformers ``DynamicCache``, for models whose
  attention does not go through transformers' attention interface (ALiBi: BLOOM, Falcon). The
  engine checks at start that the paged forward computes what the model's own forward computes
  and falls back to this layout, with a log line saying why, when it cannot.

Prompt adapters (``prompt_adapters.PromptAdapter``: prefix tuning / P-tuning v2, P-tuning, prompt
tuning) take no adapter slot: their rows are base rows for the LoRA hooks (slot -1) whose cache
holds the adapter's virtual keys and values in front of the prompt, with position ids shifted as
PeftModel shifts them. A row's length counts its virtual tokens, and so does ``max_context``.

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
from services.inference.kv_cache import (
    ATTENTION,
    ForwardPlan,
)
from services.inference.kv_layout import choose_layout
from services.inference.lora_batch import AdapterWeights, LoraSlots, Mode
from services.inference.padded_batch import PaddedBatch
from services.inference.paged_batch import PagedBatch
from services.inference.processors import Pick, pick_tokens, token_logprobs
from services.inference.prompt_adapters import KvLayout, PromptAdapter, virtual_tokens
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
from services.inference.sequence import BASE_KEY, Seq
from services.inference.slot_pool import SlotPool

logger = logging.getLogger(__name__)


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
        max_prefill_tokens: prompt tokens prefilled per iteration; bounds how long one iteration
            stalls the running rows. The paged layout prefills longer prompts in chunks of this
            size; the padded one admits prompts up to this many tokens together (at least one).
        kv_cache: ``auto`` (paged when the model allows it, else padded), ``paged`` (raise when the
            model does not allow it) or ``padded``.
        kv_cache_mb: the paged KV cache's budget in MiB (keys and values of every layer); None =
            room for ``max_batch_size`` sequences of ``max_context`` tokens. Memory is touched only
            as blocks are first used. It must hold at least one ``max_context`` sequence.
        kv_block_size: tokens per KV block (the prefix-reuse granularity).
        prefix_caching: reuse the cached blocks of a prompt prefix already computed for the same
            base and adapter version.
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
        max_prefill_tokens: int = 512,
        kv_cache: str = "auto",
        kv_cache_mb: float | None = None,
        kv_block_size: int = 16,
        prefix_caching: bool = True,
        lora_dtype: torch.dtype = torch.float32,
        lora_mode: Mode = "auto",
        observer: EngineObserver | None = None,
        eos_token_ids: Sequence[int] = (),
        start: bool = True,
    ) -> None:
        if max_batch_size < 1 or max_queued < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queued >= 0")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        if kv_cache not in ("auto", "paged", "padded"):
            raise ValueError(f"kv_cache must be auto, paged or padded, got {kv_cache!r}")
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
        self._waiting: OrderedDict[str, deque[Seq]] = OrderedDict()
        self._rr_order: list[str] = []  # adapter keys in round-robin order
        self._rr_next = 0
        self._num_waiting = 0
        self._cancelled: list[Seq] = []
        self._closed = False
        # Loop-thread state.
        self._running: list[Seq] = []
        self._ids = itertools.count()
        self._counters = {
            "steps": 0,
            "tokens_generated": 0,
            "requests_finished": 0,
            "prefills": 0,
            "preemptions": 0,
        }
        self._thread: threading.Thread | None = None
        self._adapters_seen: tuple[tuple[str, ...], ...] | None = None  # last on_adapters payload
        self._score_jobs: deque[ScoreJob] = deque()  # reward-model scoring, drained between steps
        self._attn_before = getattr(config, "_attn_implementation", None)
        self._batch: PagedBatch | PaddedBatch = self._choose_layout(
            kv_cache, kv_cache_mb, kv_block_size, prefix_caching
        )
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
        seq = Seq(handle, request, stop_ids)
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
        self._restore_attention()
        if isinstance(self._batch, PagedBatch) and not (self._thread and self._thread.is_alive()):
            self._batch.blocks.free_storage()  # the budget's memory goes now, not when GC finds it

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
                "kv_cache": self._kv_snapshot(),
            }

    def _kv_snapshot(self) -> dict[str, Any]:
        used, total = self._batch.usage()
        if not isinstance(self._batch, PagedBatch):
            return {"layout": "padded", "rows_used": used, "rows": total}
        blocks = self._batch.blocks
        return {
            "layout": "paged",
            "blocks_used": used,
            "blocks": total,
            "block_size": blocks.block_size,
            "budget_bytes": total
            * blocks.block_size
            * blocks.bytes_per_token(blocks.layers, blocks.kv_heads, blocks.head_dim, blocks.dtype),
            "prefix_query_tokens": blocks.stats.queries,
            "prefix_hit_tokens": blocks.stats.hits,
            "prefix_evictions": blocks.stats.evictions,
        }

    # ------------------------------------------------------------------------------------------
    # Slots and admission (called with _cond held)

    def _publish_adapters(self) -> None:
        """Call ``on_adapters`` when the adapters of the running rows, the waiting requests or the
        slots changed since the last call (loop thread, ``_cond`` held)."""
        running = tuple(sorted({s.key for s in self._running if s.key != BASE_KEY}))
        waiting = tuple(sorted(k for k, pending in self._waiting.items() if pending and k != BASE_KEY))
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

    def _acquire_slot(self, seq: Seq) -> bool:
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

    def _release_slot(self, seq: Seq) -> None:
        if seq.slot_held:
            self._slot_pool.release(seq.slot)
            seq.slot_held = False

    def _admit(self) -> list[Seq]:
        """Pick waiting requests round-robin over adapter keys while the batch has room."""
        room = self.max_batch_size - len(self._running)
        admitted: list[Seq] = []
        blocked: set[str] = set()
        while room > 0 and self._rr_order and len(blocked) < len(self._rr_order):
            if self._rr_next >= len(self._rr_order):
                self._rr_next = 0
            key = self._rr_order[self._rr_next]
            pending = self._waiting[key]
            seq = pending[0]
            if key in blocked or not self._batch.fits(seq, admitted):
                blocked.add(key)
                self._rr_next += 1
                continue
            try:
                got = self._acquire_slot(seq)
            except RequestFailedError as e:
                pending.popleft()
                self._num_waiting -= 1
                self._batch.unreserve(seq)
                self._finish(seq, FINISH_ERROR, e)
                got = None
            if got is False:
                self._batch.unreserve(seq)
                blocked.add(key)
                self._rr_next += 1
                continue
            if got:
                pending.popleft()
                self._num_waiting -= 1
                admitted.append(seq)
                room -= 1
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
                        self._batch.remove([s for s in self._running if s.cancelled])
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
                prefill_tokens = self._batch.step(admitted)
                self._counters["steps"] += 1
                adapters = len({s.key for s in self._running if s.key != BASE_KEY})  # LoRA or prompt
                self._notify(
                    "on_step", len(self._running), adapters, prefill_tokens, time.perf_counter() - began
                )
                with self._cond:  # what holds now: requests may have queued during the step
                    waiting = self._num_waiting
                    self._publish_adapters()
                self._notify("on_queue", waiting, len(self._running))
                self._notify_kv()

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache: Any,
        logits_to_keep: int = 1,
        *,
        paged: ForwardPlan | None = None,
        row_slots: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> Any:
        """One model forward.

        Padded layout: the model's output (``logits_to_keep=0`` keeps every position's logits).
        Paged layout (``paged`` given): ``input_ids`` / ``positions`` are ``[tokens, 1]``, one token
        per batch row with per-token adapter slots ``row_slots``; the decoder runs on all of them
        and the output head only on the positions in ``keep``, whose logits ``[len(keep), vocab]``
        are returned.
        """
        if paged is None:
            return self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=None if mask is None else mask.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=logits_to_keep,
            )
        assert row_slots is not None and keep is not None
        self.slots.set_rows(row_slots)
        model: Any = self.model
        out = model.base_model(
            input_ids=input_ids,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            attention_mask=_NO_MASK,  # a 4-D mask skips transformers' mask building: rows are packed
            paged=paged,
        )
        hidden = out.last_hidden_state.index_select(0, keep.to(self.device))  # [kept, 1, hidden]
        self.slots.set_rows(row_slots.index_select(0, keep))  # the head's rows (modules_to_save)
        return model.get_output_embeddings()(hidden)[:, 0, :]

    # ------------------------------------------------------------------------------------------
    # KV layout

    def _choose_layout(
        self, kind: str, kv_cache_mb: float | None, block_size: int, prefix_caching: bool
    ) -> PagedBatch | PaddedBatch:
        layout = choose_layout(self, kind, kv_cache_mb, block_size, prefix_caching)
        if not isinstance(layout, PagedBatch):
            self._restore_attention()
        return layout

    def _restore_attention(self) -> None:
        if self._attn_before is None:
            return
        for module in self.model.modules():
            config = getattr(module, "config", None)
            if getattr(config, "_attn_implementation", None) == ATTENTION:
                config._attn_implementation = self._attn_before  # type: ignore[union-attr]

    def _requeue(self, seq: Seq) -> None:
        """Put a preempted row back at the front of its adapter's queue (``_cond`` held)."""
        if seq.key not in self._waiting:
            self._waiting[seq.key] = deque()
            self._rr_order.insert(self._rr_next if self._rr_next < len(self._rr_order) else 0, seq.key)
        self._waiting[seq.key].appendleft(seq)
        self._num_waiting += 1

    def _notify_kv(self) -> None:
        used, total = self._batch.usage()
        stats = self._batch.blocks.stats if isinstance(self._batch, PagedBatch) else None
        self._notify(
            "on_kv_cache",
            used,
            total,
            stats.queries if stats else 0,
            stats.hits if stats else 0,
        )

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
    def _sample(seqs: list[Seq], logits: torch.Tensor) -> tuple[list[Pick], list[TokenLogprob | None]]:
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

    def _accept(self, seq: Seq, pick: Pick, logprob: TokenLogprob | None = None) -> bool:
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
    def _emit(seq: Seq, token: int, logprob: TokenLogprob | None, first: bool) -> None:
        """Stream one token, its logprob when asked, and the prompt's logprobs with the first."""
        seq.handle.emit(
            (token,), (logprob,) if logprob is not None else (), seq.prompt_logprobs if first else None
        )

    def _fail(self, seqs: list[Seq], error: Exception) -> None:
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

    def _finish(self, seq: Seq, reason: str, error: BaseException | None = None) -> None:
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


_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)
