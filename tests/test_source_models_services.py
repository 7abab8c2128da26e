"""Baichuan2-7B and ChatGLM3-6B in their original layouts through the real services (issue 20).

One trainer process and one inference process serve the whole module. The tiny checkpoints come
from ``lorafleet tiny --arch baichuan2 | chatglm3`` (original key names, fused ``W_pack`` /
``query_key_value``, SentencePiece tokenizer, ``auto_map`` configs, no modelling code) and are named
by their original directories everywhere: in ``SubmitJob`` and in the inference server's
``--model NAME=DIR``. The path under test:

1. the trainer service converts each checkpoint at load time and trains LoRA on both, QLoRA (nf4) on
   ChatGLM3, with the loss falling, and publishes each adapter;
2. the inference server, started before the adapters exist, picks them up from the publish root and
   its greedy ``Generate`` / ``Chat`` tokens equal those of a PEFT ``PeftModel`` on the converted model
   with the same adapter, built in this process (nf4 base for the QLoRA adapter);
3. ``lorafleet export NAME@V --layout original`` writes the fused-layout adapter, and PEFT on the
   independent reference forward of the original architecture (``tests/reference_models.py``)
   gives the converted model's logits;
4. no process on the path mentions remote code.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from inference_service_utils import InferenceProcess, greedy
from inference_utils import greedy_tokens, load_base, peft_model
from trainer_utils import TrainerProcess, lora_spec, processes_with_env, watch_all

from lorafleet import templates
from lorafleet.config import ModelConfig
from lorafleet.convert import CACHE_ENV
from lorafleet.models import load_tokenizer
from lorafleet.v1 import inference_pb2 as ipb
from lorafleet.v1 import trainer_pb2 as tpb
from tests.reference_models import load_reference, reference_with_adapter

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Case:
    """One training job: which checkpoint, which method, and the server model that serves it."""

    arch: str
    method: str
    served_by: str
    quantization: str

    @property
    def adapter(self) -> str:
        return f"{self.arch}-{self.method}"


CASES = {
    c.adapter: c
    for c in (
        Case("baichuan2", "lora", "baichuan2", "none"),
        Case("chatglm3", "lora", "chatglm3", "none"),
        Case("chatglm3", "qlora", "chatglm3-nf4", "nf4"),
    )
}
CONVERTED_TARGETS = {
    "baichuan2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "chatglm3": ["down_proj", "gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"],
}
FUSED = {"baichuan2": "W_pack", "chatglm3": "query_key_value"}
PROMPT = "患者主诉头痛三天"
REMOTE_CODE_WORDS = ("remote code", "remote_code", "auto_map")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("source-services")


@pytest.fixture(scope="module", autouse=True)
def convert_cache(root: Path) -> Iterator[Path]:
    """Load-time conversions (this process and both services inherit it) go to a fresh cache; the
    mark lets teardown find every process the services started."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root / "converted"))
        patch.setenv("LORAFLEET_TEST_MARK", str(root))
        yield root / "converted"


@pytest.fixture(scope="module")
def sources(root: Path) -> dict[str, Path]:
    """The tiny original-layout checkpoints, written by the ``lorafleet tiny`` command."""
    from services.cli import main

    out = {}
    for arch in ("baichuan2", "chatglm3"):
        out[arch] = root / "models" / arch
        kv = ["--kv-heads", "2"] if arch == "chatglm3" else []
        argv = ["tiny", "--arch", arch, "--out", str(out[arch]), "--hidden-size", "64", "--layers", "2"]
        assert main([*argv, "--heads", "4", *kv]) == 0
        assert "auto_map" in json.loads((out[arch] / "config.json").read_text())
    return out


