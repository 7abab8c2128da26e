"""The Kubernetes launcher: each attempt is an Indexed Job plus a headless Service (one pod per node).

The objects come from ``services.trainer.k8s_objects`` (which fills the single Job template,
k8s/base/training-job-template.yaml); this module only
talks to the API server with the official client. The handle is ``{"namespace", "job_name",
"service_name"}``, all a restarted service needs to find the attempt again: the names are derived
from the job id and attempt number, so ``start`` after a crash adopts the Job it created before
instead of starting a second gang.

RBAC the service needs in the namespace: exactly ``RBAC_RULES`` below, the API calls this module
makes and nothing more (a subset of what shared/ANCHORS.md allows: no watch is used, and jobs are
never listed because the names are derived). k8s/base/trainer-rbac.yaml grants it, and
tests/test_k8s_manifests.py derives the verbs from the calls in this file and compares all three.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import UTC, datetime
from typing import Any, Final

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from services.trainer.k8s_objects import (
    COMPLETION_INDEX_ANNOTATION,
    CONTAINER_NAME,
    LABEL_ATTEMPT,
    LABEL_JOB_ID,
    K8sSettings,
    job_id_label,
    load_job_template,
    pod_selector,
    processes_per_node,
    render_attempt,
    set_job_owner,
)
from services.trainer.launchers.base import AttemptPhase, AttemptRequest, AttemptStatus, Capacity

__all__ = ["K8sSettings", "KubernetesLauncher", "api_client_from_config"]

log = logging.getLogger("lorafleet.trainer.k8s")

_EXIT_CODE = re.compile(r"exit code (\d+)")

RBAC_RULES: Final[tuple[tuple[str, str, tuple[str, ...]], ...]] = (
    ("batch", "jobs", ("create", "delete", "get")),
    ("", "pods", ("list",)),
    ("", "pods/log", ("get",)),
    ("", "services", ("create", "delete", "get")),
)
"""(API group, resource, verbs) of every call below: the launcher's Role grants exactly these."""


def api_client_from_config(kubeconfig: str | None = None, context: str | None = None) -> k8s.ApiClient:
    """An API client from a kubeconfig file when given, else the in-cluster service account.

    Outside a cluster with no kubeconfig given, the client's default (``$KUBECONFIG`` or
    ``~/.kube/config``) is used, as kubectl would.
    """
    configuration = k8s.Configuration()
    if kubeconfig:
        k8s_config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        k8s_config.load_incluster_config(client_configuration=configuration)
    else:
        k8s_config.load_kube_config(context=context, client_configuration=configuration)
    return k8s.ApiClient(configuration)


def _is(e: ApiException, *codes: int) -> bool:
    return int(e.status or 0) in codes


