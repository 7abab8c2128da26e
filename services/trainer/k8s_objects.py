"""The Kubernetes objects of one training attempt: an Indexed Job and its headless Service.

This is the one place the training Job template lives; the Kubernetes launcher creates what
``render_attempt`` returns, and static manifests can reuse it. Everything here is a pure function of
``K8sSettings`` and an ``AttemptRequest`` that returns plain dicts: no cluster access, no client
library, so it renders and validates offline.

The shape follows shared/ANCHORS.md ("Distributed training on Kubernetes"):

- one Indexed Job per attempt, ``completions = parallelism = nodes``; each pod is one node of the
  run and its completion index is its node rank; pod hostnames are ``<job>-<index>`` under the
  headless Service (``subdomain``), so rank 0 is reachable as ``<job>-0.<service>``;
- ``backoffLimit: 0``: when one rank dies the others hang in NCCL, so the whole gang fails and the
  manager starts a new attempt that resumes from the last checkpoint on the shared volume;
- ``podFailurePolicy``: exit status 2 (``EXIT_INVALID``: bad config or data) fails the Job at once,
  a disruption (preemption, eviction, node drain) is not counted as the job's fault;
- shared volumes are mounted at the same paths the trainer service sees, so the config path and the
  run directory need no translation.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from lorafleet.config import DistributedConfig
from lorafleet.distributed import launch_command
from services.trainer.launchers.base import EXIT_INVALID, AttemptRequest

APP_NAME = "lorafleet-trainer"
CONTAINER_NAME = "trainer"
LABEL_APP = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
"""Unique per attempt (the Job's name): selects the attempt's pods for the Service and for logs."""
LABEL_JOB_ID = "lorafleet.io/job-id"
LABEL_ATTEMPT = "lorafleet.io/attempt"
ANNOTATION_JOB_ID = "lorafleet.io/job-id"
ANNOTATION_CONFIG = "lorafleet.io/config-path"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
"""Set by the Job controller on every pod of an Indexed Job."""

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_SLUG_MAX = 36
"""Room left for ``lf-`` and ``-a<attempt>`` within the 63 characters a pod hostname
``<job>-<index>`` may have (the Job controller fails pods whose hostname is longer)."""
_ALLOWED_RESOURCES = ("cpu", "memory", "ephemeral-storage")
_LAUNCHERS = ("torchrun", "deepspeed")


@dataclass(frozen=True)
class K8sSettings:
    """Where and how training attempts run on Kubernetes (see ``from_env`` for the variables).

    Mount paths must be the paths where the trainer service itself sees the same volumes: the
    service writes the attempt's config under ``runs_mount_path`` and hands that path to the pods.
    An empty claim name leaves that volume out (models baked into the image, say), except for the
    runs volume, which every attempt needs.
    """

    image: str = "lorafleet:latest"
    namespace: str = "default"
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    service_account: str = "default"
    """The pods' service account; its token is not mounted (training never calls the API)."""
    python: str = "python"
    """The interpreter inside the image."""
    working_dir: str = ""
    """The container's working directory; empty keeps the image's WORKDIR."""
    models_claim: str = "lorafleet-models"
    models_mount_path: str = "/data/models"
    datasets_claim: str = "lorafleet-datasets"
    datasets_mount_path: str = "/data/datasets"
    adapters_claim: str = "lorafleet-adapters"
    adapters_mount_path: str = "/data/adapters"
    runs_claim: str = "lorafleet-runs"
    runs_mount_path: str = "/data/runs"
    cache_dir: str = "/var/cache/lorafleet"
    """An emptyDir for HOME and library caches (the root filesystem is read-only)."""
    shm_size: str = ""
    """Size limit of the memory-backed ``/dev/shm`` (it counts against the memory limit); empty = none."""
    master_port: int = 29500
    active_deadline_seconds: int = 3 * 24 * 3600
    """Upper bound on one attempt's run time; the Job fails with ``DeadlineExceeded`` after it."""
    ttl_seconds_after_finished: int = 24 * 3600
    """How long a finished Job stays for inspection; polling it later reports GONE."""
    termination_grace_seconds: int = 30
    """Time the ranks get between SIGTERM and SIGKILL when an attempt is cancelled."""
    max_nodes: int = 1
    max_gpus_per_node: int = 0
    max_processes_per_node: int = 8
    """Processes per node for CPU-only runs (GPU runs use one process per GPU)."""
    memory_bytes_per_process: int | None = None
    """GPU memory of one device (or host memory per process for CPU runs); None = unchecked."""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    priority_class: str = ""
    run_as_user: int = 1000
    run_as_group: int = 1000
    fs_group: int = 1000
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for the training container (``HF_HUB_OFFLINE=1``, NCCL tuning...)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.image:
            problems.append("image is empty")
        if not _DNS1123_LABEL.match(self.namespace) or len(self.namespace) > 63:
            problems.append(f"namespace {self.namespace!r} is not a valid DNS-1123 label")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            problems.append(f"image_pull_policy {self.image_pull_policy!r} is not Always/IfNotPresent/Never")
        if not self.runs_claim:
            problems.append("runs_claim is empty (attempts read their config from the runs volume)")
        paths = [p for _, _, p, _ in self._shared_volumes()] + [self.cache_dir, "/tmp", "/dev/shm"]
        for p in paths:
            if not p.startswith("/"):
                problems.append(f"mount path {p!r} is not absolute")
        if len(set(paths)) != len(paths):
            problems.append(f"mount paths collide: {paths}")
        if self.working_dir and not self.working_dir.startswith("/"):
            problems.append(f"working_dir {self.working_dir!r} is not absolute")
        if self.shm_size and not _QUANTITY.match(self.shm_size):
            problems.append(f"shm_size {self.shm_size!r} is not a Kubernetes quantity")
        if not 0 < self.master_port < 65536:
            problems.append(f"master_port {self.master_port} is out of range")
        for name in ("active_deadline_seconds", "max_nodes", "max_processes_per_node"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("ttl_seconds_after_finished", "termination_grace_seconds", "max_gpus_per_node"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if problems:
            raise ValueError("invalid Kubernetes settings: " + "; ".join(problems))

    def _shared_volumes(self) -> list[tuple[str, str, str, bool]]:
        """(volume name, claim, mount path, read-only) of each shared volume that is configured."""
        volumes = [
            ("models", self.models_claim, self.models_mount_path, True),
            ("datasets", self.datasets_claim, self.datasets_mount_path, True),
            ("adapters", self.adapters_claim, self.adapters_mount_path, False),
            ("runs", self.runs_claim, self.runs_mount_path, False),
        ]
        return [v for v in volumes if v[1]]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> K8sSettings:
        """Settings from ``LORAFLEET_K8S_*`` variables; unset ones keep their defaults.

        Scalars: ``IMAGE``, ``NAMESPACE`` (default: the pod's own namespace when running in a
        cluster), ``IMAGE_PULL_POLICY``, ``SERVICE_ACCOUNT``, ``PYTHON``, ``WORKING_DIR``,
        ``{MODELS,DATASETS,ADAPTERS,RUNS}_PVC`` and ``..._PATH``, ``CACHE_DIR``, ``SHM_SIZE``,
        ``MASTER_PORT``, ``ACTIVE_DEADLINE_SECONDS``, ``TTL_SECONDS_AFTER_FINISHED``,
        ``TERMINATION_GRACE_SECONDS``, ``MAX_NODES``, ``MAX_GPUS_PER_NODE``,
        ``MAX_PROCESSES_PER_NODE``, ``MEMORY_BYTES_PER_PROCESS``, ``PRIORITY_CLASS``,
        ``RUN_AS_USER``, ``RUN_AS_GROUP``, ``FS_GROUP``.
        Lists and maps: ``IMAGE_PULL_SECRETS`` (comma-separated), ``NODE_SELECTOR``
        (``key=value,key=value``), ``TOLERATIONS`` (a JSON list), ``ENV`` (a JSON object).
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(f"LORAFLEET_K8S_{name}")
            return value.strip() if value is not None and value.strip() != "" else None

        kwargs: dict[str, Any] = {}
        strings = {
            "IMAGE": "image", "NAMESPACE": "namespace", "IMAGE_PULL_POLICY": "image_pull_policy",
            "SERVICE_ACCOUNT": "service_account", "PYTHON": "python", "WORKING_DIR": "working_dir",
            "MODELS_PVC": "models_claim", "MODELS_PATH": "models_mount_path",
            "DATASETS_PVC": "datasets_claim", "DATASETS_PATH": "datasets_mount_path",
            "ADAPTERS_PVC": "adapters_claim", "ADAPTERS_PATH": "adapters_mount_path",
            "RUNS_PVC": "runs_claim", "RUNS_PATH": "runs_mount_path", "CACHE_DIR": "cache_dir",
            "SHM_SIZE": "shm_size", "PRIORITY_CLASS": "priority_class",
        }  # fmt: skip
        ints = {
            "MASTER_PORT": "master_port", "ACTIVE_DEADLINE_SECONDS": "active_deadline_seconds",
            "TTL_SECONDS_AFTER_FINISHED": "ttl_seconds_after_finished",
            "TERMINATION_GRACE_SECONDS": "termination_grace_seconds", "MAX_NODES": "max_nodes",
            "MAX_GPUS_PER_NODE": "max_gpus_per_node", "MAX_PROCESSES_PER_NODE": "max_processes_per_node",
            "MEMORY_BYTES_PER_PROCESS": "memory_bytes_per_process", "RUN_AS_USER": "run_as_user",
            "RUN_AS_GROUP": "run_as_group", "FS_GROUP": "fs_group",
        }  # fmt: skip
        for var, attr in strings.items():
            if (value := get(var)) is not None:
                kwargs[attr] = value
        for var, attr in ints.items():
            if (value := get(var)) is not None:
                try:
                    kwargs[attr] = int(value)
                except ValueError:
                    raise ValueError(f"LORAFLEET_K8S_{var}={value!r} is not an integer") from None
        # An emptied claim variable (set to "") deliberately leaves that volume out.
        for var, attr in (("MODELS_PVC", "models_claim"), ("DATASETS_PVC", "datasets_claim")):
            if env.get(f"LORAFLEET_K8S_{var}") == "":
                kwargs[attr] = ""
        if "namespace" not in kwargs:
            ns_file = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
            if environ is None and os.path.isfile(ns_file):
                with open(ns_file, encoding="utf-8") as f:
                    kwargs["namespace"] = f.read().strip()
        if (value := get("IMAGE_PULL_SECRETS")) is not None:
            kwargs["image_pull_secrets"] = tuple(s.strip() for s in value.split(",") if s.strip())
        if (value := get("NODE_SELECTOR")) is not None:
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(f"LORAFLEET_K8S_NODE_SELECTOR={value!r}: expected key=value,key=value")
            kwargs["node_selector"] = {k.strip(): v.strip() for k, v in pairs}
        if (value := get("TOLERATIONS")) is not None:
            tolerations = json.loads(value)
            if not isinstance(tolerations, list) or not all(isinstance(t, dict) for t in tolerations):
                raise ValueError("LORAFLEET_K8S_TOLERATIONS must be a JSON list of objects")
            kwargs["tolerations"] = tuple(tolerations)
        if (value := get("ENV")) is not None:
            extra = json.loads(value)
            if not isinstance(extra, dict):
                raise ValueError("LORAFLEET_K8S_ENV must be a JSON object")
            kwargs["env"] = {str(k): str(v) for k, v in extra.items()}
        return cls(**kwargs)


def _slug(job_id: str) -> str:
    """A DNS-label fragment for ``job_id``: itself when already safe and short, else readable + hash.

    The hash keeps two ids apart that lowercasing, character replacement or truncation would merge.
    """
    cleaned = re.sub(r"[^a-z0-9]+", "-", job_id.lower()).strip("-")
    if cleaned == job_id and len(cleaned) <= _SLUG_MAX:
        return cleaned
    digest = hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:8]
    head = cleaned[: _SLUG_MAX - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}" if head else digest


def attempt_name(job_id: str, attempt: int) -> str:
    """The Job's (and its Service's) name: ``lf-<job id>-a<attempt>``, a DNS-1035 label.

    Deterministic, so starting the same attempt twice finds the first Job instead of a second one.
    """
    if not job_id:
        raise ValueError("job_id is empty")
    if attempt < 0:
        raise ValueError(f"attempt {attempt} is negative")
    name = f"lf-{_slug(job_id)}-a{attempt}"
    assert _DNS1035.match(name), name
    if len(name) > 50:  # leaves room for "-<index>" in pod hostnames
        raise ValueError(f"attempt number {attempt} makes the name {name!r} too long")
    return name


def job_id_label(job_id: str) -> str:
    """The ``lorafleet.io/job-id`` label value: the id itself when it is a valid label value."""
    if len(job_id) <= 63 and _LABEL_VALUE.match(job_id):
        return job_id
    return _slug(job_id)


def attempt_labels(job_id: str, attempt: int) -> dict[str, str]:
    """Labels on the Job, its Service and its pods; ``app.kubernetes.io/instance`` is per attempt."""
    return {
        LABEL_APP: APP_NAME,
        LABEL_INSTANCE: attempt_name(job_id, attempt),
        LABEL_JOB_ID: job_id_label(job_id),
        LABEL_ATTEMPT: str(attempt),
    }


def pod_selector(job_name: str) -> dict[str, str]:
    """Selects the pods of one attempt (the Service's selector, and the launcher's log lookup)."""
    return {LABEL_APP: APP_NAME, LABEL_INSTANCE: job_name}


def master_addr(job_name: str, service_name: str) -> str:
    """Rank 0's address: the Indexed Job's pod 0 under the headless Service."""
    return f"{job_name}-0.{service_name}"


def _literal(arg: str) -> str:
    """Escape ``$`` so Kubernetes does not expand ``$(VAR)`` inside a literal argument."""
    return arg.replace("$", "$$")


def _quantity(key: str, value: Any) -> str:
    text = str(value).strip()
    if isinstance(value, bool) or not _QUANTITY.match(text):
        raise ValueError(f"resources.{key}={value!r} is not a Kubernetes quantity (e.g. '4', '500m', '16Gi')")
    return text


def _cpu_count(quantity: str) -> float:
    """CPUs in a cpu quantity ("4", "500m", "2.5"); used only to size OMP_NUM_THREADS."""
    if quantity.endswith("m"):
        return float(quantity[:-1]) / 1000
    try:
        return float(quantity)
    except ValueError:
        return 1.0


def processes_per_node(request: AttemptRequest) -> int:
    """One process per GPU on GPU runs (``--nproc_per_node`` = the GPU limit); else as requested."""
    if request.gpus_per_node > 0:
        if request.processes_per_node > request.gpus_per_node:
            raise ValueError(
                f"{request.processes_per_node} processes per node cannot share {request.gpus_per_node} GPU(s): "
                "each process trains on a GPU of its own"
            )
        return request.gpus_per_node
    return request.processes_per_node


def container_command(
    settings: K8sSettings, request: AttemptRequest, job_name: str, service_name: str
) -> list[str]:
    """The training container's command.

    One plain process runs the recipe directly (as ``lorafleet train`` does); anything else goes
    through ``lorafleet.distributed.launch_command`` (torchrun or the DeepSpeed launcher) with the
    node rank taken from ``$(JOB_COMPLETION_INDEX)``, which Kubernetes expands from the container's
    environment. torchrun runs through ``lorafleet.torchrun`` so that a rank's exit status 2 is
    the pod's exit status.
    """
    config = _literal(str(request.config_path))
    nproc = processes_per_node(request)
    if request.nodes * nproc == 1 and not request.deepspeed:
        return [settings.python, "-m", "services.trainer.recipe", config]
    cfg = DistributedConfig(
        launcher=request.launcher,
        nproc_per_node=nproc,
        nnodes=request.nodes,
        node_rank=0,
        master_addr=master_addr(job_name, service_name),
        master_port=settings.master_port,
    )
    cmd = launch_command(cfg, [config])
    cmd[cmd.index("--node_rank") + 1] = "$(JOB_COMPLETION_INDEX)"
    cmd[0] = settings.python
    return cmd


def _env(
    settings: K8sSettings, request: AttemptRequest, job_name: str, service_name: str
) -> list[dict[str, Any]]:
    """The container's environment: defaults, then ``settings.env``, then the run's topology (never overridden)."""
    nproc = processes_per_node(request)
    defaults: dict[str, str] = {
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        # The root filesystem is read-only: everything that caches writes under the cache emptyDir.
        "HOME": settings.cache_dir,
        "XDG_CACHE_HOME": settings.cache_dir,
        "HF_HOME": f"{settings.cache_dir}/huggingface",
        "TRITON_CACHE_DIR": f"{settings.cache_dir}/triton",
        "TORCH_EXTENSIONS_DIR": f"{settings.cache_dir}/torch_extensions",
        "TMPDIR": "/tmp",
    }
    if request.gpus_per_node == 0:
        # What lorafleet.distributed.launch_environment does for CPU runs, sized to the CPU request.
        cpu = request.resources.get("cpu")
        threads = max(1, int(_cpu_count(str(cpu)) // nproc)) if cpu else 1
        defaults["OMP_NUM_THREADS"] = str(threads)
        defaults["DS_ACCELERATOR"] = "cpu"
    topology = {
        "LORAFLEET_NNODES": str(request.nodes),
        "LORAFLEET_NPROC_PER_NODE": str(nproc),
        "LORAFLEET_MASTER_ADDR": master_addr(job_name, service_name),
        "LORAFLEET_MASTER_PORT": str(settings.master_port),
        "LORAFLEET_JOB_ID": request.job_id,
        "LORAFLEET_ATTEMPT": str(request.attempt),
    }
    values = {**defaults, **settings.env, **topology}
    values.pop("JOB_COMPLETION_INDEX", None)
    index_ref = {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}
    # Declared first: $(JOB_COMPLETION_INDEX) in the command refers to it. The Job controller adds
    # the same variable only when the container does not declare it.
    return [{"name": "JOB_COMPLETION_INDEX", "valueFrom": index_ref}] + [
        {"name": k, "value": v} for k, v in values.items()
    ]


def _resources(request: AttemptRequest) -> dict[str, Any]:
    """Requests from ``request.resources``; memory is also the limit, CPU is not limited.

    A memory limit equal to the request makes an out-of-memory kill predictable instead of depending
    on the node's other tenants; a CPU limit would only throttle data loading.
    """
    unknown = sorted(set(request.resources) - set(_ALLOWED_RESOURCES))
    if unknown:
        raise ValueError(f"unsupported resources {unknown}; supported: {list(_ALLOWED_RESOURCES)}")
    requests = {k: _quantity(k, v) for k, v in request.resources.items() if v not in (None, "")}
    limits = {k: v for k, v in requests.items() if k in ("memory", "ephemeral-storage")}
    if request.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = str(request.gpus_per_node)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _volumes(settings: K8sSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    for name, claim, path, read_only in settings._shared_volumes():
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim}})
        mount: dict[str, Any] = {"name": name, "mountPath": path}
        if read_only:
            mount["readOnly"] = True
        mounts.append(mount)
    shm: dict[str, Any] = {"medium": "Memory"}
    if settings.shm_size:
        shm["sizeLimit"] = settings.shm_size
    volumes += [
        {"name": "dshm", "emptyDir": shm},  # NCCL and DataLoader workers need more than 64 MiB
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
    ]
    mounts += [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": settings.cache_dir},
    ]
    return volumes, mounts


def _check_request(settings: K8sSettings, request: AttemptRequest) -> None:
    if request.nodes < 1 or request.processes_per_node < 1 or request.gpus_per_node < 0:
        raise ValueError(
            f"nodes={request.nodes}, processes_per_node={request.processes_per_node}, "
            f"gpus_per_node={request.gpus_per_node}: need at least one node and one process"
        )
    if request.launcher not in _LAUNCHERS:
        raise ValueError(f"launcher {request.launcher!r} is not one of {list(_LAUNCHERS)}")
    config = PurePosixPath(str(request.config_path))
    if not config.is_absolute() or not config.is_relative_to(settings.runs_mount_path):
        raise ValueError(
            f"config path {str(request.config_path)!r} is not on the runs volume ({settings.runs_mount_path}): "
            "the pods could not read it"
        )


def render_attempt(settings: K8sSettings, request: AttemptRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (Job, headless Service) of one attempt, as plain dicts ready to create.

    The Service has no owner yet: the Job's uid exists only once the Job is created, so the caller
    adds it with ``set_job_owner`` (the garbage collector then deletes the Service with the Job).
    Raises ``ValueError`` for a request the template cannot run.
    """
    _check_request(settings, request)
    name = attempt_name(request.job_id, request.attempt)
    service_name = name
    labels = attempt_labels(request.job_id, request.attempt)
    annotations = {ANNOTATION_JOB_ID: request.job_id, ANNOTATION_CONFIG: str(request.config_path)}
    volumes, mounts = _volumes(settings)

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": container_command(settings, request, name, service_name),
        "env": _env(settings, request, name, service_name),
        "ports": [{"name": "rendezvous", "containerPort": settings.master_port, "protocol": "TCP"}],
        "resources": _resources(request),
        "volumeMounts": mounts,
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if settings.working_dir:
        container["workingDir"] = settings.working_dir

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": service_name,
        "serviceAccountName": settings.service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_group,
            "fsGroup": settings.fs_group,
            "fsGroupChangePolicy": "OnRootMismatch",  # no recursive chown of big volumes per pod
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    tolerations = [dict(t) for t in settings.tolerations]
    if request.gpus_per_node > 0 and not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if settings.priority_class:
        pod_spec["priorityClassName"] = settings.priority_class

    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "completionMode": "Indexed",
            "completions": request.nodes,
            "parallelism": request.nodes,
            "backoffLimit": 0,
            "activeDeadlineSeconds": settings.active_deadline_seconds,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER_NAME,
                            "operator": "In",
                            "values": [EXIT_INVALID],
                        },
                    },
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                ]
            },
            "template": {
                "metadata": {"labels": dict(labels), "annotations": dict(annotations)},
                "spec": pod_spec,
            },
        },
    }
    service: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name,
            "namespace": settings.namespace,
            "labels": dict(labels),
            "annotations": dict(annotations),
        },
        "spec": {
            "clusterIP": "None",
            # Ranks resolve each other while starting, before any readiness could be reported.
            "publishNotReadyAddresses": True,
            "selector": pod_selector(name),
            "ports": [
                {"name": "rendezvous", "port": settings.master_port, "targetPort": settings.master_port}
            ],
        },
    }
    return job, service


def set_job_owner(obj: Mapping[str, Any], job_name: str, job_uid: str) -> dict[str, Any]:
    """A copy of ``obj`` owned by the Job (``job_uid`` from the created Job), for garbage collection.

    ``blockOwnerDeletion`` is left out: setting it needs permission on ``jobs/finalizers``, which
    the launcher's Role does not grant, and a Service need not outlive its Job's deletion anyway.
    """
    if not job_uid:
        raise ValueError(f"Job {job_name!r} has no uid: pass the Job as the API server returned it")
    owned = copy.deepcopy(dict(obj))
    refs = [r for r in owned.setdefault("metadata", {}).get("ownerReferences", []) if r.get("uid") != job_uid]
    refs.append(
        {"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": job_uid, "controller": True}
    )
    owned["metadata"]["ownerReferences"] = refs
    return owned
