"""What a caller of the engine hands in and gets back: the request (token ids, adapter, sampling
parameters), the streamed token events, the final result, the handle that streams / waits /
cancels, and the observer hooks (metrics). Token ids only: text is the plane's business
(``detokenizer.py``). The decode loop itself is ``services.inference.engine``, which imports this
module; this module imports nothing of the engine.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.inference.lora_batch import AdapterWeights
from services.inference.prompt_adapters import PromptAdapter
from services.inference.sampling import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


@dataclass
class GenerationRequest:
    """One generation: prompt token ids, the adapter (None = base model; LoRA weights or a prompt
    adapter's virtual tokens) and sampling params."""

    prompt_ids: Sequence[int]
    adapter: AdapterWeights | PromptAdapter | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    stop_check: Callable[[int], bool] | None = None
    """Called on the engine's loop thread with each generated token id; True ends the request with
    finish reason ``stop`` (the token is kept). How the layer above applies stop strings
    (``detokenizer.stop_string_check``); keep it fast, it runs between decode steps."""


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability at its position, and the most likely tokens there.

    ``logprob = log_softmax(z)[token_id]`` over the row's raw logits ``z`` ``[vocab]`` (fp32, the
    model's own distribution with its adapter, before any processor or temperature: vLLM's default
    ``raw_logprobs``, and what OpenAI reports).
    """

    token_id: int
    logprob: float | None
    """None only for the first prompt token: nothing precedes it."""
    top: tuple[tuple[int, float], ...] = ()
    """The ``k`` most likely ``(token_id, logprob)`` at this position, most likely first (ties by
    lower token id); ``k`` is the request's ``logprobs`` / ``prompt_logprobs``."""


@dataclass(frozen=True)
class TokenEvent:
    """What one step produced for a request: its new token ids, with their logprobs when asked."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    """One per token id when the request set ``logprobs``; else empty."""
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    """On the first event only, when the request set ``prompt_logprobs``: one per prompt token."""


@dataclass(frozen=True)
class GenerationResult:
    """A finished request."""

    request_id: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    ttft_s: float | None
    e2e_s: float
    logprobs: list[TokenLogprob] | None = None
    """One per generated token when the request set ``logprobs``; else None."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """One per prompt token when the request set ``prompt_logprobs``; else None."""


class EngineObserver:
    """Hooks the engine calls from its loop thread; override what you need (the server turns them
    into Prometheus metrics). Defaults do nothing. Exceptions raised here are logged and ignored, so
    metrics can never stall generation. Keep them fast: they run between decode steps."""

    def on_step(self, batch_size: int, adapters_in_batch: int, prefill_tokens: int, seconds: float) -> None:
        """After each loop iteration that ran the model; ``prefill_tokens`` is 0 for pure decode."""

    def on_queue(self, waiting: int, running: int) -> None:
        """After each iteration: requests waiting for admission, and rows in the batch."""

    def on_first_token(self, ttft_s: float, queue_s: float) -> None:
        """A request's first token; ``queue_s`` is the part of ``ttft_s`` spent waiting."""

    def on_token(self, inter_token_s: float) -> None:
        """Each later token of a request: time since its previous token."""

    def on_finish(self, reason: str, prompt_tokens: int, generated_tokens: int, e2e_s: float) -> None:
        """A request ended (``stop``, ``length``, ``cancelled`` or ``error``)."""

    def on_adapter_load(self, ref: str, seconds: float, ok: bool) -> None:
        """An adapter was copied into a slot (or failed to)."""

    def on_score(self, pairs: int, tokens: int, seconds: float) -> None:
        """A scoring job (reward model, ``Engine.submit_score``) finished: its rows and tokens, and
        the forward's time."""

    def on_kv_cache(self, used: int, total: int, prefix_query_tokens: int, prefix_hit_tokens: int) -> None:
        """After each iteration: KV blocks referenced by rows and blocks in the budget (the padded
        layout: rows and batch rows), and the prefix cache's running totals in tokens (looked up,
        found cached)."""

    def on_preemption(self) -> None:
        """A running row gave its KV blocks back to make room and went back to the queue, to be
        recomputed (the paged layout, when the block budget is full)."""

    def on_capacity(self, max_batch_size: int, num_slots: int) -> None:
        """Once, when the engine is built: its batch rows and its adapter slots."""

    def on_adapters(
        self, running: tuple[str, ...], waiting: tuple[str, ...], resident: tuple[str, ...]
    ) -> None:
        """After an iteration that changed them (and before the loop sleeps): the adapter refs
        (``AdapterWeights.ref``, e.g. ``name@version#hash``, sorted, no duplicates; the base is not
        listed) of the running rows, of
        the waiting requests, and held in the slots (with or without users)."""


