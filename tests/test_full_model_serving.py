"""Full models published under the adapters root (``freeze`` / ``full`` training, merged exports)
served by a RUNNING inference server as base models named ``name@version``, without a restart.

Real parts throughout: the trainer's recipe publishes into the root the server watches, the gRPC
server runs in-process on a loopback port (with its OpenAI HTTP API), ``lorafleet export --merge
--publish`` merges a real PEFT adapter; the references are plain ``transformers`` ``generate`` on
the published directory and a plain ``PeftModel`` on the unmerged adapter.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from lorafleet.adapters import get_adapter
from lorafleet.method_specs import METHOD_SPECS, serving_problems
from lorafleet.models import base_model_fingerprint
from lorafleet.v1 import inference_pb2 as pb
from services.inference.client import main as client_main
from services.inference.sampling import SamplingParams
from services.inference.server import InferenceServer
from services.trainer.recipe import run_training
from tests.inference_service_utils import greedy, publish_adapter, serving, settings_for, stub_for
from tests.inference_utils import greedy_tokens, load_base, peft_model, save_lora_adapter
from tests.training_utils import training_config

pytestmark = pytest.mark.integration

PROMPT = "The patient reports a headache and"
MAX_NEW = 8


@pytest.fixture(scope="module")
def env(
    tiny_llama: Path, bundled_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A running server (max_published_models=1, HTTP on), then a tiny freeze and full run
    published into the root it watches."""
    work = tmp_path_factory.mktemp("full-models")
    root = work / "adapters"
    root.mkdir()
    settings = settings_for(tiny_llama, root, http_port=0, max_published_models=1, published_load_wait_s=60.0)
    with serving(settings) as server:
        channel, stub = stub_for(server.port)
        before = stub.ListModels(pb.ListModelsRequest(), timeout=10)
        published = {}
        for method, options in (("freeze", {"freeze": {"trainable_layers": 1}}), ("full", {})):
            config = training_config(
                work / method,
                tiny_llama,
                bundled_data,
                method,
                train={"max_steps": 3, "learning_rate": 2e-2},
                output={"adapters_root": str(root), "adapter_name": f"t-{method}"},
                **options,
            )
            published[method] = run_training(config).published
        yield {"server": server, "stub": stub, "root": root, "published": published, "before": before}
        channel.close()


def _reference(model_dir: Path, adapter: Path | None = None) -> list[int]:
    """Greedy tokens of plain transformers (and PEFT) for PROMPT, as the server encodes it."""
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_base(model_dir)
    eos = model.generation_config.eos_token_id
    if adapter is not None:
        model = peft_model(model, {"x": adapter})
    ids = list(tokenizer.encode(PROMPT, add_special_tokens=True))
    return greedy_tokens(model, ids, MAX_NEW, eos)


def _generate(stub: Any, model: str, adapter: str = "") -> pb.GenerateResponse:
    request = pb.GenerateRequest(model=model, adapter=adapter, prompt=PROMPT, sampling=greedy(MAX_NEW))
    return stub.Generate(request, timeout=120)


def _models(stub: Any) -> dict[str, pb.BaseModelStatus]:
    return {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}


def _http_models(server: InferenceServer) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v1/models", timeout=10) as answer:
        return {m["id"]: m for m in json.loads(answer.read())["data"]}


