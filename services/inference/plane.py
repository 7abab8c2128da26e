"""The inference plane: base models, their engines and adapter registries, and request routing.

It knows nothing of gRPC (the servicer in ``server.py`` converts protobuf to the dataclasses here and
back). One :class:`BaseModelHost` per configured base owns a tokenizer, the model, one
:class:`~services.inference.engine.Engine` and one
:class:`~services.inference.registry.AdapterRegistry`. :class:`InferencePlane` routes a request to
its host, validates it (``request_checks.py``: every problem at once, each naming the field and the
value), resolves and pins the adapter (``name`` -> a concrete ``name@version``), renders chat
messages with the template the adapter was trained with, and submits token ids to the engine. The
returned :class:`Generation` (one engine request per sample when ``n > 1``) turns the engine's
token ids into text, and their logprobs into :class:`Logprob` entries with each token's text (``detokenizer.py``: stop
strings are applied here, the engine only sees a ``stop_check``), streams :class:`Chunk`s and ends
with a :class:`Usage`; ``close()`` cancels it and frees its batch row and its adapter pin at once
(the servicer calls it when the client goes away or the deadline passes).

Errors are those of ``errors.py`` (``server.py`` maps them to status codes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lorafleet import templates
from lorafleet.config import ModelConfig
from lorafleet.errors import ConfigError, FieldProblem, show_value
from lorafleet.models import base_model_fingerprint, load_model, load_tokenizer
from services.inference.detokenizer import Detokenizer, detokenize, stop_string_check
from services.inference.engine import Engine
from services.inference.errors import (
    AdapterIncompatibleError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from services.inference.prompt_adapters import prompt_aware_loader
from services.inference.published_models import PublishedModels, PublishedModelStatus
from services.inference.registry import (
    AdapterRegistry,
    AdapterStatus,
    RegistryEvent,
    VersionInfo,
)
from services.inference.request_checks import Message, check_name, check_prompt, split_messages
from services.inference.requests import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    EngineObserver,
    GenerationRequest,
    RequestHandle,
    TokenLogprob,
)
from services.inference.reward_heads import RewardHeads, ScorePair, ScoreResult, score_pairs
from services.inference.sampling import SamplingLimits, SamplingParams
from services.inference.settings import InferenceSettings, ModelSettings

logger = logging.getLogger(__name__)

LOADING, READY, FAILED = "loading", "ready", "failed"


@dataclass(frozen=True)
class Usage:
    """What a finished request cost and why it ended."""

    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    """``stop`` (eos, a template end marker or a stop sequence) or ``length``."""
    time_to_first_token_s: float
    total_time_s: float
    adapter: str
    """``name@version`` that served the request; empty for the base model."""
    template: str
    """Chat template used (empty for plain-prompt requests)."""


@dataclass(frozen=True)
class TopLogprob:
    """One alternative at a position."""

    token_id: int
    token: str
    """The token decoded alone (special tokens kept; a partial UTF-8 character shows as U+FFFD)."""
    logprob: float


@dataclass(frozen=True)
class Logprob:
    """A token's log-probability and the most likely tokens at its position (the engine's
    ``TokenLogprob`` with the text of each token): the model's log-softmax before any processor or
    temperature (vLLM's default, as OpenAI reports it)."""

    token_id: int
    token: str
    logprob: float | None
    """None only for the first prompt token."""
    top: tuple[TopLogprob, ...] = ()
    """Most likely first; as many as the request's ``logprobs`` / ``prompt_logprobs``."""


@dataclass(frozen=True)
class Chunk:
    """A piece of a streamed answer.

    Samples stream one after the other (every token of sample 0, then of sample 1, ...): all
    ``n`` are decoded in the same batches, so later ones are buffered, not delayed. Each sample
    ends with a chunk that has its ``finish_reason`` (and whatever text was held back); the very
    last chunk of the stream has ``usage`` and nothing else.
    """

    text: str
    token_ids: tuple[int, ...]
    usage: Usage | None = None
    index: int = 0
    """Which of the request's ``n`` samples."""
    logprobs: tuple[Logprob, ...] = ()
    """One per token id when the request set ``logprobs``."""
    prompt_logprobs: tuple[Logprob, ...] | None = None
    """On the first chunk of sample 0 when the request set ``prompt_logprobs``: one per prompt
    token."""
    finish_reason: str | None = None
    """On the last chunk of each sample: ``stop`` or ``length``."""


@dataclass(frozen=True)
class Sample:
    """One of the ``n`` answers of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[Logprob] | None = None
    """One per token id when the request set ``logprobs``; else None."""


@dataclass(frozen=True)
class Completion:
    """A whole answer (unary calls): sample 0 at the top level, every sample in ``samples``."""

    text: str
    token_ids: list[int]
    usage: Usage
    """Totals over every sample (``generated_tokens`` sums them); the finish reason is sample 0's."""
    logprobs: list[Logprob] | None = None
    """Sample 0's, one per token id, when the request set ``logprobs``."""
    prompt_logprobs: list[Logprob] | None = None
    """One per prompt token when the request set ``prompt_logprobs``."""
    samples: list[Sample] = field(default_factory=list)
    """All ``n`` samples in index order (sample 0 repeats the top-level fields)."""
    prompt_token_ids: list[int] = field(default_factory=list)
    """The prompt as the model saw it (what ``echo`` returns)."""


@dataclass(frozen=True)
class BaseModelInfo:
    """One base model as ListModels reports it."""

    name: str
    path: str
    dtype: str
    quantization: str
    state: str
    reason: str
    template: str
    max_context: int
    weights_bytes: int = 0
    """Bytes of the resident weights (parameters and buffers at their stored width); 0 until loaded."""
    kv_bytes_per_token: int = 0
    """KV cache bytes per token of one sequence (keys and values of every layer); the cache grows
    with the tokens of every row in the batch, up to the ``kv_cache_mb`` budget (by default
    ``max_batch_size`` x ``max_context`` tokens)."""
    published: bool = False
    """A full model found under the adapters root (``name@version``), not a configured base."""


@dataclass
class HostedAdapterStatus:
    """An adapter version and the base model (of this server) whose registry reports it."""

    model: str
    status: AdapterStatus


class Generation:
    """A submitted request (its ``n`` samples): iterate for chunks, or call :meth:`result`;
    :meth:`close` always.

    The text is decoded here from the engine's token ids, held back while a character or a possible
    stop string is incomplete, and cut before a stop string.

    ``close`` is idempotent and thread-safe: it cancels every sample's engine request (their batch
    rows and adapter slots are free when ``cancel`` returns) and drops the registry pin of the
    adapter.
    """

    def __init__(
        self,
        handle: RequestHandle | list[RequestHandle],
        release: Callable[[], None],
        adapter_ref: str,
        template: str,
        tokenizer: Any,
        stop: tuple[str, ...] = (),
        prompt_ids: list[int] | None = None,
    ) -> None:
        self.handles = handle if isinstance(handle, list) else [handle]
        self.handle = self.handles[0]
        self.adapter_ref = adapter_ref
        self.template = template
        self.tokenizer = tokenizer
        self.stop = stop
        self.prompt_ids = list(prompt_ids or [])
        self._release = release
        self._lock = threading.Lock()
        self._closed = False
        self._token_text: dict[int, str] = {}

    def __iter__(self) -> Iterator[Chunk]:
        for index, handle in enumerate(self.handles):
            detokenizer = Detokenizer(self.tokenizer, self.stop)
            for event in handle:
                text = "".join(detokenizer.add(token_id)[0] for token_id in event.token_ids)
                prompt = (
                    None if event.prompt_logprobs is None or index else self._logprobs(event.prompt_logprobs)
                )
                yield Chunk(text, event.token_ids, None, index, self._logprobs(event.logprobs), prompt)
            yield Chunk(detokenizer.flush(), (), index=index, finish_reason=handle.finish_reason)
        yield Chunk("", (), self.usage())

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the whole answer (every sample).

        Raises:
            TimeoutError: not finished in ``timeout`` seconds.
            RequestFailedError / EngineClosedError: the engine failed a sample.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        samples: list[Sample] = []
        prompt_logprobs: list[Logprob] | None = None
        for index, handle in enumerate(self.handles):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done = handle.result(left)
            if index == 0 and done.prompt_logprobs is not None:
                prompt_logprobs = list(self._logprobs(done.prompt_logprobs))
            text = detokenize(self.tokenizer, done.token_ids, self.stop)
            logprobs = None if done.logprobs is None else list(self._logprobs(done.logprobs))
            samples.append(Sample(index, text, list(done.token_ids), done.finish_reason, logprobs))
        first = samples[0]
        return Completion(
            first.text,
            first.token_ids,
            self.usage(),
            first.logprobs,
            prompt_logprobs,
            samples,
            self.prompt_ids,
        )

    def usage(self) -> Usage:
        """Totals over the samples; the finish reason is sample 0's."""
        handles = self.handles
        now = time.monotonic()
        submitted = min(h.submitted_at for h in handles)
        finished = max(h.finished_at if h.finished_at is not None else now for h in handles)
        ttfts = [h.ttft_s for h in handles if h.ttft_s is not None]
        return Usage(
            prompt_tokens=self.handle.prompt_tokens,
            generated_tokens=sum(len(h.token_ids) for h in handles),
            finish_reason=self.handle.finish_reason or "",
            time_to_first_token_s=min(ttfts) if ttfts else 0.0,
            total_time_s=finished - submitted,
            adapter=self.adapter_ref,
            template=self.template,
        )

    def _text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _logprobs(self, entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> tuple[Logprob, ...]:
        return tuple(
            Logprob(
                e.token_id,
                self._text(e.token_id),
                e.logprob,
                tuple(TopLogprob(t, self._text(t), lp) for t, lp in e.top),
            )
            for e in entries
        )

    @property
    def cancelled(self) -> bool:
        return self.handle.finish_reason == FINISH_CANCELLED

    def close(self) -> None:
        """Cancel every sample still running and release the adapter pin (once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            for handle in self.handles:
                handle.cancel()
        finally:
            self._release()


class BaseModelHost:
    """One base model: tokenizer, model, engine, adapter registry, and its load state."""

    def __init__(
        self,
        model_settings: ModelSettings,
        settings: InferenceSettings,
        observer: EngineObserver | None = None,
        on_registry_event: Callable[[RegistryEvent], None] | None = None,
    ) -> None:
        self.settings = model_settings
        self.server_settings = settings
        self.name = model_settings.name
        self.state = LOADING
        self.reason = ""
        self.template_name = ""
        self.template: templates.Template | None = None
        self.tokenizer: Any = None
        self.model: Any = None
        self.engine: Engine | None = None
        self.registry: AdapterRegistry | None = None
        self.reward_heads: RewardHeads | None = None
        self.max_context = 0
        self.weights_bytes = 0
        self.kv_bytes_per_token = 0
        self.published = False
        self.config_error = False
        """The load failed because the engine refused this model with the server's engine settings
        (``kv_cache_mb`` below one ``max_context`` sequence, ``kv_cache: paged`` for a model that
        cannot page, ...): ``reason`` is the engine's message, and no retry will help."""
        self._observer = observer
        self._on_registry_event = on_registry_event

    def load(self) -> None:
        """Load everything and run a one-token warm-up; sets ``state`` to ready or failed."""
        m, s = self.settings, self.server_settings
        started = time.perf_counter()
        try:
            cfg = ModelConfig(
                name_or_path=m.path,
                revision=m.revision,
                dtype=m.dtype,
                quantization=m.quantization,
                trust_remote_code=m.trust_remote_code,
            )
            self.tokenizer = load_tokenizer(cfg)
            self.model = load_model(cfg, for_training=False).eval()
            self.template_name = self._resolve_template()
            self.template = templates.get_template(self.template_name, self.tokenizer)
            eos = getattr(self.tokenizer, "eos_token_id", None)
            try:
                self.engine = Engine(
                    self.model,
                    num_slots=s.num_slots,
                    max_rank=s.max_rank,
                    max_batch_size=s.max_batch_size,
                    max_queued=s.max_queued,
                    max_prefill_tokens=s.max_prefill_tokens,
                    kv_cache=s.kv_cache,
                    kv_cache_mb=s.engine_kv_cache_mb,
                    kv_block_size=s.kv_block_size,
                    prefix_caching=s.prefix_caching,
                    observer=self._observer,
                    eos_token_ids=[eos] if isinstance(eos, int) else [],
                )
            except ValueError as e:  # the engine names the setting and the value: no traceback
                self.state, self.reason, self.config_error = FAILED, str(e), True
                logger.error("base model %s (%s) cannot start its engine: %s", self.name, m.path, e)
                return
            self.max_context = self.engine.max_context
            self.weights_bytes, self.kv_bytes_per_token = model_memory(self.model, m.dtype)
            model = self.model
            self.reward_heads = RewardHeads(model)
            self.registry = AdapterRegistry(
                Path(m.adapters_root or s.adapters_root),
                m.path,
                base_model_fingerprint(m.path, m.revision),
                [n for n, _ in model.named_modules()],
                max_rank=s.max_rank,
                capacity=s.adapter_capacity,
                # Prompt adapters by peft_type; LoRA weights with a reward model's value head aside.
                loader=prompt_aware_loader(model, self.reward_heads.load),
                memory_budget_bytes=s.memory_budget_bytes,
                on_event=self._on_registry_event,
            )
            self.registry.start_watcher(s.scan_interval_s)
            self._warm_up()
        except Exception as e:
            self.state, self.reason = FAILED, getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
            logger.exception("base model %s (%s) failed to load", self.name, m.path)
            return
        self.state = READY
        logger.info("base model %s ready in %.1f s", self.name, time.perf_counter() - started)

    def _resolve_template(self) -> str:
        if self.settings.template != "auto":
            return self.settings.template
        from lorafleet.families import detect_family

        try:
            return detect_family(self.model.config, self.settings.path).template
        except ConfigError:
            return "auto"

    def _warm_up(self) -> None:
        """Generate one real token: readiness means the whole path works, not just that weights loaded."""
        assert self.engine is not None
        ids = list(self.tokenizer.encode("Hello", add_special_tokens=True)) or [self.engine.pad_id]
        request = GenerationRequest(ids, params=SamplingParams(max_new_tokens=1), request_id="warm-up")
        result = self.engine.generate(request, timeout=self.server_settings.warmup_timeout_s)
        if len(result.token_ids) != 1:
            raise RuntimeError(f"warm-up produced {len(result.token_ids)} tokens instead of 1")

    def info(self) -> BaseModelInfo:
        m = self.settings
        return BaseModelInfo(
            name=self.name,
            path=m.path,
            dtype=m.dtype,
            quantization=m.quantization,
            state=self.state,
            reason=self.reason,
            template=self.template_name,
            max_context=self.max_context,
            weights_bytes=self.weights_bytes,
            kv_bytes_per_token=self.kv_bytes_per_token,
            published=self.published,
        )

    def close(self) -> None:
        if self.registry is not None:
            self.registry.close()
        if self.engine is not None:
            self.engine.close()
            self._report_closed(self.engine)

    def _report_closed(self, engine: Engine) -> None:
        """Tell the observer the closed engine holds nothing: no rows, slots or blocks. A published
        model unloaded to make room would otherwise leave its last report in the pod's totals (its
        blocks and slots in ``vllm:kv_cache_usage_perc`` and ``max_lora``). The prefix-cache totals
        stay as they were: counters do not go back."""
        if self._observer is None:
            return
        kv = engine.stats()["kv_cache"]
        self._observer.on_queue(0, 0)
        self._observer.on_adapters((), (), ())
        self._observer.on_kv_cache(0, 0, kv.get("prefix_query_tokens", 0), kv.get("prefix_hit_tokens", 0))
        self._observer.on_capacity(0, 0)


def model_memory(model: Any, dtype: str) -> tuple[int, int]:
    """``(weights_bytes, kv_bytes_per_token)`` of a loaded model: its parameters and buffers at their
    stored width (a 4-bit base counts its packed bytes), and the keys plus values every layer caches
    per token, at the compute dtype (GQA models cache ``num_key_value_heads`` heads)."""
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads", 0) or 0
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    width = 4 if dtype == "fp32" else 2
    return weights, 2 * layers * kv_heads * head_dim * width


@dataclass
class _Prepared:
    host: BaseModelHost
    params: SamplingParams
    problems: list[FieldProblem] = field(default_factory=list)
    release: Callable[[], None] = field(default=lambda: None)
    """Ends the request's hold on a published model's host (idempotent)."""


class InferencePlane:
    """Every base model of the server, and the request path over them. Thread-safe."""

    def __init__(
        self,
        settings: InferenceSettings,
        observer_for: Callable[[str], EngineObserver] | None = None,
        on_registry_event: Callable[[str, RegistryEvent], None] | None = None,
    ) -> None:
        self.settings = settings.validate()
        self.hosts: dict[str, BaseModelHost] = {}
        for m in settings.models:
            callback = None
            if on_registry_event is not None:
                callback = _bind_event(on_registry_event, m.name)
            self.hosts[m.name] = BaseModelHost(
                m, settings, observer_for(m.name) if observer_for else None, callback
            )
        self._observer_for = observer_for
        self._on_registry_event = on_registry_event
        self.published = PublishedModels(
            Path(settings.adapters_root),
            settings.max_published_models,
            settings.published_load_wait_s,
            self._published_host,
        )

    def _published_host(self, info: VersionInfo) -> BaseModelHost:
        """An unloaded host for a published full model: its artifact directory is its base, loaded
        in the server's ``published_dtype`` / ``published_quantization``, with the template it was
        trained with, and its own adapter registry over the same root (adapters trained on it
        match its fingerprint)."""
        s = self.settings
        template = info.manifest.template if info.manifest is not None and info.manifest.template else "auto"
        m = ModelSettings(
            name=info.ref,
            path=str(info.path),
            dtype=s.published_dtype,
            quantization=s.published_quantization,
            template=template,
        )
        callback = None
        if self._on_registry_event is not None:
            callback = _bind_event(self._on_registry_event, info.ref)
        host = BaseModelHost(m, s, self._observer_for(info.ref) if self._observer_for else None, callback)
        host.published = True
        return host

    # -- lifecycle ------------------------------------------------------------------------------

    def load_all(self) -> bool:
        """Load every base model in turn; True when all are ready. Published full models load on
        demand; their watcher starts here."""
        self.start_published_watcher()
        for host in self.hosts.values():
            host.load()
        return self.ready

    def start_published_watcher(self) -> None:
        """List published full models now and keep the list current (idempotent)."""
        self.published.start_watcher(self.settings.scan_interval_s)

    @property
    def ready(self) -> bool:
        return all(h.state == READY for h in self.hosts.values())

    def close(self) -> None:
        self.published.close()
        for host in self.hosts.values():
            host.close()

    # -- request path ---------------------------------------------------------------------------

    def host(self, model: str) -> BaseModelHost:
        """The host a request's ``model`` field names (may be empty when there is one base).

        Raises:
            InvalidRequestError: empty ``model`` while several bases are served, or one too long.
            ModelNotFoundError: no such base model.
        """
        problems: list[FieldProblem] = []
        if not check_name("model", model, problems):
            raise InvalidRequestError(problems)
        if not model:
            if len(self.hosts) == 1:
                return next(iter(self.hosts.values()))
            raise InvalidRequestError(
                [FieldProblem("model", model, f"required: this server serves {sorted(self.hosts)}")]
            )
        host = self.hosts.get(model)
        if host is None:
            raise ModelNotFoundError(
                f"model={show_value(model)}: no such base model; this server serves {sorted(self.hosts)} "
                "and the published full models (name@version) that ListModels lists"
            )
        return host

    def ready_host(self, model: str) -> BaseModelHost:
        """Like :meth:`host`, and the base must be ready.

        Raises:
            ModelNotReadyError: still loading, or failed to load.
        """
        host = self.host(model)
        if host.state != READY:
            why = (
                "is still loading; retry shortly"
                if host.state == LOADING
                else f"failed to load: {host.reason}"
            )
            raise ModelNotReadyError(f"model {host.name!r} {why}")
        return host

    def lease(self, model: str, wait_s: float | None = -1.0) -> tuple[BaseModelHost, Callable[[], None]]:
        """The ready host ``model`` names, and the call that ends this request's hold on it: a
        configured base (held by nothing), or a published full model (``name@version`` or ``name``,
        pinned against unloading until the call; loaded first if needed, waiting up to ``wait_s``,
        -1 = ``published_load_wait_s``, None = the whole load).

        Raises:
            The errors of :meth:`ready_host`, and of ``PublishedModels.acquire`` (a published model
            loading, failed, or over ``max_published_models``).
        """
        if model and model not in self.hosts and self.published.knows(model):
            held = self.published.acquire(model, wait_s)
            return held.host, held.release
        return self.ready_host(model), _nothing

    def generate(self, model: str, adapter: str, prompt: str, sampling: SamplingParams) -> Generation:
        """Submit a plain-prompt request (no template).

        Args:
            sampling: as the client sent it; an unset ``max_new_tokens`` takes the server default.

        Raises:
            InvalidRequestError, ModelNotFoundError, ModelNotReadyError, AdapterError subclasses,
            QueueFullError (``errors.py``).
        """
        prepared = self._prepare(model, adapter, sampling)
        host = prepared.host
        problems = prepared.problems
        try:
            check_prompt(prompt, self.settings.max_prompt_chars, problems)
            ids: list[int] = []
            if not problems:
                ids = list(host.tokenizer.encode(prompt, add_special_tokens=True))
                self._check_length(host, ids, "prompt", problems)
            if problems:
                raise InvalidRequestError(problems)
            return self._submit(prepared, adapter, lambda _template: (ids, "", ()))
        except BaseException:
            prepared.release()
            raise

    def chat(self, model: str, adapter: str, messages: list[Message], sampling: SamplingParams) -> Generation:
        """Submit a chat request rendered with the adapter's training template (or the base's).

        Raises:
            The same errors as :meth:`generate`.
        """
        prepared = self._prepare(model, adapter, sampling)
        host = prepared.host
        problems = prepared.problems
        system, turns, query = split_messages(
            messages, self.settings.max_messages, problems, self.settings.max_prompt_chars
        )
        if problems:
            prepared.release()
            raise InvalidRequestError(problems)

        def render(template_name: str) -> tuple[list[int], str, tuple[int, ...]]:
            template = templates.get_template(template_name, host.tokenizer)
            ids = templates.encode_prompt(template, host.tokenizer, turns, query, system)
            length_problems: list[FieldProblem] = []
            self._check_length(host, ids, "messages", length_problems)
            if length_problems:
                raise InvalidRequestError(length_problems)
            return ids, template_name, tuple(templates.stop_token_ids(template, host.tokenizer))

        try:
            return self._submit(prepared, adapter, render)
        except BaseException:
            prepared.release()
            raise

    def score(self, model: str, adapter: str, pairs: list[ScorePair]) -> ScoreResult:
        """Score (prompt, response) pairs with a reward-model adapter (``reward_heads``).

        Raises:
            InvalidRequestError, ModelNotFoundError, ModelNotReadyError, AdapterError subclasses
            (AdapterIncompatibleError when the adapter is no reward model), QueueFullError.
        """
        host, release = self.lease(model)
        try:
            s = self.settings
            return score_pairs(host, adapter, pairs, s.max_messages, s.max_prompt_chars)
        finally:
            release()

    def _prepare(self, model: str, adapter: str, sampling: SamplingParams) -> _Prepared:
        """Validate the sampling fields; the host is held (``release``) when this returns."""
        host, release = self.lease(model)
        cfg = self.settings
        limits = SamplingLimits(cfg.max_new_tokens_cap, cfg.max_stop_sequences, cfg.max_stop_length)
        problems = sampling.validate(limits, prefix="sampling.")
        check_name("adapter", adapter, problems)
        if sampling.max_new_tokens is None:
            default = min(cfg.default_max_new_tokens, cfg.max_new_tokens_cap)
            sampling = replace(sampling, max_new_tokens=default)
        return _Prepared(host, sampling, problems, release)

    def _submit(
        self,
        prepared: _Prepared,
        adapter: str,
        render: Callable[[str], tuple[list[int], str, tuple[int, ...]]],
    ) -> Generation:
        """Resolve and pin the adapter, render, submit; the pins (adapter and host) are dropped on
        any failure, else when the generation closes."""
        host, params = prepared.host, prepared.params
        assert host.registry is not None and host.engine is not None
        registry = host.registry
        resolved = registry.acquire(adapter) if adapter else None
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                try:
                    if resolved is not None:
                        registry.release(resolved)
                finally:
                    prepared.release()

        try:
            template_name = (resolved.template if resolved is not None else "") or host.template_name
            ids, used_template, stop_ids = render(template_name)
            if stop_ids:
                params = _with_stop_ids(params, stop_ids)
            weights = resolved.weights if resolved is not None else None
            if weights is not None:
                try:
                    host.engine.check_adapter(weights)
                except ValueError as e:
                    raise AdapterIncompatibleError(f"adapter {resolved.ref if resolved else ''}: {e}") from e
            handles = self._submit_samples(host.engine, host.tokenizer, ids, weights, params)
        except BaseException:
            release()
            raise
        ref = resolved.ref if resolved is not None else ""
        return Generation(handles, release, ref, used_template, host.tokenizer, params.stop, ids)

    @staticmethod
    def _submit_samples(
        engine: Engine, tokenizer: Any, ids: list[int], weights: Any, params: SamplingParams
    ) -> list[RequestHandle]:
        """One engine request per sample (``SamplingParams.for_sample``); prompt logprobs are
        computed for sample 0 only. If one cannot be queued, those already queued are cancelled."""
        handles: list[RequestHandle] = []
        try:
            for index in range(params.n):
                sample = params.for_sample(index)
                if index:
                    sample = replace(sample, prompt_logprobs=None)
                stop_check = stop_string_check(tokenizer, sample.stop) if sample.stop else None
                request = GenerationRequest(ids, adapter=weights, params=sample, stop_check=stop_check)
                handles.append(engine.submit(request))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    @staticmethod
    def _check_length(host: BaseModelHost, ids: list[int], name: str, problems: list[FieldProblem]) -> None:
        limit = host.max_context - 1
        if len(ids) > limit:
            problems.append(
                FieldProblem(
                    name,
                    f"<{len(ids)} tokens>",
                    f"longer than the model's context allows ({limit} prompt tokens)",
                )
            )

    # -- adapters ------------------------------------------------------------------------------

    def list_models(self) -> tuple[list[BaseModelInfo], list[HostedAdapterStatus]]:
        """Every base model with its state (the configured ones, then every published full model
        version: available, loading, ready or failed), and every published adapter version per
        configured base."""
        infos = [h.info() for h in self.hosts.values()]
        infos += [self._published_info(s) for s in self.published.statuses()]
        adapters = [
            HostedAdapterStatus(h.name, status)
            for h in self.hosts.values()
            if h.registry is not None
            for status in h.registry.statuses()
        ]
        return infos, adapters

    def _published_info(self, status: PublishedModelStatus) -> BaseModelInfo:
        s = self.settings
        if status.host is not None and status.state == READY:
            return replace(status.host.info(), state=status.state, reason=status.reason)
        return BaseModelInfo(
            status.ref,
            status.path,
            s.published_dtype,
            s.published_quantization,
            status.state,
            status.reason,
            status.template,
            0,
            published=True,
        )

    def _is_published(self, model: str) -> bool:
        return bool(model) and model not in self.hosts and self.published.knows(model)

    def load_adapter(self, model: str, adapter: str) -> HostedAdapterStatus:
        """Validate and load an adapter (idempotent); with an empty ``adapter`` and a published
        full model as ``model``, load that model now and wait for it (the eager form of the load a
        first request would start).

        Raises:
            InvalidRequestError: empty ``adapter`` on a configured base; plus the registry's errors
            (and for published models those of ``PublishedModels.acquire``).
        """
        if not adapter and self._is_published(model):
            return self._published_status(self.published.load(model))
        self._check_adapter_field(model, adapter, "load")
        host, release = self.lease(model, wait_s=None)
        try:
            assert host.registry is not None
            resolved = host.registry.load(adapter)
            return HostedAdapterStatus(host.name, self._status(host, resolved.ref))
        finally:
            release()

    def unload_adapter(self, model: str, adapter: str) -> HostedAdapterStatus:
        """Unload ``name`` (every version) or ``name@version``; idempotent for published adapters.
        With an empty ``adapter`` and a published full model as ``model``, unload that model (a
        host serving requests goes when they end).

        Raises:
            InvalidRequestError: empty ``adapter`` on a configured base.
            AdapterError: a malformed reference.
            AdapterNotFoundError: nothing by that name was ever published.
        """
        from lorafleet.adapters import parse_adapter_ref
        from lorafleet.errors import AdapterNotFoundError

        if not adapter and self._is_published(model):
            unloaded = self.published.unload(model)
            return self._published_status(self.published.status(unloaded[-1] if unloaded else model))
        self._check_adapter_field(model, adapter, "unload")
        host, release = self.lease(model, wait_s=None)
        try:
            assert host.registry is not None
            name, version = parse_adapter_ref(adapter)
            host.registry.unload(adapter)
            known = [s for s in host.registry.statuses() if s.name == name]
        finally:
            release()
        if version is not None:
            known = [s for s in known if s.version == version]
        if not known:
            raise AdapterNotFoundError(f"adapter={show_value(adapter)}: no such adapter is published")
        return HostedAdapterStatus(host.name, max(known, key=lambda s: s.version))

    def _check_adapter_field(self, model: str, adapter: str, verb: str) -> None:
        """An adapter to load or unload must be named; an unknown or unready model is reported first."""
        problems: list[FieldProblem] = []
        if not adapter:
            problems.append(FieldProblem("adapter", adapter, f"name the adapter to {verb}"))
        if problems or not check_name("adapter", adapter, problems):
            if not self._is_published(model):
                self.ready_host(model)
            raise InvalidRequestError(problems)

    @staticmethod
    def _published_status(status: PublishedModelStatus) -> HostedAdapterStatus:
        """A published full model in LoadAdapter/UnloadAdapter's answer: ``model`` and ``ref`` are
        its ``name@version``; ``state`` is ``loaded`` once resident and ready."""
        name, _, version = status.ref.partition("@")
        state: Any = {READY: "loaded", FAILED: "failed"}.get(status.state, "available")
        adapter = AdapterStatus(
            name,
            int(version),
            status.ref,
            status.base_model,
            state,
            status.reason,
            None,
            status.template,
            status.method,
        )
        return HostedAdapterStatus(status.ref, adapter)

    @staticmethod
    def _status(host: BaseModelHost, ref: str) -> AdapterStatus:
        assert host.registry is not None
        for status in host.registry.statuses():
            if status.ref == ref:
                return status
        name, _, version = ref.partition("@")
        return AdapterStatus(name, int(version), ref, "", "loaded", "", None, "", "")


def _nothing() -> None:
    """The release of a configured base: nothing holds it."""


def _bind_event(
    callback: Callable[[str, RegistryEvent], None], model: str
) -> Callable[[RegistryEvent], None]:
    return lambda event: callback(model, event)


def _with_stop_ids(params: SamplingParams, stop_ids: tuple[int, ...]) -> SamplingParams:
    merged = tuple(dict.fromkeys((*params.stop_token_ids, *stop_ids)))
    return replace(params, stop_token_ids=merged)


__all__ = [
    "FINISH_ERROR",
    "BaseModelHost",
    "BaseModelInfo",
    "Chunk",
    "Completion",
    "Generation",
    "HostedAdapterStatus",
    "InferencePlane",
    "Logprob",
    "Message",
    "Sample",
    "TopLogprob",
    "Usage",
]
