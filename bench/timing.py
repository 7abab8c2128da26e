"""Per-request timing figures of a serving benchmark: TTFT, inter-token gaps and their percentiles.

Both the lorafleet engine and the vLLM peer record when every token of a request arrived
(``TimedRequest.token_times``); the figures are computed from those times alone, the same way for
every configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.inference_bench import Request, _pct


@dataclass
class TimedRequest(Request):
    """A request with the arrival time of every generated token."""

    token_times: list[float] = field(default_factory=list)


def inter_token_gaps(requests: list[TimedRequest]) -> list[float]:
    """Gaps between successive tokens of each request, pooled over all requests."""
    return [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:], strict=False)]


def timing_figures(requests: list[TimedRequest], wall: float, cpu: float) -> dict[str, Any]:
    """Throughput and latency percentiles of one pass, from its per-request timings."""
    for r in requests:
        if not r.tokens or len(r.token_times) != len(r.tokens):
            raise RuntimeError(f"request with {len(r.tokens)} tokens has {len(r.token_times)} token times")
    ttft = [r.token_times[0] - r.submitted for r in requests]
    latency = [r.token_times[-1] - r.submitted for r in requests]
    gaps = inter_token_gaps(requests)
    tokens = sum(len(r.tokens) for r in requests)
    return {
        "requests": len(requests),
        "prompt_tokens": sum(len(r.prompt) for r in requests),
        "generated_tokens": tokens,
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens_per_s": tokens / wall,
        "tokens_per_cpu_s": tokens / cpu if cpu > 0 else None,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "itl_p50_s": _pct(gaps, 50) if gaps else None,
        "itl_p99_s": _pct(gaps, 99) if gaps else None,
        "itl_max_s": max(gaps) if gaps else None,
        "latency_p50_s": _pct(latency, 50),
        "latency_p99_s": _pct(latency, 99),
    }
