"""A training run's own /metrics (services/trainer/run_metrics.py), the endpoint the training pods
expose for the PodMonitor: gauges follow the run's records, names pass promtool, a real run serves
them, and a bad port or a failing listener never stops training."""

from __future__ import annotations

import re
import urllib.request

import pytest

from lorafleet.runlog import RunRecorder, read_records
from services.trainer import run_metrics
from services.trainer.run_metrics import PORT_ENV, RunMetrics


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def value(text: str, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in the exposition"
    return float(found.group(1))


def test_gauges_follow_records_and_pass_promtool() -> None:
    from prom_utils import promtool_check_metrics

    metrics = RunMetrics("run-1", "lora", node_rank=0, main=True)
    port = metrics.serve(0, host="127.0.0.1")
    metrics.observe(
        {
            "step": 5,
            "total_steps": 40,
            "loss": 2.5,
            "learning_rate": 1e-3,
            "tokens_per_s": 900.0,
            "tokens": 4000,
            "eta_s": 70.0,
            "peak_memory_bytes": 123456789,
        }
    )
    metrics.observe(
        {"step": 10, "total_steps": 40, "loss": 1.25, "eval_loss": 1.5}
    )  # missing fields keep theirs
    text = scrape(port)
    assert value(text, "lorafleet_training_step") == 10
    assert value(text, "lorafleet_training_loss") == 1.25
    assert value(text, "lorafleet_training_eval_loss") == 1.5
    assert value(text, "lorafleet_training_tokens_per_second") == 900.0
    assert value(text, "lorafleet_training_eta_seconds") == 70.0
    assert 'lorafleet_training_info{main="true",method="lora",node_rank="0",run_id="run-1"} 1.0' in text
    code, output = promtool_check_metrics(text.encode())
    assert code == 0, output


def test_other_nodes_serve_only_the_info_series() -> None:
    metrics = RunMetrics("run-1", "lora", node_rank=1, main=False)
    port = metrics.serve(0, host="127.0.0.1")
    metrics.observe({"step": 3, "loss": 2.0})  # a non-main process has no gauges to move
    text = scrape(port)
    assert 'node_rank="1"' in text and "lorafleet_training_loss" not in text


@pytest.mark.parametrize("raw", ["not-a-port", "70000"])
def test_a_bad_port_is_logged_and_training_goes_on(monkeypatch, raw: str, caplog) -> None:
    monkeypatch.setenv(PORT_ENV, raw)
    assert run_metrics.start_from_env("run-1", "lora", 0, True) is None
    assert PORT_ENV in caplog.text


def test_unset_port_starts_nothing(monkeypatch) -> None:
    monkeypatch.delenv(PORT_ENV, raising=False)
    assert run_metrics.start_from_env("run-1", "lora", 0, True) is None


def test_a_failing_listener_is_dropped_and_records_go_on(tmp_path, capsys) -> None:
    seen: list[int] = []

    def broken(record: dict) -> None:
        raise RuntimeError("exporter down")

    recorder = RunRecorder(tmp_path, 10, progress=False)
    recorder.add_listener(broken)
    recorder.add_listener(lambda r: seen.append(r["step"]))
    recorder.log({"step": 1, "loss": 3.0})
    recorder.log({"step": 2, "loss": 2.0})
    recorder.close()
    assert seen == [1, 2]
    assert [r["step"] for r in recorder.records()] == [1, 2]
    assert "exporter down" in capsys.readouterr().err


@pytest.mark.integration
def test_a_real_run_serves_its_metrics(tmp_path, tiny_llama, bundled_data, monkeypatch, capsys) -> None:
    from services.trainer.recipe import run_training
    from tests.training_utils import training_config

    monkeypatch.setenv(PORT_ENV, "0")  # any free port; the run prints the one it bound
    config = training_config(tmp_path, tiny_llama, bundled_data, train={"max_steps": 6, "logging_steps": 2})
    result = run_training(config, progress=False)
    found = re.search(r"training metrics on http://0\.0\.0\.0:(\d+)/metrics", capsys.readouterr().out)
    assert found, "the run did not start its metrics endpoint"
    text = scrape(int(found.group(1)))
    assert value(text, "lorafleet_training_step") == 6
    assert value(text, "lorafleet_training_total_steps") == 6
    logged = [
        r for r in read_records(result.run_dir / "trainer_log.jsonl") if "loss" in r and "event" not in r
    ]
    assert value(text, "lorafleet_training_loss") == pytest.approx(logged[-1]["loss"])  # the last record's
    assert 'main="true",method="lora",node_rank="0"' in text
