"""Prometheus metrics of one training run, served by the run's own processes.

The trainer service already exports per-job gauges (from ``trainer_log.jsonl``); this endpoint is for
runs the service does not watch from close by: the pods of a Kubernetes training Job, which the
``lorafleet-training`` PodMonitor (``k8s/components/monitoring``) scrapes on the container port named
``metrics``. The recipe starts it when ``LORAFLEET_TRAINING_METRICS_PORT`` is set (the Job template
sets it), on the first process of every node, so every pod answers a scrape:

* the main rank (global rank 0) updates the gauges from every metric record it logs;
* the other nodes' first processes serve ``lorafleet_training_info`` only (with their node rank), so
  their targets are up rather than refusing connections.

Series have no per-run labels: each pod is its own target, and the PodMonitor adds the job id and
attempt from the pod's labels. The names pass ``promtool check metrics``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

PORT_ENV = "LORAFLEET_TRAINING_METRICS_PORT"
PREFIX = "lorafleet_training_"
log = logging.getLogger("lorafleet.training.metrics")

# record field -> (metric suffix, help)
_GAUGES: dict[str, tuple[str, str]] = {
    "step": ("step", "Optimizer steps done."),
    "total_steps": ("total_steps", "Optimizer steps of the whole run."),
    "epoch": ("epoch", "Epochs done (fractional)."),
    "loss": ("loss", "Training loss of the latest logging interval (cross-entropy, nats per token)."),
    "eval_loss": ("eval_loss", "Latest evaluation loss (nats per token)."),
    "learning_rate": ("learning_rate", "Learning rate at the latest logging step."),
    "grad_norm": ("grad_norm", "Gradient norm at the latest logging step."),
    "tokens_per_s": (
        "tokens_per_second",
        "Training throughput over the latest interval (non-padding tokens per second).",
    ),
    "tokens": ("processed_tokens", "Non-padding tokens trained on so far."),
    "eta_s": ("eta_seconds", "Estimated seconds to the end of the run."),
    "peak_memory_bytes": ("peak_memory_bytes", "Peak memory of the main process (CUDA allocated, else RSS)."),
}
# Preference stages (dpo, kto, rm), TRL's record names as services/trainer/metrics.py exports them;
# registered at a run's first record that has them, so an SFT run shows no such series at all.
_PREFERENCE_GAUGES: dict[str, tuple[str, str]] = {
    "rewards/chosen": ("rewards_chosen", "Mean reward of the chosen answers in the latest interval."),
    "rewards/rejected": ("rewards_rejected", "Mean reward of the rejected answers in the latest interval."),
    "rewards/margins": (
        "reward_margin",
        "Mean reward margin (chosen minus rejected) in the latest interval.",
    ),
    "rewards/accuracies": (
        "preference_accuracy",
        "Fraction of pairs whose chosen answer out-scored the rejected one (a reward model's pairwise accuracy).",
    ),
    "logps/chosen": (
        "logps_chosen",
        "Mean policy log-probability of the chosen answers in the latest interval.",
    ),
    "logps/rejected": (
        "logps_rejected",
        "Mean policy log-probability of the rejected answers in the latest interval.",
    ),
}


class RunMetrics:
    """The gauges of one run in a registry of their own (so tests and processes never share state).

    Args:
        run_id: the run's id (``lorafleet_training_info`` label).
        method: lora, qlora, freeze, full or ptuning (``lorafleet_training_info`` label).
        (A preference run's gauges appear with its first record that carries them.)
        node_rank: this process's node (``lorafleet_training_info`` label).
        main: whether this process logs records (only the main rank updates the gauges).
    """

    def __init__(self, run_id: str, method: str, node_rank: int, main: bool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.main = main
        info = Gauge(
            PREFIX + "info",
            "Always 1; labels describe the run and this node.",
            ["run_id", "method", "node_rank", "main"],
            registry=self.registry,
        )
        info.labels(run_id=run_id, method=method, node_rank=str(node_rank), main=str(main).lower()).set(1)
        self._gauges: dict[str, Gauge] = {}
        if main:
            for field, (name, helptext) in _GAUGES.items():
                self._gauges[field] = Gauge(PREFIX + name, helptext, registry=self.registry)

    def observe(self, record: dict[str, Any]) -> None:
        """Update the gauges from one metric record of ``trainer_log.jsonl`` (missing fields keep
        their previous value)."""
        if not self.main:
            return
        for field, (name, helptext) in _PREFERENCE_GAUGES.items():
            if field in record and field not in self._gauges:
                self._gauges[field] = Gauge(PREFIX + name, helptext, registry=self.registry)
        for field, gauge in self._gauges.items():
            value = record.get(field)
            if isinstance(value, int | float) and not isinstance(value, bool):
                gauge.set(float(value))

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``port`` (0 = any free port); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])


def start_from_env(run_id: str, method: str, node_rank: int, main: bool) -> RunMetrics | None:
    """Start the endpoint when ``LORAFLEET_TRAINING_METRICS_PORT`` is set; None otherwise.

    A port that cannot be bound is logged and training goes on without the endpoint: metrics are
    never a reason for a run to fail.
    """
    raw = os.environ.get(PORT_ENV, "").strip()
    if not raw:
        return None
    try:
        port = int(raw)
        if not 0 <= port < 65536:
            raise ValueError(f"port {port} is not in [0, 65535]")
        metrics = RunMetrics(run_id, method, node_rank, main)
        bound = metrics.serve(port)
    except (ValueError, OSError) as e:
        log.warning("training metrics endpoint not started (%s=%r): %s", PORT_ENV, raw, e)
        return None
    print(f"training metrics on http://0.0.0.0:{bound}/metrics", flush=True)
    return metrics
