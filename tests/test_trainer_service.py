"""The trainer gRPC service, end to end: real server processes on loopback ports, the local launcher,
real training subprocesses, SQLite state. Issue items 1-5.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from trainer_utils import (
    TrainerProcess,
    lora_spec,
    processes_with_env,
    watch_all,
)

from lorafleet.v1 import trainer_pb2 as pb

pytestmark = pytest.mark.integration


@pytest.fixture
def trainer(tmp_path: Path):
    procs: list[TrainerProcess] = []

    def make(*extra: str) -> TrainerProcess:
        t = TrainerProcess(tmp_path / "state", tmp_path / "adapters", list(extra)).start()
        procs.append(t)
        return t

    yield make
    for t in procs:
        t.stop()
    # Nothing a test started may outlive it.
    for p in processes_with_env("LORAFLEET_TEST_MARK", str(tmp_path)):
        p.kill()


def _versions(adapters_root: Path, name: str) -> list[str]:
    d = adapters_root / name
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


def _wait_metric_step(stub, job_id: str, min_step: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id))
        if job.progress.step >= min_step:
            return job.progress.step
        assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING), job.reason + job.log_tail
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} never reached step {min_step}")


def _recipe_processes(job_id: str):
    """The training process(es) of a job: not the supervisor, not torchrun."""
    found = []
    for p in processes_with_env("LORAFLEET_JOB_ID", job_id):
        cmd = " ".join(p.cmdline())
        if "services.trainer.recipe" in cmd and "supervise" not in cmd and "lorafleet.torchrun" not in cmd:
            found.append(p)
    return found


# -- 1. submit, watch, publish ---------------------------------------------------------------------------


def test_submit_watch_publish(trainer, tiny_llama, bundled_data, tmp_path: Path) -> None:
    t = trainer("--metrics-port", "0")
    health = health_pb2_grpc.HealthStub(t.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="lorafleet.v1.TrainerService")).status == 1

    job = t.stub.SubmitJob(
        pb.SubmitJobRequest(spec=lora_spec(tiny_llama, bundled_data), idempotency_key="one")
    )
    assert job.state == pb.JOB_STATE_QUEUED and job.memory_estimate.device_bytes_per_process > 0
    # A retried submit with the same key returns the same job and launches nothing more.
    again = t.stub.SubmitJob(
        pb.SubmitJobRequest(spec=lora_spec(tiny_llama, bundled_data), idempotency_key="one")
    )
    assert again.id == job.id

    states, losses, logs = [], [], []
    for ev in watch_all(t.stub, job.id):
        kind = ev.WhichOneof("event")
        if kind == "state":
            states.append(ev.state.state)
        elif kind == "metrics":
            losses.append(ev.metrics.loss)
        else:
            logs.append(ev.log.text)
    assert states[0] == pb.JOB_STATE_QUEUED and pb.JOB_STATE_RUNNING in states
    assert states[-1] == pb.JOB_STATE_SUCCEEDED
    assert len(losses) >= 4 and losses[-1] < losses[0], losses
    assert any('"published"' in line for line in logs)

    final = t.stub.GetJob(pb.GetJobRequest(job_id=job.id))
    assert final.adapter.ref == "svc-lora@1" and final.final_metrics["train_steps"] == 12
    assert [a.state for a in final.attempts] == ["succeeded"]
    manifest = json.loads((tmp_path / "adapters" / "svc-lora" / "1" / "lorafleet_manifest.json").read_text())
    assert manifest["method"] == "lora" and manifest["template"]
    listed = t.stub.ListAdapters(pb.ListAdaptersRequest())
    assert [a.ref for a in listed.adapters] == ["svc-lora@1"]
    assert json.loads(listed.adapters[0].manifest_json)["run_id"] == manifest["run_id"]
    assert t.stub.GetAdapter(pb.GetAdapterRequest(ref="svc-lora")).version == 1

    # A watcher that joins late gets the whole history, then the stream ends.
    replay = [ev.WhichOneof("event") for ev in watch_all(t.stub, job.id)]
    assert replay.count("metrics") == len(losses) and replay[-1] == "state"
    listed_jobs = t.stub.ListJobs(pb.ListJobsRequest(states=[pb.JOB_STATE_SUCCEEDED]))
    assert [j.id for j in listed_jobs.jobs] == [job.id]


# -- 2. the service is SIGKILLed mid-job --------------------------------------------------------------------


def test_service_sigkill_mid_job_adopts_and_publishes_once(
    trainer, tiny_llama, bundled_data, tmp_path: Path
) -> None:
    t = trainer()
    spec = lora_spec(tiny_llama, bundled_data, max_steps=300, save_steps=50)
    job = t.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    _wait_metric_step(t.stub, job.id, 10)
    t.kill()
    assert _recipe_processes(job.id), "training should outlive the killed service"
    time.sleep(1.0)

    t2 = trainer()
    known = t2.stub.GetJob(pb.GetJobRequest(job_id=job.id))
    assert known.state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED)
    final = t2.wait_for(job.id)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.reason
    assert len(final.attempts) == 1, "the running attempt was adopted, not restarted"
    assert _versions(tmp_path / "adapters", "svc-lora") == ["1"], "published exactly once"
    # The metric stream has no duplicates across the restart.
    steps = [ev.metrics.step for ev in watch_all(t2.stub, job.id) if ev.WhichOneof("event") == "metrics"]
    assert steps == sorted(set(steps)) and steps[-1] == 300


# -- 3. the training process is SIGKILLed ---------------------------------------------------------------------


def test_killed_attempt_resumes_from_checkpoint(trainer, tiny_llama, bundled_data) -> None:
    t = trainer()
    spec = lora_spec(tiny_llama, bundled_data, max_steps=200, save_steps=20)
    spec.max_attempts = 3
    job = t.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    _wait_metric_step(t.stub, job.id, 45)
    for p in _recipe_processes(job.id):
        p.send_signal(signal.SIGKILL)
    final = t.wait_for(job.id)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.reason + final.log_tail
    assert [a.state for a in final.attempts] == ["failed", "succeeded"]
    assert "SIGKILL" in final.attempts[0].reason
    resumed = final.attempts[1].resumed_from_step
    assert resumed >= 40, "the second attempt resumes from the last checkpoint"
    second = [
        ev.metrics.step
        for ev in watch_all(t.stub, job.id)
        if ev.WhichOneof("event") == "metrics" and ev.metrics.attempt == 2
    ]
    assert second and second[0] > resumed and second[-1] == 200


def test_attempt_limit_fails_with_reason(trainer, tiny_llama, bundled_data) -> None:
    t = trainer()
    spec = lora_spec(tiny_llama, bundled_data, max_steps=400, save_steps=20)
    spec.max_attempts = 2
    job = t.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    for attempt in (1, 2):
        deadline = time.time() + 120
        while time.time() < deadline:
            current = t.stub.GetJob(pb.GetJobRequest(job_id=job.id))
            if (
                len(current.attempts) == attempt
                and current.attempts[-1].state == "running"
                and _recipe_processes(job.id)
            ):
                break
            time.sleep(0.1)
        time.sleep(1.0)
        for p in _recipe_processes(job.id):
            p.send_signal(signal.SIGKILL)
    final = t.wait_for(job.id)
    assert final.state == pb.JOB_STATE_FAILED
    assert "attempt 2 of 2 failed" in final.reason and "SIGKILL" in final.reason
    assert [a.state for a in final.attempts] == ["failed", "failed"]


# -- 4. cancel -----------------------------------------------------------------------------------------------


def test_cancel_stops_every_process_and_publishes_nothing(
    trainer, tiny_llama, bundled_data, tmp_path: Path
) -> None:
    t = trainer()
    spec = lora_spec(tiny_llama, bundled_data, max_steps=5000)
    spec.resources.processes_per_node = 2  # torchrun + 2 ranks, in sessions of their own
    job = t.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    _wait_metric_step(t.stub, job.id, 2, timeout=180)
    before = processes_with_env("LORAFLEET_JOB_ID", job.id)
    assert len(before) >= 4, [p.cmdline() for p in before]  # supervisor, torchrun, 2 ranks
    cancelled = t.stub.CancelJob(pb.CancelJobRequest(job_id=job.id, reason="test"))
    assert cancelled.state == pb.JOB_STATE_CANCELLED and cancelled.reason == "test"
    assert processes_with_env("LORAFLEET_JOB_ID", job.id) == []
    assert _versions(tmp_path / "adapters", "svc-lora") == []
    with pytest.raises(grpc.RpcError) as err:
        t.stub.CancelJob(pb.CancelJobRequest(job_id=job.id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and job.id in err.value.details()
    # The watch stream ends on the cancel.
    assert [ev for ev in watch_all(t.stub, job.id, timeout=30)][-1].state.state == pb.JOB_STATE_CANCELLED


def test_queue_limit_and_queued_cancel(trainer, tiny_llama, bundled_data) -> None:
    t = trainer("--max-running", "0", "--max-queued", "2")  # paused: nothing starts
    ids = [
        t.stub.SubmitJob(pb.SubmitJobRequest(spec=lora_spec(tiny_llama, bundled_data))).id for _ in range(2)
    ]
    assert t.stub.GetJob(pb.GetJobRequest(job_id=ids[1])).queue_position == 2
    with pytest.raises(grpc.RpcError) as err:
        t.stub.SubmitJob(pb.SubmitJobRequest(spec=lora_spec(tiny_llama, bundled_data)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.value.details()
    assert t.stub.CancelJob(pb.CancelJobRequest(job_id=ids[0])).state == pb.JOB_STATE_CANCELLED
    assert t.stub.GetJob(pb.GetJobRequest(job_id=ids[1])).queue_position == 1
    page = t.stub.ListJobs(pb.ListJobsRequest(page_size=1))
    assert len(page.jobs) == 1 and page.next_page_token
    rest = t.stub.ListJobs(pb.ListJobsRequest(page_size=1, page_token=page.next_page_token))
    assert [j.id for j in rest.jobs] == [ids[1]] and not rest.next_page_token


def test_bearer_token_guards_mutations(trainer, tiny_llama, bundled_data, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    t = trainer("--auth-token-file", str(tmp_path / "token"), "--max-running", "0")
    spec = lora_spec(tiny_llama, bundled_data)
    with pytest.raises(grpc.RpcError) as err:
        t.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        t.stub.SubmitJob(pb.SubmitJobRequest(spec=spec), metadata=[("authorization", "Bearer wrong")])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    job = t.stub.SubmitJob(pb.SubmitJobRequest(spec=spec), metadata=[("authorization", "Bearer s3cret")])
    assert t.stub.GetJob(pb.GetJobRequest(job_id=job.id)).id == job.id  # reads need no token


# -- the command line ------------------------------------------------------------------------------------------


def test_cli_submit_jobs_cancel(trainer, tiny_llama, bundled_data, tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    t = trainer()
    config = {
        "model": {"name_or_path": str(tiny_llama)},
        "data": {
            "train_file": str(bundled_data["cblue_train"]),
            "format": "columns",
            "max_source_length": 96,
            "max_target_length": 8,
            "max_samples": 80,
        },
        "lora": {"rank": 4},
        "train": {
            "max_steps": 6,
            "per_device_batch_size": 8,
            "logging_steps": 2,
            "predict_with_generate": False,
        },
        "output": {"adapter_name": "cli-lora", "run_dir": "ignored-by-the-server"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args, "--addr", t.address],
            capture_output=True,
            text=True,
            timeout=300,
        )

    submitted = cli("submit", str(path), "train.learning_rate=0.01")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "submitted job" in submitted.stdout and "succeeded" in submitted.stdout
    assert "loss" in submitted.stderr  # the progress bar
    job_id = submitted.stdout.split("submitted job ")[1].split()[0]
    listed = cli("jobs", "--state", "succeeded")
    assert job_id in listed.stdout and "cli-lora@1" in listed.stdout
    again = cli("cancel", job_id)
    assert again.returncode == 2 and "FAILED_PRECONDITION" in again.stderr and job_id in again.stderr
    bad = cli("submit", str(path), "lora.rank=0")  # caught locally, before any RPC
    assert bad.returncode == 2 and "lora.rank=0" in bad.stderr and "Traceback" not in bad.stderr
    remote = cli("submit", str(path), "data.train_file=/not/on/the/server.jsonl")  # only the server can tell
    assert remote.returncode == 2 and "INVALID_ARGUMENT" in remote.stderr
    assert "spec.dataset.train_file='/not/on/the/server.jsonl'" in remote.stderr
    # --gpus-per-node reaches the spec: this CPU-only local launcher has no GPU to give.
    gpus = cli("submit", str(path), "--gpus-per-node", "2")
    assert gpus.returncode == 2 and "INVALID_ARGUMENT" in gpus.stderr
    assert "spec.resources.gpus_per_node=2" in gpus.stderr, gpus.stderr


# -- 7. a real Prometheus scrapes the service ----------------------------------------------------------------


def test_prometheus_scrapes_job_counters(trainer, tiny_llama, bundled_data, tmp_path: Path) -> None:
    import urllib.request

    from prom_utils import promtool_check_metrics, running_prometheus

    t = trainer("--metrics-port", "0", "--max-running", "0")
    assert t.metrics_url
    target = t.metrics_url.removeprefix("http://").removesuffix("/metrics")

    def value(result) -> float:
        return float(result[0]["value"][1]) if result else -1.0

    with running_prometheus([target], tmp_path / "prom") as prom:
        prom.wait_for("lorafleet_trainer_jobs_submitted_total", lambda r: value(r) == 0.0)
        ids = [
            t.stub.SubmitJob(pb.SubmitJobRequest(spec=lora_spec(tiny_llama, bundled_data))).id
            for _ in range(2)
        ]
        with pytest.raises(grpc.RpcError):
            t.stub.SubmitJob(pb.SubmitJobRequest(spec=pb.JobSpec()))
        t.stub.CancelJob(pb.CancelJobRequest(job_id=ids[0]))
        prom.wait_for("lorafleet_trainer_jobs_submitted_total", lambda r: value(r) == 2.0)
        prom.wait_for('lorafleet_trainer_jobs_finished_total{state="cancelled"}', lambda r: value(r) == 1.0)
        prom.wait_for("lorafleet_trainer_jobs_queued", lambda r: value(r) == 1.0)
        prom.wait_for(
            'lorafleet_trainer_submissions_rejected_total{code="INVALID_ARGUMENT"}', lambda r: value(r) == 1.0
        )
    # The live exposition, as scraped, passes promtool's lint.
    body = urllib.request.urlopen(t.metrics_url, timeout=5).read()
    code, output = promtool_check_metrics(body)
    assert code == 0, output


def test_invalid_job_found_at_run_time_is_not_retried(
    trainer, tiny_llama, bundled_data, tmp_path: Path
) -> None:
    """The dataset is spoiled after the job was accepted: the recipe exits 2 (through torchrun too),
    and the job fails at once instead of being retried like a crash."""
    import shutil

    t = trainer()
    blocker = t.stub.SubmitJob(pb.SubmitJobRequest(spec=lora_spec(tiny_llama, bundled_data, max_steps=5000)))
    data = dict(bundled_data)
    data["cblue_train"] = tmp_path / "train.jsonl"
    shutil.copy(bundled_data["cblue_train"], data["cblue_train"])
    spec = lora_spec(tiny_llama, data)
    spec.resources.processes_per_node = 2
    spec.max_attempts = 3
    job = t.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    assert job.state == pb.JOB_STATE_QUEUED
    data["cblue_train"].write_text("{broken\n" * 50)
    t.stub.CancelJob(pb.CancelJobRequest(job_id=blocker.id))
    final = t.wait_for(job.id, timeout=180)
    assert final.state == pb.JOB_STATE_FAILED
    assert len(final.attempts) == 1 and final.attempts[0].exit_code == 2, final.attempts
    assert final.reason.startswith("invalid job") and "train.jsonl" in final.reason, final.reason
