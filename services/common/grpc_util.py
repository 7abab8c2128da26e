"""What both gRPC services share besides error mapping (``services.common.interceptor``): bearer-token
auth, TLS, client channels, health and reflection."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import with_token


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` metadata on the listed methods (``services.common.auth``
    says which)."""

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
    address: str,
    tls_ca: str | None = None,
    options: list[tuple[str, Any]] | None = None,
    token: str = "",
) -> grpc.Channel:
    """A client channel: TLS when a CA file is given, plaintext otherwise.

    Args:
        options: gRPC channel arguments, e.g. ``[("grpc.max_reconnect_backoff_ms", 2000)]``.
        token: sent as ``authorization: Bearer <token>`` on every call (none when empty).
    """
    if tls_ca:
        creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
        return with_token(grpc.secure_channel(address, creds, options=options), token)
    return with_token(grpc.insecure_channel(address, options=options), token)


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
