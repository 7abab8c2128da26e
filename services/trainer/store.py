"""Durable job state: the ``JobStore`` interface and its embedded default, SQLite.

Everything the service must not lose lives here, as JSON: the accepted request and the resolved run
config, the state, every attempt with
the launcher's handle (so a restarted service can find and adopt what it started), and every event
a watcher may ask to replay (state changes, metric records, log lines). Each write is one
transaction, so a SIGKILL at any moment leaves either the old or the new state, never half of one.

The manager only talks to the ``JobStore`` protocol; another backend (PostgreSQL, say) implements
the same methods. Opening a store written by the first release (a serialized protobuf spec per job)
migrates it in place, once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)


@dataclass(frozen=True)
class ResourceRequest:
    """Resources a job asks for beyond its process layout (which is part of its config)."""

    gpus_per_node: int | None = None
    """None: the launcher's default (no GPUs); also sets one process per GPU unless the config says."""
    cpu: str | None = None
    """Kubernetes quantity, e.g. ``"8"``."""
    memory: str | None = None
    """Kubernetes quantity, e.g. ``"64Gi"``."""


@dataclass(frozen=True)
class JobRequest:
    """What a client asks the trainer to run, free of any transport."""

    config: dict[str, Any]
    """The run-config tree the client set, shaped like a YAML run config (``{"lora": {"rank": 8}}``);
    server-owned keys are absent and nothing is validated yet."""
    overrides: dict[str, str] = field(default_factory=dict)
    """``section.key`` -> YAML text, applied over ``config`` (keys without a typed spec field)."""
    resources: ResourceRequest = field(default_factory=ResourceRequest)
    max_attempts: int | None = None
    """None: the server's default."""
    labels: dict[str, str] = field(default_factory=dict)
    """Free-form labels shown in listings (owner, experiment)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRequest:
        return cls(
            config=data["config"],
            overrides=data.get("overrides", {}),
            resources=ResourceRequest(**data.get("resources", {})),
            max_attempts=data.get("max_attempts"),
            labels=data.get("labels", {}),
        )

    def sha256(self) -> str:
        """Digest of the request (an idempotency key names one request)."""
        text = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class AttemptRow:
    job_id: str
    number: int
    state: str
    started_at: float
    finished_at: float | None = None
    exit_code: int | None = None
    reason: str = ""
    resumed_from_step: int = 0
    launcher: str = ""
    handle: dict[str, Any] = field(default_factory=dict)
    records_offset: int = 0
    """Bytes of the run's trainer_log.jsonl already turned into events."""
    log_offset: int = 0
    """Bytes of the attempt's output log already turned into events."""


@dataclass
class JobRow:
    id: str
    request: JobRequest
    """What the client asked for."""
    request_sha256: str
    state: str
    created_at: float
    idempotency_key: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    reason: str = ""
    log_tail: str = ""
    run_dir: str = ""
    launcher: str = ""
    max_attempts: int = 1
    cancel_requested: bool = False
    adapter_ref: str = ""
    final_metrics: dict[str, float] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    memory_estimate: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved run config the recipe runs (``RunConfig.to_dict()``), server fields included."""
    queue_seq: int = 0
    """Order of submission (the queue is first in, first out)."""
    attempts: list[AttemptRow] = field(default_factory=list)
    unreadable: str = ""
    """Why the stored row could not be read in full (then only id, state and times are kept); not
    stored. Readers report such a row instead of failing, and the manager never runs it."""


@dataclass
class EventRow:
    job_id: str
    seq: int
    time: float
    kind: str
    """``state``, ``metrics`` or ``log``."""
    payload: dict[str, Any]


class JobStore(Protocol):
    def insert_job(self, job: JobRow) -> JobRow: ...
    def get_job(self, job_id: str) -> JobRow | None: ...
    def find_by_idempotency_key(self, key: str) -> JobRow | None: ...
    def list_jobs(self, states: Iterable[str] = (), after_seq: int = 0, limit: int = 50) -> list[JobRow]: ...
    def count_jobs(self, states: Iterable[str]) -> int: ...
    def update_job(self, job_id: str, **fields: Any) -> None: ...
    def add_attempt(self, attempt: AttemptRow) -> None: ...
    def update_attempt(self, job_id: str, number: int, **fields: Any) -> None: ...
    def append_events(self, job_id: str, events: list[tuple[str, dict[str, Any]]]) -> list[EventRow]: ...
    def events(self, job_id: str, after_seq: int = 0, kinds: Iterable[str] = ()) -> list[EventRow]: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    queue_seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    request TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    reason TEXT NOT NULL DEFAULT '',
    log_tail TEXT NOT NULL DEFAULT '',
    run_dir TEXT NOT NULL DEFAULT '',
    launcher TEXT NOT NULL DEFAULT '',
    max_attempts INTEGER NOT NULL DEFAULT 1,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    adapter_ref TEXT NOT NULL DEFAULT '',
    final_metrics TEXT NOT NULL DEFAULT '{}',
    progress TEXT NOT NULL DEFAULT '{}',
    memory_estimate TEXT NOT NULL DEFAULT '{}',
    config TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    number INTEGER NOT NULL,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    exit_code INTEGER,
    reason TEXT NOT NULL DEFAULT '',
    resumed_from_step INTEGER NOT NULL DEFAULT 0,
    launcher TEXT NOT NULL DEFAULT '',
    handle TEXT NOT NULL DEFAULT '{}',
    records_offset INTEGER NOT NULL DEFAULT 0,
    log_offset INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, number)
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""
_JSON_JOB = ("final_metrics", "progress", "memory_estimate", "config")
SCHEMA_VERSION = 2
"""``PRAGMA user_version`` of the JSON store; 0 is the first release's (a serialized ``JobSpec`` per job)."""
_JSON_ATTEMPT = ("handle",)


