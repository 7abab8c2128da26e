"""Durable job state: the ``JobStore`` interface and its embedded default, SQLite.

Everything the service must not lose lives here: the accepted spec, the state, every attempt with
the launcher's handle (so a restarted service can find and adopt what it started), and every event
a watcher may ask to replay (state changes, metric records, log lines). Each write is one
transaction, so a SIGKILL at any moment leaves either the old or the new state, never half of one.

The manager only talks to the ``JobStore`` protocol; another backend (PostgreSQL, say) implements
the same methods.
"""

from __future__ import annotations

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
    spec: bytes
    """The accepted ``JobSpec``, serialized."""
    spec_sha256: str
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
    queue_seq: int = 0
    """Order of submission (the queue is first in, first out)."""
    attempts: list[AttemptRow] = field(default_factory=list)


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
    spec BLOB NOT NULL,
    spec_sha256 TEXT NOT NULL,
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
    memory_estimate TEXT NOT NULL DEFAULT '{}'
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
_JSON_JOB = ("final_metrics", "progress", "memory_estimate")
_JSON_ATTEMPT = ("handle",)


class SQLiteJobStore:
    """SQLite in WAL mode; one connection shared by the service's threads behind a lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

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
        return [EventRow(r["job_id"], r["seq"], r["time"], r["kind"], json.loads(r["payload"])) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- rows <-> objects ---------------------------------------------------------------------------

    @staticmethod
    def _encode(key: str, value: Any, json_fields: tuple[str, ...]) -> Any:
        if key in json_fields:
            return json.dumps(value, ensure_ascii=False)
        if isinstance(value, bool):
            return int(value)
        return value

    def _job_values(self, job: JobRow) -> dict[str, Any]:
        values = {k: self._encode(k, v, _JSON_JOB) for k, v in job.__dict__.items() if k != "attempts"}
        return values

    def _job(self, row: sqlite3.Row) -> JobRow:
        data = dict(row)
        for key in _JSON_JOB:
            data[key] = json.loads(data[key])
        data["cancel_requested"] = bool(data["cancel_requested"])
        job = JobRow(**data)
        rows = self._db.execute(
            "SELECT * FROM attempts WHERE job_id = ? ORDER BY number", (job.id,)
        ).fetchall()
        for r in rows:
            a = dict(r)
            a["handle"] = json.loads(a["handle"])
            job.attempts.append(AttemptRow(**a))
        return job
