"""Baichuan2-7B and ChatGLM3-6B in their original layouts: convert, train, serve, export back.

The tiny checkpoints come from ``lorafleet tiny --arch baichuan2 | chatglm3`` (original key names,
fused projections, SentencePiece tokenizer, ``auto_map`` configs). ``tests/reference_models.py``
computes the original architectures from their published equations; every check compares
against it or against PEFT on the converted model.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet.config import DataConfig, ModelConfig
from lorafleet.convert import CACHE_ENV, detect_source_layout
from lorafleet.data import IGNORE_INDEX, Sample, tokenize_sample
from lorafleet.errors import ModelLoadError
from lorafleet.export import export_original
from lorafleet.families import detect_family
from lorafleet.models import load_model, load_tokenizer, native_source, resolve_lora_targets
from lorafleet.templates import encode_turns, get_template
from lorafleet.tiny import build_tiny_model
from tests.reference_models import load_reference, reference_with_adapter

ARCHS = ("baichuan2", "chatglm3")
NATIVE_CLASS = {"baichuan2": "LlamaForCausalLM", "chatglm3": "GlmForCausalLM"}
FUSED = {"baichuan2": "W_pack", "chatglm3": "query_key_value"}
CONVERTED_TARGETS = {
    "baichuan2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "chatglm3": ["down_proj", "gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"],
}


@pytest.fixture(scope="module", autouse=True)
def convert_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Load-time conversions go to a fresh cache, never the user's."""
    cache = tmp_path_factory.mktemp("converted")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        yield cache


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {
        arch: build_tiny_model(
            root / arch, arch, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=800
        )
        for arch in ARCHS
    }


def _load(src: Path, **kwargs: Any) -> Any:
    return load_model(
        ModelConfig(name_or_path=str(src), **kwargs), for_training=False, device_map="cpu"
    ).eval()


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 19), generator=torch.Generator().manual_seed(seed))  # [batch, seq]


@pytest.mark.parametrize("arch", ARCHS)
def test_load_time_conversion_equals_the_reference_forward(
    arch: str, sources: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _load(sources[arch])
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(sources[arch])))
    assert type(model).__name__ == NATIVE_CLASS[arch]
    assert detect_family(model.config, str(sources[arch])).name == arch
    said = caplog.text + " ".join(str(w.message) for w in caught)
    assert "remote code" not in said and "trust_remote_code" not in said
    ids = _ids(len(tokenizer))
    with torch.no_grad():
        expected = load_reference(sources[arch])(ids)  # [batch, seq, vocab]
        got = model(input_ids=ids).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_command_writes_an_equal_native_checkpoint(
    arch: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from services.cli import main

    out = tmp_path / "native"
    assert main(["convert", str(sources[arch]), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == {"baichuan2": "llama", "chatglm3": "glm"}[arch]
    assert "auto_map" not in config
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = _ids(700, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, load_reference(sources[arch])(ids), atol=1e-4, rtol=1e-4
        )
    assert main(["convert", str(sources[arch]), str(out)]) == 2  # a non-empty output is refused


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_equals_the_sentencepiece_model(arch: str, sources: dict[str, Path]) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sources[arch] / "tokenizer.model"))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(sources[arch])))
    for text in ["病人主诉：头痛三天。 Fever 38.5C, 2  spaces\nnew line", " lead", "罕见字鬱 😀"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), text
        assert tokenizer.decode(ids) == sp.decode(ids)
    if arch == "chatglm3":
        n = sp.get_piece_size()
        roles = ["[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
        assert tokenizer.convert_tokens_to_ids(roles) == [n + 1, n + 3, n + 5, n + 6, n + 7, n + 8]
    else:
        assert tokenizer.convert_tokens_to_ids(["<reserved_106>"]) == [sp.piece_to_id("<reserved_106>")]
        assert tokenizer("你好")["input_ids"] == sp.encode("你好")  # Baichuan adds no bos


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_labels_exactly_the_assistant_turns(arch: str, sources: dict[str, Path]) -> None:
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(sources[arch])))
    template = get_template(arch, tokenizer)
    turns = [("头痛怎么办？", "多休息。"), ("还要吃药吗？", "遵医嘱服药。")]
    example, truncated = tokenize_sample(
        Sample(system=None, turns=turns, line=1), tokenizer, template, DataConfig(train_file="x")
    )
    assert not truncated
    pieces = encode_turns(template, tokenizer, turns, None)
    expected_labels: list[int] = []
    for prompt, response in pieces:
        expected_labels += [IGNORE_INDEX] * len(prompt) + response
    assert example.labels == expected_labels
    for (query, answer), (_, response) in zip(turns, pieces, strict=True):
        text = tokenizer.decode(response)
        assert answer in text and query not in text and text.endswith(tokenizer.eos_token)
    markers = {"chatglm3": ["[gMASK]", "sop", "<|user|>"], "baichuan2": ["<reserved_106>"]}[arch]
    marker_ids = tokenizer.convert_tokens_to_ids(markers)
    assert example.input_ids[: len(marker_ids)] == marker_ids  # each marker is one control token


