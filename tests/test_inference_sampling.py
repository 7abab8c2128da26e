"""Sampling parameters in one place: ``SamplingParams.validate``, the per-parameter logits processors,
the greedy fast path derived from them, the mapping proto <-> dataclass <-> CLI flag, and the import
graph of the engine's modules. No model: logits are made by hand."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from lorafleet.v1 import inference_pb2 as pb
from services.inference import client as client_module
from services.inference import processors as processors_module
from services.inference.processors import (
    PROCESSORS,
    NoRepeatNgram,
    RepetitionPenalty,
    TokenSampler,
    pick_tokens,
)
from services.inference.sampling import SamplingLimits, SamplingParams
from services.inference.server import sampling_from_pb

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8


def logits(*rows: Sequence[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# -- validate --------------------------------------------------------------------------------------


def test_validate_lists_every_problem_with_field_and_value() -> None:
    params = SamplingParams(
        max_new_tokens=65,
        temperature=math.nan,
        top_p=0.0,
        top_k=-1,
        repetition_penalty=0.0,
        no_repeat_ngram_size=65,
        stop=("ok", "", "x" * 9, "a", "b"),
    )
    limits = SamplingLimits(max_new_tokens=64, max_stop_sequences=4, max_stop_length=8)
    problems = params.validate(limits, prefix="sampling.")
    assert [p.field for p in problems] == [
        "sampling.max_new_tokens",
        "sampling.temperature",
        "sampling.top_p",
        "sampling.top_k",
        "sampling.repetition_penalty",
        "sampling.no_repeat_ngram_size",
        "sampling.stop",
        "sampling.stop[1]",
        "sampling.stop[2]",
    ]
    assert str(problems[0]) == "sampling.max_new_tokens=65: must be in [1, 64] (the server cap)"
    assert problems[2].value == 0.0 and "(0, 1]" in problems[2].message


def test_defaults_are_valid_and_limits_are_only_checked_when_given() -> None:
    assert SamplingParams().validate() == []
    long = SamplingParams(max_new_tokens=10_000, stop=("x" * 500,) * 20)
    assert long.validate() == []
    assert len(long.validate(SamplingLimits(64, 8, 64))) == 1 + 1 + 20
    assert SamplingParams().new_tokens == 128 and SamplingParams(7).new_tokens == 7


# -- one name per parameter: proto, dataclass, CLI flag --------------------------------------------


def test_every_proto_field_is_a_dataclass_field_and_a_cli_flag() -> None:
    """What makes 'proto, dataclass, processor, flag' enough to add a parameter: the servicer and the
    CLI convert by name, so a proto field without a dataclass field or a flag fails here."""
    dataclass_fields = {f.name for f in fields(SamplingParams)}
    proto_fields = {f.name for f in pb.SamplingParams.DESCRIPTOR.fields}
    assert proto_fields <= dataclass_fields
    import argparse

    ap = argparse.ArgumentParser()
    client_module.add_sampling_args(ap)
    flags = set(vars(ap.parse_args([])))
    assert proto_fields <= flags


def test_proto_to_params_and_cli_to_proto_round_trip() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    client_module.add_sampling_args(ap)
    args = ap.parse_args(
        ["--temperature", "0.5", "--top-k", "3", "--stop", "END", "--stop", "##", "--seed", "9"]
    )
    sent = client_module.sampling_from_args(args)
    assert not sent.HasField("max_new_tokens") and not sent.HasField("top_p")
    params = sampling_from_pb(sent)
    assert params == SamplingParams(temperature=0.5, top_k=3, stop=("END", "##"), seed=9)
    assert params.max_new_tokens is None  # unset: the server's default applies
    assert sampling_from_pb(pb.SamplingParams(temperature=0.0, top_p=1.0)) == SamplingParams()


# -- processors and the greedy fast path -----------------------------------------------------------


def test_repetition_penalty_applies_at_temperature_zero() -> None:
    """Token 1 is the raw argmax, but it is already in the sequence: a strong penalty moves the
    greedy pick to token 2."""
    row = [0.0, 5.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    plain = TokenSampler(SamplingParams(temperature=0.0))
    penalised = TokenSampler(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    assert plain.plain_argmax and not penalised.plain_argmax
    picks = pick_tokens([plain, penalised], lambda i: [1, 3], logits(row, row))
    assert picks == [1, 2]


def test_no_repeat_ngram_bans_the_completing_token() -> None:
    processor = NoRepeatNgram(2)
    scores = torch.zeros(VOCAB)
    out = processor([4, 5, 4], scores)  # "4 5" was seen: after 4, 5 is banned
    assert out[5] == -math.inf and torch.isfinite(out[torch.arange(VOCAB) != 5]).all()
    assert scores[5] == 0  # the input is not edited
    out = processor([4, 5, 4, 6, 4], scores)  # grows with the sequence: after 4, 5 and 6 are banned
    assert out[5] == out[6] == -math.inf


def test_processors_that_keep_the_argmax_are_skipped_when_greedy() -> None:
    greedy = TokenSampler(SamplingParams(temperature=0.0, top_k=2, top_p=0.5))
    assert greedy.plain_argmax and greedy.generator is None
    sampled = TokenSampler(SamplingParams(temperature=0.7, top_k=2, top_p=0.5, seed=3))
    assert [type(p).__name__ for p in sampled.processors] == ["Temperature", "TopK", "TopP"]
    assert sampled.generator is not None


class _BanArgmax:
    """A new parameter's processor, as a contributor would add one: it moves the argmax."""

    keeps_argmax: ClassVar[bool] = False

    @classmethod
    def create(cls, params: SamplingParams) -> _BanArgmax:
        return cls()

    def __call__(self, ids: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(0, scores.argmax().reshape(1), -math.inf)


def test_a_new_processor_applies_at_temperature_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path is derived from the processors a request has, not from a list of fields: adding
    one to ``PROCESSORS`` is enough for greedy rows to honour it (a hand-kept list of 'fields that
    change greedy' would skip it and return the raw argmax)."""
    monkeypatch.setattr(processors_module, "PROCESSORS", [*PROCESSORS, _BanArgmax.create])
    row = [0.0, 1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    sampler = TokenSampler(SamplingParams(temperature=0.0))
    assert not sampler.plain_argmax
    assert pick_tokens([sampler], lambda i: [0], logits(row)) == [3]


def test_seeded_sampling_is_reproducible_and_rows_are_independent() -> None:
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=1.0, seed=11)

    def draw(n: int) -> list[int]:
        sampler = TokenSampler(params)
        return [pick_tokens([sampler], lambda i: [0], logits(row))[0] for _ in range(n)]

    first = draw(20)
    assert draw(20) == first and len(set(first)) > 1
    # A greedy neighbour in the same batch does not change the sampled row.
    sampler, greedy = TokenSampler(params), TokenSampler(SamplingParams())
    mixed = [pick_tokens([greedy, sampler], lambda i: [0], logits(row, row))[1] for _ in range(20)]
    assert mixed == first


def test_repetition_penalty_matches_hf() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    scores = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    ids = [1, 4, 4, 6]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([ids]), scores[None].clone())[0]
    assert torch.equal(RepetitionPenalty(1.3)(ids, scores), expected)


# -- the engine's modules import without a cycle ---------------------------------------------------


def _imports(module: str) -> set[str]:
    path = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def test_no_import_cycle_between_engine_and_its_request_api() -> None:
    """engine -> requests, never back (not even under TYPE_CHECKING); the request API, the sampling
    parameters, the processors and the errors know nothing of the engine or of text."""
    assert "services.inference.requests" in _imports("services.inference.engine")
    for module in ("requests", "sampling", "processors", "errors", "slot_pool"):
        imported = _imports(f"services.inference.{module}")
        assert "services.inference.engine" not in imported, module
        assert "services.inference.detokenizer" not in imported, module
    assert "services.inference.detokenizer" not in _imports("services.inference.engine")


@pytest.mark.parametrize("module", ["requests", "engine", "sampling", "processors", "errors"])
def test_each_module_imports_alone(module: str) -> None:
    code = f"import services.inference.{module}"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
