"""Helpers for trainer-service tests: a real server process on a loopback port, and job specs.

The server runs as ``python -m services.trainer.server`` in its own process, so tests can SIGKILL it
and start a new one on the same state directory, exactly as an operator's crash would.
"""

from __future__ import annotations

import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from lorafleet.v1 import trainer_pb2 as pb
from lorafleet.v1 import trainer_pb2_grpc
from tests.service_process import ServiceProcess

TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


@dataclass
class TrainerProcess(ServiceProcess):
    state_dir: Path
    adapters_root: Path
    extra: list[str] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> TrainerProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._launch(
            [
                "-m",
                "services.trainer.server",
                "--port",
                "0",
                "--state-dir",
                str(self.state_dir),
                "--adapters-root",
                str(self.adapters_root),
                "--poll-interval",
                "0.2",
                "--cancel-grace",
                "5",
                "--data-roots",
                pytest_base_dir(self.state_dir),
                "--model-roots",
                pytest_base_dir(self.state_dir),
                *self.extra,
            ],
            self.state_dir.parent / f"trainer-server-{time.time_ns()}.log",
            {},
            trainer_pb2_grpc.TrainerServiceStub,
            timeout,
        )
        return self

    def kill(self) -> None:
        """SIGKILL the server (its training processes live on in their own sessions)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if self.channel:
            self.channel.close()

    def wait_for(self, job_id: str, states: tuple[int, ...] = TERMINAL, timeout: float = 300) -> pb.Job:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.stub.GetJob(pb.GetJobRequest(job_id=job_id))
            if job.state in states:
                return job
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {pb.JobState.Name(job.state)}:\n{self.server_log()[-3000:]}")


def pytest_base_dir(path: Path) -> str:
    """The pytest base temporary directory above ``path``: where the tests' models and data live, so
    the server's allow-lists take it as their root (a test that checks the roots passes its own)."""
    resolved = path.resolve()
    for parent in [resolved, *resolved.parents]:
        if parent.name.startswith("pytest-") and not parent.name.startswith("pytest-of-"):
            return str(parent)
    return tempfile.gettempdir()


def lora_spec(model: Path, datasets: dict[str, Path], **hyper: Any) -> pb.JobSpec:
    """A short LoRA job on the tiny model and the PromptCBLUE-like data."""
    h = {
        "max_steps": 12,
        "per_device_batch_size": 8,
        "learning_rate": 1e-2,
        "lr_scheduler": "constant",
        "logging_steps": 2,
        "predict_with_generate": False,
        "num_threads": 1,
        **hyper,
    }
    return pb.JobSpec(
        model=pb.ModelSpec(name_or_path=str(model)),
        dataset=pb.DatasetSpec(
            train_file=str(datasets["cblue_train"]),
            validation_file=str(datasets["cblue_validation"]),
            format="columns",
            max_source_length=96,
            max_target_length=8,
            max_samples=160,
        ),
        method="lora",
        lora=pb.LoraOptions(rank=8, alpha=16, dropout=0.0),
        hyperparameters=pb.Hyperparameters(**h),
        adapter_name="svc-lora",
    )


def processes_with_env(key: str, value: str) -> list[psutil.Process]:
    """Live processes whose environment has ``key=value`` (every process of one job's attempts)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(key) == value and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def watch_all(stub: Any, job_id: str, timeout: float = 300) -> Iterator[pb.JobEvent]:
    yield from stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout)
