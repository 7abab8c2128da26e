"""The built images (``make images BUILDER=buildah``), each run as its pod runs it (marker ``images``;
``make images-test``, after the build in CI).

Command, args, env and mounts come from ``kubectl kustomize k8s/overlays/cpu-dev`` and from the Job the
trainer's launcher renders (services/trainer/k8s_objects.py), resolved by tests/image_utils.py as a
kubelet would; the containers run under ``buildah run`` as uid 1000, on the host network, with test
directories where the volumes would be:

- inference serves the tiny model from a mounted models directory; the host's gRPC client gets a health
  SERVING and a Generate answer, and its /metrics answers;
- the trainer server answers SubmitJob from the host;
- the worker image runs as the 2 pods of one Indexed Job (JOB_COMPLETION_INDEX 0 and 1, the master
  address and port the launcher renders, resolved to loopback): the 2-node ZeRO-2 LoRA run completes
  and the adapter is published once on the mounted adapters volume;
- the dashboard serves its page against the running trainer image: in Debian's chromium the Jobs page
  lists the job submitted to that trainer (a screenshot is kept, see the test), and /metrics answers.

Read-only root filesystem: every pod here sets ``readOnlyRootFilesystem: true``, which ``buildah run``
cannot enforce; so once each container has ended, its writable layer must hold nothing outside its
mounted volumes and /tmp (``ImageRun.stop``), i.e. it would have run unchanged on a read-only root.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from image_utils import Cluster, ImageRun, PodContainer, buildah, built_images, resolve
from k8s_utils import K8S_DIR, find, kustomize, one

from lorafleet.v1 import inference_pb2, inference_pb2_grpc, trainer_pb2_grpc
from lorafleet.v1 import trainer_pb2 as tpb
from services.common.auth import with_token
from services.trainer.k8s_objects import COMPLETION_INDEX_ANNOTATION, K8sSettings, render_attempt
from services.trainer.launchers.base import AttemptRequest
from tests.trainer_utils import lora_spec
from tests.training_utils import training_config

pytestmark = pytest.mark.images
TOKEN = "images-smoke-token"
UID = 1000
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "http://127.0.0.1:9"}}]
users: [{name: none, user: {}}]
contexts: [{name: none, context: {cluster: none, user: none, namespace: lorafleet}}]
current-context: none
"""


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return kustomize(K8S_DIR / "overlays" / "cpu-dev")


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    names = built_images()
    for tag in names.values():
        proc = subprocess.run(
            [*buildah(), "inspect", "--type", "image", tag], capture_output=True, timeout=60
        )
        assert proc.returncode == 0, f"{tag} is not built: run `make images BUILDER=buildah`"
    return names


def owned(path: Path) -> Path:
    """A directory the pod's user can write (what fsGroup does to a volume)."""
    path.mkdir(parents=True, exist_ok=True)
    for p in [path, *path.rglob("*")]:
        shutil.chown(p, UID, UID)
    return path


