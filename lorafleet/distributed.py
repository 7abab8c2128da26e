"""Process topology for training: read it from the environment, start the process group, launch.

One training run is one or more processes. Whoever starts them (torchrun, the deepspeed launcher,
a Kubernetes Indexed Job) describes the topology through environment variables; this module reads
all the usual spellings (torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, Kubeflow's ``PET_*``,
an Indexed Job's ``JOB_COMPLETION_INDEX``) so the recipe never cares who launched it.
``launch_command`` builds the torchrun / deepspeed command line for ``lorafleet train``, the trainer
service's local launcher and the Kubernetes Job template alike.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lorafleet.config import DistributedConfig


@dataclass(frozen=True)
class Topology:
    """Where this process sits in the run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def topology_from_env() -> Topology:
    """Read rank and world size as torchrun / the deepspeed launcher export them."""
    world = _env_int("WORLD_SIZE", default=1)
    return Topology(
        rank=_env_int("RANK", default=0),
        local_rank=_env_int("LOCAL_RANK", default=0),
        world_size=world,
        local_world_size=_env_int("LOCAL_WORLD_SIZE", default=world),
    )


def die_with_launcher() -> bool:
    """Make this rank die with its launcher (Linux ``PR_SET_PDEATHSIG``); True when armed.

    torchrun starts every worker in a session of its own, so a launcher killed with SIGKILL (an
    out-of-memory kill, a cancel) leaves its ranks running: they keep the GPU, and may even finish
    and publish after the job was cancelled. Only ranks started by a launcher are armed.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return False
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent or parent == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def ensure_rendezvous_env() -> None:
    """Let a lone process (no launcher) start a one-rank process group, as DeepSpeed requires.

    Without a launcher DeepSpeed falls back to MPI discovery and fails (``No module named 'mpi4py'``,
    shared/STACK.md); a free loopback port and rank 0 of 1 avoid that.
    """
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def device_for(topology: Topology) -> torch.device:
    """The device this rank trains on: its own GPU under CUDA, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(topology.local_rank)
        return torch.device("cuda", topology.local_rank)
    return torch.device("cpu")


def init_process_group(topology: Topology, timeout_s: int = 1800) -> None:
    """Start torch.distributed when the run has several processes (NCCL on GPU, gloo on CPU)."""
    if not topology.distributed or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks (identity when not distributed)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def resolve_node_settings(cfg: DistributedConfig, environ: dict[str, str] | None = None) -> DistributedConfig:
    """Fill node rank, node count and master address from the environment where a launcher set them.

    Kubernetes Indexed Jobs give ``JOB_COMPLETION_INDEX``; Kubeflow Trainer gives ``PET_NODE_RANK``,
    ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``. Explicit
    ``LORAFLEET_*`` variables win over both.
    """
    env = os.environ if environ is None else environ

    def pick(*names: str) -> str | None:
        for n in names:
            if env.get(n):
                return env[n]
        return None

    node_rank = pick("LORAFLEET_NODE_RANK", "PET_NODE_RANK", "JOB_COMPLETION_INDEX", "NODE_RANK")
    nnodes = pick("LORAFLEET_NNODES", "PET_NNODES", "NNODES")
    nproc = pick("LORAFLEET_NPROC_PER_NODE", "PET_NPROC_PER_NODE")
    addr = pick("LORAFLEET_MASTER_ADDR", "PET_MASTER_ADDR", "MASTER_ADDR")
    port = pick("LORAFLEET_MASTER_PORT", "PET_MASTER_PORT", "MASTER_PORT")
    return DistributedConfig(
        deepspeed_stage=cfg.deepspeed_stage,
        deepspeed_config=cfg.deepspeed_config,
        offload_optimizer=cfg.offload_optimizer,
        offload_param=cfg.offload_param,
        launcher=cfg.launcher,
        nproc_per_node=int(nproc) if nproc else cfg.nproc_per_node,
        nnodes=int(nnodes) if nnodes else cfg.nnodes,
        node_rank=int(node_rank) if node_rank else cfg.node_rank,
        master_addr=addr or cfg.master_addr,
        master_port=int(port) if port else cfg.master_port,
    )


def launch_command(cfg: DistributedConfig, script_args: list[str]) -> list[str]:
    """The command that starts every process of this node for ``python -m services.trainer.recipe``.

    Args:
        cfg: topology (already resolved with ``resolve_node_settings``).
        script_args: arguments for the recipe (config path and overrides).
    """
    module = ["-m", "services.trainer.recipe", *script_args]
    if cfg.launcher == "deepspeed":
        topology = {
            "--num_nodes": cfg.nnodes,
            "--num_gpus": cfg.nproc_per_node,
            "--node_rank": cfg.node_rank,
            "--master_addr": cfg.master_addr,
            "--master_port": cfg.master_port,
        }
        runner = [sys.executable, "-m", "deepspeed.launcher.runner", *_flags(topology)]
        return [*runner, "--no_ssh", "--no_local_rank", "--module", *module[1:]]
    topology = {
        "--nnodes": cfg.nnodes,
        "--nproc_per_node": cfg.nproc_per_node,
        "--node_rank": cfg.node_rank,
        "--master_addr": cfg.master_addr,
        "--master_port": cfg.master_port,
    }
    return [sys.executable, "-m", "lorafleet.torchrun", *_flags(topology), *module]


def _flags(values: dict[str, object]) -> list[str]:
    """``{"--flag": value}`` as ``["--flag", "value", ...]``, in order."""
    return [item for flag, value in values.items() for item in (flag, str(value))]


def launch_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for launched ranks: CPU runs need DeepSpeed's CPU accelerator and one thread per rank.

    Without ``OMP_NUM_THREADS=1`` several ranks on a small CPU oversubscribe it and run several times
    slower (bench/README.md).
    """
    env = dict(os.environ if base is None else base)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def format_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
