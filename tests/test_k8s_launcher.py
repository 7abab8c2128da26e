"""The Kubernetes launcher and its Job template, without a cluster.

No kube-apiserver can run here (no Docker engine for kind/k3d/minikube, and no package ships one;
shared/STACK.md). So the rendered objects are checked offline against the Kubernetes JSON schemas
(``kubernetes-validate``, strict: unknown fields and wrong types fail), and the launcher drives the
real ``kubernetes`` client against KMock, an HTTP emulator of the API server. No controllers run in
KMock: the tests play the Job controller by patching the Job's status, and add the pods it would
create. KMock ignores label selectors and does not assign uids; ``ApiServerEmulator`` adds the uid.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import kmock as km
import kubernetes_validate
import pytest
from kubernetes import client as k8s

from services.trainer.k8s_objects import (
    K8sSettings,
    attempt_name,
    job_id_label,
    render_attempt,
    set_job_owner,
)
from services.trainer.launchers.base import EXIT_INVALID, AttemptPhase, AttemptRequest
from services.trainer.launchers.kubernetes import KubernetesLauncher

NS = "lorafleet"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def settings(**overrides: Any) -> K8sSettings:
    base: dict[str, Any] = dict(
        image="registry.example/lorafleet:1.0",
        namespace=NS,
        service_account="lorafleet-train",
        shm_size="8Gi",
        max_nodes=4,
        max_gpus_per_node=8,
    )
    return K8sSettings(**{**base, **overrides})


def request(**overrides: Any) -> AttemptRequest:
    run = Path("/data/runs/jobs/0123456789ab")
    base: dict[str, Any] = dict(
        job_id="0123456789ab",
        attempt=1,
        config_path=run / "config.yaml",
        attempt_dir=run / "attempt-1",
    )
    return AttemptRequest(**{**base, **overrides})


REQUESTS = {
    "cpu-1-node": request(resources={"cpu": "2", "memory": "4Gi"}),
    "gpu-2x4-deepspeed": request(
        nodes=2,
        processes_per_node=4,
        gpus_per_node=4,
        launcher="deepspeed",
        deepspeed=True,
        resources={"cpu": "16", "memory": "64Gi"},
    ),
    "gpu-2x4-torchrun": request(nodes=2, gpus_per_node=4, resources={"cpu": "500m", "memory": "8589934592"}),
}


def container(job: dict[str, Any]) -> dict[str, Any]:
    [c] = job["spec"]["template"]["spec"]["containers"]
    return c


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(job)["env"]}


def arg_after(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


# -- (a) schema validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_rendered_objects_pass_strict_schema_validation(name: str, version: str) -> None:
    job, service = render_attempt(settings(), REQUESTS[name])
    service = set_job_owner(service, job["metadata"]["name"], str(uuid.uuid4()))
    for obj in (job, service):
        kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_catches_a_broken_template() -> None:
    """The validation above can fail: the same Job with a string backoffLimit or an unknown field does."""
    job, _ = render_attempt(settings(), REQUESTS["cpu-1-node"])
    bad_type = json.loads(json.dumps(job))
    bad_type["spec"]["backoffLimit"] = "0"
    unknown = json.loads(json.dumps(job))
    container(unknown)["securityContext"]["readonlyRootFilesystem"] = True
    for broken in (bad_type, unknown):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_names_and_labels_are_valid(name: str) -> None:
    job, service = render_attempt(settings(), REQUESTS[name])
    for obj in (job, service):
        assert DNS1035.match(obj["metadata"]["name"]) and len(obj["metadata"]["name"]) <= 50
        for value in obj["metadata"]["labels"].values():
            assert LABEL_VALUE.match(value) and len(value) <= 63
    volume_names = [v["name"] for v in job["spec"]["template"]["spec"]["volumes"]]
    assert len(set(volume_names)) == len(volume_names)
    assert {m["name"] for m in container(job)["volumeMounts"]} == set(volume_names)


# -- (b) the Job's content --------------------------------------------------------------------------


def test_multi_node_gpu_job() -> None:
    job, service = render_attempt(settings(), REQUESTS["gpu-2x4-torchrun"])
    name, svc = job["metadata"]["name"], service["metadata"]["name"]
    assert name == "lf-0123456789ab-a1"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 3 * 24 * 3600 and spec["ttlSecondsAfterFinished"] == 24 * 3600
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [EXIT_INVALID]},
    }
    assert rules[1] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == svc and pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "lorafleet-train" and pod["automountServiceAccountToken"] is False

    c = container(job)
    assert c["image"] == "registry.example/lorafleet:1.0"
    assert c["resources"] == {
        "requests": {"cpu": "500m", "memory": "8589934592"},
        "limits": {"memory": "8589934592", "nvidia.com/gpu": "4"},
    }
    cmd = c["command"]
    assert cmd[:3] == ["python", "-m", "lorafleet.torchrun"]
    assert arg_after(cmd, "--nnodes") == "2"
    assert arg_after(cmd, "--nproc_per_node") == c["resources"]["limits"]["nvidia.com/gpu"]
    assert arg_after(cmd, "--node_rank") == "$(JOB_COMPLETION_INDEX)"
    assert arg_after(cmd, "--master_addr") == f"{name}-0.{svc}"
    assert arg_after(cmd, "--master_port") == "29500"
    assert cmd[-3:] == ["-m", "services.trainer.recipe", "/data/runs/jobs/0123456789ab/config.yaml"]

    env = env_of(job)
    assert c["env"][0]["name"] == "JOB_COMPLETION_INDEX"  # defined before its use in $(...)
    assert env["JOB_COMPLETION_INDEX"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert env["LORAFLEET_NNODES"] == "2" and env["LORAFLEET_NPROC_PER_NODE"] == "4"
    assert env["LORAFLEET_MASTER_ADDR"] == f"{name}-0.{svc}" and env["LORAFLEET_MASTER_PORT"] == "29500"
    assert env["HOME"] == "/var/cache/lorafleet"
    # The run's own /metrics (services/trainer/run_metrics.py) on the port the PodMonitor scrapes.
    assert env["LORAFLEET_TRAINING_METRICS_PORT"] == "9400"
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in c["ports"]
    overridden = env_of(
        render_attempt(settings(env={"HOME": "/h", "LORAFLEET_NNODES": "9"}), REQUESTS["gpu-2x4-torchrun"])[0]
    )
    assert (
        overridden["HOME"] == "/h" and overridden["LORAFLEET_NNODES"] == "2"
    )  # the topology is not negotiable
    assert "DS_ACCELERATOR" not in env  # a GPU run uses CUDA

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    for vol, claim, path, read_only in [
        ("models", "lorafleet-models", "/data/models", True),
        ("datasets", "lorafleet-datasets", "/data/datasets", True),
        ("adapters", "lorafleet-adapters", "/data/adapters", False),
        ("runs", "lorafleet-runs", "/data/runs", False),
    ]:
        assert volumes[vol]["persistentVolumeClaim"] == {"claimName": claim}
        assert mounts[vol]["mountPath"] == path and mounts[vol].get("readOnly", False) is read_only
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    assert mounts["tmp"]["mountPath"] == "/tmp" and "emptyDir" in volumes["tmp"]
    assert mounts["cache"]["mountPath"] == "/var/cache/lorafleet" and "emptyDir" in volumes["cache"]

    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"] == 1000
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]

    labels = spec["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "lorafleet-trainer"
    assert labels["lorafleet.io/job-id"] == "0123456789ab" and labels["lorafleet.io/attempt"] == "1"
    assert job["metadata"]["labels"] == labels

    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= labels.items()  # selects exactly this attempt's pods
    assert "ownerReferences" not in service["metadata"]


def test_deepspeed_job_uses_the_deepspeed_launcher() -> None:
    job, service = render_attempt(settings(), REQUESTS["gpu-2x4-deepspeed"])
    cmd = container(job)["command"]
    assert cmd[:3] == ["python", "-m", "deepspeed.launcher.runner"]
    assert arg_after(cmd, "--num_nodes") == "2" and arg_after(cmd, "--num_gpus") == "4"
    assert arg_after(cmd, "--node_rank") == "$(JOB_COMPLETION_INDEX)"
    assert arg_after(cmd, "--master_addr") == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert "--no_ssh" in cmd and cmd[-1] == str(REQUESTS["gpu-2x4-deepspeed"].config_path)


def test_single_cpu_process_runs_the_recipe_directly() -> None:
    job, _ = render_attempt(settings(), REQUESTS["cpu-1-node"])
    c = container(job)
    assert c["command"] == [
        "python",
        "-m",
        "services.trainer.recipe",
        "/data/runs/jobs/0123456789ab/config.yaml",
    ]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert "tolerations" not in job["spec"]["template"]["spec"]
    env = env_of(job)
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "2"  # the CPU request, one process


def test_cpu_processes_share_the_cpu_request() -> None:
    job, _ = render_attempt(settings(), request(processes_per_node=4, resources={"cpu": "8"}))
    cmd = container(job)["command"]
    assert arg_after(cmd, "--nproc_per_node") == "4" and arg_after(cmd, "--nnodes") == "1"
    assert env_of(job)["OMP_NUM_THREADS"] == "2"


def test_dollar_signs_in_paths_are_not_expanded_by_kubernetes() -> None:
    job, _ = render_attempt(settings(), request(config_path=Path("/data/runs/$(HOME)/config.yaml")))
    assert container(job)["command"][-1] == "/data/runs/$$(HOME)/config.yaml"


def test_names_are_deterministic_bounded_and_distinct() -> None:
    assert attempt_name("0123456789ab", 3) == attempt_name("0123456789ab", 3) == "lf-0123456789ab-a3"
    assert attempt_name("0123456789ab", 3) != attempt_name("0123456789ab", 4)
    odd = ["Job_ID.1", "job-id-1", "JOB-ID-1", "x" * 200, "x" * 201, "--", "Ünïcode"]
    names = [attempt_name(j, 12) for j in odd]
    assert len(set(names)) == len(names)
    for n in names:
        assert DNS1035.match(n) and len(n) <= 50, n
    for j in odd:
        value = job_id_label(j)
        assert LABEL_VALUE.match(value) and len(value) <= 63


def test_set_job_owner_returns_an_owned_copy() -> None:
    _, service = render_attempt(settings(), REQUESTS["cpu-1-node"])
    owned = set_job_owner(service, "lf-0123456789ab-a1", "uid-1")
    assert owned["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": "lf-0123456789ab-a1",
            "uid": "uid-1",
            "controller": True,
        }
    ]
    assert "ownerReferences" not in service["metadata"]
    assert set_job_owner(owned, "lf-0123456789ab-a1", "uid-1") == owned  # no duplicate reference
    with pytest.raises(ValueError, match="uid"):
        set_job_owner(service, "lf-0123456789ab-a1", "")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"config_path": Path("/elsewhere/config.yaml")}, "not on the runs volume"),
        ({"processes_per_node": 8, "gpus_per_node": 4}, "cannot share"),
        ({"resources": {"nvidia.com/gpu": "2"}}, "unsupported resources"),
        ({"resources": {"memory": "lots"}}, "not a Kubernetes quantity"),
        ({"launcher": "mpirun"}, "launcher"),
        ({"nodes": 0}, "at least one node"),
    ],
)
def test_requests_the_template_cannot_run_are_refused(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_attempt(settings(), request(**overrides))


def test_volumes_without_a_claim_are_left_out() -> None:
    job, _ = render_attempt(settings(models_claim="", datasets_claim=""), REQUESTS["cpu-1-node"])
    names = {v["name"] for v in job["spec"]["template"]["spec"]["volumes"]}
    assert names == {"adapters", "runs", "dshm", "tmp", "cache"}
    with pytest.raises(ValueError, match="runs_claim"):
        settings(runs_claim="")


def test_settings_from_env() -> None:
    s = K8sSettings.from_env(
        {
            "LORAFLEET_K8S_IMAGE": "img:2",
            "LORAFLEET_K8S_NAMESPACE": "train",
            "LORAFLEET_K8S_RUNS_PVC": "runs-rwx",
            "LORAFLEET_K8S_RUNS_PATH": "/srv/runs",
            "LORAFLEET_K8S_MODELS_PVC": "",
            "LORAFLEET_K8S_MAX_NODES": "8",
            "LORAFLEET_K8S_MAX_GPUS_PER_NODE": "4",
            "LORAFLEET_K8S_ACTIVE_DEADLINE_SECONDS": "3600",
            "LORAFLEET_K8S_IMAGE_PULL_SECRETS": "a, b",
            "LORAFLEET_K8S_NODE_SELECTOR": "pool=gpu,zone=a",
            "LORAFLEET_K8S_TOLERATIONS": '[{"key": "dedicated", "operator": "Exists"}]',
            "LORAFLEET_K8S_ENV": '{"HF_HUB_OFFLINE": 1}',
            "LORAFLEET_K8S_METRICS_PORT": "9500",
        }
    )
    assert s.metrics_port == 9500
    assert (s.image, s.namespace, s.runs_claim, s.runs_mount_path) == (
        "img:2",
        "train",
        "runs-rwx",
        "/srv/runs",
    )
    assert s.models_claim == "" and s.datasets_claim == "lorafleet-datasets"
    assert (s.max_nodes, s.max_gpus_per_node, s.active_deadline_seconds) == (8, 4, 3600)
    assert s.image_pull_secrets == ("a", "b") and s.node_selector == {"pool": "gpu", "zone": "a"}
    assert s.tolerations == ({"key": "dedicated", "operator": "Exists"},) and s.env == {"HF_HUB_OFFLINE": "1"}
    assert K8sSettings.from_env({}) == K8sSettings()
    with pytest.raises(ValueError, match="MAX_NODES"):
        K8sSettings.from_env({"LORAFLEET_K8S_MAX_NODES": "many"})
    with pytest.raises(ValueError, match="metrics_port 29500"):
        K8sSettings(metrics_port=29500)  # the rendezvous port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration
def test_torchrun_shim_exits_with_the_failed_ranks_status(tmp_path: Path) -> None:
    """Plain torchrun exits 1 whatever its ranks returned; the pod must exit 2 for the FailJob rule."""
    script = tmp_path / "invalid.py"
    script.write_text(f"import sys\nsys.exit({EXIT_INVALID})\n", encoding="utf-8")
    torchrun_args = [
        "--nnodes",
        "1",
        "--nproc_per_node",
        "1",
        "--node_rank",
        "0",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(script),
    ]
    shim = subprocess.run(
        [sys.executable, "-m", "lorafleet.torchrun", *torchrun_args], capture_output=True, timeout=120
    )
    assert shim.returncode == EXIT_INVALID, shim.stderr.decode()[-2000:]


# -- (c) the launcher against KMock ----------------------------------------------------------------


class ApiServerEmulator(km.KubernetesEmulator):
    """KMock, plus the one thing of the API server's create the launcher relies on: ``metadata.uid``."""

    async def _handle(self, request: km.Request) -> Any:
        if request.action == km.action.CREATE and isinstance(request.data, dict):
            request.data.setdefault("metadata", {}).setdefault("uid", str(uuid.uuid4()))
        return await super()._handle(request)


