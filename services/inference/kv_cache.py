"""The engine's KV cache: fixed-size blocks under a memory budget, prefix reuse, and the attention
that reads it.

Storage. Per layer one key and one value tensor ``[kv_heads, num_blocks * block_size, head_dim]``
(allocated empty: pages are touched only as blocks are first written, so resident memory grows
with use, up to the budget). Block ``b`` owns token slots ``b * block_size .. (b + 1) * block_size``.
A sequence owns a *block table* (its block ids in order); its token ``i`` lives in slot
``table[i // block_size] * block_size + i % block_size``. Rows join and leave by taking and
returning blocks: no other row's cache is copied.

Allocation prefers the block right after a row's last one, so a row's blocks are usually one
contiguous run of slots and attention reads them as a view, not a gather (``Segment.runs``).

Prefix reuse. A *full* block of a prompt is registered under a hash chain: the hash of its
tokens, the previous block's hash, and the request's cache key (the adapter's ref, which names its
version, or the empty key of the base). A request whose leading blocks hash the same reuses those
blocks (reference-counted, read-only: only full blocks are shared, and a row writes only past its
prompt). Blocks nobody references but the prefix cache keeps stay cached, least recently used
first to be evicted when a block is needed. A new adapter version has a new ref, so it can never
reuse an old version's blocks.

Attention. :func:`paged_attention` is registered with transformers' attention interface under
``lorafleet_paged``; the model's own attention modules call it after projecting and rotating
queries and keys, and :class:`PagedCacheView` (the ``past_key_values`` of a paged forward) writes
the new keys and values into their slots. A paged forward packs every row's new tokens into the
batch dimension (``[tokens, 1]``, one token per batch row, so per-row LoRA hooks see one token per
row) and :class:`ForwardPlan` says which query tokens belong to which row and where that row's
keys live. Each row attends to its own tokens only (no padding is computed, stored or masked);
a prefill chunk is causal with its offset. Forwards without a plan (scoring, P-tuning KV) fall
through to transformers' SDPA attention.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Cache

ATTENTION = "lorafleet_paged"
"""The name of :func:`paged_attention` in transformers' attention interface."""

_registered = False


def register_attention() -> None:
    """Register :func:`paged_attention` (and SDPA's mask builder for plan-less forwards), once."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, paged_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    _registered = True


def use_paged_attention(model: torch.nn.Module) -> None:
    """Point every config of ``model`` (and its sub-modules' configs) at the paged attention."""
    register_attention()
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "_attn_implementation"):
            seen.add(id(config))
            config._attn_implementation = ATTENTION


