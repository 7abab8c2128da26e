"""The inference gRPC service end to end: a real server on a loopback port over the tiny llama, real
PEFT adapters published into the layout, and a plain ``PeftModel`` as the reference for every token."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from inference_service_utils import (
    collect,
    greedy,
    health_status,
    publish_adapter,
    serving,
    settings_for,
    stub_for,
)
from inference_utils import greedy_tokens, load_base, peft_model, save_lora_adapter
from transformers import AutoTokenizer

from lorafleet import templates
from lorafleet.v1 import inference_pb2 as pb
from services.inference import plane as plane_module
from services.inference.server import InferenceServer
from services.inference.settings import ModelSettings

pytestmark = pytest.mark.integration

TOKEN = "s3cret"
AUTH = [("authorization", f"Bearer {TOKEN}")]
PROMPT = "The patient reports a headache and"


@pytest.fixture(scope="module")
def sources(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-sources")
    return {
        f"s{i}": save_lora_adapter(
            tiny_llama, root / f"s{i}", rank=8, seed=i, targets=("q_proj", "v_proj", "o_proj")
        )
        for i in range(4)
    }


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_llama))


@pytest.fixture(scope="module")
def server(
    tiny_llama: Path, sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[InferenceServer, Any, Path]]:
    root = tmp_path_factory.mktemp("adapters")
    publish_adapter(root, "alpha", sources["s0"], tiny_llama, template="chatml")
    publish_adapter(root, "beta", sources["s1"], tiny_llama, template="alpaca")
    settings = settings_for(tiny_llama, root, auth_token=TOKEN, max_new_tokens_cap=1000, adapter_capacity=4)
    with serving(settings) as srv:
        channel, stub = stub_for(srv.port)
        yield srv, stub, root
        channel.close()


def reference(
    tiny_llama: Path, adapter_dir: Path | None, ids: list[int], n: int, stop_ids: set[int]
) -> list[int]:
    """Greedy tokens of a plain (Peft)Model on one unpadded prompt, cut after the first stop id."""
    base = load_base(tiny_llama)
    model = peft_model(base, {"a": adapter_dir}) if adapter_dir is not None else base
    out = greedy_tokens(model, ids, n)
    for i, tok in enumerate(out):
        if tok in stop_ids:
            return out[: i + 1]
    return out


def wait_until(predicate: Any, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - start


def engine_idle(srv: InferenceServer) -> bool:
    engine = srv.plane.hosts["tiny"].engine
    assert engine is not None
    stats = engine.stats()
    return stats["running"] == 0 and stats["waiting"] == 0 and all(s["users"] == 0 for s in stats["slots"])


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["", "alpha", "beta@1"])
def test_generate_and_stream_equal_the_peft_reference(
    server: Any, tiny_llama: Path, sources: dict[str, Path], tokenizer: Any, adapter: str
) -> None:
    _srv, stub, _ = server
    ids = tokenizer.encode(PROMPT, add_special_tokens=True)
    src = {"": None, "alpha": sources["s0"], "beta@1": sources["s1"]}[adapter]
    want = reference(tiny_llama, src, ids, 12, {tokenizer.eos_token_id})
    unary = stub.Generate(pb.GenerateRequest(adapter=adapter, prompt=PROMPT, sampling=greedy(12)), timeout=60)
    text, streamed, usage = collect(
        stub.GenerateStream(
            pb.GenerateRequest(adapter=adapter, prompt=PROMPT, sampling=greedy(12)), timeout=60
        )
    )
    assert list(unary.token_ids) == want
    assert streamed == want
    assert text == unary.text == tokenizer.decode(want, skip_special_tokens=True)
    assert usage is not None
    for u in (usage, unary.usage):
        assert u.prompt_tokens == len(ids)
        assert u.generated_tokens == len(want)
        expected_reason = (
            pb.FINISH_REASON_STOP if want[-1] == tokenizer.eos_token_id else pb.FINISH_REASON_LENGTH
        )
        assert u.finish_reason == expected_reason
        assert 0 < u.time_to_first_token_s <= u.total_time_s
        assert u.adapter == {"": "", "alpha": "alpha@1", "beta@1": "beta@1"}[adapter]
        assert u.template == ""


@pytest.mark.parametrize("adapter", ["", "alpha", "beta"])
def test_chat_renders_with_the_training_template(
    server: Any, tiny_llama: Path, sources: dict[str, Path], tokenizer: Any, adapter: str
) -> None:
    srv, stub, _ = server
    template_name = {"": srv.plane.hosts["tiny"].template_name, "alpha": "chatml", "beta": "alpaca"}[adapter]
    template = templates.get_template(template_name, tokenizer)
    messages = [("system", "You are terse."), ("user", "hello"), ("assistant", "hi"), ("user", "how are you")]
    ids = templates.encode_prompt(template, tokenizer, [("hello", "hi")], "how are you", "You are terse.")
    stops = set(templates.stop_token_ids(template, tokenizer)) | {tokenizer.eos_token_id}
    src = {"": None, "alpha": sources["s0"], "beta": sources["s1"]}[adapter]
    want = reference(tiny_llama, src, ids, 10, stops)
    request = pb.ChatRequest(
        adapter=adapter,
        messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
        sampling=greedy(10),
    )
    unary = stub.Chat(request, timeout=60)
    _, streamed, usage = collect(stub.ChatStream(request, timeout=60))
    assert list(unary.token_ids) == want == streamed
    assert usage is not None and usage.template == unary.usage.template == template_name
    assert usage.prompt_tokens == len(ids)


def test_health_is_not_serving_until_a_base_has_generated(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    original = plane_module.BaseModelHost._warm_up

    def slow_warm_up(self: Any) -> None:
        assert gate.wait(60)
        original(self)

    monkeypatch.setattr(plane_module.BaseModelHost, "_warm_up", slow_warm_up)
    srv = InferenceServer(settings_for(tiny_llama, tmp_path / "adapters"))
    port = srv.start()
    channel, stub = stub_for(port)
    try:
        assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "tiny" in err.value.details() and "loading" in err.value.details()
        assert stub.ListModels(pb.ListModelsRequest()).models[0].state == "loading"
        gate.set()
        assert srv.wait_ready(60)
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        assert (
            health_status(channel, "lorafleet.v1.InferenceService") == health_pb2.HealthCheckResponse.SERVING
        )
        model = stub.ListModels(pb.ListModelsRequest()).models[0]
        assert (model.state, model.name, model.max_context) == ("ready", "tiny", 1024)
    finally:
        gate.set()
        channel.close()
        srv.stop(0.5)


def test_list_models_reports_available_loaded_and_failed(
    server: Any, tiny_llama: Path, sources: dict[str, Path]
) -> None:
    _srv, stub, root = server
    publish_adapter(root, "unused", sources["s2"], tiny_llama)
    broken = publish_adapter(root, "broken", sources["s3"], tiny_llama)
    weights = broken.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated upload
    stub.Generate(pb.GenerateRequest(adapter="alpha", prompt="x", sampling=greedy(1)), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(adapter="broken", prompt="x", sampling=greedy(1)), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    wait_until(lambda: any(a.ref == "unused@1" for a in stub.ListModels(pb.ListModelsRequest()).adapters))
    states = {a.ref: a for a in stub.ListModels(pb.ListModelsRequest()).adapters}
    assert states["alpha@1"].state == "loaded" and states["alpha@1"].template == "chatml"
    assert states["alpha@1"].rank == 8 and states["alpha@1"].model == "tiny"
    assert states["unused@1"].state == "available"
    assert states["broken@1"].state == "failed"
    assert "broken@1" in states["broken@1"].reason and "truncated" in states["broken@1"].reason
    # The bad adapter failed only its own request.
    assert stub.Generate(
        pb.GenerateRequest(adapter="alpha", prompt="x", sampling=greedy(2)), timeout=30
    ).usage


def test_load_and_unload_are_idempotent_and_need_the_token(server: Any) -> None:
    _, stub, _ = server
    for call, request in (
        (stub.LoadAdapter, pb.LoadAdapterRequest(adapter="beta")),
        (stub.UnloadAdapter, pb.UnloadAdapterRequest(adapter="beta")),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=10, metadata=[("authorization", "Bearer wrong")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for _ in range(2):
        loaded = stub.LoadAdapter(pb.LoadAdapterRequest(adapter="beta"), timeout=30, metadata=AUTH)
        assert (loaded.ref, loaded.state, loaded.template) == ("beta@1", "loaded", "alpaca")
    for _ in range(2):
        unloaded = stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter="beta@1"), timeout=30, metadata=AUTH)
        assert (unloaded.ref, unloaded.state) == ("beta@1", "available")
    with pytest.raises(grpc.RpcError) as err:
        stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter="never-published"), timeout=10, metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Loading explicitly after an unload works, and the adapter serves.
    stub.LoadAdapter(pb.LoadAdapterRequest(adapter="beta@1"), timeout=30, metadata=AUTH)
    assert stub.Generate(pb.GenerateRequest(adapter="beta", prompt="x", sampling=greedy(2)), timeout=30).usage


def test_expired_deadline_frees_the_slot(server: Any) -> None:
    srv, stub, _ = server
    call = stub.GenerateStream(
        pb.GenerateRequest(adapter="alpha", prompt=PROMPT, sampling=greedy(1000)), timeout=1.5
    )
    got = 0
    with pytest.raises(grpc.RpcError) as err:
        for chunk in call:
            got += len(chunk.token_ids)
            assert not chunk.HasField("usage"), "finished before the deadline; the test proves nothing"
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert got > 0
    wait_until(lambda: engine_idle(srv), timeout=2.0)
    # Unary calls too: the deadline passes mid-generation and the row is dropped.
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(adapter="alpha", prompt=PROMPT, sampling=greedy(1000)), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: engine_idle(srv), timeout=2.0)


def test_client_cancel_frees_the_slot_at_once(server: Any) -> None:
    srv, stub, _ = server
    call = stub.GenerateStream(
        pb.GenerateRequest(adapter="alpha", prompt=PROMPT, sampling=greedy(1000)), timeout=60
    )
    chunks = iter(call)
    next(chunks)
    next(chunks)
    engine = srv.plane.hosts["tiny"].engine
    assert engine is not None and engine.stats()["running"] == 1
    call.cancel()
    wait_until(lambda: engine_idle(srv), timeout=2.0)
    # The server keeps serving.
    assert stub.Generate(
        pb.GenerateRequest(adapter="alpha", prompt="x", sampling=greedy(3)), timeout=30
    ).usage


def test_hot_load_while_streaming(
    server: Any, tiny_llama: Path, sources: dict[str, Path], tokenizer: Any
) -> None:
    """Issue test 2: new adapters and versions appear without a restart and without failing anyone."""
    _srv, stub, root = server
    errors: list[BaseException] = []
    stop = threading.Event()
    served = [0]

    def background(adapter: str) -> None:
        while not stop.is_set():
            try:
                _, ids, usage = collect(
                    stub.GenerateStream(
                        pb.GenerateRequest(adapter=adapter, prompt=PROMPT, sampling=greedy(16)), timeout=60
                    )
                )
                assert usage is not None and usage.generated_tokens == len(ids) > 0
                served[0] += 1
            except BaseException as e:
                errors.append(e)
                return

    threads = [threading.Thread(target=background, args=(a,)) for a in ("", "alpha", "beta")]
    for t in threads:
        t.start()
    try:
        ids = tokenizer.encode(PROMPT, add_special_tokens=True)
        eos = {tokenizer.eos_token_id}
        want_v1 = reference(tiny_llama, sources["s2"], ids, 200, eos)
        want_v2 = reference(tiny_llama, sources["s3"], ids, 200, eos)
        assert want_v1[:8] != want_v2[:8]

        published = time.monotonic()
        publish_adapter(root, "fresh", sources["s2"], tiny_llama)
        while True:  # servable within 2 s
            try:
                first = stub.Generate(
                    pb.GenerateRequest(adapter="fresh", prompt=PROMPT, sampling=greedy(4)), timeout=30
                )
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e.details()
                assert time.monotonic() - published < 2.0
                time.sleep(0.05)
        assert time.monotonic() - published < 2.0
        assert first.usage.adapter == "fresh@1" and list(first.token_ids) == want_v1[:4]

        # A long v1 request is in flight when v2 is published.
        v1_call = stub.GenerateStream(
            pb.GenerateRequest(adapter="fresh", prompt=PROMPT, sampling=greedy(200)), timeout=120
        )
        v1_chunks = iter(v1_call)
        v1_ids = list(next(v1_chunks).token_ids)
        publish_adapter(root, "fresh", sources["s3"], tiny_llama)
        wait_until(
            lambda: any(a.ref == "fresh@2" for a in stub.ListModels(pb.ListModelsRequest()).adapters),
            timeout=2.0,
        )
        for _ in range(3):
            v2 = stub.Generate(
                pb.GenerateRequest(adapter="fresh", prompt=PROMPT, sampling=greedy(200)), timeout=60
            )
            assert v2.usage.adapter == "fresh@2"
            assert list(v2.token_ids) == want_v2, "new requests must get version 2's weights"
        pinned = stub.Generate(
            pb.GenerateRequest(adapter="fresh@1", prompt=PROMPT, sampling=greedy(8)), timeout=60
        )
        assert list(pinned.token_ids) == want_v1[:8]
        v1_usage = None
        for chunk in v1_chunks:
            v1_ids.extend(chunk.token_ids)
            if chunk.HasField("usage"):
                v1_usage = chunk.usage
        assert v1_usage is not None and v1_usage.adapter == "fresh@1"
        assert v1_ids == want_v1, "the in-flight request must finish on version 1"
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert served[0] >= 3


def test_two_base_models_route_by_the_model_field(
    tiny_llama: Path, sources: dict[str, Path], tokenizer: Any, tmp_path: Path
) -> None:
    """With several bases the request must name one (no guessing); each has its own engine and its
    own view of the adapters, and ListModels reports adapters per base."""
    root = tmp_path / "adapters"
    publish_adapter(root, "alpha", sources["s0"], tiny_llama)
    settings = settings_for(
        tiny_llama,
        root,
        models=[ModelSettings("one", str(tiny_llama)), ModelSettings("two", str(tiny_llama))],
    )
    with serving(settings) as srv:
        channel, stub = stub_for(srv.port)
        try:
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=greedy(4)), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "model=''" in err.value.details() and "'one'" in err.value.details()
            ids = tokenizer.encode(PROMPT, add_special_tokens=True)
            want = reference(tiny_llama, sources["s0"], ids, 8, {tokenizer.eos_token_id})
            for model in ("one", "two"):
                out = stub.Generate(
                    pb.GenerateRequest(model=model, adapter="alpha", prompt=PROMPT, sampling=greedy(8)),
                    timeout=60,
                )
                assert list(out.token_ids) == want and out.usage.adapter == "alpha@1"
            listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert [(m.name, m.state) for m in listed.models] == [("one", "ready"), ("two", "ready")]
            assert sorted((a.model, a.ref, a.state) for a in listed.adapters) == [
                ("one", "alpha@1", "loaded"),
                ("two", "alpha@1", "loaded"),
            ]
            engines = [srv.plane.hosts[m].engine for m in ("one", "two")]
            assert engines[0] is not engines[1]
            # Unloading on one base leaves the other's copy alone.
            stub.UnloadAdapter(pb.UnloadAdapterRequest(model="one", adapter="alpha"), timeout=10)
            states = {(a.model, a.ref): a.state for a in stub.ListModels(pb.ListModelsRequest()).adapters}
            assert states == {("one", "alpha@1"): "available", ("two", "alpha@1"): "loaded"}
        finally:
            channel.close()
