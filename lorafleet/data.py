"""Training data: load and validate JSON/JSONL files, tokenize with label masks, pack, batch.

Pipeline::

    samples, problems = load_dataset(path, cfg)              # every bad row reported, threshold applied
    examples, stats = tokenize_samples(samples, tok, template, cfg)
    rows = pack_examples(examples, cfg.packing_length)       # only with cfg.packing
    batches = length_grouped_batches([len(e.input_ids) for e in examples], 8, seed, epoch, rank, world)
    batch = collate([examples[i] for i in batches[0]], tok.pad_token_id)

Formats (``DataConfig.format``; ``auto`` looks at the first object that names one):

- alpaca: ``instruction``, optional ``input`` (appended to the instruction on a new line),
  ``output``, optional ``system``, optional ``history`` = ``[[query, answer], ...]``.
- messages: OpenAI ``messages: [{role, content}]`` (system/user/assistant) or ShareGPT
  ``conversations: [{from, value}]`` (system/human/gpt); an optional first system message, then
  user/assistant turns alternating and ending with the assistant.
- columns: ``DataConfig.prompt_column`` / ``response_column`` / ``system_column`` (PromptCBLUE:
  ``input`` / ``target``).

Bad data never raises a traceback: every bad row becomes a ``RowProblem`` (file, line, field, what is
wrong) and ``check_bad_rows`` raises one ``DatasetError`` quoting the first problems.

Packing keeps attention inside each sample. ``PackedRow.position_ids`` restart at 0 for every sample;
transformers (5.x) detects packed rows from such position_ids when the forward gets NO 2-D
attention_mask and NO cache, so the trainer must call ``model(**batch, use_cache=False)`` (with the
default ``use_cache`` a cache is created and the detection is silently skipped: samples then attend
to each other). Models that ignore position_ids (ALiBi: BLOOM, Falcon's masks) need the explicit
block-diagonal 4-D mask (``mode="mask4d"``). :func:`detect_packing_mode` proves which works on the
actual model, and refuses packing when neither does (BLOOM, PEFT prefix tuning, remote code that
builds its own mask).
"""

from __future__ import annotations

import bisect
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafleet.config import DataConfig
from lorafleet.errors import ConfigError, DatasetError, FieldProblem, RowProblem, show_value
from lorafleet.templates import Template, encode_prefix, encode_turns

IGNORE_INDEX = -100
_MAX_QUOTED_PROBLEMS = 10
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
_MISSING: Any = object()
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Sample:
    """One validated conversation."""

    system: str | None
    """The sample's own system prompt; None = use the config's or the template's."""
    turns: list[tuple[str, str]]
    """(query, answer) pairs, oldest first."""
    line: int
    """1-based line (JSONL) or record index (JSON array) in the source file."""
    path: str = ""
    """Source file, for error messages."""


@dataclass
class Example:
    """One tokenized sample; ``labels`` is -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    line: int = 0


@dataclass
class TokenizeStats:
    """What tokenization did to the samples."""

    samples: int = 0
    kept: int = 0
    truncated: int = 0
    """Samples where some prompt or response (or the whole row, when packing) was cut."""
    dropped: int = 0
    """Samples with no answer token left after truncation."""
    tokens: int = 0
    target_tokens: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    """One per dropped sample (feed them to :func:`check_bad_rows` with the loading problems)."""


@dataclass
class PackedRow:
    """Several examples in one row; ``position_ids`` restart at 0 at every sample."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading files


def _read_records(path: str) -> tuple[list[tuple[int, Any]], list[RowProblem]]:
    """Parse a JSON array, a single JSON object, or JSONL into (line, value) pairs plus problems."""
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the file: {e.strerror}") from e
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty")
    try:
        whole = json.loads(text)
    except (ValueError, RecursionError) as e:
        if text.lstrip().startswith("["):
            where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            raise DatasetError(f"{path}: malformed JSON array{where}: {_json_failure(e)}") from e
        return _read_jsonl(path, text)
    if isinstance(whole, list):
        return list(enumerate(whole, start=1)), []
    if isinstance(whole, dict):
        return [(1, whole)], []
    raise DatasetError(
        f"{path}: the top level is a JSON {type(whole).__name__}; expected a list of objects or JSONL "
        "(one object per line)"
    )


