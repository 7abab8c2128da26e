"""Preference data: pairwise rows (DPO, reward models) and unpaired KTO rows, validated and tokenized.

Row formats (column names from ``PreferenceConfig``; defaults shown):

- pairwise: ``prompt`` (a string) or ``messages`` (OpenAI messages: an optional system message,
  then user/assistant turns alternating and ending with the user), plus ``chosen`` and ``rejected``
  (a string, or one assistant message ``{"role": "assistant", "content": ...}``, or a list holding
  one). An optional ``system`` string.
- kto: the same prompt, a ``completion`` and a ``label``: true/false or "desirable"/"undesirable".

The prompt is rendered by the run's template exactly as in SFT (``lorafleet.templates.encode_turns``)
and masked; only answer tokens are scored. Every bad row is reported with file, line and field
(missing side, identical chosen and rejected, an answer over ``data.max_target_length`` tokens, a
prompt left without room), like ``lorafleet.data``; ``check_bad_rows`` applies the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorafleet.config import DataConfig, PreferenceConfig
from lorafleet.data import _MISSING, _OPENAI_ROLES, TokenizeStats, _read_records, _Row, _truncate_prompt
from lorafleet.errors import RowProblem, show_value
from lorafleet.preference import PairExample, UnpairedExample
from lorafleet.templates import Template, encode_prefix, encode_turns

_LABELS = {True: True, False: False, "desirable": True, "undesirable": False}


@dataclass
class PreferenceSample:
    """One validated preference row: a conversation prompt and one or two answers."""

    system: str | None
    history: list[tuple[str, str]]
    """Earlier (query, answer) turns, oldest first."""
    prompt: str
    """The last user turn, which the answers reply to."""
    chosen: str
    """The preferred answer (pairwise), or the one answer (KTO)."""
    rejected: str | None
    """The dispreferred answer; None for KTO rows."""
    desirable: bool | None
    """KTO's label; None for pairwise rows."""
    line: int
    path: str = ""


