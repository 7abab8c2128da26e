"""What the job manager needs from a launcher: start an attempt, report on it, stop it.

A launcher runs one *attempt* of a job: every process of the training recipe, on one machine (the
local launcher) or across nodes (the Kubernetes launcher). The manager keeps the launcher's
``handle`` (a small JSON-able dict) in the job store, so that after the service restarts it can ask
the same launcher about an attempt it started before (``poll``) and adopt it.

Progress and metrics never travel through the launcher: the recipe writes ``trainer_log.jsonl`` in
the attempt's run directory (a local directory or the shared volume) and the manager tails it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Exit status of the recipe when the job itself is wrong (bad config or data): never retried.
EXIT_INVALID = 2
REASON_FILE = "invalid_reason.txt"
"""Written (atomically) into the attempt directory by whichever rank exits with ``EXIT_INVALID``."""


def attempt_dir(config_path: Path, attempt: int) -> Path:
    """The directory of attempt ``attempt``: beside the job's ``config.yaml``, on the same volume for
    the manager and for every training process (local runs and pods alike)."""
    return config_path.parent / f"attempt-{attempt}"


def read_reason(directory: Path, max_chars: int = 2000) -> str:
    """The reason a rank left in ``directory`` before exiting with ``EXIT_INVALID``; "" when none.

    Why a file: with several processes the first rank to fail makes the launcher stop the others, so
    a reason printed only by rank 0 may never reach the log; the failing rank itself writes this.
    """
    try:
        return (directory / REASON_FILE).read_text(encoding="utf-8", errors="replace").strip()[:max_chars]
    except OSError:
        return ""


class AttemptPhase(enum.StrEnum):
    PENDING = "pending"
    """Created but no training process runs yet (a pod being scheduled, say)."""
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    GONE = "gone"
    """The launcher has no trace of the attempt (process vanished without a status, Job deleted)."""


@dataclass
class AttemptStatus:
    phase: AttemptPhase
    exit_code: int | None = None
    """The recipe's exit status when known (``EXIT_INVALID`` means: do not retry)."""
    reason: str = ""
    """Why it failed, in words (exit code, signal, pod failure reason)."""

    @property
    def finished(self) -> bool:
        return self.phase in (AttemptPhase.SUCCEEDED, AttemptPhase.FAILED, AttemptPhase.GONE)


@dataclass
class Capacity:
    """What one job may ask of this launcher."""

    max_nodes: int = 1
    max_processes_per_node: int = 1
    max_gpus_per_node: int = 0
    memory_bytes_per_process: int | None = None
    """Memory a training process may use (GPU memory on GPU launchers); None = unchecked."""


@dataclass
class AttemptRequest:
    """Everything a launcher needs to start one attempt."""

    job_id: str
    attempt: int
    config_path: Path
    """The resolved run config (YAML) the recipe reads; on the shared volume for Kubernetes."""
    attempt_dir: Path
    """Per-attempt directory for the launcher's own files (stdout/stderr log, exit status)."""
    nodes: int = 1
    processes_per_node: int = 1
    gpus_per_node: int = 0
    launcher: str = "torchrun"
    """``torchrun`` or ``deepspeed`` (the recipe's ``distributed.launcher``)."""
    deepspeed: bool = False
    """Whether the run uses DeepSpeed (then a launcher is used even for one process)."""
    resources: dict[str, Any] = field(default_factory=dict)
    """Extra resource requests (``cpu``, ``memory``) where the launcher supports them."""


class Launcher(Protocol):
    name: str
    capacity: Capacity

    def start(self, request: AttemptRequest) -> dict[str, Any]:
        """Start every process of the attempt and return its handle (JSON-able)."""

    def poll(self, handle: dict[str, Any]) -> AttemptStatus:
        """Where the attempt is now. Works for handles from an earlier service process."""

    def cancel(self, handle: dict[str, Any], grace_s: float = 10.0) -> None:
        """Stop every process of the attempt (graceful first, then forced). Idempotent."""

    def log_tail(self, handle: dict[str, Any], max_bytes: int = 4000) -> str:
        """The last lines the attempt printed, for a failure reason."""
