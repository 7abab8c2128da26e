"""The dashboard's replicas view under Streamlit's ``AppTest``: it scrapes each inference replica's
real ``/metrics`` exporter (``InferenceMetrics.serve``, fed through the engine observer hooks as an
engine feeds them) and shows, per replica, the adapters in its slots, those running and waiting, its
queue and its KV-cache use; an unreachable replica is reported without hiding the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from dashboard_utils import PAGES, dead_address, errors, no_exception, open_page, table
from prometheus_client import CollectorRegistry, start_http_server

from services.dashboard.replicas import metrics_urls, scrape_replica
from services.inference.metrics import InferenceMetrics

PAGES.setdefault("replicas", "pages/replicas.py")


@pytest.fixture
def replicas() -> Iterator[list[str]]:
    """Two exporters: one busy with adapters a and b (c waiting), one idle holding d in a slot."""
    busy, idle = InferenceMetrics(), InferenceMetrics()
    hooks = busy.observer("tiny")
    hooks.on_capacity(4, 2)
    hooks.on_queue(1, 3)
    hooks.on_adapters(("a@1#0f0f", "b@2#abab"), ("c@1#cdcd",), ("a@1#0f0f", "b@2#abab"))
    hooks.on_kv_cache(48, 64, 300, 120)  # KV blocks used of the budget; prefix tokens looked up, hit
    quiet = idle.observer("tiny")
    quiet.on_capacity(8, 4)
    quiet.on_queue(0, 0)
    quiet.on_adapters((), (), ("d@3#1234",))
    quiet.on_kv_cache(0, 128, 0, 0)
    ports = [m.serve(0) for m in (busy, idle)]
    yield [f"http://127.0.0.1:{port}/metrics" for port in ports]
    busy.close()
    idle.close()


def test_scrape_reads_what_the_picker_reads(replicas: list[str]) -> None:
    busy, idle = (scrape_replica(url) for url in replicas)
    assert (busy.error, busy.max_lora, busy.running, busy.waiting) == ("", 2, 3, 1)
    assert busy.kv_cache_usage == pytest.approx(48 / 64)
    assert (busy.running_adapters, busy.waiting_adapters, busy.slot_adapters) == (
        ["a", "b"],
        ["c"],
        ["a@1", "b@2"],
    )
    assert (idle.running_adapters, idle.waiting_adapters, idle.slot_adapters, idle.max_lora) == (
        [],
        [],
        ["d@3"],
        4,
    )
    assert "Error" in scrape_replica(f"http://{dead_address()}/metrics", timeout_s=2).error
    assert "not an http" in scrape_replica("file:///etc/passwd").error
    other = CollectorRegistry()  # a /metrics that is not an inference server's
    server, thread = start_http_server(0, addr="127.0.0.1", registry=other)
    try:
        assert "not a lorafleet" in scrape_replica(f"http://127.0.0.1:{server.server_port}/metrics").error
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert metrics_urls(" http://a/metrics, ,http://b/metrics ") == ["http://a/metrics", "http://b/metrics"]


def test_replicas_page_shows_each_replica(monkeypatch: Any, replicas: list[str]) -> None:
    dead = f"http://{dead_address()}/metrics"
    env = {
        "LORAFLEET_INFERENCE_METRICS": ",".join([*replicas, dead]),
        "LORAFLEET_TRAINER_ADDR": dead_address(),
        "LORAFLEET_INFERENCE_ADDR": dead_address(),
        "LORAFLEET_DASHBOARD_METRICS_PORT": "-1",
    }
    at = open_page(monkeypatch, env, "replicas")
    no_exception(at)
    df = table(at, "replicas.table")
    assert list(df["replica"]) == [*replicas, dead]
    assert list(df["resident adapters"])[:2] == ["a@1, b@2", "d@3"]
    assert list(df["running"])[:2] == ["a, b", ""] and list(df["waiting"])[:2] == ["c", ""]
    assert list(df["slots"])[:2] == [2, 4] and list(df["requests waiting"])[:2] == [1, 0]
    assert list(df["KV cache"])[:2] == ["75%", "0%"]
    assert df["error"][2] and not df["error"][0] and not df["error"][1]
    assert any(dead in w.value for w in at.warning)
    assert errors(at) == []


def test_replicas_page_without_replicas_says_how_to_configure(monkeypatch: Any) -> None:
    env = {
        "LORAFLEET_INFERENCE_METRICS": "",
        "LORAFLEET_TRAINER_ADDR": dead_address(),
        "LORAFLEET_INFERENCE_ADDR": dead_address(),
        "LORAFLEET_DASHBOARD_METRICS_PORT": "-1",
    }
    at = open_page(monkeypatch, env, "replicas")
    no_exception(at)
    assert any("--inference-metrics" in i.value for i in at.info)