class KubernetesLauncher:
    """Runs attempts as Indexed Jobs.

    Args:
        settings: namespace, image, volumes, limits (``K8sSettings.from_env()`` in the service).
        api_client: a configured ``kubernetes.client.ApiClient`` (tests point one at KMock); when
            None, one is built from ``kubeconfig`` or the in-cluster service account.
        kubeconfig: path of a kubeconfig file (used only without ``api_client``).
        context: kubeconfig context (default: the file's current context).
    """

    name = "kubernetes"

    def __init__(
        self,
        settings: K8sSettings,
        api_client: k8s.ApiClient | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
    ) -> None:
        self.settings = settings
        load_job_template(settings.job_template)  # a broken template fails here, not at the first job
        self.api_client = api_client or api_client_from_config(kubeconfig, context)
        self.batch = k8s.BatchV1Api(self.api_client)
        self.core = k8s.CoreV1Api(self.api_client)
        gpus = settings.max_gpus_per_node
        self.capacity = Capacity(
            max_nodes=settings.max_nodes,
            max_processes_per_node=gpus if gpus > 0 else settings.max_processes_per_node,
            max_gpus_per_node=gpus,
            memory_bytes_per_process=settings.memory_bytes_per_process,
        )

    @classmethod
    def from_env(cls) -> KubernetesLauncher:
        """Settings from ``LORAFLEET_K8S_*``; cluster access from ``LORAFLEET_K8S_KUBECONFIG`` or in-cluster."""
        return cls(
            K8sSettings.from_env(),
            kubeconfig=os.environ.get("LORAFLEET_K8S_KUBECONFIG") or None,
            context=os.environ.get("LORAFLEET_K8S_CONTEXT") or None,
        )

    # -- start -------------------------------------------------------------------------------------

    def _check_capacity(self, request: AttemptRequest) -> None:
        cap = self.capacity
        problems = []
        if request.nodes > cap.max_nodes:
            problems.append(f"{request.nodes} nodes (at most {cap.max_nodes})")
        if request.gpus_per_node > cap.max_gpus_per_node:
            problems.append(f"{request.gpus_per_node} GPUs per node (at most {cap.max_gpus_per_node})")
        if processes_per_node(request) > cap.max_processes_per_node:
            problems.append(
                f"{processes_per_node(request)} processes per node (at most {cap.max_processes_per_node})"
            )
        if problems:
            raise ValueError("the attempt asks for more than this cluster offers: " + ", ".join(problems))

    def start(self, request: AttemptRequest) -> dict[str, Any]:
        """Create the Job, then its Service owned by the Job; adopt both when they already exist.

        If the Service cannot be created the Job is deleted again: without the Service the ranks
        cannot find rank 0, and without a handle nobody would ever stop them.
        """
        self._check_capacity(request)
        job, service = render_attempt(self.settings, request)
        ns = self.settings.namespace
        job_name, service_name = job["metadata"]["name"], service["metadata"]["name"]
        body = k8s.V1Job.from_dict(job)
        assert body is not None
        try:
            created = self.batch.create_namespaced_job(ns, body)
        except ApiException as e:
            if not _is(e, 409):
                raise
            created = self.batch.read_namespaced_job(job_name, ns)
            labels = (created.metadata.labels if created.metadata else None) or {}
            ours = {LABEL_JOB_ID: job_id_label(request.job_id), LABEL_ATTEMPT: str(request.attempt)}
            if any(labels.get(k) != v for k, v in ours.items()):
                raise RuntimeError(
                    f"Job {ns}/{job_name} exists but belongs to another attempt: {labels}"
                ) from e
            log.info("adopting existing Job %s/%s", ns, job_name)
        uid = created.metadata.uid if created.metadata else None
        if not uid:
            raise RuntimeError(f"the API server returned Job {ns}/{job_name} without a uid")
        try:
            self._ensure_service(set_job_owner(service, job_name, uid), uid)
        except Exception:
            log.exception("could not create Service %s/%s; deleting Job %s", ns, service_name, job_name)
            self._delete_job(ns, job_name)
            raise
        return {"namespace": ns, "job_name": job_name, "service_name": service_name}

    def _ensure_service(self, service: dict[str, Any], job_uid: str) -> None:
        """Create the Service; an existing one is kept if owned by this Job, else replaced.

        A leftover owned by an earlier Job of the same name would be garbage-collected under the new
        Job's pods, leaving rank 0 unreachable.
        """
        ns, name = service["metadata"]["namespace"], service["metadata"]["name"]
        body = k8s.V1Service.from_dict(service)
        assert body is not None
        try:
            self.core.create_namespaced_service(ns, body)
            return
        except ApiException as e:
            if not _is(e, 409):
                raise
        existing = self.core.read_namespaced_service(name, ns)
        owners = (existing.metadata.owner_references if existing.metadata else None) or []
        if any(ref.uid == job_uid for ref in owners):
            return
        log.info("replacing Service %s/%s owned by another Job", ns, name)
        try:
            self.core.delete_namespaced_service(name, ns)
        except ApiException as e:
            if not _is(e, 404):
                raise
        self.core.create_namespaced_service(ns, body)

    # -- poll ----------------------------------------------------------------------------------------

    def poll(self, handle: dict[str, Any]) -> AttemptStatus:
        """The Job's state. API errors other than 404 propagate: "unknown" is not "gone".

        Only the terminal conditions count: ``FailureTarget`` and ``SuccessCriteriaMet`` come while
        pods still terminate, and a retry started then would share the run directory with them.
        ``status.active`` counts pods still waiting to be scheduled, so ``status.ready`` decides
        between PENDING and RUNNING where the API server reports it.
        """
        ns, name = handle["namespace"], handle["job_name"]
        try:
            job = self.batch.read_namespaced_job(name, ns)
        except ApiException as e:
            if _is(e, 404):
                return AttemptStatus(AttemptPhase.GONE, None, f"Job {ns}/{name} no longer exists")
            raise
        status = job.status
        conditions = [c for c in (status.conditions if status else None) or [] if c.status == "True"]
        for cond in conditions:
            if cond.type == "Complete":
                return AttemptStatus(AttemptPhase.SUCCEEDED, 0)
            if cond.type == "Failed":
                return self._failed(handle, cond.reason or "", cond.message or "")
        for cond in conditions:
            if cond.type in ("FailureTarget", "SuccessCriteriaMet"):
                return AttemptStatus(AttemptPhase.RUNNING, None, f"{cond.type}: the pods are terminating")
        if job.metadata and job.metadata.deletion_timestamp:
            return AttemptStatus(AttemptPhase.GONE, None, f"Job {ns}/{name} is being deleted")
        active = (status.active if status else None) or 0
        ready = status.ready if status else None
        if (ready or 0) > 0 or (ready is None and active > 0):
            return AttemptStatus(AttemptPhase.RUNNING)
        return AttemptStatus(AttemptPhase.PENDING)

    def _failed(self, handle: dict[str, Any], reason: str, message: str) -> AttemptStatus:
        """A failed Job's status: the exit code from the pod failure policy's message, else the pods."""
        text = f"{reason}: {message}" if message else reason or "the Job failed"
        if reason == "PodFailurePolicy" and (m := _EXIT_CODE.search(message)):
            return AttemptStatus(AttemptPhase.FAILED, int(m.group(1)), text)
        if reason != "DeadlineExceeded":  # then every rank was killed: no exit code is the cause
            try:
                failures = _container_failures(self._pods(handle))
            except Exception:  # best effort: the pods may be gone already, or not readable
                log.debug("cannot list the pods of %s", handle, exc_info=True)
                failures = []
            if failures:
                _, code, detail = failures[0]
                return AttemptStatus(AttemptPhase.FAILED, code, f"{text} (pod {detail})")
        return AttemptStatus(AttemptPhase.FAILED, None, text)

    def _pods(self, handle: dict[str, Any]) -> list[k8s.V1Pod]:
        """The attempt's pods (filtered here too: label selectors are the server's job, but cheap to check)."""
        selector = pod_selector(handle["job_name"])
        pods = self.core.list_namespaced_pod(
            handle["namespace"], label_selector=",".join(f"{k}={v}" for k, v in selector.items())
        ).items
        return [
            p
            for p in pods
            if p.metadata and all((p.metadata.labels or {}).get(k) == v for k, v in selector.items())
        ]

    # -- cancel ------------------------------------------------------------------------------------

    def _delete_job(self, ns: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, ns, propagation_policy="Foreground")
        except ApiException as e:
            if not _is(e, 404):
                raise

    def cancel(self, handle: dict[str, Any], grace_s: float = 10.0) -> None:
        """Delete the Job (foreground: its pods go first) and the Service; already gone is fine.

        The ranks get the template's ``terminationGracePeriodSeconds`` between SIGTERM and SIGKILL;
        ``grace_s`` cannot shorten that for pods the garbage collector deletes.
        """
        ns = handle["namespace"]
        self._delete_job(ns, handle["job_name"])
        try:
            self.core.delete_namespaced_service(handle["service_name"], ns)
        except ApiException as e:
            if not _is(e, 404):
                raise

    # -- logs --------------------------------------------------------------------------------------

    def log_tail(self, handle: dict[str, Any], max_bytes: int = 4000) -> str:
        """The end of one pod's log: the first pod that failed, else node 0 (rank 0 prints the most).

        Best effort: "" when the pods are gone or the log cannot be read.
        """
        try:
            pods = self._pods(handle)
            if not pods:
                return ""
            failures = _container_failures(pods)
            failed_pod = failures[0][0] if failures else None

            def rank(p: k8s.V1Pod) -> tuple[int, float]:
                meta = p.metadata
                index = (meta.annotations or {}).get(COMPLETION_INDEX_ANNOTATION) if meta else None
                created = meta.creation_timestamp.timestamp() if meta and meta.creation_timestamp else 0.0
                order = 0 if meta and meta.name == failed_pod else 1 if index == "0" else 2
                return order, -created  # the newest pod of a kind (an index may have been re-created)

            pod = min(pods, key=rank)
            assert pod.metadata is not None and pod.metadata.name
            text = self.core.read_namespaced_pod_log(
                pod.metadata.name,
                handle["namespace"],
                container=CONTAINER_NAME,
                tail_lines=max(50, max_bytes // 20),
            )
        except Exception:
            log.debug("cannot read the log of %s", handle, exc_info=True)
            return ""
        return _tail(str(text), max_bytes)


def _container_failures(pods: list[k8s.V1Pod]) -> list[tuple[str, int, str]]:
    """Failed trainer containers, earliest first: (pod name, exit code, "name: exit code N, reason")."""
    found: list[tuple[datetime, str, int, str]] = []
    for pod in pods:
        pod_name = (pod.metadata.name if pod.metadata else None) or "?"
        for cs in (pod.status.container_statuses if pod.status else None) or []:
            term = cs.state.terminated if cs.state else None
            if cs.name != CONTAINER_NAME or term is None or not term.exit_code:
                continue
            detail = f"{pod_name}: exit code {term.exit_code}" + (f", {term.reason}" if term.reason else "")
            finished = term.finished_at or datetime.max.replace(tzinfo=UTC)
            found.append((finished, pod_name, term.exit_code, detail))
    found.sort(key=lambda f: f[0])
    return [(name, code, detail) for _, name, code, detail in found]


def _tail(text: str, max_bytes: int) -> str:
    """The last whole lines of ``text`` within ``max_bytes`` (UTF-8)."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text.strip()
    cut = data[-max_bytes:].decode("utf-8", errors="ignore")
    return (cut.split("\n", 1)[1] if "\n" in cut else cut).strip()