_END = object()


class RequestHandle:
    """The caller's side of a submitted request; all methods are thread-safe.

    Iterate it to stream ``TokenEvent``s as they are generated (iteration ends when the request
    finishes and raises its error if it failed), or call ``result()`` to wait for the whole answer.
    Both can be used together: ``result()`` does not consume the stream.

    The producer (the engine) feeds it through :meth:`emit` and :meth:`finish`; ``cancel`` calls
    the ``cancel`` function the producer gave, with this handle.
    """

    def __init__(self, request_id: str, prompt_tokens: int, cancel: Callable[[RequestHandle], None]) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._cancel = cancel
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done = threading.Event()
        self._tokens: list[int] = []
        self._logprobs: list[TokenLogprob] | None = None
        self._prompt_logprobs: list[TokenLogprob] | None = None
        self._finish_reason: str | None = None
        self._error: BaseException | None = None

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self._events.get()
            if event is _END:
                self._events.put(_END)  # a second iteration also ends
                if self._error is not None:
                    raise self._error
                return
            yield event

    def cancel(self) -> None:
        """Stop generating; the adapter slot is released before this returns. No-op once done."""
        self._cancel(self)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the request to finish and return it.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
            RequestFailedError / EngineClosedError: the request failed.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._finish_reason is not None and self.finished_at is not None
        return GenerationResult(
            request_id=self.request_id,
            token_ids=list(self._tokens),
            finish_reason=self._finish_reason,
            prompt_tokens=self.prompt_tokens,
            ttft_s=self.ttft_s,
            e2e_s=self.finished_at - self.submitted_at,
            logprobs=None if self._logprobs is None else list(self._logprobs),
            prompt_logprobs=None if self._prompt_logprobs is None else list(self._prompt_logprobs),
        )

    @property
    def done(self) -> bool:
        """True once finished, cancelled or failed."""
        return self._done.is_set()

    @property
    def finish_reason(self) -> str | None:
        """``stop``, ``length``, ``cancelled``, ``error``; None while running."""
        return self._finish_reason

    @property
    def ttft_s(self) -> float | None:
        """Seconds from ``submit`` to the first token (None before it)."""
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    @property
    def token_ids(self) -> list[int]:
        """Tokens generated so far (a copy)."""
        return list(self._tokens)

    @property
    def error(self) -> BaseException | None:
        """Why the request failed, if it did."""
        return self._error

    # The producer's side.

    def emit(
        self,
        token_ids: tuple[int, ...],
        logprobs: tuple[TokenLogprob, ...] = (),
        prompt_logprobs: tuple[TokenLogprob, ...] | None = None,
    ) -> None:
        """Record and stream newly generated tokens (with their logprobs, and the prompt's on the
        first emission, when the request asked)."""
        self._tokens.extend(token_ids)
        if logprobs:
            if self._logprobs is None:
                self._logprobs = []
            self._logprobs.extend(logprobs)
        if prompt_logprobs is not None:
            self._prompt_logprobs = list(prompt_logprobs)
        self._events.put(TokenEvent(token_ids, logprobs, prompt_logprobs))

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        """End the request (``stop``, ``length``, ``cancelled`` or ``error`` with ``error``); the
        first call wins."""
        if self._done.is_set():
            return
        self._finish_reason = reason
        self._error = error
        self.finished_at = time.monotonic()
        self._events.put(_END)
        self._done.set()