JOBS, SERVICES, PODS = "batch/v1/jobs", "v1/services", "v1/pods"


@pytest.fixture
def api(kmock: km.KubernetesEmulator) -> Iterator[k8s.ApiClient]:
    kmock.resources.load_bundled()
    configuration = k8s.Configuration()
    configuration.host = str(kmock.url).rstrip("/")
    client = k8s.ApiClient(configuration)
    yield client
    client.close()


@pytest.fixture
def launcher(api: k8s.ApiClient) -> KubernetesLauncher:
    return KubernetesLauncher(settings(), api_client=api)


async def set_job_status(api: k8s.ApiClient, handle: dict[str, Any], status: dict[str, Any]) -> None:
    """Play the Job controller: write the Job's status through the API, as the controller does."""
    batch = k8s.BatchV1Api(api)
    await asyncio.to_thread(
        batch.patch_namespaced_job_status, handle["job_name"], handle["namespace"], {"status": status}
    )


def add_pod(
    kmock: km.KubernetesEmulator, job_name: str, index: int, terminated: dict[str, Any] | None = None
) -> str:
    """Play the Job controller: a pod of the attempt, optionally with a terminated trainer container."""
    name = f"{job_name}-{index}-{uuid.uuid4().hex[:5]}"
    status: dict[str, Any] = {"phase": "Running"}
    if terminated is not None:
        status = {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "image": "x",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                },
            ],
        }
    kmock.objects[PODS, NS, name] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"app.kubernetes.io/name": "lorafleet-trainer", "app.kubernetes.io/instance": job_name},
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"containers": [{"name": "trainer", "image": "x"}]},
        "status": status,
    }
    return name


