"""The one place where a service's domain errors become gRPC statuses, and where every RPC is counted.

Each server builds one :class:`ErrorInterceptor` from its errors module's explicit table and puts it
first in its interceptor list, so it also sees what later interceptors answer (an auth refusal)::

    server = grpc.server(pool, interceptors=[ErrorInterceptor(STATUS_FOR, metrics.rpc), auth])

A servicer method then only raises: the interceptor maps the exception by its class hierarchy (the
most specific class in the table wins), sends the error's ``reason`` as the message (bounded in size,
since it echoes client values), and for a ``ConfigError`` attaches every problem as a
``google.rpc.BadRequest`` field violation. Anything not in the table becomes INTERNAL with a generic
message; the traceback goes to the server's log, never to the client.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc

from lorafleet.errors import (
    AdapterError,
    AdapterNotFoundError,
    ConfigError,
    DatasetError,
    LorafleetError,
    ModelLoadError,
)
from services.common.field_errors import bad_request_status, truncate_message

log = logging.getLogger("lorafleet.grpc")

INTERNAL_MESSAGE = "internal error; the server logged the details"

GRPC_STATUS_CODES = frozenset(code.name for code in grpc.StatusCode)
"""Every status code name (``OK``, ``NOT_FOUND``, ...): the closed set a metrics ``code`` label takes."""

CORE_STATUS: Mapping[type[BaseException], grpc.StatusCode] = {
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    DatasetError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelLoadError: grpc.StatusCode.INVALID_ARGUMENT,
    AdapterNotFoundError: grpc.StatusCode.NOT_FOUND,
    AdapterError: grpc.StatusCode.INVALID_ARGUMENT,
}
"""Statuses of the core's errors (``lorafleet.errors``); each service's table starts from these."""


class _Outcome:
    """Reports the final code of one RPC exactly once, whichever way the RPC ends."""

    def __init__(self, method: str, on_code: Callable[[str, str], None] | None) -> None:
        self._method = method
        self._on_code = on_code
        self._lock = threading.Lock()
        self._reported = False

    def report(self, code: grpc.StatusCode) -> None:
        with self._lock:
            if self._reported:
                return
            self._reported = True
        if self._on_code is not None:
            try:
                self._on_code(self._method, code.name)
            except Exception:  # a metrics bug must not change the answer
                log.exception("on_code failed for %s %s", self._method, code.name)

    def report_ended(self, context: grpc.ServicerContext) -> None:
        """The RPC ended before its handler did: the client cancelled or its deadline passed."""
        remaining = context.time_remaining()
        ended = remaining is not None and remaining <= 0
        self.report(grpc.StatusCode.DEADLINE_EXCEEDED if ended else grpc.StatusCode.CANCELLED)


def _set_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The code the handler already set (``context.abort``/``set_code``), or None."""
    code = getattr(context, "code", None)
    return code() if callable(code) else None


class ErrorInterceptor(grpc.ServerInterceptor):
    """Map raised errors to statuses through an explicit table and report every RPC's final code.

    Args:
        status_table: error class -> status code; a raised error takes the code of the first class of
            its MRO found here. Classes not covered become INTERNAL.
        on_code: called once per RPC with (method name such as ``SubmitJob``, code name such as
            ``OK`` or ``INVALID_ARGUMENT``), including codes set by ``context.abort`` in a handler or
            by an interceptor after this one, and CANCELLED / DEADLINE_EXCEEDED for streams the
            client left.
    """

    def __init__(
        self,
        status_table: Mapping[type[BaseException], grpc.StatusCode],
        on_code: Callable[[str, str], None] | None = None,
    ) -> None:
        self._table = dict(status_table)
        self._on_code = on_code

    def status_for(self, exc: BaseException) -> grpc.StatusCode | None:
        """The status code of ``exc`` by the table, or None when no class of its MRO is there."""
        for cls in type(exc).__mro__:
            if cls in self._table:
                return self._table[cls]
        return None

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = str(details.method).rsplit("/", 1)[-1]
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, handler.stream_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._stream(method, handler.stream_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def _start(self, method: str, context: grpc.ServicerContext) -> _Outcome:
        outcome = _Outcome(method, self._on_code)
        if not context.add_callback(lambda: outcome.report_ended(context)):
            outcome.report_ended(context)  # already over
        return outcome

    def _unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            outcome = self._start(method, context)
            try:
                response = behavior(request, context)
            except Exception as exc:
                self._fail(method, exc, context, outcome)
                raise
            outcome.report(_set_code(context) or grpc.StatusCode.OK)
            return response

        return handle

    def _stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            outcome = self._start(method, context)
            try:
                yield from behavior(request, context)
            except Exception as exc:
                self._fail(method, exc, context, outcome)
                raise
            outcome.report(_set_code(context) or grpc.StatusCode.OK)

        return handle

    def _fail(self, method: str, exc: Exception, context: grpc.ServicerContext, outcome: _Outcome) -> None:
        """End the call with ``exc``'s status (raises), or report the code the handler already set."""
        already = _set_code(context)
        if already is not None and already != grpc.StatusCode.OK:
            outcome.report(already)  # ``context.abort`` raised: the status is set
            return
        code = self.status_for(exc)
        if code is None:
            log.exception("%s failed", method)
            outcome.report(grpc.StatusCode.INTERNAL)
            context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
            return
        outcome.report(code)
        message = exc.reason if isinstance(exc, LorafleetError) else str(exc)
        if isinstance(exc, ConfigError) and exc.problems:
            context.abort_with_status(bad_request_status(code, message, exc.problems))
        context.abort(code, truncate_message(message))
