"""Issue #4 test 5: the inference service's /metrics, scraped by a real Prometheus and linted by
``promtool check metrics``, after real traffic (streams, unary calls, errors, adapter loads)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from inference_service_utils import collect, greedy, publish_adapter, serving, settings_for, stub_for
from inference_utils import save_lora_adapter
from prom_utils import promtool_check_metrics, running_prometheus
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.v1 import inference_pb2 as pb
from services.inference.server import InferenceServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[InferenceServer, Any]]:
    src = tmp_path_factory.mktemp("src")
    root = tmp_path_factory.mktemp("adapters")
    for i in range(3):
        publish_adapter(
            root, f"m{i}", save_lora_adapter(tiny_llama, src / f"m{i}", rank=4, seed=i), tiny_llama
        )
    with serving(settings_for(tiny_llama, root, metrics_port=0, adapter_capacity=2)) as srv:
        channel, stub = stub_for(srv.port)
        for i in range(3):
            collect(
                stub.GenerateStream(pb.GenerateRequest(adapter=f"m{i}", prompt="hello", sampling=greedy(6)))
            )
            stub.Chat(
                pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")], sampling=greedy(4))
            )
        with pytest.raises(grpc.RpcError):
            stub.Generate(pb.GenerateRequest(adapter="missing", prompt="x"))
        with pytest.raises(grpc.RpcError):
            stub.Generate(pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=2.0)))
        yield srv, stub
        channel.close()


def scrape(srv: InferenceServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_exposition_counts_the_traffic_and_passes_promtool(server: Any) -> None:
    srv, _ = server
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read()
    code, output = promtool_check_metrics(text)
    assert code == 0, output
    got = scrape(srv)
    p = "lorafleet_inference_"
    assert got[(p + "requests_total", (("code", "OK"), ("method", "GenerateStream")))] == 3
    assert got[(p + "requests_total", (("code", "OK"), ("method", "Chat")))] == 3
    assert got[(p + "requests_total", (("code", "NOT_FOUND"), ("method", "Generate")))] == 1
    assert got[(p + "requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Generate")))] == 1
    tiny = (("model", "tiny"),)
    assert got[(p + "time_to_first_token_seconds_count", tiny)] >= 6
    assert got[(p + "inter_token_latency_seconds_count", tiny)] >= 3 * 5
    assert got[(p + "e2e_request_latency_seconds_count", tiny)] >= 6
    assert got[(p + "generated_tokens_total", tiny)] >= 3 * 6
    assert got[(p + "batch_size_count", tiny)] > 0
    assert got[(p + "adapter_loads_total", tiny)] == 3
    assert got[(p + "adapter_evictions_total", tiny)] == 1  # capacity 2, three adapters
    assert got[(p + "adapter_load_seconds_count", tiny)] == 3
    assert got[(p + "resident_adapters", tiny)] == 2
    assert got[(p + "model_ready", tiny)] == 1
    assert got[(p + "queue_length", tiny)] == 0
    assert got[(p + "running_requests", tiny)] == 0


def test_a_real_prometheus_scrapes_counters_and_histograms(server: Any, tmp_path: Path) -> None:
    srv, stub = server
    with running_prometheus([f"127.0.0.1:{srv.metrics_port}"], tmp_path) as prom:
        prom.wait_for(
            'lorafleet_inference_requests_total{method="GenerateStream",code="OK"}',
            lambda r: len(r) == 1 and float(r[0]["value"][1]) == 3,
            timeout=30,
        )
        stub.Generate(pb.GenerateRequest(adapter="m0", prompt="again", sampling=greedy(5)))
        prom.wait_for(
            'lorafleet_inference_requests_total{method="Generate",code="OK"}',
            lambda r: len(r) == 1 and float(r[0]["value"][1]) == 1,
            timeout=30,
        )
        buckets = prom.wait_for(
            'lorafleet_inference_time_to_first_token_seconds_bucket{model="tiny",le="+Inf"}',
            lambda r: len(r) == 1 and float(r[0]["value"][1]) >= 7,
            timeout=30,
        )
        assert buckets
        quantile = prom.wait_for(
            "histogram_quantile(0.5, sum by (le) (lorafleet_inference_e2e_request_latency_seconds_bucket))",
            lambda r: len(r) == 1 and 0 < float(r[0]["value"][1]) < 60,
            timeout=30,
        )
        assert quantile
        for query, check in (
            ('lorafleet_inference_generated_tokens_total{model="tiny"}', lambda v: v >= 3 * 6 + 5),
            ('lorafleet_inference_batch_size_count{model="tiny"}', lambda v: v > 0),
            ('lorafleet_inference_inter_token_latency_seconds_count{model="tiny"}', lambda v: v >= 3 * 5),
            ('lorafleet_inference_resident_adapters{model="tiny"}', lambda v: v == 2),
            ('lorafleet_inference_adapter_loads_total{model="tiny"}', lambda v: v >= 3),
            ('lorafleet_inference_adapter_evictions_total{model="tiny"}', lambda v: v >= 1),
            ('lorafleet_inference_requests_total{method="Generate",code="NOT_FOUND"}', lambda v: v == 1),
        ):
            assert prom.wait_for(
                query, lambda r, c=check: len(r) == 1 and c(float(r[0]["value"][1])), timeout=30
            ), query