def _train(model: Any, vocab: int, steps: int = 8) -> list[float]:
    """A few AdamW steps on one fixed batch; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = _ids(vocab, seed=3)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trains_and_exports_to_the_original_layout_exactly(
    arch: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    src = sources[arch]
    model = load_model(ModelConfig(name_or_path=str(src)), for_training=True, device_map="cpu")
    family = detect_family(model.config, str(src))
    targets = resolve_lora_targets(model, family, "auto")
    assert targets == CONVERTED_TARGETS[arch]
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    losses = _train(peft, 700)
    assert losses[-1] < 0.8 * losses[0]
    peft.save_pretrained(str(tmp_path / "native"))

    out = export_original(tmp_path / "native", tmp_path / "original", family.name, base_dir=src)
    config = json.loads((out / "adapter_config.json").read_text())
    assert FUSED[arch] in config["target_modules"] and "q_proj" not in config["target_modules"]
    assert config["rank_pattern"][FUSED[arch]] == 12  # q, k, v at rank 4: fused rank 3r

    ids = _ids(700, seed=4)
    peft.eval()
    reference = reference_with_adapter(src, out)
    assert any(FUSED[arch] in name for name, _ in reference.named_modules() if name.endswith("lora_A"))
    with torch.no_grad():
        torch.testing.assert_close(reference(ids), peft(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(reference(ids), load_reference(src)(ids), atol=1e-3)  # it did change


def test_export_of_a_partial_qkv_adapter_fills_zero_blocks(sources: dict[str, Path], tmp_path: Path) -> None:
    """q and v only (a common choice): the fused B has zero rows for k, and stays exact."""

    from tests.inference_utils import peft_model, save_lora_adapter

    src = sources["chatglm3"]
    save_lora_adapter(
        src, tmp_path / "native", rank=4, targets=("q_proj", "v_proj", "gate_up_proj"), use_rslora=True
    )
    out = export_original(tmp_path / "native", tmp_path / "original", "chatglm3", base_dir=src)
    native = peft_model(_load(src), {"a": tmp_path / "native"})
    reference = reference_with_adapter(src, out)
    ids = _ids(700, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reference(ids), native(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_qlora_nf4_trains_on_the_converted_model(sources: dict[str, Path]) -> None:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    src = sources["chatglm3"]
    cfg = ModelConfig(name_or_path=str(src), quantization="nf4", dtype="bf16")
    model = load_model(cfg, for_training=True, device_map="cpu")
    with torch.no_grad():  # an eval forward first: the bitsandbytes CPU repack trap (STACK.md)
        model.eval()(input_ids=_ids(700))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = resolve_lora_targets(model, detect_family(model.config, str(src)), "auto")
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    losses = _train(peft, 700)
    assert losses[-1] < 0.8 * losses[0]


def test_engine_serves_mixed_batches_with_peft_parity(sources: dict[str, Path], tmp_path: Path) -> None:
    from services.inference.engine import Engine
    from services.inference.lora_batch import adapter_weights_from_peft_dir
    from services.inference.requests import GenerationRequest
    from services.inference.sampling import SamplingParams
    from tests.inference_utils import References, save_lora_adapter

    for arch in ARCHS:
        src = sources[arch]
        dirs = {
            f"{arch}-a": save_lora_adapter(
                src, tmp_path / arch / "a", rank=4, targets=CONVERTED_TARGETS[arch]
            ),
            f"{arch}-b": save_lora_adapter(
                src, tmp_path / arch / "b", rank=8, targets=("q_proj", "v_proj"), seed=1
            ),
        }
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(src)))
        refs = References(src, dirs, "none", tokenizer.eos_token_id)
        prompts = [
            tokenizer(text, add_special_tokens=False)["input_ids"]
            for text in ("头痛三天", "Fever and cough", "你好")
        ]
        with Engine(_load(src), num_slots=2, max_rank=8, start=False) as engine:
            weights = {n: adapter_weights_from_peft_dir(d, f"{n}@1", engine.model) for n, d in dirs.items()}
            plan = [(name, p) for p in prompts for name in [*dirs, None]]
            handles = [
                engine.submit(
                    GenerationRequest(
                        p, adapter=None if n is None else weights[n], params=SamplingParams(max_new_tokens=8)
                    )
                )
                for n, p in plan
            ]
            engine.start()
            for (name, prompt), handle in zip(plan, handles, strict=True):
                assert handle.result(60.0).token_ids == refs.tokens(name, prompt, 8), (arch, name)


def test_refused_layouts_name_the_alternative(tmp_path: Path) -> None:
    def write(name: str, config: dict[str, Any]) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return tmp_path / name

    alibi = write(
        "b13", {"model_type": "baichuan", "hidden_size": 5120, "num_hidden_layers": 40, "vocab_size": 125696}
    )
    with pytest.raises(ModelLoadError, match=r"ALiBi.*Baichuan2-7B.*trust_remote_code"):
        detect_source_layout(alibi)
    v1 = write("glm1", {"model_type": "chatglm", "position_encoding_2d": True, "inner_hidden_size": 16384})
    with pytest.raises(ModelLoadError, match=r"ChatGLM-6B \(v1\).*ChatGLM3-6B"):
        detect_source_layout(v1)
    odd = write(
        "glm-odd", {"model_type": "chatglm", "ffn_hidden_size": 8, "add_bias_linear": True, "rmsnorm": False}
    )
    with pytest.raises(ModelLoadError, match=r"rmsnorm=False.*add_bias_linear=True"):
        detect_source_layout(odd)
    # Without trust_remote_code loading refuses; with it, the checkpoint's own code is the user's call.
    with pytest.raises(ModelLoadError, match="ALiBi"):
        native_source(ModelConfig(name_or_path=str(alibi)))
    allowed = ModelConfig(name_or_path=str(alibi), trust_remote_code=True)
    assert native_source(allowed) is allowed
    assert detect_source_layout(write("llama", {"model_type": "llama"})) is None


def test_recipe_trains_publishes_and_exports_baichuan2(
    sources: dict[str, Path], bundled_data: dict[str, Path], tmp_path: Path
) -> None:
    """The trainer's recipe on the original checkpoint path: converted at load time, trained with
    the family's converted targets and template, published; ``lorafleet export`` writes the W_pack
    adapter, and on the reference forward it gives the trained model's logits."""

    from services.cli import main
    from services.trainer.recipe import run_training
    from tests.training_utils import training_config

    src = sources["baichuan2"]
    config = training_config(tmp_path, src, bundled_data, train={"max_steps": 6})
    result = run_training(config)
    assert result.published is not None
    manifest = result.published.manifest
    assert (manifest.family, manifest.template) == ("baichuan2", "baichuan2")
    assert manifest.base_model["path"] == str(src.resolve())
    trained = json.loads((result.published.path / "adapter_config.json").read_text())
    assert sorted(trained["target_modules"]) == CONVERTED_TARGETS["baichuan2"]
    out = tmp_path / "original"
    ref = f"{manifest.name}@{result.published.version}"
    root = config.output.adapters_root
    assert main(["export", ref, "--layout", "original", "--out", str(out), "--root", root]) == 0
    reference = reference_with_adapter(src, out)
    ids = _ids(700, seed=6)
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(ids), result.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_memory_estimate_reads_the_native_config_without_converting(
    arch: str,
    sources: dict[str, Path],
    bundled_data: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The trainer's SubmitJob memory check builds the model on the meta device from its config: for
    an original checkpoint that is the native config (AutoConfig would need the checkpoint's own
    code), and no weights are converted for it (a 7B conversion would stall every submit)."""
    from lorafleet.estimate import estimate_for_config, meta_model
    from tests.training_utils import training_config

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "untouched-cache"))
    config = training_config(tmp_path, sources[arch], bundled_data)
    model, hf_config = meta_model(config)
    assert type(model).__name__ == NATIVE_CLASS[arch]
    assert detect_family(hf_config, str(sources[arch])).name == arch
    assert not (tmp_path / "untouched-cache").exists()
    loaded = _load(sources[arch])
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in loaded.parameters())
    assert estimate_for_config(config).device_total_bytes > 0


def test_load_time_conversion_survives_a_concurrent_conversion(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's job and the inference server may convert one checkpoint at the same moment: the
    process whose rename comes second finds the other's complete conversion and uses it."""
    import lorafleet.convert as convert

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    check = convert._check_complete
    calls: list[int] = []

    def other_process_finishes_first(*args: Any) -> None:
        check(*args)
        calls.append(1)
        if len(calls) == 1:  # the outer conversion: the other one runs and renames into place now
            convert.native_checkpoint(sources["chatglm3"])

    monkeypatch.setattr(convert, "_check_complete", other_process_finishes_first)
    target = convert.native_checkpoint(sources["chatglm3"])
    assert len(calls) == 2 and (target / convert.CONVERT_MANIFEST).is_file()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary left behind
