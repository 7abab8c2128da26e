"""Prometheus metrics of the inference service.

:class:`InferenceMetrics` owns its own :class:`~prometheus_client.CollectorRegistry` (a test process
runs several servers side by side), is fed by the server's ``ErrorInterceptor`` (the final code
of every RPC), by one
:class:`EngineObserver` per base model (queue, batch, latencies, tokens) and by the adapter
registries' events (loads, evictions, failures), and is served on its own port with :meth:`serve`.

===========================================================  =========  =========================
name                                                         type       labels
===========================================================  =========  =========================
``lorafleet_inference_requests_total``                       counter    ``method``, ``code``
``lorafleet_inference_queue_length``                         gauge      ``model``
``lorafleet_inference_running_requests``                     gauge      ``model``
``lorafleet_inference_time_to_first_token_seconds``          histogram  ``model``
``lorafleet_inference_queue_time_seconds``                   histogram  ``model``
``lorafleet_inference_inter_token_latency_seconds``          histogram  ``model``
``lorafleet_inference_e2e_request_latency_seconds``          histogram  ``model``
``lorafleet_inference_generated_tokens_total``               counter    ``model``
``lorafleet_inference_prompt_tokens_total``                  counter    ``model``
``lorafleet_inference_finished_requests_total``              counter    ``model``, ``reason``
``lorafleet_inference_batch_size``                           histogram  ``model``
``lorafleet_inference_adapter_loads_total``                  counter    ``model``
``lorafleet_inference_adapter_evictions_total``              counter    ``model``
``lorafleet_inference_adapter_load_failures_total``          counter    ``model``
``lorafleet_inference_adapter_load_seconds``                 histogram  ``model``
``lorafleet_inference_resident_adapters``                    gauge      ``model``
``lorafleet_inference_model_ready``                          gauge      ``model``
``lorafleet_inference_slot_adapter_info``                    gauge      ``model``, ``adapter``
``lorafleet_inference_kv_cache_blocks``                      gauge      ``model``, ``state``
``lorafleet_inference_prefix_cache_queries_total``           counter    ``model``
``lorafleet_inference_prefix_cache_hits_total``              counter    ``model``
``lorafleet_inference_preemptions_total``                    counter    ``model``
``vllm:num_requests_waiting``                                gauge
``vllm:num_requests_running``                                gauge
``vllm:kv_cache_usage_perc``                                 gauge
``vllm:prefix_cache_queries_total``                          counter
``vllm:prefix_cache_hits_total``                             counter
``vllm:lora_requests_info``                                  gauge      see below
===========================================================  =========  =========================

The KV cache series come from each engine's ``on_kv_cache`` report after every iteration:
``kv_cache_blocks{state="used"}`` is the blocks referenced by running rows and ``{state="total"}``
the blocks in the ``kv_cache_mb`` budget (an engine on the padded layout reports its rows in use and
its batch rows instead, having no blocks); the prefix-cache counters are prompt tokens looked up in
the prefix cache and tokens found there (hits / queries is the hit rate); ``preemptions_total``
counts running requests that gave their blocks back for lack of room, to be recomputed later.

Labels come from closed sets: ``method`` (the RPC names), ``code`` (gRPC status code names),
``model`` (the configured base models), ``reason`` (the engine's finish reasons). No request ids.
Adapter refs appear only where the set is bounded by the engine's slots at any moment, and only
the current state is exposed (a collector builds those series at scrape time, so an adapter that
left a slot leaves no stale series).

The ``vllm:`` series are the model-server protocol of the Kubernetes Gateway API Inference
Extension (its ``docs/proposals/003-model-server-protocol``): its endpoint picker reads them by these
names by default, per pod, so they are totals over every base model this process serves, with no
labels of their own:

- ``vllm:num_requests_waiting``: requests queued for a batch row;
- ``vllm:num_requests_running``: rows in the running decode batches;
- ``vllm:kv_cache_usage_perc``: the share of the KV cache in use, a fraction in [0, 1] like vLLM's:
  the KV blocks referenced by running rows over the blocks of the budgets (``kv_cache_mb``), summed
  over the base models. Requests wait when their prompt's blocks are not free, so this is the
  saturation figure the endpoint picker should see. An engine on the padded layout (models that
  cannot page) has no blocks: it counts its rows in use and its batch rows (``max_batch_size``), its
  only cache limit, in the same sums;
- ``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total``: the prefix-cache counters
  above, in tokens, summed over the base models;
- ``vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}``: one series
  whose value is the Unix time of the last change of its labels; ``max_lora`` is the adapter slots
  (adapters that can share one batch), the others list the adapter NAMES (without ``@version``:
  what clients put in ``model``) of the running rows and of the waiting requests, comma-separated,
  sorted. The picker routes a request for an adapter to a pod that lists it (LoRA affinity) or
  that has room for one more (fewer than ``max_lora`` listed).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.common.interceptor import GRPC_STATUS_CODES
from services.inference.registry import RegistryEvent
from services.inference.requests import EngineObserver

log = logging.getLogger(__name__)

PREFIX: Final = "lorafleet_inference_"

METHODS: Final = (
    "Generate",
    "GenerateStream",
    "Chat",
    "ChatStream",
    "ListModels",
    "LoadAdapter",
    "UnloadAdapter",
    "Score",
)
"""The RPCs counted; pre-initialised with code OK so a rate() has a series from the first scrape."""


FINISH_REASONS: Final = ("stop", "length", "cancelled", "error")

LATENCY_BUCKETS_S: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
"""Token latencies run from about a millisecond (tiny models, GPUs) to seconds (big models on CPUs)."""

E2E_BUCKETS_S: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class InferenceMetrics:
    """The inference service's metrics, in a registry of their own. Thread-safe."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry: CollectorRegistry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests",
            "RPCs answered, by method and gRPC status code name.",
            ["method", "code"],
            registry=r,
        )
        self.queue_length = Gauge(
            PREFIX + "queue_length", "Requests waiting for a batch row.", ["model"], registry=r
        )
        self.running = Gauge(
            PREFIX + "running_requests", "Requests in the running decode batch.", ["model"], registry=r
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from submission to the first generated token.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_time = Histogram(
            PREFIX + "queue_time_seconds",
            "Part of the time to first token spent waiting for admission.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inter_token = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from submission to the end of a request.",
            ["model"],
            buckets=E2E_BUCKETS_S,
            registry=r,
        )
        self.generated_tokens = Counter(
            PREFIX + "generated_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", ["model"], registry=r
        )
        self.finished = Counter(
            PREFIX + "finished_requests",
            "Engine requests that ended, by finish reason.",
            ["model", "reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            PREFIX + "batch_size", "Rows in each decode step.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.adapter_loads = Counter(
            PREFIX + "adapter_loads",
            "Adapters validated and loaded into the resident cache.",
            ["model"],
            registry=r,
        )
        self.adapter_evictions = Counter(
            PREFIX + "adapter_evictions",
            "Adapters evicted from the resident cache (LRU or memory budget).",
            ["model"],
            registry=r,
        )
        self.adapter_load_failures = Counter(
            PREFIX + "adapter_load_failures",
            "Adapter versions that failed validation or loading.",
            ["model"],
            registry=r,
        )
        self.adapter_load_time = Histogram(
            PREFIX + "adapter_load_seconds",
            "Validation plus load time of an adapter.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.scored_pairs = Counter(
            PREFIX + "scored_pairs",
            "(prompt, response) pairs scored by reward models (Score).",
            ["model"],
            registry=r,
        )
        self.scored_tokens = Counter(
            PREFIX + "scored_tokens", "Tokens of the pairs scored by reward models.", ["model"], registry=r
        )
        self.resident_adapters = Gauge(
            PREFIX + "resident_adapters", "Adapters in the resident cache.", ["model"], registry=r
        )
        self.kv_cache_blocks = Gauge(
            PREFIX + "kv_cache_blocks",
            "KV cache blocks referenced by running rows (state=used) and in the budget (state=total); "
            "an engine on the padded layout reports rows in use and batch rows.",
            ["model", "state"],
            registry=r,
        )
        self.prefix_queries = Counter(
            PREFIX + "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            ["model"],
            registry=r,
        )
        self.prefix_hits = Counter(
            PREFIX + "prefix_cache_hits",
            "Prompt tokens found in the prefix cache (their KV blocks reused, not recomputed).",
            ["model"],
            registry=r,
        )
        self.preemptions = Counter(
            PREFIX + "preemptions",
            "Running requests that gave their KV blocks back when the budget was full, to be recomputed.",
            ["model"],
            registry=r,
        )
        self.model_ready = Gauge(
            PREFIX + "model_ready",
            "1 once a base model is loaded and warmed up, else 0.",
            ["model"],
            registry=r,
        )
        for method in METHODS:
            self.requests.labels(method=method, code="OK")
        self.engines: dict[str, EngineState] = {}
        """Per base model, what its engine last reported (the ``vllm:`` series are built from it)."""
        self.engines_lock = threading.Lock()
        self.lora_updated_at = time.time()
        """Unix time of the last change of ``vllm:lora_requests_info``'s labels."""
        r.register(_ModelServerCollector(self))
        self._lock = threading.Lock()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def add_model(self, model: str) -> None:
        """Create a base model's series at zero, so they exist before its first request."""
        for metric in (
            self.queue_length,
            self.running,
            self.generated_tokens,
            self.prompt_tokens,
            self.scored_pairs,
            self.scored_tokens,
            self.adapter_loads,
            self.adapter_evictions,
            self.adapter_load_failures,
            self.resident_adapters,
            self.model_ready,
            self.prefix_queries,
            self.prefix_hits,
            self.preemptions,
        ):
            metric.labels(model=model)
        for state in ("used", "total"):
            self.kv_cache_blocks.labels(model=model, state=state)
        for reason in FINISH_REASONS:
            self.finished.labels(model=model, reason=reason)

    def request(self, method: str, code: str) -> None:
        """Count one answered RPC.

        Raises:
            ValueError: ``code`` is not a gRPC status code name (open label sets grow without bound).
        """
        if code not in GRPC_STATUS_CODES:
            raise ValueError(f"not a gRPC status code name: {code!r}")
        self.requests.labels(method=method, code=code).inc()

    def set_ready(self, model: str, ready: bool) -> None:
        self.model_ready.labels(model=model).set(1 if ready else 0)

    def observer(self, model: str) -> EngineObserver:
        """The engine hooks of one base model."""
        self.add_model(model)
        return _Observer(self, model)

    def registry_event(self, model: str, event: RegistryEvent) -> None:
        """Feed one adapter registry event."""
        if event.kind == "load":
            self.adapter_loads.labels(model=model).inc()
            self.adapter_load_time.labels(model=model).observe(event.seconds)
        elif event.kind == "load_failure":
            self.adapter_load_failures.labels(model=model).inc()
        elif event.kind == "evict":
            self.adapter_evictions.labels(model=model).inc()
        self.resident_adapters.labels(model=model).set(event.resident)

    # -- exposition ---------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format, as a scrape sees it."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` (0 = any free port) from a daemon thread.

        Returns:
            The bound port.

        Raises:
            RuntimeError: already serving.
            OSError: the port is taken.
        """
        with self._lock:
            if self._server is not None:
                raise RuntimeError(f"already serving metrics on port {self._server.server_port}")
            self._server, self._thread = _start_text_exporter(self.registry, host, port)
            bound = int(self._server.server_port)
        log.info("inference metrics on http://%s:%d/metrics", host, bound)
        return bound

    @property
    def port(self) -> int | None:
        server = self._server
        return None if server is None else int(server.server_port)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the exporter (idempotent)."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> InferenceMetrics:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass
class EngineState:
    """What one base model's engine last reported through its observer."""

    max_batch_size: int = 0
    num_slots: int = 0
    waiting: int = 0
    running: int = 0
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    resident_adapters: tuple[str, ...] = ()
    kv_used: int = 0
    """KV blocks referenced by running rows (padded layout: rows in use)."""
    kv_total: int = 0
    """KV blocks in the budget (padded layout: batch rows); 0 until the engine's first report."""
    prefix_queries: int = 0
    """Prompt tokens looked up in the prefix cache, over every engine this model has had."""
    prefix_hits: int = 0
    """Prompt tokens found there, likewise."""


def adapter_names(refs: Iterator[str] | tuple[str, ...]) -> str:
    """``name@version[#hash]`` refs -> their distinct names, sorted, comma-separated."""
    return ",".join(sorted({ref.partition("@")[0] for ref in refs}))


class _ModelServerCollector:
    """The Gateway API Inference Extension's gauges (vLLM's names) and the slot-adapter series, built
    at scrape time from the engines' last reports (see the module docstring)."""

    def __init__(self, metrics: InferenceMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # built at scrape time; nothing to check for clashes at registration

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        with m.engines_lock:
            engines = {name: EngineState(**vars(state)) for name, state in m.engines.items()}
            updated_at = m.lora_updated_at
        states = list(engines.values())
        running = sum(e.running for e in states)
        used = sum(e.kv_used for e in states)
        total = sum(e.kv_total for e in states)
        yield GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Requests waiting for a batch row, over every base model.",
            value=sum(e.waiting for e in states),
        )
        yield GaugeMetricFamily(
            "vllm:num_requests_running",
            "Requests in the running decode batches, over every base model.",
            value=running,
        )
        yield GaugeMetricFamily(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage as a fraction in [0, 1]: KV blocks referenced by running rows / blocks in "
            "the budgets (kv_cache_mb), over every base model (an engine on the padded layout counts "
            "rows in use / batch rows).",
            value=min(1.0, used / total) if total else 0.0,
        )
        yield CounterMetricFamily(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache, over every base model.",
            value=sum(e.prefix_queries for e in states),
        )
        yield CounterMetricFamily(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache, over every base model.",
            value=sum(e.prefix_hits for e in states),
        )
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Unix time of the last change; labels: adapter slots (max_lora) and the adapter names of "
            "the running rows and of the waiting requests (comma-separated).",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        info.add_metric(
            [
                str(sum(e.num_slots for e in states)),
                adapter_names(tuple(a for e in states for a in e.running_adapters)),
                adapter_names(tuple(a for e in states for a in e.waiting_adapters)),
            ],
            updated_at,
        )
        yield info
        slots = GaugeMetricFamily(
            PREFIX + "slot_adapter_info",
            "1 for each adapter held in an engine slot (next to the base, ready to batch).",
            labels=["model", "adapter"],
        )
        for name, e in sorted(engines.items()):
            for ref in sorted({ref.partition("#")[0] for ref in e.resident_adapters}):
                slots.add_metric([name, ref], 1.0)  # name@version, without the content hash
        yield slots


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


def _start_text_exporter(
    registry: CollectorRegistry, host: str, port: int
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` at ``/metrics`` in the Prometheus text format (0.0.4), whatever the scraper
    asks for.

    Why not OpenMetrics: prometheus_client 0.26's OpenMetrics writer escapes ``:`` to ``_`` in sample
    names (it checks them with the label-name alphabet) while keeping it in ``# TYPE``, so the
    ``vllm:`` series would reach Prometheus, which asks for OpenMetrics first, under other names.
    The text format keeps them; Prometheus and the endpoint picker both read it.
    """
    app = make_wsgi_app(registry)

    def text_only(environ: dict[str, Any], start_response: Any) -> Any:
        environ["HTTP_ACCEPT"] = "text/plain; version=0.0.4"
        return app(environ, start_response)

    server_class = _ThreadingWSGIServer6 if ":" in host else _ThreadingWSGIServer
    server = make_server(host, port, text_only, server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="inference-metrics", daemon=True)
    thread.start()
    return server, thread


class _Observer(EngineObserver):
    """Engine hooks -> metrics of one base model (called from the engine thread; cheap)."""

    def __init__(self, metrics: InferenceMetrics, model: str) -> None:
        m = metrics
        self._batch = m.batch_size.labels(model=model)
        self._queue = m.queue_length.labels(model=model)
        self._running = m.running.labels(model=model)
        self._ttft = m.ttft.labels(model=model)
        self._queue_time = m.queue_time.labels(model=model)
        self._inter = m.inter_token.labels(model=model)
        self._e2e = m.e2e.labels(model=model)
        self._generated = m.generated_tokens.labels(model=model)
        self._prompt = m.prompt_tokens.labels(model=model)
        self._scored_pairs = m.scored_pairs.labels(model=model)
        self._scored_tokens = m.scored_tokens.labels(model=model)
        self._finished = {reason: m.finished.labels(model=model, reason=reason) for reason in FINISH_REASONS}
        self._kv_used = m.kv_cache_blocks.labels(model=model, state="used")
        self._kv_total = m.kv_cache_blocks.labels(model=model, state="total")
        self._prefix_queries = m.prefix_queries.labels(model=model)
        self._prefix_hits = m.prefix_hits.labels(model=model)
        self._preemptions = m.preemptions.labels(model=model)
        self._seen_queries = self._seen_hits = 0  # this engine's running totals at its last report
        self._metrics = metrics
        self._model = model
        with metrics.engines_lock:
            self._state = metrics.engines.setdefault(model, EngineState())

    def on_capacity(self, max_batch_size: int, num_slots: int) -> None:
        with self._metrics.engines_lock:
            self._state.max_batch_size, self._state.num_slots = max_batch_size, num_slots
            self._metrics.lora_updated_at = time.time()

    def on_adapters(
        self, running: tuple[str, ...], waiting: tuple[str, ...], resident: tuple[str, ...]
    ) -> None:
        state = self._state
        with self._metrics.engines_lock:
            before = (adapter_names(state.running_adapters), adapter_names(state.waiting_adapters))
            state.running_adapters, state.waiting_adapters, state.resident_adapters = (
                running,
                waiting,
                resident,
            )
            if (adapter_names(running), adapter_names(waiting)) != before:
                self._metrics.lora_updated_at = time.time()

    def on_step(self, batch_size: int, adapters_in_batch: int, prefill_tokens: int, seconds: float) -> None:
        if batch_size:
            self._batch.observe(batch_size)

    def on_queue(self, waiting: int, running: int) -> None:
        self._queue.set(waiting)
        self._running.set(running)
        with self._metrics.engines_lock:
            self._state.waiting, self._state.running = waiting, running

    def on_kv_cache(self, used: int, total: int, prefix_query_tokens: int, prefix_hit_tokens: int) -> None:
        # The engine reports running totals; the counters take the increase since its last report
        # (all of it after a restart from zero: a published model loaded again has a new engine).
        queries = prefix_query_tokens - self._seen_queries
        hits = prefix_hit_tokens - self._seen_hits
        if queries < 0 or hits < 0:
            queries, hits = prefix_query_tokens, prefix_hit_tokens
        self._seen_queries, self._seen_hits = prefix_query_tokens, prefix_hit_tokens
        self._kv_used.set(used)
        self._kv_total.set(total)
        if queries:
            self._prefix_queries.inc(queries)
        if hits:
            self._prefix_hits.inc(hits)
        with self._metrics.engines_lock:
            state = self._state
            state.kv_used, state.kv_total = used, total
            state.prefix_queries += queries
            state.prefix_hits += hits

    def on_preemption(self) -> None:
        self._preemptions.inc()

    def on_first_token(self, ttft_s: float, queue_s: float) -> None:
        self._ttft.observe(ttft_s)
        self._queue_time.observe(max(queue_s, 0.0))
        self._generated.inc()

    def on_token(self, inter_token_s: float) -> None:
        self._inter.observe(inter_token_s)
        self._generated.inc()

    def on_score(self, pairs: int, tokens: int, seconds: float) -> None:
        self._scored_pairs.inc(pairs)
        self._scored_tokens.inc(tokens)

    def on_finish(self, reason: str, prompt_tokens: int, generated_tokens: int, e2e_s: float) -> None:
        counter = self._finished.get(reason)
        if counter is not None:
            counter.inc()
        self._prompt.inc(prompt_tokens)
        self._e2e.observe(e2e_s)
