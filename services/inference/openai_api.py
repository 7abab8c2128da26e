"""The OpenAI-compatible HTTP API of the inference service, served by the same process and the same
:class:`~services.inference.plane.InferencePlane` as gRPC (``--http-port``).

Endpoints (the request fields and their mapping: ``openai_schemas.py``):

==============================  ====================================================================
``GET /v1/models``              every base model, and every ``name@version`` adapter with its base as
                                ``parent`` (failed versions left out)
``GET /v1/models/{id}``         one of them (404 otherwise)
``POST /v1/chat/completions``   chat rendered with the adapter's training template; unary, or
                                ``stream: true`` (server-sent events ending ``data: [DONE]``)
``POST /v1/completions``        plain prompt(s), ``echo``, ``logprobs``; unary or streamed
``GET /health``                 200 once every base is warm, 503 while loading or draining
``GET /metrics``                the service's Prometheus registry, text format 0.0.4 (as ``--metrics-port``)
==============================  ====================================================================

``model`` names a base model (no adapter) or an adapter (``name`` = its newest version, or
``name@version``), as LoRAX and vLLM do; a base's name wins over an adapter of the same name. A
full model published under the adapters root (``freeze`` / ``full`` training, a merged export) is a
base model of its own, named ``name@version`` or ``name`` (``published_models.py``: loaded on first
use; 503 with ``Retry-After`` while it loads). With several bases the adapter's base is the one that
publishes that name. Unknown -> 404.

Why a thin layer over the plane and not a proxy to gRPC: the Gateway API Inference Extension's
endpoint picker routes HTTP requests to pods, so the API must be answered in the pod, and the plane
is already the one place requests are checked, routed and submitted (KServe's thin-transport rule:
this module converts JSON <-> plane dataclasses and calls the plane once per prompt).

Concurrency: FastAPI on uvicorn runs one asyncio loop in a thread of its own. The plane is
synchronous, so each request's submission and its wait (a unary ``result()`` or a stream's chunk
iterator) run on a thread pool of ``grpc_workers`` threads, as gRPC handlers do; a stream's chunks
cross to the loop through an ``asyncio.Queue``. A client that disconnects (unary or streaming)
closes its generation at once: batch rows and the adapter pin are freed, as for a cancelled RPC.

Auth: with ``auth_scope: all`` every ``/v1/`` route needs ``Authorization: Bearer <token>`` (the
same token as gRPC); ``/health`` and ``/metrics`` stay open like gRPC health and reflection. With
``writes`` nothing here needs it: every route reads or generates, and the token guards only
LoadAdapter/UnloadAdapter.

Shutdown: :meth:`HttpServer.stop` stops accepting, lets in-flight requests and streams finish for
the grace period (the gRPC server's drain, run beside it), then cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorafleet.errors import AdapterError, FieldProblem, show_value
from services.inference.errors import InvalidRequestError, ModelNotFoundError, ModelNotReadyError
from services.inference.metrics import InferenceMetrics
from services.inference.openai_responses import Answer, Failure
from services.inference.openai_schemas import (
    RETRY_AFTER_S,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    error_for,
    messages_from,
    parse_body,
    prompt_only,
    sampling_from,
)

if TYPE_CHECKING:  # annotations only: the plane imports torch-side modules this one does not need
    from services.inference.plane import Chunk, Completion, Generation, InferencePlane
    from services.inference.settings import InferenceSettings

log = logging.getLogger("lorafleet.inference.http")

ROUTES: Final = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")
"""The ``route`` label values of the HTTP request counter (``other`` for anything else)."""
_END: Final = object()
_R = TypeVar("_R")


# -- the app ---------------------------------------------------------------------------------------


class OpenAIApi:
    """The routes over one plane. ``ready`` says whether every base is warm; ``draining`` is set by
    :meth:`HttpServer.stop` (new requests get 503 from then on)."""

    def __init__(
        self,
        plane: InferencePlane,
        metrics: InferenceMetrics,
        settings: InferenceSettings,
        ready: Callable[[], bool],
    ) -> None:
        self.plane = plane
        self.metrics = metrics
        self.settings = settings
        self.ready = ready
        self.draining = False
        self.started = int(time.time())
        self.executor = ThreadPoolExecutor(settings.grpc_workers, thread_name_prefix="inference-http")
        self.body_limit = 8 * settings.max_prompt_chars + (1 << 20)
        """Bytes of a request body: a prompt at the character cap, every character escaped as
        ``\\uXXXX`` (6 bytes) or 4 UTF-8 bytes, plus 1 MiB for the rest."""
        self.guard_all = bool(settings.auth_token) and settings.auth_scope == "all"
        self.requests = Counter(
            "lorafleet_inference_http_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=metrics.registry,
        )

    # -- plumbing --------------------------------------------------------------------------------

    def _admit(self, request: Request) -> None:
        """Refuse the request when it lacks the token (scope ``all``) or the server is draining."""
        if self.guard_all:
            given = request.headers.get("authorization", "")
            token = given[len("Bearer ") :] if given.startswith("Bearer ") else ""
            if not token or not hmac.compare_digest(token.encode(), self.settings.auth_token.encode()):
                raise ApiError(
                    401, "send 'Authorization: Bearer <token>' with the server's token", "invalid_api_key"
                )
        if self.draining:
            raise ApiError(503, "the server is shutting down; retry on another replica", "unavailable")

    async def _body(self, request: Request) -> bytes:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.body_limit:
            raise ApiError(
                413, f"the body has {length} bytes; at most {self.body_limit}", "request_too_large", "body"
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.body_limit:
                raise ApiError(413, f"the body exceeds {self.body_limit} bytes", "request_too_large", "body")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _run(self, call: Callable[[], _R]) -> _R:
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    def route(self, model: str) -> tuple[str, str]:
        """``(base model, adapter ref)`` that ``model`` names.

        Raises:
            ModelNotFoundError: no base and, with several bases, no adapter by that name.
            InvalidRequestError: an adapter name that several bases publish.
        """
        hosts = self.plane.hosts
        if model in hosts or self.plane.published.knows(model):
            return model, ""
        if len(hosts) == 1:  # the registry reports an unknown adapter (404) or a malformed ref (400)
            return next(iter(hosts)), model
        name = model.partition("@")[0]
        owners = [
            h.name
            for h in hosts.values()
            if h.registry is not None and any(s.name == name for s in h.registry.statuses())
        ]
        if not owners:
            raise ModelNotFoundError(
                f"model={show_value(model)}: no such base model or adapter; GET /v1/models lists them"
            )
        if len(owners) > 1:
            raise InvalidRequestError(
                [FieldProblem("model", model, f"an adapter of several base models {owners}: ambiguous")]
            )
        return owners[0], model

    def error_response(self, exc: BaseException, renames: dict[str, str] | None = None) -> JSONResponse:
        """The OpenAI error answer of ``exc`` (a 500 with a logged traceback when nobody listed it)."""
        mapped = error_for(exc, renames or {})
        if mapped is None:
            log.error("HTTP request failed", exc_info=exc)
            status, body = 500, error_body(500, "internal error; the server logged the details", "internal")
        else:
            status, body = mapped
            if body["error"]["param"] is None and isinstance(
                exc, AdapterError | ModelNotFoundError | ModelNotReadyError
            ):
                body["error"]["param"] = "model"
            if status == 404:
                body["error"]["code"] = "model_not_found"
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
        if status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(body, status_code=status, headers=headers)

    async def _wait(self, request: Request, generations: list[Generation]) -> list[Completion] | None:
        """Every generation's whole answer, or None when the client disconnected first (then they
        are closed: their rows and adapter pins are freed)."""
        answers: asyncio.Future[list[Completion]] = asyncio.gather(
            *(self._run(g.result) for g in generations)
        )
        watcher: asyncio.Future[None] = asyncio.ensure_future(_disconnected(request))
        waiting: set[asyncio.Future[Any]] = {answers, watcher}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if answers in done:
            watcher.cancel()
            return answers.result()
        for g in generations:
            g.close()
        with contextlib.suppress(BaseException):
            await answers
        return None

    def _chunks(self, generation: Generation) -> AsyncIterator[Chunk | Failure]:
        """The generation's chunks on the loop, pumped from a pool thread as they come."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens any more
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def pump() -> None:
            try:
                for chunk in generation:
                    put(chunk)
            except BaseException as e:
                put(Failure(e))
            finally:
                put(_END)

        self.executor.submit(pump)

        async def drain() -> AsyncIterator[Chunk | Failure]:
            while (item := await queue.get()) is not _END:
                yield item

        return drain()

    # -- routes ----------------------------------------------------------------------------------

    def health(self) -> JSONResponse:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not self.ready():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready"})

    def metrics_page(self) -> Response:
        """The registry in the Prometheus text format 0.0.4 whatever the scraper's ``Accept`` asks
        for, as the ``--metrics-port`` exporter serves it: prometheus_client's OpenMetrics writer
        would rename the ``vllm:`` series that the endpoint picker reads."""
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    def models(self) -> list[dict[str, Any]]:
        """Base models (configured ones, then published full models as ``name@version`` with their
        ``state``: available, loading or ready; failed ones left out, as for adapters), then
        ``name@version`` adapters (those not failed), each with its base as ``parent`` (vLLM's shape)."""
        infos, adapters = self.plane.list_models()
        out: list[dict[str, Any]] = [
            {
                "id": i.name,
                "object": "model",
                "created": self.started,
                "owned_by": "lorafleet",
                "root": i.path,
                "parent": None,
                "max_model_len": i.max_context,
                **(
                    {
                        "state": i.state,
                        "weights_bytes": i.weights_bytes,
                        "kv_bytes_per_token": i.kv_bytes_per_token,
                    }
                    if i.published
                    else {}
                ),
            }
            for i in infos
            if not (i.published and i.state == "failed")
        ]
        out += [
            {
                "id": a.status.ref,
                "object": "model",
                "created": self.started,
                "owned_by": "lorafleet",
                "root": a.status.ref,
                "parent": a.model,
            }
            for a in adapters
            if a.status.state != "failed"
        ]
        return out

    async def chat(self, request: Request) -> Response:
        renames: dict[str, str] = {}
        try:
            self._admit(request)
            body = parse_body(ChatCompletionRequest, await self._body(request))
            messages, problems = messages_from(body)
            params, renames, more = sampling_from(body)
            if problems or more:
                raise InvalidRequestError(problems + more)
            base, adapter = self.route(body.model)
            generation = await self._run(lambda: self.plane.chat(base, adapter, messages, params))
        except Exception as e:
            return self.error_response(e, renames)
        answer = Answer("chat", body.model, params.n, include_usage=_include_usage(body))
        if body.stream:
            return _sse(answer.chat_stream(self._chunks(generation), generation), [generation])
        completions = await self._wait(request, [generation])
        if completions is None:
            return Response(status_code=499)
        return JSONResponse(answer.chat_body(completions[0]))

    async def completions(self, request: Request) -> Response:
        renames: dict[str, str] = {}
        generations: list[Generation] = []
        try:
            self._admit(request)
            body = parse_body(CompletionRequest, await self._body(request))
            params, renames, problems = sampling_from(body)
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if not prompts:
                problems.append(FieldProblem("prompt", [], "give at least one prompt"))
            if problems:
                raise InvalidRequestError(problems)
            base, adapter = self.route(body.model)
            for prompt in prompts:  # every one queued before any is awaited: they share batches
                generations.append(
                    await self._run(lambda p=prompt: self.plane.generate(base, adapter, p, params))  # type: ignore[misc]
                )
        except Exception as e:
            for g in generations:
                g.close()
            return self.error_response(e, renames)
        answer = Answer("text", body.model, params.n, include_usage=_include_usage(body))
        answer.prompt_only = prompt_only(body)
        echo = prompts if body.echo else None
        if body.stream:
            streams = [self._chunks(g) for g in generations]
            return _sse(answer.text_stream(streams, generations, echo), generations)
        completions = await self._wait(request, generations)
        if completions is None:
            return Response(status_code=499)
        return JSONResponse(answer.text_body(completions, echo))