@pytest.fixture(scope="module")
def services(root: Path, sources: dict[str, Path]) -> Iterator[tuple[TrainerProcess, InferenceProcess]]:
    """The inference server (started first: it must pick the adapters up while running) and the
    trainer, both on the original directories and one publish root."""
    adapters = root / "adapters"
    adapters.mkdir()
    models = [
        f"{c.served_by}={sources[c.arch]}" + (":nf4" if c.quantization == "nf4" else "")
        for c in CASES.values()
    ]
    inference = InferenceProcess(
        [
            *(a for m in models for a in ("--model", m)),
            "--adapters-root",
            str(adapters),
            "--scan-interval-s",
            "0.2",
            "--max-rank",
            "16",
            "--torch-threads",
            "1",
            "--metrics-port",
            "-1",
        ],
        root,
    )
    trainer = TrainerProcess(root / "state", adapters, ["--max-running", "2"])
    try:
        inference.start(timeout=300)
        trainer.start()
        yield trainer, inference
    finally:
        trainer.stop()
        inference.stop()
        for p in processes_with_env("LORAFLEET_TEST_MARK", str(root)):
            if p.pid != os.getpid():  # nothing the module started outlives it
                p.kill()


@dataclass
class Trained:
    job: tpb.Job
    losses: list[float]
    logs: list[str]
    path: Path
    manifest: dict[str, Any]


@pytest.fixture(scope="module")
def trained(
    services: tuple[TrainerProcess, InferenceProcess], sources: dict[str, Path], bundled_data: dict[str, Path]
) -> dict[str, Trained]:
    """Every case submitted through ``SubmitJob`` at once, then waited for."""
    trainer, _ = services
    submitted = {}
    for name, case in CASES.items():
        spec = lora_spec(sources[case.arch], bundled_data, max_steps=10)
        spec.method, spec.adapter_name = case.method, name
        submitted[name] = trainer.stub.SubmitJob(tpb.SubmitJobRequest(spec=spec)).id
    out = {}
    for name, job_id in submitted.items():
        job = trainer.wait_for(job_id, timeout=600)
        assert job.state == tpb.JOB_STATE_SUCCEEDED, f"{name}: {job.reason}\n{job.log_tail}"
        losses, logs = [], []
        for event in watch_all(trainer.stub, job_id):
            if event.WhichOneof("event") == "metrics" and event.metrics.loss > 0:
                losses.append(event.metrics.loss)
            elif event.WhichOneof("event") == "log":
                logs.append(event.log.text)
        path = trainer.adapters_root / name / str(job.adapter.version)
        manifest = json.loads((path / "lorafleet_manifest.json").read_text())
        out[name] = Trained(job, losses, logs, path, manifest)
    return out


