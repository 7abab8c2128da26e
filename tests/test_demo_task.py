"""`make demo`, end to end: the demo's task is learnable and the whole path goes through the services.

Runs ``python -m services.demo`` as a user does (a real subprocess: bundled data, the offline tiny
llama built if missing, the trainer and inference services started as processes on loopback, a
LoRA job submitted over gRPC, the adapter published atomically and hot-loaded by the inference
service, greedy answers on the 80 held-out criteria through ``Chat``) and reads what it prints.
State, runs and adapters go to a temp dir; both services must be gone when it returns.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def test_demo_adapter_far_above_base(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "services.demo", "--out", str(tmp_path), "--show", "3"),
            *("--trainer-port", "0", "--inference-port", "0"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"base model ([0-9.]+)%\s+adapter ([0-9.]+)%", proc.stdout)
    assert found, proc.stdout[-2000:]
    base, adapter = float(found.group(1)), float(found.group(2))
    assert base <= 20.0, proc.stdout[-2000:]
    assert adapter >= 80.0, proc.stdout[-2000:]
    assert adapter - base >= 60.0
    # The published adapter is complete and names the run's template.
    manifests = list((tmp_path / "adapters" / "demo-cblue").glob("*/lorafleet_manifest.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text(encoding="utf-8"))
    assert manifest["template"] == "llama2" and manifest["method"] == "lora"
    # The recipe's own held-out scoring agrees that the adapter learned the task.
    (metrics_file,) = list((tmp_path / "trainer").rglob("final_metrics.json"))
    assert json.loads(metrics_file.read_text(encoding="utf-8"))["accuracy"] >= 0.8
    # It went through the services: hot-loaded adapter, both addresses and metrics URLs printed.
    assert re.search(r"demo-cblue@\d+ servable [0-9.]+ s after the job ended", proc.stdout)
    assert re.search(r"trainer\s+gRPC 127\.0\.0\.1:\d+\s+metrics http://", proc.stdout)
    assert re.search(r"inference gRPC 127\.0\.0\.1:\d+\s+metrics http://", proc.stdout)
    # Both services were stopped (nothing of the demo keeps running).
    leftovers = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []
