"""Logprobs, prompt logprobs, ``n`` samples and OpenAI's presence / frequency penalties.

Values are checked against a plain ``PeftModel`` forward over the same tokens (fp32, greedy): a
token's logprob is ``log_softmax(logits)[token]`` of the model with that request's adapter, before
any processor (vLLM's default ``raw_logprobs``). Requests for different adapters and the base share
one prefill and one decode batch (the engine starts after they are all queued), and a row that asked
for nothing in the same batch must be unaffected. The penalties are tested on the processor with
hand-made scores and in the engine against a reference loop over the PeftModel's logits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from services.inference.engine import Engine
from services.inference.lora_batch import adapter_weights_from_peft_dir
from services.inference.plane import Generation, InferencePlane
from services.inference.processors import PresenceFrequencyPenalty, TokenSampler, pick_tokens
from services.inference.requests import GenerationRequest, GenerationResult, TokenLogprob
from services.inference.sampling import MAX_LOGPROBS, SEED_MAX, SEED_MIN, SamplingParams
from services.inference.server import completion_to_pb, logprobs_to_pb
from tests.inference_utils import References, load_base

TIMEOUT = 60.0
ATOL = 1e-4  # fp32 logprobs of a batched, left-padded forward vs an unpadded one


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_llama))


@pytest.fixture(scope="module")
def base(tiny_llama: Path) -> Any:
    return load_base(tiny_llama)


@torch.inference_mode()
def reference_logprobs(model: Any, tokens: list[int]) -> torch.Tensor:
    """``[len(tokens), vocab]``: row p is the log-distribution of the token at p + 1."""
    ids = torch.tensor([tokens])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().log_softmax(-1)


def check_entry(entry: TokenLogprob, row: torch.Tensor, token: int, k: int) -> None:
    assert entry.token_id == token
    assert entry.logprob is not None
    assert entry.logprob == pytest.approx(float(row[token]), abs=ATOL)
    assert len(entry.top) == k
    want = torch.topk(row, k)
    assert [t for t, _ in entry.top] == want.indices.tolist()
    assert [lp for _, lp in entry.top] == pytest.approx(want.values.tolist(), abs=ATOL)


def run_together(engine: Engine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Queue every request before the loop starts, so they share the prefill and decode batches."""
    handles = [engine.submit(r) for r in requests]
    engine.start()
    return [h.result(TIMEOUT) for h in handles]


# -- values against a PeftModel forward, mixed adapters in one batch -------------------------------


def test_logprobs_equal_peft_forward_per_row_in_a_mixed_batch(
    base: Any, refs: References, adapter_dirs: dict[str, Path], prompts: list[list[int]]
) -> None:
    rows: list[tuple[str | None, int | None, int | None]] = [
        ("a", 3, 2),  # (adapter, logprobs, prompt_logprobs)
        ("b", 0, None),
        (None, 5, 0),
        ("c", None, None),  # asks for nothing: must be unaffected
        ("a", 1, None),
    ]
    engine = Engine(base, num_slots=4, max_rank=16, start=False)
    try:
        weights = {
            name: adapter_weights_from_peft_dir(adapter_dirs[name], f"{name}@1", base) for name in "abc"
        }
        requests = [
            GenerationRequest(
                prompts[i % len(prompts)],
                adapter=None if name is None else weights[name],
                params=SamplingParams(max_new_tokens=6, logprobs=k, prompt_logprobs=pk),
            )
            for i, (name, k, pk) in enumerate(rows)
        ]
        results = run_together(engine, requests)
        assert engine.stats()["prefills"] == 1  # one prefill for every row: a real mixed batch
    finally:
        engine.close()
    for i, ((name, k, pk), result) in enumerate(zip(rows, results, strict=True)):
        prompt = prompts[i % len(prompts)]
        assert result.token_ids == refs.tokens(name, prompt, 6), name
        if k is None:
            assert result.logprobs is None
        else:
            table = reference_logprobs(refs.model(name), prompt + result.token_ids)
            assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids)
            for j, (entry, token) in enumerate(zip(result.logprobs, result.token_ids, strict=True)):
                check_entry(entry, table[len(prompt) + j - 1], token, k)
                if k:  # greedy: the chosen token is the most likely one
                    assert entry.top[0][0] == token
        if pk is None:
            assert result.prompt_logprobs is None
        else:
            table = reference_logprobs(refs.model(name), prompt)
            assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == len(prompt)
            first, *rest = result.prompt_logprobs
            assert first == TokenLogprob(prompt[0], None, ())
            for j, entry in enumerate(rest, start=1):
                check_entry(entry, table[j - 1], prompt[j], pk)


