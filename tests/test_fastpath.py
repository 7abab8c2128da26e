"""The training fast paths change no result: label-only logits give PEFT's loss and gradients, and the
CPU LoRA dropout is a Bernoulli(1 - p) mask with the right scale in forward and backward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
)

from lorafleet.fastpath import (
    IGNORE_INDEX,
    LoraDropout,
    causal_lm_loss,
    supports_label_logits,
    use_fast_lora_dropout,
)

VOCAB = 300


def _config(arch: str) -> PretrainedConfig:
    common = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    if arch == "llama":
        return LlamaConfig(intermediate_size=64, num_key_value_heads=2, **common)
    if arch == "qwen2":
        return Qwen2Config(intermediate_size=64, num_key_value_heads=2, **common)
    return GPTNeoXConfig(intermediate_size=64, **common)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths, labels only on each row's tail (like instruction data)."""
    g = torch.Generator().manual_seed(seed)
    lengths, targets = [12, 9, 5, 12], [3, 4, 2, 1]
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    mask = torch.zeros_like(input_ids)
    for row, (n, t) in enumerate(zip(lengths, targets)):
        ids = torch.randint(1, VOCAB, (n,), generator=g)
        input_ids[row, :n] = ids
        labels[row, n - t : n] = ids[n - t :]
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _lora_model(arch: str, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_config(arch))
    targets = (
        ["query_key_value", "dense_4h_to_h"] if arch == "gpt_neox" else ["q_proj", "v_proj", "down_proj"]
    )
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, init_lora_weights=False)
    return get_peft_model(base, cfg)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_label_only_logits_give_the_same_loss_and_gradients(arch: str) -> None:
    model = _lora_model(arch)
    assert supports_label_logits(model)
    batch = _batch()

    reference = causal_lm_loss(model, batch, label_logits=False)
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    fast = causal_lm_loss(model, batch, label_logits=True)
    fast.backward()
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    assert ref_grads and all(g.abs().sum() > 0 for g in ref_grads.values())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_label_only_logits_fall_back_when_no_label_is_trained() -> None:
    model = _lora_model("llama")
    batch = _batch()
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    # Both paths give the plain forward's own answer (NaN for an all-ignored batch), never a crash.
    fast = causal_lm_loss(model, batch, label_logits=True)
    plain = causal_lm_loss(model, batch, label_logits=False)
    assert torch.isnan(fast) and torch.isnan(plain)


def test_prompt_learning_models_use_the_plain_path() -> None:
    base = AutoModelForCausalLM.from_config(_config("llama"))
    prefix = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert not supports_label_logits(prefix)

    class Opaque(nn.Module):  # a remote-code model whose forward knows no logits_to_keep mask
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return input_ids

    assert not supports_label_logits(Opaque())


def test_wrappers_are_seen_through() -> None:
    class EngineLike(nn.Module):  # DeepSpeed's engine and DDP keep the model in .module
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert supports_label_logits(EngineLike(_lora_model("qwen2")))


def test_fast_dropout_replaces_every_lora_dropout_and_keeps_eval_exact() -> None:
    model = _lora_model("llama", dropout=0.1)
    n_lora_layers = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    assert use_fast_lora_dropout(model) == n_lora_layers == 6
    assert use_fast_lora_dropout(model) == 0  # idempotent
    drops = [m for m in model.modules() if isinstance(m, LoraDropout)]
    assert len(drops) == n_lora_layers and all(d.p == 0.1 for d in drops)
    model.eval()
    x = torch.randn(3, 5)
    assert torch.equal(drops[0](x), x)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_fast_dropout_is_bernoulli_with_the_right_scale(p: float) -> None:
    torch.manual_seed(1)
    drop = LoraDropout(p).train()
    x = torch.ones(400_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    grad = torch.arange(x.numel(), dtype=torch.float32)
    y.backward(grad)
    torch.testing.assert_close(x.grad, torch.where(kept, grad / (1 - p), torch.zeros_like(grad)))


def test_fast_dropout_matches_native_statistics_in_training() -> None:
    """Same expected output as nn.Dropout: mean preserved, variance p/(1-p) per element."""
    torch.manual_seed(2)
    x = torch.randn(200_000)
    for module in (nn.Dropout(0.2).train(), LoraDropout(0.2).train()):
        y = module(x)
        assert abs(y.mean().item() - x.mean().item()) < 0.01
        ratio = (y[x.abs() > 0.5] / x[x.abs() > 0.5]).var().item()
        assert abs(ratio - 0.2 / 0.8) < 0.01
