"""Test helpers for the Kubernetes manifests (k8s/) and the images (services/*/Dockerfile).

Real tools where they run here: the real ``kubectl`` (its built-in kustomize renders the overlays;
``scripts/install_kubectl.sh`` puts one into .cache/kubectl/bin, run on demand like
tests/prom_utils.py does for Prometheus: when it fails the test fails with the script's message, no
skip) and ``kubernetes-validate`` (the Kubernetes JSON schemas, offline). ``policy_violations`` is
the hardening policy every rendered pod must meet; the tests also feed it broken objects to show
that it can fail.
"""

from __future__ import annotations

import re
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import aiohttp.web
import kmock as km
import kubernetes_validate
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = REPO_ROOT / "k8s"
OVERLAYS = ["cpu-dev", "gpu", "monitoring", "inference-gateway"]
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_kubectl.sh"
KUBECTL = REPO_ROOT / ".cache" / "kubectl" / "bin" / "kubectl"

CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("servicemonitors", "servicemonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"): ("podmonitors", "podmonitor"),
    ("inference.networking.k8s.io/v1", "InferencePool"): ("inferencepools", "inferencepool"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): ("httproutes", "httproute"),
}
"""Kinds from CRDs (the Prometheus operator's; the Gateway API's and its Inference Extension's): no
bundled schema; checked by ``crd_problems`` (the InferencePool also against its CRD's schema, in
tests/test_gateway_manifests.py)."""
CRD_OVERLAY = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inference-gateway",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "inference-gateway",
}
"""The one overlay each CRD kind may appear in: applying any other fails on a cluster without it."""

POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE)
_SECRET_TEXT = re.compile(
    r"(hf_[A-Za-z0-9]{20,}|ghp_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|eyJ[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{20,})"
)
_install_lock = threading.Lock()


class KubectlEmulator(km.KubernetesEmulator):
    """KMock, with the two things ``kubectl apply`` needs that KMock 0.8 lacks.

    - Discovery of the core group: KMock answers ``GET /api/v1`` with ``groupVersion: "/v1"`` where
      the API server says ``"v1"``. kubectl's REST mapper keys resource lists by that string, so it
      would find no core kind at all ("no matches for kind ConfigMap in version v1").
    - Namespace objects: KMock's path parser reads ``/api/v1/namespaces[/NAME]`` as the start of a
      namespaced path and fails, so those two paths are served here (get, create), kept in
      ``namespaces``, and logged in ``namespace_requests`` (KMock's own request log lacks them).
    """

    _NAMESPACES: ClassVar[re.Pattern[str]] = re.compile(r"/api/v1/namespaces(?:/([^/]+))?/?")

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.namespace_requests: list[tuple[str, str]] = []

    async def _serve_version(self, request: km.Request) -> Any:
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and payload.get("groupVersion", "").startswith("/"):
            payload = {**payload, "groupVersion": payload["groupVersion"][1:]}
        return payload

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        match = self._NAMESPACES.fullmatch(raw_request.path)
        if match is None:
            return await super().__call__(raw_request)
        self.namespace_requests.append((raw_request.method, raw_request.path))
        name = match.group(1)
        if raw_request.method == "GET" and name:
            if name in self.namespaces:
                return aiohttp.web.json_response(self.namespaces[name])
            return _status(404, "NotFound", f'namespaces "{name}" not found')
        if raw_request.method == "POST" and not name:
            body = await raw_request.json()
            created = body.get("metadata", {}).get("name")
            if created in self.namespaces:
                return _status(409, "AlreadyExists", f'namespaces "{created}" already exists')
            body.setdefault("metadata", {})["uid"] = str(uuid.uuid4())
            self.namespaces[created] = body
            return aiohttp.web.json_response(body, status=201)
        return _status(405, "MethodNotAllowed", f"{raw_request.method} {raw_request.path} is not emulated")


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    """An API server error (a ``Status`` object), as kubectl reads it."""
    body = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "reason": reason}
    return aiohttp.web.json_response({**body, "message": message, "metadata": {}}, status=code)


class KubectlUnavailable(RuntimeError):
    """No kubectl >= 1.27 and scripts/install_kubectl.sh could not get one."""


def kubectl() -> Path:
    """Path of a real kubectl (client >= 1.27), installing it first if needed."""
    with _install_lock:
        if KUBECTL.exists():
            return KUBECTL
        proc = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0 or not KUBECTL.exists():
            raise KubectlUnavailable(
                f"{INSTALL_SCRIPT} failed (exit {proc.returncode}); the manifest tests need a real kubectl.\n"
                f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
            )
        return KUBECTL


