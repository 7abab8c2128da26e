"""The Kubernetes manifests (k8s/), without a cluster.

No kube-apiserver can run here (shared/STACK.md), so: the real kubectl renders every overlay with its
built-in kustomize; every object passes the Kubernetes JSON schemas strictly (kubernetes-validate,
1.30 and the newest bundled version; the Prometheus operator's kinds have no bundled schema and are
checked for the fields the operator needs); a policy check goes over every rendered pod; the real
kubectl applies each overlay to KMock, an HTTP emulator of the API server (it stores what it gets,
runs no controllers and checks no schemas: the schema checks above do that; ``KubectlEmulator`` adds
the core-group discovery and Namespace paths kubectl needs); and the training Job the
trainer's launcher renders from the overlay's own settings and template is validated the same way.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import copy
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import kmock as km
import pytest
from k8s_utils import (
    CRD_KINDS,
    CRD_OVERLAY,
    K8S_DIR,
    OVERLAYS,
    VERSIONS,
    KubectlEmulator,
    crd_problems,
    find,
    kubectl,
    kustomize,
    one,
    pod_specs,
    policy_violations,
    validate,
)
from kubernetes import client as k8s_client

from services.dashboard import settings as dashboard_settings
from services.inference import server as inference_server
from services.inference.metrics import InferenceMetrics
from services.trainer import k8s_objects
from services.trainer import server as trainer_server
from services.trainer.k8s_objects import K8sSettings, load_job_template, render_attempt
from services.trainer.launchers import kubernetes as k8s_launcher
from services.trainer.launchers.base import AttemptRequest
from services.trainer.metrics import TrainerMetrics

TEMPLATE = K8S_DIR / "base" / "training-job-template.yaml"
NS = "lorafleet"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every overlay (and the base), rendered once by the real kubectl."""
    out = {name: kustomize(K8S_DIR / "overlays" / name) for name in OVERLAYS}
    out["base"] = kustomize(K8S_DIR / "base")
    return out


