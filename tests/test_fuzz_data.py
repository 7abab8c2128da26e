"""Property-based fuzzing of dataset row parsing (issue 16): ``load_samples`` on files of arbitrary
JSON / JSONL rows in every format, with wrong types, deep nesting, odd unicode, missing fields and
broken lines.

The properties, for every file:
- nothing but the documented ``DatasetError`` escapes, and only for file-level faults;
- every non-blank line (JSONL) or record (JSON array) is either one sample or has at least one
  problem naming the file, that line and a field, never both;
- messages stay short whatever the input, and each file is parsed within the deadline.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lorafleet.config import DataConfig
from lorafleet.data import load_samples
from lorafleet.errors import DatasetError

_MAX_MESSAGE_CHARS = 400
_SETTINGS = settings(
    max_examples=120,
    deadline=2000,  # ms per file; parsing is linear, so this only trips on a blow-up
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    derandomize=True,
)

# Text with every kind of character: surrogates, line and paragraph separators, NUL, BOMs,
# combining marks, right-to-left marks, astral-plane emoji.
_ODD = "\u2028\u2029\x85\x1c\x1d\x1e\x0b\x0c\r\x00\ufeff\u200b\u202e\u0301\U0001f600\ud800\udfff"
odd_text = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from([*_ODD, "a", " ", "\n", "<|im_start|>", "</s>"]), max_size=30).map("".join),
    st.text(alphabet=st.characters(codec=None, categories=["Cs", "Co", "Cc", "Zl", "Zp", "Mn"]), max_size=20),
    st.just(""),
    st.just("   "),
    st.builds(lambda n: "x" * n, st.integers(10_000, 200_000)),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    odd_text,
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(odd_text, st.sampled_from(["role", "content"])), children, max_size=4),
    ),
    max_leaves=12,
)


def _maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: usually the right kind, sometimes anything JSON."""
    return st.one_of(value, value, json_values)


def _object(required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]) -> Any:
    """An object with most required fields and some optional ones, each possibly of the wrong
    type, plus stray keys."""
    keep = {k: st.integers(0, 7).map(lambda n: n > 0) for k in required}  # a required field: 7 in 8
    keep |= {k: st.booleans() for k in optional}
    return st.builds(
        lambda present, values, extra: {**{k: v for k, v in values.items() if present[k]}, **extra},
        st.fixed_dictionaries(keep),
        st.fixed_dictionaries({k: _maybe(v) for k, v in {**required, **optional}.items()}),
        st.dictionaries(odd_text, json_values, max_size=2),
    )


