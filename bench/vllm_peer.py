"""vLLM's CPU build as a peer configuration of the long-prompt benchmark.

``bench/vllm_driver.py`` runs under ``.cache/vllm-venv/bin/python`` (made by
``scripts/vllm_venv.sh``: vLLM pins another transformers), one process per model for all passes;
this side sends it the requests, stops it (SIGSTOP) while lorafleet runs, and turns its per-token
times into the same figures as lorafleet's (``bench.timing``).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.inference_bench import ROOT
from bench.procstats import MemorySampler, process_tree, tree_cpu_s
from bench.timing import TimedRequest, timing_figures

VLLM_MAX_LORA_RANK = 16
VLLM_GPU_MEMORY_UTILIZATION = 0.1


class VllmPeer:
    """``bench/vllm_driver.py`` in the vLLM venv, kept for all passes on one model."""

    def __init__(self, python: Path, model_dir: Path, adapters: list[Path], work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        setup = work / "vllm_setup.json"
        setup.write_text(
            json.dumps(
                {
                    "model": str(model_dir.resolve()),
                    "adapters": [[f"a{i:02d}", str(p.resolve())] for i, p in enumerate(adapters)],
                    "max_lora_rank": VLLM_MAX_LORA_RANK,
                    "max_model_len": _max_positions(model_dir),
                    "gpu_memory_utilization": VLLM_GPU_MEMORY_UTILIZATION,
                }
            )
        )
        self.log = work / "vllm_driver.log"
        read_fd, write_fd = os.pipe()
        cmd = [str(python), str(ROOT / "bench" / "vllm_driver.py"), "--setup", str(setup)]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--reply-fd", str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                text=True,
                cwd=work,
            )
        os.close(write_fd)
        self.replies = os.fdopen(read_fd)
        self.paused = False
        with MemorySampler(self.proc.pid) as memory:
            self.ready = self._reply(timeout=900)
        self.startup_peak_rss_mb, self.startup_peak_pss_mb = memory.peak_rss_mb, memory.peak_pss_mb

    def _reply(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.replies], [], [], 1.0)[0]:
                line = self.replies.readline()
                if line:
                    return dict(json.loads(line))
            if self.proc.poll() is not None:
                break
        tail = self.log.read_text()[-3000:] if self.log.is_file() else ""
        raise RuntimeError(f"vLLM driver gave no answer (exit {self.proc.poll()}); log {self.log}:\n{tail}")

    def _signal(self, sig: int) -> None:
        for pid in process_tree(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def pause(self) -> None:
        """Stop vLLM's processes (SIGSTOP) so their idle polling takes no CPU from lorafleet."""
        if not self.paused:
            self._signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            self._signal(signal.SIGCONT)
            self.paused = False

    def run(self, requests: list[TimedRequest], warm: list[TimedRequest], clients: int) -> dict[str, Any]:
        self.resume()
        assert self.proc.stdin is not None
        with MemorySampler(self.proc.pid) as memory:
            for batch in (warm, requests):
                cpu0 = tree_cpu_s(self.proc.pid)
                command = {
                    "run": [
                        {"prompt": r.prompt, "adapter": r.adapter, "max_new_tokens": r.max_new_tokens}
                        for r in batch
                    ],
                    "clients": clients,
                    "reset_prefix_cache": batch is warm,
                }
                self.proc.stdin.write(json.dumps(command) + "\n")
                self.proc.stdin.flush()
                answer = self._reply(timeout=3600)
                cpu = tree_cpu_s(self.proc.pid) - cpu0
                for r, got in zip(batch, answer["requests"], strict=True):
                    r.tokens, r.token_times, r.submitted = got["tokens"], got["token_times"], got["submitted"]
                    r.first_token = r.token_times[0] if r.token_times else 0.0
                    r.done = r.token_times[-1] if r.token_times else 0.0
        figures = timing_figures(requests, answer["wall_s"], cpu)
        figures.update(peak_rss_mb=memory.peak_rss_mb, peak_pss_mb=memory.peak_pss_mb)
        return figures

    def close(self) -> None:
        self.resume()
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.replies.close()


def vllm_python(args: Any) -> tuple[Path | None, str | None]:
    """The vLLM venv's python (made on first use), or None and the reason it is missing."""
    if args.vllm_python is not None:
        return (
            (args.vllm_python, None)
            if args.vllm_python.is_file()
            else (None, f"{args.vllm_python} not found")
        )
    script = ROOT / "scripts" / "vllm_venv.sh"
    try:
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        return None, "scripts/vllm_venv.sh took more than an hour"
    if proc.returncode != 0:
        return None, f"scripts/vllm_venv.sh failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
    return Path(proc.stdout.strip().splitlines()[-1]), None


def _max_positions(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])