def serve_log(kmock: km.KubernetesEmulator, pod: str, text: str) -> None:
    (
        kmock[f"get /api/v1/namespaces/{NS}/pods/{pod}/log"]
        << km.headers({"Content-Type": "text/plain"})
        << text.encode()
    )


class TestLauncherAgainstKMock:
    """start / poll / cancel / log_tail with the real client against the emulated API server."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [
        pytest.mark.integration,
        pytest.mark.asyncio,
        pytest.mark.kmock(cls=ApiServerEmulator),
    ]

    async def test_start_creates_the_job_and_a_service_owned_by_it(
        self, kmock: km.KubernetesEmulator, launcher: KubernetesLauncher
    ) -> None:
        req = REQUESTS["gpu-2x4-torchrun"]
        handle = await asyncio.to_thread(launcher.start, req)
        assert handle == {
            "namespace": NS,
            "job_name": "lf-0123456789ab-a1",
            "service_name": "lf-0123456789ab-a1",
        }
        assert json.loads(json.dumps(handle)) == handle

        expected_job, expected_service = render_attempt(launcher.settings, req)
        job = copy.deepcopy(kmock.objects[JOBS, NS, handle["job_name"]].raw)
        uid = job["metadata"].pop("uid")
        assert job == expected_job  # the client sent the template unchanged
        service = copy.deepcopy(kmock.objects[SERVICES, NS, handle["service_name"]].raw)
        service["metadata"].pop("uid")
        assert service == set_job_owner(expected_service, handle["job_name"], uid)
        assert [r.url.path for r in kmock if r.method == km.method.POST] == [
            f"/apis/batch/v1/namespaces/{NS}/jobs",
            f"/api/v1/namespaces/{NS}/services",
        ]

    async def test_start_again_adopts_the_existing_job(
        self, kmock: km.KubernetesEmulator, launcher: KubernetesLauncher
    ) -> None:
        first = await asyncio.to_thread(launcher.start, REQUESTS["cpu-1-node"])
        uid = kmock.objects[JOBS, NS, first["job_name"]].raw["metadata"]["uid"]
        second = await asyncio.to_thread(launcher.start, REQUESTS["cpu-1-node"])
        assert second == first
        assert kmock.objects[JOBS, NS, first["job_name"]].raw["metadata"]["uid"] == uid
        owners = kmock.objects[SERVICES, NS, first["service_name"]].raw["metadata"]["ownerReferences"]
        assert [o["uid"] for o in owners] == [uid]

    async def test_start_replaces_a_service_left_over_from_another_job(
        self, kmock: km.KubernetesEmulator, launcher: KubernetesLauncher
    ) -> None:
        name = attempt_name("0123456789ab", 1)
        stale = set_job_owner({"metadata": {"name": name, "namespace": NS}, "spec": {}}, name, "old-uid")
        kmock.objects[SERVICES, NS, name] = stale
        handle = await asyncio.to_thread(launcher.start, REQUESTS["cpu-1-node"])
        uid = kmock.objects[JOBS, NS, handle["job_name"]].raw["metadata"]["uid"]
        service = kmock.objects[SERVICES, NS, name].raw
        assert [o["uid"] for o in service["metadata"]["ownerReferences"]] == [uid]
        assert service["spec"]["clusterIP"] == "None"

    async def test_start_refuses_a_job_of_another_attempt_under_the_same_name(
        self, kmock: km.KubernetesEmulator, launcher: KubernetesLauncher
    ) -> None:
        name = attempt_name("0123456789ab", 1)
        kmock.objects[JOBS, NS, name] = {
            "metadata": {"name": name, "namespace": NS, "uid": "u", "labels": {}}
        }
        with pytest.raises(RuntimeError, match="another attempt"):
            await asyncio.to_thread(launcher.start, REQUESTS["cpu-1-node"])

    async def test_start_deletes_the_job_when_the_service_cannot_be_created(
        self, kmock: km.KubernetesEmulator, launcher: KubernetesLauncher
    ) -> None:
        kmock[f"post /api/v1/namespaces/{NS}/services"] << 403
        with pytest.raises(k8s.ApiException):
            await asyncio.to_thread(launcher.start, REQUESTS["cpu-1-node"])
        assert kmock.objects[JOBS, NS, attempt_name("0123456789ab", 1)].deleted

    async def test_start_refuses_more_than_the_capacity(self, launcher: KubernetesLauncher) -> None:
        assert (launcher.capacity.max_nodes, launcher.capacity.max_gpus_per_node) == (4, 8)
        assert launcher.capacity.max_processes_per_node == 8
        with pytest.raises(ValueError, match="nodes"):
            await asyncio.to_thread(launcher.start, request(nodes=5))

    async def test_poll_follows_the_job_to_success(
        self, api: k8s.ApiClient, launcher: KubernetesLauncher
    ) -> None:
        handle = await asyncio.to_thread(launcher.start, REQUESTS["gpu-2x4-torchrun"])

        async def phase() -> AttemptPhase:
            return (await asyncio.to_thread(launcher.poll, handle)).phase

        assert await phase() == AttemptPhase.PENDING
        await set_job_status(api, handle, {"active": 2, "ready": 0})  # pods created, not yet running
        assert await phase() == AttemptPhase.PENDING
        await set_job_status(api, handle, {"ready": 2})
        assert await phase() == AttemptPhase.RUNNING
        await set_job_status(api, handle, {"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]})
        assert await phase() == AttemptPhase.RUNNING  # pods still terminating
        await set_job_status(
            api,
            handle,
            {
                "active": 0,
                "ready": 0,
                "succeeded": 2,
                "conditions": [
                    {"type": "SuccessCriteriaMet", "status": "True"},
                    {"type": "Complete", "status": "True"},
                ],
            },
        )
        status = await asyncio.to_thread(launcher.poll, handle)
        assert (status.phase, status.exit_code, status.finished) == (AttemptPhase.SUCCEEDED, 0, True)

    async def test_poll_counts_active_pods_as_running_without_the_ready_field(
        self, api: k8s.ApiClient, launcher: KubernetesLauncher
    ) -> None:
        handle = await asyncio.to_thread(launcher.start, REQUESTS["cpu-1-node"])
        await set_job_status(api, handle, {"active": 1})
        assert (await asyncio.to_thread(launcher.poll, handle)).phase == AttemptPhase.RUNNING

    async def test_poll_reports_an_invalid_job_from_the_pod_failure_policy(
        self, api: k8s.ApiClient, launcher: KubernetesLauncher
    ) -> None:
        handle = await asyncio.to_thread(launcher.start, REQUESTS["gpu-2x4-torchrun"])
        message = (
            f"Container trainer for pod {NS}/{handle['job_name']}-1-abcde failed with exit code 2 "
            "matching FailJob rule at index 0"
        )
        await set_job_status(
            api,
            handle,
            {
                "conditions": [
                    {
                        "type": "FailureTarget",
                        "status": "True",
                        "reason": "PodFailurePolicy",
                        "message": message,
                    },
                ]
            },
        )
        assert (
            await asyncio.to_thread(launcher.poll, handle)
        ).phase == AttemptPhase.RUNNING  # pods still terminating
        await set_job_status(
            api,
            handle,
            {
                "conditions": [
                    {
                        "type": "FailureTarget",
                        "status": "True",
                        "reason": "PodFailurePolicy",
                        "message": message,
                    },
                    {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": message},
                ]
            },
        )
        status = await asyncio.to_thread(launcher.poll, handle)
        assert (status.phase, status.exit_code) == (AttemptPhase.FAILED, EXIT_INVALID)
        assert "PodFailurePolicy" in status.reason and "exit code 2" in status.reason

    async def test_poll_takes_the_exit_code_of_the_first_failed_pod(
        self, kmock: km.KubernetesEmulator, api: k8s.ApiClient, launcher: KubernetesLauncher
    ) -> None:
        handle = await asyncio.to_thread(launcher.start, REQUESTS["gpu-2x4-torchrun"])
        job = handle["job_name"]
        add_pod(kmock, job, 0, {"exitCode": 1, "reason": "Error", "finishedAt": "2026-01-01T00:10:05Z"})
        oom = add_pod(
            kmock, job, 1, {"exitCode": 137, "reason": "OOMKilled", "finishedAt": "2026-01-01T00:10:00Z"}
        )
        add_pod(kmock, "lf-otherjob-a1", 0, {"exitCode": 3, "finishedAt": "2026-01-01T00:00:00Z"})  # not ours
        await set_job_status(
            api,
            handle,
            {
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": "Job has reached the specified backoff limit",
                    },
                ]
            },
        )
        status = await asyncio.to_thread(launcher.poll, handle)
        assert (status.phase, status.exit_code) == (AttemptPhase.FAILED, 137)
        assert (
            "BackoffLimitExceeded" in status.reason and oom in status.reason and "OOMKilled" in status.reason
        )

        serve_log(kmock, oom, "step 10 loss 1.2\n" + "x" * 100 + "\nCUDA out of memory\n")
        assert (
            await asyncio.to_thread(launcher.log_tail, handle)
            == "step 10 loss 1.2\n" + "x" * 100 + "\nCUDA out of memory"
        )
        assert await asyncio.to_thread(launcher.log_tail, handle, 40) == "CUDA out of memory"

    async def test_poll_of_a_deadline_exceeded_job(
        self, api: k8s.ApiClient, launcher: KubernetesLauncher
    ) -> None:
        handle = await asyncio.to_thread(launcher.start, REQUESTS["cpu-1-node"])
        await set_job_status(
            api,
            handle,
            {
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "DeadlineExceeded",
                        "message": "Job was active longer than specified deadline",
                    },
                ]
            },
        )
        status = await asyncio.to_thread(launcher.poll, handle)
        assert (status.phase, status.exit_code) == (AttemptPhase.FAILED, None)
        assert status.reason.startswith("DeadlineExceeded")

    async def test_log_tail_reads_node_0_and_is_best_effort(
        self, kmock: km.KubernetesEmulator, launcher: KubernetesLauncher
    ) -> None:
        handle = await asyncio.to_thread(launcher.start, REQUESTS["gpu-2x4-torchrun"])
        assert await asyncio.to_thread(launcher.log_tail, handle) == ""  # no pods yet
        pod1 = add_pod(kmock, handle["job_name"], 1)
        pod0 = add_pod(kmock, handle["job_name"], 0)
        serve_log(kmock, pod0, "rank 0 says hello\n")
        serve_log(kmock, pod1, "rank 1\n")
        assert await asyncio.to_thread(launcher.log_tail, handle) == "rank 0 says hello"
        log_requests = [r for r in kmock if r.url.path.endswith("/log")]
        assert log_requests[-1].params["container"] == "trainer"

        other = await asyncio.to_thread(launcher.start, request(attempt=2))
        broken = add_pod(kmock, other["job_name"], 0)
        kmock[f"get /api/v1/namespaces/{NS}/pods/{broken}/log"] << 500
        assert await asyncio.to_thread(launcher.log_tail, other) == ""

    async def test_cancel_deletes_job_in_foreground_and_service(
        self, kmock: km.KubernetesEmulator, api: k8s.ApiClient, launcher: KubernetesLauncher
    ) -> None:
        handle = await asyncio.to_thread(launcher.start, REQUESTS["gpu-2x4-torchrun"])
        await set_job_status(api, handle, {"active": 2, "ready": 2})
        await asyncio.to_thread(launcher.cancel, handle)

        deletes = [r for r in kmock if r.method == km.method.DELETE]
        assert [r.url.path for r in deletes] == [
            f"/apis/batch/v1/namespaces/{NS}/jobs/{handle['job_name']}",
            f"/api/v1/namespaces/{NS}/services/{handle['service_name']}",
        ]
        assert deletes[0].params.get("propagationPolicy") == "Foreground"
        assert kmock.objects[JOBS, NS, handle["job_name"]].deleted
        assert kmock.objects[SERVICES, NS, handle["service_name"]].deleted

        status = await asyncio.to_thread(launcher.poll, handle)
        assert (status.phase, status.finished) == (AttemptPhase.GONE, True)
        await asyncio.to_thread(launcher.cancel, handle)  # idempotent: both already gone

    async def test_poll_of_a_job_being_deleted_is_gone(
        self, kmock: km.KubernetesEmulator, launcher: KubernetesLauncher
    ) -> None:
        handle = await asyncio.to_thread(launcher.start, REQUESTS["cpu-1-node"])
        kmock.objects[JOBS, NS, handle["job_name"]].patch(
            {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["foregroundDeletion"]}}
        )
        assert (await asyncio.to_thread(launcher.poll, handle)).phase == AttemptPhase.GONE
