"""Hostile input for the trainer API: every row of the table gets its own status code while other
clients are being served, stored rows that no longer pass today's bounds never break a read, and no
answer passes the client's 4 MiB limit. One real server process on a loopback port (paused: nothing
runs), rows written straight into its SQLite store beside it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from trainer_utils import TrainerProcess, lora_spec

from lorafleet.v1 import trainer_pb2 as pb

pytestmark = pytest.mark.integration

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
CLIENT_LIMIT = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, bundled_data) -> dict[str, Path]:
    """An allow-listed data root with a symlink that leaves it, and a secret file outside it."""
    base = tmp_path_factory.mktemp("hostile")
    data = base / "data"
    data.mkdir()
    train = data / "train.jsonl"
    train.write_bytes(Path(bundled_data["cblue_train"]).read_bytes())
    secret = base / "secret.jsonl"
    secret.write_text('{"input": "q", "target": "a"}\n' * 3, encoding="utf-8")
    (data / "escape.jsonl").symlink_to(secret)
    return {"base": base, "data": data, "train": train, "secret": secret, "model": tiny_llama}


@pytest.fixture(scope="module")
def server(roots: dict[str, Path]) -> Iterator[TrainerProcess]:
    base = roots["base"]
    t = TrainerProcess(
        base / "state",
        base / "adapters",
        [
            "--max-running",
            "0",
            "--data-roots",
            str(roots["data"]),
            "--model-roots",
            str(roots["model"].parent),
        ],
    ).start()
    yield t
    t.stop()


def _spec(roots: dict[str, Path], **changes: Any) -> pb.JobSpec:
    spec = lora_spec(roots["model"], {"cblue_train": roots["train"], "cblue_validation": roots["train"]})
    spec.dataset.ClearField("validation_file")
    for path, value in changes.items():
        *parents, name = path.split("__")
        msg = spec
        for part in parents:
            msg = getattr(msg, part)
        if isinstance(value, dict):
            getattr(msg, name).update(value)
        else:
            setattr(msg, name, value)
    return spec


class Bystander:
    """Another client, served while the hostile rows run: a GetJob loop and an open WatchJob stream.

    Every GetJob must succeed and the stream must stay open; ``failures`` lists what went wrong."""

    def __init__(self, server: TrainerProcess, job_id: str) -> None:
        self.server, self.job_id = server, job_id
        self.calls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._stream = server.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=600)
        self._threads = [threading.Thread(target=self._poll), threading.Thread(target=self._watch)]
        for t in self._threads:
            t.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.server.stub.GetJob(pb.GetJobRequest(job_id=self.job_id), timeout=30)
                assert job.state == pb.JOB_STATE_QUEUED, job
                self.calls += 1
            except Exception as e:  # recorded, asserted by the test
                self.failures.append(f"GetJob: {e!r}")
            time.sleep(0.02)

    def _watch(self) -> None:
        try:
            for _ in self._stream:
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.failures.append(f"WatchJob: {e.code()} {e.details()}")

    def stop(self) -> None:
        self._stop.set()
        self._stream.cancel()
        for t in self._threads:
            t.join(timeout=30)


@pytest.fixture(scope="module")
def bystander(server: TrainerProcess, roots: dict[str, Path]) -> Iterator[Bystander]:
    job = server.stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(roots)))
    b = Bystander(server, job.id)
    yield b
    b.stop()


Call = Callable[[Any, dict[str, Path]], Any]


def _submit(**changes: Any) -> Call:
    return lambda stub, roots: stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(roots, **changes)))


def _submit_path(field: str, key: str) -> Call:
    def call(stub: Any, roots: dict[str, Path]) -> Any:
        value = str(roots[key]) if key in roots else key
        return stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(roots, **{field: value})))

    return call


def _long_list(roots: dict[str, Path]) -> pb.JobSpec:
    spec = _spec(roots)
    spec.lora.target_modules.extend(f"m{i}" for i in range(300))
    return spec


_HUGE = "x" * 100_000
_OUTSIDE = "not under the server's allowed roots"

# (id, call, expected code, texts the message must contain; the message must stay short)
TABLE: list[tuple[str, Call, grpc.StatusCode, list[str]]] = [
    # malformed listing requests
    (
        "page token not a number",
        lambda s, r: s.ListJobs(pb.ListJobsRequest(page_token="abc")),
        INVALID,
        ["page_token", "'abc'"],
    ),
    (
        "page token past 64 bits",
        lambda s, r: s.ListJobs(pb.ListJobsRequest(page_token="9" * 30)),
        INVALID,
        ["page_token"],
    ),
    (
        "page token negative",
        lambda s, r: s.ListJobs(pb.ListJobsRequest(page_token="-1")),
        INVALID,
        ["page_token"],
    ),
    (
        "page token unicode digits",
        lambda s, r: s.ListJobs(pb.ListJobsRequest(page_token="\u0663")),
        INVALID,
        ["page_token"],
    ),
    (
        "page token huge",
        lambda s, r: s.ListJobs(pb.ListJobsRequest(page_token=_HUGE)),
        INVALID,
        ["page_token"],
    ),
    ("page size negative", lambda s, r: s.ListJobs(pb.ListJobsRequest(page_size=-1)), INVALID, ["page_size"]),
    (
        "unknown state enum",
        lambda s, r: s.ListJobs(pb.ListJobsRequest(states=[99])),
        INVALID,
        ["states", "99"],
    ),
    ("unspecified state", lambda s, r: s.ListJobs(pb.ListJobsRequest(states=[0])), INVALID, ["states"]),
    # long identifiers: refused by length, echoed short
    ("huge job id", lambda s, r: s.GetJob(pb.GetJobRequest(job_id=_HUGE)), INVALID, ["job_id", "at most 64"]),
    ("unknown job id", lambda s, r: s.GetJob(pb.GetJobRequest(job_id="nope")), NOT_FOUND, ["'nope'"]),
    ("empty job id", lambda s, r: s.GetJob(pb.GetJobRequest(job_id="")), NOT_FOUND, ["job_id"]),
    ("huge cancel id", lambda s, r: s.CancelJob(pb.CancelJobRequest(job_id=_HUGE)), INVALID, ["job_id"]),
    (
        "huge cancel reason",
        lambda s, r: s.CancelJob(pb.CancelJobRequest(job_id="nope", reason=_HUGE)),
        INVALID,
        ["reason"],
    ),
    ("huge watch id", lambda s, r: list(s.WatchJob(pb.WatchJobRequest(job_id=_HUGE))), INVALID, ["job_id"]),
    (
        "unknown watch id",
        lambda s, r: list(s.WatchJob(pb.WatchJobRequest(job_id="nope"))),
        NOT_FOUND,
        ["nope"],
    ),
    ("huge adapter name", lambda s, r: s.ListAdapters(pb.ListAdaptersRequest(name=_HUGE)), INVALID, ["name"]),
    (
        "bad adapter name",
        lambda s, r: s.ListAdapters(pb.ListAdaptersRequest(name="../x")),
        INVALID,
        ["'../x'"],
    ),
    ("huge adapter ref", lambda s, r: s.GetAdapter(pb.GetAdapterRequest(ref=_HUGE)), INVALID, ["ref"]),
    (
        "version past int32",
        lambda s, r: s.GetAdapter(pb.GetAdapterRequest(ref="a@99999999999")),
        INVALID,
        ["version", "2147483647"],
    ),
    ("unknown adapter", lambda s, r: s.GetAdapter(pb.GetAdapterRequest(ref="nope@1")), NOT_FOUND, ["nope"]),
    (
        "huge idempotency key",
        lambda s, r: s.SubmitJob(pb.SubmitJobRequest(spec=_spec(r), idempotency_key=_HUGE)),
        INVALID,
        ["idempotency_key"],
    ),
    # unbounded specs
    (
        "too many labels",
        _submit(labels={f"k{i}": "v" for i in range(33)}),
        INVALID,
        ["spec.labels", "at most 32"],
    ),
    ("label key too long", _submit(labels={"k" * 64: "v"}), INVALID, ["spec.labels key"]),
    ("label value too long", _submit(labels={"k": "v" * 257}), INVALID, ["spec.labels['k']"]),
    ("huge override value", _submit(overrides={"train.seed": _HUGE}), INVALID, ["spec.overrides"]),
    ("huge model path", _submit(model__name_or_path=_HUGE), INVALID, ["spec.model.name_or_path"]),
    ("huge adapter name in spec", _submit(adapter_name=_HUGE), INVALID, ["spec.adapter_name"]),
    (
        "huge target module list",
        lambda s, r: s.SubmitJob(pb.SubmitJobRequest(spec=_long_list(r))),
        INVALID,
        ["spec.lora.target_modules", "at most 256 items"],
    ),
    # paths outside the allow-list: one message whether the file exists or not
    ("secret that exists", _submit_path("dataset__train_file", "secret"), INVALID, [_OUTSIDE]),
    ("secret that does not", _submit_path("dataset__train_file", "/etc/no-such-file"), INVALID, [_OUTSIDE]),
    ("/etc/shadow", _submit_path("dataset__train_file", "/etc/shadow"), INVALID, [_OUTSIDE]),
    (
        "dot-dot out of the root",
        lambda s, r: s.SubmitJob(
            pb.SubmitJobRequest(spec=_spec(r, dataset__train_file=str(r["data"] / ".." / "secret.jsonl")))
        ),
        INVALID,
        [_OUTSIDE],
    ),
    (
        "symlink out of the root",
        lambda s, r: s.SubmitJob(
            pb.SubmitJobRequest(spec=_spec(r, dataset__train_file=str(r["data"] / "escape.jsonl")))
        ),
        INVALID,
        [_OUTSIDE],
    ),
    ("validation file outside", _submit_path("dataset__validation_file", "/etc/passwd"), INVALID, [_OUTSIDE]),
    ("train file by override", _submit(overrides={"data.train_file": "/etc/passwd"}), INVALID, [_OUTSIDE]),
    (
        "deepspeed config outside",
        _submit(overrides={"distributed.deepspeed_config": "/etc/passwd"}),
        INVALID,
        [_OUTSIDE],
    ),
    ("model dir outside (exists)", _submit_path("model__name_or_path", "/etc"), INVALID, [_OUTSIDE]),
    ("model dir outside (missing)", _submit_path("model__name_or_path", "/no/such/dir"), INVALID, [_OUTSIDE]),
]


@pytest.mark.parametrize(("call", "code", "texts"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_hostile_input(server: TrainerProcess, roots, bystander: Bystander, call: Call, code, texts) -> None:
    before = bystander.calls
    with pytest.raises(grpc.RpcError) as err:
        call(server.stub, roots)
    details = err.value.details() or ""
    assert err.value.code() == code, details
    for text in texts:
        assert text in details, details
    assert len(details) < 2000, f"{len(details)} characters echoed"
    deadline = time.time() + 30
    while bystander.calls <= before and time.time() < deadline:
        time.sleep(0.05)
    assert bystander.calls > before and not bystander.failures, bystander.failures


def test_same_refusal_whether_a_path_exists_or_not(server: TrainerProcess, roots) -> None:
    """An outside path's refusal differs only by the path itself: no existence, no line count."""
    answers = []
    for path in (str(roots["secret"]), str(roots["secret"]) + ".missing"):
        with pytest.raises(grpc.RpcError) as err:
            server.stub.SubmitJob(pb.SubmitJobRequest(spec=_spec(roots, dataset__train_file=path)))
        answers.append(err.value.details().replace(path, "<path>"))
    assert answers[0] == answers[1]
    assert "rows" not in answers[0] and "line" not in answers[0]