def _json_failure(error: ValueError | RecursionError) -> str:
    """What is wrong with a JSON text, in a few words (the parser's own message is short)."""
    if isinstance(error, json.JSONDecodeError):
        return error.msg
    if isinstance(error, RecursionError):
        return "nested too deeply"
    # int() refuses numbers of more than sys.get_int_max_str_digits() digits (CVE-2020-10735).
    return f"cannot be read: {show_value(str(error))}"


def _read_jsonl(path: str, text: str) -> tuple[list[tuple[int, Any]], list[RowProblem]]:
    """One record per line. Lines end at ``\n`` only, as JSON Lines defines: a JSON string may hold
    U+2028, U+0085 and the like, which ``str.splitlines`` would take for line ends."""
    records: list[tuple[int, Any]] = []
    problems: list[RowProblem] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except (ValueError, RecursionError) as e:
            column = f" at column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            problems.append(RowProblem(path, number, "<json>", f"malformed JSON{column}: {_json_failure(e)}"))
    return records, problems


def _detect_format(records: list[tuple[int, Any]], cfg: DataConfig, path: str) -> str:
    """The format named by the first object that has a known key."""
    first_keys: list[str] | None = None
    for _, record in records:
        if not isinstance(record, dict):
            continue
        if first_keys is None:
            first_keys = sorted(record)
        if "messages" in record or "conversations" in record:
            return "messages"
        if "instruction" in record:
            return "alpaca"
        if cfg.prompt_column in record:
            return "columns"
    raise DatasetError(
        f"{path}: cannot tell the data format: no row has 'messages', 'conversations', 'instruction' or "
        f"the prompt column '{cfg.prompt_column}' (first row's keys: {show_value(first_keys)}); set data.format "
        "and the column names"
    )


# ----------------------------------------------------------------------------- row parsers


class _Row:
    """Collects the problems of one row."""

    def __init__(self, path: str, line: int, record: dict[str, Any]) -> None:
        self.path, self.line, self.record = path, line, record
        self.problems: list[RowProblem] = []

    def bad(self, field_name: str, message: str) -> None:
        self.problems.append(RowProblem(self.path, self.line, field_name, message))

    def text(
        self, value: Any, field_name: str, required: bool = True, allow_empty: bool = False
    ) -> str | None:
        """A string field (``_MISSING`` when absent): None when absent and optional, or when wrong."""
        if value is _MISSING or value is None:
            if required:
                self.bad(field_name, "missing" if value is _MISSING else "is null")
            return None
        if not isinstance(value, str):
            self.bad(field_name, f"must be a string, got {type(value).__name__}")
            return None
        if not allow_empty and not value.strip():
            self.bad(field_name, "is empty")
            return None
        surrogate = _SURROGATE.search(value)
        if surrogate:
            # JSON can escape half of a UTF-16 pair ("\\ud800"); no tokenizer can encode that.
            self.bad(field_name, f"is not valid Unicode: unpaired surrogate {surrogate.group()!r}")
            return None
        return value


def _parse_alpaca(row: _Row) -> Sample | None:
    r = row.record
    instruction = row.text(r.get("instruction", _MISSING), "instruction")
    extra = row.text(r.get("input", _MISSING), "input", required=False, allow_empty=True)
    output = row.text(r.get("output", _MISSING), "output")
    system = row.text(r.get("system", _MISSING), "system", required=False, allow_empty=True)
    turns: list[tuple[str, str]] = []
    history = r.get("history")
    if history is not None:
        if not isinstance(history, list):
            row.bad("history", f"must be a list of [query, answer] pairs, got {type(history).__name__}")
        else:
            for i, pair in enumerate(history):
                if not isinstance(pair, list | tuple) or len(pair) != 2:
                    row.bad(f"history[{i}]", "must be a [query, answer] pair")
                    continue
                query = row.text(pair[0], f"history[{i}][0]")
                answer = row.text(pair[1], f"history[{i}][1]")
                if query is not None and answer is not None:
                    turns.append((query, answer))
    if row.problems or instruction is None or output is None:
        return None
    query = f"{instruction}\n{extra}" if extra and extra.strip() else instruction
    return Sample(system, [*turns, (query, output)], row.line, row.path)


