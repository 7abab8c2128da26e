"""The continuous-batching multi-adapter engine (``services.inference.engine``) and its batched LoRA
(``services.inference.lora_batch``), against plain PEFT on real PEFT adapters. LoraSlots on its own
is tested in ``test_lora_batch.py``; the fixtures (adapters, prompts, references) are in conftest.py.

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

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedConfig

from services.inference.detokenizer import stop_string_check
from services.inference.engine import Engine
from services.inference.errors import EngineClosedError, PromptTooLongError, QueueFullError
from services.inference.lora_batch import AdapterWeights, adapter_weights_from_peft_dir
from services.inference.plane import Generation
from services.inference.requests import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineObserver,
    GenerationRequest,
    RequestHandle,
)
from services.inference.sampling import SamplingParams
from tests.inference_utils import ADAPTERS, MAX_NEW, References, load_base

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_llama))


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
    streamed deltas add up to the returned text). Text and stop strings are the plane's: the engine
    gets a ``stop_check`` and the plane's ``Generation`` decodes."""
    prompt = prompts[3]
    reference = refs.tokens(None, prompt, 16)
    engine = make_engine(num_slots=1, max_rank=8)

    def text_generation(params: SamplingParams) -> Generation:
        check = stop_string_check(tokenizer, params.stop) if params.stop else None
        handle = engine.submit(GenerationRequest(prompt, params=params, stop_check=check))
        return Generation(handle, lambda: None, "", "", tokenizer, params.stop)

    stop_tok = reference[5]
    cut = reference.index(stop_tok) + 1
    out = engine.generate(GenerationRequest(prompt, params=greedy(16, stop_token_ids=(stop_tok,))), TIMEOUT)
    assert out.token_ids == reference[:cut] and out.finish_reason == FINISH_STOP

    full_text = tokenizer.decode(reference, skip_special_tokens=True)
    assert len(full_text) >= 8, full_text
    stop = full_text[4:7]
    expected = full_text[: full_text.index(stop)]
    generation = text_generation(greedy(16, stop=(stop,)))
    streamed = "".join(chunk.text for chunk in generation)
    result = generation.result(TIMEOUT)
    assert result.usage.finish_reason == FINISH_STOP
    assert result.text == expected == streamed
    assert stop not in result.text
    assert len(result.token_ids) < len(reference)

    plain = text_generation(greedy(16)).result(TIMEOUT)
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
    with pytest.raises(PromptTooLongError, match="empty"):
        engine.submit(GenerationRequest([]))
    with pytest.raises(PromptTooLongError, match=f"at most {ctx - 1}"):
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
    with pytest.raises(ValueError, match="stop strings need a stop_check"):
        engine.submit(GenerationRequest(prompts[0], params=SamplingParams(stop=("x",))))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(GenerationRequest(prompts[0], params=SamplingParams(top_p=0.0)))
    # Nothing above was queued; the queue bound applies to the next ones.
    first = engine.submit(GenerationRequest(prompts[0]))
    with pytest.raises(QueueFullError, match="max_queued=1"):
        engine.submit(GenerationRequest(prompts[1]))
    engine.close()
    with pytest.raises(EngineClosedError):
        first.result(TIMEOUT)
    with pytest.raises(EngineClosedError):
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
        ({"stop": ("ok", "")}, "stop[1]"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    assert [p.field for p in SamplingParams(**kwargs).validate()] == [field]
