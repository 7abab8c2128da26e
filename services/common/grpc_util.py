"""What both gRPC services share: the one map from domain errors to status codes, bearer-token auth,
TLS, health and reflection.

Servicer methods raise domain errors (``lorafleet.errors`` and each service's own); ``handle_errors``
turns them into a status with the error's own message (which names the field and the value). Anything
unexpected becomes INTERNAL with a generic message and a logged traceback: no stack traces or paths
leak to clients, and the server keeps serving.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lorafleet.errors import (
    AdapterError,
    AdapterNotFoundError,
    ConfigError,
    DatasetError,
    LorafleetError,
    ModelLoadError,
)

log = logging.getLogger("lorafleet.grpc")

_STATUS_FOR: dict[type[BaseException], grpc.StatusCode] = {
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    DatasetError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelLoadError: grpc.StatusCode.INVALID_ARGUMENT,
    AdapterNotFoundError: grpc.StatusCode.NOT_FOUND,
    AdapterError: grpc.StatusCode.INVALID_ARGUMENT,
}


def register_error(cls: type[BaseException], code: grpc.StatusCode) -> None:
    """Map a service's own error class to a status code (most specific class wins)."""
    _STATUS_FOR[cls] = code


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for ``exc``."""
    for cls in type(exc).__mro__:
        if cls in _STATUS_FOR:
            message = exc.reason if isinstance(exc, LorafleetError) else str(exc)
            return _STATUS_FOR[cls], message
    return grpc.StatusCode.INTERNAL, "internal error; the server logged the details"


F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(on_error: Callable[[str, grpc.StatusCode], None] | None = None) -> Callable[[F], F]:
    """Decorate a servicer method (unary or server-streaming) to map raised errors to statuses.

    Args:
        on_error: called with (method name, code) for every error, e.g. to count rejections.
    """

    def decorate(method: F) -> F:
        def fail(exc: BaseException, context: grpc.ServicerContext) -> None:
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method.__name__)
            if on_error:
                on_error(method.__name__, code)
            context.abort(code, message)

        if inspect.isgeneratorfunction(method):

            @functools.wraps(method)
            def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    yield from method(self, request, context)
                except Exception as exc:
                    if _aborted(context):
                        raise
                    fail(exc, context)

            return stream  # type: ignore[return-value]

        @functools.wraps(method)
        def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return method(self, request, context)
            except Exception as exc:
                if _aborted(context):
                    raise
                fail(exc, context)

        return unary  # type: ignore[return-value]

    return decorate


def _aborted(context: grpc.ServicerContext) -> bool:
    """Whether the method already ended the call with ``context.abort`` (which raises a bare Exception)."""
    code = getattr(context, "code", None)
    return callable(code) and code() is not None


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` metadata on the listed (mutating) methods."""

    def __init__(self, token: str, protected: Iterable[str]) -> None:
        self._token = token.encode()
        self._protected = set(protected)

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        if details.method not in self._protected:
            return continuation(details)
        metadata = dict(details.invocation_metadata or ())
        given = str(metadata.get("authorization", ""))
        if given.startswith("Bearer ") and hmac.compare_digest(given[len("Bearer ") :].encode(), self._token):
            return continuation(details)
        method = details.method

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs 'authorization: Bearer <token>' metadata with the server's token",
            )

        handler = continuation(details)
        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())])


def channel(
    address: str, tls_ca: str | None = None, options: list[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """A client channel: TLS when a CA file is given, plaintext otherwise.

    Args:
        options: gRPC channel arguments, e.g. ``[("grpc.max_reconnect_backoff_ms", 2000)]``.
    """
    if tls_ca:
        creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
        return grpc.secure_channel(address, creds, options=options)
    return grpc.insecure_channel(address, options=options)


def add_health_and_reflection(server: grpc.Server, service_names: list[str]) -> health.HealthServicer:
    """Register grpc.health.v1 (every service starts NOT_SERVING) and server reflection."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *service_names]:
        servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return servicer


def set_serving(servicer: health.HealthServicer, service_names: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        servicer.set(name, status)
