"""Model families, loading (fp32 / bf16 / nf4 / int8), inspection helpers and fingerprints."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
)

import lorafleet.models as models
from lorafleet.config import ModelConfig
from lorafleet.errors import ConfigError, ModelLoadError
from lorafleet.families import FAMILIES, GENERIC, Family, detect_family, get_family
from lorafleet.models import (
    base_model_fingerprint,
    count_parameters,
    disable_bnb_cpu_repack,
    find_layer_prefixes,
    find_linear_module_names,
    fingerprints_match,
    load_model,
    load_tokenizer,
    param_count_from_config,
    resolve_lora_targets,
)
from lorafleet.templates import TEMPLATES
from lorafleet.tiny import build_tiny_model

torch.set_num_threads(2)

LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
NEOX_TARGETS = ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]


def make_corpus(seed: int = 0, paragraphs: int = 80) -> str:
    rng = random.Random(seed)
    words = [
        "小明",
        "喜欢",
        "机器学习",
        "老师",
        "天气",
        "The",
        "teacher",
        "likes",
        "history",
        "weather",
        "。",
        ".",
    ]
    return "\n\n".join(
        " ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(paragraphs)
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "llama",
        "llama",
        make_corpus(),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        vocab_size=500,
    )


def tiny_from_config(config: PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def small(cls: type, **extra: object) -> PretrainedConfig:
    return cls(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, **extra)


def hand_made(model_type: str, name: str = "", **fields: object) -> PretrainedConfig:
    config = PretrainedConfig(name_or_path=name, **fields)
    config.model_type = model_type
    return config


# ---------------------------------------------------------------------------------------------
# Families

DETECTION_CASES = [
    # (model_type, config fields, name passed, expected family)
    ("llama", {"vocab_size": 32000}, "meta-llama/Llama-2-7b-chat-hf", "llama"),
    ("llama", {"vocab_size": 55296}, "hfl/chinese-alpaca-2-7b", "llama"),
    ("llama", {"vocab_size": 32000}, "openlm-research/open_llama_7b", "llama"),
    ("llama", {"vocab_size": 60928}, "TigerResearch/tigerbot-7b-chat", "llama"),
    ("llama", {"vocab_size": 79458}, "BelleGroup/BELLE-Llama2-13B-chat-0.4M", "belle"),
    ("llama", {"vocab_size": 128256}, "", "llama3"),
    ("llama", {"vocab_size": 32000}, "my-org/Meta-Llama-3-8B-finetune", "llama3"),
    ("mistral", {"vocab_size": 32000}, "mistralai/Mistral-7B-v0.1", "mistral"),
    ("qwen2", {"vocab_size": 151936}, "Qwen/Qwen2-0.5B-Instruct", "qwen2"),
    ("gpt_neox", {"vocab_size": 50304}, "EleutherAI/pythia-70m", "gpt_neox"),
    ("falcon", {"vocab_size": 65024}, "tiiuae/falcon-7b", "falcon"),
    ("bloom", {"vocab_size": 250880}, "bigscience/bloomz-560m", "bloom"),
    ("baichuan", {"vocab_size": 64000}, "baichuan-inc/Baichuan-7B", "baichuan"),
    ("baichuan", {"vocab_size": 64000}, "baichuan-inc/Baichuan-13B-Chat", "baichuan"),
    ("baichuan", {"vocab_size": 125696}, "/models/some-local-copy", "baichuan2"),
    ("baichuan", {"vocab_size": 64000}, "baichuan-inc/Baichuan2-7B-Chat", "baichuan2"),
    ("chatglm", {"padded_vocab_size": 65024}, "THUDM/chatglm2-6b", "chatglm2"),
    ("chatglm", {"padded_vocab_size": 65024}, "THUDM/chatglm3-6b", "chatglm3"),
    ("chatglm", {"padded_vocab_size": 65024}, "", "chatglm2"),
    ("mamba", {"vocab_size": 50280}, "state-spaces/mamba-130m", "generic"),
    ("", {}, "", "generic"),
]


@pytest.mark.parametrize(("model_type", "fields", "name", "expected"), DETECTION_CASES)
def test_detect_family(model_type: str, fields: dict, name: str, expected: str) -> None:
    assert detect_family(hand_made(model_type, **fields), name).name == expected


def test_detection_covers_every_registered_family() -> None:
    assert {case[3] for case in DETECTION_CASES} == set(FAMILIES)


def test_name_hint_read_from_config_name_or_path() -> None:
    config = hand_made("chatglm", "THUDM/chatglm3-6b", padded_vocab_size=65024)
    assert detect_family(config).name == "chatglm3"


def test_chatglm3_told_apart_by_its_local_tokenizer_code(tmp_path_factory: pytest.TempPathFactory) -> None:
    ckpt = tmp_path_factory.mktemp("glm")  # a path without "chatglm3" in it, so no name hint
    (ckpt / "tokenization_chatglm.py").write_text('ROLES = ["<|system|>", "<|user|>", "<|observation|>"]\n')
    config = hand_made("chatglm", padded_vocab_size=65024)
    assert detect_family(config, str(ckpt)).name == "chatglm3"
    (ckpt / "tokenization_chatglm.py").write_text('SPECIAL = ["[gMASK]", "sop"]\n')
    assert detect_family(config, str(ckpt)).name == "chatglm2"


def test_registry_is_consistent() -> None:
    for family in FAMILIES.values():
        assert family.template in TEMPLATES, family
        assert get_family(family.name) is family
    assert FAMILIES["baichuan"].needs_remote_code and FAMILIES["chatglm3"].needs_remote_code
    assert not FAMILIES["llama"].needs_remote_code
    assert FAMILIES["baichuan2"].lora_targets == ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert FAMILIES["qwen2"].template == "qwen" and FAMILIES["llama"].template == "llama2"
    assert GENERIC.lora_targets == "all-linear" and GENERIC.template == "default"


def test_a_family_with_an_unknown_template_is_refused_at_definition() -> None:
    with pytest.raises(ValueError, match="template 'chatml2' is not in"):
        Family("mymodel", ("mymodel",), ("q_proj",), "chatml2")
    assert Family("mymodel", ("mymodel",), ("q_proj",), "chatml").template == "chatml"


def test_get_family_unknown_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        get_family("gpt5")
    assert info.value.problems[0].field == "model.family"
    assert "llama" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Loading


def test_load_fp32_for_training(llama_dir: Path) -> None:
    model = load_model(ModelConfig(name_or_path=str(llama_dir)), for_training=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.use_cache is False
    assert model.device.type == "cpu"


def test_load_bf16_for_inference(llama_dir: Path) -> None:
    model = load_model(ModelConfig(name_or_path=str(llama_dir), dtype="bf16"), for_training=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.use_cache is not False
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits.float()).all()


def test_load_tokenizer_keeps_its_pad(llama_dir: Path) -> None:
    tok = load_tokenizer(ModelConfig(name_or_path=str(llama_dir)))
    assert tok.pad_token == "<pad>"


def test_load_tokenizer_pads_with_eos_without_growing_the_vocab(llama_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(ModelConfig(name_or_path=str(llama_dir)))
    size = len(tok)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    reloaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert reloaded.pad_token == reloaded.eos_token == "</s>"
    assert len(reloaded) == size


@pytest.fixture(scope="module")
def nf4_model(llama_dir: Path) -> torch.nn.Module:
    return load_model(ModelConfig(name_or_path=str(llama_dir), quantization="nf4"), for_training=True)


def test_nf4_load_disables_the_cpu_repack(nf4_model: torch.nn.Module) -> None:
    import bitsandbytes as bnb

    layers = [m for m in nf4_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # 7 projections per block, the head stays unquantized
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert disable_bnb_cpu_repack(nf4_model) == len(layers)  # idempotent, counts every module
    assert disable_bnb_cpu_repack(torch.nn.Linear(4, 4)) == 0


def test_count_parameters_counts_4bit_weights_at_full_size(
    llama_dir: Path, nf4_model: torch.nn.Module
) -> None:
    fp32 = AutoModelForCausalLM.from_pretrained(llama_dir)
    total, _ = count_parameters(fp32)
    assert total == sum(p.numel() for p in fp32.parameters())
    assert count_parameters(nf4_model)[0] == total
    assert sum(p.numel() for p in nf4_model.parameters()) < total  # what a naive count would say
    fp32.requires_grad_(False)
    fp32.lm_head.weight.requires_grad_(True)
    assert count_parameters(fp32) == (total, fp32.lm_head.weight.numel())


def _lora_over_4bit(llama_dir: Path, *, patch: bool, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    if not patch:
        monkeypatch.setattr(models, "disable_bnb_cpu_repack", lambda model: 0)
    model = load_model(ModelConfig(name_or_path=str(llama_dir), quantization="nf4"), for_training=True)
    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so every LoRA weight gets a nonzero gradient.
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
    )
    return get_peft_model(model, config)


def _lora_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {
        n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
    }


def _worst_relative_error(before: dict, after: dict) -> float:
    worst = 0.0
    for name, g in before.items():
        if after[name] is None:
            return float("inf")
        worst = max(worst, float((after[name] - g).norm() / g.norm()))
    return worst


def _run_inference(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
        model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False)


def _cpu_has_avx512_bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def test_lora_gradients_on_4bit_survive_inference(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """STACK.md trap: an eval-mode no-grad forward must not change later LoRA gradients."""
    model = _lora_over_4bit(llama_dir, patch=True, monkeypatch=monkeypatch)
    ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    before = _lora_grads(model, ids)
    assert all(g is not None and g.abs().sum() > 0 for g in before.values())
    _run_inference(model, ids)
    assert _worst_relative_error(before, _lora_grads(model, ids)) < 1e-5


@pytest.mark.skipif("not _cpu_has_avx512_bf16()", reason="the repack only happens on CPUs with avx512_bf16")
def test_without_the_fix_inference_corrupts_lora_gradients(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shows the trap is real here: the same sequence without the fix breaks the gradients."""
    model = _lora_over_4bit(llama_dir, patch=False, monkeypatch=monkeypatch)
    ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    before = _lora_grads(model, ids)
    _run_inference(model, ids)
    with pytest.warns(UserWarning, match="gemv_4bit"):
        broken = _lora_grads(model, ids)
    assert _worst_relative_error(before, broken) > 0.5
    # Repairing after the fact undoes the repack (best effort: the scales are re-quantized).
    monkeypatch.undo()
    assert disable_bnb_cpu_repack(model) == 14
    assert _worst_relative_error(before, _lora_grads(model, ids)) < 0.05


