"""Every error the inference service raises on purpose, and the status code each one becomes.

``STATUS_FOR`` is the explicit table the server gives its ``ErrorInterceptor``: a new error class
goes here, with its code, and nowhere else (the trainer's ``services/trainer/errors.py`` has the same
shape). The engine and the registry only raise these; they never touch a status. Each error carries
a human ``reason`` (``lorafleet.errors.LorafleetError``); the client sees that reason as the status
message.

The adapter errors that the trainer shares (``AdapterError`` for a malformed reference,
``AdapterNotFoundError``) live in ``lorafleet.errors``; the ones below subclass them.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from lorafleet.errors import AdapterError, ConfigError, FieldProblem, LorafleetError
from services.common.interceptor import CORE_STATUS


class InvalidRequestError(ConfigError):
    """A request field is invalid; lists every problem, each naming the field and the value."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__(problems, "invalid request")


class ModelNotFoundError(LorafleetError):
    """The request names a base model this server does not serve."""


class ModelNotReadyError(LorafleetError):
    """The base model is still loading (or failed to load); retry later."""


class AdapterIncompatibleError(AdapterError):
    """The adapter is intact but this server cannot serve it: another base model, a rank above the
    cap, target modules the base lacks, or not a LoRA adapter."""


class AdapterLoadError(AdapterError):
    """The adapter artifact is unusable: unreadable manifest, corrupt or truncated files, pickle-only
    weights, or the loader failed on it (LoRAX answers 424)."""


class AdapterCapacityError(AdapterError):
    """Every resident slot (or the memory budget) is held by adapters pinned by in-flight requests;
    retrying later can succeed."""


class EngineError(LorafleetError):
    """Base class of the generation engine's errors."""


class QueueFullError(EngineError):
    """``Engine.submit`` refused a request: ``max_queued`` requests are already waiting."""


class PromptTooLongError(EngineError, ValueError):
    """The prompt is empty, or leaves no room for a generated token within the model's context."""


class EngineClosedError(EngineError):
    """The engine was closed before the request could finish."""


class RequestFailedError(EngineError):
    """The request failed inside the engine (an adapter that cannot be loaded into a slot, a model
    error); the other requests keep running."""


class SamplingFailedError(InvalidRequestError):
    """One request's sampling parameters turned its finite logits into NaN or infinite
    probabilities at run time. Only that request fails (INVALID_ARGUMENT, naming the parameters);
    the other rows of its batch go on. Validation refuses the values known to do this, so this is
    the net under it."""


class NonFiniteLogitsError(RequestFailedError):
    """The model (with the request's adapter, if any) produced NaN or infinite logits for one
    request's row. Only that request fails; the other rows of its batch go on."""


STATUS_FOR: Mapping[type[BaseException], grpc.StatusCode] = {
    **CORE_STATUS,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    ModelNotReadyError: grpc.StatusCode.UNAVAILABLE,
    AdapterIncompatibleError: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterCapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    PromptTooLongError: grpc.StatusCode.INVALID_ARGUMENT,
    EngineClosedError: grpc.StatusCode.UNAVAILABLE,
    RequestFailedError: grpc.StatusCode.INTERNAL,
    SamplingFailedError: grpc.StatusCode.INVALID_ARGUMENT,
    NonFiniteLogitsError: grpc.StatusCode.INTERNAL,
}
"""Every error above (and the core's) -> the status the client gets; ``InvalidRequestError`` is a
``ConfigError`` (INVALID_ARGUMENT, with a BadRequest field violation per problem)."""

__all__ = [
    "STATUS_FOR",
    "AdapterCapacityError",
    "AdapterIncompatibleError",
    "AdapterLoadError",
    "EngineClosedError",
    "EngineError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "NonFiniteLogitsError",
    "PromptTooLongError",
    "QueueFullError",
    "RequestFailedError",
    "SamplingFailedError",
]
