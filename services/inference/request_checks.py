"""Checks of what a client sends the inference service, before anything is tokenized or queued:
sampling fields (server defaults and caps applied) and chat messages (roles, order, sizes). Every
problem is collected, each naming its field and value (``FieldProblem``); the plane raises them
together as INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorafleet.errors import FieldProblem
from services.inference.requests import SamplingParams
from services.inference.settings import InferenceSettings

ROLES = ("system", "user", "assistant")
MAX_TEMPERATURE = 100.0
MAX_NO_REPEAT_NGRAM = 64
MAX_PROMPT_CHARS = 1_000_000
"""Prompts longer than this are refused before tokenizing (a tokenizer call is not free)."""


@dataclass(frozen=True)
class Sampling:
    """Sampling fields as the client sent them; None = unset (the server default applies)."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str


def sampling_params(
    s: Sampling, cfg: InferenceSettings, problems: list[FieldProblem]
) -> SamplingParams | None:
    """The engine's ``SamplingParams`` for what the client sent, server defaults and caps applied;
    None (with ``problems`` extended, each naming its field) when any field is invalid."""
    before = len(problems)
    cap = cfg.max_new_tokens_cap
    max_new = min(cfg.default_max_new_tokens, cap) if s.max_new_tokens is None else s.max_new_tokens
    if s.max_new_tokens is not None and not 1 <= s.max_new_tokens <= cap:
        problems.append(
            FieldProblem(
                "sampling.max_new_tokens", s.max_new_tokens, f"must be in [1, {cap}] (the server cap)"
            )
        )
    temperature = 0.0 if s.temperature is None else s.temperature
    if not math.isfinite(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        problems.append(
            FieldProblem(
                "sampling.temperature", s.temperature, f"must be in [0, {MAX_TEMPERATURE}]; 0 = greedy"
            )
        )
    top_p = 1.0 if s.top_p is None else s.top_p
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        problems.append(FieldProblem("sampling.top_p", s.top_p, "must be in (0, 1]"))
    top_k = 0 if s.top_k is None else s.top_k
    if top_k < 0:
        problems.append(FieldProblem("sampling.top_k", s.top_k, "must be >= 0; 0 = off"))
    penalty = 1.0 if s.repetition_penalty is None else s.repetition_penalty
    if not math.isfinite(penalty) or penalty <= 0:
        problems.append(
            FieldProblem("sampling.repetition_penalty", s.repetition_penalty, "must be > 0; 1 = off")
        )
    ngram = 0 if s.no_repeat_ngram_size is None else s.no_repeat_ngram_size
    if not 0 <= ngram <= MAX_NO_REPEAT_NGRAM:
        problems.append(
            FieldProblem(
                "sampling.no_repeat_ngram_size",
                s.no_repeat_ngram_size,
                f"must be in [0, {MAX_NO_REPEAT_NGRAM}]",
            )
        )
    if len(s.stop) > cfg.max_stop_sequences:
        problems.append(
            FieldProblem("sampling.stop", list(s.stop), f"at most {cfg.max_stop_sequences} stop sequences")
        )
    for i, stop in enumerate(s.stop):
        if not stop:
            problems.append(FieldProblem(f"sampling.stop[{i}]", stop, "must not be empty"))
        elif len(stop) > cfg.max_stop_length:
            problems.append(
                FieldProblem(f"sampling.stop[{i}]", stop, f"longer than {cfg.max_stop_length} characters")
            )
    if len(problems) > before:
        return None
    return SamplingParams(
        max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=penalty, no_repeat_ngram_size=ngram, stop_strings=tuple(s.stop), seed=s.seed,
    )  # fmt: skip


def split_messages(
    messages: list[Message], max_messages: int, problems: list[FieldProblem]
) -> tuple[str | None, list[tuple[str, str]], str]:
    """``(system, history turns, final query)`` from messages: an optional leading system
    message, then user/assistant alternating, ending with a user message."""
    if not messages:
        problems.append(FieldProblem("messages", [], "give at least one user message"))
        return None, [], ""
    if len(messages) > max_messages:
        problems.append(FieldProblem("messages", f"<{len(messages)} messages>", f"at most {max_messages}"))
        return None, [], ""
    system: str | None = None
    rest = list(enumerate(messages))
    if messages[0].role == "system":
        system = messages[0].content
        rest = rest[1:]
    expected = "user"
    turns: list[tuple[str, str]] = []
    query = ""
    for i, msg in rest:
        if msg.role not in ROLES:
            problems.append(FieldProblem(f"messages[{i}].role", msg.role, f"must be one of {list(ROLES)}"))
            continue
        if msg.role != expected:
            why = "only the first message may be a system message" if msg.role == "system" else (
                f"expected a {expected} message here: user and assistant messages alternate, starting with user"
            )  # fmt: skip
            problems.append(FieldProblem(f"messages[{i}].role", msg.role, why))
            continue
        if msg.role == "user" and not msg.content:
            problems.append(
                FieldProblem(f"messages[{i}].content", msg.content, "a user message must not be empty")
            )
        if len(msg.content) > MAX_PROMPT_CHARS:
            problems.append(
                FieldProblem(f"messages[{i}].content", f"<{len(msg.content)} characters>", "too long")
            )
        if msg.role == "user":
            query = msg.content
            expected = "assistant"
        else:
            turns.append((query, msg.content))
            expected = "user"
    if not problems and expected != "assistant":
        last = len(messages) - 1
        problems.append(
            FieldProblem(
                f"messages[{last}].role", messages[last].role, "the last message must be a user message"
            )
        )
    return system, turns, query
