"""Issue #4 test 5: the inference service's /metrics, scraped by a real Prometheus and linted by
``promtool check metrics``, after real traffic (streams, unary calls, errors, adapter loads); and
issue #22's KV cache series: block usage, prefix-cache hits, preemptions."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
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

GATEWAY_GAUGES = frozenset(
    {
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
    }
)
VLLM_COUNTERS = frozenset({"vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"})
"""vLLM's prefix-cache counters, by the same names (over the pod, no labels)."""


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


def idle_scrape(srv: InferenceServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A scrape once the engine has reported its last iteration (a request's answer can come back a
    moment before the iteration that retired it reports the freed blocks)."""
    used = ("lorafleet_inference_kv_cache_blocks", (("model", "tiny"), ("state", "used")))
    deadline = time.monotonic() + 30
    while (got := scrape(srv))[used] and time.monotonic() < deadline:
        time.sleep(0.01)
    return got


def test_exposition_counts_the_traffic_and_passes_promtool(server: Any) -> None:
    srv, _ = server
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read()
    code, output = promtool_check_metrics(text)
    # The model-server protocol of the Gateway API Inference Extension needs vLLM's names, colons
    # included; promtool's style lint flags exactly those (exit 3 = lint problems, not parse errors).
    problems = [
        line
        for line in output.splitlines()
        if line.strip()
        and not (
            line.split(" ")[0] in GATEWAY_GAUGES | VLLM_COUNTERS
            and line.endswith("metric names should not contain ':'")
        )
    ]
    assert code in (0, 3) and not problems, output
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


# -- the Gateway API Inference Extension's gauges (vLLM's names) -------------------------------------


class ForwardGate:
    """Blocks the engine's model forwards until the test lets a given number through (or opens it),
    so the engine's state (who runs, who waits) holds still while Prometheus scrapes it."""

    def __init__(self, engine: Any) -> None:
        self._forward = engine._forward
        self._allowed = threading.Semaphore(0)
        self._open = threading.Event()
        self._lock = threading.Lock()
        self._passed = 0
        self.blocked = threading.Event()
        engine._forward = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._open.is_set():
            self.blocked.set()
            self._allowed.acquire()
            with self._lock:
                self.blocked.clear()
                self._passed += 1
        return self._forward(*args, **kwargs)

    def let_through(self, forwards: int) -> None:
        for _ in range(forwards):
            assert self.blocked.wait(30), "the engine never reached a forward"
            with self._lock:
                passed = self._passed
            self._allowed.release()
            # Counted, not watched on ``blocked``: the next forward may set it again at once.
            deadline = time.monotonic() + 30
            while self._passed == passed:
                assert time.monotonic() < deadline, "the engine never went past the gate"
                time.sleep(0.005)

    def open(self) -> None:
        self._open.set()
        self._allowed.release(1000)


def lora_info(prom: Any, predicate: Callable[[dict[str, str], float], bool]) -> tuple[dict[str, str], float]:
    result = prom.wait_for(
        "vllm:lora_requests_info",
        lambda r: len(r) == 1 and predicate(r[0]["metric"], float(r[0]["value"][1])),
        timeout=30,
    )
    assert result, "vllm:lora_requests_info never matched"
    return result[0]["metric"], float(result[0]["value"][1])


def gauge_is(prom: Any, name: str, value: float) -> None:
    assert prom.wait_for(name, lambda r: len(r) == 1 and float(r[0]["value"][1]) == value, timeout=30), (
        f"{name} never became {value}"
    )


def test_gateway_gauges_track_requests_as_they_queue_run_and_finish(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """One batch row, two adapter slots: a request for m0 runs while m1 and m2 wait. The engine is
    held between decode steps (its forwards gated), so the state holds while a real Prometheus
    scrapes; then it is let go and everything finishes."""
    src = tmp_path_factory.mktemp("gw-src")
    root = tmp_path_factory.mktemp("gw-adapters")
    for i in range(3):
        publish_adapter(
            root, f"m{i}", save_lora_adapter(tiny_llama, src / f"m{i}", rank=4, seed=i), tiny_llama
        )
    settings = settings_for(tiny_llama, root, metrics_port=0, max_batch_size=1, num_slots=2)
    with serving(settings) as srv, running_prometheus([f"127.0.0.1:{srv.metrics_port}"], tmp_path) as prom:
        channel, stub = stub_for(srv.port)
        engine = srv.plane.hosts["tiny"].engine
        assert engine is not None
        gauge_is(prom, "vllm:num_requests_running", 0)
        _, idle_at = lora_info(prom, lambda labels, _: labels["max_lora"] == "2")
        gate = ForwardGate(engine)
        results: dict[str, Any] = {}

        def stream(adapter: str) -> None:
            request = pb.GenerateRequest(adapter=adapter, prompt="hello", sampling=greedy(6))
            results[adapter] = collect(stub.GenerateStream(request, timeout=120))

        threads = [threading.Thread(target=stream, args=("m0",))]
        threads[0].start()
        assert gate.blocked.wait(30)  # m0 admitted, its prefill waits at the gate
        for adapter in ("m1", "m2"):
            threads.append(threading.Thread(target=stream, args=(adapter,)))
            threads[-1].start()
        deadline = time.monotonic() + 30
        while engine.stats()["waiting"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.let_through(2)  # m0's prefill and first decode: the iteration reports, the next one waits
        gauge_is(prom, "vllm:num_requests_running", 1)
        gauge_is(prom, "vllm:num_requests_waiting", 2)
        # m1 and m2 wait for the batch row, not for blocks: m0's blocks are a sliver of the budget.
        kv = engine.stats()["kv_cache"]
        assert kv["layout"] == "paged" and 0 < kv["blocks_used"] < kv["blocks"]
        gauge_is(prom, "vllm:kv_cache_usage_perc", kv["blocks_used"] / kv["blocks"])
        gauge_is(prom, 'lorafleet_inference_kv_cache_blocks{model="tiny",state="used"}', kv["blocks_used"])
        gauge_is(prom, 'lorafleet_inference_kv_cache_blocks{model="tiny",state="total"}', kv["blocks"])
        busy, busy_at = lora_info(prom, lambda labels, _: labels["waiting_lora_adapters"] == "m1,m2")
        assert busy == {
            "__name__": "vllm:lora_requests_info",
            "instance": f"127.0.0.1:{srv.metrics_port}",
            "job": busy["job"],
            "max_lora": "2",
            "running_lora_adapters": "m0",
            "waiting_lora_adapters": "m1,m2",
        }
        assert busy_at > idle_at
        slots = prom.wait_for("lorafleet_inference_slot_adapter_info", lambda r: len(r) == 1, timeout=30)
        assert slots[0]["metric"]["adapter"] == "m0@1"
        gate.open()
        for thread in threads:
            thread.join(120)
        assert all(len(results[a][1]) == 6 for a in ("m0", "m1", "m2"))  # each really ran to the end
        gauge_is(prom, "vllm:num_requests_running", 0)
        gauge_is(prom, "vllm:num_requests_waiting", 0)
        gauge_is(prom, "vllm:kv_cache_usage_perc", 0.0)
        done, done_at = lora_info(
            prom,
            # Prometheus drops labels whose value is empty: no adapter runs or waits.
            lambda labels, _: "running_lora_adapters" not in labels and "waiting_lora_adapters" not in labels,
        )
        assert done_at > busy_at and done["max_lora"] == "2"
        resident = prom.wait_for("lorafleet_inference_slot_adapter_info", lambda r: len(r) == 2, timeout=30)
        assert {r["metric"]["adapter"] for r in resident} == {"m1@1", "m2@1"}  # two slots, LRU kept the last
        channel.close()


# -- the KV cache: prefix reuse and preemptions ------------------------------------------------------

SYSTEM = (
    "You are a careful clinical assistant. Answer briefly, cite the guideline you rely on, and say "
    "when a question needs a doctor. Never guess a dose. "
)


def test_a_shared_prefix_on_one_adapter_hits_the_prefix_cache(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two requests for m0 sharing a prompt prefix of 32+ tokens: the second reuses its blocks, so
    the hit counters (ours per model, vLLM's over the pod) count tokens; the same prompt for m1 finds
    nothing (prefixes never cross adapters)."""
    src = tmp_path_factory.mktemp("px-src")
    root = tmp_path_factory.mktemp("px-adapters")
    for i in range(2):
        publish_adapter(
            root, f"m{i}", save_lora_adapter(tiny_llama, src / f"m{i}", rank=4, seed=i), tiny_llama
        )
    with serving(settings_for(tiny_llama, root, metrics_port=0, kv_block_size=8)) as srv:
        host = srv.plane.hosts["tiny"]
        shared = len(host.tokenizer.encode(SYSTEM))
        assert shared >= 32
        channel, stub = stub_for(srv.port)
        p = "lorafleet_inference_prefix_cache_"
        tiny = (("model", "tiny"),)
        before = scrape(srv)
        stub.Generate(
            pb.GenerateRequest(adapter="m0", prompt=SYSTEM + "What is a fever?", sampling=greedy(4))
        )
        first = scrape(srv)
        stub.Generate(pb.GenerateRequest(adapter="m0", prompt=SYSTEM + "And a cough?", sampling=greedy(4)))
        second = scrape(srv)
        hits = second[(p + "hits_total", tiny)] - first[(p + "hits_total", tiny)]
        assert hits >= shared - shared % 8 - 8  # whole blocks of the shared prefix, maybe one fewer
        assert hits > 0
        assert first[(p + "queries_total", tiny)] > before[(p + "queries_total", tiny)]
        assert second[(p + "queries_total", tiny)] >= second[(p + "hits_total", tiny)]
        assert second[("vllm:prefix_cache_hits_total", ())] == second[(p + "hits_total", tiny)]
        assert second[("vllm:prefix_cache_queries_total", ())] == second[(p + "queries_total", tiny)]
        assert host.engine is not None
        assert second[(p + "hits_total", tiny)] == host.engine.stats()["kv_cache"]["prefix_hit_tokens"]
        stub.Generate(pb.GenerateRequest(adapter="m1", prompt=SYSTEM + "And a cough?", sampling=greedy(4)))
        third = idle_scrape(srv)
        assert third[(p + "hits_total", tiny)] == second[(p + "hits_total", tiny)]  # another adapter
        assert third[(p + "queries_total", tiny)] > second[(p + "queries_total", tiny)]
        kv = host.engine.stats()["kv_cache"]
        assert third[("lorafleet_inference_kv_cache_blocks", (("model", "tiny"), ("state", "used")))] == 0
        assert (
            third[("lorafleet_inference_kv_cache_blocks", (("model", "tiny"), ("state", "total")))]
            == kv["blocks"]
        )
        assert third[("vllm:kv_cache_usage_perc", ())] == 0.0
        channel.close()


def test_a_tight_kv_budget_counts_preemptions_and_completes_everything(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A budget of one max_context sequence and six long requests: they outgrow it, rows are
    preempted (the counter says how many, as the engine does) and every request still completes."""
    from transformers import AutoConfig

    from services.inference.requests import GenerationRequest
    from services.inference.sampling import SamplingParams

    config = AutoConfig.from_pretrained(tiny_llama)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # fp32
    budget_mb = 1.01 * config.max_position_embeddings * per_token / 2**20
    root = tmp_path_factory.mktemp("pre-adapters")
    with serving(settings_for(tiny_llama, root, metrics_port=0, kv_cache_mb=budget_mb)) as srv:
        engine = srv.plane.hosts["tiny"].engine
        assert engine is not None
        kv = engine.stats()["kv_cache"]
        assert (
            kv["budget_bytes"] <= budget_mb * 2**20 and kv["blocks"] * kv["block_size"] >= engine.max_context
        )
        params = SamplingParams(max_new_tokens=250, ignore_eos=True)
        prompts = [[(7 * i + j) % 1000 + 3 for j in range(200)] for i in range(6)]
        handles = [engine.submit(GenerationRequest(p, params=params)) for p in prompts]
        assert all(len(h.result(300).token_ids) == 250 for h in handles)
        got = idle_scrape(srv)
        preempted = engine.stats()["preemptions"]
        assert preempted > 0
        assert got[("lorafleet_inference_preemptions_total", (("model", "tiny"),))] == preempted
        used = got[("lorafleet_inference_kv_cache_blocks", (("model", "tiny"), ("state", "used")))]
        assert used == 0 and got[("vllm:kv_cache_usage_perc", ())] == 0.0


def test_a_closed_engine_leaves_the_pod_totals(tiny_llama: Path, tmp_path: Path) -> None:
    """A base whose engine closes (a published model unloaded to make room) reports that it holds
    nothing: its blocks and slots leave the pod's sums, its counters keep their values."""
    from services.inference.metrics import InferenceMetrics
    from services.inference.plane import BaseModelHost
    from services.inference.settings import ModelSettings

    metrics = InferenceMetrics()
    settings = settings_for(tiny_llama, tmp_path, num_slots=3)
    hosts = [
        BaseModelHost(ModelSettings(name, str(tiny_llama)), settings, metrics.observer(name))
        for name in ("tiny", "full@1")
    ]

    def exposed() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out = {}
        for family in text_string_to_metric_families(metrics.exposition().decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def labels_of(name: str) -> dict[str, str]:
        families = text_string_to_metric_families(metrics.exposition().decode())
        [sample] = [s for f in families for s in f.samples if s.name == name]
        return dict(sample.labels)

    try:
        for host in hosts:
            host.load()
            assert host.state == "ready", host.reason
        blocks = "lorafleet_inference_kv_cache_blocks"
        full, tiny = (("model", "full@1"), ("state", "total")), (("model", "tiny"), ("state", "total"))
        deadline = time.monotonic() + 30
        while not exposed()[(blocks, full)] and time.monotonic() < deadline:
            time.sleep(0.01)  # the warm-up's iteration reports just after its token is out
        before = exposed()
        assert before[(blocks, full)] == before[(blocks, tiny)] > 0
        assert labels_of("vllm:lora_requests_info")["max_lora"] == "6"
        queries = before[("lorafleet_inference_prefix_cache_queries_total", (("model", "full@1"),))]
        assert queries > 0  # the warm-up's prompt
        hosts[1].close()
        after = exposed()
        assert after[(blocks, full)] == 0 and after[(blocks, tiny)] == before[(blocks, tiny)]
        assert labels_of("vllm:lora_requests_info")["max_lora"] == "3"
        assert after[("lorafleet_inference_prefix_cache_queries_total", (("model", "full@1"),))] == queries
        assert (
            after[("vllm:prefix_cache_queries_total", ())] == before[("vllm:prefix_cache_queries_total", ())]
        )
    finally:
        for host in hosts:
            host.close()