@dataclass
class Segment:
    """One row's part of a paged forward: query tokens ``q0:q1`` of the packed batch, at positions
    ``start .. start + (q1 - q0) - 1`` of the row; ``table`` is the row's block table (covering
    at least ``start + q1 - q0`` tokens). ``runs`` (slot ranges holding the row's keys in order)
    and ``mask`` (causal with the chunk's offset; None for one query) are worked out once per
    forward by :meth:`prepare`, not per layer."""

    q0: int
    q1: int
    start: int
    table: list[int]
    runs: list[tuple[int, int]] = field(default_factory=list)
    mask: torch.Tensor | None = None

    def prepare(self, block_size: int, device: torch.device) -> None:
        total = self.start + self.q1 - self.q0
        runs: list[tuple[int, int]] = []
        for b in self.table[: -(-total // block_size)]:
            if runs and runs[-1][1] == b * block_size:
                runs[-1] = (runs[-1][0], (b + 1) * block_size)
            else:
                runs.append((b * block_size, (b + 1) * block_size))
        excess = sum(e - s for s, e in runs) - total  # the last block's unused slots
        runs[-1] = (runs[-1][0], runs[-1][1] - excess)
        self.runs = runs
        n = self.q1 - self.q0
        if n > 1:
            cols = torch.arange(total, device=device)
            rows = torch.arange(self.start, total, device=device)
            self.mask = cols[None, :] <= rows[:, None]


@dataclass
class ForwardPlan:
    """What a paged forward writes and reads: each new token's slot, and each row's segment."""

    cache: KvBlocks
    slot_mapping: torch.Tensor
    segments: list[Segment]
    calls: int = 0  # attention calls made (checked by the engine's probe)
    # Decoding rows of similar lengths attended in one call (see ``_group_decode``), and the rest.
    decode_group: _DecodeGroup | None = None
    alone: list[Segment] = field(default_factory=list)

    def __post_init__(self) -> None:
        for seg in self.segments:
            seg.prepare(self.cache.block_size, self.cache.device)
        self.decode_group, self.alone = _group_decode(self.segments, self.cache)


@dataclass
class _DecodeGroup:
    """Decoding rows attended together: ``slots`` ``[rows * width]`` (a row's keys, then repeats of
    its first slot up to ``width``), ``mask`` ``[rows, 1, 1, width]``, ``queries`` their positions."""

    slots: torch.Tensor
    mask: torch.Tensor
    queries: torch.Tensor
    width: int


DECODE_GROUP_MIN_ROWS = 4
DECODE_GROUP_MAX_WASTE = 0.5
DECODE_GROUP_MAX_ROW_BYTES = 128 * 1024
"""Decoding rows share one attention call when at least ``DECODE_GROUP_MIN_ROWS`` decode, each
row's keys per layer are at most ``DECODE_GROUP_MAX_ROW_BYTES`` and padding to the longest would be
at most ``DECODE_GROUP_MAX_WASTE`` of the keys read; else each row reads its own keys (a view of
its blocks) alone. One call per row costs a fixed overhead that dominates when rows hold few keys
(short contexts of small models); the grouped call copies every row's keys and reads padding,
which dominates for long or wide ones."""


def _group_decode(segments: list[Segment], cache: KvBlocks) -> tuple[_DecodeGroup | None, list[Segment]]:
    decode = [seg for seg in segments if seg.q1 - seg.q0 == 1]
    if len(decode) < DECODE_GROUP_MIN_ROWS:
        return None, segments
    lengths = [seg.start + 1 for seg in decode]
    width = max(lengths)
    row_bytes = width * cache.kv_heads * cache.head_dim * torch.empty((), dtype=cache.dtype).element_size()
    if row_bytes > DECODE_GROUP_MAX_ROW_BYTES or len(decode) * width * (1 - DECODE_GROUP_MAX_WASTE) > sum(
        lengths
    ):
        return None, segments
    slots = torch.empty(len(decode), width, dtype=torch.long)
    mask = torch.zeros(len(decode), width, dtype=torch.bool)
    for i, (seg, n) in enumerate(zip(decode, lengths, strict=True)):
        row = torch.cat([torch.arange(a, b) for a, b in seg.runs])
        slots[i, :n] = row
        slots[i, n:] = row[0]
        mask[i, :n] = True
    device = cache.device
    group = _DecodeGroup(
        slots.view(-1).to(device),
        mask[:, None, None, :].to(device),
        torch.tensor([seg.q0 for seg in decode], device=device),
        width,
    )
    return group, [seg for seg in segments if seg.q1 - seg.q0 != 1]


class PagedCacheView(Cache):
    """The ``past_key_values`` of a paged forward: writes each layer's new keys and values into
    their slots (a transformers ``Cache`` for the model code; it holds no tensors itself)."""

    def __init__(self, plan: ForwardPlan) -> None:  # no Cache.__init__: no per-layer tensors
        self.plan = plan
        self.layers: list[Any] = []

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # [tokens, kv_heads, 1, head_dim]: one token per batch row
        blocks = self.plan.cache
        index = self.plan.slot_mapping
        blocks.keys[layer_idx].index_copy_(1, index, key_states[:, :, 0].transpose(0, 1).to(blocks.dtype))
        blocks.values[layer_idx].index_copy_(1, index, value_states[:, :, 0].transpose(0, 1).to(blocks.dtype))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over the block cache for a paged forward; SDPA for any other forward.

    ``query`` is ``[tokens, heads, 1, head_dim]``; returns ``[tokens, 1, heads, head_dim]``.
    """
    plan: ForwardPlan | None = kwargs.pop("paged", None)
    if plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if getattr(module, "sliding_window", None) or kwargs.get("sliding_window"):
        raise NotImplementedError("sliding-window attention is not supported by the paged KV cache")
    layer = int(getattr(module, "layer_idx", 0))
    plan.calls += 1
    q = query[:, :, 0].transpose(0, 1)  # [heads, tokens, head_dim]
    out = torch.empty_like(q)
    blocks = plan.cache
    all_keys, all_values = blocks.keys[layer], blocks.values[layer]
    gqa = all_keys.shape[0] != q.shape[0]
    group = plan.decode_group
    if group is not None:  # decoding rows of similar lengths: one call, padding masked
        rows = group.queries.numel()
        kv_heads, head_dim = all_keys.shape[0], all_keys.shape[2]
        keys = all_keys.index_select(1, group.slots).view(kv_heads, rows, group.width, head_dim)
        values = all_values.index_select(1, group.slots).view(kv_heads, rows, group.width, head_dim)
        o = F.scaled_dot_product_attention(
            q.index_select(1, group.queries).transpose(0, 1).unsqueeze(2),  # [rows, heads, 1, dim]
            keys.transpose(0, 1).to(q.dtype),
            values.transpose(0, 1).to(q.dtype),
            attn_mask=group.mask,
            scale=scaling,
            enable_gqa=gqa,
        )
        out.index_copy_(1, group.queries, o[:, :, 0].transpose(0, 1))
    for seg in plan.alone:
        if len(seg.runs) == 1:  # the row's blocks are contiguous: a view, no copy
            a, b = seg.runs[0]
            keys, values = all_keys[:, a:b], all_values[:, a:b]
        else:
            keys = torch.cat([all_keys[:, a:b] for a, b in seg.runs], dim=1)
            values = torch.cat([all_values[:, a:b] for a, b in seg.runs], dim=1)
        o = F.scaled_dot_product_attention(
            q[None, :, seg.q0 : seg.q1],
            keys[None].to(q.dtype),
            values[None].to(q.dtype),
            attn_mask=seg.mask,
            scale=scaling,
            enable_gqa=gqa,
        )
        out[:, seg.q0 : seg.q1] = o[0]
    return out.transpose(0, 1).unsqueeze(1), None


def _hash_block(parent: bytes, key: str, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(key.encode())
    h.update(b"\0")
    h.update(",".join(map(str, tokens)).encode())
    return h.digest()


@dataclass
class PrefixStats:
    """Prefix-cache counters, in tokens: looked up (``queries``) and found cached (``hits``)."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0


@dataclass
class KvBlocks:
    """The block pool: storage, allocation with reference counts, and the prefix cache.

    Args:
        layers / kv_heads / head_dim: the base's KV shape (``prompt_adapters.KvLayout``).
        num_blocks: blocks in the budget.
        block_size: tokens per block.
        dtype / device: the storage's.
        prefix_caching: register and reuse full prompt blocks.
    """

    layers: int
    kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    prefix_caching: bool = True
    keys: list[torch.Tensor] = field(init=False)
    values: list[torch.Tensor] = field(init=False)
    stats: PrefixStats = field(init=False, default_factory=PrefixStats)

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(
                f"num_blocks and block_size must be >= 1, got {self.num_blocks}, {self.block_size}"
            )
        shape = (self.kv_heads, self.num_blocks * self.block_size, self.head_dim)
        self.keys = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        self.values = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        self._free: list[int] = list(range(self.num_blocks))  # a heap (lowest first); may hold stale ids
        self._is_free = [True] * self.num_blocks
        self._num_free = self.num_blocks
        self._refs = [0] * self.num_blocks
        self._hash_of: dict[int, bytes] = {}  # registered block -> its hash
        self._block_of: dict[bytes, int] = {}  # hash -> registered block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unreferenced; LRU first
        # Registered blocks whose keys and values are still being computed, and by whom: a request
        # sharing a prefix with one being prefilled takes its blocks at once and waits for them.
        self._writer: dict[int, int] = {}

    def free_storage(self) -> None:
        """Drop the key/value tensors (the engine is closed; nothing reads them again)."""
        self.keys, self.values = [], []

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Key plus value bytes of one cached token over every layer."""
        return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    # -- accounting ----------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Blocks that can be had now: free ones plus cached ones nobody references."""
        return self._num_free + len(self._evictable)

    @property
    def used(self) -> int:
        """Blocks referenced by some sequence."""
        return self.num_blocks - self.available

    def usage(self) -> float:
        """The fraction of the budget referenced by sequences (0..1)."""
        return self.used / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self, after: int | None = None) -> int | None:
        """One block for a sequence (reference count 1), preferring ``after + 1`` when it is free,
        else the lowest free block, else the least recently used cached block (evicted from the
        prefix cache); None when the budget is spent (every block referenced)."""
        block: int | None = None
        want = None if after is None else after + 1
        if want is not None and want < self.num_blocks and self._is_free[want]:
            block = want  # its heap entry goes stale; popping skips it
        else:
            while self._free:
                b = heapq.heappop(self._free)
                if self._is_free[b]:
                    block = b
                    break
        if block is not None:
            self._is_free[block] = False
            self._num_free -= 1
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._unregister(block)
            self.stats.evictions += 1
        else:
            return None
        if len(self._free) > 4 * self.num_blocks:  # drop stale heap entries
            self._free = [b for b in range(self.num_blocks) if self._is_free[b]]
        self._refs[block] = 1
        return block

    def release(self, table: Sequence[int], owner: int | None = None) -> None:
        """Drop one reference to each block; unreferenced blocks become free, or stay cached (and
        evictable) when the prefix cache holds them. Blocks ``owner`` was to write and did not are
        forgotten by the prefix cache (the rows waiting on them see them as orphaned)."""
        for b in table:
            self._refs[b] -= 1
            if owner is not None and self._writer.get(b) == owner:
                self._unregister(b)
                self._writer[b] = -1  # orphaned: never written
            if self._refs[b] > 0:
                continue
            self._writer.pop(b, None)
            if b in self._hash_of:
                self._evictable[b] = None
                self._evictable.move_to_end(b)
            else:
                self._is_free[b] = True
                self._num_free += 1
                heapq.heappush(self._free, b)

    def _unregister(self, block: int) -> None:
        digest = self._hash_of.pop(block, None)
        if digest is not None and self._block_of.get(digest) == block:
            del self._block_of[digest]

    # -- prefix cache --------------------------------------------------------------------------

    def block_hashes(self, key: str, tokens: Sequence[int]) -> list[bytes]:
        """The hash chain of every full block of ``tokens`` under ``key``."""
        out: list[bytes] = []
        parent = b""
        bs = self.block_size
        for i in range(len(tokens) // bs):
            parent = _hash_block(parent, key, tokens[i * bs : (i + 1) * bs])
            out.append(parent)
        return out

    def match(self, hashes: Sequence[bytes], max_blocks: int) -> list[int]:
        """Take a reference on the longest cached run of ``hashes`` (at most ``max_blocks``)."""
        found: list[int] = []
        if not self.prefix_caching:
            return found
        for digest in hashes[:max_blocks]:
            block = self._block_of.get(digest)
            if block is None:
                break
            found.append(block)
        for b in found:
            if self._refs[b] == 0:
                self._evictable.pop(b, None)
            self._refs[b] += 1
        return found

    def register(self, table: Sequence[int], hashes: Sequence[bytes], writer: int) -> None:
        """Make the full blocks ``table[i]`` findable under ``hashes[i]`` (first writer wins) while
        ``writer`` computes them; :meth:`written` marks them done."""
        if not self.prefix_caching:
            return
        for block, digest in zip(table, hashes, strict=False):
            if block in self._hash_of or digest in self._block_of:
                continue
            self._hash_of[block] = digest
            self._block_of[digest] = block
            self._writer[block] = writer

    def written(self, table: Sequence[int], tokens: int) -> None:
        """The first ``tokens`` positions of ``table`` hold their keys and values now."""
        for b in table[: tokens // self.block_size]:
            if self._writer.get(b, -1) != -1:
                del self._writer[b]

    def pending(self, table: Sequence[int]) -> str | None:
        """None when every block of ``table`` is written; ``"wait"`` while some are being computed;
        ``"orphaned"`` when one will never be (its writer left first)."""
        state = None
        for b in table:
            writer = self._writer.get(b)
            if writer == -1:
                return "orphaned"
            if writer is not None:
                state = "wait"
        return state

    def count_lookup(self, tokens: int, hit: int) -> None:
        self.stats.queries += tokens
        self.stats.hits += hit

    # -- reading -------------------------------------------------------------------------------

    def write(
        self, layer: int, table: Sequence[int], start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Write ``[kv_heads, n, head_dim]`` keys/values at a row's positions ``start ..``."""
        slots = self.slots(table, start, keys.shape[1])
        self.keys[layer].index_copy_(1, slots, keys.to(self.dtype))
        self.values[layer].index_copy_(1, slots, values.to(self.dtype))

    def slots(self, table: Sequence[int], start: int, n: int) -> torch.Tensor:
        """The slot ids of a row's positions ``start .. start + n - 1``."""
        pos = torch.arange(start, start + n)
        blocks = torch.tensor(list(table), dtype=torch.long)[pos // self.block_size]
        return (blocks * self.block_size + pos % self.block_size).to(self.device)


__all__ = [
    "ATTENTION",
    "ForwardPlan",
    "KvBlocks",
    "PagedCacheView",
    "PrefixStats",
    "Segment",
    "paged_attention",
    "register_attention",
    "use_paged_attention",
]