def kustomize(path: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize PATH``, parsed: the objects an ``apply -k`` would send."""
    proc = subprocess.run(
        [str(kubectl()), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """The objects of ``kind`` (whose name starts with ``name``: generated ConfigMaps get a hash suffix)."""
    return [
        d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"].startswith(name))
    ]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}*, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def validate(doc: dict[str, Any], version: str) -> None:
    """Strict schema validation (unknown fields and wrong types fail) for ``version``."""
    kubernetes_validate.validate(doc, version, strict=True)


def crd_problems(doc: dict[str, Any]) -> list[str]:
    """What a ServiceMonitor or PodMonitor lacks of the fields the operator requires to scrape, or an
    InferencePool / HTTPRoute of what routing to the pool needs."""
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
    spec = doc.get("spec") or {}
    problems = []
    if not name:
        problems.append(f"{kind}: no metadata.name")
    if kind in ("InferencePool", "HTTPRoute"):
        return problems + _gateway_problems(kind, name, spec)
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (
        selector.get("matchLabels") or selector.get("matchExpressions")
    ):
        problems.append(f"{kind} {name}: spec.selector selects nothing")
    key = "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
    endpoints = spec.get(key)
    if not isinstance(endpoints, list) or not endpoints:
        problems.append(f"{kind} {name}: spec.{key} is empty")
    for i, e in enumerate(endpoints or []):
        if not isinstance(e, dict) or not (e.get("port") or e.get("targetPort")):
            problems.append(f"{kind} {name}: spec.{key}[{i}] names no port")
        elif not str(e.get("path", "/metrics")).startswith("/"):
            problems.append(f"{kind} {name}: spec.{key}[{i}].path is not absolute")
    return problems


def _gateway_problems(kind: str, name: Any, spec: dict[str, Any]) -> list[str]:
    if kind == "InferencePool":
        problems = []
        if not (spec.get("selector") or {}).get("matchLabels"):
            problems.append(f"InferencePool {name}: spec.selector.matchLabels selects nothing")
        if not spec.get("targetPorts"):
            problems.append(f"InferencePool {name}: spec.targetPorts is empty")
        if not (spec.get("endpointPickerRef") or {}).get("name"):
            problems.append(f"InferencePool {name}: spec.endpointPickerRef names no picker")
        return problems
    backends = [b for r in spec.get("rules") or [] for b in r.get("backendRefs") or []]
    problems = [] if spec.get("parentRefs") else [f"HTTPRoute {name}: spec.parentRefs is empty"]
    if not any(b.get("kind") == "InferencePool" for b in backends):
        problems.append(f"HTTPRoute {name}: no rule sends to an InferencePool")
    return problems


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(``Kind/name``, pod template metadata, pod spec) of every workload in ``docs``."""
    for d in docs:
        if d.get("kind") in POD_TEMPLATE_KINDS:
            template = d["spec"]["template"]
            yield f"{d['kind']}/{d['metadata']['name']}", template.get("metadata", {}), template["spec"]


def image_problem(image: str) -> str | None:
    """Why ``image`` is not pinned (no tag, or ``latest``), or None."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image!r} has no tag"
    if last.rsplit(":", 1)[1] == "latest":
        return f"image {image!r} uses the latest tag"
    return None


def _container_problems(where: str, pod: dict[str, Any], c: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    who = f"{where} container {c.get('name')}"
    sc = c.get("securityContext") or {}
    pod_sc = pod.get("securityContext") or {}
    if sc.get("runAsNonRoot") is not True and pod_sc.get("runAsNonRoot") is not True:
        problems.append(f"{who}: runAsNonRoot is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{who}: allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        problems.append(f"{who}: privileged")
    if (sc.get("capabilities") or {}).get("drop") != ["ALL"] or (sc.get("capabilities") or {}).get("add"):
        problems.append(f"{who}: capabilities are not exactly drop [ALL]")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp != "RuntimeDefault":
        problems.append(f"{who}: seccompProfile is {seccomp!r}, not RuntimeDefault")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{who}: root filesystem is not read-only")
    if (sc.get("runAsUser") == 0) or (pod_sc.get("runAsUser") == 0):
        problems.append(f"{who}: runs as uid 0")
    resources = c.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for key in ("cpu", "memory"):
        if key not in requests:
            problems.append(f"{who}: no {key} request")
    if "memory" not in limits:
        problems.append(f"{who}: no memory limit")
    if not limits:
        problems.append(f"{who}: no limits")
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
    tmp = mounts.get("/tmp")
    if tmp is None or "emptyDir" not in volumes.get(tmp["name"], {}):
        problems.append(f"{who}: /tmp is not an emptyDir (the root filesystem is read-only)")
    if problem := image_problem(str(c.get("image", ""))):
        problems.append(f"{who}: {problem}")
    for e in c.get("env") or []:
        # A *_FILE variable holds the path of a mounted Secret, not the secret.
        if _SECRET_NAME.search(e["name"]) and "value" in e and not e["name"].endswith("_FILE"):
            problems.append(f"{who}: env {e['name']} holds a value; use a secretKeyRef or a mounted Secret")
    return problems


def policy_violations(docs: list[dict[str, Any]]) -> list[str]:
    """Every way the objects break the deployment policy (empty = compliant).

    Containers: hardened securityContext, requests and limits, /tmp on an emptyDir, pinned images,
    no secret values in the environment. Services: no Secret objects, no ConfigMap value that
    looks like a credential, no ``latest`` images anywhere (LORAFLEET_K8S_IMAGE included),
    no cluster-wide RBAC.
    """
    problems: list[str] = []
    for where, _meta, pod in pod_specs(docs):
        for c in (pod.get("initContainers") or []) + pod["containers"]:
            problems += _container_problems(where, pod, c)
    for d in docs:
        kind, name = d.get("kind"), d.get("metadata", {}).get("name")
        if kind == "Secret":
            problems.append(f"Secret/{name}: manifests must not carry secrets; reference them instead")
        if kind in ("ClusterRole", "ClusterRoleBinding"):
            problems.append(f"{kind}/{name}: the services need no cluster-wide permissions")
        if kind == "ConfigMap":
            for key, value in (d.get("data") or {}).items():
                if _SECRET_NAME.search(key):
                    problems.append(f"ConfigMap/{name}: key {key} looks like a credential")
                if key.endswith("_IMAGE") and (problem := image_problem(str(value))):
                    problems.append(f"ConfigMap/{name}: {key}: {problem}")
    text = yaml.safe_dump_all(docs)
    for match in _SECRET_TEXT.finditer(text):
        problems.append(f"something that looks like a credential in the manifests: {match.group(0)[:12]}...")
    return problems