def create_app(api: OpenAIApi) -> FastAPI:
    """The ASGI app of ``api``'s routes, with OpenAI-shaped errors for unknown routes and methods."""
    app = FastAPI(
        title="lorafleet inference (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(
                exc.status_code,
                f"{request.method} {request.url.path}: {exc.detail}",
                "not_found" if exc.status_code == 404 else "method_not_allowed",
            ),
            status_code=exc.status_code,
        )

    @app.get("/health")
    def health() -> Response:
        return api.health()

    @app.get("/metrics")
    def metrics() -> Response:
        return api.metrics_page()

    @app.get("/v1/models")
    def list_models(request: Request) -> Response:
        try:
            api._admit(request)
        except ApiError as e:
            return api.error_response(e)
        return JSONResponse({"object": "list", "data": api.models()})

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str, request: Request) -> Response:
        try:
            api._admit(request)
            for entry in api.models():
                if entry["id"] == model_id:
                    return JSONResponse(entry)
            raise ModelNotFoundError(
                f"model={show_value(model_id)}: no such model; GET /v1/models lists them"
            )
        except Exception as e:
            return api.error_response(e)

    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    return _CountRequests(app, api.requests)  # type: ignore[return-value]


class _CountRequests:
    """ASGI middleware: count every HTTP answer by route and status (closed label sets)."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")
        status = 500

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.counter.labels(route=route, status=str(status)).inc()


# -- answers ---------------------------------------------------------------------------------------


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(events: AsyncIterator[str], generations: list[Generation]) -> EventSourceResponse:
    """Server-sent events with ``\\n`` line ends (what OpenAI sends); the generations are closed
    when the stream ends for any reason (done, client gone, server stopping)."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        finally:
            for g in generations:
                g.close()

    return EventSourceResponse(guarded(), sep="\n")