def _wait_listed(stub: Any, ref: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while ref not in _models(stub):
        assert time.monotonic() < deadline, f"{ref} was never listed"
        time.sleep(0.1)


def _copy_published(src: Path, root: Path, name: str, corrupt: bool = False) -> str:
    """Publish a copy of a full-model version under another name (the manifest renamed)."""
    from lorafleet.adapters import Manifest, new_staging_dir, publish

    manifest = Manifest.from_dict(json.loads((src / "lorafleet_manifest.json").read_text()))
    staging = new_staging_dir(root, name)
    for path in src.iterdir():
        if path.name != "lorafleet_manifest.json":
            shutil.copy(path, staging / path.name)
    manifest.name, manifest.version, manifest.files = name, 0, {}
    pub = publish(staging, root, name, manifest)
    if corrupt:  # a flipped byte in the weights: same size, wrong hash
        weights = pub.path / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    return pub.ref


def test_the_method_table_marks_full_models_servable() -> None:
    from lorafleet.config import RunConfig

    for method in ("freeze", "full"):
        assert METHOD_SPECS[method].servable and METHOD_SPECS[method].artifact_kind == "full_model"
        assert serving_problems(RunConfig(method=method)) == []


def test_trained_full_models_are_served_without_restart(env: dict[str, Any]) -> None:
    stub, server = env["stub"], env["server"]
    assert [m.name for m in env["before"].models] == ["tiny"]  # nothing published when it started
    for ref in ("t-freeze@1", "t-full@1"):
        _wait_listed(stub, ref)  # found by the watcher's scan, no restart
    listed = _models(stub)
    assert listed["t-freeze@1"].path == str(env["published"]["freeze"].path)
    assert listed["t-freeze@1"].state in ("available", "ready")  # ready when another test served it
    adapters = stub.ListModels(pb.ListModelsRequest(), timeout=10).adapters
    assert not [a.ref for a in adapters if a.name.startswith("t-")], "full models are not adapters"
    base = list(_generate(stub, "tiny").token_ids)
    assert base == _reference(server.plane.hosts["tiny"].settings.path)
    for method in ("freeze", "full"):
        pub = env["published"][method]
        expected = _reference(pub.path)
        # Trained away from the base, else serving the base by mistake would pass.
        assert expected != base, method
        answer = _generate(stub, pub.ref)
        assert list(answer.token_ids) == expected, method
        assert _models(stub)[pub.ref].state == "ready"
        # ``name`` resolves to the newest version, per request.
        assert list(_generate(stub, pub.name).token_ids) == expected
    listed, http = _models(stub), _http_models(server)
    published = {n for n, m in listed.items() if n != "tiny"}
    assert published == {n for n, m in http.items() if m.get("state")}
    for name in published:
        assert http[name]["state"] == listed[name].state and http[name]["root"] == listed[name].path
    assert http["t-full@1"]["weights_bytes"] > 0 and http["t-full@1"]["kv_bytes_per_token"] > 0


def test_chat_on_a_published_model_uses_its_training_template(env: dict[str, Any]) -> None:
    request = pb.ChatRequest(
        model="t-full@1", messages=[pb.ChatMessage(role="user", content="What is 3 + 4?")], sampling=greedy(4)
    )
    answer = env["stub"].Chat(request, timeout=120)
    assert answer.usage.template == "llama2" and answer.usage.generated_tokens >= 1


def test_merged_export_is_served_as_a_base_with_peft_parity(env: dict[str, Any], tiny_llama: Path) -> None:
    from lorafleet.export import main as export_main

    root, stub = env["root"], env["stub"]
    source = save_lora_adapter(tiny_llama, root.parent / "src-lora", rank=4, seed=7)
    publish_adapter(root, "lora-x", source, tiny_llama, template="llama2")
    assert (
        export_main(["lora-x@1", "--merge", "--dtype", "fp32", "--publish", "merged-x", "--root", str(root)])
        == 0
    )
    answer = _generate(stub, "merged-x@1")
    expected = _reference(tiny_llama, source)
    assert list(answer.token_ids) == expected and expected != _reference(tiny_llama)
    http = _http_models(env["server"])
    assert http["merged-x@1"]["state"] == "ready" and http["lora-x@1"]["parent"] == "tiny"


def test_an_adapter_trained_on_a_published_model_resolves_against_its_host(
    env: dict[str, Any], tiny_llama: Path
) -> None:
    root, stub = env["root"], env["stub"]
    full = env["published"]["full"].path
    source = save_lora_adapter(full, root.parent / "on-full", rank=4, seed=11, alpha=256)
    publish_adapter(root, "on-full", source, full, fingerprint=base_model_fingerprint(str(full), None))
    answer = _generate(stub, "t-full@1", adapter="on-full")
    assert answer.usage.adapter == "on-full@1"
    expected = _reference(full, source)
    assert list(answer.token_ids) == expected and expected != _reference(full)
    # On the configured base the same adapter is refused: it names another base.
    with pytest.raises(grpc.RpcError) as info:
        _generate(stub, "tiny", adapter="on-full")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_one_resident_model_evicts_the_idle_one_and_refuses_when_busy(env: dict[str, Any]) -> None:
    stub, plane = env["stub"], env["server"].plane
    _generate(stub, "t-freeze@1")
    assert plane.published.resident() == ["t-freeze@1"]
    _generate(stub, "t-full@1")  # the idle freeze model makes room
    assert plane.published.resident() == ["t-full@1"]
    listed = _models(stub)
    assert (listed["t-freeze@1"].state, listed["t-full@1"].state) == ("available", "ready")
    held = plane.generate("t-full@1", "", PROMPT, SamplingParams(max_new_tokens=1))  # an open request
    try:
        with pytest.raises(grpc.RpcError) as info:
            _generate(stub, "t-freeze@1")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_published_models=1" in (info.value.details() or "")
        assert "t-full@1" in (info.value.details() or "")
        assert list(_generate(stub, "tiny").token_ids)  # the configured base is not affected
    finally:
        held.close()
    assert _generate(stub, "t-freeze@1").token_ids  # idle again: room is made


def test_load_and_unload_adapter_drive_published_models(env: dict[str, Any]) -> None:
    stub, plane = env["stub"], env["server"].plane
    loaded = stub.LoadAdapter(pb.LoadAdapterRequest(model="t-full@1"), timeout=120)
    assert (loaded.ref, loaded.state, loaded.model, loaded.method) == (
        "t-full@1",
        "loaded",
        "t-full@1",
        "full",
    )
    assert plane.published.resident() == ["t-full@1"]
    unloaded = stub.UnloadAdapter(pb.UnloadAdapterRequest(model="t-full"), timeout=30)
    assert (unloaded.ref, unloaded.state) == ("t-full@1", "available")
    assert plane.published.resident() == []
    with pytest.raises(grpc.RpcError) as info:
        stub.LoadAdapter(pb.LoadAdapterRequest(model="nothing-here@1"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # The command line: ``lorafleet load --model NAME@V`` and ``lorafleet models``.
    target = ["--target", f"127.0.0.1:{env['server'].port}"]
    out = io.StringIO()
    assert client_main("load", [*target, "--model", "t-freeze@1"], out=out) == 0
    assert out.getvalue() == "t-freeze@1 on t-freeze@1: loaded\n"
    out = io.StringIO()
    assert client_main("models", target, out=out) == 0
    assert re.search(r"^t-freeze@1 +ready ", out.getvalue(), re.M), out.getvalue()


def test_a_corrupt_full_model_fails_alone_and_fast(env: dict[str, Any]) -> None:
    stub, root = env["stub"], env["root"]
    ref = _copy_published(env["published"]["full"].path, root, "broken", corrupt=True)
    for _ in range(2):  # the second answer comes from the cached verdict
        with pytest.raises(grpc.RpcError) as info:
            _generate(stub, ref)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = info.value.details() or ""
        assert ref in details and "does not match its manifest" in details and "model.safetensors" in details
    listed = _models(stub)
    assert listed[ref].state == "failed" and "model.safetensors" in listed[ref].reason
    assert ref not in _http_models(env["server"])  # failed versions are not offered
    assert list(_generate(stub, "t-freeze@1").token_ids) == _reference(env["published"]["freeze"].path)


def test_a_new_version_serves_new_requests_while_old_ones_finish(
    tiny_llama: Path, env: dict[str, Any], tmp_path: Path
) -> None:
    root = tmp_path / "adapters"
    root.mkdir()
    first = _copy_published(env["published"]["freeze"].path, root, "ft")
    with serving(settings_for(tiny_llama, root, max_published_models=2)) as server:
        channel, stub = stub_for(server.port)
        try:
            held = server.plane.generate("ft", "", PROMPT, SamplingParams(max_new_tokens=2))
            second = _copy_published(env["published"]["full"].path, root, "ft")
            assert (first, second) == ("ft@1", "ft@2")
            _wait_listed(stub, "ft@2")  # the watcher's next scan
            answer = _generate(stub, "ft")  # a new request gets the newest version
            assert list(answer.token_ids) == _reference(get_adapter(root, "ft", 2).path)
            assert held.result(60).token_ids  # the open one finishes on version 1
            held.close()
            assert server.plane.published.resident() == ["ft@1", "ft@2"]
        finally:
            channel.close()
