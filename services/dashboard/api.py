"""The dashboard's only way to the services: one small client per gRPC service.

Each client wraps the generated stub, adds the bearer token, puts a deadline on every call, records
every call in the dashboard's Prometheus metrics (``services.dashboard.metrics``) and turns every
``grpc.RpcError`` into a :class:`ServiceError` that names the service, its address, the status code
and the server's message, with a refused spec's problems by field, read from the status details
(``google.rpc.BadRequest``). Pages catch
``ServiceError`` and show it; they never see a gRPC exception or a traceback. Nothing here imports
Streamlit, so it is testable on its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from lorafleet.v1 import adapters_pb2, inference_pb2, inference_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.common.field_errors import FieldViolation, field_violations
from services.common.grpc_util import channel
from services.dashboard import metrics
from services.inference.client import collect_model_pages

SERVICE_TITLES = {"trainer": "Trainer service", "inference": "Inference service"}

# Reconnect quickly once a service is back: gRPC's default backoff grows to 120 s, during which every
# call fails fast and the page would not recover.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

_WHY = {
    "UNAVAILABLE": "is down or unreachable",
    "DEADLINE_EXCEEDED": "did not answer in time",
    "UNAUTHENTICATED": "refused the request: missing or wrong token",
    "PERMISSION_DENIED": "refused the request: not allowed",
    "INVALID_ARGUMENT": "refused the request as invalid",
    "NOT_FOUND": "does not know it",
    "ALREADY_EXISTS": "refused the request: it already exists",
    "FAILED_PRECONDITION": "refused the request in the current state",
    "RESOURCE_EXHAUSTED": "is full",
    "UNIMPLEMENTED": "does not implement this call (version mismatch?)",
    "INTERNAL": "failed internally (see the service's log)",
    "CLIENT_CONFIG": "cannot be reached with the dashboard's settings",
}


@dataclass
class ServiceError(Exception):
    """A service is down or refused a request."""

    service: str
    """``trainer`` or ``inference``."""
    address: str
    code: str
    """gRPC status name (``UNAVAILABLE``, ``INVALID_ARGUMENT``...), or ``CLIENT_CONFIG``."""
    message: str
    """The server's own message (or gRPC's, when the service could not be reached)."""
    field_errors: dict[str, list[str]] = field(default_factory=dict)
    """Problems by spec field without the ``spec.`` prefix
    (``lora.rank`` -> ["spec.lora.rank=0: must be in [1, 1024]"])."""

    def __post_init__(self) -> None:
        super().__init__(self.headline)

    @property
    def title(self) -> str:
        return SERVICE_TITLES.get(self.service, self.service)

    @property
    def headline(self) -> str:
        why = _WHY.get(self.code, "refused the request")
        return f"{self.title} at {self.address} {why} ({self.code})"

    def __str__(self) -> str:
        return f"{self.headline}: {self.message}"


def field_errors(violations: list[FieldViolation]) -> dict[str, list[str]]:
    """Field violations keyed by the form's field path (the spec path without ``spec.``).

    Returns:
        ``{"lora.rank": ["spec.lora.rank=0: must be in [1, 1024]"], "overrides['x.y']": [...]}``.
    """
    out: dict[str, list[str]] = {}
    for v in violations:
        out.setdefault(v.field.removeprefix("spec."), []).append(v.description)
    return out


class _Client:
    """What both clients share: channel, token, deadlines, metrics and error mapping."""

    service = ""

    def __init__(self, address: str, token: str = "", tls_ca: str = "", timeout_s: float = 10.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.metadata: list[tuple[str, str]] = []  # the channel sends the token on every call
        try:
            self.channel = channel(address, tls_ca or None, CHANNEL_OPTIONS, token=token)
        except OSError as e:
            raise ServiceError(self.service, address, "CLIENT_CONFIG", f"TLS CA file {tls_ca!r}: {e}") from e

    def _error(self, e: grpc.RpcError) -> ServiceError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = (e.details() if hasattr(e, "details") else "") or str(e)
        return ServiceError(self.service, self.address, code.name, details, field_errors(field_violations(e)))

    def _unary(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        start = time.perf_counter()
        try:
            response = getattr(self.stub, method)(
                request, timeout=timeout_s or self.timeout_s, metadata=self.metadata
            )
        except grpc.RpcError as e:
            err = self._error(e)
            metrics.record(self.service, method, err.code, time.perf_counter() - start)
            raise err from None
        metrics.record(self.service, method, "OK", time.perf_counter() - start)
        return response

    def _stream(self, method: str, request: Any, timeout_s: float) -> Iterator[Any]:
        """Yield the responses; on an error raise ``ServiceError`` (after any responses received)."""
        start = time.perf_counter()
        call = getattr(self.stub, method)(request, timeout=timeout_s, metadata=self.metadata)
        code = "CANCELLED"  # the consumer stopped early
        try:
            yield from call
            code = "OK"
        except grpc.RpcError as e:
            err = self._error(e)
            code = err.code
            raise err from None
        finally:
            if code == "CANCELLED":
                call.cancel()
            metrics.record(self.service, method, code, time.perf_counter() - start)

    stub: Any

    def close(self) -> None:
        self.channel.close()


class TrainerApi(_Client):
    """``lorafleet.v1.TrainerService``."""

    service = "trainer"

    def __init__(self, address: str, token: str = "", tls_ca: str = "", timeout_s: float = 10.0) -> None:
        super().__init__(address, token, tls_ca, timeout_s)
        self.stub = trainer_pb2_grpc.TrainerServiceStub(self.channel)

    def submit_job(
        self, spec: trainer_pb2.JobSpec, dry_run: bool = False, idempotency_key: str = ""
    ) -> trainer_pb2.Job:
        # Validation reads the datasets and the model config: allow it more than a listing.
        request = trainer_pb2.SubmitJobRequest(spec=spec, dry_run=dry_run, idempotency_key=idempotency_key)
        return self._unary("SubmitJob", request, timeout_s=max(self.timeout_s, 60.0))

    def get_job(self, job_id: str) -> trainer_pb2.Job:
        return self._unary("GetJob", trainer_pb2.GetJobRequest(job_id=job_id))

    def list_jobs(self, states: Sequence[trainer_pb2.JobState] = ()) -> list[trainer_pb2.Job]:
        """Every job (all pages), newest first as the service orders them."""
        jobs: list[trainer_pb2.Job] = []
        token = ""
        while True:
            request = trainer_pb2.ListJobsRequest(states=list(states), page_size=200, page_token=token)
            page = self._unary("ListJobs", request)
            jobs += page.jobs
            token = page.next_page_token
            if not token:
                return jobs

    def cancel_job(self, job_id: str, reason: str = "") -> trainer_pb2.Job:
        return self._unary("CancelJob", trainer_pb2.CancelJobRequest(job_id=job_id, reason=reason))

    def poll_job_events(
        self, job_id: str, after_seq: int = 0, wait_s: float = 1.0
    ) -> tuple[list[trainer_pb2.JobEvent], bool]:
        """The job's events after ``after_seq`` that arrive within ``wait_s``.

        ``WatchJob`` replays the history and then follows the job until it ends; a page cannot block
        that long, so it polls with a short deadline and resumes from the last sequence number.

        Returns:
            (events, ended): ``ended`` is True when the stream closed because the job has ended.
        """
        request = trainer_pb2.WatchJobRequest(job_id=job_id, after_seq=after_seq)
        events: list[trainer_pb2.JobEvent] = []
        try:
            for ev in self._stream("WatchJob", request, timeout_s=wait_s):
                events.append(ev)
        except ServiceError as e:
            if e.code == "DEADLINE_EXCEEDED":
                return events, False
            raise
        return events, True

    def list_adapters(self, name: str = "") -> list[adapters_pb2.Adapter]:
        return list(self._unary("ListAdapters", trainer_pb2.ListAdaptersRequest(name=name)).adapters)

    def export_adapter(
        self, ref: str, publish_name: str, dtype: str = ""
    ) -> trainer_pb2.ExportAdapterResponse:
        """Merge ``ref`` into its base and publish it as ``publish_name``; a merge loads the base, so
        it gets minutes rather than the default timeout."""
        request = trainer_pb2.ExportAdapterRequest(ref=ref, publish_name=publish_name, dtype=dtype)
        return self._unary("ExportAdapter", request, timeout_s=max(self.timeout_s, 900.0))


class InferenceApi(_Client):
    """``lorafleet.v1.InferenceService``."""

    service = "inference"

    def __init__(self, address: str, token: str = "", tls_ca: str = "", timeout_s: float = 10.0) -> None:
        super().__init__(address, token, tls_ca, timeout_s)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    def list_models(self) -> inference_pb2.ListModelsResponse:
        return collect_model_pages(lambda request: self._unary("ListModels", request))

    def load_adapter(self, adapter: str, model: str = "") -> inference_pb2.AdapterStatus:
        # Loading reads and validates the weights: allow it more than a listing.
        request = inference_pb2.LoadAdapterRequest(model=model, adapter=adapter)
        return self._unary("LoadAdapter", request, timeout_s=max(self.timeout_s, 60.0))

    def unload_adapter(self, adapter: str, model: str = "") -> inference_pb2.AdapterStatus:
        return self._unary("UnloadAdapter", inference_pb2.UnloadAdapterRequest(model=model, adapter=adapter))

    def chat_stream(
        self,
        messages: Sequence[tuple[str, str]],
        adapter: str = "",
        sampling: inference_pb2.SamplingParams | None = None,
        model: str = "",
        timeout_s: float = 300.0,
    ) -> Iterator[inference_pb2.GenerateChunk]:
        """Stream a chat answer: text deltas as they are decoded, the usage on the last chunk.

        Args:
            messages: (role, content) pairs, oldest first.
            adapter: "name", "name@version" or "" for the base model.
        """
        request = inference_pb2.ChatRequest(
            model=model,
            adapter=adapter,
            messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in messages],
            sampling=sampling,
        )
        yield from self._stream("ChatStream", request, timeout_s=timeout_s)


_GRPC_CODE_OF_HTTP = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    412: "FAILED_PRECONDITION",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}
"""HTTP status -> the gRPC code name a :class:`ServiceError` carries (the inverse of the inference
service's mapping, ``services/inference/openai_schemas.py``); anything else is INTERNAL."""


class OpenAIChatApi:
    """The inference service's OpenAI-compatible HTTP API (``--http-port``), through the official
    ``openai`` client, for the chat page's other transport.

    Same contract as the gRPC clients: the bearer token on every call, a :class:`ServiceError` naming
    the service, its address, a gRPC-style code and the server's message for every failure, and
    every call recorded in the dashboard's metrics (method ``http:chat.completions``).
    """

    service = "inference"
    method = "http:chat.completions"

    def __init__(self, address: str, token: str = "", tls_ca: str = "", timeout_s: float = 10.0) -> None:
        import openai  # the chat page's HTTP transport only: other pages never pay for the import

        self.address = address
        self.timeout_s = timeout_s
        base = address if "://" in address else f"http://{address}"
        try:
            http = openai.DefaultHttpxClient(verify=tls_ca or True) if base.startswith("https://") else None
        except OSError as e:
            raise ServiceError(self.service, address, "CLIENT_CONFIG", f"TLS CA file {tls_ca!r}: {e}") from e
        self._openai = openai
        # The server needs the token only with auth_scope "all"; the client insists on some key.
        self.client = openai.OpenAI(
            base_url=base.rstrip("/") + "/v1", api_key=token or "none", max_retries=0, http_client=http
        )

    def _error(self, e: Exception) -> ServiceError:
        openai = self._openai
        if isinstance(e, openai.APIStatusError):
            body = e.body if isinstance(e.body, dict) else {}
            message = str(body.get("message") or e.message)
            code = _GRPC_CODE_OF_HTTP.get(e.status_code, "INTERNAL")
            param = body.get("param")
            fields = {str(param): [message]} if param else {}
            return ServiceError(self.service, self.address, code, message, fields)
        if isinstance(e, openai.APITimeoutError):
            return ServiceError(self.service, self.address, "DEADLINE_EXCEEDED", str(e))
        return ServiceError(self.service, self.address, "UNAVAILABLE", str(e))

    def chat_stream(
        self,
        messages: Sequence[tuple[str, str]],
        model: str,
        sampling: inference_pb2.SamplingParams,
        timeout_s: float = 300.0,
    ) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Stream a chat answer as ``(text delta, None)`` pairs, then ``("", usage)`` once: prompt and
        completion tokens, ``finish`` (``stop`` / ``length``), time to first token and total time
        (measured here, so they include the HTTP hop).

        Args:
            messages: (role, content) pairs, oldest first.
            model: OpenAI ``model``: an adapter ref, or a base model's name for no adapter.
            sampling: the page's parameters; only the ones OpenAI's API has may be set (a ``top_k``
                or ``repetition_penalty`` is refused here, naming it, rather than silently dropped).

        Raises:
            ServiceError: refused (INVALID_ARGUMENT for a parameter OpenAI's API lacks), or failed.
        """
        extra = [
            f"{f}={v}"
            for f, v, off in (
                ("top_k", sampling.top_k, 0),
                ("repetition_penalty", sampling.repetition_penalty, 1.0),
            )
            if v and v != off
        ]
        if extra:
            raise ServiceError(
                self.service,
                self.address,
                "INVALID_ARGUMENT",
                f"{', '.join(extra)}: not a field of the OpenAI API; reset it or use gRPC",
            )
        start = time.perf_counter()
        code = "CANCELLED"  # the consumer stopped early
        first: float | None = None
        finish = ""
        try:
            chat: list[Any] = [{"role": r, "content": c} for r, c in messages]
            stream = self.client.chat.completions.create(
                model=model,
                messages=chat,
                temperature=sampling.temperature,
                top_p=sampling.top_p or 1.0,
                max_tokens=sampling.max_new_tokens or None,
                stream=True,
                stream_options={"include_usage": True},
                timeout=timeout_s,
            )
            with stream:
                for chunk in stream:
                    if chunk.usage is not None:
                        yield (
                            "",
                            {
                                "prompt_tokens": chunk.usage.prompt_tokens,
                                "generated_tokens": chunk.usage.completion_tokens,
                                "finish": finish,
                                "ttft_s": (first or time.perf_counter()) - start,
                                "total_s": time.perf_counter() - start,
                            },
                        )
                    for choice in chunk.choices:
                        finish = choice.finish_reason or finish
                        if choice.delta.content:
                            first = first or time.perf_counter()
                            yield choice.delta.content, None
            code = "OK"
        except self._openai.OpenAIError as e:
            err = self._error(e)
            code = err.code
            raise err from None
        finally:
            metrics.record(self.service, self.method, code, time.perf_counter() - start)

    def close(self) -> None:
        self.client.close()
