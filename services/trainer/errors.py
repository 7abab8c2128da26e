"""Every error the trainer service raises on purpose, and the status code each one becomes.

``STATUS_FOR`` is the explicit table the server gives its ``ErrorInterceptor``: a new error class
goes here, with its code, and nowhere else. Bad specs raise the core's ``ConfigError`` (its problems
reach the client as ``google.rpc.BadRequest`` field violations).
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from lorafleet.errors import AdapterImportError, LorafleetError
from services.common.interceptor import CORE_STATUS


class JobNotFoundError(LorafleetError):
    """No job with that id."""


class JobStateError(LorafleetError):
    """The job is not in a state that allows the request (cancel of a finished job)."""


class QueueFullError(LorafleetError):
    """The queue holds ``max_queued`` jobs already; retry later."""


class IdempotencyConflictError(LorafleetError):
    """The idempotency key was already used for a different spec."""


STATUS_FOR: Mapping[type[BaseException], grpc.StatusCode] = {
    **CORE_STATUS,
    JobNotFoundError: grpc.StatusCode.NOT_FOUND,
    JobStateError: grpc.StatusCode.FAILED_PRECONDITION,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    IdempotencyConflictError: grpc.StatusCode.ALREADY_EXISTS,
    # An imported or exported adapter that does not fit its base (a ConfigError: field violations).
    AdapterImportError: grpc.StatusCode.FAILED_PRECONDITION,
}
