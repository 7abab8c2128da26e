"""Sampling parameters: how one request picks its tokens and when it stops, with their own checks.

``SamplingParams`` is the one type for them, from the servicer (built field by field from the
protobuf ``SamplingParams``: the field names are the same) down to the engine. ``validate`` returns
every problem at once, each naming its field and value; the server caps (``SamplingLimits``) are
checked there too. What each parameter does to the logits lives in ``processors.py``.

Adding a sampling parameter takes: the proto field (``proto/lorafleet/v1/inference.proto``, then
``make proto``), the field here with its check in ``validate``, one processor in ``processors.py``,
and the CLI flag in ``client.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lorafleet.errors import FieldProblem

DEFAULT_MAX_NEW_TOKENS = 128
"""``max_new_tokens`` of a request that sets none and reaches the engine without a server default."""
MAX_TEMPERATURE = 100.0
MIN_TEMPERATURE = 1e-5
"""The smallest non-zero temperature. Logits are divided by it in float32: at 1e-5 a logit of 1e4
becomes 1e9, far from overflow (3.4e38), while 1e-300 turns every logit into +-inf and the
probabilities into NaN. Below it, ask for greedy (0)."""
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
"""The penalty multiplies or divides logits; outside [0.01, 100] it stops being a penalty and starts
being an overflow (1e300 is inf in float32, and 0 x inf is NaN)."""
MAX_NO_REPEAT_NGRAM = 64
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
"""The proto's int64; every value in it picks its own samples (``processors.TokenSampler``)."""
MAX_LOGPROBS = 20
"""The most alternatives a request may ask per token: OpenAI's ``top_logprobs`` bound and vLLM's
default ``max_logprobs``."""
MAX_PENALTY = 2.0
"""``presence_penalty`` and ``frequency_penalty`` lie in [-2, 2], as in OpenAI's API."""
MAX_N = 16
"""The most samples one request may ask for; each is a batch row of its own."""


