"""Reward-model adapters on the inference service: their value heads, their inputs, their scores.

A reward model trained by ``stage: rm`` (``services/trainer/preference_recipe.py``) is a LoRA
adapter plus a value head: PEFT saves the head (``score``, a ``Linear(hidden, 1)``) as a
``modules_to_save`` tensor, and the manifest names it (``value_head: "score"``). The engine serves
the LoRA part like any adapter (per-row slot tables, so reward rows of different adapters share a
forward) and the head is applied here, per row, to the base's final hidden state (after the final
norm) at each row's last token::

    r(x, y) = W_head · h_L[last(x ++ y)] (+ b_head)        # h: [rows, seq, hidden], W: [rows, hidden]

which is what ``AutoModelForSequenceClassification`` + ``PeftModel`` computes on the same ids (it
pools the last non-padding token). The ids are the adapter's training template applied exactly as
in training (``lorafleet.preference_data``): the prompt turns, then the response with its end
marker.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafleet import templates
from lorafleet.adapters import MANIFEST_NAME, Manifest
from lorafleet.errors import FieldProblem, LorafleetError
from services.inference.errors import AdapterIncompatibleError, InvalidRequestError
from services.inference.lora_batch import AdapterWeights, adapter_weights_from_peft_dir
from services.inference.request_checks import Message, check_name, check_prompt, split_messages

VALUE_HEAD_KEY = "value_head"
"""Manifest key naming a reward model's value head module (the recipe writes ``score``)."""
MAX_SCORE_PAIRS = 64
"""Most (prompt, response) pairs one Score request may carry."""


def value_head_of(manifest: Manifest | None) -> str:
    """The value head module a manifest names; empty when the artifact is not a reward model."""
    if manifest is None:
        return ""
    head = manifest.extra.get(VALUE_HEAD_KEY)
    return head if isinstance(head, str) else ""


def skipped_modules(manifest: Manifest | None) -> tuple[str, ...]:
    """``modules_to_save`` entries the LoRA loader leaves out: a reward model's value head, which a
    causal LM base does not have (the head is read by :func:`read_value_head` instead)."""
    head = value_head_of(manifest)
    return (head,) if head else ()


@dataclass(frozen=True)
class RewardHead:
    """A reward model's value head: ``score = weight · h + bias``."""

    weight: torch.Tensor
    """[hidden] float32."""
    bias: float = 0.0


