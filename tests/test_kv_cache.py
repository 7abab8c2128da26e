"""The engine's paged KV cache (``services.inference.kv_cache``, ``paged_batch``): parity with
PeftModel at mixed prompt lengths with chunked prefill on and off, prefix reuse that never crosses
adapters or versions, and a memory budget under which every request completes.

The reference for each request is a plain ``PeftModel`` with only that request's adapter, run on the
prompt alone (``tests.inference_utils.References``), as in ``test_inference_engine.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from services.inference.engine import Engine
from services.inference.kv_cache import KvBlocks
from services.inference.lora_batch import AdapterWeights, adapter_weights_from_peft_dir
from services.inference.requests import EngineObserver, GenerationRequest
from services.inference.sampling import SamplingParams
from tests.inference_utils import ADAPTERS, References, load_base

TIMEOUT = 120.0
LENGTHS = (3, 17, 64, 150, 301)


@pytest.fixture(scope="module")
def long_prompts(prompts: list[list[int]]) -> list[list[int]]:
    """Prompts of very different lengths: real text tokens, repeated and varied (vocab 1200)."""
    pool = [t for p in prompts for t in p]
    out = []
    for i, n in enumerate(LENGTHS):
        out.append([pool[(i * 7 + j * 3) % len(pool)] for j in range(n)])
    return out


def weights(
    engine: Engine, adapter_dirs: dict[str, Path], name: str, ref: str | None = None
) -> AdapterWeights:
    return adapter_weights_from_peft_dir(adapter_dirs[name], ref or f"{name}@1", engine.model)


class Recorder(EngineObserver):
    """Records each iteration's batch size and prompt tokens, and the KV usage after it."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []
        self.kv: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def on_step(self, batch_size: int, adapters_in_batch: int, prefill_tokens: int, seconds: float) -> None:
        with self.lock:
            self.steps.append((batch_size, prefill_tokens))

    def on_kv_cache(self, used: int, total: int, prefix_query_tokens: int, prefix_hit_tokens: int) -> None:
        with self.lock:
            self.kv.append((used, total))


def greedy(max_new: int = 12, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, **kwargs)


@pytest.mark.parametrize("chunk", [7, 4096], ids=["chunked", "whole"])
def test_mixed_adapters_and_lengths_equal_peft(
    make_engine: Callable[..., Engine],
    adapter_dirs: dict[str, Path],
    long_prompts: list[list[int]],
    refs: References,
    chunk: int,
) -> None:
    """Every adapter and the base, prompts from 3 to 301 tokens, submitted together: each request's
    greedy tokens equal PeftModel's alone, with prompts prefilled 7 tokens per iteration or whole."""
    rec = Recorder()
    engine = make_engine(num_slots=4, max_rank=16, max_prefill_tokens=chunk, observer=rec, start=False)
    assert engine.stats()["kv_cache"]["layout"] == "paged"
    loaded = {n: weights(engine, adapter_dirs, n) for n in ADAPTERS}
    names: list[str | None] = [*ADAPTERS, None]
    plan = [(names[(i + k) % len(names)], p) for i, p in enumerate(long_prompts) for k in (0, 2)]
    handles = [
        engine.submit(GenerationRequest(p, adapter=None if n is None else loaded[n], params=greedy()))
        for n, p in plan
    ]
    engine.start()
    for (name, prompt), handle in zip(plan, handles, strict=True):
        assert handle.result(TIMEOUT).token_ids == refs.tokens(name, prompt), (
            f"adapter {name}, {len(prompt)} tokens"
        )
    prefills = [tokens for _, tokens in rec.steps if tokens]
    assert max(prefills) <= chunk
    if chunk == 7:
        assert len(prefills) >= sum(len(p) for _, p in plan) // 7
        # decoding rows shared forwards with prompt chunks of rows still prefilling
        assert any(size > 1 and tokens for size, tokens in rec.steps)


def test_nf4_base_with_chunked_prefill_equals_peft(
    make_engine: Callable[..., Engine],
    adapter_dirs: dict[str, Path],
    long_prompts: list[list[int]],
    nf4_refs: References,
) -> None:
    engine = make_engine("nf4", num_slots=4, max_rank=16, max_prefill_tokens=11, start=False)
    loaded = {n: weights(engine, adapter_dirs, n) for n in ("a", "b")}
    plan: list[tuple[str | None, list[int]]] = [
        ("a", long_prompts[3]),
        ("b", long_prompts[1]),
        (None, long_prompts[2]),
    ]
    handles = [
        engine.submit(GenerationRequest(p, adapter=None if n is None else loaded[n], params=greedy()))
        for n, p in plan
    ]
    engine.start()
    for (name, prompt), handle in zip(plan, handles, strict=True):
        assert handle.result(TIMEOUT).token_ids == nf4_refs.tokens(name, prompt), f"adapter {name}"


