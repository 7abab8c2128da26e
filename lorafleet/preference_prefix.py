"""The shared-prompt forward of a preference pair: the prompt once, both answers on its KV cache.

A pairwise batch (``preference.collate_pairs``) holds every prompt twice: row i is prompt_i +
chosen_i and row B+i is prompt_i + rejected_i. A causal LM's states at the prompt positions do not
depend on what follows, so the prompt's keys and values are the same in both rows. This module runs
the prompts once ([B, prompt] rows, left-padded, with gradient when the caller has it), repeats the
per-layer key/value cache for the two sides, and runs the answers ([2B, answer] rows) on top of it.
Gradients reach the prompt's computation through the cached keys/values, summed over both sides,
exactly as the two prompt copies of the plain forward sum theirs. The log-probs are those of the
plain forward up to float rounding (``tests/test_preference_prefix.py``); the forward processes
B·|prompt| + 2B·|answer| tokens instead of 2B·(|prompt| + |answer|).

Where it is used (:func:`shared_prompt_problem` says why not otherwise): transformers causal LMs
that take a boolean ``logits_to_keep`` mask (see ``lorafleet.fastpath``) and whose cache for the
model is a plain full-attention ``DynamicCache`` (no sliding-window or other layer types), without
gradient checkpointing (it turns the cache off in training), on a batch whose paired rows share
their prompt and have a non-empty prompt and answer. The caller decides about wrappers: under
DeepSpeed ZeRO-3 the recipe keeps the plain forward (two grad-carrying forwards per step through
the partitioned engine are not a path it has checked).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch

IGNORE_INDEX = -100


def _inner_model(model: Any) -> Any:
    """The transformers model under DDP / DeepSpeed (``.module``) and PEFT (``get_base_model``)."""
    inner = model
    for _ in range(8):
        if isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module
        elif hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        else:
            break
    return inner


def _plain_dynamic_cache(model: Any) -> Any | None:
    """An empty ``DynamicCache`` for ``model`` if all its layers are plain full-attention layers."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    config = getattr(_inner_model(model), "config", None)
    if config is None:
        return None
    try:
        cache = DynamicCache(config=config)
    except Exception:  # any config the cache cannot read means: not this path
        return None
    layers = getattr(cache, "layers", [])
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return cache


_MODEL_PROBLEMS: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()


def _model_problem(model: Any) -> str | None:
    """What in ``model`` itself rules the shared prompt out (cached: the check reads source)."""
    try:
        return _MODEL_PROBLEMS[model]
    except (KeyError, TypeError):
        pass
    from lorafleet.fastpath import supports_label_logits

    problem = None
    if not isinstance(model, torch.nn.Module) or not supports_label_logits(model):
        problem = "the model takes no boolean logits_to_keep mask"
    elif _plain_dynamic_cache(model) is None:
        problem = "the model's cache is not a plain DynamicCache"
    with contextlib.suppress(TypeError):
        _MODEL_PROBLEMS[model] = problem
    return problem


