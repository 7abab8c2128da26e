"""The training recipe, for real: every method trains the tiny model on CPU, the loss falls, and the
published artifact, loaded with plain PEFT / transformers, gives the logits of the trained model."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lorafleet.adapters import get_adapter, verify_files
from lorafleet.errors import ConfigError, LorafleetError
from lorafleet.method_specs import method_spec
from lorafleet.runlog import read_records
from services.trainer.recipe import run_training, strip_stop_strings
from tests.training_utils import probe_batch, training_config

pytestmark = pytest.mark.integration

METHOD_OPTIONS = {
    "lora": {},
    "qlora": {},
    "lora8bit": {},
    "freeze": {"freeze": {"trainable_layers": 1}, "train": {"learning_rate": 1e-3}},
    "full": {"train": {"learning_rate": 1e-3}},
    # P-tuning v2 with its MLP reparameterisation learns far faster than raw prefixes.
    "ptuning": {"ptuning": {"mode": "prefix", "num_virtual_tokens": 16, "prefix_projection": True}},
}
PROBE = ["判断临床试验筛选标准的类型：\n年龄在18至65岁之间\n答：", "What is 3 + 4?", "你好"]


def _plain_base(model_dir, method):
    """The base model as a user would load it with transformers alone."""
    if method == "qlora":
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, device_map="cpu")
    if method == "lora8bit":
        q = BitsAndBytesConfig(load_in_8bit=True)
        return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, device_map="cpu")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_method_trains_and_published_artifact_reproduces_the_model(
    method, tmp_path, tiny_llama, bundled_data
):
    options = {k: dict(v) for k, v in METHOD_OPTIONS[method].items()}
    train = {"max_steps": 16, **options.pop("train", {})}
    config = training_config(tmp_path, tiny_llama, bundled_data, method, train=train, **options)
    result = run_training(config)

    records = [r for r in read_records(tmp_path / "run" / "trainer_log.jsonl") if "event" not in r]
    assert [r["step"] for r in records] == list(range(2, 17, 2))
    first = statistics.mean(r["loss"] for r in records[:2])
    last = statistics.mean(r["loss"] for r in records[-2:])
    assert last < 0.9 * first, f"{method}: loss did not fall: {[round(r['loss'], 3) for r in records]}"

    pub = result.published
    assert pub is not None and pub.version == 1
    assert verify_files(pub) == []
    m = pub.manifest
    assert (m.name, m.method, m.template, m.family) == (f"t-{method}", method, "llama2", "llama")
    assert m.base_model["kind"] == "local" and len(m.base_model["sha256"]) == 64
    assert m.dataset["files"] and m.metrics["eval_loss"] > 0
    assert get_adapter(config.output.adapters_root, f"t-{method}").path == pub.path
    # The manifest records the method's own options section and no other.
    spec = method_spec(method)
    recorded = {s for s in ("lora", "ptuning", "freeze") if m.hyperparameters[s] is not None}
    assert m.kind == spec.artifact_kind and recorded == ({spec.options_section} - {None})

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    batch = probe_batch(tokenizer, PROBE)
    result.model.eval()
    with torch.no_grad():
        trained = result.model(**batch).logits.float()
        if m.kind == "full_model":
            assert (pub.path / "config.json").is_file() and (pub.path / "model.safetensors").is_file()
            reloaded_model = AutoModelForCausalLM.from_pretrained(str(pub.path), dtype=torch.float32)
        else:
            assert (pub.path / "adapter_model.safetensors").is_file()
            assert not list(pub.path.glob("*.bin")), "artifacts are safetensors only"
            reloaded_model = PeftModel.from_pretrained(_plain_base(str(tiny_llama), method), str(pub.path))
        reloaded = reloaded_model.eval()(**batch).logits.float()
    scale = float(trained.abs().max())
    diff = float((trained - reloaded).abs().max())
    tolerance = 1e-5 if method in ("lora", "freeze", "full", "ptuning") else 2e-2
    assert diff <= tolerance * scale, f"{method}: reloaded logits differ by {diff:.3g} (scale {scale:.3g})"
    # A trained artifact must differ from the untouched base: a publish that silently saved nothing
    # (the peers' "merge that changes nothing") would pass the comparison above.
    base = _plain_base(str(tiny_llama), method).eval()
    with torch.no_grad():
        untouched = base(**batch).logits.float()
    if m.kind != "ptuning":
        assert float((untouched - trained).abs().max()) > 1e-3


def test_run_records_config_and_generation_metrics(tmp_path, tiny_llama, bundled_data):
    config = training_config(
        tmp_path,
        tiny_llama,
        bundled_data,
        train={"max_steps": 6, "predict_with_generate": True, "max_eval_samples": 12, "eval_steps": 3},
    )
    result = run_training(config)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "training_loss.png").is_file()
    final = json.loads((run / "final_metrics.json").read_text())
    for key in ("eval_loss", "eval_perplexity", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "accuracy"):
        assert key in final, key
    assert final == {k: v for k, v in result.metrics.items()}
    records = read_records(run / "trainer_log.jsonl")
    started = next(r for r in records if r.get("event") == "run_started")
    assert started["memory_estimate"]["device_total_bytes"] > 0
    assert started["trainable_params"] < started["total_params"]
    steps = [r for r in records if "event" not in r]
    assert any("eval_loss" in r for r in steps)
    for key in (
        "step",
        "total_steps",
        "epoch",
        "loss",
        "learning_rate",
        "tokens_per_s",
        "elapsed_s",
        "eta_s",
    ):
        assert key in steps[-1], key
    predictions = (run / "generated_predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 12


def test_already_published_run_is_not_published_twice(tmp_path, tiny_llama, bundled_data):
    config = training_config(tmp_path, tiny_llama, bundled_data, train={"max_steps": 2})
    first = run_training(config)
    again = run_training(config)
    assert first.published is not None and again.details.get("already_published")
    versions = sorted(p.name for p in (tmp_path / "adapters" / "t-lora").iterdir())
    assert versions == ["1"]


def test_bad_target_module_is_a_clear_error(tmp_path, tiny_llama, bundled_data):
    config = training_config(
        tmp_path, tiny_llama, bundled_data, lora={"target_modules": ["q_proj", "nope_proj"]}
    )
    with pytest.raises(ConfigError, match=r"lora\.target_modules"):
        run_training(config)


def test_dataset_with_too_many_bad_rows_refuses(tmp_path, tiny_llama, bundled_data):
    bad = tmp_path / "bad.jsonl"
    good_rows = bundled_data["cblue_train"].read_text(encoding="utf-8").splitlines()[:20]
    bad.write_text("\n".join([*good_rows, "{not json", '{"input": "x"}']) + "\n", encoding="utf-8")
    config = training_config(tmp_path, tiny_llama, bundled_data, data={"train_file": str(bad)})
    with pytest.raises(LorafleetError, match=r"bad\.jsonl:21"):
        run_training(config)


def test_strip_stop_strings():
    assert strip_stop_strings("年龄</s>junk", ["</s>"]) == "年龄"
    assert strip_stop_strings("abc", ["</s>", ""]) == "abc"
