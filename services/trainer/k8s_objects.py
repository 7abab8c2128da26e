"""The Kubernetes objects of one training attempt: an Indexed Job and its headless Service.

The template itself lives in one file, ``k8s/base/training-job-template.yaml`` (shipped with this
package through the symlink ``training-job-template.yaml`` next to this module): kustomize puts it
into a ConfigMap that the in-cluster trainer mounts (``LORAFLEET_K8S_JOB_TEMPLATE``), so the
manifests and the launcher cannot drift apart. This module computes the values (names, command,
environment, resources, volumes) and fills the template; the Kubernetes launcher creates what
``render_attempt`` returns. Everything here is a pure function of ``K8sSettings``, an
``AttemptRequest`` and the template file that returns plain dicts: no cluster access, no client
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
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

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
JOB_TEMPLATE_FILE = "training-job-template.yaml"
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
    metrics_port: int = 9400
    """Container port named ``metrics`` of every training pod: the run's own ``/metrics``
    (``services/trainer/run_metrics.py``), scraped by the ``lorafleet-training`` PodMonitor."""
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
    job_template: str = ""
    """Path of the Job template (k8s/base/training-job-template.yaml); empty = the packaged copy."""

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
        if self.job_template and not os.path.isfile(self.job_template):
            problems.append(f"job_template {self.job_template!r} is not a file")
        if self.working_dir and not self.working_dir.startswith("/"):
            problems.append(f"working_dir {self.working_dir!r} is not absolute")
        if self.shm_size and not _QUANTITY.match(self.shm_size):
            problems.append(f"shm_size {self.shm_size!r} is not a Kubernetes quantity")
        if not 0 < self.master_port < 65536:
            problems.append(f"master_port {self.master_port} is out of range")
        if not 0 < self.metrics_port < 65536 or self.metrics_port == self.master_port:
            problems.append(f"metrics_port {self.metrics_port} is out of range or equals master_port")
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
        ``RUN_AS_USER``, ``RUN_AS_GROUP``, ``FS_GROUP``, ``JOB_TEMPLATE`` (a file path).
        Lists and maps: ``IMAGE_PULL_SECRETS`` (comma-separated), ``NODE_SELECTOR``
        (``key=value,key=value``), ``TOLERATIONS`` (a JSON list), ``ENV`` (a JSON object).
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(f"LORAFLEET_K8S_{name}")
            return value.strip() if value is not None and value.strip() != "" else None

        kwargs: dict[str, Any] = {}
        strings = {
            "IMAGE": "image",
            "NAMESPACE": "namespace",
            "IMAGE_PULL_POLICY": "image_pull_policy",
            "SERVICE_ACCOUNT": "service_account",
            "PYTHON": "python",
            "WORKING_DIR": "working_dir",
            "MODELS_PVC": "models_claim",
            "MODELS_PATH": "models_mount_path",
            "DATASETS_PVC": "datasets_claim",
            "DATASETS_PATH": "datasets_mount_path",
            "ADAPTERS_PVC": "adapters_claim",
            "ADAPTERS_PATH": "adapters_mount_path",
            "RUNS_PVC": "runs_claim",
            "RUNS_PATH": "runs_mount_path",
            "CACHE_DIR": "cache_dir",
            "SHM_SIZE": "shm_size",
            "PRIORITY_CLASS": "priority_class",
            "JOB_TEMPLATE": "job_template",
        }
        ints = {
            "MASTER_PORT": "master_port",
            "METRICS_PORT": "metrics_port",
            "ACTIVE_DEADLINE_SECONDS": "active_deadline_seconds",
            "TTL_SECONDS_AFTER_FINISHED": "ttl_seconds_after_finished",
            "TERMINATION_GRACE_SECONDS": "termination_grace_seconds",
            "MAX_NODES": "max_nodes",
            "MAX_GPUS_PER_NODE": "max_gpus_per_node",
            "MAX_PROCESSES_PER_NODE": "max_processes_per_node",
            "MEMORY_BYTES_PER_PROCESS": "memory_bytes_per_process",
            "RUN_AS_USER": "run_as_user",
            "RUN_AS_GROUP": "run_as_group",
            "FS_GROUP": "fs_group",
        }
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
        "LORAFLEET_TRAINING_METRICS_PORT": str(settings.metrics_port),
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


TEMPLATE_VALUES = (
    "job_name",
    "service_name",
    "namespace",
    "labels",
    "annotations",
    "selector",
    "nodes",
    "active_deadline_seconds",
    "ttl_seconds_after_finished",
    "container_name",
    "exit_invalid",
    "service_account",
    "termination_grace_seconds",
    "run_as_user",
    "run_as_group",
    "fs_group",
    "image_pull_secrets",
    "node_selector",
    "tolerations",
    "priority_class",
    "image",
    "image_pull_policy",
    "working_dir",
    "command",
    "env",
    "master_port",
    "metrics_port",
    "resources",
    "volume_mounts",
    "volumes",
)
"""The placeholders the launcher fills in the Job template; a template must use every one of them."""
_PLACEHOLDER = re.compile(r"\$\{([a-z_]+)(\??)\}")


def default_job_template_path() -> Path:
    """The template shipped with the package: a symlink to ``k8s/base/training-job-template.yaml``
    in the repository (setuptools copies the file it points to into wheels)."""
    return Path(__file__).with_name(JOB_TEMPLATE_FILE)


def load_job_template(path: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and check the (Job, Service) template; ``path`` None or empty = the packaged one.

    Raises:
        ValueError: the file is not a Job and a Service, a placeholder is unknown, or one of
            ``TEMPLATE_VALUES`` is never used (a template without the command would start pods
            that do nothing).
    """
    source = Path(path) if path else default_job_template_path()
    try:
        docs = [d for d in yaml.safe_load_all(source.read_text(encoding="utf-8")) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the Job template {source}: {e}") from e
    kinds = [(d.get("apiVersion"), d.get("kind")) if isinstance(d, dict) else None for d in docs]
    if kinds != [("batch/v1", "Job"), ("v1", "Service")]:
        raise ValueError(
            f"the Job template {source} must hold a batch/v1 Job, then a v1 Service; got {kinds}"
        )
    used = set(_placeholders(docs))
    problems = [f"unknown placeholder ${{{n}}}" for n in sorted(used - set(TEMPLATE_VALUES))]
    problems += [f"placeholder ${{{n}}} is never used" for n in TEMPLATE_VALUES if n not in used]
    if problems:
        raise ValueError(f"invalid Job template {source}: " + "; ".join(problems))
    return docs[0], docs[1]


def _placeholders(node: Any) -> list[str]:
    if isinstance(node, str):
        return [m.group(1) for m in _PLACEHOLDER.finditer(node)]
    if isinstance(node, dict):
        return [n for k, v in node.items() for n in _placeholders(k) + _placeholders(v)]
    if isinstance(node, list):
        return [n for v in node for n in _placeholders(v)]
    return []


def fill_template(node: Any, values: Mapping[str, Any]) -> Any:
    """A copy of ``node`` with every placeholder replaced from ``values`` (see the template's header).

    A string that is exactly one placeholder becomes the value itself (any type); with ``?`` its
    mapping key is dropped when the value is empty. Inside a longer string the value's text is used.
    """
    if isinstance(node, str):
        whole = _PLACEHOLDER.fullmatch(node)
        if whole:
            return copy.deepcopy(values[whole.group(1)])
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), node)
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            optional = isinstance(value, str) and _PLACEHOLDER.fullmatch(value)
            if optional and optional.group(2) == "?" and values[optional.group(1)] in (None, "", [], {}, ()):
                continue
            out[fill_template(key, values)] = fill_template(value, values)
        return out
    if isinstance(node, list):
        return [fill_template(v, values) for v in node]
    return copy.deepcopy(node)


