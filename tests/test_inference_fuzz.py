"""Property-based fuzzing of the inference request validation (issue 16), with hypothesis.

Properties, for any input hypothesis finds:
- ``SamplingParams.validate`` never raises, and parameters it accepts never make sampling fail:
  over any finite logits a model can produce, every accepted request picks a token;
- the plane (a real tiny base) answers any Generate or Chat request, whatever its strings, numbers
  and messages, with a generation or a domain error whose status is not INTERNAL, within a bounded
  time (hypothesis' ``deadline``), and the generation itself never fails with INTERNAL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lorafleet.errors import LorafleetError
from services.inference.errors import STATUS_FOR
from services.inference.plane import InferencePlane
from services.inference.processors import TokenSampler, pick_tokens
from services.inference.request_checks import Message
from services.inference.sampling import SamplingLimits, SamplingParams
from services.inference.settings import InferenceSettings, ModelSettings

VOCAB = 32
INT32 = st.integers(-(2**31), 2**31 - 1)
DOUBLES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e-3, max_value=1e-3),
    st.sampled_from([0.0, -0.0, 1.0, 5e-324, 1e-300, 1e-5, 0.01, 100.0, 1e300]),
)
TEXT = st.one_of(st.text(max_size=60), st.text(alphabet="<|>/[]INSTim_startend \x00", max_size=40))
SAMPLING = st.builds(
    SamplingParams,
    max_new_tokens=st.one_of(st.none(), INT32, st.integers(1, 4)),
    temperature=DOUBLES,
    top_p=DOUBLES,
    top_k=INT32,
    repetition_penalty=DOUBLES,
    no_repeat_ngram_size=st.one_of(INT32, st.integers(0, 4)),
    stop=st.lists(TEXT, max_size=10).map(tuple),
    seed=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.integers(-(2**70), 2**70)),
)
ACCEPTABLE = st.builds(
    SamplingParams,
    max_new_tokens=st.one_of(st.none(), st.integers(1, 4)),
    temperature=st.one_of(st.just(0.0), st.floats(1e-5, 100.0), st.sampled_from([1e-5, 100.0])),
    top_p=st.one_of(st.just(1.0), st.floats(5e-324, 1.0, exclude_min=False)),
    top_k=st.integers(0, 2**31 - 1),
    repetition_penalty=st.one_of(st.just(1.0), st.floats(0.01, 100.0), st.sampled_from([0.01, 100.0])),
    no_repeat_ngram_size=st.integers(0, 4),
    stop=st.lists(TEXT.filter(bool), max_size=3).map(tuple),
    seed=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
)
"""Parameters near and at the accepted bounds, so the fuzzing also drives accepted requests through
the engine (a fully random ``SAMPLING`` is almost always refused)."""
FUZZ = settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@given(params=SAMPLING, logit_scale=st.sampled_from([1.0, 30.0, 1e4]), data=st.data())
@settings(max_examples=200, deadline=2000)
def test_accepted_sampling_params_always_pick_a_token(
    params: SamplingParams, logit_scale: float, data: Any
) -> None:
    problems = params.validate(SamplingLimits(64, 8, 64))
    if problems:
        assert all(p.field for p in problems)
        return
    seed = data.draw(st.integers(0, 2**32 - 1))
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(seed)) * logit_scale
    sampler = TokenSampler(params)
    history = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12))
    for _ in range(3):
        picks = pick_tokens([sampler, TokenSampler(SamplingParams())], lambda i: history, logits)
        assert all(isinstance(p, int) and 0 <= p < VOCAB for p in picks), (params, picks)
        history.append(int(picks[0]))


@pytest.fixture(scope="module")
def plane(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferencePlane]:
    settings_ = InferenceSettings(
        models=[ModelSettings(name="tiny", path=str(tiny_llama))],
        adapters_root=str(tmp_path_factory.mktemp("adapters")),
        max_new_tokens_cap=4,
        default_max_new_tokens=2,
        max_prompt_chars=2000,
        max_messages=8,
    )
    plane = InferencePlane(settings_)
    assert plane.load_all()
    yield plane
    plane.close()


def _not_internal(error: BaseException) -> None:
    assert isinstance(error, LorafleetError), repr(error)
    code = next((STATUS_FOR[c] for c in type(error).__mro__ if c in STATUS_FOR), None)
    assert code not in (None, grpc.StatusCode.INTERNAL), repr(error)


def _finish(call: Any) -> None:
    try:
        generation = call()
    except Exception as e:
        _not_internal(e)
        event(f"refused: {type(e).__name__}")
        return
    try:
        generation.result(30)
        event("generated")
    except Exception as e:
        _not_internal(e)
        event(f"failed: {type(e).__name__}")
    finally:
        generation.close()


NAMES = st.one_of(st.text(max_size=20), st.text(min_size=250, max_size=300))


@given(
    call=st.one_of(
        st.tuples(st.sampled_from(["", "tiny"]), st.just(""), TEXT.filter(bool), ACCEPTABLE),
        st.tuples(
            st.one_of(st.sampled_from(["", "tiny"]), NAMES),
            st.one_of(st.just(""), NAMES),
            st.one_of(TEXT, st.text(min_size=1990, max_size=2010)),
            st.one_of(ACCEPTABLE, SAMPLING),
        ),
    )
)
@FUZZ
def test_any_generate_request_gets_a_non_internal_answer(
    plane: InferencePlane, call: tuple[str, str, str, SamplingParams]
) -> None:
    model, adapter, prompt, sampling = call
    _finish(lambda: plane.generate(model, adapter, prompt, sampling))


MESSAGES = st.lists(
    st.builds(Message, role=st.one_of(st.sampled_from(["system", "user", "assistant"]), TEXT), content=TEXT),
    max_size=10,
)
CONVERSATIONS = st.builds(
    lambda system, turns, query: [
        *([Message("system", system)] if system is not None else []),
        *[
            Message(role, text)
            for pair in turns
            for role, text in zip(("user", "assistant"), pair, strict=True)
        ],
        Message("user", query),
    ],
    st.one_of(st.none(), TEXT),
    st.lists(st.tuples(TEXT, TEXT), max_size=3),
    TEXT.filter(bool),
)
"""Well-formed conversations (system?, user/assistant turns, a final user message) of hostile text."""


@given(messages=st.one_of(CONVERSATIONS, MESSAGES), sampling=st.one_of(ACCEPTABLE, SAMPLING))
@FUZZ
def test_any_chat_request_gets_a_non_internal_answer(
    plane: InferencePlane, messages: list[Message], sampling: SamplingParams
) -> None:
    _finish(lambda: plane.chat("", "", messages, sampling))
