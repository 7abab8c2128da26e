"""Field problems on the wire: ``google.rpc.BadRequest`` details of a gRPC status, both directions.

A server that refuses a spec lists every problem as a ``BadRequest.FieldViolation`` in the status
details (the ``grpc-status-details-bin`` trailer that ``grpcio-status`` reads and writes), so a client
shows each problem under its field without parsing the message text. The server side
(:func:`bad_request_status`) bounds what it sends, because echoed user values must never push the
trailers past gRPC's metadata limit (8 KiB by default) and turn a clear refusal into an opaque error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from lorafleet.errors import FieldProblem

MAX_MESSAGE_WIRE_CHARS = 4096
"""Characters of a status message on the wire: gRPC percent-encodes each byte outside printable
ASCII (and ``%``) as three characters, so a non-ASCII message gets fewer characters than this."""
MAX_DETAILS_BYTES = 2048
"""Serialized bytes of the BadRequest details (base64 on the wire: 4/3 of this)."""
_MAX_FIELD_CHARS = 200
_MAX_DESCRIPTION_CHARS = 400


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one field of a request, as a client reads it from the status details."""

    field: str
    """Dotted path of the field as the server names it, e.g. ``spec.lora.rank``."""
    description: str
    """The field, the value it got and what is wrong, readable on its own:
    ``spec.lora.rank=0: must be in [1, 1024]``."""


def _wire_chars(char: str) -> int:
    data = char.encode("utf-8")
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in data)


def truncate_message(text: str, limit: int = MAX_MESSAGE_WIRE_CHARS) -> str:
    """``text`` cut so that its percent-encoded form (gRPC's ``grpc-message``) has at most ``limit``
    characters, marked with ``...`` where it was cut."""
    total = 0
    for i, char in enumerate(text):
        total += _wire_chars(char)
        if total > limit - 3:
            rest = sum(_wire_chars(c) for c in text[i:])
            if total - _wire_chars(char) + rest <= limit:
                return text
            return text[:i] + "..."
    return text


def truncate_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (on a character boundary), marked with ``...``."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[: max(0, limit - 3)].decode("utf-8", errors="ignore") + "..."


def bad_request_status(code: grpc.StatusCode, message: str, problems: Iterable[FieldProblem]) -> grpc.Status:
    """A status with ``message`` and one ``BadRequest`` field violation per problem.

    Violations that would take the details past :data:`MAX_DETAILS_BYTES` are left out (the message
    says how many); each field and description is shortened first.
    """
    bad_request = error_details_pb2.BadRequest()
    problems = list(problems)
    for problem in problems:
        violation = bad_request.field_violations.add(
            field=truncate_utf8(problem.field, _MAX_FIELD_CHARS),
            description=truncate_utf8(str(problem), _MAX_DESCRIPTION_CHARS),
        )
        if bad_request.ByteSize() > MAX_DETAILS_BYTES:
            bad_request.field_violations.remove(violation)
            break
    left_out = len(problems) - len(bad_request.field_violations)
    if left_out:
        message = f"{message}\n({left_out} more problem(s) not listed in the details)"
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name),
        message=truncate_message(message),
        details=[detail],
    )
    return rpc_status.to_status(status)


def field_violations(err: grpc.RpcError) -> list[FieldViolation]:
    """The ``BadRequest`` field violations a failed call carries; empty when it carries none.

    Works on the error of a unary call and of a stream (both are ``grpc.Call`` objects).
    """
    if not isinstance(err, grpc.Call):
        return []
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # trailers that disagree with the call's own code or message
        return []
    if status is None:
        return []
    out: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            out += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    return out
