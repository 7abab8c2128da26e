"""The OpenAI-compatible HTTP API against a real server on loopback, driven by the official ``openai``
client: the same process and plane as gRPC, so greedy tokens and logprobs over HTTP must equal those
over gRPC, and domain errors must reach the client as OpenAI's exception classes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from inference_service_utils import InferenceProcess, publish_adapter, serving, settings_for
from inference_utils import save_lora_adapter

from lorafleet.v1 import inference_pb2 as pb
from lorafleet.v1 import inference_pb2_grpc
from services.inference.errors import InvalidRequestError
from services.inference.openai_schemas import CompletionRequest, openai_field, parse_body
from services.inference.server import InferenceServer

pytestmark = pytest.mark.integration

TOKEN = "http-s3cret"
GRPC_AUTH = [("authorization", f"Bearer {TOKEN}")]
PROMPT = "The patient reports a headache and"


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sources = tmp_path_factory.mktemp("lora-sources")
    root = tmp_path_factory.mktemp("adapters")
    source = save_lora_adapter(tiny_llama, sources / "a", rank=8, seed=3, targets=("q_proj", "v_proj"))
    publish_adapter(root, "alpha", source, tiny_llama, template="chatml")
    return root


@pytest.fixture(scope="module")
def server(tiny_llama: Path, adapters: Path) -> Iterator[InferenceServer]:
    """Token on every RPC and route (scope ``all``), so the HTTP API proves it checks it too."""
    settings = settings_for(tiny_llama, adapters, http_port=0, auth_token=TOKEN, auth_scope="all")
    with serving(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: InferenceServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=TOKEN, max_retries=0)


@pytest.fixture(scope="module")
def stub(server: InferenceServer) -> Iterator[Any]:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield inference_pb2_grpc.InferenceServiceStub(channel)
    channel.close()


def test_models_list_has_bases_and_versioned_adapters_with_their_parent(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny", "alpha@1"}
    assert models["alpha@1"].model_extra["parent"] == "tiny"
    assert models["tiny"].model_extra["parent"] is None
    assert client.models.retrieve("alpha@1").id == "alpha@1"


def test_chat_with_an_adapter_unary_and_streamed_equals_grpc(client: openai.OpenAI, stub: Any) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    unary = client.chat.completions.create(model="alpha", messages=messages, temperature=0, max_tokens=12)
    grpc_answer = stub.Chat(
        pb.ChatRequest(
            adapter="alpha",
            messages=[pb.ChatMessage(role="user", content=PROMPT)],
            sampling=pb.SamplingParams(max_new_tokens=12, temperature=0.0),
        ),
        metadata=GRPC_AUTH,
        timeout=60,
    )
    choice = unary.choices[0]
    assert choice.message.content == grpc_answer.text
    assert (
        choice.finish_reason
        == {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}[grpc_answer.usage.finish_reason]
    )
    assert unary.usage.completion_tokens == len(grpc_answer.token_ids)
    assert unary.usage.prompt_tokens == grpc_answer.usage.prompt_tokens

    stream = client.chat.completions.create(
        model="alpha@1",
        messages=messages,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == grpc_answer.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(grpc_answer.token_ids)


def test_n_choices_with_a_seed_are_reproducible(client: openai.OpenAI) -> None:
    ask = dict(model="tiny", prompt=PROMPT, n=3, seed=7, temperature=1.0, max_tokens=8)
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1


def test_completions_echo_with_logprobs_equal_grpc(client: openai.OpenAI, stub: Any) -> None:
    answer = client.completions.create(
        model="alpha", prompt=PROMPT, echo=True, logprobs=2, temperature=0, max_tokens=5
    )
    grpc_answer = stub.Generate(
        pb.GenerateRequest(
            adapter="alpha",
            prompt=PROMPT,
            sampling=pb.SamplingParams(max_new_tokens=5, temperature=0.0, logprobs=2, prompt_logprobs=2),
        ),
        metadata=GRPC_AUTH,
        timeout=60,
    )
    choice = answer.choices[0]
    assert choice.text == PROMPT + grpc_answer.text
    logprobs = choice.logprobs
    expected = [*grpc_answer.prompt_logprobs, *grpc_answer.logprobs]
    assert logprobs.tokens == [e.token for e in expected]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx([e.logprob for e in expected[1:]], abs=1e-6)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs[1:])
    assert answer.usage.prompt_tokens == len(grpc_answer.prompt_logprobs)
    assert answer.usage.completion_tokens == len(grpc_answer.token_ids)


def test_echo_with_zero_max_tokens_gives_the_prompt_logprobs_alone(client: openai.OpenAI) -> None:
    """lm-evaluation-harness's loglikelihood request: the prompt's logprobs, no completion; the same
    prompt entries as an echo that also generates, unary and streamed."""
    scored = client.completions.create(
        model="alpha", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0, temperature=0
    )
    generated = client.completions.create(
        model="alpha", prompt=PROMPT, echo=True, logprobs=1, max_tokens=3, temperature=0
    )
    prompt_tokens = generated.usage.prompt_tokens
    choice = scored.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert choice.logprobs.tokens == generated.choices[0].logprobs.tokens[:prompt_tokens]
    assert len(choice.logprobs.tokens) == prompt_tokens
    assert choice.logprobs.token_logprobs == generated.choices[0].logprobs.token_logprobs[:prompt_tokens]
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == prompt_tokens
    stream = client.completions.create(
        model="alpha",
        prompt=PROMPT,
        echo=True,
        logprobs=1,
        max_tokens=0,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == PROMPT
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens
    ]
    assert streamed == choice.logprobs.tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError) as no_echo:  # without echo there is nothing to answer
        client.completions.create(model="alpha", prompt=PROMPT, max_tokens=0)
    assert no_echo.value.body["param"] == "max_tokens"


def test_an_unknown_adapter_names_no_server_path(client: openai.OpenAI, stub: Any, adapters: Path) -> None:
    """The 404 reaches remote clients: it names the adapter, never the adapters root."""
    with pytest.raises(openai.NotFoundError) as over_http:
        client.completions.create(model="ghost", prompt="hi", max_tokens=2)
    with pytest.raises(grpc.RpcError) as over_grpc:
        stub.Generate(pb.GenerateRequest(adapter="ghost", prompt="hi"), metadata=GRPC_AUTH, timeout=30)
    assert over_grpc.value.code() == grpc.StatusCode.NOT_FOUND
    for message in (over_http.value.body["message"], over_grpc.value.details()):
        assert "'ghost'" in message
        assert str(adapters) not in message and adapters.name not in message, message


def test_metrics_are_the_prometheus_text_format_with_the_vllm_names(server: InferenceServer) -> None:
    """Even when the scraper asks for OpenMetrics first (Prometheus does): prometheus_client's
    OpenMetrics writer would rename the ``vllm:`` series the endpoint picker reads."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"},
    )
    with urllib.request.urlopen(request, timeout=10) as page:
        content_type = page.headers["Content-Type"]
        text = page.read().decode()
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    assert re.search(r"^vllm:num_requests_running \S+$", text, re.M), text
    assert re.search(r"^# TYPE vllm:num_requests_running gauge$", text, re.M)


