"""The continuous-batching multi-adapter engine (``services.inference.engine``) and its batched LoRA
(``services.inference.lora_batch``), against plain PEFT on real PEFT adapters.

The reference for every request is what a plain ``PeftModel`` holding only that request's adapter
(or the plain base model) generates for that prompt alone: no batch, no padding. The engine must
produce the same greedy tokens while rows of different adapters, ranks and target modules, base
rows, prompts of different lengths, and rows joining and leaving between decode steps share one
forward.

Joins and cancellations are driven from the engine's own ``on_step`` hook (it runs on the loop
thread between decode steps), so "request X joins while Y is at step 3" is deterministic, not a race
with the decode loop.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedConfig

from services.inference.engine import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    Engine,
    EngineClosed,
    EngineObserver,
    GenerationRequest,
    PromptTooLong,
    QueueFull,
    RequestHandle,
    SamplingParams,
)
from services.inference.lora_batch import AdapterWeights, LoraSlots, adapter_weights_from_peft_dir
from tests.inference_utils import greedy_tokens, load_base, peft_model, save_lora_adapter

MAX_NEW = 12
TIMEOUT = 60.0

# name -> (rank, target modules, seed): different ranks and different layers, so padded ranks and
# rows whose adapter does not touch a layer are both exercised.
ADAPTERS: dict[str, tuple[int, tuple[str, ...], int]] = {
    "a": (4, ("q_proj", "v_proj"), 1),
    "b": (8, ("q_proj", "k_proj", "v_proj", "o_proj"), 2),
    "c": (12, ("down_proj", "up_proj"), 3),
    "d": (8, ("q_proj", "v_proj", "gate_proj", "down_proj"), 4),
}
TEXTS = [
    "Hello",
    "The patient reports a headache and",
    "患者主诉头痛三天，伴有恶心",
    "Question: what is the diagnosis? Answer:",
    "A much longer prompt, so that left padding in the prefill batch is substantial: the quick brown fox",
    "发热",
]


# ---------------------------------------------------------------------------------------------
# Fixtures: adapters, prompts and reference generations, made once per module


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: save_lora_adapter(tiny_llama, root / name, rank=rank, targets=targets, seed=seed)
        for name, (rank, targets, seed) in ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_llama))


@pytest.fixture(scope="module")
def prompts(tokenizer: Any) -> list[list[int]]:
    out = [list(tokenizer.encode(t, add_special_tokens=True)) for t in TEXTS]
    assert len({len(p) for p in out}) >= 4, "prompts must have different lengths"
    return out


@pytest.fixture(scope="module")
def eos_id(tiny_llama: Path) -> int:
    base = load_base(tiny_llama)
    eos = base.generation_config.eos_token_id
    assert isinstance(eos, int)
    return eos


class References:
    """Greedy tokens of a plain PeftModel per (adapter, prompt), computed lazily and cached."""

    def __init__(self, base_dir: Path, adapter_dirs: dict[str, Path], quantization: str, eos_id: int) -> None:
        self.base_dir, self.adapter_dirs, self.quantization, self.eos_id = (
            base_dir,
            adapter_dirs,
            quantization,
            eos_id,
        )
        self._models: dict[str | None, Any] = {}
        self._cache: dict[tuple[str | None, tuple[int, ...], int], list[int]] = {}

    def model(self, adapter: str | None) -> Any:
        if adapter not in self._models:
            base = load_base(self.base_dir, quantization=self.quantization)
            self._models[adapter] = (
                base if adapter is None else peft_model(base, {adapter: self.adapter_dirs[adapter]})
            )
        return self._models[adapter]

    def tokens(self, adapter: str | None, prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
        key = (adapter, tuple(prompt), max_new)
        if key not in self._cache:
            self._cache[key] = greedy_tokens(self.model(adapter), prompt, max_new, self.eos_id)
        return self._cache[key]


@pytest.fixture(scope="module")
def refs(tiny_llama: Path, adapter_dirs: dict[str, Path], eos_id: int) -> References:
    return References(tiny_llama, adapter_dirs, "none", eos_id)


def weights_for(
    model: Any, adapter_dirs: dict[str, Path], name: str, ref: str | None = None
) -> AdapterWeights:
    return adapter_weights_from_peft_dir(adapter_dirs[name], ref or f"{name}@1", model)


class StepHook(EngineObserver):
    """Runs scheduled actions on the engine's loop thread after decode step N (1-based) and records
    the batch shapes it saw."""

    def __init__(self) -> None:
        self.steps = 0
        self.actions: dict[int, list[Callable[[], None]]] = {}
        self.batch_sizes: list[int] = []
        self.adapters_in_batch: list[int] = []
        self.errors: list[BaseException] = []

    def at(self, step: int, action: Callable[[], None]) -> None:
        self.actions.setdefault(step, []).append(action)

    def on_step(self, batch_size: int, adapters_in_batch: int, prefill_tokens: int, seconds: float) -> None:
        self.steps += 1
        self.batch_sizes.append(batch_size)
        self.adapters_in_batch.append(adapters_in_batch)
        for action in self.actions.pop(self.steps, []):
            try:
                action()
            except BaseException as e:  # surfaced by the test, not swallowed by the engine's logger
                self.errors.append(e)


@pytest.fixture
def make_engine(tiny_llama: Path) -> Iterator[Callable[..., Engine]]:
    """Engines over fresh base copies (the engine hooks its model in place); closed at teardown."""
    engines: list[Engine] = []

    def make(quantization: str = "none", tokenizer: Any = None, **kwargs: Any) -> Engine:
        engine = Engine(load_base(tiny_llama, quantization=quantization), tokenizer, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def greedy(max_new: int = MAX_NEW, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, **kwargs)


# ---------------------------------------------------------------------------------------------
# (a) fp32 parity in one mixed batch


@pytest.mark.parametrize("lora_mode", ["group", "gather", "stack"])
def test_mixed_batch_matches_peft_per_adapter(
    make_engine: Callable[..., Engine],
    adapter_dirs: dict[str, Path],
    prompts: list[list[int]],
    refs: References,
    lora_mode: str,
) -> None:
    """Four adapters (ranks 4/8/12/8, different target layers) and base rows, prompts of six
    lengths, all submitted together: every request's tokens equal PeftModel's with its adapter
    alone. ``gather`` pads every adapter to ``max_rank`` and runs batched matmuls, so it is checked
    too (on this model its float rounding does not change any greedy pick)."""
    hook = StepHook()
    engine = make_engine(num_slots=4, max_rank=16, lora_mode=lora_mode, observer=hook, start=False)
    weights = {n: weights_for(engine.model, adapter_dirs, n) for n in ADAPTERS}
    plan: list[tuple[str | None, list[int]]] = []
    names: list[str | None] = [*ADAPTERS, None]
    for i, prompt in enumerate(prompts):
        plan.append((names[i % len(names)], prompt))
        plan.append((names[(i + 2) % len(names)], prompt))
    handles = [
        engine.submit(GenerationRequest(p, adapter=None if n is None else weights[n], params=greedy()))
        for n, p in plan
    ]
    engine.start()  # everything was queued before the loop ran: one prefill, one mixed batch
    for (name, prompt), handle in zip(plan, handles, strict=True):
        result = handle.result(TIMEOUT)
        assert result.token_ids == refs.tokens(name, prompt), f"adapter {name} prompt {prompt[:4]}..."
        assert result.finish_reason in (FINISH_LENGTH, FINISH_STOP)
        assert result.prompt_tokens == len(prompt)
    assert max(hook.batch_sizes) == len(plan)
    assert max(hook.adapters_in_batch) == len(ADAPTERS)  # all adapters decoded in the same forward
    assert engine.stats()["prefills"] == 1


def test_base_rows_unchanged_by_lora_hooks(
    make_engine: Callable[..., Engine], prompts: list[list[int]], refs: References
) -> None:
    """Base-only traffic through the engine equals the plain base model (hooks are transparent)."""
    engine = make_engine(num_slots=2, max_rank=8)
    handles = [engine.submit(GenerationRequest(p, params=greedy())) for p in prompts]
    for prompt, handle in zip(prompts, handles, strict=True):
        assert handle.result(TIMEOUT).token_ids == refs.tokens(None, prompt)


def test_adapter_really_changes_outputs(prompts: list[list[int]], refs: References) -> None:
    """Guards the parity tests against vacuity: the adapters' greedy tokens differ from the base's
    and from each other on these prompts."""
    outputs = {name: [tuple(refs.tokens(name, p)) for p in prompts] for name in [None, *ADAPTERS]}
    distinct = {tuple(v) for v in outputs.values()}
    assert len(distinct) == len(outputs)


# ---------------------------------------------------------------------------------------------
# (b) 4-bit nf4 parity


@pytest.fixture(scope="module")
def nf4_refs(tiny_llama: Path, adapter_dirs: dict[str, Path], eos_id: int) -> References:
    pytest.importorskip("bitsandbytes")
    return References(tiny_llama, adapter_dirs, "nf4", eos_id)


@pytest.mark.parametrize("lora_mode", ["group", "gather", "stack"])
def test_nf4_mixed_batch_matches_peft_over_nf4(
    make_engine: Callable[..., Engine],
    adapter_dirs: dict[str, Path],
    prompts: list[list[int]],
    nf4_refs: References,
    lora_mode: str,
) -> None:
    """Over a 4-bit nf4 (double-quantized) base, the engine's mixed batch gives exactly the greedy
    tokens of PeftModel over the same nf4 base. In ``group`` mode equality is by construction: both
    run the same bitsandbytes dequantize + matmul for the base layers (lorafleet.models turns off the
    avx512-bf16 repack on both), PEFT keeps the LoRA weights in float32 as the engine's slot tables
    do, the delta is the same ``F.linear`` calls, cast to the output dtype before adding as PEFT's
    ``Linear4bit`` does. ``gather`` only sums in another order (logits within 1e-4, see the next test),
    which changes no greedy pick here."""
    import bitsandbytes as bnb

    hook = StepHook()
    engine = make_engine(
        quantization="nf4", num_slots=4, max_rank=16, lora_mode=lora_mode, observer=hook, start=False
    )
    quantized = [m for m in engine.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(getattr(m.weight, "quant_type", None) == "nf4" for m in quantized)
    assert all(m.support_avx512bf16_for_cpu is False for m in quantized)
    weights = {n: weights_for(engine.model, adapter_dirs, n) for n in ("a", "b", "c")}
    plan: list[tuple[str | None, list[int]]] = [
        ("a", prompts[0]),
        ("b", prompts[1]),
        (None, prompts[2]),
        ("c", prompts[3]),
        ("a", prompts[4]),
        (None, prompts[5]),
    ]
    handles = [
        engine.submit(GenerationRequest(p, adapter=None if n is None else weights[n], params=greedy()))
        for n, p in plan
    ]
    engine.start()
    for (name, prompt), handle in zip(plan, handles, strict=True):
        assert handle.result(TIMEOUT).token_ids == nf4_refs.tokens(name, prompt), f"adapter {name}"
    assert max(hook.adapters_in_batch) == 3


@pytest.mark.parametrize("mode", ["group", "gather", "stack"])
def test_nf4_slot_delta_matches_peft_logits(
    tiny_llama: Path,
    adapter_dirs: dict[str, Path],
    prompts: list[list[int]],
    nf4_refs: References,
    mode: str,
) -> None:
    """One forward over the nf4 base, a batch of an adapter row and a base row: the adapter row's
    logits equal PeftModel's over the same nf4 base, the base row's the plain nf4 base's. ``group``
    is bitwise equal (PEFT's own operations); ``gather`` within 1e-4 (batched matmuls over padded
    ranks sum in another order; logits here are of order 10, so that is float32 rounding)."""
    base = load_base(tiny_llama, quantization="nf4")
    slots = LoraSlots(base, None, num_slots=2, max_rank=16, mode=mode)  # type: ignore[arg-type]
    slots.load(1, adapter_weights_from_peft_dir(adapter_dirs["b"], "b@1", base))
    ids = torch.tensor([prompts[1], prompts[1]])
    with torch.inference_mode():
        slots.set_rows(torch.tensor([1, -1]))
        ours = base(input_ids=ids).logits
        theirs = nf4_refs.model("b")(input_ids=ids[:1]).logits
        their_base = nf4_refs.model(None)(input_ids=ids[:1]).logits
    if mode == "group":
        assert torch.equal(ours[:1], theirs)
        assert torch.equal(ours[1:], their_base)
    else:
        assert (ours[:1] - theirs).abs().max() < 1e-4
        assert torch.equal(ours[1:], their_base)  # base rows add an exact zero
    assert (ours[0] - ours[1]).abs().max() > 1e-2  # the adapter is applied at all


# ---------------------------------------------------------------------------------------------
# (c) joining and leaving mid-batch


def test_joining_and_leaving_mid_batch_keep_outputs(
    make_engine: Callable[..., Engine],
    adapter_dirs: dict[str, Path],
    prompts: list[list[int]],
    refs: References,
) -> None:
    """Requests join the running batch at decode steps 2 and 5 (new prompts, longer than the
    running rows' cache or shorter), one is cancelled at step 4, and short ones leave early: every
    request that finishes has its reference tokens, and the cancelled one frees its slot."""
    hook = StepHook()
    engine = make_engine(num_slots=4, max_rank=16, observer=hook, start=False)
    weights = {n: weights_for(engine.model, adapter_dirs, n) for n in ADAPTERS}
    handles: dict[str, tuple[str | None, list[int], int, bool, RequestHandle]] = {}

    def submit(key: str, name: str | None, prompt: list[int], max_new: int, ignore_eos: bool = False) -> None:
        params = SamplingParams(max_new_tokens=max_new, ignore_eos=ignore_eos)
        req = GenerationRequest(prompt, adapter=None if name is None else weights[name], params=params)
        handles[key] = (name, prompt, max_new, ignore_eos, engine.submit(req))

    # The first wave: ignore_eos on the victim so it is surely still running when cancelled, and on
    # first-a so the batch surely lives past step 5.
    submit("first-a", "a", prompts[0], 16, ignore_eos=True)
    submit("first-base", None, prompts[2], 16)
    submit("short-c", "c", prompts[5], 3)  # leaves after 3 tokens while the others run
    submit("victim", "b", prompts[3], 16, ignore_eos=True)
    # Joins: at step 2 a longer prompt than anything cached (the running cache is left-padded)...
    hook.at(2, lambda: submit("join-d", "d", prompts[4], 10))
    hook.at(2, lambda: submit("join-b", "b", prompts[1], 10))
    # ... a cancellation mid-flight, and at step 5 shorter prompts (the newcomers are left-padded).
    hook.at(4, lambda: handles["victim"][-1].cancel())
    hook.at(5, lambda: submit("late-a", "a", prompts[5], 8))
    hook.at(5, lambda: submit("late-base", None, prompts[0], 8))
    engine.start()

    for key in ["first-a", "first-base", "short-c", "join-d", "join-b", "late-a", "late-base"]:
        handles["first-a"][-1].result(TIMEOUT)  # 16 steps: the scheduled joins happen before that
        assert key in handles, f"{key} was never submitted (hook errors: {hook.errors})"
        name, prompt, max_new, ignore_eos, handle = handles[key]
        expected = (
            greedy_prefix(refs, name, prompt, max_new) if ignore_eos else refs.tokens(name, prompt, max_new)
        )
        assert handle.result(TIMEOUT).token_ids == expected, key
    assert not hook.errors
    victim = handles["victim"][-1]
    assert victim.result(TIMEOUT).finish_reason == FINISH_CANCELLED
    assert 1 <= len(victim.token_ids) < 16
    # The joins really happened while earlier rows were decoding.
    first_a, join_d = handles["first-a"][-1], handles["join-d"][-1]
    assert join_d.first_token_at is not None and first_a.finished_at is not None
    assert join_d.first_token_at < first_a.finished_at
    assert engine.stats()["prefills"] == 3
    assert max(hook.adapters_in_batch) >= 3
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert all(s["users"] == 0 for s in stats["slots"])


# ---------------------------------------------------------------------------------------------
# (d) stop conditions and sampling


def test_max_new_tokens_and_eos(
    make_engine: Callable[..., Engine], prompts: list[list[int]], refs: References
) -> None:
    """``max_new_tokens`` ends with ``length``; the model's eos (from its generation config) ends
    with ``stop`` and is returned as the last token; ``ignore_eos`` runs past it."""
    prompt = prompts[1]
    reference = refs.tokens(None, prompt, 10)
    engine = make_engine(num_slots=1, max_rank=8)
    out = engine.generate(GenerationRequest(prompt, params=greedy(4)), TIMEOUT)
    assert out.token_ids == reference[:4] and out.finish_reason == FINISH_LENGTH

    # Make the 4th greedy token the model's eos (a fresh base, so the first engine is untouched).
    eos = reference[3]
    assert eos not in reference[:3]
    model = load_base(refs.base_dir)
    model.generation_config.eos_token_id = eos
    with Engine(model, num_slots=1, max_rank=8) as eos_engine:
        assert eos_engine.eos_ids == {eos}
        stopped = eos_engine.generate(GenerationRequest(prompt, params=greedy(10)), TIMEOUT)
        assert stopped.token_ids == reference[:4] and stopped.finish_reason == FINISH_STOP
        past = eos_engine.generate(GenerationRequest(prompt, params=greedy(10, ignore_eos=True)), TIMEOUT)
        assert past.token_ids == reference and past.finish_reason == FINISH_LENGTH


def test_stop_token_ids_and_stop_strings(
    make_engine: Callable[..., Engine], tokenizer: Any, prompts: list[list[int]], refs: References
) -> None:
    """A stop token ends generation after it; a stop string cuts the text before it (and the
    streamed deltas add up to the returned text)."""
    prompt = prompts[3]
    reference = refs.tokens(None, prompt, 16)
    engine = make_engine(tokenizer=tokenizer, num_slots=1, max_rank=8)
    stop_tok = reference[5]
    cut = reference.index(stop_tok) + 1
    out = engine.generate(GenerationRequest(prompt, params=greedy(16, stop_token_ids=(stop_tok,))), TIMEOUT)
    assert out.token_ids == reference[:cut] and out.finish_reason == FINISH_STOP

    full_text = tokenizer.decode(reference, skip_special_tokens=True)
    assert len(full_text) >= 8, full_text
    stop = full_text[4:7]
    expected = full_text[: full_text.index(stop)]
    handle = engine.submit(GenerationRequest(prompt, params=greedy(16, stop_strings=(stop,))))
    streamed = "".join(event.text for event in handle)
    result = handle.result(TIMEOUT)
    assert result.finish_reason == FINISH_STOP
    assert result.text == expected == streamed
    assert stop not in result.text
    assert len(result.token_ids) < len(reference)

    plain = engine.generate(GenerationRequest(prompt, params=greedy(16)), TIMEOUT)
    assert plain.text == full_text


def test_seeded_sampling_is_reproducible(
    make_engine: Callable[..., Engine],
    adapter_dirs: dict[str, Path],
    prompts: list[list[int]],
    refs: References,
) -> None:
    """The same seed gives the same sampled tokens alone or inside a busy mixed batch; another seed
    gives others; top_k=1 sampling is greedy."""
    engine = make_engine(num_slots=2, max_rank=16)
    w = weights_for(engine.model, adapter_dirs, "b")
    sampled = SamplingParams(
        max_new_tokens=16, temperature=1.5, top_p=0.95, top_k=50, seed=1234, ignore_eos=True
    )
    alone = engine.generate(GenerationRequest(prompts[1], adapter=w, params=sampled), TIMEOUT).token_ids
    noise = [
        engine.submit(
            GenerationRequest(
                p, adapter=w if i % 2 else None, params=SamplingParams(16, temperature=1.0, seed=i)
            )
        )
        for i, p in enumerate(prompts)
    ]
    busy = engine.submit(GenerationRequest(prompts[1], adapter=w, params=sampled))
    assert busy.result(TIMEOUT).token_ids == alone
    for handle in noise:
        handle.result(TIMEOUT)
    other_seed = SamplingParams(
        max_new_tokens=16, temperature=1.5, top_p=0.95, top_k=50, seed=99, ignore_eos=True
    )
    other = engine.generate(GenerationRequest(prompts[1], adapter=w, params=other_seed), TIMEOUT).token_ids
    assert other != alone
    assert alone != refs.tokens("b", prompts[1], 16)  # it really sampled
    top1 = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, top_k=1, seed=5)
    out = engine.generate(GenerationRequest(prompts[1], adapter=w, params=top1), TIMEOUT)
    assert out.token_ids == refs.tokens("b", prompts[1])


def test_repetition_penalty_and_no_repeat_ngram_match_hf(
    make_engine: Callable[..., Engine],
    adapter_dirs: dict[str, Path],
    prompts: list[list[int]],
    refs: References,
) -> None:
    """Greedy with ``repetition_penalty`` and ``no_repeat_ngram_size`` equals HF ``generate`` with the
    same processors over PeftModel, for an adapter row next to a plain greedy base row."""
    engine = make_engine(num_slots=2, max_rank=16, start=False)
    w = weights_for(engine.model, adapter_dirs, "a")
    params = SamplingParams(
        max_new_tokens=20, repetition_penalty=1.4, no_repeat_ngram_size=2, ignore_eos=True
    )
    handles = [
        engine.submit(GenerationRequest(prompts[0], adapter=w, params=params)),
        engine.submit(GenerationRequest(prompts[3], params=greedy())),
    ]
    engine.start()
    ids = torch.tensor([prompts[0]])
    with torch.inference_mode():
        expected = (
            refs.model("a")
            .generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=20,
                do_sample=False,
                repetition_penalty=1.4,
                no_repeat_ngram_size=2,
                eos_token_id=None,
                pad_token_id=0,
            )[0, ids.shape[1] :]
            .tolist()
        )
    got = handles[0].result(TIMEOUT).token_ids
    assert got == expected
    assert got != refs.tokens("a", prompts[0], 20)  # the processors changed something
    assert handles[1].result(TIMEOUT).token_ids == refs.tokens(None, prompts[3])


# ---------------------------------------------------------------------------------------------
# (e) slots: reuse, LRU eviction, versions side by side


def test_lru_eviction_and_reload_serve_the_right_weights(
    make_engine: Callable[..., Engine],
    adapter_dirs: dict[str, Path],
    prompts: list[list[int]],
    refs: References,
) -> None:
    """Two slots, three adapters in turn: the least recently used idle slot is reused, a swapped-in
    adapter never sees its predecessor's weights (ranks 12 -> 4 leave no stale columns), and an
    evicted adapter reloads correctly."""
    engine = make_engine(num_slots=2, max_rank=16)
    w = {n: weights_for(engine.model, adapter_dirs, n) for n in ("a", "b", "c")}

    def run(name: str) -> None:
        out = engine.generate(GenerationRequest(prompts[4], adapter=w[name], params=greedy()), TIMEOUT)
        assert out.token_ids == refs.tokens(name, prompts[4]), name

    def resident() -> list[str | None]:
        return [s["ref"] for s in engine.stats()["slots"]]

    run("c")
    run("b")
    assert sorted(filter(None, resident())) == ["b@1", "c@1"]
    run("c")  # reuse: no load, c becomes most recent
    run("a")  # evicts b (least recently used), not c
    assert sorted(filter(None, resident())) == ["a@1", "c@1"]
    run("b")  # evicts c
    assert sorted(filter(None, resident())) == ["a@1", "b@1"]
    run("c")
    run("a")
    assert all(s["users"] == 0 for s in engine.stats()["slots"])


def test_busy_slots_make_requests_wait_not_evict(
    make_engine: Callable[..., Engine],
    adapter_dirs: dict[str, Path],
    prompts: list[list[int]],
    refs: References,
) -> None:
    """One slot, requests for two adapters at once: the second adapter waits until the first's
    requests have finished (a slot in use is never overwritten), then both are right."""
    hook = StepHook()
    engine = make_engine(num_slots=1, max_rank=16, observer=hook, start=False)
    wa, wc = weights_for(engine.model, adapter_dirs, "a"), weights_for(engine.model, adapter_dirs, "c")
    ha = engine.submit(GenerationRequest(prompts[1], adapter=wa, params=greedy(ignore_eos=True)))
    hc = engine.submit(GenerationRequest(prompts[2], adapter=wc, params=greedy(ignore_eos=True)))
    hb = engine.submit(GenerationRequest(prompts[0], params=greedy(ignore_eos=True)))  # base needs no slot
    engine.start()
    ra, rc, rb = (h.result(TIMEOUT) for h in (ha, hc, hb))
    assert ra.token_ids == greedy_prefix(refs, "a", prompts[1])
    assert rc.token_ids == greedy_prefix(refs, "c", prompts[2])
    assert rb.token_ids == greedy_prefix(refs, None, prompts[0])
    assert hc.first_token_at is not None and ha.finished_at is not None
    assert hc.first_token_at > ha.finished_at  # c waited for a's slot
    assert hb.first_token_at is not None and hb.first_token_at < ha.finished_at  # base did not wait
    assert max(hook.adapters_in_batch) == 1


def greedy_prefix(refs: References, name: str | None, prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
    """Reference tokens without stopping at eos (for ``ignore_eos`` requests)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = refs.model(name).generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


def test_two_versions_of_one_adapter_side_by_side(
    make_engine: Callable[..., Engine],
    adapter_dirs: dict[str, Path],
    prompts: list[list[int]],
    refs: References,
) -> None:
    """``x@1`` and ``x@2`` (different weights, same name) in flight together get separate slots and
    each its own weights; after both finish, a new ``x@2`` request reuses x@2's slot."""
    engine = make_engine(num_slots=3, max_rank=16, start=False)
    v1 = weights_for(engine.model, adapter_dirs, "a", ref="x@1")
    v2 = weights_for(engine.model, adapter_dirs, "d", ref="x@2")
    h1 = engine.submit(GenerationRequest(prompts[3], adapter=v1, params=greedy()))
    h2 = engine.submit(GenerationRequest(prompts[3], adapter=v2, params=greedy()))
    engine.start()
    assert h1.result(TIMEOUT).token_ids == refs.tokens("a", prompts[3])
    assert h2.result(TIMEOUT).token_ids == refs.tokens("d", prompts[3])
    refs_in_slots = [s["ref"] for s in engine.stats()["slots"]]
    assert sorted(filter(None, refs_in_slots)) == ["x@1", "x@2"]
    again = engine.generate(GenerationRequest(prompts[2], adapter=v2, params=greedy()), TIMEOUT)
    assert again.token_ids == refs.tokens("d", prompts[2])
    assert [s["ref"] for s in engine.stats()["slots"]] == refs_in_slots


def test_cancel_waiting_and_running_requests(
    make_engine: Callable[..., Engine], adapter_dirs: dict[str, Path], prompts: list[list[int]]
) -> None:
    """Cancelling a queued request removes it; cancelling a running one frees its slot at once."""
    hook = StepHook()
    engine = make_engine(num_slots=1, max_rank=16, observer=hook, start=False)
    wa, wb = weights_for(engine.model, adapter_dirs, "a"), weights_for(engine.model, adapter_dirs, "b")
    long = SamplingParams(max_new_tokens=200, ignore_eos=True)
    running = engine.submit(GenerationRequest(prompts[0], adapter=wa, params=long))
    queued = engine.submit(GenerationRequest(prompts[1], adapter=wb, params=long))  # waits for the slot
    assert engine.stats()["waiting"] == 2
    queued.cancel()
    assert queued.finish_reason == FINISH_CANCELLED and engine.stats()["waiting"] == 1
    seen = threading.Event()
    users: list[int] = []

    def cancel_running() -> None:
        running.cancel()
        users.append(engine.stats()["slots"][0]["users"])
        seen.set()

    hook.at(3, cancel_running)
    engine.start()
    assert seen.wait(TIMEOUT)
    assert users == [0]  # released before cancel() returned
    result = running.result(TIMEOUT)
    assert result.finish_reason == FINISH_CANCELLED and len(result.token_ids) < 200
    assert list(queued) == []  # a cancelled request's stream just ends


# ---------------------------------------------------------------------------------------------
# (f) bad inputs


def test_bad_requests_raise_clear_errors(
    make_engine: Callable[..., Engine],
    tiny_llama: Path,
    adapter_dirs: dict[str, Path],
    prompts: list[list[int]],
) -> None:
    engine = make_engine(
        num_slots=2,
        max_rank=8,
        target_modules=["q_proj", "v_proj", "down_proj", "up_proj"],
        max_queued=1,
        start=False,
    )
    ctx = engine.max_context
    with pytest.raises(PromptTooLong, match="empty"):
        engine.submit(GenerationRequest([]))
    with pytest.raises(PromptTooLong, match=f"at most {ctx - 1}"):
        engine.submit(GenerationRequest([5] * ctx))
    vocab = engine.vocab_size
    config = engine.model.config
    assert isinstance(config, PreTrainedConfig) and vocab == config.vocab_size
    with pytest.raises(ValueError, match=f"prompt_ids.*\\[0, {vocab}\\)"):
        engine.submit(GenerationRequest([5, vocab, 7]))
    with pytest.raises(ValueError, match="prompt_ids"):
        engine.submit(GenerationRequest([5, -1]))
    # An adapter over the rank cap, and one adapting a layer that is not a target of this engine.
    with pytest.raises(ValueError, match=r"rank 12 .* exceeds max_rank 8"):
        engine.submit(GenerationRequest(prompts[0], adapter=weights_for(engine.model, adapter_dirs, "c")))
    with pytest.raises(ValueError, match=r"k_proj.*not a LoRA target"):
        engine.submit(GenerationRequest(prompts[0], adapter=weights_for(engine.model, adapter_dirs, "b")))
    with pytest.raises(ValueError, match="stop_strings need an engine with a tokenizer"):
        engine.submit(GenerationRequest(prompts[0], params=SamplingParams(stop_strings=("x",))))
    # Nothing above was queued; the queue bound applies to the next ones.
    first = engine.submit(GenerationRequest(prompts[0]))
    with pytest.raises(QueueFull, match="max_queued=1"):
        engine.submit(GenerationRequest(prompts[1]))
    engine.close()
    with pytest.raises(EngineClosed):
        first.result(TIMEOUT)
    with pytest.raises(EngineClosed):
        engine.submit(GenerationRequest(prompts[0]))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size"),
        ({"stop_strings": ("ok", "")}, "stop_strings"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_adapter_directories(tiny_llama: Path, adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The adapter reader refuses pickle-only, non-LoRA, other-architecture and inconsistent adapters
    with a message saying what is wrong."""
    base = load_base(tiny_llama)
    good = adapter_dirs["a"]

    def variant(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(good, out)
        return out

    with pytest.raises(ValueError, match=r"no adapter_config\.json"):
        adapter_weights_from_peft_dir(tmp_path, "x", base)
    pickle_only = variant("pickle")
    (pickle_only / "adapter_model.safetensors").rename(pickle_only / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        adapter_weights_from_peft_dir(pickle_only, "x", base)
    for key, value, message in [
        ("peft_type", "PREFIX_TUNING", "not LORA"),
        ("use_dora", True, "DoRA"),
        ("r", 6, "rank 4 but adapter_config.json says 6"),
    ]:
        bad = variant(f"cfg-{key}")
        config = json.loads((bad / "adapter_config.json").read_text())
        config[key] = value
        (bad / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            adapter_weights_from_peft_dir(bad, "x", base)
    # The same adapter against a base of another width: shapes do not fit.
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = base.config.to_dict()
    cfg.update(hidden_size=32, intermediate_size=64, head_dim=8)
    other = LlamaForCausalLM(LlamaConfig(**cfg))
    with pytest.raises(ValueError, match="do not fit"):
        adapter_weights_from_peft_dir(good, "x", other)


def test_stack_mode_repacks_after_reload_and_clear(
    tiny_llama: Path, adapter_dirs: dict[str, Path], prompts: list[list[int]]
) -> None:
    """``stack`` multiplies packed copies of the slot tables; a slot loaded with another adapter or
    cleared must never be served from the old packed copy. Checked against ``group`` (PEFT's own
    arithmetic) on the same slots after each change."""
    base = load_base(tiny_llama)
    slots = LoraSlots(base, None, num_slots=3, max_rank=16, mode="stack")
    weights = {n: adapter_weights_from_peft_dir(adapter_dirs[n], f"{n}@1", base) for n in ADAPTERS}
    ids = torch.tensor([prompts[0][:4]] * 4)
    rows = torch.tensor([0, 1, 2, -1])

    def logits(mode: str) -> torch.Tensor:
        slots.mode = mode  # type: ignore[assignment]
        slots.set_rows(rows)
        with torch.inference_mode():
            return base(input_ids=ids[:, :1]).logits

    try:
        for slot, name in enumerate(("a", "b", "c")):
            slots.load(slot, weights[name])
        first = logits("stack")
        assert (first - logits("group")).abs().max() < 1e-4
        slots.load(1, weights["d"])  # replace b by d in slot 1
        second = logits("stack")
        assert (second - logits("group")).abs().max() < 1e-4
        assert (second[1] - first[1]).abs().max() > 1e-3  # slot 1 really serves d now
        assert torch.equal(second[0], first[0]) and torch.equal(second[3], first[3])
        slots.clear(2)  # rows of a cleared slot get the base model's output
        third = logits("stack")
        assert (third[2] - third[3]).abs().max() < 1e-5
    finally:
        slots.remove()


def test_auto_mode_choice(tiny_llama: Path, adapter_dirs: dict[str, Path]) -> None:
    """``auto``: ``group`` for at most two adapters in a batch; above that ``stack`` for one-token
    (decode) forwards and ``gather`` for prefills while the resident ranks fit the narrowest
    layer's input size, and ``gather`` for both once they do not."""
    base = load_base(tiny_llama)
    narrowest = min(
        m.in_features
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    w = {n: adapter_weights_from_peft_dir(adapter_dirs[n], f"{n}@1", base) for n in ADAPTERS}
    slots = LoraSlots(base, None, num_slots=4, max_rank=16)
    try:
        for slot, name in enumerate(ADAPTERS):
            slots.load(slot, w[name])
        slots.set_rows(torch.tensor([0, 1, 0, -1]))
        assert slots._plan is not None and slots._plan.mode == "group"
        slots.set_rows(torch.tensor([0, 1, 2, 3]))
        assert sum(x.rank for x in w.values()) <= narrowest
        assert (slots._plan.mode, slots._plan.multi_token_mode) == ("stack", "gather")
        slots._min_in = sum(x.rank for x in w.values()) - 1  # as if the layers were narrower
        slots.set_rows(torch.tensor([0, 1, 2, 3]))
        assert (slots._plan.mode, slots._plan.multi_token_mode) == ("gather", "gather")
    finally:
        slots.remove()


def test_lora_slots_argument_checks(tiny_llama: Path, adapter_dirs: dict[str, Path]) -> None:
    base = load_base(tiny_llama)
    with pytest.raises(ValueError, match="num_slots"):
        LoraSlots(base, None, num_slots=0, max_rank=8)
    with pytest.raises(ValueError, match="mode"):
        LoraSlots(base, None, num_slots=1, max_rank=8, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\['nonexistent_proj'\] match no linear layer"):
        LoraSlots(base, ["q_proj", "nonexistent_proj"], num_slots=1, max_rank=8)
    slots = LoraSlots(base, None, num_slots=2, max_rank=8)
    try:
        with pytest.raises(ValueError, match="slot ids must be in"):
            slots.set_rows(torch.tensor([0, 2]))
        with pytest.raises(ValueError, match="slot 5 out of range"):
            slots.load(5, adapter_weights_from_peft_dir(adapter_dirs["a"], "a@1", base))
    finally:
        slots.remove()


# ---------------------------------------------------------------------------------------------
# The benchmark's quick mode (smoke test of the script, not of its targets)


@pytest.mark.integration
def test_inference_bench_quick(tmp_path: Path) -> None:
    """``bench.inference_bench --quick`` runs every configuration and writes well-formed results,
    merged into the results file next to an existing ``training`` key."""
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"training": {"kept": True}}))
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.inference_bench",
            "--quick",
            "--results",
            str(results),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(results.read_text())
    assert data["training"] == {"kept": True}
    inference = data["inference"]
    for key in ("machine", "model", "method", "when"):
        assert inference[key]
    assert inference["machine"]["torch"] == torch.__version__
    counts = inference["method"]["adapter_counts"]
    assert counts and set(inference["by_adapters"]) == {str(n) for n in counts}
    for entry in inference["by_adapters"].values():
        for ratio in ("ratio_vs_naive", "ratio_vs_static_mixed", "mixed_vs_base"):
            assert entry[ratio] > 0
        for config in ("lorafleet", "naive_peft", "static_peft_mixed", "lorafleet_base_only"):
            figures = entry["runs"][config]
            assert figures["requests"] == inference["method"]["requests"]
            assert figures["generated_tokens"] > 0
            for metric in ("tokens_per_s", "requests_per_s", "ttft_p50_s", "ttft_p99_s"):
                assert figures[metric] > 0
            assert figures["ttft_p99_s"] >= figures["ttft_p50_s"]
            assert figures["latency_p99_s"] >= figures["latency_p50_s"] >= figures["ttft_p50_s"]
        assert entry["ratio_vs_naive"] == pytest.approx(
            entry["runs"]["lorafleet"]["tokens_per_s"] / entry["runs"]["naive_peft"]["tokens_per_s"]
        )
