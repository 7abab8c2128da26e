"""The inference gRPC service (``lorafleet.v1.InferenceService``): a thin layer over ``InferencePlane``.

Run as:
    python -m services.inference.server --model tiny=.cache/tiny/llama [--model other=PATH:nf4 ...]
        [--adapters-root .cache/adapters] [--port 50052] [--metrics-port 9102] [--config serve.yaml]
        [--max-new-tokens-cap 512] [--max-batch-size 32] [--max-queued 256] [--adapter-capacity 16]
        [--auth-token TOKEN] [--tls-cert F --tls-key F] [--shutdown-grace-s 30] [--http-port 8000]
        [--max-published-models 1] [--published-dtype bf16] [--published-quantization none]
        [--kv-cache auto|paged|padded] [--kv-cache-mb 2048] [--kv-block-size 16]
        [--max-prefill-tokens 512] [--no-prefix-caching]
    (or ``lorafleet inference-server ...``)

Full models published under the adapters root (``freeze`` / ``full`` training, ``lorafleet export
--merge --publish NAME``) are served without a restart as base models named ``name@version`` (or
``name``, the newest): loaded on first request, or by ``LoadAdapter`` with that ``model`` and no
``adapter`` (``UnloadAdapter`` the same way), at most ``--max-published-models`` at once
(``published_models.py``).

``--http-port`` also serves the OpenAI-compatible HTTP API (``openai_api.py``: ``/v1/models``,
``/v1/chat/completions``, ``/v1/completions``, ``/health``, ``/metrics``) from this process, over
the same plane and engines, and prints ``http on http://HOST:PORT``.

Every flag also reads an environment variable (LORAFLEET_INFERENCE_<FLAG>, e.g.
LORAFLEET_INFERENCE_PORT; models as a comma-separated LORAFLEET_INFERENCE_MODEL). A YAML file
(``--config``, see ``settings.py``) gives the same settings; flags override it. Prints
``listening on HOST:PORT`` at once and ``ready`` once every base model has loaded and generated a
token; grpc.health.v1 says NOT_SERVING until then, and requests get UNAVAILABLE. A base that fails
to load is printed as ``error: base models failed to load: NAME: REASON``; the process stays up,
NOT_SERVING, except when the engine refused the settings themselves (``--kv-cache-mb`` below one
``max_context`` sequence, ``--kv-cache paged`` for a model that cannot page): then it exits 2.

Each base model's engine keeps its KV cache in blocks of ``--kv-block-size`` tokens under a budget of
``--kv-cache-mb`` MiB (``--kv-cache paged``; ``auto`` falls back to the padded layout for models that
cannot page), reuses the cached blocks of shared prompt prefixes (``--no-prefix-caching`` turns it
off) and prefills ``--max-prefill-tokens`` prompt tokens per iteration (see ``engine.py``).

A client that cancels or disconnects, or whose deadline passes, frees its batch row and adapter pin
at once (``context.add_callback``).

SIGTERM (or SIGINT) drains: health turns NOT_SERVING, new RPCs are refused (UNAVAILABLE), in-flight
requests and streams run to completion for up to ``--shutdown-grace-s`` seconds, then the rest are
cancelled and the process exits 0. A second signal cancels the in-flight requests at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import fields
from typing import Any

import grpc

from lorafleet.errors import ConfigError, FieldProblem, LorafleetError
from lorafleet.v1 import inference_pb2 as pb
from lorafleet.v1 import inference_pb2_grpc
from services.common import grpc_util
from services.common.auth import add_secret_refusal, guarded_methods
from services.common.interceptor import ErrorInterceptor
from services.inference import settings as settings_module
from services.inference.errors import STATUS_FOR, InvalidRequestError
from services.inference.metrics import InferenceMetrics
from services.inference.openai_api import HttpServer, OpenAIApi
from services.inference.plane import (
    Completion,
    Generation,
    HostedAdapterStatus,
    InferencePlane,
    Logprob,
    Usage,
)
from services.inference.request_checks import Message
from services.inference.reward_heads import ScorePair, ScoreResult
from services.inference.sampling import SamplingParams
from services.inference.settings import InferenceSettings

log = logging.getLogger("lorafleet.inference")
SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
RPC_METHODS = frozenset(pb.DESCRIPTOR.services_by_name["InferenceService"].methods_by_name)
MUTATING = ["LoadAdapter", "UnloadAdapter"]

_NO_DEADLINE_S = 10 * 365 * 86400.0
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
_PARAM_NAMES = frozenset(f.name for f in fields(SamplingParams))


# -- protobuf <-> plane ----------------------------------------------------------------------------


def sampling_from_pb(s: pb.SamplingParams) -> SamplingParams:
    """The sampling fields the client set, by name (each proto field is a ``SamplingParams`` field);
    unset ones keep their defaults (an unset ``max_new_tokens`` takes the server's)."""
    sent: dict[str, Any] = {}
    for f in s.DESCRIPTOR.fields:
        value = getattr(s, f.name)
        if f.is_repeated:
            if value:
                sent[f.name] = tuple(value)
        elif s.HasField(f.name):
            sent[f.name] = value
    return SamplingParams(**sent)


def usage_to_pb(u: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=u.prompt_tokens,
        generated_tokens=u.generated_tokens,
        finish_reason=_FINISH.get(u.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        time_to_first_token_s=u.time_to_first_token_s,
        total_time_s=u.total_time_s,
        adapter=u.adapter,
        template=u.template,
    )


def logprobs_to_pb(entries: Iterable[Logprob] | None) -> list[pb.TokenLogprob]:
    """The plane's logprob entries as protobuf (an empty list for None)."""
    return [
        pb.TokenLogprob(
            token_id=e.token_id,
            token=e.token,
            logprob=e.logprob,
            top_logprobs=[
                pb.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob) for t in e.top
            ],
        )
        for e in entries or ()
    ]


def completion_to_pb(completion: Completion) -> pb.GenerateResponse:
    """Sample 0 at the top level; every sample in ``samples`` when there are several."""
    samples = completion.samples if len(completion.samples) > 1 else []
    return pb.GenerateResponse(
        text=completion.text,
        token_ids=completion.token_ids,
        usage=usage_to_pb(completion.usage),
        logprobs=logprobs_to_pb(completion.logprobs),
        prompt_logprobs=logprobs_to_pb(completion.prompt_logprobs),
        samples=[
            pb.Sample(
                index=s.index,
                text=s.text,
                token_ids=s.token_ids,
                finish_reason=_FINISH.get(s.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                logprobs=logprobs_to_pb(s.logprobs),
            )
            for s in samples
        ],
    )


def adapter_status_to_pb(hosted: HostedAdapterStatus) -> pb.AdapterStatus:
    s = hosted.status
    return pb.AdapterStatus(
        name=s.name,
        version=s.version,
        ref=s.ref,
        base_model=s.base_model,
        state=s.state,
        reason=s.reason,
        rank=s.rank or 0,
        template=s.template,
        method=s.method,
        model=hosted.model,
    )


LIST_PAGE_DEFAULT = 500
LIST_PAGE_MAX = 1000
LIST_PAGE_BYTES = 3 * 1024 * 1024
"""Byte budget of one ListModels page: under gRPC's default 4 MiB client limit whatever is published."""


def score_pairs_from_pb(request: pb.ScoreRequest) -> list[ScorePair]:
    """The pairs of a Score request; fields this server does not know (a newer client's) are
    refused, each named, rather than ignored: a score computed without them could mislead."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    where = [("", request)]
    for i, pair in enumerate(request.pairs):
        where.append((f"pairs[{i}]", pair))
        where += [(f"pairs[{i}].messages[{j}]", m) for j, m in enumerate(pair.messages)]
    unknown = [
        FieldProblem(path or "request", f"field number {f.field_number}", "unknown field: not supported")
        for path, message in where
        for f in UnknownFieldSet(message)
    ]
    if unknown:
        raise InvalidRequestError(unknown)
    return [
        ScorePair(p.prompt, tuple(Message(m.role, m.content) for m in p.messages), p.response)
        for p in request.pairs
    ]


def score_result_to_pb(result: ScoreResult) -> pb.ScoreResponse:
    u = pb.ScoreUsage(tokens=result.tokens, adapter=result.adapter, template=result.template)
    u.total_time_s = result.total_time_s
    return pb.ScoreResponse(scores=result.scores, usage=u)


def _page_start(page_token: str) -> int:
    """The adapter offset a page token names; malformed tokens are the client's error."""
    if page_token == "":
        return 0
    if not (page_token.isascii() and page_token.isdigit() and len(page_token) <= 9):
        raise InvalidRequestError(
            [FieldProblem("page_token", page_token, "use the next_page_token of a listing")]
        )
    return int(page_token)


def list_models_to_pb(
    plane: InferencePlane, page_size: int = 0, page_token: str = ""
) -> pb.ListModelsResponse:
    """One page of ListModels: every base model, then adapters from ``page_token`` on, up to
    ``page_size`` of them or :data:`LIST_PAGE_BYTES`, with the token of the next page if any remain.

    Raises:
        InvalidRequestError: a negative or too large page size, or a malformed page token.
    """
    if not 0 <= page_size <= LIST_PAGE_MAX:
        raise InvalidRequestError(
            [FieldProblem("page_size", page_size, f"use 0 (default) to {LIST_PAGE_MAX}")]
        )
    start = _page_start(page_token)
    limit = page_size or LIST_PAGE_DEFAULT
    infos, adapters = plane.list_models()
    out = _models_to_pb(infos)
    used = out.ByteSize()
    end = start
    for status in adapters[start : start + limit]:
        item = adapter_status_to_pb(status)
        size = item.ByteSize() + 8  # field tag and length prefix
        if end > start and used + size > LIST_PAGE_BYTES:
            break
        out.adapters.append(item)
        used += size
        end += 1
    if end < len(adapters):
        out.next_page_token = str(end)
    return out


def _models_to_pb(infos: list[Any]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[
            pb.BaseModelStatus(
                name=i.name,
                path=i.path,
                dtype=i.dtype,
                quantization=i.quantization,
                state=i.state,
                reason=i.reason,
                template=i.template,
                max_context=i.max_context,
            )
            for i in infos
        ],
    )


def _close_when_done(generation: Generation, context: grpc.ServicerContext) -> None:
    """Close ``generation`` as soon as the RPC ends for any reason (done, cancelled, deadline): its
    batch row and adapter pin are freed at once."""
    if not context.add_callback(generation.close):  # already terminated
        generation.close()


def _ended_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """Why an RPC ended without an answer: its deadline passed, or the client cancelled."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def unary_response(method: str, generation: Generation, context: grpc.ServicerContext) -> pb.GenerateResponse:
    """Wait for the whole answer (within the RPC's deadline) and convert it."""
    _close_when_done(generation, context)
    try:
        remaining = context.time_remaining()  # huge (not None) when the client set no deadline
        wait = None if remaining is None or remaining > _NO_DEADLINE_S else remaining + 5.0
        completion: Completion | None = generation.result(wait)
    except TimeoutError:
        completion = None
    finally:
        generation.close()
    if completion is None or completion.usage.finish_reason == "cancelled":
        code = _ended_code(context)
        context.abort(code, f"{method} ended before it finished: {code.name.lower()}")
    assert completion is not None
    return completion_to_pb(completion)


def stream_chunks(generation: Generation, context: grpc.ServicerContext) -> Iterator[pb.GenerateChunk]:
    """Convert the chunks as they come; a stream the client left just ends."""
    _close_when_done(generation, context)
    try:
        for chunk in generation:
            if chunk.usage is not None:
                if chunk.usage.finish_reason != "cancelled":
                    yield pb.GenerateChunk(usage=usage_to_pb(chunk.usage))
                return
            yield pb.GenerateChunk(
                text=chunk.text,
                token_ids=list(chunk.token_ids),
                index=chunk.index,
                logprobs=logprobs_to_pb(chunk.logprobs),
                prompt_logprobs=logprobs_to_pb(chunk.prompt_logprobs),
                finish_reason=_FINISH.get(chunk.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED),
            )
    finally:
        generation.close()


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Each RPC converts the request, makes one plane call and converts the answer. Errors and the
    count of every RPC's code are the ``ErrorInterceptor``'s."""

    def __init__(self, plane: InferencePlane) -> None:
        self.plane = plane

    def _generate(self, request: pb.GenerateRequest) -> Generation:
        sampling = sampling_from_pb(request.sampling)
        return self.plane.generate(request.model, request.adapter, request.prompt, sampling)

    def _chat(self, request: pb.ChatRequest) -> Generation:
        messages = [Message(m.role, m.content) for m in request.messages]
        return self.plane.chat(request.model, request.adapter, messages, sampling_from_pb(request.sampling))

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        return unary_response("Generate", self._generate(request), context)

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Any:
        yield from stream_chunks(self._generate(request), context)

    def Chat(self, request: pb.ChatRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        return unary_response("Chat", self._chat(request), context)

    def ChatStream(self, request: pb.ChatRequest, context: grpc.ServicerContext) -> Any:
        yield from stream_chunks(self._chat(request), context)

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return list_models_to_pb(self.plane, request.page_size, request.page_token)

    def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.ServicerContext) -> pb.AdapterStatus:
        return adapter_status_to_pb(self.plane.load_adapter(request.model, request.adapter))

    def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.ServicerContext
    ) -> pb.AdapterStatus:
        return adapter_status_to_pb(self.plane.unload_adapter(request.model, request.adapter))

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        pairs = score_pairs_from_pb(request)
        return score_result_to_pb(self.plane.score(request.model, request.adapter, pairs))


# -- wiring -------------------------------------------------------------------------------------------


class InferenceServer:
    """Everything one inference process runs: the plane (models, engines, registries), the gRPC
    server with health and reflection, and the metrics endpoint.

    ``start()`` binds and serves at once (health NOT_SERVING, requests UNAVAILABLE) and loads the
    base models in a background thread; ``wait_ready()`` blocks until they are warm.

    Example::

        server = InferenceServer(InferenceSettings(models=[ModelSettings("tiny", path)], port=0))
        port = server.start()
        server.wait_ready(120)
        ...
        server.stop()
    """

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings.validate()
        self.metrics = InferenceMetrics()
        self.plane = InferencePlane(settings, self.metrics.observer, self.metrics.registry_event)
        self.servicer = InferenceServicer(self.plane)
        # First, so that it also counts what the auth interceptor refuses.
        interceptors: list[grpc.ServerInterceptor] = [ErrorInterceptor(STATUS_FOR, self._count)]
        if settings.auth_token:
            guarded = guarded_methods(
                pb.DESCRIPTOR.services_by_name["InferenceService"], MUTATING, settings.auth_scope
            )
            interceptors.append(grpc_util.BearerTokenInterceptor(settings.auth_token, guarded))
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix="inference-rpc"),
            interceptors=interceptors,
            options=[("grpc.so_reuseport", 0)],
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self.servicer, self.server)
        self.health = grpc_util.add_health_and_reflection(self.server, [SERVICE])
        address = f"{settings.host}:{settings.port}"
        if settings.tls_cert:
            self.port = self.server.add_secure_port(
                address, grpc_util.server_credentials(settings.tls_cert, settings.tls_key)
            )
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind the gRPC port {address}")
        self.http: HttpServer | None = None
        if settings.http_port >= 0:
            api = OpenAIApi(self.plane, self.metrics, settings, lambda: self.ready)
            self.http = HttpServer(api, settings.host, settings.http_port)
        self.http_port = self.http.port if self.http is not None else None
        self.metrics_port: int | None = None
        self._ready = threading.Event()
        self._loaded = threading.Event()
        self._loader: threading.Thread | None = None
        self._stopped = False

    def _count(self, method: str, code: str) -> None:
        """The final code of every RPC of the InferenceService (not health or reflection)."""
        if method in RPC_METHODS:
            self.metrics.request(method, code)

    def start(self) -> int:
        """Serve now, load the models in the background; returns the bound gRPC port."""
        if self.settings.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(self.settings.metrics_port, self.settings.host)
        self.server.start()
        if self.http is not None:
            self.http.start()
        self._loader = threading.Thread(target=self._load, name="inference-model-loader", daemon=True)
        self._loader.start()
        return self.port

    def _load(self) -> None:
        self.plane.start_published_watcher()
        for host in self.plane.hosts.values():
            if self._stopped:
                return
            host.load()
            self.metrics.set_ready(host.name, host.state == "ready")
        self._loaded.set()
        if self.plane.ready and not self._stopped:
            grpc_util.set_serving(self.health, [SERVICE], True)
            self._ready.set()
            log.info("all base models ready: %s", ", ".join(self.plane.hosts))
        else:
            failed = {h.name: h.reason for h in self.plane.hosts.values() if h.state != "ready"}
            log.error("base models failed to load, staying NOT_SERVING: %s", failed)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every base model is warm (True), every load attempt ended with a failure, or
        ``timeout`` passed (False)."""
        self._loaded.wait(timeout)
        return self._ready.is_set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def stop(self, grace: float | None = None, on_draining: Callable[[], None] | None = None) -> None:
        """Stop serving: health NOT_SERVING, new RPCs refused, in-flight ones get ``grace`` seconds
        (None = ``settings.shutdown_grace_s``) to finish; then the engines and the exporter stop.

        Args:
            on_draining: called once new RPCs are refused, while in-flight ones still run.
        """
        self._stopped = True
        grace_s = self.settings.shutdown_grace_s if grace is None else grace
        grpc_util.set_serving(self.health, [SERVICE], False)
        if self.http is not None:
            self.http.begin_drain(grace_s)  # both drain at once, each for at most grace_s
        drained = self.server.stop(grace_s)
        if on_draining is not None:
            on_draining()
        drained.wait()
        if self.http is not None:
            self.http.stop(grace_s)
        if self._loader is not None:
            self._loader.join(timeout=60)
        self.plane.close()
        self.metrics.close()


def _env(name: str) -> str | None:
    return os.environ.get(f"LORAFLEET_INFERENCE_{name.upper()}")


_FLAGS: list[tuple[str, type, str]] = [
    ("adapters_root", str, "publish root of adapters (<root>/<name>/<version>/)"),
    ("host", str, "address to bind"),
    ("port", int, "gRPC port (0 = any free port)"),
    ("metrics_port", int, "/metrics port (0 = any free port, -1 = off)"),
    ("http_port", int, "OpenAI-compatible HTTP API port (0 = any free port, -1 = off)"),
    ("auth_token_file", str, "file holding the bearer token (or set LORAFLEET_INFERENCE_AUTH_TOKEN)"),
    ("auth_scope", str, "what the token guards: writes (LoadAdapter/UnloadAdapter) or all RPCs"),
    ("tls_cert", str, "PEM certificate (with --tls-key: TLS only)"),
    ("tls_key", str, "PEM private key"),
    ("max_new_tokens_cap", int, "largest max_new_tokens a request may ask for"),
    ("default_max_new_tokens", int, "max_new_tokens when a request sets none"),
    ("max_batch_size", int, "rows decoded together per base model"),
    ("max_queued", int, "requests waiting per base model before RESOURCE_EXHAUSTED"),
    ("kv_cache", str, "KV cache layout: auto (paged when the model allows it), paged or padded"),
    ("kv_cache_mb", float, "KV cache budget per base model in MiB (0 = max_batch_size x max_context)"),
    ("kv_block_size", int, "tokens per KV cache block (the prefix-reuse unit)"),
    ("max_prefill_tokens", int, "prompt tokens prefilled per engine iteration (long prompts in chunks)"),
    ("num_slots", int, "adapters in the batched-LoRA tables at once"),
    ("max_rank", int, "largest LoRA rank accepted"),
    ("adapter_capacity", int, "adapters kept loaded per base model (LRU)"),
    ("adapter_memory_budget_mb", float, "MiB of resident adapter weights per base model (0 = no cap)"),
    ("scan_interval_s", float, "seconds between scans of the adapters root"),
    ("max_published_models", int, "published full models (name@version) resident at once (0 = none)"),
    ("published_dtype", str, "dtype of published full models: fp32, bf16 or fp16"),
    ("published_quantization", str, "quantization of published full models: none, nf4 or int8"),
    ("published_load_wait_s", float, "seconds a request waits for its published model to load"),
    ("max_prompt_chars", int, "characters of a prompt (or all chat messages) refused before tokenizing"),
    ("grpc_workers", int, "gRPC handler threads (one per in-flight request)"),
    ("torch_threads", int, "torch CPU threads (0 = CPUs available minus one, at least 1)"),
    ("shutdown_grace_s", float, "on SIGTERM, seconds in-flight requests may take to finish"),
]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lorafleet inference-server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", default=_env("config"), help="YAML settings file (flags override it)")
    env_models = [m for m in (_env("model") or "").split(",") if m]
    ap.add_argument(
        "--model",
        action="append",
        default=None,
        help=f"NAME=PATH[:none|nf4|int8], repeatable (env default: {env_models or 'none'})",
    )
    ap.add_argument(
        "--dtype", default=_env("dtype"), choices=settings_module.DTYPES, help="dtype of the --model bases"
    )
    for name, kind, helptext in _FLAGS:
        raw = _env(name)
        ap.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=kind(raw) if raw is not None else None,
            help=helptext,
        )
    ap.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse cached KV blocks of shared prompt prefixes (default on; env true/false)",
    )
    add_secret_refusal(ap, "--auth-token", "use --auth-token-file or LORAFLEET_INFERENCE_AUTH_TOKEN")
    return ap


def settings_from_args(args: argparse.Namespace) -> InferenceSettings:
    """Defaults, then the YAML file, then flags (whose defaults come from the environment).

    Raises:
        ConfigError: every problem at once.
    """
    settings = settings_module.load_yaml(args.config) if args.config else InferenceSettings()
    models = args.model if args.model is not None else [m for m in (_env("model") or "").split(",") if m]
    if models:
        settings.models = [settings_module.parse_model_flag(m) for m in models]
        if args.dtype:
            for m in settings.models:
                m.dtype = args.dtype
    if _env("auth_token"):
        settings.auth_token = _env("auth_token") or ""
    for name, _, _ in _FLAGS:
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    raw = _env("prefix_caching")
    if args.prefix_caching is not None:
        settings.prefix_caching = args.prefix_caching
    elif raw is not None:
        settings.prefix_caching = settings_module.parse_bool("LORAFLEET_INFERENCE_PREFIX_CACHING", raw)
    return settings.validate()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(build_parser().parse_args(argv))
    except LorafleetError as e:
        print(f"error: {e.reason}", file=sys.stderr)
        return 2
    import torch

    # Set here, for the process, not in InferenceServer: an embedding process (tests, a notebook)
    # keeps its own thread count.
    torch.set_num_threads(settings.effective_torch_threads)
    server = InferenceServer(settings)
    port = server.start()
    print(f"listening on {settings.host}:{port}", flush=True)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    if server.metrics_port is not None:
        print(f"metrics on http://{settings.host}:{server.metrics_port}/metrics", flush=True)
    if server.http_port is not None:
        print(f"http on http://{settings.host}:{server.http_port}", flush=True)
    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if done.is_set():  # the second signal: cancel what is still running
            log.warning("second %s: cancelling in-flight requests", signal.Signals(signum).name)
            server.server.stop(0)
            return
        done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    exit_code = 0

    def report_ready() -> None:
        nonlocal exit_code
        if server.wait_ready():
            print("ready", flush=True)
            return
        failed = [h for h in server.plane.hosts.values() if h.state == "failed"]
        reasons = "; ".join(f"{h.name}: {h.reason}" for h in failed)
        if any(h.config_error for h in failed):
            # The engine refused the settings (a KV budget below one sequence, say): no retry helps.
            print(f"error: base models failed to load: {reasons}", flush=True)
            exit_code = 2
            done.set()
        else:
            print(
                f"error: base models failed to load: {reasons}; see the log (health stays NOT_SERVING)",
                flush=True,
            )

    threading.Thread(target=report_ready, daemon=True).start()
    while not done.wait(1.0):  # a bare wait() would not wake for the signal handler on every platform
        pass
    grace = settings.shutdown_grace_s
    server.stop(on_draining=lambda: print(f"draining: in-flight requests get up to {grace:g} s", flush=True))
    print("stopped", flush=True)
    return exit_code


__all__ = [
    "ConfigError",
    "InferenceServer",
    "InferenceServicer",
    "build_parser",
    "main",
    "settings_from_args",
]

if __name__ == "__main__":
    sys.exit(main())