# -- the server --------------------------------------------------------------------------------------


class HttpServer:
    """uvicorn serving an :class:`OpenAIApi` from a thread of its own (its own asyncio loop), on a
    socket bound by the constructor (so a taken port fails at once and port 0 reports the port).

    Example::

        http = HttpServer(OpenAIApi(plane, metrics, settings, lambda: True), "127.0.0.1", 0)
        http.start(); ...; http.stop(grace=30)
    """

    def __init__(self, api: OpenAIApi, host: str, port: int) -> None:
        self.api = api
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError:
            self.socket.close()
            raise
        self.port = int(self.socket.getsockname()[1])
        config = uvicorn.Config(
            create_app(api),
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_keep_alive=30,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="inference-http", daemon=True
        )

    def start(self) -> int:
        """Serve from now on; returns the bound port."""
        self.thread.start()
        return self.port

    def begin_drain(self, grace: float) -> None:
        """Refuse new requests (503 while the listener closes), stop accepting, and give in-flight
        ones ``grace`` seconds before they are cancelled."""
        self.api.draining = True
        self.server.config.timeout_graceful_shutdown = math.ceil(grace)
        self.server.should_exit = True

    def stop(self, grace: float, timeout: float | None = None) -> None:
        """:meth:`begin_drain`, then wait for the thread (``grace`` + 5 s at most) and free the pool."""
        self.begin_drain(grace)
        if self.thread.is_alive():
            self.thread.join(grace + 5.0 if timeout is None else timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5.0)
        self.socket.close()
        self.api.executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["ROUTES", "HttpServer", "OpenAIApi", "create_app"]