def deployment_pod(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return one(docs, "Deployment", name)["spec"]["template"]["spec"]


def cluster(docs: list[dict[str, Any]], tmp: Path, claims: dict[str, Path]) -> Cluster:
    return Cluster(find(docs, "ConfigMap"), {"lorafleet-auth": {"token": TOKEN}}, claims, tmp)


def wait_serving(address: str, run: ImageRun, timeout: float) -> None:
    channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert run.proc.poll() is None, f"the container exited:\n{run.output()[-4000:]}"
        try:
            if (
                stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                channel.close()
                return
        except grpc.RpcError:
            pass
        time.sleep(1)
    channel.close()
    raise AssertionError(f"{address} not SERVING after {timeout} s:\n{run.output()[-4000:]}")


@pytest.fixture
def running() -> Iterator[list[ImageRun]]:
    runs: list[ImageRun] = []
    yield runs
    for run in runs:
        run.stop()


def test_inference_serves_the_tiny_model_from_the_models_volume(
    rendered, images, tiny_llama, tmp_path, running
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_llama, models / "tiny" / "llama")
    pod = deployment_pod(rendered, "lorafleet-inference")
    env = one(rendered, "ConfigMap", "lorafleet-inference-config")["data"]
    assert env["LORAFLEET_INFERENCE_MODEL"] == "tiny=/data/models/tiny/llama"
    claims = {"lorafleet-models": owned(models), "lorafleet-adapters": owned(tmp_path / "adapters")}
    container = resolve(pod, "inference", cluster(rendered, tmp_path, claims))
    run = ImageRun(images["lorafleet-inference"], container, tmp_path / "inference.log", {})
    running.append(run)
    port, metrics_port = env["LORAFLEET_INFERENCE_PORT"], env["LORAFLEET_INFERENCE_METRICS_PORT"]
    wait_serving(f"127.0.0.1:{port}", run, timeout=240)
    channel = with_token(grpc.insecure_channel(f"127.0.0.1:{port}"), TOKEN)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    reply = stub.Generate(
        inference_pb2.GenerateRequest(
            prompt="你好", sampling=inference_pb2.SamplingParams(max_new_tokens=8, temperature=0.0)
        ),
        timeout=60,
    )
    channel.close()
    assert reply.usage.generated_tokens == len(reply.token_ids) > 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert "lorafleet_inference_" in text
    assert run.stop() == [], f"written outside the volumes (read-only root):\n{run.output()[-3000:]}"


def start_trainer(
    rendered: list[dict[str, Any]],
    images: dict[str, str],
    tiny_llama: Path,
    bundled_data: dict[str, Path],
    tmp_path: Path,
    running: list[ImageRun],
) -> tuple[ImageRun, str]:
    """The trainer server image as its cpu-dev pod, with the tiny model and the bundled data on its
    volumes; returns the run and its gRPC address on the host, once it is SERVING."""
    data_root, models = tmp_path / "datasets", tmp_path / "models"
    shutil.copytree(tiny_llama, models / "tiny" / "llama")
    for path in bundled_data.values():
        (data_root / "bundled").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, data_root / "bundled" / path.name)
    claims = {
        "lorafleet-models": owned(models),
        "lorafleet-datasets": owned(data_root),
        "lorafleet-adapters": owned(tmp_path / "adapters"),
        "lorafleet-runs": owned(tmp_path / "runs"),
    }
    pod = deployment_pod(rendered, "lorafleet-trainer")
    container = resolve(pod, "trainer", cluster(rendered, tmp_path, claims))
    # In a cluster the pod gets its service account's API access; no API server runs here, so the one
    # addition to the manifests: a kubeconfig naming an API address where nothing listens (the
    # launcher only connects when it starts an attempt, which is not under test here).
    kube = tmp_path / "kube"
    kube.mkdir()
    (kube / "config").write_text(KUBECONFIG, encoding="utf-8")
    container.mounts.append((kube, "/etc/lorafleet-test/kube", True))
    container.env["KUBECONFIG"] = "/etc/lorafleet-test/kube/config"
    address = f"127.0.0.1:{container.env['LORAFLEET_TRAINER_PORT']}"
    run = ImageRun(images["lorafleet-trainer"], container, tmp_path / "trainer.log", {})
    running.append(run)
    wait_serving(address, run, timeout=120)
    return run, address


def submit_tiny_job(address: str, bundled_data: dict[str, Path]) -> tpb.Job:
    """SubmitJob from the host: a 2-step LoRA job on the pod's paths of the model and the data."""
    channel = with_token(grpc.insecure_channel(address), TOKEN)
    stub = trainer_pb2_grpc.TrainerServiceStub(channel)
    in_pod = {k: Path("/data/datasets/bundled") / p.name for k, p in bundled_data.items()}
    spec = lora_spec(Path("/data/models/tiny/llama"), in_pod, max_steps=2)
    job = stub.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=60)
    assert job.id and job.spec.model.name_or_path == "/data/models/tiny/llama"
    assert stub.GetJob(tpb.GetJobRequest(job_id=job.id), timeout=30).id == job.id
    channel.close()
    return job


def test_trainer_server_answers_submit_job(
    rendered, images, tiny_llama, bundled_data, tmp_path, running
) -> None:
    run, address = start_trainer(rendered, images, tiny_llama, bundled_data, tmp_path, running)
    submit_tiny_job(address, bundled_data)
    # The job store is on the mounted runs volume, written as uid 1000.
    assert any(p.stat().st_uid == UID for p in (tmp_path / "runs").rglob("*"))
    assert run.stop() == [], f"written outside the volumes (read-only root):\n{run.output()[-3000:]}"


