"""Every error the inference service raises on purpose, in one place.

The server maps each class to a status code in one explicit table (``server.py``, ``ERROR_STATUS``);
this module imports no grpc, so the engine and the registry can raise these without knowing about
the transport. Each error carries a human ``reason`` (``lorafleet.errors.LorafleetError``); the
client sees that reason as the status message.

The adapter errors that the trainer shares (``AdapterError`` for a malformed reference,
``AdapterNotFoundError``) live in ``lorafleet.errors``; the ones below subclass them.
"""

from __future__ import annotations

from lorafleet.errors import AdapterError, ConfigError, FieldProblem, LorafleetError


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


__all__ = [
    "AdapterCapacityError",
    "AdapterIncompatibleError",
    "AdapterLoadError",
    "EngineClosedError",
    "EngineError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "PromptTooLongError",
    "QueueFullError",
    "RequestFailedError",
]