def _parse_messages(row: _Row) -> Sample | None:
    r = row.record
    key, role_key, text_key, roles = (
        ("messages", "role", "content", _OPENAI_ROLES)
        if "messages" in r
        else ("conversations", "from", "value", _SHAREGPT_ROLES)
    )
    messages = r.get(key)
    if not isinstance(messages, list) or not messages:
        row.bad(key, "missing" if messages is None else "must be a non-empty list of messages")
        return None
    system = row.text(r.get("system", _MISSING), "system", required=False, allow_empty=True)
    parsed: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            row.bad(where, f"must be an object with '{role_key}' and '{text_key}'")
            continue
        raw_role = message.get(role_key)
        role = roles.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            row.bad(
                f"{where}.{role_key}", f"unknown role {show_value(raw_role)}; expected one of {sorted(roles)}"
            )
            continue
        content = row.text(
            message.get(text_key, _MISSING), f"{where}.{text_key}", allow_empty=role == "system"
        )
        if content is not None:
            parsed.append((role, content))
    if row.problems:
        return None
    if parsed[0][0] == "system":
        system = parsed.pop(0)[1]
    return _pair_turns(row, key, role_key, parsed, system, offset=len(messages) - len(parsed))


def _pair_turns(
    row: _Row, key: str, role_key: str, parsed: list[tuple[str, str]], system: str | None, offset: int
) -> Sample | None:
    """Check user/assistant alternation, ending with the assistant, and pair the turns."""
    if not parsed:
        row.bad(key, "has no user/assistant messages")
        return None
    for i, (role, _) in enumerate(parsed):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            hint = "a system message is only allowed first; " if role == "system" else ""
            row.bad(
                f"{key}[{i + offset}].{role_key}",
                f"expected {expected!r} here, got {role!r}: {hint}turns must alternate user/assistant",
            )
            return None
    if parsed[-1][0] != "assistant":
        row.bad(key, "the last message must be from the assistant (nothing to learn after the user's turn)")
        return None
    turns = [(parsed[i][1], parsed[i + 1][1]) for i in range(0, len(parsed), 2)]
    return Sample(system, turns, row.line, row.path)


def _parse_columns(row: _Row, cfg: DataConfig) -> Sample | None:
    r = row.record
    prompt = row.text(r.get(cfg.prompt_column, _MISSING), cfg.prompt_column)
    response = row.text(r.get(cfg.response_column, _MISSING), cfg.response_column)
    system = None
    if cfg.system_column:
        system = row.text(
            r.get(cfg.system_column, _MISSING), cfg.system_column, required=False, allow_empty=True
        )
    if row.problems or prompt is None or response is None:
        return None
    return Sample(system, [(prompt, response)], row.line, row.path)


# ----------------------------------------------------------------------------- loading


def load_samples(path: str, cfg: DataConfig) -> tuple[list[Sample], list[RowProblem]]:
    """Read and validate every row of a JSON or JSONL file.

    Args:
        path: A JSON array, a single JSON object, or JSONL (one object per line).
        cfg: Format and column names.

    Returns:
        The valid samples and one or more problems for every bad row (line, field, what is wrong).

    Raises:
        DatasetError: the file is missing, unreadable, empty, not a list of objects, or its format
            cannot be detected.
    """
    records, problems = _read_records(path)
    fmt = cfg.format if cfg.format != "auto" else _detect_format(records, cfg, path)
    samples: list[Sample] = []
    for line, record in records:
        if not isinstance(record, dict):
            problems.append(
                RowProblem(path, line, "<row>", f"expected a JSON object, got {type(record).__name__}")
            )
            continue
        row = _Row(path, line, record)
        if fmt == "alpaca":
            sample = _parse_alpaca(row)
        elif fmt == "messages":
            if "messages" not in record and "conversations" not in record:
                row.bad("messages", "missing (expected 'messages' or 'conversations')")
                sample = None
            else:
                sample = _parse_messages(row)
        else:
            sample = _parse_columns(row, cfg)
        problems.extend(row.problems)
        if sample is not None:
            samples.append(sample)
    problems.sort(key=lambda p: p.line)
    return samples, problems


