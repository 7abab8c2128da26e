"""Prometheus metrics of the trainer service.

:class:`TrainerMetrics` owns its own :class:`~prometheus_client.CollectorRegistry` rather than the
process-wide default one, because a test process builds several trainer services side by side (and
the default registry refuses a second metric of the same name). The gRPC server serves the registry
over HTTP with :meth:`TrainerMetrics.serve`; a real Prometheus scrapes it (tests/prom_utils.py).

Metric names (all linted by ``promtool check metrics`` in tests/test_trainer_metrics.py):

=====================================================  =========  =====================================
name                                                   type       labels
=====================================================  =========  =====================================
``lorafleet_trainer_jobs_submitted_total``             counter    -
``lorafleet_trainer_jobs_finished_total``              counter    ``state`` (succeeded/failed/cancelled)
``lorafleet_trainer_attempt_retries_total``            counter    -
``lorafleet_trainer_submissions_rejected_total``       counter    ``code`` (gRPC status code name)
``lorafleet_trainer_jobs_queued``                      gauge      -
``lorafleet_trainer_jobs_running``                     gauge      -
``lorafleet_trainer_job_duration_seconds``             histogram  ``state``
``lorafleet_trainer_job_loss``                         gauge      ``job_id``
``lorafleet_trainer_job_learning_rate``                gauge      ``job_id``
``lorafleet_trainer_job_tokens_per_second``            gauge      ``job_id``
``lorafleet_trainer_job_step``                         gauge      ``job_id``
``lorafleet_trainer_job_eta_seconds``                  gauge      ``job_id``
``lorafleet_trainer_job_rewards_chosen``               gauge      ``job_id``
``lorafleet_trainer_job_rewards_rejected``             gauge      ``job_id``
``lorafleet_trainer_job_reward_margin``                gauge      ``job_id``
``lorafleet_trainer_job_preference_accuracy``          gauge      ``job_id``
``lorafleet_trainer_job_logps_chosen``                 gauge      ``job_id``
``lorafleet_trainer_job_logps_rejected``               gauge      ``job_id``
=====================================================  =========  =====================================

The ``rewards_*``, ``reward_margin``, ``preference_accuracy`` and ``logps_*`` gauges follow a
preference job's records (TRL's ``rewards/chosen`` ... ``logps/rejected``, see
``lorafleet.preference``): the implicit rewards β·(log π - log π_ref) of the DPO variants and KTO,
the value head's scores for a reward model (``stage: rm``), whose ``preference_accuracy`` is its
pairwise accuracy. An SFT job never creates them; its loss is ``job_loss`` for every stage.

Counters also expose prometheus_client's ``*_created`` timestamps, which lets Prometheus tell a
counter reset (service restart) from a flat line.

Cardinality is bounded on purpose: ``state`` and ``code`` come from closed sets (anything else is
a caller bug and raises), and the ``job_id`` series exist only while a job runs: the job manager
calls :meth:`TrainerMetrics.drop_job` when the job ends, so finished jobs do not pile up as stale
series in every scrape.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from services.common.interceptor import GRPC_STATUS_CODES

__all__ = [
    "DURATION_BUCKETS_S",
    "FINAL_STATES",
    "GRPC_STATUS_CODES",
    "PREFERENCE_KEYS",
    "PROGRESS_KEYS",
    "TrainerMetrics",
]

log = logging.getLogger(__name__)

PREFIX: Final = "lorafleet_trainer_"

#: The final states of a job; pre-initialised so that each shows as 0 before the first job ends
#: (a rate() or an alert on a series that does not exist yet silently evaluates to nothing).
FINAL_STATES: Final = ("succeeded", "failed", "cancelled")


#: Job durations span a smoke test on the tiny model (seconds) to a long fine-tune (a day), so the
#: buckets grow roughly geometrically from 10 s to 24 h; the default buckets (5 ms .. 10 s) would
#: put every training job into +Inf.
DURATION_BUCKETS_S: Final = (
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    43200.0,
    86400.0,
)

#: Training-record key (lorafleet/runlog.py) -> short name of the per-job gauge it feeds.
PROGRESS_KEYS: Final = {
    "loss": "loss",
    "learning_rate": "learning_rate",
    "tokens_per_s": "tokens_per_second",
    "step": "step",
    "eta_s": "eta_seconds",
}

#: Preference record key (lorafleet/preference.py, TRL's names) -> (per-job gauge name, help).
PREFERENCE_KEYS: Final = {
    "rewards/chosen": (
        "rewards_chosen",
        "Mean reward of the chosen answers in a preference job's latest interval.",
    ),
    "rewards/rejected": (
        "rewards_rejected",
        "Mean reward of the rejected answers in a preference job's latest interval.",
    ),
    "rewards/margins": (
        "reward_margin",
        "Mean reward margin (chosen minus rejected) in a preference job's latest interval.",
    ),
    "rewards/accuracies": (
        "preference_accuracy",
        "Fraction of pairs whose chosen answer out-scored the rejected one in the latest interval "
        "(a reward model's pairwise accuracy).",
    ),
    "logps/chosen": (
        "logps_chosen",
        "Mean log-probability of the chosen answers under the policy in the latest interval.",
    ),
    "logps/rejected": (
        "logps_rejected",
        "Mean log-probability of the rejected answers under the policy in the latest interval.",
    ),
}


class TrainerMetrics:
    """The trainer service's metrics, in a registry of their own.

    Thread-safe: the gRPC handlers, the job manager's worker threads and the HTTP exporter may all
    touch it at once (prometheus_client metrics lock internally; the per-job bookkeeping here
    takes its own lock so that :meth:`update_progress` and :meth:`drop_job` do not interleave).

    Use as a context manager, or call :meth:`close`, to stop the HTTP exporter started by
    :meth:`serve`.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Create every metric in ``registry`` (a fresh one when None).

        Args:
            registry: where to register the metrics. Passing the same registry to two instances
                raises ``ValueError`` (duplicate timeseries): that is prometheus_client's guard
                against two owners of one metric name.
        """
        self.registry: CollectorRegistry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.jobs_submitted = Counter(
            PREFIX + "jobs_submitted", "Training jobs accepted by SubmitJob.", registry=r
        )
        self.jobs_finished = Counter(
            PREFIX + "jobs_finished",
            "Training jobs that reached a final state, by that state.",
            ["state"],
            registry=r,
        )
        self.attempt_retries = Counter(
            PREFIX + "attempt_retries",
            "Failed training attempts that were retried (a new attempt of the same job was started).",
            registry=r,
        )
        self.submissions_rejected = Counter(
            PREFIX + "submissions_rejected",
            "SubmitJob calls refused, by gRPC status code name.",
            ["code"],
            registry=r,
        )
        self.jobs_queued = Gauge(
            PREFIX + "jobs_queued", "Training jobs waiting in the queue for a slot.", registry=r
        )
        self.jobs_running = Gauge(PREFIX + "jobs_running", "Training jobs running now.", registry=r)
        self.job_duration = Histogram(
            PREFIX + "job_duration_seconds",
            "Wall-clock time from a job's start to its final state, by that state.",
            ["state"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self._job_gauges: dict[str, Gauge] = {
            key: Gauge(PREFIX + "job_" + short, help_text, ["job_id"], registry=r)
            for key, short, help_text in (
                ("loss", PROGRESS_KEYS["loss"], "Latest training loss of a running job."),
                ("learning_rate", PROGRESS_KEYS["learning_rate"], "Latest learning rate of a running job."),
                (
                    "tokens_per_s",
                    PROGRESS_KEYS["tokens_per_s"],
                    "Latest training throughput of a running job, in tokens per second.",
                ),
                ("step", PROGRESS_KEYS["step"], "Latest optimizer step of a running job."),
                (
                    "eta_s",
                    PROGRESS_KEYS["eta_s"],
                    "Estimated time until a running job finishes its steps, in seconds.",
                ),
                *((key, short, help_text) for key, (short, help_text) in PREFERENCE_KEYS.items()),
            )
        }
        for state in FINAL_STATES:
            self.jobs_finished.labels(state=state)
        self._lock = threading.Lock()
        self._jobs: set[str] = set()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # -- service-wide -------------------------------------------------------------------------

    def job_submitted(self) -> None:
        """Count one accepted submission."""
        self.jobs_submitted.inc()

    def submission_rejected(self, code: str) -> None:
        """Count one refused submission under its gRPC status code name.

        Args:
            code: ``grpc.StatusCode.X.name`` such as ``"INVALID_ARGUMENT"`` (case-insensitive).

        Raises:
            ValueError: ``code`` is not a gRPC status code name; an open label set would let a
                typo or a free-form message create unbounded series.
        """
        name = code.upper()
        if name not in GRPC_STATUS_CODES:
            raise ValueError(
                f"not a gRPC status code name: {code!r} (expected one of {sorted(GRPC_STATUS_CODES)})"
            )
        self.submissions_rejected.labels(code=name).inc()

    def job_finished(self, state: str, duration_s: float | None) -> None:
        """Count a job that reached ``state`` and record how long it ran.

        Args:
            state: one of :data:`FINAL_STATES`.
            duration_s: seconds from the job's start to its end, or None when it never started
                (cancelled while queued): such a job is counted but adds no duration sample, since
                a 0 would drag the duration quantiles down.

        Raises:
            ValueError: unknown state, or a negative/non-finite duration (a clock bug upstream).
        """
        if state not in FINAL_STATES:
            raise ValueError(f"unknown final state {state!r} (expected one of {FINAL_STATES})")
        if duration_s is not None and (not math.isfinite(duration_s) or duration_s < 0):
            raise ValueError(f"job duration must be a finite number >= 0, got {duration_s!r}")
        self.jobs_finished.labels(state=state).inc()
        if duration_s is not None:
            self.job_duration.labels(state=state).observe(duration_s)

    def attempt_retried(self) -> None:
        """Count one retry (a failed attempt followed by a new attempt of the same job)."""
        self.attempt_retries.inc()

    def set_queue(self, n: int) -> None:
        """Set the number of queued jobs (the job manager's view is the truth; no inc/dec drift)."""
        self.jobs_queued.set(_count(n, "queue length"))

    def set_running(self, n: int) -> None:
        """Set the number of running jobs."""
        self.jobs_running.set(_count(n, "running jobs"))

    # -- per job ------------------------------------------------------------------------------

    def update_progress(self, job_id: str, record: Mapping[str, Any]) -> None:
        """Feed one training record (a ``trainer_log.jsonl`` line) into the job's gauges.

        Keys used: ``step``, ``loss``, ``learning_rate``, ``tokens_per_s``, ``eta_s`` and, for a
        preference job, the keys of :data:`PREFERENCE_KEYS`. A missing or
        None key leaves that gauge as it was, because records are partial (an eval-only record has
        no ``loss``; the first record has no ``eta_s``). A key named in the record's ``nonfinite``
        list (runlog writes a diverged loss that way) sets the gauge to NaN, so a dashboard shows
        the divergence instead of the last finite value. Event lines simply match no key. A value
        that is not a number is logged and skipped: a malformed line from a training process must
        not take the service down.

        Call :meth:`drop_job` after the job's last record; a record that arrives after it would
        bring the job's series back.
        """
        if not job_id:
            raise ValueError("job_id must be a non-empty string")
        nonfinite = record.get("nonfinite") or ()
        with self._lock:
            for key, gauge in self._job_gauges.items():
                value = record.get(key)
                if value is None:
                    if key in nonfinite:
                        gauge.labels(job_id=job_id).set(math.nan)
                        self._jobs.add(job_id)
                    continue
                if isinstance(value, bool) or not isinstance(value, int | float):
                    log.warning("job %s: ignoring non-numeric %s=%r in a training record", job_id, key, value)
                    continue
                gauge.labels(job_id=job_id).set(float(value))
                self._jobs.add(job_id)

    def drop_job(self, job_id: str) -> None:
        """Remove every per-job series of ``job_id``; a no-op for a job without any.

        Why: a per-job series that outlives its job would be scraped forever and the number of
        series would grow with every job ever run. Prometheus marks the removed series stale at
        the next scrape, so the graphs end where the job ended.
        """
        with self._lock:
            for gauge in self._job_gauges.values():
                gauge.remove(job_id)
            self._jobs.discard(job_id)

    @property
    def tracked_jobs(self) -> frozenset[str]:
        """The job ids that currently have per-job series (for reconciling with the job table)."""
        with self._lock:
            return frozenset(self._jobs)

    # -- exposition ---------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format, exactly as a scrape of :meth:`serve` sees it."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[WSGIServer, threading.Thread]:
        """Start prometheus_client's HTTP exporter for this registry on ``host:port``.

        It answers ``GET /metrics`` (any path, in fact) from a daemon thread.

        Args:
            port: TCP port; 0 picks a free one (read it back from :attr:`port`, or from the
                returned server's ``server_port``).
            host: address to bind. Loopback by default: exposing the metrics beyond the pod is
                the deployment's choice (k8s sets ``0.0.0.0``), not a library default.

        Returns:
            ``(server, thread)`` as returned by ``prometheus_client.start_http_server`` in 0.26:
            the ``wsgiref`` server (``server.server_port`` is the bound port) and the thread that
            runs ``serve_forever``. :meth:`close` stops both; callers need not.

        Raises:
            RuntimeError: already serving (one exporter per instance keeps :meth:`close` simple).
            OSError: the port is taken.
        """
        with self._lock:
            if self._server is not None:
                raise RuntimeError(f"already serving metrics on port {self._server.server_port}")
            server, thread = start_http_server(port, addr=host, registry=self.registry)
            self._server, self._thread = server, thread
        log.info("trainer metrics on http://%s:%d/metrics", host, server.server_port)
        return server, thread

    @property
    def port(self) -> int | None:
        """The port :meth:`serve` bound (useful with port 0), or None when not serving."""
        server = self._server
        return None if server is None else int(server.server_port)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the HTTP exporter, if any, and release its port; safe to call more than once.

        Args:
            timeout: seconds to wait for the exporter thread to end.
        """
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()  # ends serve_forever(); returns once the loop has stopped
        server.server_close()  # closes the listening socket so the port is free again
        if thread is not None:
            thread.join(timeout)

    shutdown = close

    def __enter__(self) -> TrainerMetrics:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _count(n: int, what: str) -> int:
    """Check a gauge count: a negative one means the caller's bookkeeping is wrong, so say so."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{what} must be an int >= 0, got {n!r}")
    return n