@dataclass(frozen=True)
class SamplingLimits:
    """Server caps on what a client may ask for; None = no cap."""

    max_new_tokens: int | None = None
    """The largest ``max_new_tokens`` accepted."""
    max_stop_sequences: int | None = None
    """The most stop strings one request may give."""
    max_stop_length: int | None = None
    """The longest stop string accepted, in characters."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; the semantics follow HF ``generate``.

    Constructing one never raises, so that every problem of a client's request can be reported at
    once: call :meth:`validate` (the engine refuses invalid parameters).
    """

    max_new_tokens: int | None = None
    """Generated-token limit (finish reason ``length``); None = the server's default (the engine
    alone: ``DEFAULT_MAX_NEW_TOKENS``)."""
    temperature: float = 0.0
    """0 = greedy; otherwise in [``MIN_TEMPERATURE``, ``MAX_TEMPERATURE``], and logits are divided by
    it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    repetition_penalty: float = 1.0
    """HF/CTRL penalty over prompt and generated tokens (1 = off), in [0.01, 100]."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating any n-gram of the sequence (0 = off)."""
    stop: tuple[str, ...] = ()
    """Texts that end generation; the returned text is cut before them. Applied above the engine,
    which sees token ids only (``GenerationRequest.stop_check``)."""
    seed: int | None = None
    """Seed of this request's own random stream (all 64 bits count); None draws one from torch's
    default generator."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end generation (finish reason ``stop``; the token is returned). Set by the plane
    from the chat template, not by clients."""
    ignore_eos: bool = False
    """Do not stop at the model's eos token."""
    presence_penalty: float = 0.0
    """OpenAI's presence penalty, in [-2, 2] (0 = off): subtracted once from the logit of every
    token id that already occurs in this sample's generated tokens (the prompt does not count)."""
    frequency_penalty: float = 0.0
    """OpenAI's frequency penalty, in [-2, 2] (0 = off): subtracted from the logit of every token id
    times the number of times it occurs in this sample's generated tokens."""
    logprobs: int | None = None
    """Report each generated token's log-probability and the ``logprobs`` most likely alternatives
    (None = off; 0 = the chosen token only), at most ``MAX_LOGPROBS``. The values are the model's
    log-softmax over the raw logits, before any processor or temperature: vLLM's default
    (``raw_logprobs``) and what OpenAI reports; they do not depend on how the token was picked."""
    prompt_logprobs: int | None = None
    """Report every prompt token's log-probability given the tokens before it (the first has none)
    and the ``prompt_logprobs`` most likely alternatives (None = off), at most ``MAX_LOGPROBS``:
    what ``echo`` with ``logprobs`` needs (lm-evaluation-harness's loglikelihood). It makes the
    prefill keep the logits of every prompt position."""
    n: int = 1
    """Samples to generate from the prompt, in [1, ``MAX_N``]; each is a batch row. With a
    ``seed``, sample i draws from ``seed + i`` (wrapped into int64), as vLLM does."""

    @property
    def new_tokens(self) -> int:
        """``max_new_tokens``, or ``DEFAULT_MAX_NEW_TOKENS`` when unset."""
        return DEFAULT_MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens

    def for_sample(self, index: int) -> SamplingParams:
        """The parameters of sample ``index`` of ``n``: one sample, and, with a seed, the seed
        ``seed + index`` wrapped into int64 (so the samples differ and each is reproducible)."""
        seed = self.seed
        if seed is not None:
            seed = (seed + index - SEED_MIN) % 2**64 + SEED_MIN
        return replace(self, n=1, seed=seed)

    def validate(self, limits: SamplingLimits | None = None, prefix: str = "") -> list[FieldProblem]:
        """Every problem with these parameters (empty when they are valid).

        Args:
            limits: server caps to enforce as well.
            prefix: put before each field name, e.g. ``sampling.`` for a request's field.
        """
        limits = limits or SamplingLimits()
        problems: list[FieldProblem] = []

        def bad(name: str, value: object, message: str) -> None:
            problems.append(FieldProblem(prefix + name, value, message))

        cap = limits.max_new_tokens
        if self.max_new_tokens is not None and (
            self.max_new_tokens < 1 or (cap is not None and self.max_new_tokens > cap)
        ):
            bad(
                "max_new_tokens",
                self.max_new_tokens,
                "must be >= 1" if cap is None else f"must be in [1, {cap}] (the server cap)",
            )
        if not math.isfinite(self.temperature) or not (
            self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE
        ):
            bad(
                "temperature",
                self.temperature,
                f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]",
            )
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if self.top_k < 0:
            bad("top_k", self.top_k, "must be >= 0; 0 = off")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:  # NaN fails too
            bad(
                "repetition_penalty",
                self.repetition_penalty,
                f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]; 1 = off",
            )
        if not 0 <= self.no_repeat_ngram_size <= MAX_NO_REPEAT_NGRAM:
            bad("no_repeat_ngram_size", self.no_repeat_ngram_size, f"must be in [0, {MAX_NO_REPEAT_NGRAM}]")
        if limits.max_stop_sequences is not None and len(self.stop) > limits.max_stop_sequences:
            bad("stop", list(self.stop), f"at most {limits.max_stop_sequences} stop sequences")
        for i, stop in enumerate(self.stop):
            if not stop:
                bad(f"stop[{i}]", stop, "must not be empty")
            elif limits.max_stop_length is not None and len(stop) > limits.max_stop_length:
                bad(f"stop[{i}]", stop, f"longer than {limits.max_stop_length} characters")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            bad("seed", self.seed, "must fit in a signed 64-bit integer")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:  # NaN fails too
                bad(name, value, f"must be in [{-MAX_PENALTY:g}, {MAX_PENALTY:g}]; 0 = off")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                bad(name, value, f"must be in [0, {MAX_LOGPROBS}] (alternatives per token), or unset")
        if not 1 <= self.n <= MAX_N:
            bad("n", self.n, f"must be in [1, {MAX_N}]")
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", list(self.stop_token_ids), "token ids must be >= 0")
        return problems


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "MAX_LOGPROBS",
    "MAX_N",
    "MAX_PENALTY",
    "MAX_REPETITION_PENALTY",
    "MAX_TEMPERATURE",
    "MIN_REPETITION_PENALTY",
    "MIN_TEMPERATURE",
    "SamplingLimits",
    "SamplingParams",
]
