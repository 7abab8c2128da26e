"""Preference-tuning losses, sequence log-probs, batching and per-step metrics.

Every loss is a small function of per-sequence log-probabilities (or reward scores), so the training
loop, the parity tests against TRL and the benchmark all call the same code. Notation: for a prompt
x with a chosen answer y_w and a rejected one y_l, ``log π(y|x)`` is the SUM of the answer tokens'
log-probabilities (prompt tokens are masked, as in SFT), ``π_ref`` is the reference policy (for
LoRA/QLoRA the base with the adapter disabled), ``σ`` the logistic function and ``β`` the
temperature. Shapes: every per-sequence tensor is ``[batch]``; logits are ``[batch, seq, vocab]``.

Variants (``PreferenceConfig.loss``; TRL 1.16's names and definitions, checked by
``tests/test_preference_parity.py``):

========  ==========================================================  =========  ===============
variant   per-pair loss                                               reference  log-prob
========  ==========================================================  =========  ===============
sigmoid   -(1-ε)·log σ(βΔ) - ε·log σ(-βΔ),  Δ = Δ_w - Δ_l            yes        sum
ipo       (Δ_w/|y_w| - Δ_l/|y_l| - 1/(2β))²                          yes        sum, then /len
orpo      NLL(y_w) - β·log σ(log odds(y_w) - log odds(y_l))          no         mean
simpo     -(1-ε)·log σ(β(l_w - l_l) - γ) - ε·log σ(-(β(l_w-l_l)-γ))  no         mean
kto       λ_D(1-σ(β(Δ - z))) / λ_U(1-σ(β(z - Δ)))                    yes        sum
rm        -log σ(r_w - r_l)                                          no         (value head)
========  ==========================================================  =========  ===============

where Δ_w = log π(y_w|x) - log π_ref(y_w|x) (and Δ_l for y_l), l = mean token log-prob, z the KTO
KL estimate, odds(y) = p/(1-p) with p = exp(mean token log-prob), r the reward model's scalar score.
Sources: DPO, Rafailov et al. 2023 (arXiv:2305.18290) eq. 7, with cDPO label smoothing (Mitchell
2023); IPO, Azar et al. 2023 (arXiv:2310.12036) eq. 17 with TRL's per-token normalisation; ORPO, Hong
et al. 2024 (arXiv:2403.07691) eqs. 4-7; SimPO, Meng et al. 2024 (arXiv:2405.14734) eq. 6; KTO,
Ethayarajh et al. 2024 (arXiv:2402.01306) eq. 7; reward model, Ouyang et al. 2022 (arXiv:2203.02155)
eq. 1 (Bradley-Terry).

The implicit reward logged per answer is ``β·Δ`` for the reference-based variants and ``β·l`` (the
mean token log-prob, as TRL) for the reference-free ones; ``rewards/accuracies`` is the fraction of pairs
whose chosen reward beats the rejected one, the held-out *preference accuracy*.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lorafleet.preference_prefix import shared_prompt_problem, shared_prompt_token_logps

IGNORE_INDEX = -100
PAIRWISE_LOSSES = ("sigmoid", "ipo", "orpo", "simpo")
REFERENCE_FREE_LOSSES = frozenset({"orpo", "simpo"})
"""Variants that need no reference policy: no adapter toggling, no second model."""
MEAN_LOGP_LOSSES = frozenset({"orpo", "simpo"})
"""Variants scored on length-normalised (mean per token) log-probs instead of sums."""


@dataclass
class PairLosses:
    """What a pairwise loss returns: per-pair losses and the implicit rewards used for metrics."""

    losses: torch.Tensor
    """[batch] per-pair loss; the step loss is its mean."""
    chosen_rewards: torch.Tensor
    """[batch] implicit reward of each chosen answer (detached)."""
    rejected_rewards: torch.Tensor
    """[batch] implicit reward of each rejected answer (detached)."""


# ----------------------------------------------------------------------------- log-probs


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token, and the mask of the tokens that count.

    Token t+1 is predicted from positions <= t, so logits[:, :-1] score labels[:, 1:].

    Args:
        logits: [batch, seq, vocab] raw model outputs.
        labels: [batch, seq] token ids, ``-100`` where a token is not scored (prompt, padding).

    Returns:
        ([batch, seq-1] log p(label), zero where masked; [batch, seq-1] bool mask).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    # log_softmax in fp32: bf16 log-probs of long answers lose whole nats in the sum.
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logps, 2, safe.unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or, with ``average``, mean) of the scored tokens' log-probs per row: [batch]."""
    picked, mask = token_logps(logits, labels)
    total = picked.sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1) if average else total


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over every scored token of the batch (the SFT loss): scalar."""
    picked, mask = token_logps(logits, labels)
    return -picked.sum() / mask.sum().clamp(min=1)


_LABEL_LOGITS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _label_logits(model: Any) -> bool:
    """Whether ``model`` takes a boolean ``logits_to_keep`` mask (cached: the check reads source)."""
    try:
        return _LABEL_LOGITS[model]
    except (KeyError, TypeError):
        pass
    from lorafleet.fastpath import supports_label_logits

    found = isinstance(model, torch.nn.Module) and supports_label_logits(model)
    with contextlib.suppress(TypeError):
        _LABEL_LOGITS[model] = found
    return found


def answer_token_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over a right-padded batch: :func:`token_logps` of its answer tokens.

    Only answer tokens are scored, so where the model allows it the output head runs on the
    positions that predict one (``logits_to_keep`` as a mask, see ``lorafleet.fastpath``): the same
    log-probs without the prompt's and padding's ``[rows, seq, vocab]`` logits, for policy and
    reference forwards alike.
    """
    labels = batch["labels"]
    if not _label_logits(model):
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        return token_logps(logits, labels)
    mask = labels[:, 1:] != IGNORE_INDEX
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = mask
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        use_cache=False,
        logits_to_keep=keep,
    ).logits  # [kept positions, vocab], row-major like labels[:, 1:][mask]
    logps = torch.log_softmax(logits.float(), dim=-1)
    picked = torch.gather(logps, 1, labels[:, 1:][mask].unsqueeze(-1)).squeeze(-1)
    return picked.new_zeros(mask.shape).masked_scatter(mask, picked), mask


