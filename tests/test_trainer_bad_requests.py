"""Issue item 5: bad submissions and requests, each with its status code and a message naming the field
and the value; the service keeps serving afterwards. One real server process on a loopback port.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from trainer_utils import TrainerProcess, lora_spec

from lorafleet.v1 import trainer_pb2 as pb

pytestmark = pytest.mark.integration

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bad")
    # Paused (nothing starts), small queue, a remote-code allow-list that excludes the test model.
    t = TrainerProcess(
        root / "state", root / "adapters", ["--max-running", "0", "--allow-remote-code", "THUDM/"]
    ).start()
    yield t
    t.stop()


@pytest.fixture(scope="module")
def bad_rows_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rows") / "broken.jsonl"
    path.write_text('{"input": "q", "target": "a"}\n{not json\n{"input": "q2"}\n', encoding="utf-8")
    return path


def _set(path: str, value) -> Callable[[pb.JobSpec], None]:
    def apply(spec: pb.JobSpec) -> None:
        *parents, name = path.split(".")
        msg = spec
        for part in parents:
            msg = getattr(msg, part)
        field = msg.DESCRIPTOR.fields_by_name[name]
        if field.is_repeated:
            del getattr(msg, name)[:]
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)

    return apply


def _override(key: str, value: str) -> Callable[[pb.JobSpec], None]:
    return lambda spec: spec.overrides.__setitem__(key, value)


# (id, change to a valid spec, expected code, texts the message must contain)
CASES: list[tuple[str, Callable[[pb.JobSpec], None], grpc.StatusCode, list[str]]] = [
    ("empty model", _set("model.name_or_path", ""), INVALID, ["spec.model.name_or_path", "required"]),
    (
        "model dir outside the roots",
        _set("model.name_or_path", "/nonexistent/model"),
        INVALID,
        ["spec.model.name_or_path", "'/nonexistent/model'", "not under the server's allowed roots"],
    ),
    (
        "malformed hub id",
        _set("model.name_or_path", "bad id!!"),
        INVALID,
        ["spec.model.name_or_path", "'bad id!!'"],
    ),
    ("bad dtype", _set("model.dtype", "fp8"), INVALID, ["spec.model.dtype", "'fp8'"]),
    ("bad quantization", _set("model.quantization", "int3"), INVALID, ["spec.model.quantization", "'int3'"]),
    (
        "remote code not allowed",
        _set("model.trust_remote_code", True),
        INVALID,
        ["spec.model.trust_remote_code", "allow-list", "THUDM/"],
    ),
    ("empty train file", _set("dataset.train_file", ""), INVALID, ["spec.dataset.train_file", "required"]),
    (
        "train file outside the roots",
        _set("dataset.train_file", "/nope/train.jsonl"),
        INVALID,
        ["spec.dataset.train_file", "'/nope/train.jsonl'", "not under the server's allowed roots"],
    ),
    ("bad format", _set("dataset.format", "csv"), INVALID, ["spec.dataset.format", "'csv'"]),
    ("bad template", _set("dataset.template", "nope"), INVALID, ["spec.dataset.template", "'nope'"]),
    (
        "negative source length",
        _set("dataset.max_source_length", -5),
        INVALID,
        ["spec.dataset.max_source_length", "-5"],
    ),
    ("unknown method", _set("method", "dpo"), INVALID, ["spec.method", "'dpo'"]),
    ("lora rank 0", _set("lora.rank", 0), INVALID, ["spec.lora.rank=0", "[1, 1024]"]),
    (
        "target module not in the model",
        _set("lora.target_modules", ["nope_proj"]),
        INVALID,
        ["spec.lora.target_modules", "nope_proj", "q_proj"],
    ),
    ("lora dropout 1", _set("lora.dropout", 1.0), INVALID, ["spec.lora.dropout=1.0"]),
    (
        "negative learning rate",
        _set("hyperparameters.learning_rate", -1.0),
        INVALID,
        ["spec.hyperparameters.learning_rate=-1.0", "(0, 1)"],
    ),
    (
        "zero batch",
        _set("hyperparameters.per_device_batch_size", 0),
        INVALID,
        ["spec.hyperparameters.per_device_batch_size=0"],
    ),
    (
        "bad scheduler",
        _set("hyperparameters.lr_scheduler", "exp"),
        INVALID,
        ["spec.hyperparameters.lr_scheduler", "'exp'"],
    ),
    ("zero stage 5", _set("deepspeed.zero_stage", 5), INVALID, ["spec.deepspeed.zero_stage=5"]),
    ("bad launcher", _set("deepspeed.launcher", "mpirun"), INVALID, ["spec.deepspeed.launcher", "'mpirun'"]),
    (
        "traversal in adapter name",
        _set("adapter_name", "../evil"),
        INVALID,
        ["spec.adapter_name", "'../evil'"],
    ),
    ("slash in adapter name", _set("adapter_name", "a/b"), INVALID, ["spec.adapter_name", "'a/b'"]),
    ("adapter name too long", _set("adapter_name", "a" * 100), INVALID, ["spec.adapter_name", "1-64"]),
    ("too many nodes", _set("resources.nodes", 4), INVALID, ["spec.resources.nodes=4", "at most 1 node"]),
    (
        "too many processes",
        _set("resources.processes_per_node", 64),
        INVALID,
        ["spec.resources.processes_per_node=64", "at most"],
    ),
    (
        "GPUs on a CPU launcher",
        _set("resources.gpus_per_node", 1),
        INVALID,
        ["spec.resources.gpus_per_node=1"],
    ),
    (
        "server-owned override",
        _override("output.run_dir", "/etc"),
        INVALID,
        ["spec.overrides['output.run_dir']", "'/etc'", "set by the server"],
    ),
    (
        "unknown override",
        _override("train.nope", "1"),
        INVALID,
        ["spec.overrides['train.nope']", "unknown field"],
    ),
    ("attempts 0", _set("max_attempts", 0), INVALID, ["spec.max_attempts=0", "[1, 20]"]),
]


@pytest.mark.parametrize(("change", "code", "texts"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_submission(server: TrainerProcess, tiny_llama: Path, bundled_data, change, code, texts) -> None:
    spec = lora_spec(tiny_llama, bundled_data)
    change(spec)
    with pytest.raises(grpc.RpcError) as err:
        server.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    assert err.value.code() == code, err.value.details()
    for text in texts:
        assert text in err.value.details(), err.value.details()


def test_bad_rows_are_quoted(
    server: TrainerProcess, tiny_llama: Path, bundled_data, bad_rows_file: Path
) -> None:
    spec = lora_spec(tiny_llama, bundled_data)
    spec.dataset.train_file = str(bad_rows_file)
    with pytest.raises(grpc.RpcError) as err:
        server.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    details = err.value.details()
    assert err.value.code() == INVALID and "spec.dataset.train_file" in details
    assert "broken.jsonl:2" in details and "broken.jsonl:3" in details, details


def test_every_problem_listed_at_once(server: TrainerProcess, tiny_llama: Path, bundled_data) -> None:
    spec = lora_spec(tiny_llama, bundled_data)
    spec.lora.rank = 0
    spec.hyperparameters.learning_rate = 5.0
    spec.model.dtype = "fp8"
    with pytest.raises(grpc.RpcError) as err:
        server.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    details = err.value.details()
    assert "3 problem(s)" in details
    assert all(
        f in details for f in ("spec.lora.rank", "spec.hyperparameters.learning_rate", "spec.model.dtype")
    )


def test_idempotency_key_reused_with_another_spec(
    server: TrainerProcess, tiny_llama: Path, bundled_data
) -> None:
    first = server.stub.SubmitJob(
        pb.SubmitJobRequest(spec=lora_spec(tiny_llama, bundled_data), idempotency_key="k")
    )
    other = lora_spec(tiny_llama, bundled_data, learning_rate=1e-3)
    with pytest.raises(grpc.RpcError) as err:
        server.stub.SubmitJob(pb.SubmitJobRequest(spec=other, idempotency_key="k"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency_key='k'" in err.value.details() and first.id in err.value.details()


@pytest.mark.parametrize(
    ("call", "code", "text"),
    [
        (lambda s: s.GetJob(pb.GetJobRequest(job_id="nope")), grpc.StatusCode.NOT_FOUND, "job_id='nope'"),
        (lambda s: s.GetJob(pb.GetJobRequest(job_id="")), grpc.StatusCode.NOT_FOUND, "job_id=''"),
        (
            lambda s: s.CancelJob(pb.CancelJobRequest(job_id="nope")),
            grpc.StatusCode.NOT_FOUND,
            "job_id='nope'",
        ),
        (
            lambda s: list(s.WatchJob(pb.WatchJobRequest(job_id="nope"))),
            grpc.StatusCode.NOT_FOUND,
            "job_id='nope'",
        ),
        (lambda s: s.ListJobs(pb.ListJobsRequest(page_token="xyz")), INVALID, "page_token='xyz'"),
        (lambda s: s.ListJobs(pb.ListJobsRequest(page_size=-1)), INVALID, "page_size=-1"),
        (lambda s: s.GetAdapter(pb.GetAdapterRequest(ref="../x")), INVALID, "'../x'"),
        (lambda s: s.GetAdapter(pb.GetAdapterRequest(ref="a@zero")), INVALID, "'zero'"),
        (lambda s: s.GetAdapter(pb.GetAdapterRequest(ref="absent")), grpc.StatusCode.NOT_FOUND, "absent"),
        (lambda s: s.ListAdapters(pb.ListAdaptersRequest(name="a/b")), INVALID, "'a/b'"),
    ],
    ids=[
        "get unknown",
        "get empty",
        "cancel unknown",
        "watch unknown",
        "bad page token",
        "negative page size",
        "traversal ref",
        "bad version",
        "unknown adapter",
        "bad adapter filter",
    ],
)
def test_bad_requests(server: TrainerProcess, call, code, text) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call(server.stub)
    assert err.value.code() == code and text in err.value.details(), err.value.details()


def test_still_serving_after_bad_input(server: TrainerProcess, tiny_llama: Path, bundled_data) -> None:
    """Runs last in this module: the same server process accepts a good job after all of the above."""
    assert server.proc is not None and server.proc.poll() is None
    job = server.stub.SubmitJob(pb.SubmitJobRequest(spec=lora_spec(tiny_llama, bundled_data), dry_run=True))
    assert job.state == pb.JOB_STATE_QUEUED and job.memory_estimate.summary
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    assert "Traceback" not in server.server_log()