def test_streamed_logprobs_equal_the_result_and_come_with_their_tokens(
    base: Any, adapter_dirs: dict[str, Path], prompts: list[list[int]], tokenizer: Any
) -> None:
    with Engine(base, num_slots=2, max_rank=16) as engine:
        weights = adapter_weights_from_peft_dir(adapter_dirs["b"], "b@1", base)
        params = SamplingParams(max_new_tokens=5, logprobs=2, prompt_logprobs=1, ignore_eos=True)
        handle = engine.submit(GenerationRequest(prompts[1], adapter=weights, params=params))
        generation = Generation(handle, lambda: None, "b@1", "", tokenizer, prompt_ids=prompts[1])
        chunks = list(generation)
        done = generation.result(TIMEOUT)
    token_chunks = [c for c in chunks if c.token_ids]
    assert all(len(c.logprobs) == len(c.token_ids) for c in token_chunks)
    assert [lp for c in token_chunks for lp in c.logprobs] == done.logprobs
    assert token_chunks[0].prompt_logprobs == tuple(done.prompt_logprobs or ())
    assert all(c.prompt_logprobs is None for c in chunks[1:])
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["length"]
    assert done.logprobs is not None and done.logprobs[0].token == tokenizer.decode([done.token_ids[0]])
    assert done.logprobs[0].top[1].token == tokenizer.decode([done.logprobs[0].top[1].token_id])
    response = completion_to_pb(done)
    assert [e.token_id for e in response.logprobs] == done.token_ids
    assert not response.prompt_logprobs[0].HasField("logprob")
    assert response.prompt_logprobs[1].logprob == pytest.approx(done.prompt_logprobs[1].logprob)  # type: ignore[index]
    assert len(response.logprobs[0].top_logprobs) == 2 and not response.samples
    assert logprobs_to_pb(None) == []


# -- penalties ---------------------------------------------------------------------------------------


def test_presence_and_frequency_penalties_subtract_over_generated_tokens_only() -> None:
    vocab = 8
    scores = torch.arange(vocab, dtype=torch.float32)
    presence = PresenceFrequencyPenalty(0.5, 0.0)
    frequency = PresenceFrequencyPenalty(0.0, 0.25)
    both = PresenceFrequencyPenalty(-1.0, 1.5)
    prompt = [1, 3, 3]
    for processor in (presence, frequency, both):
        assert torch.equal(processor(prompt, scores), scores)  # the prompt does not count
    ids = [*prompt, 3, 5, 3, 3]  # generated: 3 three times, 5 once
    delta = {p: (p(ids, scores) - scores) for p in (presence, frequency, both)}
    expected = {
        presence: {3: -0.5, 5: -0.5},
        frequency: {3: -0.75, 5: -0.25},
        both: {3: 1.0 - 4.5, 5: 1.0 - 1.5},
    }
    for processor, changed in expected.items():
        for token in range(vocab):
            assert float(delta[processor][token]) == pytest.approx(changed.get(token, 0.0)), token
    assert torch.equal(scores, torch.arange(vocab, dtype=torch.float32))  # the input is not edited
    # The counts grow with later tokens.
    out = frequency([*ids, 5], scores)
    assert float(out[5] - scores[5]) == pytest.approx(-0.5)


def test_penalties_move_the_greedy_pick_and_off_builds_no_processor() -> None:
    assert PresenceFrequencyPenalty.create(SamplingParams()) is None
    assert TokenSampler(SamplingParams()).plain_argmax
    penalised = TokenSampler(SamplingParams(frequency_penalty=2.0))
    assert not penalised.plain_argmax
    row = torch.tensor([[0.0, 5.0, 4.0, 0.0]])
    ids = [0]
    assert pick_tokens([penalised], lambda i: ids, row) == [1]  # the prompt [0] is seen first
    ids = [0, 1]
    assert pick_tokens([penalised], lambda i: ids, row) == [2]  # 5 - 2 < 4


def test_validate_names_every_bad_new_field() -> None:
    params = SamplingParams(
        presence_penalty=2.5, frequency_penalty=math.nan, logprobs=MAX_LOGPROBS + 1, prompt_logprobs=-1, n=0
    )
    problems = params.validate(prefix="sampling.")
    assert [(p.field, p.value) for p in problems][:3] == [
        ("sampling.presence_penalty", 2.5),
        ("sampling.frequency_penalty", params.frequency_penalty),
        ("sampling.logprobs", 21),
    ]
    assert [p.field for p in problems][3:] == ["sampling.prompt_logprobs", "sampling.n"]
    assert "[-2, 2]" in problems[0].message
    assert SamplingParams(presence_penalty=-2, frequency_penalty=2, logprobs=0, n=16).validate() == []
    assert SamplingParams(n=17).validate()[0].field == "n"