def read_value_head(path: str | Path, module: str, hidden_size: int) -> RewardHead:
    """Read the value head ``module`` (PEFT key ``...{module}.weight``, optional ``.bias``) from an
    adapter directory's ``adapter_model.safetensors``.

    Raises:
        ValueError: no such tensor, or not one output over ``hidden_size`` inputs.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(Path(path) / "adapter_model.safetensors"))
    pattern = re.compile(rf"(^|\.){re.escape(module)}(\.modules_to_save\.[^.]+)?\.(weight|bias)$")
    found = {m.group(3): t for k, t in tensors.items() if (m := pattern.search(k)) is not None}
    weight = found.get("weight")
    if weight is None:
        raise ValueError(f"{path}: the value head {module!r} named by the manifest has no weight tensor")
    if tuple(weight.shape) != (1, hidden_size):
        raise ValueError(
            f"{path}: value head {module!r} has shape {list(weight.shape)}; a reward model's head is "
            f"[1, {hidden_size}] (one score over the base's hidden size)"
        )
    bias = found.get("bias")
    return RewardHead(weight[0].float().clone(), float(bias.reshape(-1)[0]) if bias is not None else 0.0)


def read_manifest(path: str | Path) -> Manifest | None:
    """The manifest of an adapter directory, or None when it has none or it is unreadable (the
    registry has refused such a directory before any loader runs)."""
    try:
        return Manifest.from_dict(json.loads((Path(path) / MANIFEST_NAME).read_text(encoding="utf-8")))
    except (OSError, ValueError, LorafleetError):
        return None


class RewardHeads:
    """The registry's loader for a base model: LoRA weights for every adapter, and, for reward
    models, their value heads, kept by the loader ref (``name@version#content``) for :meth:`get`.

    A head is ``hidden`` floats, so every head read stays (one per published reward-model version);
    content refs never go stale.
    """

    def __init__(self, base_model: nn.Module) -> None:
        self._base = base_model
        config: Any = base_model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.hidden_size = int(text.hidden_size)
        self._heads: dict[str, RewardHead] = {}
        self._lock = threading.Lock()

    def load(self, path: Path, ref: str) -> AdapterWeights:
        """Read an adapter directory; a reward model's head is kept aside under ``ref``."""
        manifest = read_manifest(path)
        head = value_head_of(manifest)
        weights = adapter_weights_from_peft_dir(
            path, ref, self._base, skip_modules_to_save=skipped_modules(manifest)
        )
        if head:
            value_head = read_value_head(path, head, self.hidden_size)
            with self._lock:
                self._heads[ref] = value_head
        return weights

    def get(self, ref: str) -> RewardHead | None:
        """The value head of the adapter loaded as ``ref`` (``AdapterWeights.ref``), if it has one."""
        with self._lock:
            return self._heads.get(ref)


def encode_scored(
    template: templates.Template,
    tokenizer: Any,
    history: list[tuple[str, str]],
    query: str,
    response: str,
    system: str | None,
) -> list[int]:
    """The ids a reward model scores: the conversation's prompt ids, then the response's ids with the
    turn's end marker, as the preference recipe tokenizes a chosen/rejected answer."""
    pieces = templates.encode_turns(template, tokenizer, [*history, (query, response)], system)
    ids: list[int] = []
    for prompt_part, answer_part in pieces[:-1]:
        ids += prompt_part + answer_part
    return ids + pieces[-1][0] + pieces[-1][1]


@dataclass
class ScoreJob:
    """One Score request inside the engine: its rows, the adapter's LoRA weights (slot tables) and
    its value head. Finished by the engine's loop thread (:meth:`finish` / :meth:`fail`)."""

    rows: list[list[int]]
    adapter: AdapterWeights | None
    head: RewardHead
    slot: int = -1
    scores: list[float] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)

    def finish(self, scores: list[float]) -> None:
        self.scores = scores
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def result(self, timeout: float | None = None) -> list[float]:
        """The scores, one per row; raises the job's error, or TimeoutError."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"scoring did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.scores is not None
        return self.scores


def score_forward(
    model: nn.Module, jobs: Sequence[ScoreJob], pad_id: int, device: torch.device
) -> list[list[float]]:
    """One right-padded forward over every row of ``jobs`` (the caller has set each row's LoRA slot,
    in the same order), then each job's value head on its rows' last hidden states.

    Returns:
        The scores of each job, in order.
    """
    rows = [ids for job in jobs for ids in job.rows]
    lengths = torch.tensor([len(r) for r in rows])
    width = int(lengths.max())
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    positions = torch.arange(width)[None, :].expand(len(rows), -1)
    backbone = getattr(model, str(model.base_model_prefix))  # the decoder without the LM head
    hidden = backbone(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=False,
    ).last_hidden_state  # [rows, seq, hidden], after the final norm
    last = hidden[torch.arange(len(rows), device=device), (lengths - 1).to(device)].float()  # [rows, hidden]
    weights = torch.stack([job.head.weight for job in jobs for _ in job.rows]).to(device)  # [rows, hidden]
    bias = torch.tensor([job.head.bias for job in jobs for _ in job.rows], device=device)
    scores = ((last * weights).sum(-1) + bias).tolist()
    out: list[list[float]] = []
    start = 0
    for job in jobs:
        out.append(scores[start : start + len(job.rows)])
        start += len(job.rows)
    return out


@dataclass(frozen=True)
class ScorePair:
    """One answer to score: ``prompt`` or chat ``messages`` (ending with a user turn), and the
    ``response``."""

    prompt: str = ""
    messages: tuple[Message, ...] = ()
    response: str = ""


@dataclass(frozen=True)
class ScoreResult:
    """A Score call's answer: one score per pair, in order, and what it cost."""

    scores: list[float]
    tokens: int
    """Tokens scored over every pair (prompt and response)."""
    adapter: str
    """``name@version`` of the reward model."""
    template: str
    total_time_s: float


