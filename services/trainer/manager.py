"""The job manager: queue, attempts, retries, cancel, events; the gRPC servicer is a thin layer over it.

It takes plain ``JobRequest``s and returns ``JobRow``s (``services.trainer.store``); it knows nothing
of protobuf or gRPC, and raises the errors of ``services.trainer.errors``.

State machine of a job::

    QUEUED --start--> RUNNING --attempt ok--> SUCCEEDED
       |                 | attempt failed, attempts left: new attempt (resumes from the checkpoint)
       |                 | attempt failed, none left or invalid job (exit 2): FAILED
       +----cancel-------+--> CANCELLED

One background thread drives it (``tick`` every ``poll_interval_s``): it reads what each running
attempt's launcher reports, turns new lines of the run's ``trainer_log.jsonl`` and of the attempt's
output into events, finishes or retries attempts, and starts queued jobs while capacity allows.
Every transition is written to the store before anything acts on it, so after a SIGKILL the next
service process resumes from the store: ``recover`` adopts attempts whose processes still run and
settles those that ended while nobody watched. The recipe itself never publishes twice (it finds its
own run id in the adapters root), so a replayed finish cannot duplicate an adapter.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafleet.errors import ConfigError, FieldProblem
from services.trainer import store as st
from services.trainer.errors import (
    IdempotencyConflictError,
    JobNotFoundError,
    JobStateError,
    QueueFullError,
)
from services.trainer.launchers.base import (
    EXIT_INVALID,
    AttemptPhase,
    AttemptRequest,
    Launcher,
    attempt_dir,
    read_reason,
)
from services.trainer.paths import PathPolicy
from services.trainer.validation import validate_submission

log = logging.getLogger("lorafleet.trainer")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_PAGE_TOKEN_RE = re.compile(r"[0-9]{1,18}")
"""A page token is the queue position of the last job sent: at most 18 digits, so it fits SQLite's
64-bit integers."""
_LOG_EVENT_LIMIT = 5000
"""Log lines kept as events per job (the full log stays in the attempt's output file)."""


@dataclass
class ManagerSettings:
    state_dir: Path
    """Holds ``jobs/<id>/`` (config, attempts, run dir); on Kubernetes, the shared runs volume."""
    adapters_root: Path
    max_running: int = 1
    max_queued: int = 100
    default_max_attempts: int = 3
    poll_interval_s: float = 0.5
    cancel_grace_s: float = 10.0
    remote_code_allow: list[str] = field(default_factory=list)
    check_memory: bool = True
    path_policy: PathPolicy | None = None
    """Roots a job's files must be under; None: no check (a library caller's own choice)."""


_METRIC_KEYS = (
    "step",
    "total_steps",
    "epoch",
    "loss",
    "eval_loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_s",
    "eta_s",
    "percent",
)


class JobManager:
    def __init__(
        self,
        store: st.JobStore,
        launcher: Launcher,
        settings: ManagerSettings,
        metrics: Any | None = None,
    ) -> None:
        self.store = store
        self.launcher = launcher
        self.settings = settings
        self.metrics = metrics
        self._lock = threading.RLock()
        """Serialises state transitions (the loop thread and RPC threads both make them)."""
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[str], None]] = []

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Recover what a previous process left, then drive jobs in a background thread."""
        self.recover()
        self._thread = threading.Thread(target=self._run, name="job-manager", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop driving jobs; running attempts keep running and are adopted by the next process."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # keep driving the other jobs
                log.exception("job manager tick failed")
            with self._changed:
                self._changed.wait(self.settings.poll_interval_s)

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def recover(self) -> None:
        """Settle jobs a previous service process left behind (after a crash or SIGKILL)."""
        for job in self.store.list_jobs([st.RUNNING], limit=10_000):
            if job.cancel_requested:  # died while cancelling: finish the cancel
                self._finish_cancel(job, job.reason or "cancelled")
                continue
            attempt = job.attempts[-1] if job.attempts else None
            if attempt is None or attempt.state != "running":
                # Between "running" and the attempt row: nothing was started. Queue it again.
                self.store.update_job(job.id, state=st.QUEUED)
                continue
            status = self.launcher.poll(attempt.handle)
            note = (
                "adopted after a service restart"
                if not status.finished
                else "settled after a service restart"
            )
            log.info("job %s attempt %d: %s (%s)", job.id, attempt.number, note, status.phase.value)
        self._update_gauges()

    # -- submit / read / cancel ----------------------------------------------------------------------

    def submit(self, request: st.JobRequest, idempotency_key: str = "", dry_run: bool = False) -> st.JobRow:
        """Validate and queue a job (or return the job an earlier submit with this key created)."""
        digest = request.sha256()
        if idempotency_key:
            if len(idempotency_key) > 128:
                raise ConfigError(
                    [FieldProblem("idempotency_key", idempotency_key, "at most 128 characters")]
                )
            existing = self.store.find_by_idempotency_key(idempotency_key)
            if existing is not None:
                if existing.request_sha256 != digest:
                    raise IdempotencyConflictError(
                        f"idempotency_key={idempotency_key!r} was already used for job {existing.id} with a "
                        "different spec; use a new key for a new job"
                    )
                return existing
        if self.settings.path_policy is not None:  # before anything opens a file the job names
            self.settings.path_policy.check(request.config, request.overrides)
        job_id = uuid.uuid4().hex[:12]
        job_dir = self.settings.state_dir / "jobs" / job_id
        run_dir = job_dir / "run"
        accepted = validate_submission(
            request,
            self.launcher.capacity,
            {"output.run_dir": str(run_dir), "output.adapters_root": str(self.settings.adapters_root)},
            self.settings.remote_code_allow,
            self.settings.check_memory,
        )
        estimate = accepted.estimate
        memory = (
            {
                "device_bytes_per_process": estimate.device_total_bytes,
                "host_bytes": estimate.host_total_bytes,
                "device": estimate.device,
                "summary": estimate.summary(),
            }
            if estimate
            else {}
        )
        max_attempts = (
            request.max_attempts if request.max_attempts is not None else self.settings.default_max_attempts
        )
        job = st.JobRow(
            id=job_id,
            request=request,
            request_sha256=digest,
            state=st.QUEUED,
            created_at=time.time(),
            idempotency_key=idempotency_key or None,
            run_dir=str(run_dir),
            launcher=self.launcher.name,
            max_attempts=max_attempts,
            memory_estimate=memory,
            progress={"total_steps": 0, "step": 0},
            config=accepted.config.to_dict(),
        )
        if dry_run:
            return job
        with self._lock:
            if self.store.count_jobs([st.QUEUED]) >= self.settings.max_queued:
                raise QueueFullError(
                    f"the queue is full ({self.settings.max_queued} jobs waiting); retry later"
                )
            job_dir.mkdir(parents=True, exist_ok=True)
            config_path = job_dir / "config.yaml"
            config_path.write_text(
                yaml.safe_dump(job.config, sort_keys=False, allow_unicode=True),
                encoding="utf-8",
            )
            try:
                self.store.insert_job(job)
            except Exception:
                # A concurrent submit with the same key won the race: return its job.
                if idempotency_key:
                    existing = self.store.find_by_idempotency_key(idempotency_key)
                    if existing is not None and existing.request_sha256 == digest:
                        return existing
                raise
            self._event(job.id, "state", {"state": st.QUEUED, "reason": "accepted", "attempt": 0})
            if self.metrics:
                self.metrics.job_submitted()
            self._update_gauges()
        self.wake()
        return job

    def get(self, job_id: str) -> st.JobRow:
        job = self.store.get_job(job_id) if job_id else None
        if job is None:
            raise JobNotFoundError(f"job_id={job_id!r}: no such job")
        return job

    def list_jobs(self, states: list[str], page_size: int, page_token: str) -> tuple[list[st.JobRow], str]:
        """One page of jobs in submission order, and the token of the next page ("" after the last)."""
        if page_size < 0:
            raise ConfigError([FieldProblem("page_size", page_size, "must be >= 0")])
        size = DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
        after = parse_page_token(page_token)
        rows = self.store.list_jobs(states, after_seq=after, limit=size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return rows, (str(rows[-1].queue_seq) if more and rows else "")

    def queue_position(self, job: st.JobRow) -> int:
        if job.state != st.QUEUED:
            return 0
        ahead = [j for j in self.store.list_jobs([st.QUEUED], limit=10_000) if j.queue_seq < job.queue_seq]
        return len(ahead) + 1

    def cancel(self, job_id: str, reason: str = "") -> st.JobRow:
        """Stop every process of the job; nothing is published. Blocks until they are gone."""
        reason = reason or "cancelled by request"
        with self._lock:
            job = self.get(job_id)
            if job.state in st.TERMINAL:
                raise JobStateError(f"job_id={job_id!r} has already ended ({job.state}); nothing to cancel")
            if job.state == st.QUEUED:
                self._set_state(job, st.CANCELLED, reason, finished=True)
                return self.get(job_id)
            self.store.update_job(job.id, cancel_requested=True, reason=reason)
        self._finish_cancel(self.get(job_id), reason)
        return self.get(job_id)

    def _finish_cancel(self, job: st.JobRow, reason: str) -> None:
        attempt = job.attempts[-1] if job.attempts else None
        if attempt is not None:
            self.launcher.cancel(attempt.handle, self.settings.cancel_grace_s)
        with self._lock:
            if attempt is not None:
                self._ingest(job, attempt)
                self.store.update_attempt(
                    job.id, attempt.number, state="cancelled", finished_at=time.time(), reason=reason
                )
            self._set_state(self.get(job.id), st.CANCELLED, reason, finished=True)

    # -- events -------------------------------------------------------------------------------------

    def events(self, job_id: str, after_seq: int = 0, kinds: tuple[str, ...] = ()) -> list[st.EventRow]:
        return self.store.events(job_id, after_seq, kinds)

    def wait_for_change(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)

    def follow(
        self,
        job_id: str,
        after_seq: int = 0,
        kinds: tuple[str, ...] = (),
        keep_going: Callable[[], bool] = lambda: True,
    ) -> Iterator[st.EventRow]:
        """The job's events after ``after_seq``, then new ones as they come, until the job has ended
        and its last event was yielded (or ``keep_going`` says stop: the watcher left).

        Raises:
            JobNotFoundError: before the first event, for an unknown job.
        """
        self.get(job_id)
        seq = after_seq
        while keep_going():
            events = self.events(job_id, seq, kinds)
            for e in events:
                seq = e.seq
                yield e
            # Ended, and everything up to the final state has been sent.
            terminal = not events and self.get(job_id).state in st.TERMINAL
            if terminal and not self.events(job_id, seq, kinds):
                return
            if not events:
                self.wait_for_change(0.5)

    def _event(self, job_id: str, kind: str, payload: dict[str, Any]) -> None:
        self._events(job_id, [(kind, payload)])

    def _events(self, job_id: str, events: list[tuple[str, dict[str, Any]]]) -> None:
        if events:
            self.store.append_events(job_id, events)
            with self._changed:
                self._changed.notify_all()

    # -- the loop -----------------------------------------------------------------------------------

    def tick(self) -> None:
        for job in self.store.list_jobs([st.RUNNING], limit=10_000):
            if job.cancel_requested or not job.attempts or job.unreadable:
                continue
            try:
                self._drive(job)
            except Exception:  # e.g. the Kubernetes API is briefly unreachable: try again next tick
                log.exception("job %s: could not read its attempt's status", job.id)
        self._start_queued()
        self._update_gauges()

    def _start_queued(self) -> None:
        with self._lock:
            running = self.store.count_jobs([st.RUNNING])
            free = self.settings.max_running - running
            if free <= 0:
                return
            for job in self.store.list_jobs([st.QUEUED], limit=free):
                if job.unreadable:
                    self._set_state(
                        job, st.FAILED, f"stored record unreadable: {job.unreadable}", finished=True
                    )
                    continue
                self._start_attempt(job, 1, f"started by the {self.launcher.name} launcher")

    def _request(self, job: st.JobRow, number: int) -> AttemptRequest:
        d = job.config["distributed"]
        r = job.request.resources
        resources = {k: v for k, v in (("cpu", r.cpu), ("memory", r.memory)) if v is not None}
        return AttemptRequest(
            job_id=job.id,
            attempt=number,
            config_path=Path(job.run_dir).parent / "config.yaml",
            attempt_dir=attempt_dir(Path(job.run_dir).parent / "config.yaml", number),
            nodes=int(d["nnodes"]),
            processes_per_node=int(d["nproc_per_node"]),
            gpus_per_node=r.gpus_per_node or 0,
            launcher=str(d["launcher"]),
            deepspeed=int(d["deepspeed_stage"]) >= 0,
            resources=resources,
        )

    def _start_attempt(self, job: st.JobRow, number: int, reason: str) -> None:
        """Record the transition first, then start: a crash in between re-queues (see ``recover``)."""
        now = time.time()
        if job.state != st.RUNNING:
            self.store.update_job(job.id, state=st.RUNNING, started_at=job.started_at or now)
            self._event(job.id, "state", {"state": st.RUNNING, "reason": reason, "attempt": number})
        try:
            handle = self.launcher.start(self._request(job, number))
        except Exception as e:  # the launcher could not start it at all
            log.exception("job %s: launcher failed to start attempt %d", job.id, number)
            self.store.add_attempt(
                st.AttemptRow(
                    job.id,
                    number,
                    "failed",
                    now,
                    time.time(),
                    None,
                    f"could not start: {e}",
                    launcher=self.launcher.name,
                )
            )
            self._set_state(
                self.get(job.id), st.FAILED, f"attempt {number} could not start: {e}", finished=True
            )
            return
        # Training records of earlier attempts were already turned into events: carry the offset on.
        offset = job.attempts[-1].records_offset if job.attempts else 0
        self.store.add_attempt(
            st.AttemptRow(
                job.id,
                number,
                "running",
                now,
                launcher=self.launcher.name,
                handle=handle,
                records_offset=offset,
            )
        )
        log.info("job %s: attempt %d started (%s)", job.id, number, self.launcher.name)

    def _drive(self, job: st.JobRow) -> None:
        attempt = job.attempts[-1]
        status = self.launcher.poll(attempt.handle)
        with self._lock:
            job = self.get(job.id)  # a cancel may have happened meanwhile
            if job.cancel_requested or job.state != st.RUNNING:
                return
            self._ingest(job, attempt)
            if not status.finished:
                return
            now = time.time()
            tail = self.launcher.log_tail(attempt.handle)
            if status.phase == AttemptPhase.SUCCEEDED:
                self.store.update_attempt(
                    job.id, attempt.number, state="succeeded", finished_at=now, exit_code=0
                )
                self._succeed(self.get(job.id))
                return
            reason = status.reason or status.phase.value
            self.store.update_attempt(
                job.id,
                attempt.number,
                state="failed",
                finished_at=now,
                exit_code=status.exit_code,
                reason=reason,
            )
            error_line = _error_line(tail)
            if status.exit_code == EXIT_INVALID:
                config_path = Path(job.run_dir).parent / "config.yaml"
                why = read_reason(attempt_dir(config_path, attempt.number)) or error_line or reason
                self._set_state(job, st.FAILED, f"invalid job: {why}", finished=True, tail=tail)
                return
            if attempt.number < job.max_attempts:
                if self.metrics:
                    self.metrics.attempt_retried()
                nxt = attempt.number + 1
                self._event(
                    job.id,
                    "state",
                    {
                        "state": st.RUNNING,
                        "attempt": nxt,
                        "reason": f"attempt {attempt.number} failed ({reason}); attempt {nxt} resumes from the "
                        "last checkpoint",
                    },
                )
                self._start_attempt(self.get(job.id), nxt, "retry")
                return
            self._set_state(
                job,
                st.FAILED,
                f"attempt {attempt.number} of {job.max_attempts} failed ({reason})"
                + (f": {error_line}" if error_line else ""),
                finished=True,
                tail=tail,
            )

    def _succeed(self, job: st.JobRow) -> None:
        run_dir = Path(job.run_dir)
        metrics: dict[str, float] = {}
        try:
            raw = json.loads((run_dir / "final_metrics.json").read_text(encoding="utf-8"))
            metrics = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float))}
        except (OSError, ValueError):
            pass
        ref = ""
        from lorafleet.runlog import read_records

        for rec in read_records(run_dir / "trainer_log.jsonl"):
            if rec.get("event") == "published":
                ref = f"{rec['name']}@{rec['version']}"
            elif rec.get("event") == "already_published" and rec.get("version"):
                ref = f"{job.config['output']['adapter_name']}@{rec['version']}"
        self.store.update_job(job.id, final_metrics=metrics, adapter_ref=ref)
        self._set_state(
            self.get(job.id), st.SUCCEEDED, f"published {ref}" if ref else "finished", finished=True
        )

    def _set_state(
        self, job: st.JobRow, state: str, reason: str, finished: bool = False, tail: str = ""
    ) -> None:
        now = time.time()
        fields: dict[str, Any] = {"state": state, "reason": reason}
        if finished:
            fields["finished_at"] = now
        if tail:
            fields["log_tail"] = tail
        self.store.update_job(job.id, **fields)
        attempt = job.attempts[-1].number if job.attempts else 0
        self._event(job.id, "state", {"state": state, "reason": reason, "attempt": attempt})
        if state in st.TERMINAL and self.metrics:
            started = job.started_at
            self.metrics.job_finished(state, (now - started) if started else None)
            self.metrics.drop_job(job.id)
        self._update_gauges()

    def _ingest(self, job: st.JobRow, attempt: st.AttemptRow) -> None:
        """Turn new training records and output lines of ``attempt`` into events (and progress)."""
        events: list[tuple[str, dict[str, Any]]] = []
        records_path = Path(job.run_dir) / "trainer_log.jsonl"
        new_records, records_offset = _read_new_lines(records_path, attempt.records_offset)
        progress = dict(job.progress)
        resumed = attempt.resumed_from_step
        for line in new_records:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "run_started" and rec.get("total_steps"):
                progress["total_steps"] = rec["total_steps"]
            if rec.get("event") == "resumed":
                resumed = int(rec.get("step", 0))
            if "event" in rec or "step" not in rec:
                continue
            payload = {k: rec[k] for k in _METRIC_KEYS if k in rec}
            payload["attempt"] = attempt.number
            payload["values"] = {
                k: float(v)
                for k, v in rec.items()
                if k not in _METRIC_KEYS and k != "time" and isinstance(v, (int, float))
            }
            events.append(("metrics", payload))
            progress.update({k: rec[k] for k in _METRIC_KEYS if k in rec})
            if self.metrics:
                self.metrics.update_progress(job.id, rec)
        new_lines, log_offset = _read_new_lines(
            Path(attempt.handle.get("attempt_dir", "")) / "output.log", attempt.log_offset
        )
        if new_lines:
            kept = self._log_budget(job.id)
            for text in new_lines[:kept]:
                events.append(("log", {"attempt": attempt.number, "text": text[-2000:]}))
        self._events(job.id, events)
        if records_offset != attempt.records_offset or log_offset != attempt.log_offset or resumed:
            self.store.update_attempt(
                job.id,
                attempt.number,
                records_offset=records_offset,
                log_offset=log_offset,
                resumed_from_step=resumed,
            )
            attempt.records_offset, attempt.log_offset = records_offset, log_offset
        if progress != job.progress:
            self.store.update_job(job.id, progress=progress)

    def _log_budget(self, job_id: str) -> int:
        used = len(self.store.events(job_id, kinds=("log",)))
        return max(0, _LOG_EVENT_LIMIT - used)

    def _update_gauges(self) -> None:
        if self.metrics:
            self.metrics.set_queue(self.store.count_jobs([st.QUEUED]))
            self.metrics.set_running(self.store.count_jobs([st.RUNNING]))


def parse_page_token(page_token: str) -> int:
    """The queue position a page token stands for (0 for the first page).

    Raises:
        ConfigError: naming ``page_token`` and a shortened value, for anything this server did not give.
    """
    if not page_token:
        return 0
    if not _PAGE_TOKEN_RE.fullmatch(page_token):
        raise ConfigError([FieldProblem("page_token", page_token, "not a token this server gave")])
    return int(page_token)


def _read_new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """Complete lines appended to ``path`` after byte ``offset`` (a partial last line waits)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    chunk = data[: end + 1]
    lines = [ln.rstrip("\r") for ln in chunk.decode("utf-8", errors="replace").split("\n")[:-1]]
    # tqdm-style carriage returns: keep the last state of each line.
    lines = [ln.rsplit("\r", 1)[-1] for ln in lines if ln.strip()]
    return lines, offset + len(chunk)


def _error_line(tail: str) -> str:
    """The recipe's ``error: ...`` line, or the last line of a traceback."""
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error: "):
            return ln[len("error: ") :]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln:
            return ln.strip()[:500]
    return ""


__all__ = ["JobManager", "ManagerSettings"]