def render_attempt(settings: K8sSettings, request: AttemptRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (Job, headless Service) of one attempt, as plain dicts ready to create.

    Fills the Job template (``settings.job_template``, else the packaged one: see
    ``load_job_template``). The Service has no owner yet: the Job's uid exists only once the Job is
    created, so the caller adds it with ``set_job_owner`` (the garbage collector then deletes the
    Service with the Job). Raises ``ValueError`` for a request the template cannot run.
    """
    _check_request(settings, request)
    job_template, service_template = load_job_template(settings.job_template)
    name = attempt_name(request.job_id, request.attempt)
    service_name = name
    volumes, mounts = _volumes(settings)
    tolerations = [dict(t) for t in settings.tolerations]
    if request.gpus_per_node > 0 and not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    values: dict[str, Any] = {
        "job_name": name,
        "service_name": service_name,
        "namespace": settings.namespace,
        "labels": attempt_labels(request.job_id, request.attempt),
        "annotations": {ANNOTATION_JOB_ID: request.job_id, ANNOTATION_CONFIG: str(request.config_path)},
        "selector": pod_selector(name),
        "nodes": request.nodes,
        "active_deadline_seconds": settings.active_deadline_seconds,
        "ttl_seconds_after_finished": settings.ttl_seconds_after_finished,
        "container_name": CONTAINER_NAME,
        "exit_invalid": EXIT_INVALID,
        "service_account": settings.service_account,
        "termination_grace_seconds": settings.termination_grace_seconds,
        "run_as_user": settings.run_as_user,
        "run_as_group": settings.run_as_group,
        "fs_group": settings.fs_group,
        "image_pull_secrets": [{"name": s} for s in settings.image_pull_secrets],
        "node_selector": dict(settings.node_selector),
        "tolerations": tolerations,
        "priority_class": settings.priority_class,
        "image": settings.image,
        "image_pull_policy": settings.image_pull_policy,
        "working_dir": settings.working_dir,
        "command": container_command(settings, request, name, service_name),
        "env": _env(settings, request, name, service_name),
        "master_port": settings.master_port,
        "metrics_port": settings.metrics_port,
        "resources": _resources(request),
        "volume_mounts": mounts,
        "volumes": volumes,
    }
    assert set(values) == set(TEMPLATE_VALUES), set(values) ^ set(TEMPLATE_VALUES)
    job: dict[str, Any] = fill_template(job_template, values)
    service: dict[str, Any] = fill_template(service_template, values)
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