def _answer(row: _Row, value: Any, field_name: str) -> str | None:
    """An answer: a string, one assistant message, or a list holding one."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant":
            row.bad(f"{field_name}.role", f"must be 'assistant', got {show_value(value.get('role'))}")
            return None
        return row.text(value.get("content", _MISSING), f"{field_name}.content")
    return row.text(value, field_name)


def _prompt(row: _Row, cfg: PreferenceConfig) -> tuple[str | None, list[tuple[str, str]], str] | None:
    """(system, history, prompt) from ``messages`` or the prompt column; None when bad."""
    r = row.record
    system = row.text(r.get("system", _MISSING), "system", required=False, allow_empty=True)
    messages = r.get("messages", _MISSING)
    if messages is _MISSING:
        prompt = row.text(r.get(cfg.prompt_column, _MISSING), cfg.prompt_column)
        return None if prompt is None else (system, [], prompt)
    if not isinstance(messages, list) or not messages:
        row.bad("messages", "must be a non-empty list of messages")
        return None
    parsed: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in _OPENAI_ROLES:
            row.bad(
                f"messages[{i}].role",
                f"unknown role {show_value(role)}; expected one of {sorted(_OPENAI_ROLES)}",
            )
            return None
        content = row.text(
            message.get("content", _MISSING), f"messages[{i}].content", allow_empty=role == "system"
        )
        if content is None:
            return None
        if role == "system" and i == 0:
            system = content
            continue
        expected = "user" if len(parsed) % 2 == 0 else "assistant"
        if role != expected:
            row.bad(
                f"messages[{i}].role",
                f"expected {expected!r} here, got {role!r}: turns alternate user/assistant",
            )
            return None
        parsed.append((role, content))
    if not parsed or parsed[-1][0] != "user":
        row.bad("messages", "must end with the user's turn that the answers reply to")
        return None
    history = [(parsed[i][1], parsed[i + 1][1]) for i in range(0, len(parsed) - 1, 2)]
    return system, history, parsed[-1][1]


def _parse(row: _Row, cfg: PreferenceConfig, stage: str) -> PreferenceSample | None:
    r = row.record
    prompt = _prompt(row, cfg)
    if stage == "kto":
        answer = _answer(row, r.get(cfg.completion_column, _MISSING), cfg.completion_column)
        raw = r.get(cfg.label_column, _MISSING)
        label = _LABELS.get(raw) if isinstance(raw, bool | str) else None
        if label is None:
            shown = "missing" if raw is _MISSING else f"got {show_value(raw)}"
            row.bad(cfg.label_column, f"must be true/false or 'desirable'/'undesirable', {shown}")
        if row.problems or prompt is None or answer is None or label is None:
            return None
        return PreferenceSample(prompt[0], prompt[1], prompt[2], answer, None, label, row.line, row.path)
    chosen = _answer(row, r.get(cfg.chosen_column, _MISSING), cfg.chosen_column)
    rejected = _answer(row, r.get(cfg.rejected_column, _MISSING), cfg.rejected_column)
    if chosen is not None and chosen == rejected:
        row.bad(cfg.rejected_column, f"is identical to {cfg.chosen_column}: the pair states no preference")
    if row.problems or prompt is None or chosen is None or rejected is None:
        return None
    return PreferenceSample(prompt[0], prompt[1], prompt[2], chosen, rejected, None, row.line, row.path)


def load_preference_samples(
    path: str, cfg: PreferenceConfig, stage: str
) -> tuple[list[PreferenceSample], list[RowProblem]]:
    """Read and validate every row of a pairwise (``stage`` dpo/rm) or KTO (``stage`` kto) file.

    Returns:
        The valid samples and one or more problems per bad row (file, line, field, what is wrong).

    Raises:
        DatasetError: the file is missing, unreadable, empty or not a list of objects.
    """
    records, problems = _read_records(path)
    samples: list[PreferenceSample] = []
    for line, record in records:
        if not isinstance(record, dict):
            problems.append(
                RowProblem(path, line, "<row>", f"expected a JSON object, got {type(record).__name__}")
            )
            continue
        row = _Row(path, line, record)
        sample = _parse(row, cfg, stage)
        problems.extend(row.problems)
        if sample is not None:
            samples.append(sample)
    problems.sort(key=lambda p: p.line)
    return samples, problems


def _encode(
    sample: PreferenceSample, answer: str, tokenizer: Any, template: Template, cfg: DataConfig, prefix: int
) -> tuple[list[int], list[int], bool]:
    """(prompt ids incl. history, answer ids incl. the end marker, prompt truncated), as in SFT."""
    system = sample.system if sample.system is not None else cfg.system
    pieces = encode_turns(template, tokenizer, [*sample.history, (sample.prompt, answer)], system)
    prompt_ids: list[int] = []
    for prompt_part, answer_part in pieces[:-1]:
        prompt_ids += prompt_part + answer_part
    prompt_ids += pieces[-1][0]
    short = _truncate_prompt(prompt_ids, cfg.max_source_length, prefix)
    return short, pieces[-1][1], len(short) < len(prompt_ids)


def tokenize_preference(
    samples: Sequence[PreferenceSample], tokenizer: Any, template: Template, cfg: DataConfig
) -> tuple[list[Any], TokenizeStats]:
    """Tokenize preference samples; an answer longer than ``cfg.max_target_length`` drops its row.

    Truncating an answer would score a different answer than the one that was judged, so such rows
    are reported (``stats.problems``) instead; prompts keep their end, as in SFT.

    Returns:
        :class:`PairExample` rows (pairwise samples) or :class:`UnpairedExample` rows (KTO samples),
        and the counts.
    """
    prefix = len(encode_prefix(template, tokenizer))
    stats = TokenizeStats(samples=len(samples))
    pairs: list[PairExample] = []
    unpaired: list[UnpairedExample] = []
    for sample in samples:
        answers = [sample.chosen] if sample.rejected is None else [sample.chosen, sample.rejected]
        encoded = [_encode(sample, a, tokenizer, template, cfg, prefix) for a in answers]
        names = ["completion"] if sample.rejected is None else ["chosen", "rejected"]
        too_long = [
            (n, len(ids))
            for n, (_, ids, _) in zip(names, encoded, strict=True)
            if len(ids) > cfg.max_target_length
        ]
        if too_long:
            stats.dropped += 1
            for name, size in too_long:
                stats.problems.append(
                    RowProblem(
                        sample.path,
                        sample.line,
                        name,
                        f"over-length: {size} tokens > data.max_target_length={cfg.max_target_length}",
                    )
                )
            continue
        prompt_ids = encoded[0][0]
        stats.kept += 1
        stats.truncated += int(encoded[0][2])
        stats.tokens += sum(len(prompt_ids) + len(ids) for _, ids, _ in encoded)
        stats.target_tokens += sum(len(ids) for _, ids, _ in encoded)
        if sample.rejected is None:
            unpaired.append(UnpairedExample(prompt_ids, encoded[0][1], bool(sample.desirable), sample.line))
        else:
            pairs.append(PairExample(prompt_ids, encoded[0][1], encoded[1][1], sample.line))
    return (pairs if pairs else unpaired), stats
