"""Inference benchmark: the lorafleet engine serving many LoRA adapters, against PEFT served the
naive way and with static mixed batches, all in one run on the same requests.

Run as:
    make bench            (after the training benchmark; or: .venv/bin/python -m bench.inference_bench)
    .venv/bin/python -m bench.inference_bench --quick      (smoke run: tiny model, few requests)

Method. One base model (the offline tiny llama of ``lorafleet.tiny``; nothing downloaded), N real
PEFT LoRA adapters for N in 1, 8, 32 (ranks alternating 8 and 16, every linear layer adapted, as the
trainer's llama default; random non-zero weights so every adapter changes the output). The same
request list for every configuration: fixed prompts of different lengths from the bundled corpus,
adapter ``i % N`` for request i, greedy decoding, a fixed ``max_new_tokens``, EOS honoured (greedy
decoding gives every configuration the same tokens, so the work is the same; the generated token
counts are reported to show it). A closed loop of ``--clients`` threads: each sends its next request
when its previous one finished. Configurations:

* ``lorafleet``: ``services.inference.engine.Engine``, continuous batching of mixed-adapter rows;
* ``naive_peft``: one ``PeftModel`` holding all N adapters, one request at a time in arrival order,
  ``set_adapter`` then ``generate`` per request;
* ``static_peft_mixed``: the same ``PeftModel``; a worker collects up to the batch size (waiting at
  most ``--static-batch-wait-ms`` after the first request, as a dynamic batcher does), left-pads
  and runs ``generate(adapter_names=[...])``; the batch runs until its longest row ends, and
  requests arriving meanwhile wait for the next batch (no continuous batching);
* ``lorafleet_base_only``: the same requests without adapters through the same engine (the ceiling);
* ``lorafleet_dora``, ``lorafleet_modules_to_save``: the ``lorafleet`` run with the same requests
  and adapters made DoRA (random magnitudes) or given a trained ``lm_head`` (``modules_to_save``),
  the cost of each option against plain LoRA (``dora_vs_lora``, ``modules_to_save_vs_lora``), plus
  one mixed decode step timed per variant (``option_step``), a tighter figure on a busy machine.

Before each measured pass a warm-up pass sends one request per adapter (so adapters are resident in
every configuration, as PEFT's are from loading). Times: ``ttft`` is from the client's submit to the
first generated token (for PEFT, the first call of a logits processor, i.e. right after prefill);
``latency`` from submit to the whole answer. Throughput is generated tokens (and requests) over the
wall time of the measured pass. Every configuration runs ``--repeats`` passes (default 3), the
configurations interleaved pass by pass so that a slow spell of a shared machine hits them alike;
each reports its median pass (all passes' tokens/s are kept in ``passes_tokens_per_s``).

Writes ``bench/results.json`` key ``inference`` (merged: other keys, e.g. ``training``, are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = (
    "lorafleet",
    "naive_peft",
    "static_peft_mixed",
    "lorafleet_base_only",
    "lorafleet_dora",
    "lorafleet_modules_to_save",
)
VARIANTS = {"lorafleet": "lora", "lorafleet_dora": "dora", "lorafleet_modules_to_save": "lm_head"}
"""Engine configurations serving adapters, and the kind of adapter each serves (same ranks, targets
and LoRA weights; DoRA adds magnitudes, ``lm_head`` a replacement head)."""


@dataclass
class Request:
    prompt: list[int]
    adapter: str | None  # adapter name, None = base model
    max_new_tokens: int
    # Filled in by the run.
    submitted: float = 0.0
    first_token: float = 0.0
    done: float = 0.0
    tokens: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Assets


def build_assets(
    work: Path, quick: bool, n_adapters: int, model_dir: Path | None, variants: list[str] | None = None
) -> tuple[Path, dict[str, list[Path]]]:
    """The base model and ``n_adapters`` PEFT adapter directories per variant (built once, reused)."""
    from lorafleet.tiny import build_tiny_model

    if model_dir is None:
        if quick:
            model_dir = build_tiny_model(work / "tiny-quick", arch="llama", hidden_size=64, num_layers=2)
        else:
            # The training benchmark's model (same settings: found already built after it).
            model_dir = build_tiny_model(ROOT / ".cache" / "tiny" / "llama", arch="llama", pretrain_steps=300)
    adapters = {
        v: [
            _make_adapter(
                model_dir, work / ("adapters" if v == "lora" else f"adapters-{v}") / f"a{i:02d}", i, v
            )
            for i in range(n_adapters)
        ]
        for v in variants or ["lora"]
    }
    return model_dir, adapters


def _make_adapter(model_dir: Path, out: Path, i: int, variant: str = "lora") -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    marker = out / "adapter_model.safetensors"
    stamp = out / "bench_stamp.json"
    rank = 8 if i % 2 == 0 else 16
    settings: dict[str, Any] = {
        "model": str(model_dir.resolve()),
        "rank": rank,
        "seed": i,
        "targets": list(LLAMA_TARGETS),
    }
    if variant != "lora":
        settings["variant"] = variant
    if marker.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return out
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(1000 + i)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(LLAMA_TARGETS),
        init_lora_weights=False,  # random non-zero B: the adapter really changes the output
        lora_dropout=0.0,
        use_dora=variant == "dora",
        modules_to_save=["lm_head"] if variant == "lm_head" else None,
    )
    model = get_peft_model(base, config)
    with torch.no_grad():  # PEFT's random init is large for a tiny model; keep outputs sensible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
            elif "lora_magnitude_vector" in name:  # PEFT starts at the weight norm (DoRA == LoRA)
                p.mul_(torch.empty_like(p).uniform_(0.9, 1.1))
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * p.std() * 0.1)
    model.save_pretrained(str(out), safe_serialization=True)
    stamp.write_text(json.dumps(settings))
    return out


def make_requests(model_dir: Path, n: int, n_adapters: int | None, max_new: int) -> list[Request]:
    """``n`` requests over fixed prompts of different lengths; adapter ``i % n_adapters``."""
    from transformers import AutoTokenizer

    from lorafleet.datagen import corpus_text

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    lines = [line.strip() for line in corpus_text(seed=0).splitlines() if len(line.strip()) > 8]
    prompts: list[list[int]] = []
    for i in range(n):
        ids = tokenizer.encode(lines[(i * 7) % len(lines)], add_special_tokens=True)
        length = 8 + (i * 13) % 41  # 8..48 tokens
        prompts.append(list(ids[:length]))
    return [
        Request(p, None if n_adapters is None else f"a{i % n_adapters:02d}", max_new)
        for i, p in enumerate(prompts)
    ]


# ---------------------------------------------------------------------------------------------
# Servers: each exposes serve(request) -> None, blocking until the request is done


class EngineServer:
    def __init__(self, model_dir: Path, adapters: list[Path], max_batch: int, **engine_kwargs: Any) -> None:
        from transformers import AutoModelForCausalLM

        from services.inference.engine import Engine
        from services.inference.lora_batch import adapter_weights_from_peft_dir

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        # The server's defaults (services/inference/settings.py: 8 slots, max_rank 64, batch 32), with
        # a slot per adapter when there are more adapters than that.
        self.engine = Engine(
            model, num_slots=max(8, len(adapters)), max_rank=64, max_batch_size=max_batch, **engine_kwargs
        )
        self.weights = {
            f"a{i:02d}": adapter_weights_from_peft_dir(path, f"a{i:02d}@1", model)
            for i, path in enumerate(adapters)
        }

    def serve(self, req: Request) -> None:
        from services.inference.requests import GenerationRequest
        from services.inference.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=req.max_new_tokens)
        adapter = None if req.adapter is None else self.weights[req.adapter]
        req.submitted = time.perf_counter()
        handle = self.engine.submit(GenerationRequest(req.prompt, adapter=adapter, params=params))
        for event in handle:
            if not req.tokens:
                req.first_token = time.perf_counter()
            req.tokens.extend(event.token_ids)
        req.done = time.perf_counter()

    def close(self) -> None:
        self.engine.close()


class _FirstCall:
    """A logits processor that records when it is first called (right after the prefill)."""

    def __init__(self) -> None:
        self.at = 0.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.at:
            self.at = time.perf_counter()
        return scores


class PeftServer:
    """One PeftModel with every adapter; a single worker thread owns it.

    ``static=False``: one request at a time, ``set_adapter`` per request (the naive server).
    ``static=True``: the worker takes whatever is queued (up to ``max_batch``) and generates it as one
    mixed batch with ``adapter_names`` until the longest row is done.
    """

    def __init__(
        self, model_dir: Path, adapters: list[Path], static: bool, max_batch: int, batch_wait_s: float = 0.0
    ) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.eos = base.generation_config.eos_token_id
        pad = base.generation_config.pad_token_id
        self.pad = int(pad) if isinstance(pad, int) else 0
        model = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a00")
        for i, path in enumerate(adapters[1:], start=1):
            model.load_adapter(str(path), adapter_name=f"a{i:02d}")
        self.model = model.eval()
        self.static, self.max_batch, self.batch_wait_s = static, max_batch, batch_wait_s
        self.jobs: queue.Queue[tuple[Request, threading.Event] | None] = queue.Queue()
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    def serve(self, req: Request) -> None:
        done = threading.Event()
        req.submitted = time.perf_counter()
        self.jobs.put((req, done))
        done.wait()

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join()

    def _work(self) -> None:
        with torch.inference_mode():
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                batch = [job]
                if self.static:
                    # Collect up to max_batch requests, waiting at most batch_wait_s for stragglers
                    # (without a window the worker would start a batch of one the moment the first
                    # client's request lands).
                    deadline = time.perf_counter() + self.batch_wait_s
                    while len(batch) < self.max_batch:
                        try:
                            nxt = self.jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
                        except queue.Empty:
                            break
                        if nxt is None:
                            self.jobs.put(None)
                            break
                        batch.append(nxt)
                self._generate([r for r, _ in batch])
                for _, done in batch:
                    done.set()

    def _generate(self, reqs: list[Request]) -> None:
        width = max(len(r.prompt) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
        first = _FirstCall()
        kwargs: dict[str, Any] = {}
        if self.static:
            kwargs["adapter_names"] = [r.adapter or "__base__" for r in reqs]
        else:
            adapter = reqs[0].adapter
            assert adapter is not None
            self.model.set_adapter(adapter)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(r.max_new_tokens for r in reqs),
            do_sample=False,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
            logits_processor=[first],
            **kwargs,
        )
        now = time.perf_counter()
        for i, r in enumerate(reqs):
            tokens = out[i, width:].tolist()[: r.max_new_tokens]
            if self.eos is not None and self.eos in tokens:
                tokens = tokens[: tokens.index(self.eos) + 1]
            r.tokens, r.first_token, r.done = tokens, first.at, now


# ---------------------------------------------------------------------------------------------
# Load generation and figures


def run_clients(
    serve: Callable[[Request], None], requests: list[Request], clients: int
) -> tuple[float, float]:
    """Closed loop: ``clients`` threads each send their next request when the previous is done.
    Returns the wall seconds and the process CPU seconds (all threads) of the whole pass."""
    todo: queue.Queue[Request] = queue.Queue()
    for r in requests:
        todo.put(r)
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            try:
                r = todo.get_nowait()
            except queue.Empty:
                return
            try:
                serve(r)
            except BaseException as e:
                errors.append(e)
                return

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    began, cpu_began = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed; first: {errors[0]!r}") from errors[0]
    return wall, cpu


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


def figures(requests: list[Request], wall: float, cpu: float) -> dict[str, Any]:
    ttft = [r.first_token - r.submitted for r in requests]
    latency = [r.done - r.submitted for r in requests]
    tokens = sum(len(r.tokens) for r in requests)
    return {
        "requests": len(requests),
        "generated_tokens": tokens,
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens_per_s": tokens / wall,
        # Generated tokens per CPU-second of the process: less sensitive than wall time to other
        # load on a shared machine (not to cache and memory-bandwidth contention).
        "tokens_per_cpu_s": tokens / cpu,
        "requests_per_s": len(requests) / wall,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "latency_p50_s": _pct(latency, 50),
        "latency_p99_s": _pct(latency, 99),
    }


def measure(
    name: str,
    server: Any,
    model_dir: Path,
    n_requests: int,
    n_adapters: int,
    max_new: int,
    clients: int,
) -> tuple[dict[str, Any], list[list[int]]]:
    base_only = name == "lorafleet_base_only"
    warm = make_requests(model_dir, max(n_adapters, 2), None if base_only else n_adapters, 4)
    run_clients(server.serve, warm, clients)
    reqs = make_requests(model_dir, n_requests, None if base_only else n_adapters, max_new)
    wall, cpu = run_clients(server.serve, reqs, clients)
    return figures(reqs, wall, cpu), [r.tokens for r in reqs]


def option_step_costs(
    model_dir: Path, adapters: dict[str, list[Path]], rows: int, context: int, iters: int
) -> dict[str, Any]:
    """Milliseconds of one mixed-adapter decode step (``rows`` rows over every adapter, a KV cache
    of ``context`` tokens) per adapter variant, the variants timed in turn step by step (a slow
    spell of the machine hits all alike); the median step of each, and its cost against plain LoRA.
    A tighter figure than the end-to-end runs, whose wall time on a shared machine varies more than
    the options cost."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from services.inference.lora_batch import LoraSlots, adapter_weights_from_peft_dir

    setups = {}
    for variant, paths in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        slots = LoraSlots(model, None, num_slots=len(paths), max_rank=64)
        for i, path in enumerate(paths):
            slots.load(i, adapter_weights_from_peft_dir(path, f"{variant}{i}", model))
        row_slots = torch.arange(rows) % len(paths)
        vocab = model.config.vocab_size
        ids = (torch.arange(rows * context).view(rows, context) * 7919) % vocab
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            slots.set_rows(row_slots)
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        setups[variant] = (model, slots, cache, ids[:, -1:])
    times: dict[str, list[float]] = {v: [] for v in setups}
    with torch.inference_mode():
        for step in range(iters + 5):  # 5 untimed warm-up steps
            for variant, (model, slots, cache, step_ids) in setups.items():
                began = time.perf_counter()
                slots.set_rows(torch.arange(rows) % slots.num_slots)  # per step, as the engine does
                model(input_ids=step_ids, past_key_values=cache, use_cache=True)
                if step >= 5:
                    times[variant].append(time.perf_counter() - began)
                cache.crop(-1)  # back to the prefilled context
    ms = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    out: dict[str, Any] = {"rows": rows, "context": context, "adapters": len(next(iter(adapters.values())))}
    out["median_step_ms"] = ms
    for variant, key in (("dora", "dora_cost_vs_lora"), ("lm_head", "modules_to_save_cost_vs_lora")):
        if variant in ms and "lora" in ms:
            out[key] = ms[variant] / ms["lora"]
    for _, slots, _, _ in setups.values():
        slots.remove()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny 2-layer model, few requests")
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=None, help="requests per configuration (default 256)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (quick: 8)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument(
        "--static-batch-wait-ms",
        type=float,
        default=20.0,
        help="static batches: how long to wait for a batch to fill after its first request",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="measured passes per configuration, interleaved; the median is reported (default 3, quick 1)",
    )
    ap.add_argument("--model", type=Path, default=None, help="base model directory (default: the tiny llama)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "out" / "inference")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch CPU threads for every configuration (default 0: the inference server's default, "
        "CPUs available minus one)",
    )
    ap.add_argument(
        "--step-iters",
        type=int,
        default=None,
        help="decode steps timed per adapter variant for the options' per-step cost (default 200, quick 20; "
        "0 skips it); runs when lorafleet_dora or lorafleet_modules_to_save is among the configs",
    )
    args = ap.parse_args(argv)
    from services.inference.settings import resolve_torch_threads

    torch.set_num_threads(resolve_torch_threads(args.torch_threads))
    n_requests = args.requests or (32 if args.quick else 256)
    max_new = args.max_new_tokens or (8 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 3)
    threads = torch.get_num_threads()

    variants = sorted({VARIANTS.get(c, "lora") for c in args.configs})
    model_dir, all_adapters = build_assets(
        args.work_dir, args.quick, max(args.adapters), args.model, variants
    )
    manifest_file = model_dir / "lorafleet_tiny.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    by_adapters: dict[str, Any] = {}
    for n in args.adapters:
        adapters = {v: paths[:n] for v, paths in all_adapters.items()}
        passes: dict[str, list[dict[str, Any]]] = {name: [] for name in args.configs}
        outputs: dict[str, list[list[int]]] = {}
        # Passes interleave the configurations (A B C D A B C D ...), so a slow spell of the
        # machine hits every configuration alike; each configuration reports its median pass.
        for rep in range(args.repeats):
            for name in args.configs:
                if name in VARIANTS or name == "lorafleet_base_only":
                    server: Any = EngineServer(
                        model_dir, adapters[VARIANTS.get(name, "lora")], args.max_batch
                    )
                else:
                    server = PeftServer(
                        model_dir,
                        adapters["lora"],
                        static=name == "static_peft_mixed",
                        max_batch=args.max_batch,
                        batch_wait_s=args.static_batch_wait_ms / 1e3,
                    )
                try:
                    r, tokens = measure(name, server, model_dir, n_requests, n, max_new, args.clients)
                finally:
                    server.close()
                if name in outputs and outputs[name] != tokens:
                    raise RuntimeError(f"{name}: greedy tokens changed between passes")
                outputs[name] = tokens
                passes[name].append(r)
                print(
                    f"adapters={n:<3} {name:<20} pass {rep + 1}/{args.repeats} "
                    f"{r['tokens_per_s']:>7.0f} tok/s {r['requests_per_s']:>7.2f} req/s "
                    f"ttft p50/p99 {r['ttft_p50_s'] * 1e3:>6.0f}/{r['ttft_p99_s'] * 1e3:>6.0f} ms "
                    f"latency p50/p99 {r['latency_p50_s'] * 1e3:>6.0f}/{r['latency_p99_s'] * 1e3:>6.0f} ms",
                    flush=True,
                )
        runs: dict[str, Any] = {}
        for name, done in passes.items():
            ordered = sorted(done, key=lambda r: r["tokens_per_s"])
            runs[name] = dict(ordered[(len(ordered) - 1) // 2])  # the median pass (lower median if even)
            runs[name]["passes_tokens_per_s"] = [r["tokens_per_s"] for r in done]
        entry: dict[str, Any] = {"runs": runs}
        # Same greedy tokens => the configurations did the same work (and lorafleet is correct).
        mixed = [c for c in ("lorafleet", "naive_peft", "static_peft_mixed") if c in outputs]
        if len(mixed) > 1:
            ref = outputs[mixed[0]]
            entry["outputs_identical"] = {c: outputs[c] == ref for c in mixed[1:]}
        tps = {c: runs[c]["tokens_per_s"] for c in runs}
        if "lorafleet" in tps:
            for key, other in (
                ("ratio_vs_naive", "naive_peft"),
                ("ratio_vs_static_mixed", "static_peft_mixed"),
            ):
                if other in tps:
                    entry[key] = tps["lorafleet"] / tps[other]
            if "lorafleet_base_only" in tps:
                entry["mixed_vs_base"] = tps["lorafleet"] / tps["lorafleet_base_only"]
            # The options' cost: the same requests with DoRA / lm_head adapters, against plain LoRA.
            for key, other in (
                ("dora_vs_lora", "lorafleet_dora"),
                ("modules_to_save_vs_lora", "lorafleet_modules_to_save"),
            ):
                if other in tps:
                    entry[key] = tps[other] / tps["lorafleet"]
            # The same ratios over CPU time (a cross-check when the machine was not quiet).
            per_cpu = {c: runs[c]["tokens_per_cpu_s"] for c in runs}
            entry["cpu_time_ratios"] = {
                key: per_cpu["lorafleet"] / per_cpu[other]
                for key, other in (
                    ("ratio_vs_naive", "naive_peft"),
                    ("ratio_vs_static_mixed", "static_peft_mixed"),
                    ("mixed_vs_base", "lorafleet_base_only"),
                )
                if other in per_cpu
            }
            for key, other in (
                ("dora_vs_lora", "lorafleet_dora"),
                ("modules_to_save_vs_lora", "lorafleet_modules_to_save"),
            ):
                if other in per_cpu:
                    entry["cpu_time_ratios"][key] = per_cpu[other] / per_cpu["lorafleet"]
        by_adapters[str(n)] = entry

    step_iters = args.step_iters if args.step_iters is not None else (20 if args.quick else 200)
    option_step = None
    if step_iters and len(variants) > 1:
        n_step = min(8, max(args.adapters))
        picked = {v: paths[:n_step] for v, paths in all_adapters.items()}
        option_step = option_step_costs(model_dir, picked, args.max_batch, 32, step_iters)
        print(json.dumps({"option_step": option_step}, indent=2), flush=True)
    inference = {
        "by_adapters": by_adapters,
        "option_step": option_step,
        "targets_at_8_adapters": {"ratio_vs_naive": 5.0, "ratio_vs_static_mixed": 1.5, "mixed_vs_base": 0.7},
        "model": {
            "path": str(model_dir),
            "arch": manifest.get("arch"),
            "hidden_size": manifest.get("hidden_size"),
            "num_layers": manifest.get("num_layers"),
            "vocab_size": manifest.get("vocab_size"),
            "num_parameters": manifest.get("num_parameters"),
            "dtype": "float32",
        },
        "method": {
            "quick": args.quick,
            "adapter_counts": args.adapters,
            "adapter_ranks": "8 and 16 alternating",
            "adapter_targets": list(LLAMA_TARGETS),
            "adapter_variants": "lorafleet_dora: the same adapters with DoRA; lorafleet_modules_to_save: "
            "with a trained lm_head (modules_to_save)",
            "requests": n_requests,
            "repeats": f"{args.repeats} interleaved passes per configuration; the median pass is reported",
            "prompt_tokens": "8 to 48 (fixed per request, from the bundled corpus)",
            "max_new_tokens": max_new,
            "decoding": "greedy, eos honoured",
            "clients": args.clients,
            "max_batch": args.max_batch,
            "engine": "num_slots max(8, adapters), max_rank 64 (the server's defaults), lora_mode auto",
            "static_batch_wait_ms": args.static_batch_wait_ms,
            "torch_threads": threads,
            "load": "closed loop: each client thread sends its next request when the previous is done",
        },
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    results["inference"] = inference
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(
        json.dumps(
            {n: {k: v for k, v in e.items() if k != "runs"} for n, e in by_adapters.items()},
            indent=2,
        )
    )
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
