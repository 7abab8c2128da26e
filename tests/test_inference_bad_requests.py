"""Issue #4 test 3: bad requests and bad adapters each get the right status code and a message that
names the field (or the adapter) and the value, while a background client streams the whole time
and never sees an error."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from inference_service_utils import collect, greedy, publish_adapter, serving, settings_for, stub_for
from inference_utils import save_lora_adapter
from safetensors.torch import load_file

from lorafleet.v1 import inference_pb2 as pb
from services.common.field_errors import field_violations

pytestmark = pytest.mark.integration

OTHER_BASE = {"kind": "local", "path": "/models/other", "sha256": "0" * 64, "hash_kind": "full", "files": {}}
CAP = 64


@pytest.fixture(scope="module")
def env(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    src = tmp_path_factory.mktemp("src")
    root = tmp_path_factory.mktemp("adapters")
    good = save_lora_adapter(tiny_llama, src / "good", rank=8, seed=1)
    big = save_lora_adapter(tiny_llama, src / "big", rank=32, seed=2)
    pickled = src / "pickled"
    pickled.mkdir()
    shutil.copy(good / "adapter_config.json", pickled)
    torch.save(load_file(str(good / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    publish_adapter(root, "alpha", good, tiny_llama)
    publish_adapter(root, "pickled", pickled, tiny_llama)
    publish_adapter(root, "otherbase", good, tiny_llama, fingerprint=OTHER_BASE)
    publish_adapter(root, "bigrank", big, tiny_llama, rank=32)
    truncated = publish_adapter(root, "truncated", good, tiny_llama)
    weights = truncated.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-500])
    with serving(settings_for(tiny_llama, root, max_new_tokens_cap=CAP, max_rank=16, auth_token="")) as srv:
        channel, stub = stub_for(srv.port)
        errors: list[BaseException] = []
        served = [0]
        stop = threading.Event()

        def background() -> None:
            while not stop.is_set():
                try:
                    _, ids, usage = collect(
                        stub.GenerateStream(
                            pb.GenerateRequest(adapter="alpha", prompt="hello there", sampling=greedy(16)),
                            timeout=60,
                        )
                    )
                    assert usage is not None and len(ids) == usage.generated_tokens > 0
                    served[0] += 1
                except BaseException as e:
                    errors.append(e)
                    return

        thread = threading.Thread(target=background, daemon=True)
        thread.start()
        yield {"stub": stub, "errors": errors, "served": served}
        stop.set()
        thread.join(60)
        channel.close()


def gen(prompt: str = "hi", adapter: str = "", model: str = "", **sampling: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model, adapter=adapter, prompt=prompt, sampling=pb.SamplingParams(**sampling)
    )


def chat(*messages: tuple[str, str], adapter: str = "", **sampling: Any) -> pb.ChatRequest:
    return pb.ChatRequest(
        adapter=adapter,
        messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
        sampling=pb.SamplingParams(**sampling),
    )


INV, NF, FP = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION

# (id, rpc, request, code, substrings the message must contain: the field and the value)
CASES: list[tuple[str, str, Any, grpc.StatusCode, tuple[str, ...]]] = [
    ("unknown-adapter", "Generate", gen(adapter="nope"), NF, ("adapter", "'nope'")),
    ("dotdot-in-name", "Generate", gen(adapter="../etc"), INV, ("adapter name", "'../etc'")),
    ("slash-in-name", "Generate", gen(adapter="a/b"), INV, ("adapter name", "'a/b'")),
    ("pickle-only", "Generate", gen(adapter="pickled"), FP, ("pickled@1", "pickle")),
    ("other-base", "Generate", gen(adapter="otherbase"), FP, ("otherbase@1", "trained on base model")),
    ("rank-over-cap", "Generate", gen(adapter="bigrank"), FP, ("bigrank@1", "rank 32", "max_rank 16")),
    ("truncated-safetensors", "Generate", gen(adapter="truncated"), FP, ("truncated@1", "size")),
    ("bad-version-string", "Generate", gen(adapter="alpha@v2"), INV, ("alpha@v2", "version 'v2'")),
    ("unknown-version", "Generate", gen(adapter="alpha@7"), NF, ("alpha@7", "published versions: 1")),
    ("unknown-base-model", "Generate", gen(model="gpt-9"), NF, ("model='gpt-9'", "tiny")),
    ("empty-prompt", "Generate", gen(prompt=""), INV, ("prompt=''", "empty")),
    (
        "prompt-over-context",
        "Generate",
        gen(prompt="headache " * 1500),
        INV,
        ("prompt=", "tokens", "context"),
    ),
    (
        "max-new-tokens-over-cap",
        "Generate",
        gen(max_new_tokens=CAP + 1),
        INV,
        (f"sampling.max_new_tokens={CAP + 1}", "cap"),
    ),
    ("max-new-tokens-zero", "Generate", gen(max_new_tokens=0), INV, ("sampling.max_new_tokens=0",)),
    ("negative-temperature", "Generate", gen(temperature=-0.5), INV, ("sampling.temperature=-0.5",)),
    ("nan-temperature", "Generate", gen(temperature=float("nan")), INV, ("sampling.temperature=nan",)),
    ("top-p-zero", "Generate", gen(top_p=0.0), INV, ("sampling.top_p=0.0", "(0, 1]")),
    ("top-p-over-one", "GenerateStream", gen(top_p=1.5), INV, ("sampling.top_p=1.5",)),
    ("negative-top-k", "Generate", gen(top_k=-1), INV, ("sampling.top_k=-1",)),
    (
        "zero-repetition-penalty",
        "Generate",
        gen(repetition_penalty=0.0),
        INV,
        ("sampling.repetition_penalty=0.0",),
    ),
    ("negative-ngram", "Generate", gen(no_repeat_ngram_size=-2), INV, ("sampling.no_repeat_ngram_size=-2",)),
    ("empty-stop", "Generate", gen(stop=[""]), INV, ("sampling.stop[0]=''", "empty")),
    ("stop-too-long", "GenerateStream", gen(stop=["x" * 65]), INV, ("sampling.stop[0]=", "longer than 64")),
    (
        "too-many-stops",
        "Generate",
        gen(stop=[f"s{i}" for i in range(9)]),
        INV,
        ("sampling.stop=", "at most 8"),
    ),
    ("no-messages", "Chat", chat(), INV, ("messages=[]",)),
    ("unknown-role", "Chat", chat(("robot", "beep")), INV, ("messages[0].role='robot'", "one of")),
    (
        "ends-with-assistant",
        "ChatStream",
        chat(("user", "hi"), ("assistant", "yo")),
        INV,
        ("messages[1].role='assistant'", "last message"),
    ),
    (
        "two-users-in-a-row",
        "Chat",
        chat(("user", "a"), ("user", "b")),
        INV,
        ("messages[1].role='user'", "alternate"),
    ),
    (
        "system-not-first",
        "Chat",
        chat(("user", "a"), ("system", "s")),
        INV,
        ("messages[1].role='system'", "first"),
    ),
    ("empty-user-content", "Chat", chat(("user", "")), INV, ("messages[0].content=''",)),
    ("chat-unknown-adapter", "ChatStream", chat(("user", "hi"), adapter="ghost"), NF, ("adapter", "'ghost'")),
    (
        "chat-bad-sampling",
        "Chat",
        chat(("user", "hi"), top_k=-3, temperature=-1.0),
        INV,
        ("sampling.top_k=-3", "sampling.temperature=-1.0"),
    ),
    ("load-unknown", "LoadAdapter", pb.LoadAdapterRequest(adapter="nope"), NF, ("'nope'",)),
    ("load-empty", "LoadAdapter", pb.LoadAdapterRequest(adapter=""), INV, ("adapter=''",)),
    ("load-bad-name", "LoadAdapter", pb.LoadAdapterRequest(adapter="..\\x"), INV, ("adapter name",)),
    ("load-other-base", "LoadAdapter", pb.LoadAdapterRequest(adapter="otherbase@1"), FP, ("otherbase@1",)),
    (
        "unload-unknown-model",
        "UnloadAdapter",
        pb.UnloadAdapterRequest(model="m2", adapter="alpha"),
        NF,
        ("model='m2'",),
    ),
]


def call(stub: Any, rpc: str, request: Any, timeout: float = 30) -> Any:
    result = getattr(stub, rpc)(request, timeout=timeout)
    return collect(result) if rpc.endswith("Stream") else result


def test_the_table_has_enough_cases() -> None:
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("rpc", "request_", "code", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request(
    env: dict[str, Any], rpc: str, request_: Any, code: grpc.StatusCode, needles: tuple[str, ...]
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call(env["stub"], rpc, request_)
    assert err.value.code() == code, err.value.details()
    for needle in needles:
        assert needle in err.value.details(), (needle, err.value.details())


@pytest.mark.parametrize("rpc", ["Chat", "ChatStream"])
def test_field_problems_come_as_bad_request_details(env: dict[str, Any], rpc: str) -> None:
    """Every problem is a ``google.rpc.BadRequest`` field violation in the status details, unary and
    streamed, so clients never parse the message text."""
    with pytest.raises(grpc.RpcError) as err:
        call(env["stub"], rpc, chat(("user", "hi"), ("user", "again"), top_k=-3, temperature=-1.0))
    assert err.value.code() == INV
    got = {v.field: v.description for v in field_violations(err.value)}
    assert set(got) == {"sampling.temperature", "sampling.top_k", "messages[1].role"}
    assert got["sampling.top_k"] == "sampling.top_k=-3: must be >= 0; 0 = off"


def test_expired_deadline(env: dict[str, Any]) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call(env["stub"], "Generate", gen(max_new_tokens=CAP), timeout=0.0001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "Deadline" in err.value.details()


def test_a_bad_adapter_fails_the_same_way_twice_and_good_requests_still_work(env: dict[str, Any]) -> None:
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as err:
            call(env["stub"], "Generate", gen(adapter="truncated"))
        assert err.value.code() == FP
    ok = call(env["stub"], "Generate", gen(adapter="alpha", max_new_tokens=4))
    assert ok.usage.adapter == "alpha@1" and ok.usage.generated_tokens > 0
    states = {a.ref: a for a in env["stub"].ListModels(pb.ListModelsRequest(), timeout=10).adapters}
    for ref in ("pickled@1", "otherbase@1", "bigrank@1", "truncated@1"):
        assert states[ref].state == "failed" and states[ref].reason, ref
    assert states["alpha@1"].state == "loaded"


def test_background_client_never_saw_an_error(env: dict[str, Any]) -> None:
    deadline = time.monotonic() + 30
    while env["served"][0] < 3 and not env["errors"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not env["errors"], env["errors"]
    assert env["served"][0] >= 3