def test_padded_layout_gives_the_same_tokens(
    make_engine: Callable[..., Engine],
    adapter_dirs: dict[str, Path],
    long_prompts: list[list[int]],
    refs: References,
) -> None:
    engine = make_engine(num_slots=2, max_rank=16, kv_cache="padded", start=False)
    assert engine.stats()["kv_cache"]["layout"] == "padded"
    loaded = weights(engine, adapter_dirs, "b")
    plan = [("b", long_prompts[0]), (None, long_prompts[3]), ("b", long_prompts[4])]
    handles = [
        engine.submit(GenerationRequest(p, adapter=None if n is None else loaded, params=greedy()))
        for n, p in plan
    ]
    engine.start()
    for (name, prompt), handle in zip(plan, handles, strict=True):
        assert handle.result(TIMEOUT).token_ids == refs.tokens(name, prompt)


def test_a_long_prompt_does_not_stall_a_running_stream(
    make_engine: Callable[..., Engine], long_prompts: list[list[int]], refs: References
) -> None:
    """A 301-token prompt arriving while a row decodes is prefilled 16 tokens per iteration, each
    chunk in the same forward as the running row's next token."""
    rec = Recorder()
    engine = make_engine(max_prefill_tokens=16, observer=rec)
    short = engine.submit(GenerationRequest(long_prompts[0], params=greedy(40, ignore_eos=True)))
    while not short.token_ids:  # the short row is decoding
        threading.Event().wait(0.005)
    long = engine.submit(GenerationRequest(long_prompts[4], params=greedy()))
    assert long.result(TIMEOUT).token_ids == refs.tokens(None, long_prompts[4])
    assert len(short.result(TIMEOUT).token_ids) == 40
    chunks = [(size, tokens) for size, tokens in rec.steps if tokens]
    assert all(tokens <= 16 for _, tokens in chunks)
    assert len(chunks) >= 301 // 16
    # while the short row still ran, every prompt chunk rode along with its decode token
    assert sum(1 for size, _ in chunks if size == 2) >= 5


def test_prefix_reuse_stays_within_one_adapter_version(
    make_engine: Callable[..., Engine],
    adapter_dirs: dict[str, Path],
    long_prompts: list[list[int]],
    refs: References,
) -> None:
    """A 64-token shared prefix: the same adapter version reuses its blocks; another adapter, the
    base, or a new version of the same adapter compute their own (and still equal PeftModel). If
    the adapter ref left the cache key, adapter ``b`` (which adapts k/v) would read ``a``'s keys
    and values and its tokens would differ."""
    engine = make_engine(num_slots=4, max_rank=16, kv_block_size=16)
    shared = long_prompts[3][:64]
    turns = [shared + long_prompts[0], shared + long_prompts[1][:5], shared + long_prompts[1][5:12]]
    a1 = weights(engine, adapter_dirs, "a", "a@1")
    b1 = weights(engine, adapter_dirs, "b", "b@1")
    a2 = weights(engine, adapter_dirs, "b", "a@2")  # a new version of "a" (other weights)

    def run(adapter: AdapterWeights | None, prompt: list[int], expect: str | None) -> int:
        before = engine.stats()["kv_cache"]["prefix_hit_tokens"]
        result = engine.generate(GenerationRequest(prompt, adapter=adapter, params=greedy()), TIMEOUT)
        assert result.token_ids == refs.tokens(expect, prompt)
        return int(engine.stats()["kv_cache"]["prefix_hit_tokens"] - before)

    assert run(a1, turns[0], "a") == 0  # nothing cached yet
    assert run(a1, turns[1], "a") == 64  # same adapter version: the 4 shared blocks
    assert run(b1, turns[1], "b") == 0  # another adapter
    assert run(None, turns[2], None) == 0  # the base
    assert run(a2, turns[2], "b") == 0  # a new version of the same adapter
    assert run(b1, turns[2], "b") == 64  # b's own blocks now


def test_block_hashes_depend_on_the_key_and_every_earlier_token() -> None:
    blocks = KvBlocks(1, 1, 4, 8, 4, torch.float32, torch.device("cpu"))
    tokens = list(range(12))
    a = blocks.block_hashes("a@1#x", tokens)
    assert len(a) == 3
    assert blocks.block_hashes("a@2#y", tokens) != a
    assert blocks.block_hashes("", tokens)[0] != a[0]
    changed = blocks.block_hashes("a@1#x", [99, *tokens[1:]])
    assert all(x != y for x, y in zip(changed, a, strict=True))  # a chain: later blocks differ too
    table = [blocks.allocate() for _ in range(3)]
    assert None not in table
    blocks.register(table, a, writer=1)  # type: ignore[arg-type]
    assert blocks.match(blocks.block_hashes("b@1#z", tokens), 3) == []
    assert blocks.match(a, 2) == table[:2]