def forward_logps(model: Any, batch: dict[str, torch.Tensor], average: bool = False) -> torch.Tensor:
    """One forward over a right-padded batch; the answer log-probs per row, [rows] (sum or mean)."""
    picked, mask = answer_token_logps(model, batch)
    total = picked.sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1) if average else total


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout layer of ``model`` (LoRA's included) to p=0; returns how many.

    A preference loss compares log-probs of two answers that may differ in one token, against a
    reference computed with the same modules: dropout noise on both sides swamps that signal (an
    SFT adapter trained with ``lora.dropout`` 0.05 then stops DPO from learning). trl does the
    same by default (``disable_dropout=True``).
    """
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for layer in layers:
        layer.p = 0.0
    return len(layers)


REFERENCE_ADAPTER = "ref"
"""Name of the frozen copy of a starting (SFT) adapter that serves as the reference policy."""


def unwrap_model(model: Any) -> Any:
    """The model inside a DDP or DeepSpeed wrapper (both hold it as ``.module``); else ``model``."""
    inner = model
    for _ in range(4):  # e.g. DDP around a DeepSpeed engine: never deeper than that
        wrapped = getattr(inner, "module", None)
        if not isinstance(wrapped, torch.nn.Module):
            break
        inner = wrapped
    return inner


@contextlib.contextmanager
def reference_policy(model: Any) -> Iterator[None]:
    """Run a PEFT ``model`` as the reference policy inside the block, without gradient.

    ``model`` may be wrapped (DDP, a DeepSpeed engine): the adapter is switched on the PEFT model
    inside and the caller keeps forwarding through the wrapper, so under ZeRO-3 the reference
    forward gathers the same partitioned base weights as the policy's.

    DPO's reference is the policy it starts from (Rafailov et al. 2023 take π_ref = π_SFT). A fresh
    adapter starts as the base, so the reference is the model with its adapters disabled. A run that
    starts from an SFT adapter keeps a frozen copy of it as adapter :data:`REFERENCE_ADAPTER` and
    switches to it here (TRL's convention too). Either way the base weights are shared: the
    reference costs one extra no-grad forward and, at most, a second LoRA's weights.
    """
    peft_model = unwrap_model(model)
    if REFERENCE_ADAPTER in (getattr(peft_model, "peft_config", None) or {}):
        previous = peft_model.active_adapter
        peft_model.set_adapter(REFERENCE_ADAPTER)
        try:
            with torch.no_grad():
                yield
        finally:
            # set_adapter also marks the named adapter trainable: restore the policy's flags.
            peft_model.set_adapter(previous)
        return
    disable = getattr(peft_model, "disable_adapter", None)
    if disable is None:
        raise TypeError(
            f"{type(peft_model).__name__} has no adapter to disable; pass a separate reference model"
        )
    with torch.no_grad(), disable():
        yield


def reference_logps(
    model: Any, batch: dict[str, torch.Tensor], ref_model: Any | None = None, average: bool = False
) -> torch.Tensor:
    """Reference answer log-probs per row, [rows]: ``ref_model`` if given (full / freeze), else
    ``model`` under :func:`reference_policy` (LoRA/QLoRA: no second model in memory)."""
    if ref_model is not None:
        with torch.no_grad():
            return forward_logps(ref_model, batch, average)
    with reference_policy(model):
        return forward_logps(model, batch, average)


def _pair_reference_logps(
    model: Any, batch: dict[str, torch.Tensor], ref_model: Any | None, share_prompt: bool
) -> torch.Tensor:
    """:func:`reference_logps` of a :func:`collate_pairs` batch, the prompt shared where it fits."""
    scorer = model if ref_model is None else ref_model
    if not share_prompt or shared_prompt_problem(scorer, batch) is not None:
        return reference_logps(model, batch, ref_model)
    context = torch.no_grad() if ref_model is not None else reference_policy(model)
    with context:
        return shared_prompt_token_logps(scorer, batch)[0].sum(dim=1)


# ----------------------------------------------------------------------------- pairwise losses


def _smoothed_logsigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1-ε)·log σ(z) - ε·log σ(-z): the binary cross-entropy against a label flipped with prob ε."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PairLosses:
    """DPO (sigmoid): -(1-ε)·log σ(β·Δ) - ε·log σ(-β·Δ).

    Δ = [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)] with summed answer
    log-probs (Rafailov et al. 2023, eq. 7; ε > 0 is conservative DPO). All inputs [batch].
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    losses = _smoothed_logsigmoid(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> PairLosses:
    """IPO: (Δ_w/|y_w| - Δ_l/|y_l| - 1/(2β))².

    Azar et al. 2023, eq. 17 (β is their τ). The log-ratios are summed over the answer, then divided
    by its token count |y| so the squared target 1/(2β) does not depend on answer length (TRL's form,
    agreed with the IPO authors). Lengths are [batch] answer token counts.
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
    losses = (delta - 1 / (2 * beta)) ** 2
    return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float,
) -> PairLosses:
    """ORPO: NLL(y_w) - β·log σ(log odds_θ(y_w|x) - log odds_θ(y_l|x)).

    Hong et al. 2024, eqs. 4-7: odds(y|x) = P/(1-P) with P = exp(mean token log-prob), so
    log odds = l - log(1 - e^l). No reference model. ``chosen_nll`` is the scalar SFT loss on the
    chosen rows (the caller decides which tokens it covers: lorafleet's recipe uses the answer
    tokens, the same mask as SFT; TRL 1.16 also scores the prompt). Rewards are β·l.
    """
    chosen = chosen_mean_logps.float()
    rejected = rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = chosen_nll - beta * F.logsigmoid(log_odds)
    return PairLosses(losses, beta * chosen.detach(), beta * rejected.detach())


def simpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> PairLosses:
    """SimPO: -(1-ε)·log σ(β(l_w - l_l) - γ) - ε·log σ(-(β(l_w - l_l) - γ)).

    Meng et al. 2024, eq. 6: l is the MEAN token log-prob of the answer (length normalisation), γ
    the target reward margin; no reference model. Rewards are β·l.
    """
    logits = beta * (chosen_mean_logps - rejected_mean_logps) - gamma
    losses = _smoothed_logsigmoid(logits, label_smoothing)
    return PairLosses(losses, beta * chosen_mean_logps.detach(), beta * rejected_mean_logps.detach())


def kto_kl_estimate(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z: mean over mismatched (x_i, y_{i-1}) pairs of log π - log π_ref.

    Ethayarajh et al. 2024, §4.1: a biased but cheap estimate of KL(π‖π_ref), detached (no
    gradient flows through z) and clamped at 0 because a KL is never negative. Inputs [batch].
    """
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PairLosses:
    """KTO: λ_D·(1 - σ(β(Δ - z))) for desirable rows, λ_U·(1 - σ(β(z - Δ))) for undesirable ones.

    Ethayarajh et al. 2024, eq. 7, with Δ = log π(y|x) - log π_ref(y|x) (summed) and z from
    :func:`kto_kl_estimate`. ``desirable`` is a [batch] bool label. The returned losses are ordered
    desirable rows first, then undesirable (their mean is the step loss, as TRL);
    ``chosen_rewards`` / ``rejected_rewards`` are β·Δ of the desirable / undesirable rows.
    """
    ratio = logps - ref_logps
    chosen, rejected = ratio[desirable], ratio[~desirable]
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected)))
    losses = torch.cat([chosen_losses, rejected_losses])
    return PairLosses(losses, beta * chosen.detach(), beta * rejected.detach())