def check_score_request(
    adapter: str, pairs: Sequence[ScorePair], max_messages: int, max_chars: int
) -> list[tuple[str | None, list[tuple[str, str]], str, str]]:
    """Every field problem of a Score request at once, each naming its field (``pairs[2].response``).

    Returns:
        Per pair ``(system, history turns, query, response)``.

    Raises:
        InvalidRequestError: a missing or overlong adapter, no pairs or over :data:`MAX_SCORE_PAIRS`,
            a pair with neither or both of prompt and messages, bad messages, an empty or overlong
            response.
    """
    problems: list[FieldProblem] = []
    if check_name("adapter", adapter, problems) and not adapter:
        problems.append(
            FieldProblem("adapter", adapter, "required: the reward-model adapter (name or name@version)")
        )
    if not pairs:
        problems.append(FieldProblem("pairs", [], "give at least one (prompt, response) pair"))
    elif len(pairs) > MAX_SCORE_PAIRS:
        problems.append(
            FieldProblem("pairs", f"<{len(pairs)} pairs>", f"at most {MAX_SCORE_PAIRS} per request")
        )
    if problems:
        raise InvalidRequestError(problems)
    rendered: list[tuple[str | None, list[tuple[str, str]], str, str]] = []
    for i, pair in enumerate(pairs):
        found: list[FieldProblem] = []
        system: str | None = None
        turns: list[tuple[str, str]] = []
        query = pair.prompt
        if pair.prompt and pair.messages:
            found.append(
                FieldProblem(
                    "messages", f"<{len(pair.messages)} messages>", "give prompt or messages, not both"
                )
            )
        elif pair.messages:
            system, turns, query = split_messages(list(pair.messages), max_messages, found, max_chars)
        else:
            check_prompt(pair.prompt, max_chars, found)
        if not pair.response:
            found.append(FieldProblem("response", pair.response, "must not be empty"))
        elif len(pair.response) > max_chars:
            found.append(
                FieldProblem(
                    "response", f"<{len(pair.response)} characters>", f"longer than {max_chars} characters"
                )
            )
        problems += [FieldProblem(f"pairs[{i}].{p.field}", p.value, p.message) for p in found]
        rendered.append((system, turns, query, pair.response))
    if problems:
        raise InvalidRequestError(problems)
    return rendered


def score_pairs(
    host: Any, adapter: str, pairs: Sequence[ScorePair], max_messages: int, max_chars: int
) -> ScoreResult:
    """Score ``pairs`` with reward-model ``adapter`` on a ready base-model host (the plane's
    ``BaseModelHost``: tokenizer, template, engine, registry, reward heads).

    Raises:
        InvalidRequestError: see :func:`check_score_request`; a pair over the model's context.
        AdapterNotFoundError and the registry's other errors for the adapter.
        AdapterIncompatibleError: the adapter has no value head (not trained with ``stage: rm``).
    """
    began = time.perf_counter()
    rendered = check_score_request(adapter, pairs, max_messages, max_chars)
    resolved = host.registry.acquire(adapter)
    try:
        head = host.reward_heads.get(getattr(resolved.weights, "ref", ""))
        if head is None:
            m = resolved.manifest
            stage = m.extra.get("stage") or "sft"
            raise AdapterIncompatibleError(
                f"adapter {resolved.ref} is not a reward model (stage {stage!r}, kind {m.kind!r}, method "
                f"{m.method!r}): it has no value head; Score needs an adapter trained with stage 'rm'"
            )
        template_name = resolved.template or host.template_name
        template = templates.get_template(template_name, host.tokenizer)
        rows = [encode_scored(template, host.tokenizer, t, q, r, s) for s, t, q, r in rendered]
        limit = host.engine.max_context
        long = [
            FieldProblem(
                f"pairs[{i}]", f"<{len(ids)} tokens>", f"longer than the model's context of {limit} tokens"
            )
            for i, ids in enumerate(rows)
            if len(ids) > limit
        ]
        if long:
            raise InvalidRequestError(long)
        job = host.engine.submit_score(ScoreJob(rows, resolved.weights, head))
        scores = job.result()
    finally:
        host.registry.release(resolved)
    tokens = sum(len(r) for r in rows)
    return ScoreResult(scores, tokens, resolved.ref, template_name, time.perf_counter() - began)


__all__ = [
    "MAX_SCORE_PAIRS",
    "VALUE_HEAD_KEY",
    "RewardHead",
    "RewardHeads",
    "ScoreJob",
    "ScorePair",
    "ScoreResult",
    "check_score_request",
    "encode_scored",
    "read_manifest",
    "read_value_head",
    "score_forward",
    "score_pairs",
    "skipped_modules",
    "value_head_of",
]
