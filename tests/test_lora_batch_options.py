"""DoRA and ``modules_to_save`` adapters served per row in mixed batches (``lora_options``), against a
plain ``PeftModel`` holding only that row's adapter.

The adapters have non-trivial weights: random ``A`` / ``B`` (``init_lora_weights=False``), DoRA
magnitudes scaled by random factors in [0.5, 1.5] (PEFT initialises them to the weight norm, where
DoRA equals LoRA), replacement ``lm_head`` / ``embed_tokens`` weights with added noise. A batch holds
a DoRA row, a ``modules_to_save`` row, a plain LoRA row and a base row, so each is checked next to
rows that must stay unchanged. Fixtures (``tiny_llama``, ``prompts``, ``eos_id``) are in conftest.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.inference.adapter_checks import check_lora
from services.inference.engine import Engine
from services.inference.errors import AdapterIncompatibleError
from services.inference.lora_batch import AdapterWeights, LoraSlots, adapter_weights_from_peft_dir
from services.inference.requests import GenerationRequest
from services.inference.sampling import SamplingParams
from tests.inference_utils import MAX_NEW, References, load_base, save_lora_adapter

TIMEOUT = 60.0
MODES = ["group", "gather", "stack"]
QUANTS = ["none", "nf4"]
OPTION_ADAPTERS: dict[str, dict[str, Any]] = {
    "dora": {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True},
    "saved": {"r": 8, "target_modules": ["q_proj", "o_proj"], "modules_to_save": ["lm_head", "embed_tokens"]},
}


def save_option_adapter(model_dir: Path | str, out: Path, seed: int, **options: Any) -> Path:
    """A PEFT adapter with LoRA options, saved from a fresh fp32 base with randomised weights."""
    from peft import LoraConfig, get_peft_model

    base = load_base(model_dir) if not isinstance(model_dir, torch.nn.Module) else model_dir
    torch.manual_seed(seed)
    config = LoraConfig(lora_alpha=2 * options["r"], init_lora_weights=False, lora_dropout=0.0, **options)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * param.std())
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def option_dirs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("option-adapters")
    dirs = {
        name: save_option_adapter(tiny_llama, root / name, seed=10 + i, **options)
        for i, (name, options) in enumerate(OPTION_ADAPTERS.items())
    }
    dirs["plain"] = save_lora_adapter(
        tiny_llama, root / "plain", rank=6, targets=("k_proj", "up_proj"), seed=7
    )
    return dirs


@pytest.fixture(scope="module")
def option_refs(tiny_llama: Path, option_dirs: dict[str, Path], eos_id: int) -> dict[str, References]:
    return {q: References(tiny_llama, option_dirs, q, eos_id) for q in QUANTS}


def _slots_logits(base: Any, slots: LoraSlots, ids: torch.Tensor, rows: list[int], **kw: Any) -> torch.Tensor:
    slots.set_rows(torch.tensor(rows))
    with torch.inference_mode():
        return base(input_ids=ids, **kw).logits  # type: ignore[no-any-return]


@pytest.mark.parametrize("quantization", QUANTS)
@pytest.mark.parametrize("mode", MODES)
def test_mixed_batch_logits_match_peft(
    tiny_llama: Path,
    option_dirs: dict[str, Path],
    prompts: list[list[int]],
    option_refs: dict[str, References],
    mode: str,
    quantization: str,
) -> None:
    """One forward over rows DoRA / modules_to_save / plain / base / DoRA: each row's logits equal
    PeftModel's with that adapter alone within 1e-4, base rows exactly; also with
    ``logits_to_keep=1`` (the replaced ``lm_head`` then sees only the last position)."""
    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    refs = option_refs[quantization]
    base = load_base(tiny_llama, quantization=quantization)
    slots = LoraSlots(base, None, num_slots=3, max_rank=16, mode=mode)  # type: ignore[arg-type]
    try:
        names = ["dora", "saved", "plain"]
        for slot, name in enumerate(names):
            slots.load(slot, adapter_weights_from_peft_dir(option_dirs[name], f"{name}@1", base))
        rows = [0, 1, 2, -1, 0]
        ids = torch.tensor([prompts[3]] * len(rows))
        ours = _slots_logits(base, slots, ids, rows)
        last = _slots_logits(base, slots, ids, rows, logits_to_keep=1)
        with torch.inference_mode():
            theirs = {n: refs.model(n)(input_ids=ids[:1]).logits[0] for n in names}
            theirs[None] = refs.model(None)(input_ids=ids[:1]).logits[0]  # type: ignore[index]
        for i, slot in enumerate(rows):
            name = None if slot < 0 else names[slot]
            ref = theirs[name]  # type: ignore[index]
            assert (ours[i] - ref).abs().max() < 1e-4, f"row {i} ({name})"
            assert (last[i, -1] - ref[-1]).abs().max() < 1e-4, f"row {i} ({name}), logits_to_keep=1"
            if name is None:
                assert torch.equal(ours[i], ref)
            else:  # the adapter (and its option) is applied at all
                assert (ours[i] - theirs[None]).abs().max() > 1e-2, name  # type: ignore[index]
    finally:
        slots.remove()
    # Unhooked, the model is the plain base again (the replacement hooks are gone too).
    with torch.inference_mode():
        assert torch.equal(base(input_ids=ids[:1]).logits[0], theirs[None])  # type: ignore[index]


@pytest.mark.parametrize("quantization", QUANTS)
@pytest.mark.parametrize("mode", MODES)
def test_engine_greedy_tokens_match_peft(
    make_engine: Callable[..., Engine],
    option_dirs: dict[str, Path],
    prompts: list[list[int]],
    option_refs: dict[str, References],
    mode: str,
    quantization: str,
) -> None:
    """The engine's continuous batching with DoRA, modules_to_save, plain LoRA and base rows of
    prompts of different lengths (left padding, rows finishing at different steps): every
    request's greedy tokens equal PeftModel's for that prompt alone."""
    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    engine = make_engine(quantization, num_slots=3, max_rank=16, lora_mode=mode, start=False)
    weights = {n: adapter_weights_from_peft_dir(p, f"{n}@1", engine.model) for n, p in option_dirs.items()}
    names: list[str | None] = ["dora", "saved", "plain", None]
    plan = [(names[i % 4], p) for i, p in enumerate(prompts)] + [
        (names[(i + 1) % 4], p) for i, p in enumerate(prompts)
    ]
    handles = [
        engine.submit(
            GenerationRequest(p, adapter=None if n is None else weights[n], params=SamplingParams(MAX_NEW))
        )
        for n, p in plan
    ]
    engine.start()
    refs = option_refs[quantization]
    for (name, prompt), handle in zip(plan, handles, strict=True):
        assert handle.result(TIMEOUT).token_ids == refs.tokens(name, prompt), f"{name} {prompt[:4]}"


def _tied_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("mode", MODES)
def test_tied_embeddings(tmp_path: Path, mode: str) -> None:
    """On a base with tied input/output embeddings: a replaced ``lm_head`` leaves the input
    embedding as in the base (PEFT unties them), and with ``ensure_weight_tying`` PEFT saves both
    copies, which are then both served. Rows of the base keep the shared weight."""
    base_dir = _tied_llama(tmp_path / "tied")
    dirs = {
        "head": save_option_adapter(
            base_dir, tmp_path / "head", 1, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]
        ),
        "tied": save_option_adapter(
            base_dir,
            tmp_path / "tied-adapter",
            2,
            r=4,
            target_modules=["v_proj"],
            modules_to_save=["embed_tokens"],
            ensure_weight_tying=True,
        ),
    }
    base = load_base(base_dir)
    assert base.get_input_embeddings().weight is base.get_output_embeddings().weight
    slots = LoraSlots(base, None, num_slots=2, max_rank=8, mode=mode)  # type: ignore[arg-type]
    weights = {n: adapter_weights_from_peft_dir(p, n, base) for n, p in dirs.items()}
    assert set(weights["head"].modules_to_save) == {"lm_head"}
    assert set(weights["tied"].modules_to_save) == {"lm_head", "model.embed_tokens"}
    slots.load(0, weights["head"])
    slots.load(1, weights["tied"])
    ids = torch.tensor([[3, 17, 5, 99, 42]] * 3)
    ours = _slots_logits(base, slots, ids, [0, 1, -1])
    assert base.get_input_embeddings().weight is base.get_output_embeddings().weight  # restored
    refs = References(base_dir, dirs, "none", eos_id=0)
    with torch.inference_mode():
        for i, name in enumerate(["head", "tied", None]):
            ref = refs.model(name)(input_ids=ids[:1]).logits[0]
            assert (ours[i] - ref).abs().max() < 1e-4, name
    slots.remove()


def _rewrite(
    src: Path, dst: Path, config: dict[str, Any] | None = None, **tensors: torch.Tensor | None
) -> Path:
    """A copy of an adapter directory with config keys and tensors changed (None drops a tensor)."""
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    state = load_file(str(src / "adapter_model.safetensors"))
    for key, value in tensors.items():
        key = "base_model.model." + key.replace("__", ".")
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    save_file(state, str(dst / "adapter_model.safetensors"))
    return dst


def test_reader_checks_and_skips(tiny_llama: Path, option_dirs: dict[str, Path], tmp_path: Path) -> None:
    """What the reader refuses (naming the module or tensor), what it skips on request (a reward
    model's ``score`` head), and that the byte count covers the options' tensors."""
    base = load_base(tiny_llama)
    saved, dora = option_dirs["saved"], option_dirs["dora"]
    score = torch.randn(1, 64)
    rm = _rewrite(
        saved, tmp_path / "rm", {"modules_to_save": ["lm_head", "embed_tokens", "score"]}, score__weight=score
    )
    with pytest.raises(ValueError, match=r"does not have: \['score'\]"):
        adapter_weights_from_peft_dir(rm, "rm", base)
    kept = adapter_weights_from_peft_dir(rm, "rm", base, skip_modules_to_save=("score",))
    assert set(kept.modules_to_save) == {"lm_head", "model.embed_tokens"}

    stray = _rewrite(saved, tmp_path / "stray", model__norm__weight=torch.ones(64))
    with pytest.raises(ValueError, match=r"unexpected tensor 'base_model\.model\.model\.norm\.weight'"):
        adapter_weights_from_peft_dir(stray, "x", base)
    wrong = _rewrite(saved, tmp_path / "wrong", lm_head__weight=torch.zeros(7, 64))
    with pytest.raises(ValueError, match=r"modules_to_save lm_head\.weight is \[7, 64\]"):
        adapter_weights_from_peft_dir(wrong, "x", base)

    magnitude = "model__layers__0__self_attn__q_proj__lora_magnitude_vector"
    undeclared = _rewrite(dora, tmp_path / "undeclared", {"use_dora": False})
    with pytest.raises(ValueError, match="use_dora is False"):
        adapter_weights_from_peft_dir(undeclared, "x", base)
    short = _rewrite(dora, tmp_path / "short", **{magnitude: torch.ones(3)})
    with pytest.raises(ValueError, match=r"q_proj: lora_magnitude_vector is \[3\]"):
        adapter_weights_from_peft_dir(short, "x", base)
    missing = _rewrite(dora, tmp_path / "missing", **{magnitude: None})
    with pytest.raises(ValueError, match=r"mismatch at.*q_proj"):
        adapter_weights_from_peft_dir(missing, "x", base)

    plain = adapter_weights_from_peft_dir(option_dirs["plain"], "p", base)
    with_dora = adapter_weights_from_peft_dir(dora, "d", base)
    with_saved = adapter_weights_from_peft_dir(saved, "s", base)
    lora_bytes = AdapterWeights("x", 1, 1.0, with_dora.layers).nbytes
    assert with_dora.nbytes == lora_bytes + 4 * sum(b.shape[0] for _, b in with_dora.layers.values())
    vocab_bytes = 2 * base.lm_head.weight.numel() * 4  # lm_head + embed_tokens, float32
    assert with_saved.nbytes == AdapterWeights("x", 1, 1.0, with_saved.layers).nbytes + vocab_bytes
    assert plain.nbytes == AdapterWeights("x", 1, 1.0, plain.layers).nbytes


def test_check_lora_accepts_options_and_names_unknown_tensors(
    tiny_llama: Path, option_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The registry's static check: DoRA magnitudes and modules_to_save copies pass; a tensor the
    server would not use, or a magnitude without ``use_dora``, is refused by name."""
    base = load_base(tiny_llama)
    names = frozenset(n for n, _ in base.named_modules())

    def check(path: Path, **kw: Any) -> int:
        return check_lora("x@1", path, max_rank=16, module_names=names, base_model="tiny", **kw)

    assert check(option_dirs["dora"]) == 4
    assert check(option_dirs["saved"]) == 8
    stray = _rewrite(option_dirs["saved"], tmp_path / "stray", model__norm__weight=torch.ones(64))
    with pytest.raises(AdapterIncompatibleError, match=r"base_model\.model\.model\.norm\.weight"):
        check(stray)
    undeclared = _rewrite(option_dirs["dora"], tmp_path / "undeclared", {"use_dora": False})
    with pytest.raises(AdapterIncompatibleError, match="use_dora is False"):
        check(undeclared)
    rm = _rewrite(
        option_dirs["saved"],
        tmp_path / "rm",
        {"modules_to_save": ["lm_head", "embed_tokens", "score"]},
        score__weight=torch.ones(1, 64),
    )
    with pytest.raises(AdapterIncompatibleError, match="does not have: score"):
        check(rm)
    assert check(rm, skip_modules_to_save=("score",)) == 8


@pytest.mark.integration
def test_trained_dora_and_modules_to_save_are_served(
    tiny_llama: Path, bundled_data: dict[str, Path], prompts: list[list[int]], eos_id: int, tmp_path: Path
) -> None:
    """Round trip: the recipe trains and publishes a DoRA adapter and one with a trained ``lm_head``;
    the inference registry validates and loads them (as the service does) and the engine's greedy
    tokens, in one mixed batch with base rows, equal PeftModel's on the published directories."""
    from lorafleet.models import base_model_fingerprint
    from services.inference.registry import AdapterRegistry
    from services.trainer.recipe import run_training
    from tests.training_utils import training_config

    adapters_root = tmp_path / "adapters"
    options = {"t-dora": {"use_dora": True}, "t-head": {"modules_to_save": ["lm_head"]}}
    published: dict[str, Path] = {}
    for name, lora in options.items():
        config = training_config(
            tmp_path / name,
            tiny_llama,
            bundled_data,
            lora={"rank": 8, "alpha": 16, "dropout": 0.0, **lora},
            train={"max_steps": 4},
            output={"adapters_root": str(adapters_root), "adapter_name": name},
        )
        result = run_training(config)
        assert result.published is not None
        published[name] = result.published.path

    engine = Engine(load_base(tiny_llama), num_slots=2, max_rank=16, start=False)
    model = engine.model
    registry = AdapterRegistry(
        adapters_root,
        str(tiny_llama),
        base_model_fingerprint(str(tiny_llama), None),
        [n for n, _ in model.named_modules()],
        max_rank=16,
        capacity=4,
        loader=lambda path, ref: adapter_weights_from_peft_dir(path, ref, model),
    )
    try:
        weights = {name: registry.resolve(name).weights for name in options}
        assert set(weights["t-dora"].dora_scale) == set(weights["t-dora"].layers)
        assert set(weights["t-head"].modules_to_save) == {"lm_head"}
        plan = [(n, p) for p in prompts[:4] for n in [*options, None]]
        handles = [
            engine.submit(
                GenerationRequest(
                    p, adapter=None if n is None else weights[n], params=SamplingParams(MAX_NEW)
                )
            )
            for n, p in plan
        ]
        engine.start()
        refs = References(tiny_llama, published, "none", eos_id)
        for (name, prompt), handle in zip(plan, handles, strict=True):
            assert handle.result(TIMEOUT).token_ids == refs.tokens(name, prompt), f"{name} {prompt[:4]}"
        for name in options:  # each trained adapter changes some output (parity is not vacuous)
            assert any(refs.tokens(name, p) != refs.tokens(None, p) for p in prompts[:4]), name
    finally:
        registry.close()
        engine.close()
