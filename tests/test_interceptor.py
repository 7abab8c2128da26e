"""ErrorInterceptor on a real loopback gRPC server: status mapping, BadRequest field violations,
bounded messages, INTERNAL for the unexpected, and one final code per RPC, whichever way it ends."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from lorafleet.errors import ConfigError, FieldProblem, LorafleetError
from services.common.field_errors import MAX_DETAILS_BYTES, FieldViolation, field_violations
from services.common.grpc_util import BearerTokenInterceptor
from services.common.interceptor import INTERNAL_MESSAGE, ErrorInterceptor

SERVICE = "lorafleet.test.Probe"


class NotThereError(LorafleetError):
    pass


class GoneForGoodError(NotThereError):
    """More specific than NotThereError: its own entry must win."""


class BusyError(Exception):
    """Not a LorafleetError: the table may still name it."""


TABLE = {
    NotThereError: grpc.StatusCode.NOT_FOUND,
    GoneForGoodError: grpc.StatusCode.FAILED_PRECONDITION,
    BusyError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
}

# What each probe method does with its request (bytes): the request names the behaviour.
Behaviour = Callable[[grpc.ServicerContext], Any]
UNARY: dict[bytes, Behaviour] = {}


def _raise(exc: BaseException) -> Behaviour:
    def run(context: grpc.ServicerContext) -> Any:
        raise exc

    return run


def _abort(context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")


def _set_code(context: grpc.ServicerContext) -> Any:
    context.set_code(grpc.StatusCode.ABORTED)
    context.set_details("try again")
    return b""


UNARY.update(
    {
        b"ok": lambda context: b"fine",
        b"not-there": _raise(NotThereError("job_id='x': no such job")),
        b"gone": _raise(GoneForGoodError("job_id='x' has ended")),
        b"busy": _raise(BusyError("queue is full")),
        b"bug": _raise(KeyError("/secret/path/in/traceback")),
        b"bad-spec": _raise(
            ConfigError(
                [
                    FieldProblem("spec.lora.rank", 0, "must be in [1, 1024]"),
                    FieldProblem("spec.model.dtype", "fp8", "one of fp32, bf16, fp16"),
                ],
                context="invalid job spec",
            )
        ),
        b"huge-spec": _raise(
            ConfigError([FieldProblem(f"spec.overrides['k{i}']", "é" * 5000, "é" * 500) for i in range(400)])
        ),
        b"huge-reason": _raise(NotThereError("é" * 50_000)),
        b"abort": _abort,
        b"set-code": _set_code,
    }
)


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return UNARY[request](context)


def _stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    if request == b"slow":
        for i in range(600):
            yield str(i).encode()
            time.sleep(0.05)
        return
    yield b"first"
    yield UNARY[request](context) or b""


class Probe:
    """A loopback server with the interceptor (first) and a bearer-token interceptor on one method."""

    def __init__(self) -> None:
        self.codes: list[tuple[str, str]] = []
        self.seen = threading.Condition()

        def on_code(method: str, code: str) -> None:
            with self.seen:
                self.codes.append((method, code))
                self.seen.notify_all()

        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream),
            "Guarded": grpc.unary_unary_rpc_method_handler(_unary),
        }
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            interceptors=[
                ErrorInterceptor(TABLE, on_code),
                BearerTokenInterceptor("t0k", [f"/{SERVICE}/Guarded"]),
            ],
        )
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.unary = self.channel.unary_unary(f"/{SERVICE}/Unary")
        self.stream = self.channel.unary_stream(f"/{SERVICE}/Stream")
        self.guarded = self.channel.unary_unary(f"/{SERVICE}/Guarded")

    def wait_codes(self, n: int, timeout: float = 10.0) -> list[tuple[str, str]]:
        with self.seen:
            self.seen.wait_for(lambda: len(self.codes) >= n, timeout)
            return list(self.codes)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)


@pytest.fixture
def probe() -> Iterator[Probe]:
    p = Probe()
    yield p
    p.close()


def _fails(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


@pytest.mark.parametrize(
    ("request_name", "code", "message"),
    [
        (b"not-there", grpc.StatusCode.NOT_FOUND, "job_id='x': no such job"),
        (b"gone", grpc.StatusCode.FAILED_PRECONDITION, "job_id='x' has ended"),
        (b"busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full"),
        (b"abort", grpc.StatusCode.PERMISSION_DENIED, "not yours"),
    ],
)
def test_table_maps_by_most_specific_class(probe: Probe, request_name: bytes, code, message: str) -> None:
    err = _fails(lambda: probe.unary(request_name))
    assert (err.code(), err.details()) == (code, message)
    assert field_violations(err) == []
    assert probe.wait_codes(1) == [("Unary", code.name)]


def test_config_error_carries_field_violations_unary_and_stream(probe: Probe) -> None:
    expected = [
        FieldViolation("spec.lora.rank", "spec.lora.rank=0: must be in [1, 1024]"),
        FieldViolation("spec.model.dtype", "spec.model.dtype='fp8': one of fp32, bf16, fp16"),
    ]
    err = _fails(lambda: probe.unary(b"bad-spec"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 problem(s)" in err.details() and "spec.lora.rank=0" in err.details()
    assert field_violations(err) == expected

    received: list[bytes] = []
    err = _fails(lambda: received.extend(probe.stream(b"bad-spec")))
    assert received == [b"first"] and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err) == expected
    assert probe.wait_codes(2) == [("Unary", "INVALID_ARGUMENT"), ("Stream", "INVALID_ARGUMENT")]


def test_unexpected_error_is_internal_with_a_generic_message(
    probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="lorafleet.grpc"):
        err = _fails(lambda: probe.unary(b"bug"))
        stream_err = _fails(lambda: list(probe.stream(b"bug")))
    for e in (err, stream_err):
        assert (e.code(), e.details()) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert "/secret/path" not in err.details()
    logged = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert len(logged) == 2 and "/secret/path/in/traceback" in str(logged[0])
    assert probe.wait_codes(2) == [("Unary", "INTERNAL"), ("Stream", "INTERNAL")]


def test_echoed_values_never_exceed_the_metadata_limit(probe: Probe) -> None:
    """Non-ASCII values triple on the wire; without bounds these calls end in an opaque error."""
    err = _fails(lambda: probe.unary(b"huge-reason"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and err.details().startswith("é" * 100)
    assert err.details().endswith("...")

    err = _fails(lambda: probe.unary(b"huge-spec"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err)
    assert 0 < len(violations) < 400 and violations[0].field == "spec.overrides['k0']"
    assert sum(len(v.description.encode()) for v in violations) <= MAX_DETAILS_BYTES
    assert probe.wait_codes(2) == [("Unary", "NOT_FOUND"), ("Unary", "INVALID_ARGUMENT")]


def test_every_final_code_is_counted_once(probe: Probe) -> None:
    assert probe.unary(b"ok") == b"fine"
    assert list(probe.stream(b"ok")) == [b"first", b"fine"]
    err = _fails(lambda: probe.unary(b"set-code"))
    assert (err.code(), err.details()) == (grpc.StatusCode.ABORTED, "try again")
    # Refused by the interceptor after this one: the handler never runs.
    err = _fails(lambda: probe.guarded(b"ok"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert probe.guarded(b"ok", metadata=[("authorization", "Bearer t0k")]) == b"fine"
    assert probe.wait_codes(5) == [
        ("Unary", "OK"),
        ("Stream", "OK"),
        ("Unary", "ABORTED"),
        ("Guarded", "UNAUTHENTICATED"),
        ("Guarded", "OK"),
    ]
    time.sleep(0.5)  # nothing is counted twice (e.g. again when the RPC's termination callback runs)
    assert len(probe.codes) == 5


def test_streams_the_client_leaves_are_counted(probe: Probe) -> None:
    call = probe.stream(b"slow")
    assert next(call) == b"0"
    call.cancel()
    assert probe.wait_codes(1) == [("Stream", "CANCELLED")]

    err = _fails(lambda: list(probe.stream(b"slow", timeout=0.5)))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert probe.wait_codes(2) == [("Stream", "CANCELLED"), ("Stream", "DEADLINE_EXCEEDED")]
    time.sleep(0.5)
    assert len(probe.codes) == 2