def count_bad_rows(problems: Sequence[RowProblem]) -> int:
    """Number of distinct rows with at least one problem."""
    return len({(p.path, p.line) for p in problems})


def check_bad_rows(path: str, total: int, problems: Sequence[RowProblem], max_bad_fraction: float) -> None:
    """Refuse a dataset whose share of bad rows is above ``max_bad_fraction``.

    Raises:
        DatasetError: one error saying how many rows are bad out of how many, quoting the first
            problems as ``file:line: field: message``; also when no row at all is usable.
    """
    bad = count_bad_rows(problems)
    if total > 0 and bad < total and bad / total <= max_bad_fraction:
        return
    shown = "\n".join(f"  - {p}" for p in problems[:_MAX_QUOTED_PROBLEMS])
    more = (
        f"\n  ... and {len(problems) - _MAX_QUOTED_PROBLEMS} more"
        if len(problems) > _MAX_QUOTED_PROBLEMS
        else ""
    )
    if bad >= total:
        head = f"{path}: no usable rows: all {total} rows are invalid"
    else:
        head = (
            f"{path}: {bad} of {total} rows are invalid ({bad / total:.1%}), more than "
            f"data.max_bad_fraction={max_bad_fraction} allows"
        )
    raise DatasetError(f"{head}; first problems:\n{shown}{more}", list(problems))


def load_dataset(path: str, cfg: DataConfig) -> tuple[list[Sample], list[RowProblem]]:
    """:func:`load_samples`, then :func:`check_bad_rows` with ``cfg.max_bad_fraction``.

    Returns:
        The valid samples and the tolerated problems (to log as warnings).
    """
    samples, problems = load_samples(path, cfg)
    check_bad_rows(path, len(samples) + count_bad_rows(problems), problems, cfg.max_bad_fraction)
    return samples, problems


