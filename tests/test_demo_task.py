"""Issue item 7: the demo's task is learnable; the adapter's held-out accuracy is far above the base's.

Runs ``python -m services.demo`` as a user does (a real subprocess: bundled data, the offline tiny
llama built if missing, LoRA with examples/lora.yaml, atomic publish, greedy answers on the 80
held-out criteria) and reads the accuracy line it prints. The run and adapter go to a temp dir.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def test_demo_adapter_far_above_base(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.demo", "--out", str(tmp_path), "--show", "3"],
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
    metrics = json.loads((tmp_path / "run" / "final_metrics.json").read_text(encoding="utf-8"))
    assert metrics["accuracy"] >= 0.8