def wait_http(url: str, run: ImageRun, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert run.proc.poll() is None, f"the container exited:\n{run.output()[-4000:]}"
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer 200 in {timeout} s:\n{run.output()[-4000:]}")


def test_dashboard_shows_the_trainer_images_jobs_in_a_browser(
    rendered, images, tiny_llama, bundled_data, tmp_path, running
) -> None:
    """The dashboard image as its pod, against the trainer image as its pod (the Service names on
    loopback): the Jobs page, in Debian's chromium, lists the job submitted to the trainer; the
    screenshot is ``dashboard-jobs.png`` in the test's directory, copied to $LORAFLEET_IMAGE_SCREENSHOTS
    when set (CI prints where)."""
    from playwright.sync_api import sync_playwright
    from test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS

    trainer, address = start_trainer(
        rendered, images, tiny_llama, bundled_data, tmp_path / "trainer", running
    )
    job = submit_tiny_job(address, bundled_data)
    pod = deployment_pod(rendered, "lorafleet-dashboard")
    container = resolve(pod, "dashboard", cluster(rendered, tmp_path / "dashboard", {}))
    assert container.env["LORAFLEET_TRAINER_ADDR"] == "lorafleet-trainer:50051"
    hosts = {"lorafleet-trainer": "127.0.0.1", "lorafleet-inference": "127.0.0.1"}
    dashboard = ImageRun(images["lorafleet-dashboard"], container, tmp_path / "dashboard.log", hosts)
    running.append(dashboard)
    [port] = [p["containerPort"] for p in pod["containers"][0]["ports"] if p["name"] == "http"]
    [metrics_port] = [p["containerPort"] for p in pod["containers"][0]["ports"] if p["name"] == "metrics"]
    wait_http(f"http://127.0.0.1:{port}/_stcore/health", dashboard, timeout=180)

    shot = tmp_path / "dashboard-jobs.png"
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: run `make tools` (scripts/install_chromium.sh)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.get_by_role("heading", name="Jobs", exact=True).wait_for(timeout=TIMEOUT_MS)
            grid = page.locator(".st-key-jobs-table [data-testid=stDataFrame]")
            grid.wait_for(timeout=TIMEOUT_MS)
            # The grid draws on a canvas; its cells' accessible text holds the job id from the trainer.
            grid.get_by_text(job.id, exact=True).first.wait_for(state="attached", timeout=TIMEOUT_MS)
            page.get_by_text("lorafleet-trainer:50051", exact=True).first.wait_for(timeout=TIMEOUT_MS)
            page.wait_for_function(
                "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=TIMEOUT_MS
            )
            assert not page.get_by_text("Traceback").count()
            assert not page.locator("[data-testid=stException]").count()
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000, f"{shot} looks empty"
    if os.environ.get("LORAFLEET_IMAGE_SCREENSHOTS"):
        out = Path(os.environ["LORAFLEET_IMAGE_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / shot.name)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert "lorafleet_dashboard_" in metrics
    assert dashboard.stop() == [], (
        f"written outside the volumes (read-only root):\n{dashboard.output()[-3000:]}"
    )
    assert trainer.stop() == [], f"written outside the volumes (read-only root):\n{trainer.output()[-3000:]}"


def test_worker_runs_a_two_node_zero2_job_and_publishes_once(
    rendered, images, tiny_llama, bundled_data, tmp_path, running
) -> None:
    """The launcher's Job for 2 nodes x 1 process with ZeRO-2, from the cpu-dev trainer's own settings
    (its ConfigMap and the template ConfigMap); max nodes raised from the overlay's 1 to 2."""
    trainer_env = dict(one(rendered, "ConfigMap", "lorafleet-trainer-config")["data"])
    template = tmp_path / "template.yaml"
    template.write_text(
        one(rendered, "ConfigMap", "lorafleet-training-job-template")["data"]["training-job-template.yaml"],
        encoding="utf-8",
    )
    trainer_env["LORAFLEET_K8S_JOB_TEMPLATE"] = str(template)
    settings = dataclasses.replace(K8sSettings.from_env(trainer_env), max_nodes=2)
    runs_dir, models, data_root = tmp_path / "runs", tmp_path / "models", tmp_path / "datasets"
    shutil.copytree(tiny_llama, models / "tiny" / "llama")
    (data_root / "bundled").mkdir(parents=True)
    for path in bundled_data.values():
        shutil.copy(path, data_root / "bundled" / path.name)
    job_dir = runs_dir / "jobs" / "imgsmoke0001"
    in_pod = {k: Path("/data/datasets/bundled") / p.name for k, p in bundled_data.items()}
    config = training_config(
        Path("/data/runs/jobs/imgsmoke0001"),
        Path("/data/models/tiny/llama"),
        in_pod,
        train={"max_steps": 4, "per_device_batch_size": 4, "logging_steps": 1},
        distributed={"deepspeed_stage": 2, "nnodes": 2, "nproc_per_node": 1},
        output={
            "run_dir": "/data/runs/jobs/imgsmoke0001/run",
            "adapters_root": "/data/adapters",
            "adapter_name": "img-smoke",
        },
    )
    job_dir.mkdir(parents=True)
    (job_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    request = AttemptRequest(
        job_id="imgsmoke0001",
        attempt=1,
        config_path=Path("/data/runs/jobs/imgsmoke0001/config.yaml"),
        attempt_dir=Path("/data/runs/jobs/imgsmoke0001/attempt-1"),
        nodes=2,
        processes_per_node=1,
        launcher="torchrun",
        deepspeed=True,
        resources={"cpu": "1", "memory": "2Gi"},
    )
    job, service = render_attempt(settings, request)
    pod = job["spec"]["template"]["spec"]
    claims = {
        "lorafleet-models": owned(models),
        "lorafleet-datasets": owned(data_root),
        "lorafleet-adapters": owned(tmp_path / "adapters"),
        "lorafleet-runs": owned(runs_dir),
    }
    hostname = f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    workers = []
    for index in (0, 1):
        field = f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
        c = cluster(rendered, tmp_path / f"pod-{index}", claims)
        c.field_refs[field] = str(index)
        container = resolve(pod, pod["containers"][0]["name"], c)
        assert container.env["LORAFLEET_MASTER_ADDR"] == hostname
        run = ImageRun(
            images["lorafleet-trainer-worker"],
            container,
            tmp_path / f"worker-{index}.log",
            {hostname: "127.0.0.1"},
        )
        running.append(run)
        workers.append(run)
    for index, run in enumerate(workers):
        assert run.wait(timeout=600) == 0, f"pod {index}:\n{run.output()[-5000:]}"
    for index, run in enumerate(workers):
        assert run.stop() == [], f"pod {index} wrote outside its volumes (read-only root)"
    published = sorted((tmp_path / "adapters").rglob("adapter_config.json"))
    assert published == [tmp_path / "adapters" / "img-smoke" / "1" / "adapter_config.json"], published
    assert (published[0].parent / "lorafleet_manifest.json").is_file()
    assert published[0].stat().st_uid == UID  # written by the pod's user


def test_root_write_check_sees_writes_outside_the_volumes(images, tmp_path, running) -> None:
    """The read-only-root check itself: a file written into the image's own HOME directory (not a
    volume here) is reported, and files written on the mounted /tmp and on a volume are not."""
    scratch, volume = tmp_path / "tmp", owned(tmp_path / "volume")
    scratch.mkdir()
    scratch.chmod(0o1777)
    script = "for p in ('/var/cache/lorafleet/x', '/tmp/y', '/data/v/z'): open(p, 'w').write('1')"
    container = PodContainer(
        ["python", "-c", script], {}, [(scratch, "/tmp", False), (volume, "/data/v", False)], f"{UID}:{UID}"
    )
    run = ImageRun(images["lorafleet-dashboard"], container, tmp_path / "writer.log", {})
    running.append(run)
    assert run.wait(timeout=120) == 0, run.output()
    assert run.stop() == ["/var/cache/lorafleet/x"]
    assert (scratch / "y").is_file() and (volume / "z").is_file()


def _stage_healthcheck(dockerfile: Path, target: str) -> list[str] | None:
    """The exec-form ``HEALTHCHECK ... CMD [...]`` of stage ``target`` (None when it has none)."""
    stage, found = None, None
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        if line.startswith("FROM "):
            stage = line.split()[-1]
        elif stage == target and line.startswith("HEALTHCHECK "):
            found = json.loads(line.split(" CMD ", 1)[1])
    return found


def test_images_keep_the_dockerfiles_healthchecks(images) -> None:
    """Each image's config carries its stage's HEALTHCHECK (the OCI config format has no field for it:
    the build must write Docker's format, or buildah drops the check with only a warning)."""
    from image_utils import BUILD_SCRIPT, REPO

    listing = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--list"], capture_output=True, text=True, timeout=30
    )
    checked = 0
    for name, dockerfile, target in (line.split() for line in listing.stdout.splitlines() if line.strip()):
        expected = _stage_healthcheck(REPO / dockerfile, target)
        config = json.loads(
            subprocess.run(
                [*buildah(), "inspect", "--type", "image", images[name]],
                capture_output=True,
                timeout=60,
                check=True,
            ).stdout
        )["Docker"]["config"]
        got = (config.get("Healthcheck") or {}).get("Test")
        assert got == (None if expected is None else ["CMD", *expected]), f"{name}: healthcheck {got}"
        checked += expected is not None
    assert checked == 3, "the trainer server, inference and dashboard images declare a HEALTHCHECK"