class SQLiteJobStore:
    """SQLite in WAL mode; one connection shared by the service's threads behind a lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        # A TEXT value that is not UTF-8 (written by hand or by a broken tool) must not fail a read.
        self._db.text_factory = _decode_text
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._open_schema()

    def _open_schema(self) -> None:
        """Create the tables, or bring an older store's up to :data:`SCHEMA_VERSION` first."""
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
        if version < SCHEMA_VERSION and "spec" in columns:
            _migrate_from_protobuf(self._db, self.path.parent)
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- jobs ---------------------------------------------------------------------------------------

    def insert_job(self, job: JobRow) -> JobRow:
        values = self._job_values(job)
        values.pop("queue_seq")
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._lock, self._db:
            cur = self._db.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", tuple(values.values()))
            job.queue_seq = int(cur.lastrowid or 0)
        return job

    def get_job(self, job_id: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._job(row) if row else None

    def find_by_idempotency_key(self, key: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
            return self._job(row) if row else None

    def list_jobs(self, states: Iterable[str] = (), after_seq: int = 0, limit: int = 50) -> list[JobRow]:
        states = list(states)
        where = "queue_seq > ?"
        args: list[Any] = [after_seq]
        if states:
            where += f" AND state IN ({', '.join('?' for _ in states)})"
            args += states
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE {where} ORDER BY queue_seq LIMIT ?", (*args, limit)
            ).fetchall()
            return [self._job(r) for r in rows]

    def count_jobs(self, states: Iterable[str]) -> int:
        states = list(states)
        with self._lock:
            row = self._db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE state IN ({', '.join('?' for _ in states)})", states
            ).fetchone()
            return int(row[0])

    def update_job(self, job_id: str, **fields: Any) -> None:
        if not fields:
            return
        values = {k: self._encode(k, v, _JSON_JOB) for k, v in fields.items()}
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._lock, self._db:
            self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values.values(), job_id))

    # -- attempts -----------------------------------------------------------------------------------

    def add_attempt(self, attempt: AttemptRow) -> None:
        values = {k: self._encode(k, v, _JSON_ATTEMPT) for k, v in attempt.__dict__.items()}
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._lock, self._db:
            self._db.execute(f"INSERT INTO attempts ({names}) VALUES ({marks})", tuple(values.values()))

    def update_attempt(self, job_id: str, number: int, **fields: Any) -> None:
        values = {k: self._encode(k, v, _JSON_ATTEMPT) for k, v in fields.items()}
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._lock, self._db:
            self._db.execute(
                f"UPDATE attempts SET {sets} WHERE job_id = ? AND number = ?",
                (*values.values(), job_id, number),
            )

    # -- events -------------------------------------------------------------------------------------

    def append_events(self, job_id: str, events: list[tuple[str, dict[str, Any]]]) -> list[EventRow]:
        """Append events with consecutive sequence numbers, in one transaction."""
        if not events:
            return []
        now = time.time()
        with self._lock, self._db:
            row = self._db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,)
            ).fetchone()
            seq = int(row[0])
            out = []
            for kind, payload in events:
                seq += 1
                self._db.execute(
                    "INSERT INTO events (job_id, seq, time, kind, payload) VALUES (?, ?, ?, ?, ?)",
                    (job_id, seq, now, kind, json.dumps(payload, ensure_ascii=False)),
                )
                out.append(EventRow(job_id, seq, now, kind, payload))
        return out

    def events(self, job_id: str, after_seq: int = 0, kinds: Iterable[str] = ()) -> list[EventRow]:
        kinds = list(kinds)
        where = "job_id = ? AND seq > ?"
        args: list[Any] = [job_id, after_seq]
        if kinds:
            where += f" AND kind IN ({', '.join('?' for _ in kinds)})"
            args += kinds
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM events WHERE {where} ORDER BY seq", args).fetchall()
        return [EventRow(r["job_id"], r["seq"], r["time"], r["kind"], _payload(r["payload"])) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- rows <-> objects ---------------------------------------------------------------------------

    @staticmethod
    def _encode(key: str, value: Any, json_fields: tuple[str, ...]) -> Any:
        if key in json_fields:
            return json.dumps(value, ensure_ascii=False)
        if isinstance(value, JobRequest):
            return json.dumps(value.to_dict(), ensure_ascii=False)
        if isinstance(value, bool):
            return int(value)
        return value

    def _job_values(self, job: JobRow) -> dict[str, Any]:
        skip = ("attempts", "unreadable")
        values = {k: self._encode(k, v, _JSON_JOB) for k, v in job.__dict__.items() if k not in skip}
        return values

    def _job(self, row: sqlite3.Row) -> JobRow:
        """The row as a ``JobRow``; a row that cannot be read comes back marked ``unreadable``."""
        try:
            return self._parse_job(row)
        except Exception as e:  # any stored value: broken JSON, wrong types, missing keys
            return _unreadable_job(dict(row), f"{type(e).__name__}: {e}")

    def _parse_job(self, row: sqlite3.Row) -> JobRow:
        data = dict(row)
        for key in _JSON_JOB:
            data[key] = json.loads(data[key])
        data["cancel_requested"] = bool(data["cancel_requested"])
        data["request"] = JobRequest.from_dict(json.loads(data["request"]))
        job = JobRow(**data)
        rows = self._db.execute(
            "SELECT * FROM attempts WHERE job_id = ? ORDER BY number", (job.id,)
        ).fetchall()
        for r in rows:
            a = dict(r)
            a["handle"] = json.loads(a["handle"])
            job.attempts.append(AttemptRow(**a))
        return job


def _decode_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _payload(text: str) -> dict[str, Any]:
    """An event's payload; one that is not a JSON object reads as an empty one."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _unreadable_job(data: dict[str, Any], reason: str) -> JobRow:
    """What can be kept of a row that does not parse: its id, a known state, and finite times."""

    def number(key: str) -> float | None:
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e11:
            return float(value)
        return None

    state = data.get("state")
    seq = data.get("queue_seq")
    return JobRow(
        id=str(data.get("id", "")),
        request=JobRequest(config={}),
        request_sha256="",
        state=state if state in STATES else "",
        created_at=number("created_at") or 0.0,
        started_at=number("started_at"),
        finished_at=number("finished_at"),
        queue_seq=seq if isinstance(seq, int) else 0,
        unreadable=reason[:500],
    )


def _migrate_from_protobuf(db: sqlite3.Connection, state_dir: Path) -> None:
    """Rewrite a first-release store (a serialized ``JobSpec`` per job) as JSON, in one transaction.

    Each job's request comes from its spec, its resolved config from the ``config.yaml`` the
    manager wrote beside the run (``<state_dir>/jobs/<id>/``), and its digest is recomputed, so an
    idempotency key keeps matching the same request after the upgrade.
    """
    import yaml

    from lorafleet.v1 import trainer_pb2
    from services.trainer.jobspec import request_from_spec

    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("ALTER TABLE jobs ADD COLUMN request TEXT NOT NULL DEFAULT '{}'")
        db.execute("ALTER TABLE jobs ADD COLUMN request_sha256 TEXT NOT NULL DEFAULT ''")
        db.execute("ALTER TABLE jobs ADD COLUMN config TEXT NOT NULL DEFAULT '{}'")
        for row in db.execute("SELECT id, spec, run_dir FROM jobs").fetchall():
            request = request_from_spec(trainer_pb2.JobSpec.FromString(row["spec"]))
            config: dict[str, Any] = {}
            for job_dir in (state_dir / "jobs" / row["id"], Path(row["run_dir"]).parent):
                path = job_dir / "config.yaml"
                if path.is_file():
                    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
                    break
            encoded = json.dumps(request.to_dict(), ensure_ascii=False)
            db.execute(
                "UPDATE jobs SET request = ?, request_sha256 = ?, config = ? WHERE id = ?",
                (encoded, request.sha256(), json.dumps(config, ensure_ascii=False), row["id"]),
            )
        db.execute("ALTER TABLE jobs DROP COLUMN spec")
        db.execute("ALTER TABLE jobs DROP COLUMN spec_sha256")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
