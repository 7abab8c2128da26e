"""The JSON job store opens a state directory the protobuf store wrote, with every job intact.

tests/assets/trainer_state_v1/ was written by that release's real JobManager and SQLiteJobStore (see
its README), with what that release's servicer answered for each job; after the migration the
servicer must answer exactly the same.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict

from lorafleet.v1 import trainer_pb2 as pb
from services.trainer import store as st
from services.trainer.errors import IdempotencyConflictError
from services.trainer.jobspec import request_from_spec, spec_from_request
from services.trainer.launchers.base import Capacity
from services.trainer.launchers.local import LocalLauncher
from services.trainer.manager import JobManager, ManagerSettings
from services.trainer.server import TrainerServicer, event_to_pb

FIXTURE = Path(__file__).parent / "assets" / "trainer_state_v1"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE / "state", tmp_path / "state")
    return tmp_path / "state"


def _open(state_dir: Path) -> tuple[st.SQLiteJobStore, JobManager, TrainerServicer]:
    store = st.SQLiteJobStore(state_dir / "jobs.sqlite3")
    settings = ManagerSettings(state_dir=state_dir, adapters_root=state_dir.parent / "adapters")
    manager = JobManager(store, LocalLauncher(Capacity()), settings)
    return store, manager, TrainerServicer(manager, settings.adapters_root)


def test_every_job_reads_back_as_the_old_release_served_it(state_dir: Path) -> None:
    expected = json.loads((FIXTURE / "expected_jobs.json").read_text())
    store, _, servicer = _open(state_dir)
    jobs = store.list_jobs(limit=100)
    assert sorted(j.id for j in jobs) == sorted(expected)
    assert {j.state for j in jobs} == {st.QUEUED, st.SUCCEEDED, st.FAILED, st.CANCELLED}
    for job in jobs:
        assert MessageToDict(servicer.job_to_pb(job)) == expected[job.id]["job"], job.id
        events = [MessageToDict(event_to_pb(e)) for e in store.events(job.id)]
        assert events == expected[job.id]["events"], job.id
    store.close()


def test_migrated_rows_are_json_and_the_resolved_config(state_dir: Path) -> None:
    store, _, _ = _open(state_dir)
    store.close()
    db = sqlite3.connect(state_dir / "jobs.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == st.SCHEMA_VERSION
    columns = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
    assert "spec" not in columns and {"request", "request_sha256", "config"} <= columns
    for request, config in db.execute("SELECT request, config FROM jobs"):
        assert json.loads(request)["config"]["model"]["name_or_path"] == "example-org/tiny-llama"
        assert json.loads(config)["lora"]["rank"] == 8
    db.close()
    store, _, _ = _open(state_dir)  # a second open leaves a migrated store as it is
    assert len(store.list_jobs(limit=100)) == 5
    store.close()


def test_idempotency_keys_still_name_their_requests(state_dir: Path) -> None:
    store, manager, _ = _open(state_dir)
    first = store.find_by_idempotency_key("fixture-key-1")
    assert first is not None and first.state == st.SUCCEEDED
    spec = spec_from_request(first.request)
    assert manager.submit(request_from_spec(spec), "fixture-key-1").id == first.id
    spec.hyperparameters.learning_rate = 0.5
    with pytest.raises(IdempotencyConflictError):
        manager.submit(request_from_spec(spec), "fixture-key-1")
    store.close()


def test_a_spec_round_trips_through_the_plain_request() -> None:
    spec = pb.JobSpec(
        model=pb.ModelSpec(name_or_path="org/m", dtype="bf16", trust_remote_code=False),
        dataset=pb.DatasetSpec(train_file="t.jsonl", validation_split=0.1, max_samples=0),
        method="qlora",
        lora=pb.LoraOptions(rank=4, target_modules=["all-linear"], modules_to_save=["lm_head"]),
        hyperparameters=pb.Hyperparameters(epochs=2.0, seed=3),
        deepspeed=pb.DeepSpeedSpec(zero_stage=3, offload_param=True),
        resources=pb.Resources(nodes=2, processes_per_node=4, gpus_per_node=4, memory="64Gi"),
        adapter_name="a",
        max_attempts=1,
        labels={"owner": "x"},
        overrides={"train.weight_decay": "0.1"},
    )
    request = request_from_spec(spec)
    distributed = {"deepspeed_stage": 3, "offload_param": True, "nnodes": 2, "nproc_per_node": 4}
    assert request.config["distributed"] == distributed
    assert request.config["lora"]["target_modules"] == "all-linear"
    assert spec_from_request(request) == spec
    assert st.JobRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request
