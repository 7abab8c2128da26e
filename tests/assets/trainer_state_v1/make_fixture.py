"""Write a trainer state directory the way the release that kept protobuf in its store wrote it.

Run from a checkout of that release (see README.md here for the commit), not from a newer tree:

    python tests/assets/trainer_state_v1/make_fixture.py /tmp/lorafleet-state-v1

The real ``JobManager`` and ``SQLiteJobStore`` of that release drive five jobs through their states;
only the launcher is scripted (it writes the records a training run writes and reports the outcome
it was told), so the directory is small and needs no model. ``<out>/expected_jobs.json`` holds what\nthat release's servicer answered for each job (``GetJob`` and ``WatchJob`` as JSON). Copy ``<out>/state``\nand ``expected_jobs.json`` here afterwards.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from lorafleet.datagen import generate_datasets
from lorafleet.v1 import trainer_pb2 as pb
from services.trainer import store as st
from services.trainer.launchers.base import AttemptPhase, AttemptRequest, AttemptStatus, Capacity
from services.trainer.manager import JobManager, ManagerSettings
from services.trainer.server import TrainerServicer, event_to_pb


class ScriptedLauncher:
    """Starts nothing; writes a run's records and reports the outcome set in ``outcomes``."""

    name = "local"
    capacity = Capacity(max_nodes=1, max_processes_per_node=2, max_gpus_per_node=2)

    def __init__(self) -> None:
        self.outcomes: dict[str, AttemptStatus] = {}
        self.pid = 4100

    def start(self, request: AttemptRequest) -> dict[str, Any]:
        self.pid += 1
        request.attempt_dir.mkdir(parents=True, exist_ok=True)
        (request.attempt_dir / "output.log").write_text(f"attempt {request.attempt} of {request.job_id}\n")
        return {"pid": self.pid, "attempt_dir": str(request.attempt_dir), "job_id": request.job_id}

    def poll(self, handle: dict[str, Any]) -> AttemptStatus:
        return self.outcomes.get(handle["job_id"], AttemptStatus(AttemptPhase.RUNNING))

    def cancel(self, handle: dict[str, Any], grace_s: float = 10.0) -> None:
        self.outcomes[handle["job_id"]] = AttemptStatus(AttemptPhase.FAILED, -15, "cancelled")

    def log_tail(self, handle: dict[str, Any], max_bytes: int = 4000) -> str:
        return "Traceback (most recent call last):\nRuntimeError: CUDA error: device-side assert\n"


def write_run(run_dir: Path, steps: int, published: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = [{"event": "run_started", "total_steps": steps, "time": 1.0}]
    for step in range(2, steps + 1, 2):
        records.append(
            {
                "step": step,
                "total_steps": steps,
                "epoch": step / steps,
                "loss": 2.0 / step,
                "learning_rate": 0.01,
                "tokens_per_s": 900.0 + step,
                "percent": 100.0 * step / steps,
                "grad_norm": 0.5,
                "time": 1.0 + step,
            }
        )
    name, _, version = published.partition("@")
    records.append({"event": "published", "name": name, "version": int(version), "time": 99.0})
    (run_dir / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "final_metrics.json").write_text(json.dumps({"eval_loss": 0.42, "train_runtime": 12.5}))


def spec(data: dict[str, Path], adapter: str, **extra: Any) -> pb.JobSpec:
    return pb.JobSpec(
        model=pb.ModelSpec(name_or_path="example-org/tiny-llama", dtype="fp32"),
        dataset=pb.DatasetSpec(train_file=str(data["cblue_train"]), format="columns", max_source_length=96),
        method="lora",
        lora=pb.LoraOptions(rank=8, alpha=16, target_modules=["q_proj", "v_proj"]),
        hyperparameters=pb.Hyperparameters(max_steps=6, learning_rate=1e-2, logging_steps=2),
        adapter_name=adapter,
        **extra,
    )


def main(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    data = generate_datasets(str(out / "data"))
    state_dir = out / "state"
    store = st.SQLiteJobStore(state_dir / "jobs.sqlite3")
    launcher = ScriptedLauncher()
    manager = JobManager(
        store,
        launcher,
        ManagerSettings(
            state_dir=state_dir, adapters_root=out / "adapters", max_running=3, check_memory=False
        ),
    )
    ok = manager.submit(
        spec(
            data,
            "fixture-ok",
            labels={"owner": "ana", "experiment": "v1-store"},
            overrides={"train.seed": "7"},
            deepspeed=pb.DeepSpeedSpec(launcher="torchrun"),
        ),
        idempotency_key="fixture-key-1",
    )
    failed = manager.submit(
        spec(
            data,
            "fixture-failed",
            max_attempts=2,
            resources=pb.Resources(gpus_per_node=2, cpu="2", memory="4Gi"),
        )
    )
    running_cancel = manager.submit(spec(data, ""))
    manager.tick()  # all three start
    write_run(Path(ok.run_dir), 6, "fixture-ok@1")
    launcher.outcomes[ok.id] = AttemptStatus(AttemptPhase.SUCCEEDED, 0)
    launcher.outcomes[failed.id] = AttemptStatus(AttemptPhase.FAILED, 1, "exit status 1")
    manager.tick()  # ok succeeds; failed retries
    manager.tick()  # failed's second attempt fails too: FAILED
    manager.cancel(running_cancel.id, "stopped by the fixture")
    queued_cancel = manager.submit(spec(data, "fixture-queued-cancel"))
    manager.cancel(queued_cancel.id)
    manager.settings.max_running = 0
    manager.submit(spec(data, "fixture-queued", labels={"owner": "bo"}), idempotency_key="fixture-key-2")
    manager.tick()
    store.close()
    # What that release's server answers for each job: the migrated store must answer the same.
    store = st.SQLiteJobStore(state_dir / "jobs.sqlite3")
    manager = JobManager(
        store, launcher, ManagerSettings(state_dir=state_dir, adapters_root=out / "adapters")
    )
    servicer = TrainerServicer(manager, out / "adapters")
    expected = {}
    for job in store.list_jobs(limit=100):
        events = [MessageToDict(event_to_pb(e)) for e in store.events(job.id)]
        expected[job.id] = {"job": MessageToDict(servicer.job_to_pb(job)), "events": events}
        print(job.id, job.state, job.reason, len(job.attempts), len(events), sep="\t")
    store.close()
    (out / "expected_jobs.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
