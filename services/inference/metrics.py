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
===========================================================  =========  =========================

Labels come from closed sets: ``method`` (the RPC names), ``code`` (gRPC status code names),
``model`` (the configured base models), ``reason`` (the engine's finish reasons). No adapter or
request ids: their number is unbounded.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from services.inference.registry import RegistryEvent
from services.inference.requests import EngineObserver

log = logging.getLogger(__name__)

PREFIX: Final = "lorafleet_inference_"

METHODS: Final = (
    "Generate", "GenerateStream", "Chat", "ChatStream", "ListModels", "LoadAdapter", "UnloadAdapter",
)  # fmt: skip
"""The RPCs counted; pre-initialised with code OK so a rate() has a series from the first scrape."""

GRPC_STATUS_CODES: Final = frozenset(
    {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
        "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
        "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
    }
)  # fmt: skip

FINISH_REASONS: Final = ("stop", "length", "cancelled", "error")

LATENCY_BUCKETS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
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
            PREFIX + "time_to_first_token_seconds", "Time from submission to the first generated token.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            PREFIX + "queue_time_seconds", "Part of the time to first token spent waiting for admission.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.inter_token = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between consecutive tokens of a request.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Time from submission to the end of a request.",
            ["model"], buckets=E2E_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.generated_tokens = Counter(
            PREFIX + "generated_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", ["model"], registry=r
        )
        self.finished = Counter(
            PREFIX + "finished_requests", "Engine requests that ended, by finish reason.",
            ["model", "reason"], registry=r,
        )  # fmt: skip
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
            PREFIX + "adapter_evictions", "Adapters evicted from the resident cache (LRU or memory budget).",
            ["model"], registry=r,
        )  # fmt: skip
        self.adapter_load_failures = Counter(
            PREFIX + "adapter_load_failures", "Adapter versions that failed validation or loading.",
            ["model"], registry=r,
        )  # fmt: skip
        self.adapter_load_time = Histogram(
            PREFIX + "adapter_load_seconds", "Validation plus load time of an adapter.", ["model"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.resident_adapters = Gauge(
            PREFIX + "resident_adapters", "Adapters in the resident cache.", ["model"], registry=r
        )
        self.model_ready = Gauge(
            PREFIX + "model_ready",
            "1 once a base model is loaded and warmed up, else 0.",
            ["model"],
            registry=r,
        )
        for method in METHODS:
            self.requests.labels(method=method, code="OK")
        self._lock = threading.Lock()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def add_model(self, model: str) -> None:
        """Create a base model's series at zero, so they exist before its first request."""
        for metric in (self.queue_length, self.running, self.generated_tokens, self.prompt_tokens,
                       self.adapter_loads, self.adapter_evictions, self.adapter_load_failures,
                       self.resident_adapters, self.model_ready):  # fmt: skip
            metric.labels(model=model)
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
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
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
        self._finished = {reason: m.finished.labels(model=model, reason=reason) for reason in FINISH_REASONS}

    def on_step(self, batch_size: int, adapters_in_batch: int, prefill_tokens: int, seconds: float) -> None:
        if batch_size:
            self._batch.observe(batch_size)

    def on_queue(self, waiting: int, running: int) -> None:
        self._queue.set(waiting)
        self._running.set(running)

    def on_first_token(self, ttft_s: float, queue_s: float) -> None:
        self._ttft.observe(ttft_s)
        self._queue_time.observe(max(queue_s, 0.0))
        self._generated.inc()

    def on_token(self, inter_token_s: float) -> None:
        self._inter.observe(inter_token_s)
        self._generated.inc()

    def on_finish(self, reason: str, prompt_tokens: int, generated_tokens: int, e2e_s: float) -> None:
        counter = self._finished.get(reason)
        if counter is not None:
            counter.inc()
        self._prompt.inc(prompt_tokens)
        self._e2e.observe(e2e_s)