def _wait_served(inference: InferenceProcess, model: str, ref: str, timeout: float = 60) -> None:
    """Until the running server's registry for ``model`` lists ``ref`` (found by its own scan)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        listed = inference.stub.ListModels(ipb.ListModelsRequest(), timeout=10).adapters
        if any(a.ref == ref and a.model == model and a.state != "failed" for a in listed):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{ref} never listed for {model}:\n{inference.server_log()[-3000:]}")


def _reference_tokens(
    case: Case, src: Path, adapter: Path, ids: list[int], n: int, stops: set[int]
) -> list[int]:
    """Greedy tokens of PeftModel on the converted base (loaded as the services load it), cut after
    the first stop id: what the server must return."""
    model = peft_model(load_base(src, quantization=case.quantization), {"a": adapter})
    out = greedy_tokens(model, ids, n)
    for i, token in enumerate(out):
        if token in stops:
            return out[: i + 1]
    return out


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_trainer_service_trains_and_publishes_the_original_checkpoint(
    name: str, trained: dict[str, Trained], sources: dict[str, Path]
) -> None:
    case, run = CASES[name], trained[name]
    assert len(run.losses) >= 4, run.losses
    assert sum(run.losses[-2:]) / 2 < 0.8 * run.losses[0], run.losses  # the loss falls
    assert run.job.adapter.ref == f"{name}@1"
    manifest = run.manifest
    assert manifest["family"] == manifest["template"] == case.arch and manifest["method"] == case.method
    assert manifest["base_model"]["path"] == str(sources[case.arch].resolve())  # the original, not the cache
    assert manifest["hyperparameters"]["model"]["quantization"] == case.quantization  # qlora: nf4 base
    config = json.loads((run.path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == CONVERTED_TARGETS[case.arch]
    said = "\n".join([*run.logs, run.job.log_tail]).lower()
    assert not [w for w in REMOTE_CODE_WORDS if w in said], said[-2000:]


@pytest.mark.parametrize("name", list(CASES))
def test_running_server_serves_the_published_adapter_with_peft_parity(
    name: str,
    trained: dict[str, Trained],
    services: tuple[TrainerProcess, InferenceProcess],
    sources: dict[str, Path],
) -> None:
    case, run = CASES[name], trained[name]
    _, inference = services
    _wait_served(inference, case.served_by, f"{name}@1")
    src = sources[case.arch]
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(src)))

    ids = tokenizer(PROMPT)["input_ids"]
    want = _reference_tokens(case, src, run.path, ids, 10, {tokenizer.eos_token_id})
    request = ipb.GenerateRequest(model=case.served_by, adapter=name, prompt=PROMPT, sampling=greedy(10))
    got = inference.stub.Generate(request, timeout=120)
    assert list(got.token_ids) == want
    assert got.usage.prompt_tokens == len(ids) and got.usage.adapter == f"{name}@1"
    base = inference.stub.Generate(
        ipb.GenerateRequest(model=case.served_by, prompt=PROMPT, sampling=greedy(10))
    )
    assert list(base.token_ids) != want, "the trained adapter must change the greedy tokens"

    template = templates.get_template(run.manifest["template"], tokenizer)
    chat_ids = templates.encode_prompt(template, tokenizer, [("头痛", "多休息。")], "还要吃药吗？", None)
    stops = set(templates.stop_token_ids(template, tokenizer)) | {tokenizer.eos_token_id}
    want = _reference_tokens(case, src, run.path, chat_ids, 10, stops)
    messages = [("user", "头痛"), ("assistant", "多休息。"), ("user", "还要吃药吗？")]
    chat = inference.stub.Chat(
        ipb.ChatRequest(
            model=case.served_by,
            adapter=name,
            sampling=greedy(10),
            messages=[ipb.ChatMessage(role=r, content=c) for r, c in messages],
        ),
        timeout=120,
    )
    assert list(chat.token_ids) == want
    assert chat.usage.template == case.arch and chat.usage.prompt_tokens == len(chat_ids)
    if case.arch == "chatglm3":  # the template's prefix and role tokens, one control token each
        markers = tokenizer.convert_tokens_to_ids(["[gMASK]", "sop", "<|user|>"])
        assert chat_ids[:3] == markers


@pytest.mark.parametrize("name", list(CASES))
def test_export_of_the_published_adapter_matches_the_reference_forward(
    name: str, trained: dict[str, Trained], sources: dict[str, Path], root: Path
) -> None:
    from services.cli import main

    case, run = CASES[name], trained[name]
    out = root / "exported" / name
    adapters_root = str(run.path.parent.parent)
    argv = ["export", f"{name}@1", "--layout", "original", "--out", str(out), "--root", adapters_root]
    assert main(argv) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert FUSED[case.arch] in config["target_modules"] and "q_proj" not in config["target_modules"]

    src = sources[case.arch]
    native = peft_model(load_base(src), {"a": run.path})  # fp32: the adapter's math, any base quantization
    ids = torch.randint(3, 700, (2, 17), generator=torch.Generator().manual_seed(7))  # [batch, seq]
    with torch.no_grad():
        exported = reference_with_adapter(src, out)(ids)  # [batch, seq, vocab]
        torch.testing.assert_close(exported, native(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(exported, load_reference(src)(ids), atol=1e-3)  # the adapter acts


def test_no_service_on_the_path_mentions_remote_code(
    trained: dict[str, Trained], services: tuple[TrainerProcess, InferenceProcess]
) -> None:
    for process in services:
        log = process.server_log().lower()
        assert log, "the server log is empty"
        assert not [w for w in REMOTE_CODE_WORDS if w in log], log[-3000:]
