"""HTTP vs gRPC on one inference server: what the OpenAI-compatible API costs over the gRPC API.

Run as:
    make bench            (or: .venv/bin/python -m bench.http_bench [--quick])

Method. One ``lorafleet inference-server`` process (``python -m services.inference.server``) serving
the offline tiny llama (``lorafleet.tiny``, built once under ``.cache/tiny/llama``; nothing
downloaded) with ``--http-port``, so both APIs reach the same plane and engine. The same request list
over both: ``--requests`` plain-prompt completions from the bundled corpus, greedy (so both APIs
generate the same tokens: the work is the same, and the generated token counts are reported to show
it), ``--max-tokens`` each, EOS honoured, streamed (``GenerateStream`` over gRPC; ``POST
/v1/completions`` with ``stream: true`` over HTTP, read as raw server-sent events with httpx, so the
client's own parsing stays small). A closed loop of ``--clients`` threads, each sending its next
request when the previous one ended. TTFT is from the client's send to the first chunk carrying text;
throughput is generated tokens over the wall time of a pass. Passes alternate gRPC, HTTP, gRPC, ...
(``--repeats`` each, after one warm-up pass of each) so that a slow spell of a shared machine hits
both; each reports its median pass. The client runs in this process, the server in its own.

Writes ``bench/results_http.json``; the target is HTTP throughput >= 90 % of gRPC's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx

from lorafleet.v1 import inference_pb2 as pb
from lorafleet.v1 import inference_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results_http.json"


def prompts(model_dir: Path, n: int) -> list[str]:
    """``n`` corpus lines of different lengths (cut to 8..48 words' worth of characters)."""
    from lorafleet.datagen import corpus_text

    lines = [line.strip() for line in corpus_text(seed=0).splitlines() if len(line.strip()) > 8]
    return [lines[(i * 7) % len(lines)][: 16 + (i * 13) % 80] for i in range(n)]


def start_server(model_dir: Path, log_path: Path, threads: int) -> tuple[subprocess.Popen[str], str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    args = [
        sys.executable,
        "-u",
        "-m",
        "services.inference.server",
        "--model",
        f"tiny={model_dir}",
        "--port",
        "0",
        "--http-port",
        "0",
        "--adapters-root",
        str(log_path.parent / "adapters"),
        "--max-new-tokens-cap",
        "512",
        "--torch-threads",
        str(threads),
    ]
    with log_path.open("w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        text = log_path.read_text()
        if re.search(r"^ready$", text, re.M):
            grpc_at = re.search(r"^listening on (\S+)$", text, re.M)
            http_at = re.search(r"^http on (\S+)$", text, re.M)
            assert grpc_at and http_at, text
            return proc, grpc_at.group(1), http_at.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{text}")
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(log_path.read_text())


def grpc_call(stub: Any, prompt: str, max_tokens: int) -> tuple[float | None, int]:
    """(seconds to the first text, generated tokens) of one streamed gRPC request."""
    start = time.perf_counter()
    ttft = None
    tokens = 0
    sampling = pb.SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
    for chunk in stub.GenerateStream(pb.GenerateRequest(prompt=prompt, sampling=sampling), timeout=600):
        if chunk.text and ttft is None:
            ttft = time.perf_counter() - start
        tokens += len(chunk.token_ids)
    return ttft, tokens


def http_call(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float | None, int]:
    """(seconds to the first text, generated tokens) of one streamed HTTP request."""
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    tokens = 0
    with client.stream("POST", url, json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["text"] and ttft is None:
                ttft = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return ttft, tokens


def run_pass(call: Any, prompts_: list[str], clients: int, max_tokens: int) -> dict[str, Any]:
    """A closed loop of ``clients`` threads over ``prompts_``; figures of the pass."""
    results: list[tuple[float | None, int]] = []
    lock = threading.Lock()
    next_index = iter(range(len(prompts_)))

    def worker() -> None:
        state = call()
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            outcome = state(prompts_[i], max_tokens)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(t for t, _ in results if t is not None)
    tokens = sum(n for _, n in results)
    return {
        "wall_s": wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1e3 * statistics.median(ttfts),
        "ttft_p90_ms": 1e3 * ttfts[int(0.9 * (len(ttfts) - 1))],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.http_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: few requests, one repeat")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.repeats, args.clients = 16, 1, 4
    from lorafleet.tiny import build_tiny_model

    model_dir = build_tiny_model(ROOT / ".cache" / "tiny" / "llama", arch="llama", pretrain_steps=300)
    work = ROOT / "bench" / "out" / "http"
    work.mkdir(parents=True, exist_ok=True)
    proc, grpc_address, http_base = start_server(model_dir, work / "server.log", args.threads)
    try:
        channel = grpc.insecure_channel(grpc_address)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        url = f"{http_base}/v1/completions"
        limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
        http_client = httpx.Client(limits=limits)
        calls = {
            "grpc": lambda: lambda p, n: grpc_call(stub, p, n),
            "http": lambda: lambda p, n: http_call(http_client, url, p, n),
        }
        work_prompts = prompts(model_dir, args.requests)
        for call in calls.values():  # warm-up: connections, caches, first-request paths
            run_pass(call, work_prompts[: args.clients], args.clients, args.max_tokens)
        passes: dict[str, list[dict[str, Any]]] = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, call in calls.items():
                passes[name].append(run_pass(call, work_prompts, args.clients, args.max_tokens))
        channel.close()
        http_client.close()
    finally:
        proc.terminate()
        proc.wait(60)
    summary: dict[str, Any] = {}
    for name, runs in passes.items():
        median = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
        summary[name] = {**median, "passes_tokens_per_s": [r["tokens_per_s"] for r in runs]}
    ratio = summary["http"]["tokens_per_s"] / summary["grpc"]["tokens_per_s"]
    out = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "settings": {
            "requests": args.requests,
            "clients": args.clients,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "server_torch_threads": args.threads,
            "model": str(model_dir),
        },
        "grpc": summary["grpc"],
        "http": summary["http"],
        "http_over_grpc_throughput": ratio,
        "target_met": ratio >= 0.9,
    }
    args.results.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("http_over_grpc_throughput", "target_met")}))
    for name in ("grpc", "http"):
        s = summary[name]
        print(
            f"{name}: {s['tokens_per_s']:.0f} tok/s, TTFT p50 {s['ttft_p50_ms']:.0f} ms, "
            f"p90 {s['ttft_p90_ms']:.0f} ms, {s['generated_tokens']} tokens"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
