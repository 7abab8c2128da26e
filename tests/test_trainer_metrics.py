"""The trainer service's Prometheus metrics: names that promtool accepts, bounded per-job series,
and a real Prometheus scraping the exporter."""

from __future__ import annotations

import math
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from services.trainer.metrics import FINAL_STATES, TrainerMetrics
from tests.prom_utils import promtool_check_metrics, running_prometheus

PER_JOB = (
    "lorafleet_trainer_job_loss",
    "lorafleet_trainer_job_learning_rate",
    "lorafleet_trainer_job_tokens_per_second",
    "lorafleet_trainer_job_step",
    "lorafleet_trainer_job_eta_seconds",
)

FULL_RECORD = {"step": 12, "loss": 1.75, "learning_rate": 2e-4, "tokens_per_s": 1234.5, "eta_s": 90.0}


def samples(metrics: TrainerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, keyed by (name, sorted labels): parsed, not grepped."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def job_series(metrics: TrainerMetrics, job_id: str) -> dict[str, float]:
    """The per-job samples of ``job_id``, by metric name."""
    return {name: v for (name, labels), v in samples(metrics).items() if ("job_id", job_id) in labels}


def populated() -> TrainerMetrics:
    """A TrainerMetrics with every metric holding at least one sample."""
    m = TrainerMetrics()
    m.job_submitted()
    m.job_submitted()
    m.submission_rejected("INVALID_ARGUMENT")
    m.submission_rejected("resource_exhausted")
    m.job_finished("succeeded", 125.0)
    m.job_finished("failed", 3.5)
    m.job_finished("cancelled", None)
    m.attempt_retried()
    m.set_queue(3)
    m.set_running(1)
    m.update_progress("job-a", FULL_RECORD)
    return m


def test_promtool_accepts_every_metric() -> None:
    m = populated()
    text = m.exposition()
    got = samples(m)
    # Populated for real, so promtool lints every family, including a per-job one.
    assert got[("lorafleet_trainer_jobs_submitted_total", ())] == 2
    assert got[("lorafleet_trainer_submissions_rejected_total", (("code", "RESOURCE_EXHAUSTED"),))] == 1
    assert got[("lorafleet_trainer_attempt_retries_total", ())] == 1
    assert got[("lorafleet_trainer_jobs_queued", ())] == 3
    assert got[("lorafleet_trainer_jobs_running", ())] == 1
    assert got[("lorafleet_trainer_job_duration_seconds_count", (("state", "succeeded"),))] == 1
    assert got[("lorafleet_trainer_job_duration_seconds_sum", (("state", "failed"),))] == 3.5
    # The cancelled-while-queued job is counted but adds no duration sample.
    assert ("lorafleet_trainer_job_duration_seconds_count", (("state", "cancelled"),)) not in got
    assert job_series(m, "job-a") == {
        "lorafleet_trainer_job_step": 12,
        "lorafleet_trainer_job_loss": 1.75,
        "lorafleet_trainer_job_learning_rate": 2e-4,
        "lorafleet_trainer_job_tokens_per_second": 1234.5,
        "lorafleet_trainer_job_eta_seconds": 90.0,
    }
    code, output = promtool_check_metrics(text)
    assert (code, output) == (0, ""), output


def test_promtool_check_catches_bad_names() -> None:
    """The lint is not a rubber stamp: the helper reports what promtool flags."""
    bad = b"# HELP adapter_size_mb Size.\n# TYPE adapter_size_mb gauge\nadapter_size_mb 3\n"
    code, output = promtool_check_metrics(bad)
    assert code != 0
    assert "adapter_size_mb" in output


def test_duration_buckets_span_training_jobs() -> None:
    m = TrainerMetrics()
    m.job_finished("succeeded", 20 * 3600.0)
    got = samples(m)
    le = {dict(labels)["le"] for (name, labels) in got if name.endswith("_bucket")}
    assert {"10.0", "86400.0", "+Inf"} <= le
    bucket = "lorafleet_trainer_job_duration_seconds_bucket"
    assert got[(bucket, (("le", "43200.0"), ("state", "succeeded")))] == 0
    assert got[(bucket, (("le", "86400.0"), ("state", "succeeded")))] == 1


def test_drop_job_removes_only_that_job() -> None:
    m = TrainerMetrics()
    m.update_progress("job-a", FULL_RECORD)
    m.update_progress("job-b", {**FULL_RECORD, "loss": 0.5})
    assert set(job_series(m, "job-a")) == set(PER_JOB)
    assert m.tracked_jobs == {"job-a", "job-b"}

    m.drop_job("job-a")

    assert job_series(m, "job-a") == {}
    assert b'job_id="job-a"' not in m.exposition()
    assert job_series(m, "job-b")["lorafleet_trainer_job_loss"] == 0.5
    assert set(job_series(m, "job-b")) == set(PER_JOB)
    assert m.tracked_jobs == {"job-b"}
    m.drop_job("job-a")  # again, and for a job that never reported: no error
    m.drop_job("never-ran")
    assert set(job_series(m, "job-b")) == set(PER_JOB)


def test_update_progress_partial_records() -> None:
    m = TrainerMetrics()
    m.update_progress("j", {"step": 1, "loss": 2.0, "learning_rate": 1e-3})
    # An eval record, an event line and a partial record: missing keys keep their gauges.
    m.update_progress("j", {"step": 2, "eval_loss": 1.9})
    m.update_progress("j", {"event": "checkpoint_saved", "time": 1.0})
    m.update_progress("j", {"step": 3, "loss": None, "tokens_per_s": 100.0, "learning_rate": "oops"})
    assert job_series(m, "j") == {
        "lorafleet_trainer_job_step": 3,
        "lorafleet_trainer_job_loss": 2.0,
        "lorafleet_trainer_job_learning_rate": 1e-3,
        "lorafleet_trainer_job_tokens_per_second": 100.0,
    }
    # runlog leaves a diverged loss out and names it under "nonfinite": shown as NaN.
    m.update_progress("j", {"step": 4, "nonfinite": ["loss"]})
    assert math.isnan(job_series(m, "j")["lorafleet_trainer_job_loss"])
    # An event line alone creates no series for a job.
    m.update_progress("k", {"event": "run_started"})
    assert job_series(m, "k") == {}
    assert m.tracked_jobs == {"j"}


def test_finished_counters_start_at_zero() -> None:
    got = samples(TrainerMetrics())
    for state in FINAL_STATES:
        assert got[("lorafleet_trainer_jobs_finished_total", (("state", state),))] == 0
    assert set(FINAL_STATES) == {"succeeded", "failed", "cancelled"}
    assert got[("lorafleet_trainer_jobs_submitted_total", ())] == 0


def test_job_finished_counts_by_state() -> None:
    m = TrainerMetrics()
    m.job_finished("failed", 1.0)
    m.job_finished("failed", 2.0)
    got = samples(m)
    assert got[("lorafleet_trainer_jobs_finished_total", (("state", "failed"),))] == 2
    assert got[("lorafleet_trainer_jobs_finished_total", (("state", "succeeded"),))] == 0


def test_closed_label_sets_and_counts_are_validated() -> None:
    m = TrainerMetrics()
    with pytest.raises(ValueError, match="final state"):
        m.job_finished("done", 1.0)
    with pytest.raises(ValueError, match="duration"):
        m.job_finished("succeeded", -1.0)
    with pytest.raises(ValueError, match="gRPC status code"):
        m.submission_rejected("bad request: missing base model")
    with pytest.raises(ValueError):
        m.set_queue(-1)
    with pytest.raises(ValueError):
        m.set_running(-1)
    with pytest.raises(ValueError):
        m.update_progress("", FULL_RECORD)
    got = samples(m)
    assert all(v == 0 for (name, _), v in got.items() if name == "lorafleet_trainer_jobs_finished_total")
    assert not any(name == "lorafleet_trainer_submissions_rejected_total" for name, _ in got)


def test_instances_coexist_with_own_registries() -> None:
    a, b = TrainerMetrics(), TrainerMetrics()
    a.job_submitted()
    assert samples(a)[("lorafleet_trainer_jobs_submitted_total", ())] == 1
    assert samples(b)[("lorafleet_trainer_jobs_submitted_total", ())] == 0
    registry = CollectorRegistry()
    c = TrainerMetrics(registry)
    assert c.registry is registry
    with pytest.raises(ValueError, match="Duplicated"):
        TrainerMetrics(registry)


def test_serve_on_port_zero_and_close() -> None:
    with TrainerMetrics() as m:
        server, thread = m.serve(0)
        port = server.server_port
        assert port > 0 and m.port == port and thread.is_alive()
        m.job_submitted()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read()
        assert b"lorafleet_trainer_jobs_submitted_total 1.0" in body
        with pytest.raises(RuntimeError, match="already serving"):
            m.serve(0)
    assert m.port is None
    thread.join(5)
    assert not thread.is_alive()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    m.close()  # idempotent


@pytest.mark.integration
def test_real_prometheus_scrapes_submissions(tmp_path: Path) -> None:
    query = 'lorafleet_trainer_jobs_submitted_total{job="lorafleet"}'
    with TrainerMetrics() as m:
        server, _ = m.serve(0)
        with running_prometheus([f"127.0.0.1:{server.server_port}"], tmp_path) as prom:
            start = time.monotonic()
            first = prom.wait_for(query, lambda r: len(r) == 1, timeout=30)
            assert float(first[0]["value"][1]) == 0
            first_s = time.monotonic() - start
            m.job_submitted()
            m.job_submitted()
            prom.wait_for(query, lambda r: len(r) == 1 and float(r[0]["value"][1]) == 2, timeout=30)
            two_s = time.monotonic() - start
            # A per-job series shows up as well (the label survives the scrape unchanged).
            m.update_progress("job-a", FULL_RECORD)
            loss = prom.wait_for('lorafleet_trainer_job_loss{job_id="job-a"}', lambda r: len(r) == 1)
            assert float(loss[0]["value"][1]) == 1.75
            print(f"real Prometheus: first sample after {first_s:.1f} s, 2 after {two_s:.1f} s")
