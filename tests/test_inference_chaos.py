"""Chaos on a server in its own process (issue 16), bounded to ``DURATION_S`` seconds:

- four clients stream without pause, from the base model and from three adapters; the base and
  the two stable adapters must get, every time, the tokens they got before the chaos began;
- one client sends the hostile table of ``test_inference_hostile.py`` over and over, and each
  request must get its own code;
- one client publishes new versions of a fourth adapter (which a streaming client follows by name)
  and loads and unloads every adapter, the stable ones included.

Every well-formed request succeeds, every hostile one gets its code, and the server's RSS after the
chaos is within ``RSS_GROWTH`` of its RSS after a warm-up round of the same traffic. The figures are
printed (``pytest -s``) for the README's reliability section.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from inference_service_utils import InferenceProcess, collect, greedy, publish_adapter
from inference_utils import save_lora_adapter
from test_inference_hostile import CAP, CASES, MAX_PROMPT_CHARS, OK

from lorafleet.v1 import inference_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DURATION_S = 30.0
RSS_GROWTH = 0.20
STABLE = ("alpha", "beta")


def _hostile_round(stub: Any, codes: Counter[str], problems: list[str]) -> None:
    for case_id, _, rpc, request, code, _ in CASES:
        try:
            result = getattr(stub, rpc)(request, timeout=60)
            if rpc.endswith("Stream"):
                collect(result)
            got = OK
        except grpc.RpcError as e:
            got = e.code()
        codes[got.name] += 1
        if got != code:
            problems.append(f"hostile {case_id}: {got.name}, expected {code.name}")


def test_streams_survive_hostile_requests_and_adapter_churn(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    src = tmp_path_factory.mktemp("src")
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate((*STABLE, "churn")):
        publish_adapter(root, name, save_lora_adapter(tiny_llama, src / name, rank=8, seed=i), tiny_llama)
    churn_sources = [save_lora_adapter(tiny_llama, src / f"churn{k}", rank=4, seed=10 + k) for k in range(3)]
    server = InferenceProcess(
        [
            "--model",
            f"tiny={tiny_llama}",
            "--adapters-root",
            str(root),
            "--max-new-tokens-cap",
            str(CAP),
            "--max-prompt-chars",
            str(MAX_PROMPT_CHARS),
            "--scan-interval-s",
            "0.2",
            "--max-rank",
            "16",
            "--adapter-capacity",
            "4",
            "--num-slots",
            "4",
        ],
        tmp_path_factory.mktemp("logs"),
    ).start()
    try:
        assert server.proc is not None
        process = psutil.Process(server.proc.pid)
        stub: Any = server.stub
        victims = {
            "": pb.GenerateRequest(prompt="the quick brown fox", sampling=greedy(12)),
            "alpha": pb.GenerateRequest(adapter="alpha", prompt="hello there", sampling=greedy(12)),
            "beta": pb.GenerateRequest(
                adapter="beta",
                prompt="once upon",
                sampling=pb.SamplingParams(max_new_tokens=12, temperature=0.9, seed=7),
            ),
        }
        expected = {k: collect(stub.GenerateStream(v, timeout=60))[1] for k, v in victims.items()}
        following = pb.GenerateRequest(adapter="churn", prompt="patient reports", sampling=greedy(8))

        problems: list[str] = []
        codes: Counter[str] = Counter()
        served: Counter[str] = Counter()
        stop = threading.Event()

        def forever(what: str, step: Callable[[], None]) -> None:
            while not stop.is_set():
                try:
                    step()
                except BaseException as e:
                    problems.append(f"{what}: {e!r}"[:500])
                    return

        def victim(key: str) -> None:
            _, ids, usage = collect(stub.GenerateStream(victims[key], timeout=60))
            assert usage is not None and ids == expected[key], (key, ids, expected[key])
            served[key or "base"] += 1

        def follower() -> None:
            _, ids, usage = collect(stub.GenerateStream(following, timeout=60))
            assert usage is not None and usage.adapter.startswith("churn@") and ids, usage
            served["churn"] += 1

        churn_state = {"k": 0}

        def churn() -> None:
            k = churn_state["k"]
            churn_state["k"] += 1
            publish_adapter(root, "churn", churn_sources[k % len(churn_sources)], tiny_llama)
            for name in (*STABLE, "churn"):
                if stop.is_set():
                    return
                stub.LoadAdapter(pb.LoadAdapterRequest(adapter=name), timeout=60)
                stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter=name), timeout=60)
            served["churn-cycles"] += 1
            time.sleep(0.3)

        # Warm-up: one round of every kind of traffic, then the baseline RSS.
        _hostile_round(stub, codes, problems)
        churn()
        for key in victims:
            victim(key)
        follower()
        rss_start = process.memory_info().rss

        threads = [
            threading.Thread(target=forever, args=(f"victim {k!r}", lambda k=k: victim(k))) for k in victims
        ]
        threads.append(threading.Thread(target=forever, args=("follower", follower)))
        threads.append(
            threading.Thread(target=forever, args=("hostile", lambda: _hostile_round(stub, codes, problems)))
        )
        threads.append(threading.Thread(target=forever, args=("churn", churn)))
        began = time.monotonic()
        rss_peak = rss_start
        for thread in threads:
            thread.daemon = True
            thread.start()
        while time.monotonic() - began < DURATION_S and not problems:
            time.sleep(0.5)
            rss_peak = max(rss_peak, process.memory_info().rss)
        stop.set()
        for thread in threads:
            thread.join(120)
        rss_end = process.memory_info().rss
        health = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    finally:
        server.stop()
    growth = (rss_end - rss_start) / rss_start
    print(
        f"\nchaos {time.monotonic() - began:.0f} s: served {dict(served)}; hostile codes {dict(codes)}; "
        f"RSS {rss_start / 2**20:.1f} MiB -> {rss_end / 2**20:.1f} MiB ({growth:+.1%}), "
        f"peak {rss_peak / 2**20:.1f} MiB"
    )
    assert not problems, problems[:5]
    assert all(served[k] >= 2 for k in ("base", *STABLE, "churn", "churn-cycles")), served
    assert sum(codes.values()) >= 2 * len(CASES)
    assert [m.state for m in health.models] == ["ready"]
    assert abs(growth) <= RSS_GROWTH, f"RSS grew {growth:+.1%}"