def test_int8_load(llama_dir: Path) -> None:
    import bitsandbytes as bnb

    model = load_model(ModelConfig(name_or_path=str(llama_dir), quantization="int8"), for_training=False)
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == 14
    reference = AutoModelForCausalLM.from_pretrained(llama_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        diff = (model(input_ids=ids).logits.float() - reference(input_ids=ids).logits).abs().max()
    assert diff < 0.1


def test_missing_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="directory not found"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "nope")), for_training=False)
    with pytest.raises(ModelLoadError, match="directory not found"):
        load_tokenizer(ModelConfig(name_or_path=".cache/tiny/does-not-exist"))


def test_malformed_hub_id_is_reported() -> None:
    with pytest.raises(ModelLoadError, match="well-formed hub id"):
        load_tokenizer(ModelConfig(name_or_path="not a hub id!"))
    with pytest.raises(ModelLoadError, match="well-formed hub id"):
        load_model(ModelConfig(name_or_path="org--x/model"), for_training=False)


def test_a_file_is_not_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "weights.bin")), for_training=False)


@pytest.fixture
def remote_code_dir(tmp_path: Path) -> Path:
    config = {
        "model_type": "baichuan",
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "vocab_size": 125696,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    tok_config = {
        "tokenizer_class": "BaichuanTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return tmp_path


def test_remote_code_is_refused_without_trust(remote_code_dir: Path) -> None:
    cfg = ModelConfig(name_or_path=str(remote_code_dir))
    with pytest.raises(ModelLoadError, match=r"model\.trust_remote_code") as info:
        load_model(cfg, for_training=False)
    assert "auto_map" in info.value.reason
    with pytest.raises(ModelLoadError, match=r"model\.trust_remote_code"):
        load_tokenizer(cfg)


def test_remote_code_is_attempted_with_trust(remote_code_dir: Path) -> None:
    cfg = ModelConfig(name_or_path=str(remote_code_dir), trust_remote_code=True)
    # The directory has no modelling code, so loading fails, but not because it was refused.
    with pytest.raises(ModelLoadError) as info:
        load_model(cfg, for_training=False)
    assert "cannot load the model" in info.value.reason
    assert info.value.__cause__ is not None


# ---------------------------------------------------------------------------------------------
# Inspection


@pytest.fixture(scope="module")
def llama_model() -> torch.nn.Module:
    return tiny_from_config(small(LlamaConfig, intermediate_size=128))


@pytest.fixture(scope="module")
def neox_model() -> torch.nn.Module:
    return tiny_from_config(small(GPTNeoXConfig, intermediate_size=128))


def test_find_linear_module_names_skips_the_head(llama_model: torch.nn.Module, neox_model) -> None:
    assert find_linear_module_names(llama_model) == LLAMA_TARGETS
    assert find_linear_module_names(neox_model) == NEOX_TARGETS  # embed_out is GPT-NeoX's head


def test_find_linear_module_names_on_4bit_and_peft(nf4_model: torch.nn.Module, llama_model) -> None:
    from peft import LoraConfig, get_peft_model

    assert find_linear_module_names(nf4_model) == LLAMA_TARGETS
    wrapped = get_peft_model(tiny_from_config(llama_model.config), LoraConfig(target_modules=["q_proj"]))
    assert find_linear_module_names(wrapped) == LLAMA_TARGETS  # no lora_A / lora_B


def test_resolve_lora_targets(llama_model: torch.nn.Module, neox_model: torch.nn.Module) -> None:
    assert resolve_lora_targets(llama_model, get_family("llama"), "auto") == LLAMA_TARGETS
    assert resolve_lora_targets(neox_model, get_family("gpt_neox"), "auto") == NEOX_TARGETS
    assert resolve_lora_targets(llama_model, GENERIC, "auto") == LLAMA_TARGETS
    assert resolve_lora_targets(neox_model, get_family("llama"), "all-linear") == NEOX_TARGETS
    assert resolve_lora_targets(llama_model, get_family("llama"), ["v_proj", "q_proj"]) == [
        "q_proj",
        "v_proj",
    ]
    assert resolve_lora_targets(llama_model, get_family("llama"), ["self_attn.q_proj"]) == [
        "self_attn.q_proj"
    ]


def test_resolve_lora_targets_auto_keeps_the_family_targets_present(llama_model: torch.nn.Module) -> None:
    # Baichuan's fused W_pack is absent from a LLaMA model; its other targets are there.
    assert resolve_lora_targets(llama_model, get_family("baichuan"), "auto") == [
        "down_proj",
        "gate_proj",
        "o_proj",
        "up_proj",
    ]
    # None of ChatGLM's targets exists: every linear layer.
    assert resolve_lora_targets(llama_model, get_family("chatglm2"), "auto") == LLAMA_TARGETS


def test_resolve_lora_targets_rejects_unknown_names(llama_model: torch.nn.Module) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_lora_targets(llama_model, get_family("llama"), ["q_proj", "W_pack", "lm_head"])
    problem = info.value.problems[0]
    assert problem.field == "lora.target_modules"
    assert problem.value == ["W_pack", "lm_head"]
    assert "q_proj" in problem.message and "down_proj" in problem.message


def test_find_layer_prefixes() -> None:
    cases = [
        (small(LlamaConfig, intermediate_size=128), "model.layers"),
        (small(Qwen2Config, intermediate_size=128), "model.layers"),
        (small(GPTNeoXConfig, intermediate_size=128), "gpt_neox.layers"),
        (small(FalconConfig), "transformer.h"),
    ]
    for config, container in cases:
        expected = [f"{container}.{i}." for i in range(3)]
        assert find_layer_prefixes(tiny_from_config(config)) == expected, config.model_type


def test_find_layer_prefixes_orders_numerically_and_picks_the_main_stack() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = torch.nn.Linear(2, 2)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision = torch.nn.Module()
            self.vision.blocks = torch.nn.ModuleList([Block() for _ in range(2)])
            self.transformer = torch.nn.Module()
            self.transformer.encoder = torch.nn.Module()
            self.transformer.encoder.layers = torch.nn.ModuleList([Block() for _ in range(12)])

    prefixes = find_layer_prefixes(Model())
    assert prefixes[:3] == [f"transformer.encoder.layers.{i}." for i in range(3)]
    assert prefixes[-1] == "transformer.encoder.layers.11." and len(prefixes) == 12


def test_param_count_from_config_matches_a_real_model(llama_model: torch.nn.Module) -> None:
    for config in (llama_model.config, small(GPTNeoXConfig, intermediate_size=128)):
        real = tiny_from_config(config)
        assert param_count_from_config(config) == sum(p.numel() for p in real.parameters())
    tied = small(LlamaConfig, intermediate_size=128, tie_word_embeddings=True)
    assert param_count_from_config(tied) == param_count_from_config(llama_model.config) - 300 * 64


# ---------------------------------------------------------------------------------------------
# Fingerprint


def test_fingerprint_is_stable_and_content_sensitive(llama_dir: Path, tmp_path: Path) -> None:
    first = base_model_fingerprint(str(llama_dir), None)
    assert first == base_model_fingerprint(str(llama_dir), "ignored-for-local")
    assert first["kind"] == "local" and first["hash_kind"] == "full"
    assert set(first["files"]) == {"config.json", "model.safetensors"}
    copy = tmp_path / "copy"
    shutil.copytree(llama_dir, copy)
    moved = base_model_fingerprint(str(copy), None)
    assert fingerprints_match(first, moved) and moved["path"] != first["path"]
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 0x01  # one bit of one weight
    (copy / "model.safetensors").write_bytes(bytes(weights))
    assert not fingerprints_match(first, base_model_fingerprint(str(copy), None))


def test_fingerprint_of_large_weights_hashes_headers(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "_FULL_HASH_LIMIT", 0)
    copy = tmp_path / "copy"
    shutil.copytree(llama_dir, copy)
    first = base_model_fingerprint(str(copy), None)
    assert first["hash_kind"] == "headers"
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 0x01  # a weight value, not the header: invisible to a header hash
    (copy / "model.safetensors").write_bytes(bytes(weights))
    assert base_model_fingerprint(str(copy), None)["sha256"] == first["sha256"]
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    assert base_model_fingerprint(str(copy), None)["sha256"] != first["sha256"]


def test_fingerprint_of_hub_ids() -> None:
    fp = base_model_fingerprint("Qwen/Qwen2-0.5B", "main")
    assert fp == {"kind": "hub", "id": "Qwen/Qwen2-0.5B", "revision": "main"}
    assert fingerprints_match(fp, base_model_fingerprint("Qwen/Qwen2-0.5B", "main"))
    assert not fingerprints_match(fp, base_model_fingerprint("Qwen/Qwen2-0.5B", "v2"))
    with pytest.raises(ModelLoadError):
        base_model_fingerprint("./not/here", None)