def test_grouped_decode_attention_equals_one_call_per_row() -> None:
    """Decoding rows with few keys share one masked attention call; it must equal the per-row
    calls (and a prefill chunk in the same forward still goes alone)."""
    from services.inference.kv_cache import ForwardPlan, Segment, paged_attention

    torch.manual_seed(0)
    blocks = KvBlocks(1, 2, 8, num_blocks=64, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    blocks.keys[0].normal_()
    blocks.values[0].normal_()
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(6)]  # 6 rows of up to 12 tokens
    lengths = [9, 12, 7, 10, 11]
    segments = [Segment(i, i + 1, n - 1, tables[i]) for i, n in enumerate(lengths)]
    segments.append(Segment(5, 9, 4, [40, 41]))  # a 4-token prefill chunk after 4 cached tokens
    plan = ForwardPlan(blocks, torch.arange(9), segments)
    assert plan.decode_group is not None and [s.q0 for s in plan.alone] == [5]
    module = torch.nn.Module()
    module.layer_idx = 0  # type: ignore[assignment]
    query = torch.randn(9, 4, 1, 8)  # 4 query heads over 2 key/value heads (GQA)
    grouped, _ = paged_attention(module, query, query, query, None, scaling=0.3, paged=plan)
    plan.decode_group, plan.alone = None, segments
    alone, _ = paged_attention(module, query, query, query, None, scaling=0.3, paged=plan)
    torch.testing.assert_close(grouped, alone)
    long_rows = [Segment(i, i + 1, 900 * (i % 2), [0] * 60) for i in range(5)]
    assert ForwardPlan(blocks, torch.arange(5), long_rows).decode_group is None  # mostly padding


def test_prefill_budget_is_shared_shortest_first_without_starving_the_oldest() -> None:
    from services.inference.paged_batch import _share_prefill

    class Row:
        def __init__(self, remaining: int) -> None:
            self.feed, self.fed = [0] * remaining, 0

    oldest, long, short, tiny = Row(900), Row(600), Row(40), Row(5)
    rows: list[Any] = [oldest, long, short, tiny]
    assert [n for _, n in _share_prefill(rows, 512)] == [128, 339, 40, 5]  # 128 = a quarter
    assert [n for _, n in _share_prefill([oldest, tiny], 512)] == [507, 5]  # the rest goes back
    assert [n for _, n in _share_prefill([tiny, oldest], 512)] == [5, 507]
    assert _share_prefill([], 512) == []


def test_allocation_release_eviction_and_budget() -> None:
    blocks = KvBlocks(2, 2, 4, num_blocks=4, block_size=2, dtype=torch.float32, device=torch.device("cpu"))
    t = [blocks.allocate(), blocks.allocate(0), blocks.allocate(1)]
    assert t == [0, 1, 2]  # contiguous runs when the next block is free
    blocks.register(t[:2], blocks.block_hashes("k", [1, 2, 3, 4]), writer=1)  # type: ignore[arg-type]
    blocks.written(t, 4)  # type: ignore[arg-type]
    blocks.release(t)  # blocks 0 and 1 stay cached (evictable), 2 is free again
    assert blocks.used == 0 and blocks.available == 4
    assert blocks.match(blocks.block_hashes("k", [1, 2, 3, 4, 5]), 2) == [0, 1]
    assert blocks.used == 2
    blocks.release([0, 1])
    got = [blocks.allocate() for _ in range(4)]
    assert sorted(got) == [0, 1, 2, 3]  # free blocks first, then cached ones evicted
    assert blocks.allocate() is None  # the budget is spent
    assert blocks.stats.evictions == 2
    assert blocks.match(blocks.block_hashes("k", [1, 2, 3, 4]), 2) == []  # evicted: forgotten


def test_blocks_being_computed_are_shared_and_orphans_are_told() -> None:
    blocks = KvBlocks(1, 1, 4, num_blocks=8, block_size=2, dtype=torch.float32, device=torch.device("cpu"))
    hashes = blocks.block_hashes("k", [1, 2, 3, 4, 5])
    owner = [blocks.allocate(), blocks.allocate(0), blocks.allocate(1)]
    blocks.register(owner[:2], hashes, writer=7)  # type: ignore[arg-type]
    shared = blocks.match(hashes, 2)
    assert shared == owner[:2] and blocks.pending(shared) == "wait"
    blocks.written(owner, 2)  # type: ignore[arg-type]  # the first block is computed
    assert blocks.pending(shared[:1]) is None and blocks.pending(shared) == "wait"
    blocks.release(owner, owner=7)  # type: ignore[arg-type]  # the writer leaves before the second
    assert blocks.pending(shared) == "orphaned"
    assert blocks.match(hashes, 2) == shared[:1]  # an orphan is never matched again
    blocks.release(shared)
    blocks.release(shared[:1])
    assert blocks.used == 0


