"""The shared-prompt pairwise forward (prompt once, both answers on its KV cache) equals the plain one.

Same chosen/rejected answer log-probs, token counts and LoRA gradients as the plain [2·batch] forward,
for the policy and for the reference (adapter disabled), on pairs whose prompts have different
lengths (so the prompts are left-padded by different amounts) and answers of different lengths.
Where the trick does not fit, the reason is named and ``pairwise_step`` falls back to the plain
forward with the same result.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lorafleet import preference as pref
from lorafleet.config import DistributedConfig, RunConfig
from lorafleet.preference_prefix import shared_prompt_problem, shared_prompt_token_logps

PAD, EOS = 26, 27
RTOL = 1e-5
"""Log-probs and losses: float32 rounding of a different summation order, nothing more."""
GRAD_RTOL = 1e-4
"""Gradients (relative norm of the difference), as ``tests/test_preference_parity.py``."""
PAIRS = [
    pref.PairExample([1, 2, 3, 4, 5], [6, 7, EOS], [8, EOS]),
    pref.PairExample([9], [10, 11, 12, EOS], [13, 14, 15, 16, 17, EOS]),
    pref.PairExample([18, 19, 20], [21, EOS], [22, 23, EOS]),
    pref.PairExample([24, 25], [EOS], [1, 2, 3, EOS]),
]


def _model(arch: str = "llama", sliding: bool = False) -> Any:
    """A random tiny causal LM with a LoRA whose B is non-zero (policy and reference differ)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    dims = {
        "vocab_size": 32,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": PAD,
        "eos_token_id": EOS,
    }
    if arch == "llama":
        base: Any = LlamaForCausalLM(LlamaConfig(**dims))
    else:
        extra = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1} if sliding else {}
        base = Qwen2ForCausalLM(Qwen2Config(**dims, **extra))
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.mul_(4.0)
    return model.train()


def _grads(model: Any) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_close_grads(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert theirs and ours.keys() == theirs.keys()
    for name, grad in theirs.items():
        assert float(grad.norm()) > 0, name
        assert float((ours[name] - grad).norm() / grad.norm()) <= GRAD_RTOL, name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prompt_logps_and_gradients_equal_the_plain_forward(arch: str) -> None:
    model = _model(arch)
    batch = pref.collate_pairs(PAIRS, PAD)
    assert shared_prompt_problem(model, batch) is None
    weights = torch.linspace(1.0, 2.0, 2 * len(PAIRS))  # every row's gradient counts, differently

    results = []
    for score in (pref.answer_token_logps, shared_prompt_token_logps):
        picked, mask = score(model, batch)
        sums, lengths = picked.sum(dim=1), mask.sum(dim=1)
        (weights * sums).sum().backward()
        results.append((sums.detach(), lengths, _grads(model)))
    (plain, plain_lengths, plain_grads), (shared, shared_lengths, shared_grads) = results
    assert torch.equal(plain_lengths, shared_lengths)
    assert plain_lengths.tolist() == [len(p.chosen_ids) for p in PAIRS] + [len(p.rejected_ids) for p in PAIRS]
    torch.testing.assert_close(shared, plain, rtol=RTOL, atol=1e-5)
    _assert_close_grads(shared_grads, plain_grads)

    with pref.reference_policy(model):  # the base: the adapter disabled, no gradient
        reference_plain = pref.forward_logps(model, batch)
        reference_shared = shared_prompt_token_logps(model, batch)[0].sum(dim=1)
    assert not reference_shared.requires_grad
    torch.testing.assert_close(reference_shared, reference_plain, rtol=RTOL, atol=1e-5)
    assert float((reference_plain - plain).abs().max()) > 0.1  # the reference really differs


@pytest.mark.parametrize(("loss", "beta"), [("sigmoid", 0.1), ("ipo", 0.5), ("orpo", 0.1), ("simpo", 2.0)])
def test_pairwise_step_loss_and_gradients_do_not_depend_on_sharing(loss: str, beta: float) -> None:
    model = _model()
    batch = pref.collate_pairs(PAIRS, PAD)
    outcomes = []
    for share in (False, True):
        value, metrics = pref.pairwise_step(model, batch, loss, beta, gamma=0.5, share_prompt=share)
        value.backward()
        outcomes.append((float(value), metrics, _grads(model)))
    (plain, plain_metrics, plain_grads), (shared, shared_metrics, shared_grads) = outcomes
    assert shared == pytest.approx(plain, rel=RTOL)
    assert shared_metrics.keys() == plain_metrics.keys()
    for key, value in plain_metrics.items():
        assert shared_metrics[key] == pytest.approx(value, rel=RTOL, abs=1e-6), key
    _assert_close_grads(shared_grads, plain_grads)


def test_a_separate_reference_model_is_scored_with_the_shared_prompt_too() -> None:
    model, reference = _model(), _model().get_base_model().eval()
    batch = pref.collate_pairs(PAIRS, PAD)
    plain, _ = pref.pairwise_step(model, batch, "sigmoid", 0.1, ref_model=reference, share_prompt=False)
    shared, _ = pref.pairwise_step(model, batch, "sigmoid", 0.1, ref_model=reference)
    assert float(shared) == pytest.approx(float(plain), rel=RTOL)


def test_unfit_batches_and_models_are_named_and_fall_back() -> None:
    model = _model()
    batch = pref.collate_pairs(PAIRS, PAD)
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][len(PAIRS), 0] = 3  # the first rejected row's prompt now differs from its chosen
    assert shared_prompt_problem(model, other) == "chosen and rejected rows have different prompts"
    empty = pref.collate_pairs([pref.PairExample([], [1, EOS], [2, EOS])], PAD)
    assert shared_prompt_problem(model, empty) == "a row has an empty prompt or answer"
    odd = {k: v[:3] for k, v in batch.items()}
    assert shared_prompt_problem(model, odd) == "the batch is not [chosen rows; rejected rows]"

    sliding = _model("qwen2", sliding=True)
    assert shared_prompt_problem(sliding, batch) == "the model's cache is not a plain DynamicCache"
    plain, _ = pref.pairwise_step(sliding, batch, "sigmoid", 0.1, share_prompt=False)
    fallen_back, _ = pref.pairwise_step(sliding, batch, "sigmoid", 0.1)
    assert float(fallen_back) == float(plain)

    model.get_base_model().gradient_checkpointing_enable()
    assert shared_prompt_problem(model, batch) == "gradient checkpointing turns the KV cache off"


@pytest.mark.parametrize(("stage", "shares"), [(-1, True), (2, True), (3, False)])
def test_the_recipe_keeps_the_plain_forward_under_zero3(stage: int, shares: bool) -> None:
    from services.trainer.preference_recipe import _shares_prompt

    config = RunConfig(stage="dpo", distributed=DistributedConfig(deepspeed_stage=stage))
    assert _shares_prompt(config) is shares
