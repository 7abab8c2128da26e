"""Two training-loop speed-ups that change no result: label-only logits and a faster CPU dropout.

**Label-only logits.** A causal LM's loss only looks at the logits of positions whose *next* token
is trained (label != -100). Instruction data trains on the answer only, so most positions' logits
are computed and thrown away, and the ``[batch, seq, vocab]`` logits tensor is the largest
activation of the step (16 x 1024 x 152k fp32 = 10 GB for Qwen2). transformers 5 lets the caller
pass ``logits_to_keep`` as a boolean ``[batch, seq]`` mask, so the output head runs on the kept
rows only; :func:`causal_lm_loss` builds that mask from the labels and computes the same mean
cross-entropy as ``ForCausalLMLoss``. It goes through the top-level forward, so DDP, DeepSpeed and
PEFT wrappers see an ordinary call. Models whose forward does not take a mask (remote-code
ChatGLM / Baichuan, P-tuning's prompt encoder, which prepends virtual tokens) use the plain path.

**CPU dropout.** ``torch.nn.functional.dropout`` on CPU draws its Bernoulli mask element by element,
several times slower than ``torch.rand`` + a compare on the same tensor, and PEFT applies a LoRA
dropout to the input of every adapted layer, so on CPU it is a large share of the forward (figures
in bench/README.md). :class:`LoraDropout` keeps each element with probability exactly
``1 - p`` (``u >= p`` for ``u ~ U[0, 1)``), scales by ``1 / (1 - p)`` and saves a bool mask for the
backward (the same memory as native dropout). On CUDA it calls the fused native kernel.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class _CpuDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.rand(x.shape, dtype=torch.float32, device=x.device) >= p
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


class LoraDropout(nn.Dropout):
    """``nn.Dropout`` with a faster CPU path (see the module docstring); identical elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p >= 1.0 or self.inplace:
            return F.dropout(x, self.p, True, self.inplace)
        return _CpuDropout.apply(x, self.p)


def use_fast_lora_dropout(model: nn.Module) -> int:
    """Swap every PEFT ``lora_dropout`` ``nn.Dropout`` in ``model`` for :class:`LoraDropout`.

    Returns:
        The number of modules replaced.
    """
    replaced = 0
    for module in model.modules():
        holder = getattr(module, "lora_dropout", None)
        if not isinstance(holder, nn.ModuleDict):
            continue
        for key, drop in list(holder.items()):
            if type(drop) is nn.Dropout:
                holder[key] = LoraDropout(drop.p, drop.inplace)
                replaced += 1
    return replaced


def supports_label_logits(model: nn.Module) -> bool:
    """Whether the causal LM under any wrappers takes a boolean ``logits_to_keep`` mask."""
    inner: Any = model
    for _ in range(8):  # DeepSpeed engine / DDP -> .module; PEFT -> .base_model.model
        if hasattr(inner, "module") and isinstance(inner.module, nn.Module):
            inner = inner.module
        elif hasattr(inner, "get_base_model"):
            peft_config = getattr(inner, "active_peft_config", None)
            if getattr(peft_config, "is_prompt_learning", False):
                return False
            inner = inner.get_base_model()
        else:
            break
    try:
        source = inspect.getsource(type(inner).forward)
    except (OSError, TypeError):
        return False
    return "slice_logits_to_keep" in source


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], label_logits: bool) -> torch.Tensor:
    """Mean next-token cross-entropy over the trained positions of ``batch``.

    Args:
        model: the (possibly wrapped) causal LM.
        batch: ``input_ids``, ``labels`` and optionally ``attention_mask`` / ``position_ids``.
        label_logits: compute logits only where a label is trained (see the module docstring);
            the caller checked :func:`supports_label_logits`.
    """
    if not label_logits:
        return model(**batch, use_cache=False).loss
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if not bool(keep.any()):
        return model(**batch, use_cache=False).loss  # nothing trained: the plain path's own result
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # [n_kept, vocab]
    targets = labels[:, 1:][keep[:, :-1]]
    return F.cross_entropy(logits.float(), targets)
