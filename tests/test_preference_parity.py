"""Loss and gradient parity of lorafleet's preference losses with trl 1.16's trainers.

For each variant, trl's own trainer computes its loss on one batch (``compute_loss`` or, for the
experimental ORPO / CPO trainers, ``get_batch_loss_metrics``) and lorafleet's step function computes
its loss on the same batch, the same PEFT model and the same reference (the base with the adapter
disabled). Loss and every LoRA gradient must agree within 1e-4 relative. The model is a random tiny
llama with a LoRA whose B is non-zero, so policy and reference differ and every term is live.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lorafleet import preference as pref

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PAD, EOS = 26, 27
RTOL = 1e-4
KTO_SEED = 2
"""A policy perturbation whose KL estimate on the mismatched rows is positive (z is clamped at 0
otherwise, and the test would not check it); asserted in the test."""
# Two pairs of unequal prompt and answer lengths, so padding, masks and length normalisation count.
PAIRS = [
    pref.PairExample([1, 2, 3, 4], [5, 6, EOS], [7, EOS]),
    pref.PairExample([8, 9], [10, 11, 12, EOS], [13, 14, 15, 16, 17, EOS]),
    pref.PairExample([18, 19, 20], [21, EOS], [22, 23, EOS]),
]


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {chr(ord("a") + i): i for i in range(26)} | {"<pad>": PAD, "</s>": EOS, "<unk>": 28}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def _model() -> Any:
    """The same random tiny llama + LoRA (B != 0) on every call."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
    )
    model = get_peft_model(LlamaForCausalLM(config), lora)
    with torch.no_grad():  # larger LoRA weights: policy and reference differ by whole nats
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.mul_(4.0)
    return model


def _move_policy(model: Any, reference: str, seed: int = 1, scale: float = 0.05) -> None:
    """Make the trained adapter differ from the reference, as after some training steps.

    trl copies a PEFT model's starting adapter into a frozen ``ref`` adapter (the SFT start) and
    uses it as the reference; ``reference="base"`` deletes that copy so both sides fall back to the
    base with adapters disabled.
    """
    if reference == "base":
        model.delete_adapter(pref.REFERENCE_ADAPTER)
        model.set_adapter("default")
    else:
        assert pref.REFERENCE_ADAPTER in model.peft_config
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".default." in name:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def _dataset() -> Any:
    return datasets.Dataset.from_list([{"prompt": "a b c", "chosen": " d e", "rejected": " f"}] * 4)


def _common_args() -> dict[str, Any]:
    return {
        "output_dir": "/tmp/lorafleet-parity",
        "per_device_train_batch_size": 2,
        "report_to": [],
        "use_cpu": True,
    }


def _grads(model: Any) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _compare(model: Any, theirs: Callable[[], torch.Tensor], ours: Callable[[], torch.Tensor]) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    their_loss = theirs()
    their_loss.backward()
    their_grads = _grads(model)
    our_loss = ours()
    our_loss.backward()
    our_grads = _grads(model)
    assert abs(float(our_loss) - float(their_loss)) <= RTOL * abs(float(their_loss)), (
        float(our_loss),
        float(their_loss),
    )
    assert their_grads and their_grads.keys() == our_grads.keys()
    for name, grad in their_grads.items():
        assert "lora_" in name or "modules_to_save" in name, name
        assert float(grad.norm()) > 0, name
        error = float((our_grads[name] - grad).norm() / grad.norm())
        assert error <= RTOL, (name, error)


def _trl_pair_batch(examples: list[pref.PairExample]) -> dict[str, torch.Tensor]:
    batch = pref.collate_pairs(examples, PAD)
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != pref.IGNORE_INDEX).long(),
    }


@pytest.mark.parametrize("reference", ["base", "sft_adapter"])
@pytest.mark.parametrize(("loss", "beta"), [("sigmoid", 0.1), ("ipo", 0.5)])
def test_dpo_and_ipo_match_trl_dpo_trainer(loss: str, beta: float, reference: str) -> None:
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**_common_args(), beta=beta, loss_type=[loss])
    trainer = DPOTrainer(model=_model(), args=args, train_dataset=_dataset(), processing_class=_tokenizer())
    model = trainer.model
    _move_policy(model, reference)
    batch = pref.collate_pairs(PAIRS, PAD)
    _compare(
        model,
        lambda: trainer.compute_loss(model, _trl_pair_batch(PAIRS)),
        lambda: pref.pairwise_step(model, batch, loss, beta)[0],
    )