def split_samples(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of the samples (at least one when fraction > 0), deterministically."""
    if fraction <= 0 or len(samples) < 2:
        return list(samples), []
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(samples) * fraction))
    held_set = set(order[:held])
    train = [s for i, s in enumerate(samples) if i not in held_set]
    return train, [s for i, s in enumerate(samples) if i in held_set]


# ----------------------------------------------------------------------------- tokenization


def _truncate_prompt(ids: list[int], limit: int, keep_head: int) -> list[int]:
    """Keep the END of a long prompt (the question and the answer cue), plus the template prefix."""
    if len(ids) <= limit:
        return ids
    head = ids[:keep_head] if keep_head < limit else []
    return head + ids[len(ids) - (limit - len(head)) :]


def tokenize_sample(
    sample: Sample, tokenizer: Any, template: Template, cfg: DataConfig, prefix_length: int = 0
) -> tuple[Example, bool]:
    """Tokenize one sample into an Example; also say whether anything was truncated.

    Every assistant turn is trained unless ``cfg.mask_history`` (then only the last one);
    ``cfg.train_on_prompt`` also trains the prompt tokens of the trained turns. Prompts are cut to
    ``max_source_length`` keeping their end (and the template prefix), responses to
    ``max_target_length`` keeping their start; with packing the row is capped at ``packing_length``.
    """
    system = sample.system if sample.system is not None else cfg.system
    input_ids: list[int] = []
    labels: list[int] = []
    truncated = False
    pieces = encode_turns(template, tokenizer, sample.turns, system)
    for index, (prompt_ids, response_ids) in enumerate(pieces):
        short_prompt = _truncate_prompt(prompt_ids, cfg.max_source_length, prefix_length if index == 0 else 0)
        short_response = response_ids[: cfg.max_target_length]
        truncated |= len(short_prompt) < len(prompt_ids) or len(short_response) < len(response_ids)
        trained = not cfg.mask_history or index == len(pieces) - 1
        input_ids += short_prompt + short_response
        labels += short_prompt if (trained and cfg.train_on_prompt) else [IGNORE_INDEX] * len(short_prompt)
        labels += short_response if trained else [IGNORE_INDEX] * len(short_response)
    if cfg.packing and len(input_ids) > cfg.packing_length:
        input_ids, labels, truncated = input_ids[: cfg.packing_length], labels[: cfg.packing_length], True
    return Example(input_ids, labels, sample.line), truncated


def tokenize_samples(
    samples: Sequence[Sample], tokenizer: Any, template: Template, cfg: DataConfig
) -> tuple[list[Example], TokenizeStats]:
    """Tokenize samples with label masks (see :func:`tokenize_sample`).

    Returns:
        The examples and the counts; ``stats.problems`` holds one RowProblem per sample dropped
        because no answer token was left.
    """
    prefix_length = len(encode_prefix(template, tokenizer))
    stats = TokenizeStats(samples=len(samples))
    examples: list[Example] = []
    for sample in samples:
        example, truncated = tokenize_sample(sample, tokenizer, template, cfg, prefix_length)
        stats.truncated += int(truncated)
        # labels[0] is never a target: the model predicts token t+1 from tokens <= t.
        targets = sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)
        if targets == 0:
            stats.dropped += 1
            limit = f"data.packing_length={cfg.packing_length}" if cfg.packing else "data.max_source_length"
            stats.problems.append(
                RowProblem(
                    sample.path,
                    sample.line,
                    "<target>",
                    f"no answer token left after truncation ({len(example.input_ids)} tokens "
                    f"kept); raise {limit} or shorten the prompt",
                )
            )
            continue
        stats.kept += 1
        stats.tokens += len(example.input_ids)
        stats.target_tokens += targets
        examples.append(example)
    return examples, stats


# ----------------------------------------------------------------------------- packing


def pack_examples(examples: Sequence[Example], packing_length: int) -> list[PackedRow]:
    """Pack examples into rows of at most ``packing_length`` tokens (best-fit decreasing).

    The first label of every sample becomes -100: in a packed row it would otherwise be predicted
    from the previous sample's last token, a target that unpacked training never has.

    Raises:
        ValueError: an example is longer than ``packing_length`` (tokenize with ``cfg.packing``).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[PackedRow] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in order:
        example = examples[i]
        size = len(example.input_ids)
        if size > packing_length:
            raise ValueError(f"example of {size} tokens does not fit packing_length={packing_length}")
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            room, row_index = free.pop(slot)
        else:
            room, row_index = packing_length, len(rows)
            rows.append(PackedRow())
        row = rows[row_index]
        row.input_ids += example.input_ids
        row.labels += [IGNORE_INDEX, *example.labels[1:]]
        row.position_ids += list(range(size))
        row.lengths.append(size)
        if room - size > 0:
            bisect.insort(free, (room - size, row_index))
    return rows


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into ``input_ids``, ``attention_mask``, ``labels`` (all [batch, seq], long)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :size] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(
    rows: Sequence[PackedRow],
    pad_token_id: int,
    mode: str = "position_ids",
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Right-pad packed rows into a batch that keeps attention within each sample.

    Args:
        rows: From :func:`pack_examples`.
        pad_token_id: Token for the padding (its labels are -100).
        mode: ``position_ids`` (no attention_mask; transformers derives the block-diagonal causal
            mask from the restarting position_ids) or ``mask4d`` (an explicit additive
            [batch, 1, seq, seq] mask in ``mask_dtype``, for models that ignore position_ids).
        mask_dtype: dtype of the 4-D mask: the model's compute dtype.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` ([batch, seq]) and, for ``mask4d``,
        ``attention_mask``. Call the model with ``use_cache=False``.
    """
    if mode not in ("position_ids", "mask4d"):
        raise ValueError(f"unknown packing mode {mode!r}")
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        size = len(row.input_ids)
        input_ids[b, :size] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[b, :size] = torch.tensor(row.labels, dtype=torch.long)
        # Padding restarts at position 0 too, so it forms its own segment and attends only to itself.
        position_ids[b] = torch.tensor(row.position_ids + list(range(width - size)), dtype=torch.long)
        segments[b] = torch.repeat_interleave(
            torch.arange(len(row.lengths) + 1), torch.tensor([*row.lengths, width - size])
        )
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if mode == "mask4d":
        causal = torch.tril(torch.ones((width, width), dtype=torch.bool))
        allowed = (segments[:, :, None] == segments[:, None, :]) & causal  # [batch, seq, seq]
        mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill(~allowed, torch.finfo(mask_dtype).min)
        batch["attention_mask"] = mask[:, None]
    return batch


def detect_packing_mode(model: Any, rtol: float | None = None) -> str:
    """Find how this model keeps attention within packed samples, by checking it.

    Runs two short random samples packed in one row and the second one alone, and compares its
    logits; tries ``position_ids`` first, then ``mask4d``. Call it before wrapping the model in
    DeepSpeed/DDP. The model is put in eval mode for the check and restored afterwards.

    Args:
        model: A causal LM (PEFT-wrapped is fine).
        rtol: Allowed max |logit difference| relative to the largest |logit|; defaults to 1e-4 for
            fp32 and 1e-2 for half-precision weights.

    Returns:
        ``position_ids`` or ``mask4d``, for :func:`collate_packed`.

    Raises:
        ConfigError: on ``data.packing`` when neither keeps the samples apart (e.g. BLOOM's ALiBi
            masks, PEFT prefix tuning, remote-code models that build their own masks).
    """
    embeddings = model.get_input_embeddings()
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    tolerance = rtol if rtol is not None else (1e-4 if dtype == torch.float32 else 1e-2)
    generator = torch.Generator().manual_seed(0)
    vocab = int(embeddings.num_embeddings)
    first = torch.randint(0, vocab, (24,), generator=generator).tolist()
    second = torch.randint(0, vocab, (8,), generator=generator).tolist()
    row = PackedRow(first + second, [IGNORE_INDEX] * 32, list(range(24)) + list(range(8)), [24, 8])
    was_training = model.training
    model.eval()
    errors: list[str] = []
    try:
        with torch.no_grad():
            alone = model(
                input_ids=torch.tensor([second], device=param.device), use_cache=False
            ).logits.float()
            scale = float(alone.abs().max()) or 1.0
            for mode in ("position_ids", "mask4d"):
                batch = collate_packed([row], 0, mode, dtype)
                batch.pop("labels")
                try:
                    packed = model(
                        **{k: v.to(param.device) for k, v in batch.items()}, use_cache=False
                    ).logits
                except Exception as e:  # a model that rejects the inputs cannot pack that way
                    errors.append(f"{mode}: {type(e).__name__}: {e}")
                    continue
                diff = float((packed[:, 24:].float() - alone).abs().max())
                if diff <= tolerance * scale:
                    return mode
                errors.append(f"{mode}: logits differ by {diff:.3g}")
    finally:
        model.train(was_training)
    raise ConfigError(
        [
            FieldProblem(
                "data.packing",
                True,
                f"{type(model).__name__} lets packed samples attend to each other "
                f"({'; '.join(errors)}); set data.packing=false",
            )
        ]
    )


# ----------------------------------------------------------------------------- batching


def _rng(seed: int, epoch: int) -> random.Random:
    return random.Random(seed * 1_000_003 + epoch)


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches; every rank gets the same count (the list is cycled to a multiple).

    Repeating a few batches, as torch's DistributedSampler does, keeps every rank stepping together
    (a rank with one batch fewer would hang the others in the gradient all-reduce).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if not batches:
        return []
    total = -(-len(batches) // world_size) * world_size
    padded = [batches[i % len(batches)] for i in range(total)]
    return padded[rank::world_size]


def shuffled_batches(
    num_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """Random batches of indices, different per epoch and the same for the same seed and epoch."""
    order = list(range(num_items))
    _rng(seed, epoch).shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, num_items, batch_size)]
    return shard_batches(batches, rank, world_size)


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """Batches of similar-length samples, in a random order fixed by seed and epoch.

    The indices are shuffled, cut into mega-batches of 50 batches, each sorted by length and cut
    into batches (the scheme of transformers' LengthGroupedSampler), then the batch order is
    shuffled. Less padding, still random.

    Args:
        lengths: Token count of every sample.
        batch_size: Samples per batch (per rank).
        seed: Run seed.
        epoch: Epoch number; each epoch gets a different order.
        rank: This process's rank.
        world_size: Number of processes; each gets the same number of batches.

    Returns:
        This rank's batches of indices into ``lengths``.
    """
    rng = _rng(seed, epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        group = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return shard_batches(batches, rank, world_size)
