"""Logits processors: one small class per sampling parameter, and the token pick built from them.

Each processor owns one parameter of ``SamplingParams``: ``create(params)`` returns it when that
parameter is on (None when off), and calling it maps one row's scores ``[vocab]`` (float32), given
the row's token ids so far (prompt + generated), to new scores. ``PROCESSORS`` lists them in HF
``generate``'s order: the processors that change which token is most likely (repetition penalty,
no-repeat n-gram) first, then the warpers that only reshape the distribution for sampling
(temperature, top-k, top-p).

A processor says whether it keeps the argmax (``keeps_argmax``). Greedy requests (temperature 0)
run only the processors that do not; a greedy request with none left is picked by one batched
``argmax`` over the raw logits. So the fast path is derived from the processors a request has:
a new parameter whose processor moves the argmax is applied at temperature 0 without touching
this logic.

Isolation (issue 16): a row whose raw logits are not finite, or whose processors make its
probabilities non-finite, gets an error object in its place in ``pick_tokens``' answer instead of a
token; nothing raises, so the other rows of the batch are picked exactly as they would be without it.

Sampling draws from the request's own stream, seeded with all 64 bits of its seed (numpy's PCG64
through ``SeedSequence``), by inverting the row's cumulative distribution: ``torch.Generator``
keeps only 32 bits of a seed, so seeds -1, 2**32-1 and 2**63-1 gave the same samples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol

import numpy as np
import torch

from lorafleet.errors import FieldProblem, LorafleetError
from services.inference.errors import NonFiniteLogitsError, RequestFailedError, SamplingFailedError
from services.inference.requests import TokenLogprob
from services.inference.sampling import SamplingParams

logger = logging.getLogger(__name__)
_SEED_SPACE = 2**64


class LogitsProcessor(Protocol):
    """One sampling parameter's effect on one row's scores."""

    keeps_argmax: ClassVar[bool]
    """True when the most likely token is the same after this processor (it only matters when
    sampling)."""

    def __call__(self, ids: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
        """New scores ``[vocab]`` for a row whose tokens so far are ``ids``; never edits ``scores``."""
        ...


class RepetitionPenalty:
    """HF/CTRL repetition penalty (Keskar et al. 2019): for every token already in the sequence,
    ``s = s * p if s < 0 else s / p``."""

    keeps_argmax: ClassVar[bool] = False

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty

    @classmethod
    def create(cls, params: SamplingParams) -> RepetitionPenalty | None:
        return cls(params.repetition_penalty) if params.repetition_penalty != 1 else None

    def __call__(self, ids: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
        seen = torch.tensor(list(ids), device=scores.device)
        picked = scores.gather(0, seen)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(0, seen, picked)


class PresenceFrequencyPenalty:
    """OpenAI's presence and frequency penalties over the tokens this request generated:
    ``s[t] = s[t] - presence * [c[t] > 0] - frequency * c[t]``, where ``c[t]`` counts token ``t``
    in the generated tokens (the prompt does not count; vLLM applies them the same way).

    The engine calls a row's processors first at prefill, with the prompt alone; the length of
    the ``ids`` of that first call marks where generation starts. The counts then grow with the
    tokens appended since the previous call.
    """

    keeps_argmax: ClassVar[bool] = False

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence = presence
        self.frequency = frequency
        self._start: int | None = None  # index of the first generated token in ``ids``
        self._counted = 0  # ``ids`` counted so far
        self._counts: dict[int, int] = {}

    @classmethod
    def create(cls, params: SamplingParams) -> PresenceFrequencyPenalty | None:
        if params.presence_penalty == 0 and params.frequency_penalty == 0:
            return None
        return cls(params.presence_penalty, params.frequency_penalty)

    def __call__(self, ids: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
        if self._start is None:
            self._start = self._counted = len(ids)
        for token in ids[self._counted :]:
            self._counts[token] = self._counts.get(token, 0) + 1
        self._counted = max(self._counted, len(ids))
        if not self._counts:
            return scores
        tokens = torch.tensor(list(self._counts), device=scores.device)
        counts = torch.tensor(list(self._counts.values()), dtype=scores.dtype, device=scores.device)
        penalty = self.presence + self.frequency * counts  # every counted token occurs at least once
        return scores.index_add(0, tokens, -penalty)


class NoRepeatNgram:
    """HF ``no_repeat_ngram_size``: ban every token that would complete an n-gram already in the
    sequence. The n-gram index grows with the sequence (each position is indexed once)."""

    keeps_argmax: ClassVar[bool] = False

    def __init__(self, n: int) -> None:
        self.n = n
        self._ngrams: dict[tuple[int, ...], set[int]] = {}
        self._indexed = 0  # start of the next n-gram to index

    @classmethod
    def create(cls, params: SamplingParams) -> NoRepeatNgram | None:
        return cls(params.no_repeat_ngram_size) if params.no_repeat_ngram_size else None

    def __call__(self, ids: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
        n = self.n
        if len(ids) + 1 < n:
            return scores
        for j in range(self._indexed, len(ids) - n + 1):
            self._ngrams.setdefault(tuple(ids[j : j + n - 1]), set()).add(ids[j + n - 1])
        self._indexed = max(self._indexed, len(ids) - n + 1)
        banned = self._ngrams.get(tuple(ids[len(ids) - n + 1 :]), set())
        if not banned:
            return scores
        return scores.index_fill(0, torch.tensor(sorted(banned), device=scores.device), -float("inf"))


class Temperature:
    """Divide the logits by the temperature (sampling only; 0 means greedy and builds no processor)."""

    keeps_argmax: ClassVar[bool] = True

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    @classmethod
    def create(cls, params: SamplingParams) -> Temperature | None:
        return cls(params.temperature) if params.temperature not in (0, 1) else None

    def __call__(self, ids: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """Keep the ``k`` highest scores (ties with the k-th kept), mask the rest."""

    keeps_argmax: ClassVar[bool] = True

    def __init__(self, k: int) -> None:
        self.k = k

    @classmethod
    def create(cls, params: SamplingParams) -> TopK | None:
        return cls(params.top_k) if params.top_k > 0 else None

    def __call__(self, ids: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
        kth = torch.topk(scores, min(self.k, scores.numel())).values[-1]
        return scores.masked_fill(scores < kth, -float("inf"))


class TopP:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability mass reaches ``p``; the most likely token is always kept."""

    keeps_argmax: ClassVar[bool] = True

    def __init__(self, p: float) -> None:
        self.p = p

    @classmethod
    def create(cls, params: SamplingParams) -> TopP | None:
        return cls(params.top_p) if params.top_p < 1 else None

    def __call__(self, ids: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= (1 - self.p)
        remove[-1] = False  # keep at least the most likely token
        return scores.masked_fill(remove.scatter(0, order, remove), -float("inf"))


ProcessorFactory = Callable[[SamplingParams], LogitsProcessor | None]

PROCESSORS: list[ProcessorFactory] = [
    RepetitionPenalty.create,
    PresenceFrequencyPenalty.create,
    NoRepeatNgram.create,
    Temperature.create,
    TopK.create,
    TopP.create,
]
"""Every processor, in the order they apply (HF ``generate``'s)."""


class TokenSampler:
    """How one request picks its next token: its processors, and its generator when it samples.

    Args:
        params: the request's sampling parameters.
        processors: the factories to build from (``PROCESSORS`` by default).
    """

    def __init__(self, params: SamplingParams, processors: Sequence[ProcessorFactory] | None = None) -> None:
        self.params = params
        self.greedy = params.temperature == 0
        built = [
            p
            for make in (PROCESSORS if processors is None else processors)
            if (p := make(params)) is not None
        ]
        # At temperature 0 the pick is the argmax: processors that keep it change nothing.
        self.processors: list[LogitsProcessor] = [p for p in built if not (self.greedy and p.keeps_argmax)]
        self.generator: np.random.Generator | None = None
        if not self.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            # Signed int64 -> [0, 2**64): one-to-one, and SeedSequence keeps every bit.
            self.generator = np.random.Generator(np.random.PCG64(seed % _SEED_SPACE))

    @property
    def plain_argmax(self) -> bool:
        """Whether the pick is the argmax of the raw logits: greedy, and no processor applies."""
        return self.greedy and not self.processors

    def pick(self, ids: Sequence[int], scores: torch.Tensor) -> int | SamplingFailedError:
        """The next token for a row whose tokens so far are ``ids``, from its finite scores
        ``[vocab]``; a ``SamplingFailedError`` naming the parameters when they made the
        distribution non-finite (returned, not raised: the batch goes on)."""
        for processor in self.processors:
            scores = processor(ids, scores)
        if self.greedy:
            if bool(torch.isnan(scores).any()) or not bool(scores.max() > -math.inf):
                return self._failed()
            return int(scores.argmax())
        probs = scores.softmax(-1).double().cpu()
        if not bool(torch.isfinite(probs).all()):
            return self._failed()
        cdf = probs.cumsum(0)  # [vocab]
        total = float(cdf[-1])
        if not total > 0:
            return self._failed()
        assert self.generator is not None
        target = torch.tensor([self.generator.random() * total], dtype=cdf.dtype)
        token = int(torch.searchsorted(cdf, target, right=True)[0])
        if token >= len(cdf):  # rounding put the draw at the very top: the last token with mass
            token = int(torch.nonzero(probs)[-1, 0])
        return token

    def _failed(self) -> SamplingFailedError:
        p = self.params
        named = [
            FieldProblem(f"sampling.{name}", value, "made this request's token probabilities NaN or infinite")
            for name, value, off in (
                ("temperature", p.temperature, (0.0, 1.0)),
                ("repetition_penalty", p.repetition_penalty, (1.0,)),
            )
            if value not in off
        ]
        return SamplingFailedError(
            named or [FieldProblem("sampling", p, "made this request's token probabilities NaN or infinite")]
        )


Pick = int | LorafleetError
"""A row's next token, or why that row (alone) failed: ``NonFiniteLogitsError``,
``SamplingFailedError``, or ``RequestFailedError`` for a processor that raised."""


def pick_tokens(
    samplers: Sequence[TokenSampler], ids_of: Callable[[int], Sequence[int]], logits: torch.Tensor
) -> list[Pick]:
    """The next token of every row of a batch; a failed row gets its error in its place.

    Args:
        samplers: one per row.
        ids_of: row index -> that row's token ids so far (asked only for rows with processors).
        logits: ``[rows, vocab]``, the last position of each row.
    """
    scores = logits.float()
    finite = torch.isfinite(scores).all(-1).tolist()  # [rows]
    picks: list[Pick] = [0] * len(samplers)
    plain = [i for i, s in enumerate(samplers) if s.plain_argmax and finite[i]]
    if plain:  # one batched argmax for every plain greedy row
        rows = scores.index_select(0, torch.tensor(plain, device=scores.device))
        for i, token in zip(plain, rows.argmax(-1).tolist(), strict=True):
            picks[i] = int(token)
    for i, sampler in enumerate(samplers):
        if not finite[i]:
            picks[i] = NonFiniteLogitsError("the model produced NaN or infinite logits for this request")
        elif not sampler.plain_argmax:
            try:
                picks[i] = sampler.pick(ids_of(i), scores[i])
            except Exception as e:  # a processor's bug fails its row, not the batch
                logger.exception("sampling failed for row %d", i)
                picks[i] = RequestFailedError(f"sampling failed: {type(e).__name__}")
    return picks


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: Sequence[int]) -> list[TokenLogprob]:
    """The log-probability of each row's token, and its ``k[i]`` most likely alternatives.

    Args:
        logits: ``[rows, vocab]`` raw logits (any float dtype; computed in fp32).
        tokens: one token id per row.
        k: alternatives per row (0 = the token only).

    Math: ``log_softmax(z)[t] = z[t] - logsumexp(z)``, over the raw logits: the model's own
    distribution before processors or temperature (vLLM's default ``raw_logprobs``; see
    ``SamplingParams.logprobs``). Alternatives come from ``torch.topk``, most likely first.
    """
    if not tokens:
        return []
    logp = logits.float().log_softmax(-1)  # [rows, vocab]
    index = torch.tensor(list(tokens), device=logp.device)[:, None]
    chosen = logp.gather(1, index)[:, 0].tolist()
    widest = min(max(k), logp.shape[-1])
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    if widest > 0:
        values, ids = torch.topk(logp, widest, dim=-1)  # sorted, most likely first
        top_values, top_ids = values.tolist(), ids.tolist()
    return [
        TokenLogprob(
            int(tokens[i]),
            float(chosen[i]),
            tuple(zip(top_ids[i][: k[i]], top_values[i][: k[i]], strict=True)) if k[i] else (),
        )
        for i in range(len(tokens))
    ]


__all__ = [
    "PROCESSORS",
    "LogitsProcessor",
    "NoRepeatNgram",
    "Pick",
    "PresenceFrequencyPenalty",
    "RepetitionPenalty",
    "Temperature",
    "TokenSampler",
    "TopK",
    "TopP",
    "pick_tokens",
    "token_logprobs",
]
