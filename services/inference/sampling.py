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
from dataclasses import dataclass

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

    @property
    def new_tokens(self) -> int:
        """``max_new_tokens``, or ``DEFAULT_MAX_NEW_TOKENS`` when unset."""
        return DEFAULT_MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens

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
            bad("max_new_tokens", self.max_new_tokens,
                "must be >= 1" if cap is None else f"must be in [1, {cap}] (the server cap)")  # fmt: skip
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
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", list(self.stop_token_ids), "token ids must be >= 0")
        return problems


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "MAX_REPETITION_PENALTY",
    "MAX_TEMPERATURE",
    "MIN_REPETITION_PENALTY",
    "MIN_TEMPERATURE",
    "SamplingLimits",
    "SamplingParams",
]
