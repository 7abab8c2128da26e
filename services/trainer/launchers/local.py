"""The local launcher: each attempt is a process tree on this machine (the embedded default).

An attempt is ``supervise`` (in a session of its own) -> the recipe, directly for one plain process
or under torchrun / the DeepSpeed launcher for several processes or DeepSpeed. The handle records the
supervisor's pid and start time, so a restarted service can tell "still running" from "pid reused".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from lorafleet.config import DistributedConfig
from lorafleet.distributed import launch_command, launch_environment
from services.trainer.launchers.base import (
    EXIT_INVALID,
    AttemptPhase,
    AttemptRequest,
    AttemptStatus,
    Capacity,
)

STATUS_FILE = "exit_status.json"
LOG_FILE = "output.log"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _describe_exit(code: int) -> str:
    if code == EXIT_INVALID:
        return "the job is invalid (exit status 2)"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    if code > 128 and code - 128 in signal.valid_signals():
        return f"exit status {code} ({signal.Signals(code - 128).name} in a child)"
    return f"exit status {code}"


@dataclass
class LocalLauncher:
    """Runs attempts as local process trees.

    Args:
        capacity: what one job may ask for (one node; processes up to the CPU or GPU count).
        python: interpreter for the recipe (default: this one).
    """

    capacity: Capacity
    python: str = sys.executable
    name: str = "local"

    def __post_init__(self) -> None:
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    @classmethod
    def for_this_machine(cls, max_processes: int | None = None) -> LocalLauncher:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        procs = max_processes or max(gpus, os.cpu_count() or 1)
        memory = torch.cuda.get_device_properties(0).total_memory if gpus else psutil.virtual_memory().total
        return cls(
            Capacity(
                max_nodes=1,
                max_processes_per_node=procs,
                max_gpus_per_node=gpus,
                memory_bytes_per_process=int(memory),
            )
        )

    def command(self, request: AttemptRequest) -> list[str]:
        """The recipe's command for this attempt (the supervisor wraps it)."""
        script = [str(request.config_path)]
        if request.nodes * request.processes_per_node == 1 and not request.deepspeed:
            return [self.python, "-m", "services.trainer.recipe", *script]
        cfg = DistributedConfig(
            launcher=request.launcher,
            nproc_per_node=request.processes_per_node,
            nnodes=1,
            node_rank=0,
            master_addr="127.0.0.1",
            master_port=_free_port(),
        )
        cmd = launch_command(cfg, script)
        cmd[0] = self.python
        return cmd

    def start(self, request: AttemptRequest) -> dict[str, Any]:
        request.attempt_dir.mkdir(parents=True, exist_ok=True)
        status, log = request.attempt_dir / STATUS_FILE, request.attempt_dir / LOG_FILE
        status.unlink(missing_ok=True)
        wrapper = [
            self.python,
            "-m",
            "services.trainer.launchers.supervise",
            "--status",
            str(status),
            "--log",
            str(log),
            "--",
            *self.command(request),
        ]
        env = launch_environment()
        env["LORAFLEET_JOB_ID"] = request.job_id
        env["LORAFLEET_ATTEMPT"] = str(request.attempt)
        root = Path(__file__).resolve().parents[3]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
        proc = subprocess.Popen(
            wrapper,
            cwd=str(root),
            env=env,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._children[proc.pid] = proc
        return {
            "pid": proc.pid,
            "create_time": psutil.Process(proc.pid).create_time(),
            "attempt_dir": str(request.attempt_dir),
            "command": wrapper[wrapper.index("--") + 1 :],
        }

    def _process(self, handle: dict[str, Any]) -> psutil.Process | None:
        """The supervisor, if it still runs (and is the same process, not a reused pid)."""
        child = self._children.get(int(handle["pid"]))
        if child is not None and child.poll() is not None:  # reap our own zombie
            self._children.pop(child.pid, None)
            return None
        try:
            p = psutil.Process(int(handle["pid"]))
            if (
                abs(p.create_time() - float(handle["create_time"])) > 1.0
                or p.status() == psutil.STATUS_ZOMBIE
            ):
                return None
            return p
        except psutil.NoSuchProcess:
            return None

    def poll(self, handle: dict[str, Any]) -> AttemptStatus:
        status_file = Path(handle["attempt_dir"]) / STATUS_FILE
        if status_file.is_file():
            self._process(handle)  # reap
            try:
                code = int(json.loads(status_file.read_text(encoding="utf-8"))["exit_code"])
            except (ValueError, KeyError):
                return AttemptStatus(AttemptPhase.FAILED, None, "unreadable exit status file")
            if code == 0:
                return AttemptStatus(AttemptPhase.SUCCEEDED, 0)
            return AttemptStatus(AttemptPhase.FAILED, code, _describe_exit(code))
        if self._process(handle) is not None:
            return AttemptStatus(AttemptPhase.RUNNING)
        # The supervisor died without writing a status (killed itself, or the machine rebooted).
        return AttemptStatus(
            AttemptPhase.GONE, None, "the attempt's processes vanished without an exit status"
        )

    def _tree(self, handle: dict[str, Any]) -> list[psutil.Process]:
        root = self._process(handle)
        if root is None:
            return []
        try:
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cancel(self, handle: dict[str, Any], grace_s: float = 10.0) -> None:
        """SIGTERM the attempt's process group and every descendant, SIGKILL what is left after ``grace_s``.

        Descendants are collected before signalling: torchrun starts its workers in sessions of their
        own, so the group alone would miss them.
        """
        procs = self._tree(handle)
        if not procs:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(handle["pid"]), signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        self._process(handle)  # reap

    def log_tail(self, handle: dict[str, Any], max_bytes: int = 4000) -> str:
        return tail_file(Path(handle["attempt_dir"]) / LOG_FILE, max_bytes)

    def pids(self, handle: dict[str, Any]) -> list[int]:
        """Pids of the attempt's live processes (for tests and diagnostics)."""
        return [p.pid for p in self._tree(handle)]


def tail_file(path: Path, max_bytes: int = 4000) -> str:
    """The last whole lines of a file within ``max_bytes`` ("" when missing)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes and "\n" in text:
        text = text.split("\n", 1)[1]
    return text.strip()