@torch.inference_mode()
def penalised_reference(
    model: Any, prompt: list[int], steps: int, presence: float, frequency: float
) -> list[int]:
    """Greedy decoding by hand over full forwards, with OpenAI's penalties over generated tokens."""
    generated: list[int] = []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([prompt + generated])).logits[0, -1].float()
        for token in set(generated):
            logits[token] -= presence + frequency * generated.count(token)
        generated.append(int(logits.argmax()))
    return generated


def test_engine_penalties_match_a_reference_and_leave_other_rows_alone(
    base: Any, refs: References, adapter_dirs: dict[str, Path], prompts: list[list[int]]
) -> None:
    steps = 10
    engine = Engine(base, num_slots=2, max_rank=16, start=False)
    try:
        weights = adapter_weights_from_peft_dir(adapter_dirs["d"], "d@1", base)
        penalised = SamplingParams(
            max_new_tokens=steps, presence_penalty=1.5, frequency_penalty=2.0, ignore_eos=True
        )
        plain = SamplingParams(max_new_tokens=steps, ignore_eos=True)
        results = run_together(
            engine,
            [
                GenerationRequest(prompts[0], adapter=weights, params=penalised),
                GenerationRequest(prompts[0], adapter=weights, params=plain),
                GenerationRequest(prompts[2], params=plain),
            ],
        )
    finally:
        engine.close()
    want = penalised_reference(refs.model("d"), prompts[0], steps, 1.5, 2.0)
    unpenalised = penalised_reference(refs.model("d"), prompts[0], steps, 0.0, 0.0)
    assert results[0].token_ids == want
    assert results[1].token_ids == unpenalised
    assert want != unpenalised  # the penalty really changed the answer
    assert results[2].token_ids == penalised_reference(refs.model(None), prompts[2], steps, 0.0, 0.0)


# -- n samples ---------------------------------------------------------------------------------------


def sample_n(engine: Engine, tokenizer: Any, prompt: list[int], params: SamplingParams) -> Generation:
    handles = InferencePlane._submit_samples(engine, tokenizer, prompt, None, params)
    return Generation(handles, lambda: None, "", "", tokenizer, prompt_ids=prompt)


def test_n_samples_differ_and_are_reproducible_with_a_seed(
    base: Any, tokenizer: Any, prompts: list[list[int]]
) -> None:
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7, n=4, ignore_eos=True, logprobs=0)
    with Engine(base, num_slots=1, max_rank=16) as engine:
        first = sample_n(engine, tokenizer, prompts[3], params).result(TIMEOUT)
        again = sample_n(engine, tokenizer, prompts[3], params).result(TIMEOUT)
        other = sample_n(engine, tokenizer, prompts[3], SamplingParams(**{**vars(params), "seed": 8})).result(
            TIMEOUT
        )
        alone = sample_n(engine, tokenizer, prompts[3], params.for_sample(2)).result(TIMEOUT)
        streamed = list(sample_n(engine, tokenizer, prompts[3], params))
    runs = [[s.token_ids for s in c.samples] for c in (first, again, other)]
    assert [s.index for s in first.samples] == [0, 1, 2, 3]
    assert len({tuple(t) for t in runs[0]}) > 1  # the samples differ
    assert runs[0] == runs[1]  # and the same seed gives the same samples
    assert runs[2] != runs[0]
    assert alone.token_ids == runs[0][2]  # sample i draws from seed + i
    assert first.token_ids == runs[0][0] and first.text == first.samples[0].text
    assert first.usage.generated_tokens == 4 * 8 and first.usage.prompt_tokens == len(prompts[3])
    assert all(s.logprobs is not None and len(s.logprobs) == 8 for s in first.samples)
    by_index: dict[int, list[int]] = {}
    for chunk in streamed:
        if chunk.usage is None:
            by_index.setdefault(chunk.index, []).extend(chunk.token_ids)
    assert [by_index[i] for i in range(4)] == runs[0]
    assert [c.index for c in streamed if c.finish_reason] == [0, 1, 2, 3]
    assert streamed[-1].usage is not None and streamed[-1].usage.generated_tokens == 32
    response = completion_to_pb(first)
    assert [list(s.token_ids) for s in response.samples] == runs[0]


def test_greedy_n_samples_are_equal_and_seeds_wrap_in_int64() -> None:
    assert SamplingParams(seed=SEED_MAX, n=3).for_sample(1) == SamplingParams(seed=SEED_MIN)
    assert SamplingParams(seed=-1, n=2).for_sample(1).seed == 0
    assert SamplingParams(n=3).for_sample(2) == SamplingParams()
