"""What each inference replica holds and how busy it is, read from its ``/metrics``: the gauges of
the Gateway API Inference Extension's model-server protocol that its endpoint picker routes on
(``services/inference/metrics.py``), so the dashboard shows what the picker sees. No Streamlit here.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Replica:
    """One replica's state at the scrape, or why it could not be read."""

    url: str
    error: str = ""
    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float = 0.0
    """KV cache blocks in use / blocks in the budget (``vllm:kv_cache_usage_perc``), in [0, 1]."""
    max_lora: int = 0
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)
    slot_adapters: list[str] = field(default_factory=list)
    """``name@version`` held in the engine's slots, busy or idle (``base:ref`` with several bases)."""


def _names(value: str) -> list[str]:
    return [n for n in value.split(",") if n]


def parse_replica(url: str, text: str) -> Replica:
    """A replica from its exposition text (the Prometheus text format)."""
    replica = Replica(url)
    slot_models: set[str] = set()
    slots: list[tuple[str, str]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name == "vllm:num_requests_waiting":
                replica.waiting = sample.value
            elif name == "vllm:num_requests_running":
                replica.running = sample.value
            elif name == "vllm:kv_cache_usage_perc":
                replica.kv_cache_usage = sample.value
            elif name == "vllm:lora_requests_info":
                replica.max_lora = int(labels.get("max_lora", "0") or 0)
                replica.running_adapters = _names(labels.get("running_lora_adapters", ""))
                replica.waiting_adapters = _names(labels.get("waiting_lora_adapters", ""))
            elif name == "lorafleet_inference_slot_adapter_info" and sample.value:
                slot_models.add(labels.get("model", ""))
                slots.append((labels.get("model", ""), labels.get("adapter", "")))
    several = len(slot_models) > 1
    replica.slot_adapters = sorted(f"{m}:{a}" if several else a for m, a in slots)
    return replica


def scrape_replica(url: str, timeout_s: float = 5.0) -> Replica:
    """Fetch and parse one replica's ``/metrics``; a failure is reported in ``error``, not raised."""
    if not url.startswith(("http://", "https://")):
        return Replica(url, error=f"not an http(s) URL: {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8")
        replica = parse_replica(url, text)
    except Exception as e:  # one unreachable replica must not hide the others
        return Replica(url, error=f"{type(e).__name__}: {e}")
    if replica.max_lora == 0:
        replica.error = "no vllm:lora_requests_info series: not a lorafleet inference /metrics"
    return replica


def metrics_urls(setting: str) -> list[str]:
    """The comma-separated ``--inference-metrics`` setting as a list."""
    return [u.strip() for u in setting.split(",") if u.strip()]


__all__ = ["Replica", "metrics_urls", "parse_replica", "scrape_replica"]
