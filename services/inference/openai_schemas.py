"""The OpenAI-compatible request bodies, their checks, and the error shape of the HTTP API.

What ``openai_api.py`` accepts on ``/v1/chat/completions`` and ``/v1/completions`` (the fields of
OpenAI's API reference that a base model with LoRA adapters can honour) and how each becomes a
:class:`~services.inference.sampling.SamplingParams`:

=============================================  ==============================================
OpenAI field                                   ``SamplingParams``
=============================================  ==============================================
``max_tokens`` / ``max_completion_tokens``      ``max_new_tokens`` (unset: the server default)
``temperature`` (default 1, as OpenAI)          ``temperature`` (0 = greedy)
``top_p``, ``seed``, ``n``                      the same names
``stop`` (a string or a list)                   ``stop``
``presence_penalty``, ``frequency_penalty``     the same names
chat ``logprobs: true`` + ``top_logprobs: k``   ``logprobs = k`` (0 without ``top_logprobs``)
completions ``logprobs: k``                     ``logprobs = k``
completions ``echo`` with ``logprobs: k``       ``prompt_logprobs = k`` (the prompt's own)
completions ``echo`` with ``max_tokens: 0``     ``max_new_tokens = 1``, dropped from the answer
=============================================  ==============================================

Any other field is refused (400, naming it): a client that sends ``tools`` or ``response_format``
must learn that nothing honours it, not get an answer that silently ignored it. Bodies are parsed
by pydantic in strict mode (no ``"1"`` for ``1``, no ``true`` for ``1``) and every problem of a
body is reported at once, each naming the field by its JSON path (``messages[2].role``) and the
value; the plane's own checks (``SamplingParams.validate``, ``request_checks.py``) then speak the
OpenAI names too (:func:`openai_field`).

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; the HTTP status
comes from the gRPC status the inference errors module assigns (``errors.STATUS_FOR``), mapped as
``google/rpc/code.proto`` documents each code's HTTP equivalent (:data:`HTTP_STATUS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import grpc
from pydantic import BaseModel, ConfigDict, ValidationError

from lorafleet.errors import ConfigError, FieldProblem, LorafleetError
from services.common.field_errors import truncate_message
from services.inference.errors import STATUS_FOR, InvalidRequestError
from services.inference.request_checks import Message
from services.inference.sampling import SamplingParams

DEFAULT_TEMPERATURE = 1.0
"""OpenAI's default: a request that sets no temperature samples (gRPC's default is greedy)."""
RETRY_AFTER_S = 1
"""``Retry-After`` of a 429: a full queue drains within a few decode steps; the official client
waits this long before its retry."""

HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
"""gRPC status -> HTTP status, as ``google/rpc/code.proto`` maps each code. FAILED_PRECONDITION (an
adapter that exists but cannot be served on this base: another base, a rank over the cap, a corrupt
artifact) is 400, not 409: the request cannot succeed by being retried, it needs another ``model``.
Codes not listed (INTERNAL, UNKNOWN, DATA_LOSS) are 500."""

ERROR_TYPE: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
"""OpenAI's ``error.type`` per HTTP status; anything else is ``server_error`` (5xx) or
``invalid_request_error`` (4xx)."""


class ApiError(Exception):
    """An HTTP-level refusal that no domain error covers (auth, draining, a missing route)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def grpc_status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status ``STATUS_FOR`` gives ``exc`` (the first class of its MRO listed), as the
    gRPC server's ``ErrorInterceptor`` does; None for an error nobody listed (a bug: 500)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR:
            return STATUS_FOR[cls]
    return None


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    kind = ERROR_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": truncate_message(message), "type": kind, "param": param, "code": code}}


def error_for(exc: BaseException, renames: Mapping[str, str]) -> tuple[int, dict[str, Any]] | None:
    """``(HTTP status, OpenAI error body)`` of a domain error, or None when ``STATUS_FOR`` has no row
    for it. Field problems are named as the client sent them (``renames``, see :func:`openai_field`);
    ``param`` is the first problem's field."""
    if isinstance(exc, ApiError):
        return exc.status, error_body(exc.status, exc.message, exc.code, exc.param)
    code = grpc_status_for(exc)
    if code is None:
        return None
    status = HTTP_STATUS.get(code, 500)
    param = None
    message = exc.reason if isinstance(exc, LorafleetError) else str(exc)
    if isinstance(exc, ConfigError) and exc.problems:
        problems = [FieldProblem(openai_field(p.field, renames), p.value, p.message) for p in exc.problems]
        message = str(InvalidRequestError(problems))
        param = problems[0].field
    return status, error_body(status, message, code.name.lower(), param)


def openai_field(field: str, renames: Mapping[str, str]) -> str:
    """The name the client used for a field the plane names: ``sampling.top_p`` -> ``top_p``,
    ``sampling.max_new_tokens`` -> ``max_tokens`` (or whichever ``renames`` says), ``adapter`` ->
    ``model`` (the client named the adapter in ``model``). Indexes and sub-fields are kept."""
    name = field.removeprefix("sampling.")
    head, sep, tail = name.partition(".")
    base, bracket, index = head.partition("[")
    base = renames.get(base, base)
    return base + bracket + index + sep + tail


# -- bodies --------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    """Send a last chunk with ``usage`` and empty ``choices`` before ``[DONE]``."""


class ChatMessage(_Strict):
    role: str
    content: str | list[dict[str, Any]]
    """A string, or OpenAI content parts of which only ``{"type": "text", "text": ...}`` are
    accepted (joined with newlines, as vLLM does)."""