def test_errors_reach_the_client_as_openai_exceptions(client: openai.OpenAI, server: InferenceServer) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    assert not_found.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], extra_body={"tools_choice": "x"}
        )
    assert unknown.value.body["param"] == "tools_choice"
    with pytest.raises(openai.BadRequestError) as bad_values:
        client.completions.create(model="tiny", prompt="hi", max_tokens=10_000, temperature=-1)
    message = bad_values.value.body["message"]
    assert "max_tokens=10000" in message and "temperature=-1" in message and "sampling." not in message
    with pytest.raises(openai.BadRequestError) as roles:
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])
    assert roles.value.body["param"] == "messages[0].role"
    stranger = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/health", timeout=10) as health:
        assert json.load(health) == {"status": "ready"}  # open without the token, like gRPC health


def test_a_full_queue_is_a_rate_limit_with_retry_after(tiny_llama: Path, adapters: Path) -> None:
    """One batch row and one queue place: the 16 samples of one request (submitted in a tight loop,
    each decoding up to 64 tokens) cannot all be taken, so the request is refused as a whole."""
    settings = settings_for(tiny_llama, adapters, http_port=0, max_queued=1, max_batch_size=1)
    with serving(settings) as srv:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as limited:
            client.completions.create(model="tiny", prompt="hi", max_tokens=64, n=16, temperature=1.0)
        assert limited.value.response.headers["retry-after"] == "1"
        assert limited.value.body["type"] == "rate_limit_error"
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text is not None


def test_plane_field_names_become_the_openai_names() -> None:
    renames = {"adapter": "model", "max_new_tokens": "max_completion_tokens"}
    assert openai_field("sampling.max_new_tokens", renames) == "max_completion_tokens"
    assert openai_field("sampling.stop[2]", renames) == "stop[2]"
    assert openai_field("adapter", renames) == "model"
    assert openai_field("messages[1].role", renames) == "messages[1].role"
    with pytest.raises(InvalidRequestError) as refused:
        parse_body(CompletionRequest, b'{"model": 3, "prompt": [1, 2], "echo": "yes", "best_of": 2}')
    fields = [p.field for p in refused.value.problems]
    assert sorted(fields) == ["best_of", "echo", "model", "prompt"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_cli_http_port_serves_sse_framing_metrics_and_drains(
    tiny_llama: Path, adapters: Path, tmp_path: Path
) -> None:
    process = InferenceProcess(
        [
            "--model",
            f"tiny={tiny_llama}",
            "--adapters-root",
            str(adapters),
            "--http-port",
            "0",
            "--max-new-tokens-cap",
            "64",
        ],
        tmp_path,
        entry=["-m", "services.cli", "inference-server"],
    ).start()
    try:
        found = re.search(r"^http on (http://[\d.]+:\d+)$", process.server_log(), re.M)
        assert found, process.server_log()
        base = found.group(1)
        body = json.dumps(
            {
                "model": "alpha",
                "prompt": PROMPT,
                "max_tokens": 4,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        raw = subprocess.run(
            ["curl", "-sN", "-H", "Content-Type: application/json", "-d", body, f"{base}/v1/completions"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.decode()
        assert "\r" not in raw and raw.endswith("data: [DONE]\n\n"), raw
        events = [e for e in raw.split("\n\n") if e]
        assert all(e.startswith("data: ") and "\n" not in e for e in events), events
        payloads = [json.loads(e[len("data: ") :]) for e in events[:-1]]
        assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] >= 1
        assert payloads[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as page:
            metrics = page.read().decode()
        assert 'lorafleet_inference_http_requests_total{route="/v1/completions",status="200"} 1.0' in metrics
        assert "lorafleet_inference_running_requests" in metrics
    finally:
        process.stop()
    assert "stopped" in process.server_log()
