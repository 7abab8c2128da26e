"""Bearer-token auth of both services: where the token comes from and which RPCs it guards.

The token never travels on a command line (``ps`` shows every process's arguments to every user):
a server reads it from a file (``--auth-token-file``; in Kubernetes the ``lorafleet-auth`` Secret
mounted as a volume) or from its environment, and clients do the same (``--token-file`` or
``LORAFLEET_<SERVICE>_TOKEN``).

Scopes:

=========  ===========================================================================================
``writes`` the mutating RPCs need the token (trainer: SubmitJob, CancelJob; inference: LoadAdapter,
           UnloadAdapter); every read and generation RPC is open.
``all``    every RPC of the service needs it; only grpc.health.v1 and server reflection stay open, so
           probes and ``grpcurl list`` keep working.
=========  ===========================================================================================
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from lorafleet.errors import ConfigError, FieldProblem

AUTH_SCOPES = ("writes", "all")
MAX_TOKEN_BYTES = 4096
"""Longest token accepted (it travels as gRPC metadata, whose whole budget is 8 KiB by default)."""


def read_token(token: str, token_file: str, field: str) -> str:
    """The token from ``token_file`` when one is named, else ``token`` (from the environment or YAML).

    Surrounding whitespace (the newline a ``kubectl create secret --from-file`` or an editor leaves)
    is dropped. Errors name the field and the path, never the content.

    Raises:
        ConfigError: the file is unreadable, empty or too long, or the token has characters that
            cannot travel in gRPC metadata.
    """
    if token_file:
        try:
            raw = Path(token_file).read_bytes()[: MAX_TOKEN_BYTES + 1]
        except OSError as e:
            raise ConfigError([FieldProblem(field, token_file, f"cannot read it ({e.strerror})")]) from None
        try:
            token = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ConfigError([FieldProblem(field, token_file, "the token must be ASCII")]) from None
        if not token:
            raise ConfigError([FieldProblem(field, token_file, "the file is empty")])
    token = token.strip()
    if len(token) > MAX_TOKEN_BYTES:
        raise ConfigError([FieldProblem(field, f"<{len(token)} characters>", f"at most {MAX_TOKEN_BYTES}")])
    if token and not all(33 <= ord(c) < 127 for c in token):
        raise ConfigError([FieldProblem(field, "<hidden>", "use printable ASCII without spaces")])
    return token


def guarded_methods(service: ServiceDescriptor, mutating: Iterable[str], scope: str) -> list[str]:
    """Full method names (``/pkg.Service/Method``) the token guards under ``scope``.

    Raises:
        ConfigError: an unknown scope.
    """
    if scope not in AUTH_SCOPES:
        raise ConfigError([FieldProblem("auth_scope", scope, f"use one of {', '.join(AUTH_SCOPES)}")])
    names = [m.name for m in service.methods] if scope == "all" else list(mutating)
    return [f"/{service.full_name}/{name}" for name in names]


class _RefuseSecretFlag(argparse.Action):
    """A flag that would put a secret into the process list: refused with the ways that don't."""

    def __init__(self, option_strings: Sequence[str], dest: str, hint: str = "", **kwargs: Any) -> None:
        self.hint = hint
        super().__init__(option_strings, dest, nargs=1, help=argparse.SUPPRESS, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None
    ) -> None:
        parser.error(f"{option} would show the token in the process list; {self.hint}")


def add_secret_refusal(ap: argparse.ArgumentParser, flag: str, hint: str) -> None:
    """Make ``flag VALUE`` fail with ``hint`` (e.g. "use --auth-token-file or the environment")."""
    ap.add_argument(flag, action=_RefuseSecretFlag, hint=hint, dest="_refused_" + flag.strip("-"))


class _Call(
    collections.namedtuple(
        "_Call", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class BearerTokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        return _Call(
            details.method,
            details.timeout,
            [*metadata, self._header],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


def with_token(channel: grpc.Channel, token: str) -> grpc.Channel:
    """``channel`` sending the bearer token on every call (unchanged when ``token`` is empty)."""
    return grpc.intercept_channel(channel, BearerTokenClientInterceptor(token)) if token else channel