class _Sampling(_Strict):
    """Fields both endpoints take; None = unset (clients such as LangChain send explicit nulls)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    """One prompt, or several (each gets ``n`` choices; lm-evaluation-harness sends a list)."""
    logprobs: int | None = None
    echo: bool | None = None


_Body = TypeVar("_Body", bound=_Strict)


def prompt_only(request: ChatCompletionRequest | CompletionRequest) -> bool:
    """A completions request for the prompt alone: ``echo`` with ``max_tokens: 0``.

    lm-evaluation-harness scores ``loglikelihood`` this way: it sends context + continuation with
    ``echo: true, max_tokens: 0, logprobs: k`` and reads the prompt's token logprobs. The engine
    always generates at least one token, so it is asked for one and the answer drops it: no text, no
    logprobs, 0 completion tokens, ``finish_reason: length`` (vLLM answers the same way).
    """
    return isinstance(request, CompletionRequest) and bool(request.echo) and request.max_tokens == 0


def parse_body(kind: type[_Body], body: bytes) -> _Body:
    """Validate a JSON body against ``kind``.

    Raises:
        InvalidRequestError: every problem at once, each naming the JSON path and the value.
    """
    try:
        return kind.model_validate_json(body)
    except ValidationError as e:
        problems: dict[str, FieldProblem] = {}
        for err in e.errors(include_url=False):
            problem = _problem(err)
            problems.setdefault(problem.field + "\0" + problem.message, problem)
        raise InvalidRequestError(list(problems.values())) from None


_UNION_HINT = {
    "prompt": "must be a string or a list of strings (token-id prompts are not supported)",
    "stop": "must be a string or a list of strings",
    "content": 'must be a string or a list of {"type": "text", "text": "..."} parts',
}


def _problem(err: Any) -> FieldProblem:
    """One pydantic error as a problem named by its JSON path. An error inside a ``str | list``
    field (pydantic reports one per union member, tagged ``str`` / ``list[str]``) becomes one
    problem on the field itself."""
    path = ""
    for part in err["loc"]:
        if isinstance(part, str) and (part == "str" or part.startswith("list[")):
            last = path.rsplit(".", 1)[-1].split("[")[0]
            value = err.get("input") if part == "str" else "<the value sent>"  # str: the whole value
            return FieldProblem(path, value, _UNION_HINT.get(last, "has the wrong type"))
        path += f"[{part}]" if isinstance(part, int) else ("." if path else "") + str(part)
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        return FieldProblem(path, value, "unknown field: this server does not support it")
    if kind == "missing":
        return FieldProblem(path, None, "required")
    if kind == "json_invalid":
        return FieldProblem("body", "<request body>", f"not valid JSON: {err['msg']}")
    if kind == "model_type" and not path:
        return FieldProblem("body", value, "must be a JSON object")
    return FieldProblem(path or "body", value, err["msg"])


# -- OpenAI fields -> plane arguments --------------------------------------------------------------


def messages_from(request: ChatCompletionRequest) -> tuple[list[Message], list[FieldProblem]]:
    """Plane messages from OpenAI messages; text parts are joined with newlines."""
    messages: list[Message] = []
    problems: list[FieldProblem] = []
    for i, m in enumerate(request.messages):
        if isinstance(m.content, str):
            messages.append(Message(m.role, m.content))
            continue
        texts: list[str] = []
        for j, part in enumerate(m.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or len(part) != 2:
                problems.append(
                    FieldProblem(
                        f"messages[{i}].content[{j}]", part, 'only {"type": "text", "text": "..."} parts'
                    )
                )
            else:
                texts.append(part["text"])
        messages.append(Message(m.role, "\n".join(texts)))
    return messages, problems


def sampling_from(
    request: ChatCompletionRequest | CompletionRequest,
) -> tuple[SamplingParams, dict[str, str], list[FieldProblem]]:
    """``(SamplingParams, renames, problems)``: the plane's parameters, how to name its fields back
    in OpenAI's terms, and the problems only the OpenAI shape can have (the values themselves are
    checked by ``SamplingParams.validate`` in the plane, which reports them renamed)."""
    problems: list[FieldProblem] = []
    renames = {"adapter": "model", "max_new_tokens": "max_tokens"}
    max_tokens = request.max_tokens
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != request.max_completion_tokens:
            problems.append(
                FieldProblem(
                    "max_completion_tokens",
                    request.max_completion_tokens,
                    f"differs from max_tokens={max_tokens}; send one of them",
                )
            )
        max_tokens = request.max_completion_tokens
        renames["max_new_tokens"] = "max_completion_tokens"
    stop = request.stop
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    if isinstance(request, ChatCompletionRequest):
        renames["logprobs"] = "top_logprobs"
        if request.top_logprobs is not None and not request.logprobs:
            problems.append(FieldProblem("top_logprobs", request.top_logprobs, "needs logprobs: true"))
        if request.logprobs:
            logprobs = 0 if request.top_logprobs is None else request.top_logprobs
    else:
        logprobs = request.logprobs
        if prompt_only(request):
            max_tokens = 1  # the engine generates at least one token; the answer drops it
        if request.echo and logprobs is not None:
            prompt_logprobs = logprobs
            renames["prompt_logprobs"] = "logprobs"
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        stop=stops,
        seed=request.seed,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        n=1 if request.n is None else request.n,
    )
    return params, renames, problems


__all__ = [
    "DEFAULT_TEMPERATURE",
    "HTTP_STATUS",
    "RETRY_AFTER_S",
    "ApiError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "StreamOptions",
    "error_body",
    "error_for",
    "grpc_status_for",
    "messages_from",
    "openai_field",
    "parse_body",
    "prompt_only",
    "sampling_from",
]
