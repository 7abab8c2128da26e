"""A lorafleet gRPC service in its own process on a loopback port, for tests: start it, wait for the
``listening on HOST:PORT`` line (and whatever else the service prints when ready), connect, stop.
``TrainerProcess`` and ``InferenceProcess`` build their command lines on it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent


@dataclass(kw_only=True)
class ServiceProcess:
    proc: subprocess.Popen[str] | None = None
    address: str = ""
    metrics_url: str = ""
    channel: grpc.Channel | None = None
    stub: Any = None
    log_path: Path | None = None

    def _launch(
        self,
        argv: list[str],
        log_path: Path,
        env: dict[str, str],
        stub_class: Callable[[grpc.Channel], Any],
        timeout: float,
        ready: Callable[[str], bool] = lambda _: True,
        failed: Callable[[str], bool] = lambda _: False,
    ) -> None:
        """Run ``python -u ARGV`` from the project root with its output in ``log_path``; return once
        it printed ``listening on`` and ``ready(log)`` holds. Raises RuntimeError when the process
        exits or ``failed(log)``, TimeoutError after ``timeout`` seconds (both quote the log)."""
        self.log_path = log_path
        with log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", *argv],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = log_path.read_text()
            found = re.search(r"^listening on ([\d.]+:\d+)$", text, re.M)
            if found and ready(text):
                self.address = found.group(1)
                metrics = re.search(r"metrics on (http://\S+)", text)
                self.metrics_url = metrics.group(1) if metrics else ""
                self.channel = grpc.insecure_channel(self.address)
                self.stub = stub_class(self.channel)
                return
            if self.proc.poll() is not None or failed(text):
                raise RuntimeError(f"{argv[:3]} failed:\n{text}")
            time.sleep(0.1)
        raise TimeoutError(f"{argv[:3]} not ready after {timeout} s:\n{log_path.read_text()}")

    def stop(self, grace: float = 20.0) -> None:
        if self.channel:
            self.channel.close()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def server_log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""
