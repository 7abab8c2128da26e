"""Which KV layout an engine gets, and the paged layout's block pool.

The paged layout (``paged_batch``) drives the model's own attention modules through transformers'
attention interface. That is exact only for models whose attention goes through it with nothing
the paged attention does not do (sliding windows, soft-capping, logit scaling): the engine checks
the config, then runs one short prompt both ways and compares the logits. Anything else is served
on the padded layout (``padded_batch``), with a log line saying why.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from services.inference.kv_cache import ForwardPlan, KvBlocks, PagedCacheView, Segment, use_paged_attention
from services.inference.padded_batch import PaddedBatch
from services.inference.paged_batch import PagedBatch
from services.inference.prompt_adapters import KvLayout

if TYPE_CHECKING:
    from services.inference.engine import Engine

logger = logging.getLogger(__name__)


def choose_layout(
    engine: Engine, kind: str, kv_cache_mb: float | None, block_size: int, prefix_caching: bool
) -> PagedBatch | PaddedBatch:
    """The engine's KV layout: ``padded`` when asked; else paged when the model allows it (a
    probe forward must give the model's own logits), else padded with a log line saying why, or
    ValueError when ``paged`` was asked for."""
    if kind == "padded":
        return PaddedBatch(engine)
    layout = engine.kv_layout
    reason = None
    if layout is None:
        reason = "the model config does not describe its KV cache"
    else:
        reason = paged_unsupported(engine._model_config)
    blocks = None
    if reason is None and layout is not None:
        blocks = make_blocks(engine, layout, kv_cache_mb, block_size, prefix_caching)
        reason = probe_paged(engine, blocks)
    if reason is None and blocks is not None:
        return PagedBatch(engine, blocks)
    if kind == "paged":
        raise ValueError(f"kv_cache=paged is not possible for this model: {reason}")
    logger.warning("serving with the padded KV layout (no block budget, no prefix reuse): %s", reason)
    return PaddedBatch(engine)


def make_blocks(
    engine: Engine, layout: KvLayout, kv_cache_mb: float | None, block_size: int, prefix_caching: bool
) -> KvBlocks:
    """The block pool for ``kv_cache_mb`` (None: ``max_batch_size`` sequences of ``max_context``)."""
    if block_size < 1:
        raise ValueError(f"kv_block_size must be >= 1, got {block_size}")
    model: Any = engine.model
    weight = getattr(model.get_input_embeddings(), "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
    per_token = KvBlocks.bytes_per_token(layout.layers, layout.kv_heads, layout.head_dim, dtype)
    min_blocks = -(-engine.max_context // block_size)
    if kv_cache_mb is None:
        num_blocks = min_blocks * engine.max_batch_size
    else:
        if not kv_cache_mb > 0:
            raise ValueError(f"kv_cache_mb must be > 0, got {kv_cache_mb}")
        num_blocks = int(kv_cache_mb * 2**20 // (per_token * block_size))
        if num_blocks < min_blocks:
            need = min_blocks * block_size * per_token / 2**20
            raise ValueError(
                f"kv_cache_mb={kv_cache_mb} holds {num_blocks * block_size} tokens; one sequence of "
                f"max_context={engine.max_context} tokens needs at least {need:.1f} MiB"
            )
    return KvBlocks(
        layout.layers,
        layout.kv_heads,
        layout.head_dim,
        num_blocks,
        block_size,
        dtype,
        engine.device,
        prefix_caching=prefix_caching,
    )


def probe_paged(engine: Engine, blocks: KvBlocks) -> str | None:
    """None when a paged forward of a short prompt gives the model's own logits (every layer
    through ``kv_cache.paged_attention``); else why not."""
    use_paged_attention(engine.model)
    tokens = [min(i + 1, engine.vocab_size - 1) for i in range(3)]
    table: list[int] = []
    try:
        block = blocks.allocate()
        assert block is not None
        table.append(block)
        plan = ForwardPlan(blocks, blocks.slots(table, 0, len(tokens)), [Segment(0, len(tokens), 0, table)])
        ids = torch.tensor(tokens, device=engine.device)
        with torch.inference_mode():
            engine.slots.set_rows(None)
            expected = engine.model(input_ids=ids[None], use_cache=False).logits[0, -1].float()
            got = engine._forward(
                ids[:, None],
                None,
                torch.arange(len(tokens), device=engine.device)[:, None],
                PagedCacheView(plan),
                paged=plan,
                row_slots=torch.full((len(tokens),), -1),
                keep=torch.tensor([len(tokens) - 1]),
            )[0].float()
        engine.slots.set_rows(None)
    except Exception as e:  # any model the paged forward cannot drive
        return f"the paged forward failed ({type(e).__name__}: {e})"
    finally:
        blocks.release(table)
    if plan.calls != blocks.layers:
        return f"{plan.calls} of {blocks.layers} layers used transformers' attention interface"
    tol = 1e-3 if blocks.dtype == torch.float32 else 5e-2
    if not torch.allclose(got, expected, rtol=tol, atol=tol * max(1.0, float(expected.abs().max()))):
        return "the paged forward's logits differ from the model's own forward"
    return None


def paged_unsupported(config: Any) -> str | None:
    """Why the paged layout cannot compute this config's model exactly, or None."""
    if config is None:
        return "the model has no transformers config"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        return "sliding-window attention layers"
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(text, name, None):
            return f"{name} is set"
    if getattr(text, "logit_scale", None) not in (None, 1.0):
        return "logit_scale is set"
    return None
