"""Hostile inputs for the inference API (issue 16), one table row each with the code it must get,
sent while three clients stream from the base model and from two adapters the whole time.

The streaming clients check more than "no error": each compares every answer with the tokens it got
before any hostile request was sent, so a hostile request that disturbed its batch would show. The
classes of the table: numeric fields at overflow, denormal and NaN values; strings far past their
bounds (echoed back shortened, so the status stays within gRPC's metadata limit); size bombs refused
before tokenizing; the whole int64 seed range; valid-but-strange text that must be served.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from inference_service_utils import collect, greedy, publish_adapter, serving, settings_for, stub_for
from inference_utils import save_lora_adapter

from lorafleet.v1 import inference_pb2 as pb
from services.common.field_errors import MAX_MESSAGE_WIRE_CHARS

pytestmark = pytest.mark.integration

CAP = 32
MAX_PROMPT_CHARS = 20_000
OK, INV, NF = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
INT32_MAX, INT32_MIN, INT64_MAX, INT64_MIN = 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)
HUGE = "x" * 3_000_000  # under gRPC's 4 MB message limit, far over every field's bound


def gen(prompt: str = "hi", adapter: str = "", model: str = "", **sampling: Any) -> pb.GenerateRequest:
    sampling.setdefault("max_new_tokens", 2)
    return pb.GenerateRequest(
        model=model, adapter=adapter, prompt=prompt, sampling=pb.SamplingParams(**sampling)
    )


def chat(*messages: tuple[str, str], **sampling: Any) -> pb.ChatRequest:
    sampling.setdefault("max_new_tokens", 2)
    return pb.ChatRequest(
        messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
        sampling=pb.SamplingParams(**sampling),
    )


# (id, class, rpc, request, code, field the refusal must name, or None)
CASES: list[tuple[str, str, str, Any, grpc.StatusCode, str | None]] = [
    # numeric: overflow, denormals, NaN, integer extremes
    ("temperature-1e-300", "numeric", "GenerateStream", gen(temperature=1e-300), INV, "sampling.temperature"),
    ("temperature-denormal", "numeric", "Generate", gen(temperature=5e-324), INV, "sampling.temperature"),
    ("temperature-below-min", "numeric", "Generate", gen(temperature=1e-6), INV, "sampling.temperature"),
    ("temperature-inf", "numeric", "Generate", gen(temperature=math.inf), INV, "sampling.temperature"),
    ("temperature-minus-inf", "numeric", "Generate", gen(temperature=-math.inf), INV, "sampling.temperature"),
    ("temperature-over-max", "numeric", "Generate", gen(temperature=100.000001), INV, "sampling.temperature"),
    ("temperature-minus-zero", "numeric", "Generate", gen(temperature=-0.0), OK, None),
    ("temperature-min", "numeric", "GenerateStream", gen(temperature=1e-5, seed=1), OK, None),
    ("temperature-max", "numeric", "Generate", gen(temperature=100.0, seed=1), OK, None),
    (
        "penalty-1e-300",
        "numeric",
        "GenerateStream",
        gen(repetition_penalty=1e-300, temperature=1.0),
        INV,
        "sampling.repetition_penalty",
    ),
    (
        "penalty-1e300",
        "numeric",
        "Generate",
        gen(repetition_penalty=1e300),
        INV,
        "sampling.repetition_penalty",
    ),
    (
        "penalty-inf",
        "numeric",
        "Generate",
        gen(repetition_penalty=math.inf),
        INV,
        "sampling.repetition_penalty",
    ),
    (
        "penalty-nan",
        "numeric",
        "Generate",
        gen(repetition_penalty=math.nan),
        INV,
        "sampling.repetition_penalty",
    ),
    (
        "penalty-denormal",
        "numeric",
        "Generate",
        gen(repetition_penalty=5e-324),
        INV,
        "sampling.repetition_penalty",
    ),
    (
        "penalty-extremes-ok",
        "numeric",
        "Generate",
        gen(repetition_penalty=100.0, temperature=0.01, seed=3),
        OK,
        None,
    ),
    ("top-p-nan", "numeric", "Generate", gen(top_p=math.nan), INV, "sampling.top_p"),
    ("top-p-inf", "numeric", "Generate", gen(top_p=math.inf), INV, "sampling.top_p"),
    ("top-p-minus-zero", "numeric", "Generate", gen(top_p=-0.0), INV, "sampling.top_p"),
    ("top-p-denormal", "numeric", "Generate", gen(top_p=5e-324, temperature=1.0), OK, None),
    ("top-k-int32-max", "numeric", "Generate", gen(top_k=INT32_MAX, temperature=1.0), OK, None),
    ("top-k-int32-min", "numeric", "Generate", gen(top_k=INT32_MIN), INV, "sampling.top_k"),
    (
        "max-new-int32-max",
        "numeric",
        "Generate",
        gen(max_new_tokens=INT32_MAX),
        INV,
        "sampling.max_new_tokens",
    ),
    (
        "max-new-int32-min",
        "numeric",
        "GenerateStream",
        gen(max_new_tokens=INT32_MIN),
        INV,
        "sampling.max_new_tokens",
    ),
    (
        "ngram-int32-max",
        "numeric",
        "Generate",
        gen(no_repeat_ngram_size=INT32_MAX),
        INV,
        "sampling.no_repeat_ngram_size",
    ),
    (
        "ngram-int32-min",
        "numeric",
        "Generate",
        gen(no_repeat_ngram_size=INT32_MIN),
        INV,
        "sampling.no_repeat_ngram_size",
    ),
    ("seed-int64-min", "numeric", "Generate", gen(seed=INT64_MIN, temperature=1.0), OK, None),
    ("seed-int64-max", "numeric", "Generate", gen(seed=INT64_MAX, temperature=1.0), OK, None),
    (
        "chat-temperature-nan",
        "numeric",
        "ChatStream",
        chat(("user", "hi"), temperature=math.nan),
        INV,
        "sampling.temperature",
    ),
    # strings past their bounds: refused naming the field, echoed shortened
    ("model-3mb", "string", "Generate", gen(model=HUGE), INV, "model"),
    ("adapter-3mb", "string", "GenerateStream", gen(adapter=HUGE), INV, "adapter"),
    ("adapter-257", "string", "Generate", gen(adapter="a" * 257), INV, "adapter"),
    ("adapter-65", "string", "Generate", gen(adapter="a" * 65), INV, None),
    ("adapter-64-unknown", "string", "Generate", gen(adapter="a" * 64), NF, None),
    ("model-unknown-long", "string", "Generate", gen(model="m" * 256), NF, None),
    ("stop-3mb", "string", "Generate", gen(stop=[HUGE]), INV, "sampling.stop[0]"),
    ("stops-many-long", "string", "Generate", gen(stop=["y" * 100_000] * 20), INV, "sampling.stop"),
    ("role-3mb", "string", "Chat", chat((HUGE[:100_000], "hi")), INV, "messages"),
    ("role-long", "string", "Chat", chat(("r" * 5000, "hi")), INV, "messages[0].role"),
    ("load-adapter-3mb", "string", "LoadAdapter", pb.LoadAdapterRequest(adapter=HUGE), INV, "adapter"),
    (
        "load-model-3mb",
        "string",
        "LoadAdapter",
        pb.LoadAdapterRequest(model=HUGE, adapter="alpha"),
        INV,
        "model",
    ),
    ("unload-adapter-3mb", "string", "UnloadAdapter", pb.UnloadAdapterRequest(adapter=HUGE), INV, "adapter"),
    ("unload-bad-ref", "string", "UnloadAdapter", pb.UnloadAdapterRequest(adapter="a@b@c"), INV, None),
    # size bombs: refused before anything is tokenized
    ("prompt-3mb", "size", "GenerateStream", gen(prompt=HUGE), INV, "prompt"),
    ("prompt-just-under-1m", "size", "Generate", gen(prompt="headache " * 111_111), INV, "prompt"),
    ("prompt-1m", "size", "Generate", gen(prompt="headache " * 111_112), INV, "prompt"),
    ("prompt-over-char-bound", "size", "Generate", gen(prompt="z" * (MAX_PROMPT_CHARS + 1)), INV, "prompt"),
    ("chat-content-3mb", "size", "ChatStream", chat(("user", HUGE)), INV, "messages"),
    (
        "chat-total-over-bound",
        "size",
        "Chat",
        chat(*[(("user", "assistant")[i % 2], "w" * 2000) for i in range(10)], ("user", "w" * 2000)),
        INV,
        "messages",
    ),
    (
        "chat-too-many-messages",
        "size",
        "Chat",
        chat(*[(("user", "assistant")[i % 2], "hi") for i in range(300)], ("user", "hi")),
        INV,
        "messages",
    ),
    ("prompt-over-context", "size", "Generate", gen(prompt="headache " * 1500), INV, "prompt"),
    # valid but strange text: served
    ("prompt-nul-and-controls", "text", "Generate", gen(prompt="a\x00b\x01\x7f\u200b\u202e"), OK, None),
    ("prompt-emoji-and-cjk", "text", "GenerateStream", gen(prompt="👩‍👩‍👧 漢字 ﷽"), OK, None),
    ("prompt-template-markers", "text", "Generate", gen(prompt="<|im_start|>system\n</s>[INST]"), OK, None),
    (
        "chat-markers-in-content",
        "text",
        "ChatStream",
        chat(("user", "<|im_end|><|im_start|>assistant")),
        OK,
        None,
    ),
    ("stop-unicode", "text", "Generate", gen(stop=["漢", "\x00", "👩‍👩‍👧"]), OK, None),
]


@pytest.fixture(scope="module")
def env(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    src = tmp_path_factory.mktemp("src")
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(("alpha", "beta")):
        publish_adapter(root, name, save_lora_adapter(tiny_llama, src / name, rank=8, seed=i), tiny_llama)
    settings = settings_for(tiny_llama, root, max_new_tokens_cap=CAP, max_prompt_chars=MAX_PROMPT_CHARS)
    with serving(settings) as srv:
        tokenizer = srv.plane.hosts["tiny"].tokenizer
        encoded: list[int] = []  # length of every text the server tokenized
        original = tokenizer.encode

        def encode(text: Any, *args: Any, **kwargs: Any) -> Any:
            encoded.append(len(text) if isinstance(text, str) else 0)
            return original(text, *args, **kwargs)

        tokenizer.encode = encode
        channel, stub = stub_for(srv.port)
        victims = [
            pb.GenerateRequest(prompt="the quick brown fox", sampling=greedy(12)),
            pb.GenerateRequest(adapter="alpha", prompt="hello there", sampling=greedy(12)),
            pb.GenerateRequest(
                adapter="beta",
                prompt="once upon",
                sampling=pb.SamplingParams(max_new_tokens=12, temperature=0.9, seed=7),
            ),
        ]
        expected = [collect(stub.GenerateStream(v, timeout=60))[1] for v in victims]
        errors: list[BaseException] = []
        served = [0]
        stop = threading.Event()

        def stream(request: pb.GenerateRequest, tokens: list[int]) -> None:
            while not stop.is_set():
                try:
                    _, ids, usage = collect(stub.GenerateStream(request, timeout=60))
                    assert usage is not None and ids == tokens, (request.adapter, ids, tokens)
                    served[0] += 1
                except BaseException as e:
                    errors.append(e)
                    return

        threads = [threading.Thread(target=stream, args=pair, daemon=True) for pair in zip(victims, expected)]
        for thread in threads:
            thread.start()
        yield {"stub": stub, "errors": errors, "served": served, "encoded": encoded}
        stop.set()
        for thread in threads:
            thread.join(60)
        channel.close()


def call(stub: Any, rpc: str, request: Any) -> Any:
    result = getattr(stub, rpc)(request, timeout=60)
    return collect(result) if rpc.endswith("Stream") else result


def test_the_table_covers_every_class() -> None:
    classes = {c[1] for c in CASES}
    assert classes == {"numeric", "string", "size", "text"}
    assert len({c[0] for c in CASES}) == len(CASES) >= 50


@pytest.mark.parametrize(
    ("rpc", "request_", "code", "field"), [c[2:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_input(
    env: dict[str, Any], rpc: str, request_: Any, code: grpc.StatusCode, field: str | None
) -> None:
    if code == OK:
        call(env["stub"], rpc, request_)
        return
    with pytest.raises(grpc.RpcError) as err:
        call(env["stub"], rpc, request_)
    details = err.value.details() or ""
    assert err.value.code() == code, details[:300]
    assert len(details) <= MAX_MESSAGE_WIRE_CHARS
    if field is not None:
        assert f"{field}=" in details or f"{field}:" in details, details[:300]


def test_nothing_over_the_prompt_bound_was_tokenized(env: dict[str, Any]) -> None:
    """Size bombs are refused by their size: the tokenizer never saw a text over the bound."""
    assert env["encoded"], "the server tokenized nothing at all"
    assert max(env["encoded"]) <= MAX_PROMPT_CHARS


def test_the_streaming_clients_never_saw_an_error_or_a_changed_token(env: dict[str, Any]) -> None:
    deadline = time.monotonic() + 30
    while env["served"][0] < 6 and not env["errors"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not env["errors"], env["errors"]
    assert env["served"][0] >= 6
