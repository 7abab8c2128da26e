"""What a caller of the engine hands in and gets back: sampling parameters, the request, streamed
token events, the final result, the handle that streams / waits / cancels, the engine's errors, the
observer hooks (metrics), and the incremental detokenizer with stop-string hold-back. The decode loop
itself is ``services.inference.engine``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from services.inference.lora_batch import AdapterWeights

if TYPE_CHECKING:
    from services.inference.engine import Engine

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


class EngineError(Exception):
    """Base class of the engine's errors."""


class QueueFull(EngineError):
    """``submit`` refused a request: ``max_queued`` requests are already waiting."""


class PromptTooLong(EngineError, ValueError):
    """The prompt leaves no room for a generated token within the model's context length."""


class EngineClosed(EngineError):
    """The engine was closed before the request could finish."""


class RequestFailed(EngineError):
    """The request failed inside the engine (bad adapter, model error); others keep running."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; the semantics follow HF ``generate``.

    Attributes:
        max_new_tokens: generated-token limit (finish reason ``length``).
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling mass (1 = off).
        top_k: keep the k most likely tokens (0 = off).
        repetition_penalty: HF/CTRL penalty over prompt and generated tokens (1 = off).
        no_repeat_ngram_size: forbid repeating any n-gram of the sequence (0 = off).
        stop_token_ids: tokens that end generation (finish reason ``stop``; the token is returned).
        stop_strings: texts that end generation; the returned text is cut before them.
        seed: seed of this request's own ``torch.Generator``; None draws one from torch's default.
        ignore_eos: do not stop at the model's eos token.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append("max_new_tokens must be >= 1")
        if self.temperature < 0:
            problems.append("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if self.top_k < 0:
            problems.append("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            problems.append("repetition_penalty must be > 0")
        if self.no_repeat_ngram_size < 0:
            problems.append("no_repeat_ngram_size must be >= 0")
        if any(not s for s in self.stop_strings):
            problems.append("stop_strings must not be empty strings")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class GenerationRequest:
    """One generation: prompt token ids, the adapter (None = base model) and sampling params.

    ``detokenize=False`` skips incremental detokenization (events then carry no text) unless stop
    strings need it; useful for token-only clients and benchmarks.
    """

    prompt_ids: Sequence[int]
    adapter: AdapterWeights | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    detokenize: bool = True


@dataclass(frozen=True)
class TokenEvent:
    """What one step produced for a request: new token ids and the text they completed.

    ``text`` can be empty while a multi-byte character or a possible stop string is incomplete; the
    held-back text comes with a later event.
    """

    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class GenerationResult:
    """A finished request."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    ttft_s: float | None
    e2e_s: float


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


_END = object()


class RequestHandle:
    """The caller's side of a submitted request; all methods are thread-safe.

    Iterate it to stream ``TokenEvent``s as they are generated (iteration ends when the request
    finishes and raises its error if it failed), or call ``result()`` to wait for the whole answer.
    Both can be used together: ``result()`` does not consume the stream.
    """

    def __init__(self, engine: Engine, request_id: str, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._engine = engine
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done = threading.Event()
        self._tokens: list[int] = []
        self._text = ""
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
        self._engine._cancel(self)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the request to finish and return it.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
            RequestFailed / EngineClosed: the request failed.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._finish_reason is not None and self.finished_at is not None
        return GenerationResult(
            request_id=self.request_id,
            token_ids=list(self._tokens),
            text=self._text,
            finish_reason=self._finish_reason,
            prompt_tokens=self.prompt_tokens,
            ttft_s=self.ttft_s,
            e2e_s=self.finished_at - self.submitted_at,
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

    # Called by the engine only.
    def _emit(self, token_ids: tuple[int, ...], text: str) -> None:
        self._tokens.extend(token_ids)
        self._text += text
        self._events.put(TokenEvent(token_ids, text))

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self._finish_reason = reason
        self._error = error
        self.finished_at = time.monotonic()
        self._events.put(_END)
        self._done.set()


class Detokenizer:
    """Incremental detokenization with stop-string hold-back.

    Decodes a window of recent tokens and emits only text that is final: not ending in an
    incomplete UTF-8 sequence (byte-level BPE yields U+FFFD until the character is complete) and not
    a possible beginning of a stop string.
    """

    def __init__(self, tokenizer: Any, stop_strings: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all final text so far
        self.emitted = 0  # characters of ``text`` already emitted

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns ``(text to emit now, whether a stop string matched)``."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stop_strings:
            start = max(0, self.emitted - max(len(s) for s in self.stop_strings))
            hits = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._take(len(self.text)), True
            return self._take(len(self.text) - self._held_back()), False
        return self._take(len(self.text)), False

    def flush(self) -> str:
        """Everything not emitted yet (at the end of the request)."""
        return self._take(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest text suffix that could still grow into a stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