def shared_prompt_problem(model: Any, batch: dict[str, torch.Tensor]) -> str | None:
    """Why the shared-prompt forward cannot score ``batch`` exactly on ``model``; None if it can."""
    problem = _model_problem(model)
    if problem is not None:
        return problem
    inner = _inner_model(model)
    checkpointing = getattr(inner, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers before the rename
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    if checkpointing:
        return "gradient checkpointing turns the KV cache off"
    labels, ids = batch["labels"], batch["input_ids"]
    rows = labels.shape[0]
    if rows == 0 or rows % 2:
        return "the batch is not [chosen rows; rejected rows]"
    scored = labels != IGNORE_INDEX
    answer_lengths = scored.sum(dim=1)
    prompt_lengths = scored.int().argmax(dim=1)
    if bool((answer_lengths == 0).any()) or bool((prompt_lengths == 0).any()):
        return "a row has an empty prompt or answer"
    ends = batch["attention_mask"].sum(dim=1)
    if not torch.equal(ends, prompt_lengths + answer_lengths):
        return "a row's answer is not one right-padded span after its prompt"
    half = rows // 2
    if not torch.equal(prompt_lengths[:half], prompt_lengths[half:]):
        return "chosen and rejected rows have different prompts"
    width = int(prompt_lengths.max())
    in_prompt = torch.arange(width, device=ids.device)[None, :] < prompt_lengths[:half, None]
    if not torch.equal(ids[:half, :width] * in_prompt, ids[half:, :width] * in_prompt):
        return "chosen and rejected rows have different prompts"
    return None


def _split(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Left-padded prompts [B, P] and right-padded answers [2B, A] of a pairwise batch."""
    ids, labels = batch["input_ids"], batch["labels"]
    rows, seq = ids.shape
    half = rows // 2
    scored = labels != IGNORE_INDEX
    answer_lengths = scored.sum(dim=1)  # [2B]
    prompt_lengths = scored.int().argmax(dim=1)  # [2B]: the first answer token's position
    width, answer_width = int(prompt_lengths.max()), int(answer_lengths.max())
    # Prompt column c of row i holds token c - (width - P_i) of the row: left padding.
    columns = torch.arange(width, device=ids.device)[None, :]
    source = columns - (width - prompt_lengths[:half, None])  # [B, P]
    prompt_mask = source >= 0
    prompt_ids = ids[:half].gather(1, source.clamp(min=0)) * prompt_mask
    # Answer column j of row r holds token P_r + j of the row: right padding.
    steps = torch.arange(answer_width, device=ids.device)[None, :]
    answer_mask = steps < answer_lengths[:, None]  # [2B, A]
    answer_source = (prompt_lengths[:, None] + steps).clamp(max=seq - 1)
    answer_ids = ids.gather(1, answer_source) * answer_mask
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask.long(),
        "prompt_lengths": prompt_lengths[:half],
        "answer_ids": answer_ids,
        "answer_mask": answer_mask,
    }


def shared_prompt_token_logps(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer-token log-probs of a pairwise batch, the prompt run once per pair.

    The caller checked :func:`shared_prompt_problem`. Gradient flows as in the caller's mode.

    Returns:
        ([2B, answer] log p of each answer token, zero on padding; [2B, answer] bool mask): row r
        holds the same values, in the same order, as row r of ``preference.answer_token_logps``
        (its sums, counts and means are those of the plain forward).
    """
    from transformers.cache_utils import DynamicCache

    parts = _split(batch)
    prompt_mask = parts["prompt_mask"]  # [B, P]
    cache = _plain_dynamic_cache(model)  # a fresh one per forward
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    prompt_out = model(
        input_ids=parts["prompt_ids"],
        attention_mask=prompt_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    # The two sides read the same prompt states: [2B, heads, P, dim] per layer, chosen then rejected.
    both = DynamicCache(
        ddp_cache_data=[(torch.cat([k, k]), torch.cat([v, v])) for k, v, *_ in prompt_out.past_key_values]
    )
    first_logits = prompt_out.logits[:, -1].float().repeat(2, 1)  # [2B, vocab]: predicts answer token 0
    answer_ids, answer_mask = parts["answer_ids"], parts["answer_mask"]
    steps = torch.arange(answer_ids.shape[1], device=answer_ids.device)[None, :]
    keep = torch.zeros_like(answer_mask)
    keep[:, :-1] = answer_mask[:, 1:]  # answer position j predicts answer token j+1
    logits = model(
        input_ids=answer_ids,
        attention_mask=torch.cat([prompt_mask.repeat(2, 1), answer_mask.long()], dim=1),
        position_ids=parts["prompt_lengths"].repeat(2)[:, None] + steps,
        past_key_values=both,
        use_cache=True,
        logits_to_keep=keep,
    ).logits  # [kept positions, vocab], row-major like answer_ids[:, 1:][answer_mask[:, 1:]]
    first = torch.log_softmax(first_logits, dim=-1).gather(1, answer_ids[:, :1]).squeeze(1)  # [2B]
    rest = torch.log_softmax(logits.float(), dim=-1)
    rest = rest.gather(1, answer_ids[:, 1:][answer_mask[:, 1:]].unsqueeze(-1)).squeeze(-1)
    picked = first.new_zeros(answer_mask.shape)
    picked = torch.cat([first[:, None], picked[:, 1:].masked_scatter(answer_mask[:, 1:], rest)], dim=1)
    return picked, answer_mask
