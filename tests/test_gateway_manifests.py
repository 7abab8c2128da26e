"""The inference-gateway overlay (k8s/overlays/inference-gateway), without a cluster.

The real kubectl renders it; the core objects pass the Kubernetes JSON schemas strictly and the pod
policy, as in test_k8s_manifests.py; the ``InferencePool`` passes the ``openAPIV3Schema`` of the
Gateway API Inference Extension's own CRD (jsonschema, with unknown fields refused as the API server's
strict field validation does); the ``HTTPRoute`` (a CRD of the Gateway API, whose schema is not
here) is checked for the structure a gateway needs to send the OpenAI routes to the pool. What only
a cluster with the extension installed can show (the picker's routing) is listed in
docs/inference-gateway.md.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from k8s_utils import K8S_DIR, REPO_ROOT, VERSIONS, find, kustomize, one, policy_violations, validate

from services.inference import server as inference_server

OVERLAY = K8S_DIR / "overlays" / "inference-gateway"
CRD_NAME = "inferencepools.inference.networking.k8s.io.crd.yaml"
SHARED_CRD = REPO_ROOT.parent / "shared" / "schemas" / CRD_NAME
VENDORED_CRD = REPO_ROOT / "tests" / "assets" / "gateway-api-inference-extension" / CRD_NAME
POOL_API = "inference.networking.k8s.io/v1"
ROUTE_API = "gateway.networking.k8s.io/v1"
HTTP_PORT = 8000


def crd_path() -> Path:
    """The shared schema beside the repository (CI's copy of shared/ sits at ../shared), else ours."""
    return SHARED_CRD if SHARED_CRD.is_file() else VENDORED_CRD


def strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that lists its properties:
    an unknown field fails, as with ``kubectl apply`` (strict field validation)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def pool_schema() -> dict[str, Any]:
    crd = yaml.safe_load(crd_path().read_text(encoding="utf-8"))
    assert (
        crd["spec"]["group"] == "inference.networking.k8s.io"
        and crd["spec"]["names"]["kind"] == "InferencePool"
    )
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # the API server's ObjectMeta, checked elsewhere
    return schema


def pool_problems(pool: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(pool)]


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return kustomize(OVERLAY)


def test_vendored_crd_is_the_shared_one() -> None:
    if SHARED_CRD.is_file():
        assert VENDORED_CRD.read_bytes() == SHARED_CRD.read_bytes()
    assert VENDORED_CRD.is_file()


@pytest.mark.parametrize("version", VERSIONS)
def test_core_objects_pass_strict_schemas_and_the_policy(docs: list[dict[str, Any]], version: str) -> None:
    core = [d for d in docs if d["apiVersion"] not in (POOL_API, ROUTE_API)]
    assert len(core) == len(docs) - 2
    for doc in core:
        validate(doc, version)
        assert doc["metadata"].get("namespace", "lorafleet") == "lorafleet"
    assert policy_violations(docs) == []


def test_inference_pool_passes_the_crd_schema(
    docs: list[dict[str, Any]], pool_schema: dict[str, Any]
) -> None:
    pool = one(docs, "InferencePool", "lorafleet-inference")
    assert pool["apiVersion"] == POOL_API and pool["metadata"]["namespace"] == "lorafleet"
    assert pool_problems(pool, pool_schema) == []


def test_the_schema_check_can_fail(docs: list[dict[str, Any]], pool_schema: dict[str, Any]) -> None:
    pool = one(docs, "InferencePool", "lorafleet-inference")
    broken = copy.deepcopy(pool)
    del broken["spec"]["targetPorts"]
    broken["spec"]["endpointPickerRef"]["port"]["number"] = 70000
    broken["spec"]["endpointPickerRef"]["failureMode"] = "FailSometimes"
    broken["spec"]["selector"]["matchLabel"] = {}  # a typo
    problems = pool_problems(broken, pool_schema)
    for expected in ("targetPorts", "70000", "FailSometimes", "matchLabel"):
        assert any(expected in p for p in problems), (expected, problems)


def test_pool_selects_the_scalable_inference_pods_on_the_http_port(docs: list[dict[str, Any]]) -> None:
    pool = one(docs, "InferencePool", "lorafleet-inference")["spec"]
    deployment = one(docs, "Deployment", "lorafleet-inference")
    assert deployment["spec"]["replicas"] > 1
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pool["selector"]["matchLabels"].items() <= labels.items()
    others = [d for d in find(docs, "Deployment") if d is not deployment]
    for d in others:  # the pool holds model servers only
        assert (
            not pool["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        )
    (container,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "inference"
    ]
    ports = {p["containerPort"] for p in container["ports"]}
    assert [p["number"] for p in pool["targetPorts"]] == [HTTP_PORT] and HTTP_PORT in ports
    config = one(docs, "ConfigMap", "lorafleet-inference-config")["data"]
    assert config["LORAFLEET_INFERENCE_HTTP_PORT"] == str(HTTP_PORT)
    assert "http_port" in {name for name, _, _ in inference_server._FLAGS}  # the server reads that variable
    picker = pool["endpointPickerRef"]
    assert picker["name"] and picker["port"]["number"] and picker.get("kind", "Service") == "Service"


def test_http_route_sends_the_openai_api_to_the_pool(docs: list[dict[str, Any]]) -> None:
    route = one(docs, "HTTPRoute", "lorafleet-inference")
    assert route["apiVersion"] == ROUTE_API and route["metadata"]["namespace"] == "lorafleet"
    spec = route["spec"]
    assert spec["parentRefs"] and all(
        ref["name"] and ref.get("kind", "Gateway") == "Gateway" for ref in spec["parentRefs"]
    )
    pools = {d["metadata"]["name"] for d in find(docs, "InferencePool")}
    assert spec["rules"]
    for rule in spec["rules"]:
        assert set(rule) <= {"matches", "backendRefs", "filters", "timeouts", "name", "sessionPersistence"}
        assert rule["backendRefs"]
        for ref in rule["backendRefs"]:
            assert (ref["group"], ref["kind"]) == ("inference.networking.k8s.io", "InferencePool")
            assert ref["name"] in pools and "port" not in ref  # a pool's port is its targetPorts
        for match in rule.get("matches", []):
            assert match["path"]["type"] in {"PathPrefix", "Exact"}
            assert match["path"]["value"] in {"/", "/v1"}  # /v1/completions, /v1/chat/completions, /v1/models