def test_requests_arriving_together_share_a_prefix_being_computed(
    make_engine: Callable[..., Engine],
    adapter_dirs: dict[str, Path],
    long_prompts: list[list[int]],
    refs: References,
) -> None:
    """Four requests per adapter with one 150-token system prompt, all submitted at once: the first
    of each adapter computes the prefix and the others wait for its blocks instead of recomputing
    them; tokens still equal PeftModel's."""
    engine = make_engine(num_slots=4, max_rank=16, max_prefill_tokens=64, start=False)
    shared = long_prompts[3]
    loaded = {n: weights(engine, adapter_dirs, n) for n in ("a", "b")}
    plan = [(n, shared + long_prompts[1][i : i + 3 + i]) for n in ("a", "b") for i in range(4)]
    handles = [engine.submit(GenerationRequest(p, adapter=loaded[n], params=greedy())) for n, p in plan]
    engine.start()
    for (name, prompt), handle in zip(plan, handles, strict=True):
        assert handle.result(TIMEOUT).token_ids == refs.tokens(name, prompt)
    assert engine.stats()["kv_cache"]["prefix_hit_tokens"] == 2 * 3 * 144  # 9 full blocks, 3 waiters each


def test_a_small_budget_completes_everything_by_waiting_and_preempting(
    make_engine: Callable[..., Engine], adapter_dirs: dict[str, Path], long_prompts: list[list[int]]
) -> None:
    """A KV budget of one ``max_context`` sequence (512 tokens, 32 blocks), eight 150-token prompts
    generating 80 tokens each: three prompts fit at admission, their growth does not, so requests
    wait for blocks, rows are preempted and recomputed, and every request completes with the tokens
    an unconstrained engine gives. Usage never exceeds the budget."""
    free = make_engine(num_slots=2, max_rank=16, max_context=512, start=False)
    layout = free.kv_layout
    assert layout is not None
    per_token = KvBlocks.bytes_per_token(layout.layers, layout.kv_heads, layout.head_dim, torch.float32)
    budget_mb = 512 * per_token / 2**20
    rec = Recorder()
    tight = make_engine(
        num_slots=2, max_rank=16, max_context=512, kv_cache_mb=budget_mb, observer=rec, start=False
    )
    assert tight.stats()["kv_cache"]["budget_bytes"] <= budget_mb * 2**20
    plan = [(long_prompts[4][i : i + 150], "a" if i % 2 else None) for i in range(8)]
    out = []
    for engine in (free, tight):
        loaded = weights(engine, adapter_dirs, "a")
        handles = [
            engine.submit(
                GenerationRequest(p, adapter=loaded if n else None, params=greedy(80, ignore_eos=True))
            )
            for p, n in plan
        ]
        engine.start()
        out.append([h.result(TIMEOUT).token_ids for h in handles])
        assert all(h.finish_reason == "length" for h in handles)
    assert out[1] == out[0]
    assert tight.stats()["preemptions"] > 0
    assert rec.kv and all(used <= total for used, total in rec.kv)
    assert max(used for used, _ in rec.kv) >= rec.kv[0][1] - 1  # the budget was in fact filled
    assert min(total for _, total in rec.kv) == 512 // 16  # one max_context sequence of blocks


def test_a_budget_below_one_sequence_is_refused(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match=r"kv_cache_mb=0\.01 holds .* max_context=1024"):
        Engine(load_base(tiny_llama), kv_cache_mb=0.01, start=False)


def test_an_alibi_model_falls_back_to_the_padded_layout(tmp_path: Path) -> None:
    """BLOOM computes ALiBi attention itself (not through transformers' attention interface): the
    engine serves it on the padded layout, with the same greedy tokens as ``generate``."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=300, hidden_size=32, n_layer=2, n_head=4)).eval()
    prompt = [5, 17, 42, 7, 99]
    expected = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=6,
        do_sample=False,
        attention_mask=torch.ones(1, 5, dtype=torch.long),
    )[0, 5:].tolist()
    with Engine(model, max_context=128) as engine:
        assert engine.stats()["kv_cache"]["layout"] == "padded"
        got = engine.generate(GenerationRequest(prompt, params=greedy(6, ignore_eos=True)), TIMEOUT)
    assert got.token_ids == expected
