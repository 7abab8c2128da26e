"""`make demo`, end to end: the demo's task is learnable and the whole path goes through the services.

Runs ``python -m services.demo`` as a user does (a real subprocess: bundled data, the offline tiny
llama built if missing, the trainer and inference services started as processes on loopback, a
LoRA job submitted over gRPC, the adapter published atomically and hot-loaded by the inference
service, greedy answers on the 80 held-out criteria through ``Chat``; then a DPO job from that
adapter on the bundled preference task, its held-out preference accuracy before and after, and a
chat with the DPO adapter) and reads what it prints.
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
    (tmp_path / "demo_stdout.txt").write_text(proc.stdout, encoding="utf-8")  # kept for a look afterwards
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
    finals = [
        json.loads(p.read_text(encoding="utf-8")) for p in (tmp_path / "trainer").rglob("final_metrics.json")
    ]
    (sft_final,) = [m for m in finals if m.get("stage", "sft") == "sft"]
    assert sft_final["accuracy"] >= 0.8
    # It went through the services: hot-loaded adapter, both addresses and metrics URLs printed.
    assert re.search(r"demo-cblue@\d+ servable [0-9.]+ s after the job ended", proc.stdout)
    assert re.search(r"trainer\s+gRPC 127\.0\.0\.1:\d+\s+metrics http://", proc.stdout)
    assert re.search(r"inference gRPC 127\.0\.0\.1:\d+\s+metrics http://", proc.stdout)
    # DPO from the SFT adapter: held-out preference accuracy from about chance to at least 90 %.
    found = re.search(r"preference accuracy: before DPO ([0-9.]+)%\s+after DPO ([0-9.]+)%", proc.stdout)
    assert found, proc.stdout[-2000:]
    before, after = float(found.group(1)), float(found.group(2))
    assert 30.0 <= before <= 70.0 and after >= 90.0, proc.stdout[-2000:]
    (dpo_final,) = [m for m in finals if m.get("stage") == "dpo"]
    assert round(100 * dpo_final["preference_accuracy"], 1) == after
    (dpo_manifest,) = list((tmp_path / "adapters" / "demo-dpo").glob("*/lorafleet_manifest.json"))
    dpo = json.loads(dpo_manifest.read_text(encoding="utf-8"))
    assert dpo["stage"] == "dpo" and re.fullmatch(r"demo-cblue@\d+", dpo["started_from"]), dpo
    # The progress bar followed the DPO job's own figures; the demo chatted with its adapter.
    assert "acc=" in proc.stdout and "margin=" in proc.stdout
    assert len(re.findall(r"^   demo-dpo: .*\(chosen: ", proc.stdout, re.MULTILINE)) == 3, proc.stdout[-2000:]
    # For each chat, the inference service's own scoring says which tag the adapter prefers; it
    # agrees with the recipe's held-out ranking (all right when that is 100 %).
    verdicts = re.findall(
        r"^   prefers (\w\d) over (\w\d) by [0-9.]+ nats \(chosen (\w\d), rejected (\w\d): (ok|x)\)",
        proc.stdout,
        re.MULTILINE,
    )
    assert len(verdicts) == 3, proc.stdout[-2000:]
    for preferred, other, chosen, rejected, mark in verdicts:
        assert {preferred, other} == {chosen, rejected} and (mark == "ok") == (preferred == chosen)
    assert sum(v[-1] == "ok" for v in verdicts) >= (3 if after == 100.0 else 1), verdicts
    # Both services were stopped (nothing of the demo keeps running).
    leftovers = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []
