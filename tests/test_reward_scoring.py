"""The Score RPC: reward-model adapters served by the inference service, rows of different reward
adapters in one forward, beside running generation.

References are ``AutoModelForSequenceClassification`` + ``PeftModel`` on the same ids, one row at a
time (no padding). The reward models are real PEFT ``SEQ_CLS`` adapters (random non-zero LoRA and
value head), plus one trained by the preference recipe's ``stage: rm`` on the bundled task.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from lorafleet import templates
from lorafleet.adapters import Manifest, new_staging_dir, publish, utc_now
from lorafleet.models import base_model_fingerprint
from lorafleet.v1 import inference_pb2 as pb
from services.inference import engine as engine_module
from services.inference.reward_heads import MAX_SCORE_PAIRS, encode_scored
from services.inference.server import InferenceServer
from tests.inference_service_utils import greedy, publish_adapter, serving, settings_for, stub_for
from tests.inference_utils import save_lora_adapter

TEMPLATE = "chatml"
PAIRS = [
    ("What is 2 plus 3?", "5"),
    ("Translate 猫 into English.", "cat, a small animal that purrs"),
    ("Name the capital of France.", "Paris"),
]


def save_reward_adapter(model_dir: Path, out_dir: Path, seed: int, targets: tuple[str, ...]) -> Path:
    """A PEFT SEQ_CLS LoRA adapter with random non-zero A, B and value head ``score``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1)
    model = get_peft_model(
        base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=list(targets))
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "score" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(str(out_dir))
    return out_dir


def publish_reward_adapter(root: Path, name: str, source: Path, base: Path) -> None:
    """Publish as the preference recipe does: stage rm, the value head named in the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    staging = new_staging_dir(root, name)
    for f in source.iterdir():
        (staging / f.name).write_bytes(f.read_bytes())
    manifest = Manifest(
        name=name,
        version=0,
        kind="lora",
        method="lora",
        base_model=base_model_fingerprint(str(base), None),
        family="llama",
        template=TEMPLATE,
        hyperparameters={"lora": {"rank": 4}},
        created_at=utc_now(),
        extra={"stage": "rm", "value_head": "score"},
    )
    publish(staging, root, name, manifest)


@pytest.fixture(scope="module")
def reward_dirs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rm-sources")
    return {
        "rm_a": save_reward_adapter(tiny_llama, root / "a", 1, ("q_proj", "v_proj", "down_proj")),
        "rm_b": save_reward_adapter(tiny_llama, root / "b", 2, ("k_proj", "o_proj", "up_proj")),
    }


@pytest.fixture(scope="module")
def served(
    tiny_llama: Path, reward_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[InferenceServer, Any]]:
    root = tmp_path_factory.mktemp("rm-adapters")
    for name, source in reward_dirs.items():
        publish_reward_adapter(root, name, source, tiny_llama)
    plain = save_lora_adapter(tiny_llama, tmp_path_factory.mktemp("plain") / "p", rank=4, seed=3)
    publish_adapter(root, "chat", plain, tiny_llama, template=TEMPLATE)
    with serving(settings_for(tiny_llama, root)) as srv:
        channel, stub = stub_for(srv.port)
        yield srv, stub
        channel.close()


def reference_scores(tiny_llama: Path, adapter_dir: Path, rows: list[list[int]]) -> list[float]:
    """AutoModelForSequenceClassification + PeftModel, each row alone."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_llama), num_labels=1)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return [float(model(input_ids=torch.tensor([r])).logits[0, 0]) for r in rows]


def score_request(adapter: str, pairs: list[tuple[str, str]]) -> pb.ScoreRequest:
    return pb.ScoreRequest(adapter=adapter, pairs=[pb.ScorePair(prompt=p, response=r) for p, r in pairs])


def test_scores_equal_the_peft_classifier_in_a_mixed_batch_beside_generation(
    served: tuple[InferenceServer, Any],
    tiny_llama: Path,
    reward_dirs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    srv, stub = served
    host = srv.plane.hosts["tiny"]
    template = templates.get_template(TEMPLATE, host.tokenizer)
    rows = [encode_scored(template, host.tokenizer, [], p, r, None) for p, r in PAIRS]
    gen = pb.GenerateRequest(adapter="chat", prompt="The capital of France is", sampling=greedy(24))
    alone = stub.Generate(gen, timeout=60).token_ids

    forwards: list[int] = []
    real_forward = engine_module.score_forward

    def counting_forward(model: Any, jobs: Any, pad_id: int, device: Any) -> Any:
        forwards.append(len(jobs))
        return real_forward(model, jobs, pad_id, device)

    monkeypatch.setattr(engine_module, "score_forward", counting_forward)
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def call(key: str, fn: Any) -> None:
        try:
            results[key] = fn()
        except BaseException as e:  # surfaced below
            errors.append(e)

    engine = host.engine
    threads = [
        threading.Thread(target=call, args=(f"gen{i}", lambda: stub.Generate(gen, timeout=60)))
        for i in range(3)
    ]
    threads += [
        threading.Thread(
            target=call, args=(name, lambda n=name: stub.Score(score_request(n, PAIRS), timeout=60))
        )
        for name in reward_dirs
    ]
    with engine._cond:  # hold the loop: both Score jobs queue up and are drained together
        for t in threads:
            t.start()
        deadline = 100
        while len(engine._score_jobs) < 2 and deadline:
            engine._cond.wait(0.05)
            deadline -= 1
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert 2 in forwards, forwards  # the two reward adapters' rows shared a forward
    for name, source in reward_dirs.items():
        got = list(results[name].scores)
        want = reference_scores(tiny_llama, source, rows)
        assert got == pytest.approx(want, abs=1e-4), (name, got, want)
        usage = results[name].usage
        assert usage.adapter == f"{name}@1" and usage.tokens == sum(len(r) for r in rows)
    assert results["rm_a"].scores != results["rm_b"].scores
    for i in range(3):
        assert results[f"gen{i}"].token_ids == alone
    exposition = srv.metrics.exposition().decode()
    assert f'lorafleet_inference_scored_pairs_total{{model="tiny"}} {2.0 * len(PAIRS)}' in exposition


def test_chat_messages_render_like_the_training_rows(
    served: tuple[InferenceServer, Any], tiny_llama: Path, reward_dirs: dict[str, Path]
) -> None:
    srv, stub = served
    host = srv.plane.hosts["tiny"]
    template = templates.get_template(TEMPLATE, host.tokenizer)
    history = [("Hi", "Hello!")]
    ids = encode_scored(template, host.tokenizer, history, "What is 2 plus 3?", "5", "Be brief.")
    messages = [
        pb.ChatMessage(role="system", content="Be brief."),
        pb.ChatMessage(role="user", content="Hi"),
        pb.ChatMessage(role="assistant", content="Hello!"),
        pb.ChatMessage(role="user", content="What is 2 plus 3?"),
    ]
    got = stub.Score(pb.ScoreRequest(adapter="rm_a", pairs=[pb.ScorePair(messages=messages, response="5")]))
    assert list(got.scores) == pytest.approx(
        reference_scores(tiny_llama, reward_dirs["rm_a"], [ids]), abs=1e-4
    )


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_bad_score_requests_get_their_codes(served: tuple[InferenceServer, Any]) -> None:
    _, stub = served
    code, details = _code(lambda: stub.Score(pb.ScoreRequest(adapter="rm_a"), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "pairs" in details
    too_many = score_request("rm_a", [("q", "a")] * (MAX_SCORE_PAIRS + 1))
    code, details = _code(lambda: stub.Score(too_many, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"{MAX_SCORE_PAIRS + 1} pairs" in details
    code, details = _code(lambda: stub.Score(score_request("", PAIRS), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "adapter" in details
    code, details = _code(lambda: stub.Score(score_request("rm_a", [("q", ""), ("", "a")]), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "pairs[0].response" in details and "pairs[1].prompt" in details, details
    code, details = _code(lambda: stub.Score(score_request("rm_a", [("q " * 1500, "a")]), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "pairs[0]" in details and "context" in details, (
        details
    )
    unknown = score_request("rm_a", PAIRS).SerializeToString() + bytes([0x50, 0x01])  # field 10, varint
    channel = grpc.insecure_channel(f"127.0.0.1:{served[0].port}")
    call = channel.unary_unary(
        "/lorafleet.v1.InferenceService/Score",
        request_serializer=lambda b: b,
        response_deserializer=pb.ScoreResponse.FromString,
    )
    code, details = _code(lambda: call(unknown, timeout=30))
    channel.close()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "field number 10" in details, details
    code, details = _code(lambda: stub.Score(score_request("nope", PAIRS), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    code, details = _code(lambda: stub.Score(score_request("chat", PAIRS), timeout=30))
    assert (
        code == grpc.StatusCode.FAILED_PRECONDITION and "not a reward model" in details and "'sft'" in details
    )


def test_the_trained_reward_model_reranks_held_out_pairs(tmp_path: Path, tiny_llama: Path) -> None:
    """Best-of-n in practice: the rm run of ``tests/test_preference_learning.py``, published, then
    served; Score must prefer the chosen answer of at least 90 % of the held-out pairs."""
    import json

    from lorafleet.datagen import generate_preference_datasets
    from services.trainer.preference_recipe import run_preference
    from tests.test_preference_learning import rm_config

    pref = generate_preference_datasets(str(tmp_path / "pref"))
    trained = run_preference(rm_config(tmp_path, tiny_llama, pref), progress=False)["metrics"]
    rows = [
        json.loads(line) for line in pref["preference_validation"].read_text(encoding="utf-8").splitlines()
    ]
    with serving(settings_for(tiny_llama, tmp_path / "adapters")) as srv:
        channel, stub = stub_for(srv.port)
        right = 0
        for start in range(0, len(rows), MAX_SCORE_PAIRS // 2):
            chunk = rows[start : start + MAX_SCORE_PAIRS // 2]
            pairs = [(r["prompt"], r["chosen"]) for r in chunk] + [
                (r["prompt"], r["rejected"]) for r in chunk
            ]
            scores = list(stub.Score(score_request("rm", pairs), timeout=120).scores)
            right += sum(c > r for c, r in zip(scores[: len(chunk)], scores[len(chunk) :], strict=True))
        channel.close()
    accuracy = right / len(rows)
    assert accuracy >= 0.9, accuracy
    # The served scores rank exactly as the trainer's own held-out evaluation did.
    assert accuracy == pytest.approx(trained["preference_accuracy"], abs=1e-6), (accuracy, trained)


def test_lorafleet_score_prints_the_responses_best_first(served: tuple[InferenceServer, Any]) -> None:
    import io

    from services.inference import client

    srv, stub = served
    responses = ["cat", "a small animal that purrs", "dog"]
    out = io.StringIO()
    argv = ["--target", f"127.0.0.1:{srv.port}", "--adapter", "rm_b", "--prompt", "Translate 猫.", *responses]
    assert client.main("score", argv, out=out) == 0
    printed = [line.split("\t") for line in out.getvalue().splitlines()]
    want = stub.Score(score_request("rm_b", [("Translate 猫.", r) for r in responses]), timeout=60).scores
    assert sorted(float(s) for s, _ in printed) == pytest.approx(sorted(want), abs=1e-4)
    assert [float(s) for s, _ in printed] == sorted((float(s) for s, _ in printed), reverse=True)
    assert sorted(text for _, text in printed) == sorted(responses)
