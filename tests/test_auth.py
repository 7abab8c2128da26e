"""Bearer-token auth: the token comes from a file or the environment, never a command line, and
``--auth-scope all`` guards reads too (health and reflection stay open for probes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet.errors import ConfigError
from lorafleet.v1 import inference_pb2, trainer_pb2
from lorafleet.v1 import trainer_pb2 as pb
from services.common.auth import guarded_methods, read_token
from services.trainer.client import TrainerClient
from tests.trainer_utils import TrainerProcess

ROOT = Path(__file__).resolve().parents[1]
TRAINER = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]
INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]


def test_token_file_wins_and_loses_its_newline(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    assert read_token("from-env", str(f), "auth_token_file") == "s3cret"
    assert read_token("from-env", "", "auth_token_file") == "from-env"
    assert read_token("", "", "auth_token_file") == ""


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "cannot read it"),
        (b"  \n", "the file is empty"),
        ("tøken".encode(), "ASCII"),
        (b"a b", "printable"),
    ],
)
def test_bad_token_files_name_the_field_not_the_content(
    tmp_path: Path, content: bytes | None, needle: str
) -> None:
    f = tmp_path / "token"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        read_token("", str(f), "auth_token_file")
    assert err.value.problems[0].field == "auth_token_file" and needle in err.value.reason
    assert "a b" not in err.value.reason and "tøken" not in err.value.reason


def test_scopes_guard_the_mutations_or_every_method() -> None:
    writes = guarded_methods(TRAINER, ["SubmitJob", "CancelJob"], "writes")
    assert writes == ["/lorafleet.v1.TrainerService/SubmitJob", "/lorafleet.v1.TrainerService/CancelJob"]
    everything = guarded_methods(INFERENCE, ["LoadAdapter"], "all")
    assert len(everything) == len(INFERENCE.methods) > 3
    assert "/lorafleet.v1.InferenceService/ListModels" in everything
    with pytest.raises(ConfigError) as err:
        guarded_methods(TRAINER, [], "reads")
    assert err.value.problems[0].field == "auth_scope"


@pytest.mark.parametrize(
    "argv",
    [
        ["trainer-server", "--auth-token", "s3cret"],
        ["inference-server", "--model", "x=y", "--auth-token", "s3cret"],
        ["jobs", "--token", "s3cret"],
        ["models", "--token", "s3cret"],
    ],
)
def test_a_token_on_the_command_line_is_refused_with_the_way_that_works(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2, done.stderr
    assert "process list" in done.stderr and "-file" in done.stderr, done.stderr


def test_inference_settings_read_the_token_file_and_check_the_scope(tmp_path: Path) -> None:
    from services.inference.settings import InferenceSettings, ModelSettings

    (tmp_path / "token").write_text("inf3rence\n")
    base = [ModelSettings(name="tiny", path=str(tmp_path))]
    settings = InferenceSettings(models=base, auth_token_file=str(tmp_path / "token"), auth_scope="all")
    assert settings.validate().auth_token == "inf3rence"
    with pytest.raises(ConfigError) as err:
        InferenceSettings(models=base, auth_token_file=str(tmp_path / "nope"), auth_scope="reads").validate()
    assert {p.field for p in err.value.problems} >= {"auth_token_file", "auth_scope"}


@pytest.mark.integration
def test_scope_all_guards_reads_and_keeps_health_open(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("r3ad-s3cret\n")
    server = TrainerProcess(
        tmp_path / "state",
        tmp_path / "adapters",
        ["--auth-token-file", str(token_file), "--auth-scope", "all", "--max-running", "0"],
    ).start()
    try:
        assert server.proc is not None
        cmdline = " ".join(psutil.Process(server.proc.pid).cmdline())
        assert "r3ad-s3cret" not in cmdline
        stub = server.stub
        for call in (
            lambda md: stub.ListJobs(pb.ListJobsRequest(), metadata=md),
            lambda md: stub.ListAdapters(pb.ListAdaptersRequest(), metadata=md),
            lambda md: next(iter(stub.WatchJob(pb.WatchJobRequest(job_id="j-none"), metadata=md))),
        ):
            for md in ([], [("authorization", "Bearer wrong")]):
                with pytest.raises(grpc.RpcError) as err:
                    call(md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(server.channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        client = TrainerClient(server.address, "r3ad-s3cret")
        try:
            assert client.list() == []
            with pytest.raises(grpc.RpcError) as err:
                client.get("j-none")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            client.close()
    finally:
        server.stop()


@pytest.mark.integration
def test_an_unreadable_token_file_stops_the_server_with_the_field(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "trainer-server",
            "--port",
            "0",
            "--state-dir",
            str(tmp_path / "s"),
            "--adapters-root",
            str(tmp_path / "a"),
            "--auth-token-file",
            str(tmp_path / "missing"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2 and "auth_token_file" in done.stderr and "cannot read it" in done.stderr