def test_hub_ids_stay_allowed(server: TrainerProcess, roots) -> None:
    job = server.stub.SubmitJob(
        pb.SubmitJobRequest(spec=_spec(roots, model__name_or_path="org/model"), dry_run=True)
    )
    assert job.spec.model.name_or_path == "org/model"


# -- stored rows that no longer pass today's bounds -------------------------------------------------------


def _insert_rows(db_path: Path, template: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    db = sqlite3.connect(str(db_path), timeout=30)
    ids = []
    try:
        for i, changes in enumerate(rows):
            values = {**template, **changes, "id": f"stored{i:04d}{time.time_ns() % 10**6}"}
            values.pop("queue_seq", None)
            values["idempotency_key"] = None
            names = ", ".join(values)
            db.execute(
                f"INSERT INTO jobs ({names}) VALUES ({', '.join('?' for _ in values)})",
                tuple(values.values()),
            )
            ids.append(values["id"])
        db.commit()
    finally:
        db.close()
    return ids


def _template(db_path: Path, job_id: str) -> dict[str, Any]:
    db = sqlite3.connect(str(db_path), timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return dict(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
    finally:
        db.close()


def _list_all(stub: Any, page_size: int = 0) -> tuple[list[pb.Job], int]:
    jobs, token, biggest = [], "", 0
    for _ in range(1000):
        answer = stub.ListJobs(pb.ListJobsRequest(page_size=page_size, page_token=token))
        biggest = max(biggest, answer.ByteSize())
        jobs += answer.jobs
        token = answer.next_page_token
        if not token:
            return jobs, biggest
    raise AssertionError("paging never ended")


def test_large_stored_labels_never_pass_the_client_limit(server: TrainerProcess, roots, bystander) -> None:
    db_path = roots["base"] / "state" / "jobs.sqlite3"
    template = _template(db_path, bystander.job_id)
    request = json.loads(template["request"])
    request["labels"] = {f"k{i}": "v" * 100_000 for i in range(9)}  # ~0.9 MB a job: past today's bounds
    ids = _insert_rows(db_path, template, [{"request": json.dumps(request)}] * 8)
    huge_tail = {"log_tail": "line\n" * 1_000_000}  # 5 MB in one row
    ids += _insert_rows(db_path, template, [huge_tail])
    jobs, biggest = _list_all(server.stub, page_size=500)
    assert biggest < CLIENT_LIMIT
    listed = {j.id: j for j in jobs}
    assert set(ids) <= set(listed)
    assert all(listed[i].ByteSize() <= 512 * 1024 for i in ids)
    assert "trimmed" in listed[ids[0]].reason
    one = server.stub.GetJob(pb.GetJobRequest(job_id=ids[-1]))
    assert one.ByteSize() < CLIENT_LIMIT and len(one.log_tail) <= 8000


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("state", "exploded"),
        ("request", "{not json"),
        ("request", json.dumps({"config": {"lora": {"rank": 10**30}}})),
        ("progress", json.dumps({"step": 2**70})),
        ("progress", '{"step": NaN, "epoch": Infinity}'),
        ("final_metrics", json.dumps({"loss": "high"})),
        ("final_metrics", '{"loss": 1e400}'),
        ("memory_estimate", json.dumps({"device_bytes_per_process": "lots"})),
        ("created_at", "yesterday"),
        ("created_at", 1e300),
        ("config", b"\xff\xfe not utf-8"),
        ("reason", b"bad \xc3\x28 utf-8"),
        ("adapter_ref", "x@99999999999999999999"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_read_paths_survive_any_stored_row(server: TrainerProcess, roots, bystander, column, value) -> None:
    db_path = roots["base"] / "state" / "jobs.sqlite3"
    template = _template(db_path, bystander.job_id)
    (job_id,) = _insert_rows(db_path, template, [{column: value}])
    job = server.stub.GetJob(pb.GetJobRequest(job_id=job_id))
    assert job.id == job_id
    listed = {j.id: j for j in _list_all(server.stub)[0]}
    assert job_id in listed and bystander.job_id in listed
    assert listed[bystander.job_id].state == pb.JOB_STATE_QUEUED
    if column in ("state", "request", "progress", "memory_estimate"):
        assert "stored record unreadable" in job.reason, job
        assert listed[job_id].reason == job.reason


def test_bad_adapter_manifests_do_not_fail_the_listing(server: TrainerProcess, roots) -> None:
    adapters = roots["base"] / "adapters"
    good = {
        "schema": 1,
        "name": "good",
        "version": 1,
        "kind": "lora",
        "method": "lora",
        "base_model": {"id": "x"},
        "created_at": "2026-01-01T00:00:00Z",
        "files": {},
    }
    manifests = {
        ("good", 1): json.dumps(good),
        ("bigint", 1): json.dumps({**good, "name": "bigint", "metrics": {"loss": 1, "n": 1}}).replace(
            '"n": 1', '"n": ' + "9" * 400
        ),
        ("broken", 1): "{not json",
        ("notutf8", 1): None,
        ("huge", 2147483648): json.dumps({**good, "name": "huge", "version": 2147483648}),
    }
    for (name, version), text in manifests.items():
        d = adapters / name / str(version)
        d.mkdir(parents=True)
        path = d / "lorafleet_manifest.json"
        if text is None:
            path.write_bytes(b"\xff\xfe{}")
        else:
            path.write_text(text, encoding="utf-8")
    found = {(a.name, a.version): a for a in server.stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert ("good", 1) in found and ("bigint", 1) in found
    assert "n" not in found[("bigint", 1)].metrics
    assert ("huge", 2147483648) not in found