def _mostly(rows: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A row of the format 3 times in 4, else any JSON value or a garbage line."""
    return st.integers(0, 3).flatmap(lambda n: rows if n else st.one_of(json_values, garbage_lines))


alpaca_rows = _object(
    {"instruction": odd_text, "output": odd_text},
    {"input": odd_text, "system": odd_text, "history": st.lists(st.lists(odd_text, max_size=3), max_size=3)},
)
_openai_message = _object(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "USER", ""]), "content": odd_text}, {}
)
_sharegpt_message = _object(
    {"from": st.sampled_from(["system", "human", "gpt", "user", "assistant", "bot"]), "value": odd_text}, {}
)
messages_rows = st.one_of(
    _object({"messages": st.lists(_openai_message, max_size=6)}, {"system": odd_text}),
    _object({"conversations": st.lists(_sharegpt_message, max_size=6)}, {"system": odd_text}),
)
column_rows = _object({"input": odd_text, "target": odd_text}, {"system_prompt": odd_text})
nested_rows = st.builds(
    lambda depth, opener: opener[0] * depth + "1" + opener[1] * depth,
    st.integers(1, 200_000),
    st.sampled_from([("[", "]"), ('{"instruction": ', "}"), ('{"a":[', "]}")]),
)
huge_numbers = st.builds(
    lambda digits, key: f'{{"{key}": {digits}}}',
    st.integers(4000, 50_000).map(lambda n: "7" * n),
    st.sampled_from(["instruction", "output", "x"]),
)
garbage_lines = st.one_of(
    odd_text,
    st.sampled_from(["{", "}", "[", "]", "{'instruction': 'x'}", "NaN", "null", '"str"', "1e999", "{}{}"]),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
    nested_rows,
    huge_numbers,
).map(
    lambda line: line.replace("\n", " ").replace("\r", " ")
)  # one line each (the file is read with universal newlines)


def _line(row: Any, ensure_ascii: bool) -> str:
    return row if isinstance(row, str) else json.dumps(row, ensure_ascii=ensure_ascii)


def _check(path: Path, cfg: DataConfig, expected_lines: set[int] | None) -> None:
    try:
        samples, problems = load_samples(str(path), cfg)
    except DatasetError as e:
        event(f"DatasetError: {e.reason[len(str(path)) + 2 :][:30]}")
        assert str(path) in e.reason
        assert len(e.reason) <= _MAX_MESSAGE_CHARS + len(str(path))
        return
    sample_lines = [s.line for s in samples]
    problem_lines = {p.line for p in problems}
    assert len(sample_lines) == len(set(sample_lines))
    assert not problem_lines & set(sample_lines), "a row is both a sample and a problem"
    if expected_lines is not None:
        assert set(sample_lines) | problem_lines == expected_lines
    for problem in problems:
        assert problem.path == str(path)
        assert problem.field and isinstance(problem.field, str)
        assert 0 < len(problem.message) <= _MAX_MESSAGE_CHARS, problem
        assert len(str(problem)) <= _MAX_MESSAGE_CHARS + len(str(path)) + 200
    for sample in samples:
        assert sample.turns and all(isinstance(q, str) and isinstance(a, str) for q, a in sample.turns)
        assert sample.system is None or isinstance(sample.system, str)
        for text in [sample.system or "", *(t for turn in sample.turns for t in turn)]:
            text.encode("utf-8")  # valid Unicode: tokenizers take it


def _jsonl_case(rows: list[Any], ensure_ascii: bool, crlf: bool) -> tuple[str, set[int]]:
    lines = [_line(row, ensure_ascii) for row in rows]
    text = ("\r\n" if crlf else "\n").join(lines)
    expected = {i for i, line in enumerate(lines, start=1) if line.strip()}
    return text, expected


def _run_jsonl(rows: list[Any], ensure_ascii: bool, crlf: bool, cfg: DataConfig) -> None:
    text, expected = _jsonl_case(rows, ensure_ascii, crlf)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        _check(path, cfg, _whole_file_records(text, expected))


def _whole_file_records(text: str, lines: set[int]) -> set[int] | None:
    """The records of a file that parses as one JSON value; ``lines`` when it must be read as JSONL."""
    try:
        whole = json.loads(text.removeprefix("\ufeff"))
    except (ValueError, RecursionError):
        return lines
    if isinstance(whole, list):
        return set(range(1, len(whole) + 1))
    return {1} if isinstance(whole, dict) else None


def _fuzz(rows: st.SearchStrategy[Any], cfg: DataConfig) -> Callable[..., None]:
    @_SETTINGS
    @given(
        st.lists(_mostly(rows), min_size=1, max_size=8),
        st.booleans(),
        st.booleans(),
    )
    def run(rows_: list[Any], ensure_ascii: bool, crlf: bool) -> None:
        _run_jsonl(rows_, ensure_ascii, crlf, cfg)

    return run


test_alpaca_rows = _fuzz(alpaca_rows, DataConfig(train_file="x", format="alpaca"))
test_messages_rows = _fuzz(messages_rows, DataConfig(train_file="x", format="messages"))
test_column_rows = _fuzz(
    column_rows, DataConfig(train_file="x", format="columns", system_column="system_prompt")
)
test_detected_format_rows = _fuzz(
    st.one_of(alpaca_rows, messages_rows, column_rows), DataConfig(train_file="x")
)


@_SETTINGS
@given(st.lists(_mostly(st.one_of(alpaca_rows, messages_rows, column_rows)), max_size=8), st.booleans())
def test_json_arrays(records: list[Any], ensure_ascii: bool) -> None:
    text = json.dumps(records, ensure_ascii=ensure_ascii)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.json"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        _check(path, DataConfig(train_file="x"), set(range(1, len(records) + 1)))


@_SETTINGS
@given(st.one_of(garbage_lines, json_values.map(json.dumps), st.binary(max_size=64).map(lambda b: b.hex())))
def test_whole_files_of_anything(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        _check(path, DataConfig(train_file="x"), None)


@_SETTINGS
@given(st.binary(max_size=200))
def test_raw_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(data)
        _check(path, DataConfig(train_file="x"), None)