def reward_pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> PairLosses:
    """Reward-model ranking loss: -log σ(r(x, y_w) - r(x, y_l)).

    Bradley-Terry (Ouyang et al. 2022, eq. 1); r is the value head's scalar on the last
    non-padding token. Rewards are the raw scores, so accuracy is the pairwise ranking accuracy.
    """
    losses = -F.logsigmoid(chosen_scores - rejected_scores)
    return PairLosses(losses, chosen_scores.detach(), rejected_scores.detach())


# ----------------------------------------------------------------------------- batching


@dataclass
class PairExample:
    """One tokenized preference pair: the shared prompt and both answers (answer ids end with EOS)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    line: int = 0


@dataclass
class UnpairedExample:
    """One tokenized KTO row: a prompt, an answer, and whether the answer is desirable."""

    prompt_ids: list[int]
    answer_ids: list[int]
    desirable: bool
    line: int = 0


def _pad_rows(rows: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (prompt, answer) rows: input_ids, attention_mask, labels (-100 on prompt/pad)."""
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(rows):
        ids = torch.tensor(prompt + answer, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        labels[row, len(prompt) : len(ids)] = ids[len(prompt) :]
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(examples: Sequence[PairExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One [2·batch, seq] batch: the chosen rows, then the rejected rows (one forward for both).

    Returns input_ids, attention_mask and labels (answer tokens only; prompt and padding -100).
    """
    rows = [(e.prompt_ids, e.chosen_ids) for e in examples] + [
        (e.prompt_ids, e.rejected_ids) for e in examples
    ]
    return _pad_rows(rows, pad_token_id)


def collate_unpaired(examples: Sequence[UnpairedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A KTO batch: the rows, then the same prompts with answers rotated by one (x_i, y_{i-1}).

    The rotated half feeds :func:`kto_kl_estimate` (TRL's construction). Returns input_ids,
    attention_mask, labels of shape [2·batch, seq] and ``desirable`` [batch] (bool).
    """
    answers = [e.answer_ids for e in examples]
    rotated = answers[-1:] + answers[:-1]
    rows = [(e.prompt_ids, e.answer_ids) for e in examples]
    rows += [(e.prompt_ids, a) for e, a in zip(examples, rotated, strict=True)]
    batch = _pad_rows(rows, pad_token_id)
    batch["desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    return batch


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch] index of each row's last non-padding token in a right-padded batch."""
    return attention_mask.sum(dim=1).clamp(min=1) - 1


# ----------------------------------------------------------------------------- metrics


def pair_metrics(
    result: PairLosses, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, paired: bool = True
) -> dict[str, float]:
    """Per-step metrics under TRL's names, means over the batch.

    ``paired``: chosen row i and rejected row i share a prompt, so ``rewards/accuracies`` (the
    fraction of pairs ranked right) is defined; KTO's unpaired rows get only the means.
    """
    chosen, rejected = result.chosen_rewards, result.rejected_rewards
    metrics = {"loss": float(result.losses.detach().mean())}
    if chosen.numel():
        metrics["rewards/chosen"] = float(chosen.mean())
        metrics["logps/chosen"] = float(chosen_logps.detach().mean())
    if rejected.numel():
        metrics["rewards/rejected"] = float(rejected.mean())
        metrics["logps/rejected"] = float(rejected_logps.detach().mean())
    if chosen.numel() and rejected.numel():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    if paired and chosen.numel():
        metrics["rewards/accuracies"] = float((chosen > rejected).float().mean())
    return metrics


# ----------------------------------------------------------------------------- one training step


def pairwise_step(
    model: Any,
    batch: dict[str, torch.Tensor],
    loss: str,
    beta: float,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
    ref_model: Any | None = None,
    ref_logps: torch.Tensor | None = None,
    share_prompt: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and TRL-named metrics of one :func:`collate_pairs` batch under variant ``loss``.

    One forward scores chosen and rejected rows together ([2·batch, seq]). With ``share_prompt``
    (and where :func:`~lorafleet.preference_prefix.shared_prompt_problem` finds the model and batch
    fit) that forward runs each pair's prompt once and both answers on its KV cache: the same
    log-probs and gradients, fewer tokens through the model; the reference forward does the same.
    The reference comes from ``ref_logps`` ([2·batch], precomputed), else ``ref_model``, else
    ``model`` with its adapter disabled; ORPO and SimPO use none.

    Returns:
        (scalar loss with gradient, metrics dict).
    """
    score = answer_token_logps
    if share_prompt and shared_prompt_problem(model, batch) is None:
        score = shared_prompt_token_logps
    picked, mask = score(model, batch)
    sums, lengths = picked.sum(dim=1), mask.sum(dim=1)
    half = sums.shape[0] // 2
    if loss in MEAN_LOGP_LOSSES:
        means = sums / lengths.clamp(min=1)
        chosen, rejected = means[:half], means[half:]
        if loss == "orpo":
            nll = -picked[:half].sum() / mask[:half].sum().clamp(min=1)
            result = orpo_loss(chosen, rejected, nll, beta)
        else:
            result = simpo_loss(chosen, rejected, beta, gamma, label_smoothing)
    else:
        if ref_logps is None:
            ref_logps = _pair_reference_logps(model, batch, ref_model, share_prompt)
        chosen, rejected = sums[:half], sums[half:]
        if loss == "sigmoid":
            result = dpo_loss(chosen, rejected, ref_logps[:half], ref_logps[half:], beta, label_smoothing)
        elif loss == "ipo":
            result = ipo_loss(
                chosen, rejected, ref_logps[:half], ref_logps[half:], lengths[:half], lengths[half:], beta
            )
        else:
            raise ValueError(f"preference.loss={loss!r} is not one of {', '.join(PAIRWISE_LOSSES)}")
    return result.losses.mean(), pair_metrics(result, chosen, rejected)


def kto_step(
    model: Any,
    batch: dict[str, torch.Tensor],
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    ref_model: Any | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and metrics of one :func:`collate_unpaired` batch (rows, then the rotated KL rows).

    The KL rows run without gradient, as in TRL: z is a detached reference point.
    """
    half = batch["input_ids"].shape[0] // 2
    rows = {k: batch[k][:half] for k in ("input_ids", "attention_mask", "labels")}
    mismatched = {k: batch[k][half:] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        kl_logps = forward_logps(model, mismatched)
    ref_both = reference_logps(model, {k: batch[k] for k in rows}, ref_model)
    kl = kto_kl_estimate(kl_logps, ref_both[half:])
    logps = forward_logps(model, rows)
    desirable = batch["desirable"]
    result = kto_loss(logps, ref_both[:half], desirable, kl, beta, desirable_weight, undesirable_weight)
    metrics = pair_metrics(result, logps[desirable], logps[~desirable], paired=False)
    metrics["kl"] = float(kl)
    return result.losses.mean(), metrics


VALUE_HEAD = "score"
"""Module name of a reward model's value head (transformers' ``*ForSequenceClassification``)."""


def reward_scores(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Value-head score of each row at its last attended token: [rows].

    Read from the head's per-position output (a forward hook on :data:`VALUE_HEAD`) at
    :func:`last_token_index` of the attention mask, not from transformers' pooling, which finds the
    last token by ``pad_token_id``: where pad is eos (many chat tokenizers) it would score the token
    before the answer's end marker, and the served score (inference ``reward_heads``: final hidden
    state at each row's last token) would differ from the trained one.
    """
    head = unwrap_model(model).get_submodule(_value_head_path(model))
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        handle.remove()
    per_token = captured[-1].squeeze(-1).float()  # [rows, seq]
    last = last_token_index(batch["attention_mask"]).to(per_token.device)
    return per_token.gather(1, last[:, None]).squeeze(1)


def _value_head_path(model: Any) -> str:
    """Dotted path of the value head inside the (PEFT-wrapped) model: the module named
    :data:`VALUE_HEAD` itself (PEFT wraps it in a ``modules_to_save`` copy; the wrapper routes to the
    active copy)."""
    for name, _ in unwrap_model(model).named_modules():
        if name == VALUE_HEAD or name.endswith("." + VALUE_HEAD):
            return name
    raise TypeError(f"{type(model).__name__} has no value head {VALUE_HEAD!r}; load it with num_labels=1")


def reward_step(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Pairwise ranking loss of a sequence-classification model on a :func:`collate_pairs` batch,
    each row scored by :func:`reward_scores`."""
    scores = reward_scores(model, batch)  # [2·batch]
    half = scores.shape[0] // 2
    result = reward_pairwise_loss(scores[:half], scores[half:])
    metrics = pair_metrics(result, scores[:half], scores[half:])
    return result.losses.mean(), metrics