def trainer_config(docs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(one(docs, "ConfigMap", "lorafleet-trainer-config")["data"])


def overlay_settings(docs: list[dict[str, Any]], tmp_path: Path) -> K8sSettings:
    """What the in-cluster trainer's launcher reads: its ConfigMap, with the template ConfigMap's file.

    The Deployment mounts the template ConfigMap at the directory of LORAFLEET_K8S_JOB_TEMPLATE; here
    the file is written where that mount would put it, under ``tmp_path``.
    """
    env = trainer_config(docs)
    mounted = Path(env["LORAFLEET_K8S_JOB_TEMPLATE"])
    template_cm = one(docs, "ConfigMap", "lorafleet-training-job-template")
    local = tmp_path / mounted.relative_to("/")
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(template_cm["data"][mounted.name], encoding="utf-8")
    env["LORAFLEET_K8S_JOB_TEMPLATE"] = str(local)
    env.setdefault(
        "LORAFLEET_K8S_NAMESPACE", one(docs, "Deployment", "lorafleet-trainer")["metadata"]["namespace"]
    )
    return K8sSettings.from_env(env)


def gpu_request(nodes: int = 2, gpus: int = 8) -> AttemptRequest:
    run = Path("/data/runs/jobs/0123456789ab")
    return AttemptRequest(
        job_id="0123456789ab",
        attempt=1,
        config_path=run / "config.yaml",
        attempt_dir=run / "attempt-1",
        nodes=nodes,
        gpus_per_node=gpus,
        processes_per_node=max(gpus, 1),
        resources={"cpu": "32", "memory": "256Gi"},
    )


# -- 1. every overlay renders and every object passes the schemas ------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", [*OVERLAYS, "base"])
def test_every_object_passes_strict_schema_validation(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, version: str
) -> None:
    docs = rendered[overlay]
    assert len(docs) >= 15
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_KINDS:
            assert overlay == CRD_OVERLAY[key], (
                f"{key} outside the monitoring overlay: apply fails without the CRD"
            )
            assert crd_problems(doc) == []
        else:
            validate(doc, version)
        assert doc["metadata"].get("namespace", NS) == NS


def test_only_the_monitoring_overlay_has_operator_kinds(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {o: {d["kind"] for d in docs} for o, docs in rendered.items()}
    assert {"ServiceMonitor", "PodMonitor"} <= kinds["monitoring"]
    for overlay in ("base", "cpu-dev", "gpu"):
        assert not {"ServiceMonitor", "PodMonitor"} & kinds[overlay]


def test_crd_check_catches_a_monitor_without_endpoints(rendered: dict[str, list[dict[str, Any]]]) -> None:
    monitor = copy.deepcopy(one(rendered["monitoring"], "ServiceMonitor", "lorafleet"))
    monitor["spec"]["endpoints"] = []
    monitor["spec"]["selector"] = {}
    assert len(crd_problems(monitor)) == 2


# -- 2. the policy over the rendered objects ---------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy_holds_for_every_overlay(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    assert policy_violations(rendered[overlay]) == []


def test_policy_catches_each_kind_of_violation(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The policy can fail: one broken copy per rule."""
    docs = rendered["gpu"]

    def broken(change: Any) -> list[str]:
        copied = copy.deepcopy(docs)
        change(copied)
        return policy_violations(copied)

    def container(d: list[dict[str, Any]]) -> dict[str, Any]:
        return one(d, "Deployment", "lorafleet-inference")["spec"]["template"]["spec"]["containers"][0]

    cases = {
        "capabilities": lambda d: container(d)["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
        "allowPrivilegeEscalation": lambda d: container(d)["securityContext"].update(
            allowPrivilegeEscalation=True
        ),
        "read-only": lambda d: container(d)["securityContext"].pop("readOnlyRootFilesystem"),
        "memory limit": lambda d: container(d)["resources"]["limits"].pop("memory"),
        "latest tag": lambda d: container(d).update(image="registry.example.com/x:latest"),
        "no tag": lambda d: trainer_cm(d).update(LORAFLEET_K8S_IMAGE="registry.example.com/worker"),
        "holds a value": lambda d: container(d)["env"].append({"name": "HF_TOKEN", "value": "x"}),
        "looks like a credential": lambda d: trainer_cm(d).update(X="hf_" + "a" * 34),
        "must not carry secrets": lambda d: d.append({"kind": "Secret", "metadata": {"name": "s"}}),
        "cluster-wide": lambda d: d.append({"kind": "ClusterRole", "metadata": {"name": "r"}}),
        "/tmp": lambda d: container(d).update(
            volumeMounts=[m for m in container(d)["volumeMounts"] if m["mountPath"] != "/tmp"]
        ),
    }

    def trainer_cm(d: list[dict[str, Any]]) -> dict[str, Any]:
        data: dict[str, Any] = one(d, "ConfigMap", "lorafleet-trainer-config")["data"]
        return data

    for expected, change in cases.items():
        found = broken(change)
        assert len(found) == 1 and expected in found[0], (expected, found)


def _probe_port(probe: dict[str, Any]) -> Any:
    handler = next(k for k in ("grpc", "httpGet", "tcpSocket") if k in probe)
    return handler, probe[handler]["port"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_have_probes_on_numeric_ports(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    expected = {"lorafleet-trainer": 50051, "lorafleet-inference": 50052}
    for name, port in expected.items():
        [c] = one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == port
        # gRPC health for startup and readiness, on the number (a named port is rejected for grpc).
        assert _probe_port(c["startupProbe"]) == ("grpc", port)
        assert _probe_port(c["readinessProbe"]) == ("grpc", port)
        assert _probe_port(c["livenessProbe"]) == ("tcpSocket", port)
    inference = one(docs, "Deployment", "lorafleet-inference")["spec"]["template"]["spec"]["containers"][0]
    startup = inference["startupProbe"]
    # Sized for loading a base model: at least 10 minutes before the kubelet gives up.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    if overlay in ("gpu", "monitoring"):
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 900
    [dash] = one(docs, "Deployment", "lorafleet-dashboard")["spec"]["template"]["spec"]["containers"]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert dash[kind]["httpGet"] == {"path": "/_stcore/health", "port": 8501}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_annotations_match_the_metrics_ports(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    for name, port in {
        "lorafleet-trainer": 9101,
        "lorafleet-inference": 9102,
        "lorafleet-dashboard": 9103,
    }.items():
        deployment = one(docs, "Deployment", name)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert (
            annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        )
        [c] = deployment["spec"]["template"]["spec"]["containers"]
        assert {"name": "metrics", "containerPort": port} in c["ports"]
        assert annotations["prometheus.io/port"] == str(port)
        service = one(docs, "Service", name)
        assert service["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        assert {p["name"] for p in service["spec"]["ports"]} >= {"metrics"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve_and_services_select_their_pods(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """ConfigMaps, claims and service accounts a pod names exist; Secrets are only referenced."""
    docs = rendered[overlay]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    training_labels = k8s_objects.pod_selector("lf-x-a1")
    for where, meta, pod in pod_specs(docs):
        account = pod.get("serviceAccountName")
        assert account is None or ("ServiceAccount", account) in names, where
        for v in pod.get("volumes") or []:
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names, where
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names, where
        for c in pod["containers"]:
            for source in c.get("envFrom") or []:
                assert ("ConfigMap", source["configMapRef"]["name"]) in names, where
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in ("lorafleet-auth", "lorafleet-hub") and ref["key"] == "token"
        # No Service of ours may select training pods (nor the other way round).
        assert not training_labels.items() <= meta["labels"].items(), where
    for service in find(docs, "Service"):
        selector = service["spec"]["selector"]
        assert not selector.items() <= training_labels.items(), service["metadata"]["name"]
        matching = [meta for _, meta, _ in pod_specs(docs) if selector.items() <= meta["labels"].items()]
        assert len(matching) == 1, service["metadata"]["name"]
    config = trainer_config(docs)
    for volume in ("MODELS", "DATASETS", "ADAPTERS", "RUNS"):
        assert ("PersistentVolumeClaim", config[f"LORAFLEET_K8S_{volume}_PVC"]) in names
    assert ("ServiceAccount", config["LORAFLEET_K8S_SERVICE_ACCOUNT"]) in names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servers_read_their_token_from_the_mounted_secret(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """The trainer and inference servers get their bearer token as a file from the lorafleet-auth
    Secret (services/common/auth.py), never as an argument or an environment value."""
    docs = rendered[overlay]
    for name, upper in (("trainer", "TRAINER"), ("inference", "INFERENCE")):
        pods = [
            (meta, pod)
            for _, meta, pod in pod_specs(docs)
            if any(c["name"] == name for c in pod["containers"])
        ]
        assert len(pods) == 1, name
        _, pod = pods[0]
        container = next(c for c in pod["containers"] if c["name"] == name)
        env = {e["name"]: e for e in container.get("env") or []}
        token_file = env[f"LORAFLEET_{upper}_AUTH_TOKEN_FILE"]["value"]
        assert f"LORAFLEET_{upper}_AUTH_TOKEN" not in env
        assert not any(
            "token" in str(a).lower() for a in [*container.get("command", []), *container.get("args", [])]
        )
        mount = next(m for m in container["volumeMounts"] if token_file.startswith(m["mountPath"] + "/"))
        assert mount.get("readOnly") is True
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "lorafleet-auth"
        assert [i["path"] for i in volume["secret"]["items"]] == [token_file.rsplit("/", 1)[1]]


def test_shared_volumes_are_mounted_where_the_launcher_expects_them(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The trainer sees each shared volume at the path the training pods get (the paths are the contract)."""
    docs = rendered["gpu"]
    pod = one(docs, "Deployment", "lorafleet-trainer")["spec"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = {
        claims[m["name"]]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] in claims
    }
    config = trainer_config(docs)
    for volume in ("MODELS", "DATASETS", "ADAPTERS", "RUNS"):
        assert mounts[config[f"LORAFLEET_K8S_{volume}_PVC"]] == config[f"LORAFLEET_K8S_{volume}_PATH"]
    assert config["LORAFLEET_TRAINER_STATE_DIR"] == config["LORAFLEET_K8S_RUNS_PATH"]
    assert config["LORAFLEET_TRAINER_ADAPTERS_ROOT"] == config["LORAFLEET_K8S_ADAPTERS_PATH"]
    for claim in find(docs, "PersistentVolumeClaim"):
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_gpu_overlay_asks_for_gpus(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["gpu"]
    pod = one(docs, "Deployment", "lorafleet-inference")["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["medium"] == "Memory"
    model = one(docs, "ConfigMap", "lorafleet-inference-config")["data"]["LORAFLEET_INFERENCE_MODEL"]
    assert re.fullmatch(r"[\w.-]+=/data/models/\S+:nf4", model), model
    for overlay in ("cpu-dev",):
        assert "nvidia.com/gpu" not in json.dumps(rendered[overlay])


# -- the containers run the CLI, with settings the services really read ---------------------------------


def _container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [c] = one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
    return c


def _config(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    return dict(one(docs, "ConfigMap", name)["data"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servers_run_the_cli_with_settings_they_read(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each LORAFLEET_* key of the services' ConfigMaps is a flag's variable, parsed by the service's own
    argument parser (services/*/server.py, services/dashboard/settings.py) to the value set here."""
    docs = rendered[overlay]
    for name, command in (
        ("lorafleet-trainer", "trainer-server"),
        ("lorafleet-inference", "inference-server"),
    ):
        c = _container(docs, name)
        assert c["command"] == ["python", "-m", "services.cli", command] and not c.get("args"), name
    for key in [k for k in os.environ if k.startswith("LORAFLEET_")]:
        monkeypatch.delenv(key)

    trainer = _config(docs, "lorafleet-trainer-config")
    for key, value in trainer.items():
        if key.startswith("LORAFLEET_"):
            monkeypatch.setenv(key, value)
    args = vars(trainer_server.build_parser().parse_args([]))
    for key, value in trainer.items():
        if key.startswith("LORAFLEET_TRAINER_"):
            dest = key.removeprefix("LORAFLEET_TRAINER_").lower()
            assert dest in args, f"the trainer has no --{dest.replace('_', '-')} ({key})"
            parsed = args[dest]
            shown = ",".join(parsed) if isinstance(parsed, list) else str(parsed)  # list flags read a,b
            assert shown == value, (key, parsed)
        elif key.startswith("LORAFLEET_K8S_"):
            assert f'"{key.removeprefix("LORAFLEET_K8S_")}"' in inspect.getsource(K8sSettings.from_env), key
        else:
            assert not key.startswith("LORAFLEET_"), key
    assert args["launcher"] == "kubernetes" and args["host"] == "0.0.0.0"

    inference = _config(docs, "lorafleet-inference-config")
    for key, value in inference.items():
        if key.startswith("LORAFLEET_"):
            monkeypatch.setenv(key, value)
    args = vars(inference_server.build_parser().parse_args([]))
    settings = inference_server.settings_from_args(argparse.Namespace(**args))
    for key, value in inference.items():
        if key == "LORAFLEET_INFERENCE_MODEL":
            assert [f"{m.name}={m.path}" for m in settings.models] == [
                m.split(":")[0] for m in value.split(",")
            ]
        elif key.startswith("LORAFLEET_INFERENCE_"):
            dest = key.removeprefix("LORAFLEET_INFERENCE_").lower()
            assert dest in args, f"the inference server has no --{dest.replace('_', '-')} ({key})"
            parsed = args[dest]
            shown = ",".join(parsed) if isinstance(parsed, list) else str(parsed)  # list flags read a,b
            assert shown == value, (key, parsed)
        else:
            assert not key.startswith("LORAFLEET_"), key
    assert settings.adapters_root == _config(docs, "lorafleet-trainer-config")["LORAFLEET_K8S_ADAPTERS_PATH"]

    dashboard = _config(docs, "lorafleet-dashboard-config")
    env = {e["name"]: e for e in _container(docs, "lorafleet-dashboard").get("env", [])}
    known = {var for _, var, _ in dashboard_settings._FLAGS}
    assert set(dashboard) | set(env) <= known, (set(dashboard) | set(env)) - known
    parsed = dashboard_settings.parse_settings([], dict(dashboard))
    assert parsed.trainer_addr == "lorafleet-trainer:50051"
    assert parsed.inference_addr == "lorafleet-inference:50052"
    # The addresses name our Services and their gRPC ports.
    for addr in (parsed.trainer_addr, parsed.inference_addr):
        host, port = addr.split(":")
        grpc_port = one(docs, "Service", host)["spec"]["ports"][0]
        assert grpc_port["name"] == "grpc" and grpc_port["port"] == int(port), addr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_kv_cache_budget_fits_the_inference_container(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """``--kv-cache-mb`` is set, and on CPU pods (where the cache is host memory) it leaves at least
    half of the container's memory limit to the weights, adapters and activations."""
    docs = rendered[overlay]
    budget_mib = float(_config(docs, "lorafleet-inference-config")["LORAFLEET_INFERENCE_KV_CACHE_MB"])
    assert budget_mib > 0
    resources = _container(docs, "lorafleet-inference")["resources"]
    if "nvidia.com/gpu" in resources["limits"]:
        return  # the cache lives in GPU memory: the overlay's comment sizes it for the GPU
    limit = resources["limits"]["memory"]
    units = {"Mi": 1, "Gi": 1024}
    limit_mib = float(limit[:-2]) * units[limit[-2:]]
    assert budget_mib <= limit_mib / 2, (overlay, budget_mib, limit)


# -- RBAC: exactly the calls the launcher makes --------------------------------------------------------

_VERBS = {
    "create": "create",
    "read": "get",
    "list": "list",
    "delete": "delete",
    "patch": "patch",
    "replace": "update",
}
_GROUPS = {"batch": "batch", "core": ""}


def rules_used_by_the_launcher() -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every ``self.batch.*`` / ``self.core.*`` call in the launcher's source.

    The client's method names encode the request: ``create_namespaced_job`` is create on batch/jobs,
    ``read_namespaced_pod_log`` is get on pods/log.
    """
    source = Path(k8s_launcher.__file__).read_text(encoding="utf-8")
    assert "Watch(" not in source and "watch=" not in source, "a watch needs the watch verb: extend this test"
    used = set()
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        target = node.func.value
        if not (isinstance(target, ast.Attribute) and target.attr in _GROUPS):
            continue
        m = re.fullmatch(
            r"(create|read|list|delete|patch|replace)_namespaced_([a-z]+)(?:_(log|status))?", node.func.attr
        )
        assert m, f"unrecognised API call {node.func.attr}"
        resource = m.group(2) + "s" + (f"/{m.group(3)}" if m.group(3) else "")
        used.add((_GROUPS[target.attr], resource, _VERBS[m.group(1)]))
    return used


def flatten(rules: Any) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_role_grants_exactly_what_the_launcher_calls(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    declared = {(g, r, v) for g, r, verbs in k8s_launcher.RBAC_RULES for v in verbs}
    assert rules_used_by_the_launcher() == declared
    docs = rendered[overlay]
    [role] = find(docs, "Role")
    assert flatten(role["rules"]) == declared
    [binding] = find(docs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    trainer = one(docs, "Deployment", "lorafleet-trainer")["spec"]["template"]["spec"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": trainer["serviceAccountName"], "namespace": NS}
    ]
    assert trainer["automountServiceAccountToken"] is True
    for where, _, pod in pod_specs(docs):
        if pod is not trainer:
            assert pod.get("automountServiceAccountToken") is False, where


# -- 3. the real kubectl applies every overlay to the KMock emulator -----------------------------------


async def kubectl_apply(kmock: km.KubernetesEmulator, overlay: str, tmp_path: Path) -> tuple[int, str]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n", encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        str(kubectl()),
        "--server",
        str(kmock.url).rstrip("/"),
        "apply",
        "--validate=false",
        "-k",
        str(K8S_DIR / "overlays" / overlay),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode or 0, out.decode() + err.decode()


def register_prometheus_operator_crds(kmock: km.KubernetesEmulator) -> None:
    """What installing the Prometheus operator adds to the API server's discovery."""
    for (api_version, kind), (plural, singular) in CRD_KINDS.items():
        kmock.resources[f"{api_version}/{plural}"] = km.ResourceInfo(
            kind=kind,
            singular=singular,
            namespaced=True,
            verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
        )


class TestKubectlApplyAgainstKMock:
    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [
        pytest.mark.integration,
        pytest.mark.asyncio,
        pytest.mark.kmock(cls=KubectlEmulator),
    ]

    @pytest.mark.parametrize("overlay", OVERLAYS)
    async def test_apply_creates_every_object(
        self,
        kmock: km.KubernetesEmulator,
        overlay: str,
        tmp_path: Path,
        rendered: dict[str, list[dict[str, Any]]],
    ) -> None:
        kmock.resources.load_bundled()
        if overlay in CRD_OVERLAY.values():
            register_prometheus_operator_crds(kmock)
        code, output = await kubectl_apply(kmock, overlay, tmp_path)
        assert code == 0, output
        docs = rendered[overlay]
        for doc in docs:
            kind, name = doc["kind"], doc["metadata"]["name"]
            assert re.search(rf"\b{re.escape(name)} (created|configured|unchanged)", output), (
                kind,
                name,
                output,
            )
        posted = [r for r in kmock if r.method == km.method.POST]
        assert isinstance(kmock, KubectlEmulator)
        assert ("POST", "/api/v1/namespaces") in kmock.namespace_requests
        assert len(posted) + len(kmock.namespaces) == len(docs)
        assert kmock.namespaces[NS]["metadata"]["labels"] == one(docs, "Namespace", NS)["metadata"]["labels"]
        # What arrived is what kustomize rendered (the emulator stores the request bodies).
        deployment = one(docs, "Deployment", "lorafleet-trainer")
        stored = kmock.objects["apps/v1/deployments", NS, "lorafleet-trainer"].raw
        assert (
            stored["spec"]["template"]["spec"]["containers"]
            == deployment["spec"]["template"]["spec"]["containers"]
        )

    async def test_monitoring_needs_the_operator_crds(
        self, kmock: km.KubernetesEmulator, tmp_path: Path
    ) -> None:
        """Why ServiceMonitor/PodMonitor live in an overlay: without the CRDs the apply fails."""
        kmock.resources.load_bundled()
        code, output = await kubectl_apply(kmock, "monitoring", tmp_path)
        assert code != 0 and re.search(r"ServiceMonitor|PodMonitor", output), output


# -- 4. the launcher's Job: the shared template, validated the same way ---------------------------------


def test_template_lives_in_one_file_shared_by_kustomize_and_the_package(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    packaged = k8s_objects.default_job_template_path()
    assert packaged.resolve() == TEMPLATE.resolve()  # the package's copy is a link, not a copy
    text = TEMPLATE.read_text(encoding="utf-8")
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        config = trainer_config(docs)
        mounted = Path(config["LORAFLEET_K8S_JOB_TEMPLATE"])
        template_cm = one(docs, "ConfigMap", "lorafleet-training-job-template")
        assert template_cm["data"] == {mounted.name: text}  # verbatim
        pod = one(docs, "Deployment", "lorafleet-trainer")["spec"]["template"]["spec"]
        volume = next(
            v for v in pod["volumes"] if v.get("configMap", {}).get("name") == template_cm["metadata"]["name"]
        )
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
        assert mount["mountPath"] == str(mounted.parent) and mount.get("readOnly") is True
    manifest_files = [p for p in K8S_DIR.rglob("*.yaml") if p != TEMPLATE]
    for path in manifest_files:  # nobody keeps a second Job of the training kind
        assert "podFailurePolicy" not in path.read_text(encoding="utf-8"), path


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", ["gpu", "monitoring"])
def test_launcher_job_for_2_nodes_8_gpus_validates(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, version: str, tmp_path: Path
) -> None:
    docs = rendered[overlay]
    settings = overlay_settings(docs, tmp_path)
    job, service = render_attempt(settings, gpu_request())
    service = k8s_objects.set_job_owner(
        service, job["metadata"]["name"], "4f1c7a36-1b8e-4c3e-9a57-0d2d6c1e9b10"
    )
    for obj in (job, service):
        validate(obj, version)
    assert policy_violations([job]) == []
    # The same as the packaged template renders: the mounted ConfigMap and the package hold one template.
    packaged = K8sSettings(**{**settings.__dict__, "job_template": ""})
    assert render_attempt(packaged, gpu_request()) == render_attempt(settings, gpu_request())

    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    [c] = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    cmd = c["command"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "8" and cmd[cmd.index("--nnodes") + 1] == "2"
    assert c["image"] == trainer_config(docs)["LORAFLEET_K8S_IMAGE"]
    assert c["image"].startswith("registry.example.com/") and c["image"].endswith(":0.1.0")
    assert pod["serviceAccountName"] == "lorafleet-training"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"] == {
        "medium": "Memory",
        "sizeLimit": "32Gi",
    }
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims <= {d["metadata"]["name"] for d in find(docs, "PersistentVolumeClaim")}
    assert job["metadata"]["namespace"] == NS


@pytest.mark.parametrize("version", VERSIONS)
def test_launcher_job_for_cpu_dev_validates(
    rendered: dict[str, list[dict[str, Any]]], version: str, tmp_path: Path
) -> None:
    """The laptop overlay: one node, two CPU ranks, the slim image, no GPU anywhere."""
    docs = rendered["cpu-dev"]
    settings = overlay_settings(docs, tmp_path)
    request = AttemptRequest(
        job_id="0123456789ab",
        attempt=2,
        config_path=Path("/data/runs/jobs/0123456789ab/config.yaml"),
        attempt_dir=Path("/data/runs/jobs/0123456789ab/attempt-2"),
        nodes=1,
        gpus_per_node=0,
        processes_per_node=2,
        resources={"cpu": "2", "memory": "4Gi"},
    )
    job, service = render_attempt(settings, request)
    for obj in (job, k8s_objects.set_job_owner(service, job["metadata"]["name"], "uid-1")):
        validate(obj, version)
    assert policy_violations([job]) == []
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "lorafleet-trainer:0.1.0"
    assert "nvidia.com/gpu" not in json.dumps(job) and "tolerations" not in pod
    # What the overlay lets a submission ask for (the trainer refuses more at submit time).
    launcher = k8s_launcher.KubernetesLauncher(settings, api_client=k8s_client.ApiClient())
    assert (launcher.capacity.max_nodes, launcher.capacity.max_gpus_per_node) == (1, 0)
    assert launcher.capacity.max_processes_per_node == 2


def _fixed_leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """(path, value) of every template leaf that is not a placeholder."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _fixed_leaves(v, (*path, k))]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _fixed_leaves(v, (*path, i))]
    if isinstance(node, str) and "${" in node:
        return []
    return [(path, node)]


def test_rendered_job_carries_every_fixed_field_of_the_template(tmp_path: Path) -> None:
    job_template, service_template = load_job_template(TEMPLATE)
    settings = K8sSettings(namespace=NS, max_nodes=2, max_gpus_per_node=8, job_template=str(TEMPLATE))
    job, service = render_attempt(settings, gpu_request())
    for template, obj, fixed in ((job_template, job, 20), (service_template, service, 5)):
        leaves = _fixed_leaves(template)
        assert len(leaves) >= fixed  # e.g. podFailurePolicy, the securityContexts; clusterIP: None
        for path, value in leaves:
            node: Any = obj
            for key in path:
                node = node[key]
            assert node == value, path


def test_the_launcher_renders_from_the_template_file(tmp_path: Path) -> None:
    """Edit the template and the Job changes; break it and the launcher refuses it."""
    text = TEMPLATE.read_text(encoding="utf-8")
    edited = tmp_path / "edited.yaml"
    edited.write_text(text.replace("backoffLimit: 0", "backoffLimit: 1"), encoding="utf-8")
    job, _ = render_attempt(K8sSettings(namespace=NS, job_template=str(edited)), gpu_request(1, 0))
    assert job["spec"]["backoffLimit"] == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace('command: "${command}"', "command: [sleep, infinity]"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"\$\{command\} is never used"):
        k8s_launcher.KubernetesLauncher(
            K8sSettings(namespace=NS, job_template=str(broken)),
            api_client=object(),  # type: ignore[arg-type]  # never used: the template fails first
        )
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(text + "\n# ${nope}\n", encoding="utf-8")
    load_job_template(unknown)  # comments are not part of the template
    unknown.write_text(
        text.replace("enableServiceLinks: false", 'enableServiceLinks: "${nope}"'), encoding="utf-8"
    )
    with pytest.raises(ValueError, match=r"unknown placeholder \$\{nope\}"):
        load_job_template(unknown)
    with pytest.raises(ValueError, match="job_template"):
        K8sSettings(job_template=str(tmp_path / "missing.yaml"))


# -- monitoring: the Grafana dashboard uses the services' real metric names ----------------------------


def _exported_names() -> set[str]:
    names: set[str] = set()
    for registry in (TrainerMetrics().registry, InferenceMetrics().registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(s.name for s in family.samples)
            # A family with labels has no samples until first used: add the series names it will have.
            if family.type == "histogram":
                names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
            if family.type == "counter":
                names.add(f"{family.name}_total")
    return names


def test_grafana_dashboard_queries_real_metrics(rendered: dict[str, list[dict[str, Any]]]) -> None:
    cm = one(rendered["monitoring"], "ConfigMap", "lorafleet-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["lorafleet-dashboard.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {n for e in exprs for n in re.findall(r"\blorafleet_[a-z0-9_]+", e)}
    assert used and used <= _exported_names(), used - _exported_names()
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("loss", "throughput", "queue", "first token", "tokens/s", "adapter"):
        assert topic in titles, topic
    for family in (
        "job_loss",
        "tokens_per_second",
        "jobs_queued",
        "time_to_first_token",
        "generated_tokens",
        "resident_adapters",
    ):
        assert any(family in n for n in used), family


def test_monitors_select_the_services_and_training_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["monitoring"]
    monitor = one(docs, "ServiceMonitor", "lorafleet")
    [expression] = monitor["spec"]["selector"]["matchExpressions"]
    selected = [
        s
        for s in find(docs, "Service")
        if s["metadata"]["labels"]["app.kubernetes.io/name"] in expression["values"]
    ]
    assert len(selected) == 3
    for service in selected:
        assert any(p["name"] == monitor["spec"]["endpoints"][0]["port"] for p in service["spec"]["ports"])
    pod_monitor = one(docs, "PodMonitor", "lorafleet-training")
    assert (
        pod_monitor["spec"]["selector"]["matchLabels"].items() <= k8s_objects.pod_selector("lf-x-a1").items()
    )