def test_dpo_metrics_match_trl_names_and_values() -> None:
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**_common_args(), beta=0.1, loss_type=["sigmoid"])
    trainer = DPOTrainer(model=_model(), args=args, train_dataset=_dataset(), processing_class=_tokenizer())
    model = trainer.model
    _move_policy(model, "base")
    with torch.no_grad():
        trainer.compute_loss(model, _trl_pair_batch(PAIRS))
        _, ours = pref.pairwise_step(model, pref.collate_pairs(PAIRS, PAD), "sigmoid", 0.1)
    theirs = trainer._metrics["train"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours[name] == pytest.approx(theirs[name][-1], rel=1e-4, abs=1e-6), name
    for name in ("logps/chosen", "logps/rejected"):
        assert ours[name] == pytest.approx(theirs[name][-1], rel=1e-4), name


def _orpo_style_batch(examples: list[pref.PairExample]) -> dict[str, torch.Tensor]:
    """trl's ORPO/CPO batch: chosen_* and rejected_* tensors, labels -100 on the prompt."""
    chosen = pref.collate_pairs(examples, PAD)
    half = len(examples)
    out: dict[str, torch.Tensor] = {}
    for side, rows in (("chosen", slice(0, half)), ("rejected", slice(half, None))):
        out[f"{side}_input_ids"] = chosen["input_ids"][rows]
        out[f"{side}_attention_mask"] = chosen["attention_mask"][rows]
        out[f"{side}_labels"] = chosen["labels"][rows]
    return out


def test_orpo_matches_trl_orpo_trainer() -> None:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = ORPOConfig(**_common_args(), beta=0.1)
        trainer = ORPOTrainer(
            model=_model(), args=args, train_dataset=_dataset(), processing_class=_tokenizer()
        )
    model = trainer.model
    batch = pref.collate_pairs(PAIRS, PAD)
    half = len(PAIRS)

    def ours() -> torch.Tensor:
        # trl 1.16 takes ORPO's NLL over the chosen rows' prompt AND answer (every attended token);
        # lorafleet's recipe scores the answer only. The odds-ratio term is the same either way, so
        # the parity check feeds lorafleet's orpo_loss trl's NLL token set.
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        means = pref.sequence_logps(logits, batch["labels"], average=True)
        every_token = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, pref.IGNORE_INDEX)
        nll = pref.masked_nll(logits[:half], every_token[:half])
        return pref.orpo_loss(means[:half], means[half:], nll, 0.1).losses.mean()

    _compare(model, lambda: trainer.get_batch_loss_metrics(model, _orpo_style_batch(PAIRS))[0], ours)


def test_orpo_step_scores_the_answer_nll() -> None:
    """The recipe's ORPO step = answer-token NLL + the odds-ratio term (not the prompt)."""
    model = _model()
    batch = pref.collate_pairs(PAIRS, PAD)
    half = len(PAIRS)
    with torch.no_grad():
        loss, _ = pref.pairwise_step(model, batch, "orpo", 0.1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        means = pref.sequence_logps(logits, batch["labels"], average=True)
        answer_nll = pref.masked_nll(logits[:half], batch["labels"][:half])
        odds = pref.orpo_loss(means[:half], means[half:], torch.tensor(0.0), 0.1).losses.mean()
    assert float(loss) == pytest.approx(float(answer_nll + odds), rel=1e-6)


def test_simpo_matches_trl_cpo_trainer() -> None:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # cpo_alpha=0: SimPO proper has no NLL term (Meng et al. 2024, eq. 6).
        args = CPOConfig(**_common_args(), beta=2.0, loss_type="simpo", simpo_gamma=0.7, cpo_alpha=0.0)
        trainer = CPOTrainer(
            model=_model(), args=args, train_dataset=_dataset(), processing_class=_tokenizer()
        )
    model = trainer.model
    batch = pref.collate_pairs(PAIRS, PAD)
    # trl's simpo_gamma is the margin on the β-scaled reward: γ = simpo_gamma (it subtracts γ/β
    # inside β·(...)), the same γ lorafleet takes.
    _compare(
        model,
        lambda: trainer.get_batch_loss_metrics(model, _orpo_style_batch(PAIRS))[0],
        lambda: pref.pairwise_step(model, batch, "simpo", 2.0, gamma=0.7)[0],
    )


def test_kto_matches_trl_kto_trainer() -> None:
    from trl import KTOConfig, KTOTrainer

    rows = [
        pref.UnpairedExample([1, 2, 3, 4], [5, 6, EOS], True),
        pref.UnpairedExample([8, 9], [10, 11, 12, EOS], False),
        pref.UnpairedExample([18, 19, 20], [21, EOS], True),
        pref.UnpairedExample([2, 3], [13, 14, 15, 16, 17, EOS], False),
    ]
    dataset = datasets.Dataset.from_list(
        [{"prompt": "a b", "completion": " c", "label": bool(i % 2)} for i in range(4)]
    )
    args = KTOConfig(**_common_args(), beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    trainer = KTOTrainer(model=_model(), args=args, train_dataset=dataset, processing_class=_tokenizer())
    model = trainer.model
    _move_policy(model, "base", seed=KTO_SEED, scale=0.2)
    batch = pref.collate_unpaired(rows, PAD)
    half = len(rows)

    def theirs() -> torch.Tensor:
        completion_mask = (batch["labels"] != pref.IGNORE_INDEX).long()
        inputs = {
            "input_ids": batch["input_ids"][:half],
            "attention_mask": batch["attention_mask"][:half],
            "completion_mask": completion_mask[:half],
            "KL_input_ids": batch["input_ids"][half:],
            "KL_attention_mask": batch["attention_mask"][half:],
            "KL_completion_mask": completion_mask[half:],
            "label": batch["desirable"],
        }
        return trainer.compute_loss(model, inputs)

    # The KL estimate must be live (positive), or the test would not check it.
    with torch.no_grad():
        kl_policy = pref.forward_logps(
            model, {k: batch[k][half:] for k in ("input_ids", "attention_mask", "labels")}
        )
        kl_ref = pref.reference_logps(
            model, {k: batch[k][half:] for k in ("input_ids", "attention_mask", "labels")}
        )
    assert float(pref.kto_kl_estimate(kl_policy, kl_ref)) > 0
    _compare(model, theirs, lambda: pref.kto_step(model, batch, 0.3, 1.0, 1.5)[0])


def test_reward_loss_matches_trl_reward_trainer() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=PAD,
        eos_token_id=EOS,
        num_labels=1,
    )
    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    model = get_peft_model(LlamaForSequenceClassification(config), lora)
    dataset = datasets.Dataset.from_list([{"chosen": "a b c", "rejected": "d e"}] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = RewardConfig(**_common_args())
        trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=_tokenizer())
    model = trainer.model
    batch = pref.collate_pairs(PAIRS, PAD)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    _compare(
        model, lambda: trainer.compute_loss(model, dict(inputs)), lambda: pref.reward_step(model, batch)[0]
    )
