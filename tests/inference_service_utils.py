"""Helpers for inference-service tests: publish real PEFT adapters, run the server in-process or as a
subprocess on a loopback port, and talk to it through the generated stubs.

In-process (:func:`serving`) is fast and lets a test look inside (engine stats, registry); the
subprocess (:class:`InferenceProcess`) gives the server its own RSS for memory tests and is what an
operator runs (``python -m services.inference.server``).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet.adapters import Manifest, PublishedAdapter, new_staging_dir, publish, utc_now
from lorafleet.models import base_model_fingerprint
from lorafleet.v1 import inference_pb2 as pb
from lorafleet.v1 import inference_pb2_grpc
from services.inference.server import InferenceServer
from services.inference.settings import InferenceSettings, ModelSettings
from tests.service_process import ServiceProcess


def publish_adapter(
    adapters_root: Path,
    name: str,
    source: Path,
    base_path: Path,
    *,
    template: str = "chatml",
    version: int | None = None,
    rank: int = 8,
    fingerprint: dict[str, Any] | None = None,
) -> PublishedAdapter:
    """Publish a PEFT adapter directory as the trainer does (staging dir, manifest, atomic rename)."""
    adapters_root.mkdir(parents=True, exist_ok=True)
    staging = new_staging_dir(adapters_root, name)
    shutil.copytree(source, staging, dirs_exist_ok=True)
    manifest = Manifest(
        name=name,
        version=0,
        kind="lora",
        method="lora",
        base_model=fingerprint or base_model_fingerprint(str(base_path), None),
        family="llama",
        template=template,
        hyperparameters={"lora": {"rank": rank}},
        created_at=utc_now(),
    )
    return publish(staging, adapters_root, name, manifest, version=version)


def settings_for(base_path: Path, adapters_root: Path, **overrides: Any) -> InferenceSettings:
    """Settings for one tiny base on a free loopback port; small limits suit the tiny model."""
    options: dict[str, Any] = {
        "models": [ModelSettings(name="tiny", path=str(base_path))],
        "adapters_root": str(adapters_root),
        "port": 0,
        "max_new_tokens_cap": 64,
        "default_max_new_tokens": 8,
        "scan_interval_s": 0.2,
        "max_rank": 16,
    }
    options.update(overrides)
    return InferenceSettings(**options)


@contextmanager
def serving(settings: InferenceSettings, ready_timeout: float = 120.0) -> Iterator[InferenceServer]:
    """An in-process server, started and warm; stopped on exit."""
    server = InferenceServer(settings)
    server.start()
    try:
        assert server.wait_ready(ready_timeout), "base models did not become ready"
        yield server
    finally:
        server.stop(grace=0.5)


def stub_for(port: int) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, inference_pb2_grpc.InferenceServiceStub(channel)


def health_status(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def greedy(max_new_tokens: int, **extra: Any) -> pb.SamplingParams:
    return pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **extra)


def collect(stream: Any) -> tuple[str, list[int], pb.Usage | None]:
    """Join a GenerateStream/ChatStream: text, token ids, and the final usage."""
    text, ids, usage = "", [], None
    for chunk in stream:
        text += chunk.text
        ids.extend(chunk.token_ids)
        if chunk.HasField("usage"):
            usage = chunk.usage
    return text, ids, usage


@dataclass
class InferenceProcess(ServiceProcess):
    """``python -m services.inference.server`` in its own process (``entry`` picks another entry
    point, e.g. ``["-m", "services.cli", "inference-server"]``, the command ``make demo`` runs)."""

    args: list[str]
    log_dir: Path
    entry: list[str] = field(default_factory=lambda: ["-m", "services.inference.server"])
    env: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 180.0) -> InferenceProcess:
        self._launch(
            [*self.entry, "--port", "0", *self.args],
            self.log_dir / f"inference-server-{time.time_ns()}.log",
            {"OMP_NUM_THREADS": "1", **self.env},
            inference_pb2_grpc.InferenceServiceStub,
            timeout,
            ready=lambda log: re.search(r"^ready$", log, re.M) is not None,
            failed=lambda log: "error: base models failed" in log,
        )
        return self
