"""Data loading, validation, tokenization, packing (loss-exact), batching, and the bundled data."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from lorafleet.config import DataConfig
from lorafleet.data import (
    IGNORE_INDEX,
    Example,
    Sample,
    check_bad_rows,
    collate,
    collate_packed,
    detect_packing_mode,
    length_grouped_batches,
    load_dataset,
    load_samples,
    pack_examples,
    shard_batches,
    shuffled_batches,
    split_samples,
    tokenize_samples,
)
from lorafleet.datagen import CATEGORIES, corpus_text, generate_datasets
from lorafleet.errors import ConfigError, DatasetError, RowProblem
from lorafleet.templates import TEMPLATES, encode_prefix, encode_turns

GOOD_ALPACA = {"instruction": "计算 1 + 1", "output": "2"}


def _write(tmp_path: Path, content: str, name: str = "data.jsonl") -> str:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return str(path)


def _jsonl(*rows: object) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _cfg(**overrides: object) -> DataConfig:
    return DataConfig(train_file="x", **overrides)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- formats


def test_alpaca_with_input_system_and_history(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        _jsonl(
            {
                "instruction": "Translate.",
                "input": "apple",
                "output": "苹果",
                "system": "S",
                "history": [["hi", "hello"]],
            },
            {"instruction": "No input", "input": "", "output": "ok"},
        ),
    )
    samples, problems = load_dataset(path, _cfg())
    assert problems == []
    assert samples[0] == Sample("S", [("hi", "hello"), ("Translate.\napple", "苹果")], 1, path)
    assert samples[1].turns == [("No input", "ok")] and samples[1].system is None


def test_openai_messages_and_sharegpt(tmp_path: Path) -> None:
    openai = _write(
        tmp_path,
        _jsonl(
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "q1"},
                    {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "a2"},
                ]
            }
        ),
        "openai.jsonl",
    )
    sharegpt = _write(
        tmp_path,
        json.dumps(
            [
                {
                    "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                    "system": "T",
                }
            ]
        ),
        "sharegpt.json",
    )
    samples, _ = load_dataset(openai, _cfg())
    assert samples == [Sample("S", [("q1", "a1"), ("q2", "a2")], 1, openai)]
    samples, _ = load_dataset(sharegpt, _cfg(format="messages"))
    assert samples == [Sample("T", [("q", "a")], 1, sharegpt)]


def test_columns_and_single_object_json(tmp_path: Path) -> None:
    path = _write(tmp_path, json.dumps({"question": "q", "answer": "a", "sys": "S"}, indent=2), "one.json")
    cfg = _cfg(prompt_column="question", response_column="answer", system_column="sys")
    assert load_dataset(path, cfg)[0] == [Sample("S", [("q", "a")], 1, path)]


def test_bundled_files_load_cleanly(tmp_data: dict[str, Path]) -> None:
    for name in ("cblue_train", "cblue_validation", "alpaca_train", "messages_train"):
        samples, problems = load_dataset(str(tmp_data[name]), _cfg())
        assert samples and problems == [], name
    cblue, _ = load_dataset(str(tmp_data["cblue_train"]), _cfg(format="columns"))
    assert len(cblue) == 800 and cblue[0].turns[0][0].endswith("答：")


# ----------------------------------------------------------------------------- bad data

# (id, file content, config overrides, text the DatasetError must contain)
BAD_DATASETS = [
    (
        "malformed_json_line",
        _jsonl(GOOD_ALPACA) + '{"instruction": "x", "output": \n',
        {},
        ":2: <json>: malformed JSON",
    ),
    ("missing_output", _jsonl(GOOD_ALPACA, {"instruction": "x"}), {}, ":2: output: missing"),
    (
        "empty_instruction",
        _jsonl({"instruction": "  ", "output": "y"}, GOOD_ALPACA),
        {},
        ":1: instruction: is empty",
    ),
    (
        "non_string_value",
        _jsonl(GOOD_ALPACA, {"instruction": "x", "output": 42}),
        {},
        ":2: output: must be a string, got int",
    ),
    ("null_value", _jsonl(GOOD_ALPACA, {"instruction": "x", "output": None}), {}, ":2: output: is null"),
    (
        "bad_history",
        _jsonl(GOOD_ALPACA, {**GOOD_ALPACA, "history": [["only one"]]}),
        {},
        ":2: history[0]: must be a [query, answer] pair",
    ),
    ("row_not_object", _jsonl(GOOD_ALPACA, [1, 2]), {}, ":2: <row>: expected a JSON object, got list"),
    (
        "unknown_role",
        _jsonl({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "t"}]}),
        {},
        ":1: messages[1].role: unknown role 'tool'",
    ),
    (
        "sharegpt_unknown_from",
        _jsonl({"conversations": [{"from": "bot", "value": "q"}]}),
        {},
        ":1: conversations[0].from: unknown role 'bot'",
    ),
    (
        "not_alternating",
        _jsonl(
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ),
        {},
        ":1: messages[1].role: expected 'assistant' here, got 'user'",
    ),
    (
        "system_not_first",
        _jsonl(
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ),
        {},
        "a system message is only allowed first",
    ),
    (
        "ends_with_user",
        _jsonl(
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "q2"},
                ]
            }
        ),
        {},
        ":1: messages: the last message must be from the assistant",
    ),
    (
        "empty_assistant",
        _jsonl({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
        {},
        ":1: messages[1].content: is empty",
    ),
    (
        "missing_prompt_column",
        _jsonl({"input": "p", "target": "t"}, {"prompt": "p", "target": "t"}),
        {"format": "columns"},
        ":2: input: missing",
    ),
    (
        "messages_format_without_messages",
        _jsonl({"instruction": "x", "output": "y"}),
        {"format": "messages"},
        ":1: messages: missing",
    ),
    ("empty_file", "  \n\n", {}, "the file is empty"),
    ("top_level_scalar", "42", {}, "the top level is a JSON int"),
    ("malformed_json_array", '[{"instruction": "x",\n "output": }]', {}, "malformed JSON array at line 2"),
    ("undetectable_format", _jsonl({"foo": 1}), {}, "cannot tell the data format"),
    # Found by tests/test_fuzz_data.py: each used to escape as a traceback or an unbounded message.
    (
        "number_too_long",
        _jsonl(GOOD_ALPACA) + '{"instruction": ' + "7" * 5000 + "}\n",
        {},
        ":2: <json>: malformed JSON",
    ),
    (
        "nested_too_deeply",
        _jsonl(GOOD_ALPACA) + "[" * 100_000 + "\n",
        {},
        ":2: <json>: malformed JSON: nested too deeply",
    ),
    ("array_nested_too_deeply", "[" * 100_000, {}, "malformed JSON array: nested too deeply"),
    (
        "unpaired_surrogate",
        _jsonl(GOOD_ALPACA) + '{"instruction": "x\\ud800", "output": "y"}\n',
        {},
        ":2: instruction: is not valid Unicode: unpaired surrogate",
    ),
    (
        "long_role_is_shortened",
        _jsonl({"messages": [{"role": "x" * 100_000, "content": "q"}]}),
        {},
        ":1: messages[0].role: unknown role 'xxxxxxxx",
    ),
]


@pytest.mark.parametrize(
    ("content", "overrides", "expected"), [c[1:] for c in BAD_DATASETS], ids=[c[0] for c in BAD_DATASETS]
)
def test_bad_dataset_is_refused_with_line_and_field(
    tmp_path: Path, content: str, overrides: dict, expected: str
) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(DatasetError) as info:
        load_dataset(path, _cfg(**overrides))
    assert expected in info.value.reason
    assert info.value.reason.startswith(path)
    if expected.startswith(":"):
        assert f"{path}{expected}" in info.value.reason


def test_long_values_are_shortened_in_problems(tmp_path: Path) -> None:
    path = _write(tmp_path, _jsonl({"messages": [{"role": "x" * 100_000, "content": "q"}]}, {"k" * 10**5: 1}))
    _, problems = load_samples(path, _cfg(format="messages"))
    assert [p.line for p in problems] == [1, 2]
    assert all(len(p.message) < 200 for p in problems)
    with pytest.raises(DatasetError) as info:
        load_samples(_write(tmp_path, _jsonl({"k" * 10**5: 1}), "keys.jsonl"), _cfg())
    assert len(info.value.reason) < 600


def test_jsonl_lines_end_at_newlines_only(tmp_path: Path) -> None:
    # JSON strings may hold U+2028, U+0085 and the like raw; str.splitlines would break the row there
    # and report the rows after it on the wrong lines.
    odd = {"instruction": "a\u2028b\x85c\x1cd", "output": "e\u2029f"}
    path = _write(tmp_path, _jsonl(odd, {"instruction": "x"}, GOOD_ALPACA))
    samples, problems = load_samples(path, _cfg())
    assert [(s.line, s.turns) for s in samples] == [
        (1, [(odd["instruction"], odd["output"])]),
        (3, [("计算 1 + 1", "2")]),
    ]
    assert [(p.line, p.field, p.message) for p in problems] == [(2, "output", "missing")]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="file not found"):
        load_dataset(str(tmp_path / "nope.jsonl"), _cfg())


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"instruction": "café", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_dataset(str(path), _cfg())


def test_target_truncated_away_is_a_bad_row(tmp_path: Path, tiny_tokenizer) -> None:
    path = _write(tmp_path, _jsonl(GOOD_ALPACA, {"instruction": "很长的问题 " * 40, "output": "短"}))
    cfg = _cfg(packing=True, packing_length=16, system="")
    samples, problems = load_dataset(path, cfg)
    examples, stats = tokenize_samples(samples, tiny_tokenizer, TEMPLATES["qwen"], cfg)
    assert (stats.kept, stats.dropped, len(examples)) == (1, 1, 1)
    with pytest.raises(DatasetError) as info:
        check_bad_rows(path, len(samples), problems + stats.problems, cfg.max_bad_fraction)
    assert f"{path}:2: <target>: no answer token left" in info.value.reason
    assert "1 of 2 rows are invalid" in info.value.reason


def test_every_bad_row_is_reported(tmp_path: Path) -> None:
    rows = [_jsonl(GOOD_ALPACA)] * 3 + ['{"broken\n', _jsonl({"instruction": "x"}), _jsonl({"output": 1})]
    samples, problems = load_samples(_write(tmp_path, "".join(rows)), _cfg())
    assert len(samples) == 3
    assert [(p.line, p.field) for p in problems] == [
        (4, "<json>"),
        (5, "output"),
        (6, "instruction"),
        (6, "output"),
    ]


def test_bad_fraction_threshold(tmp_path: Path) -> None:
    rows = [_jsonl(GOOD_ALPACA)] * 8 + [_jsonl({"instruction": "x"})] * 2
    path = _write(tmp_path, "".join(rows))
    with pytest.raises(
        DatasetError, match=r"2 of 10 rows are invalid \(20.0%\), more than data.max_bad_fraction=0.1"
    ):
        load_dataset(path, _cfg(max_bad_fraction=0.1))
    samples, problems = load_dataset(path, _cfg(max_bad_fraction=0.2))
    assert len(samples) == 8 and [p.line for p in problems] == [9, 10]
    with pytest.raises(DatasetError, match="no usable rows"):
        load_dataset(
            _write(tmp_path, _jsonl({"instruction": "x"}), "all_bad.jsonl"), _cfg(max_bad_fraction=1.0)
        )


def test_error_quotes_only_the_first_ten_problems() -> None:
    problems = [RowProblem("f.jsonl", i, "output", "missing") for i in range(1, 26)]
    with pytest.raises(DatasetError) as info:
        check_bad_rows("f.jsonl", 100, problems, 0.0)
    reason = info.value.reason
    assert "f.jsonl:10: output: missing" in reason and "f.jsonl:11:" not in reason
    assert "... and 15 more" in reason and len(info.value.problems) == 25


def test_json_array_rows_are_numbered_by_record(tmp_path: Path) -> None:
    path = _write(tmp_path, json.dumps([GOOD_ALPACA, GOOD_ALPACA, {"instruction": "x"}], indent=2), "a.json")
    _, problems = load_samples(path, _cfg())
    assert problems == [RowProblem(path, 3, "output", "missing")]


# ----------------------------------------------------------------------------- tokenization


def _label_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for label in [*labels, IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs


CONVERSATION = Sample(None, [("第一问", "第一答"), ("second question", "second answer"), ("third", "3")], 7)


def test_all_turns_trained_by_default(tiny_tokenizer) -> None:
    (example,), _ = tokenize_samples([CONVERSATION], tiny_tokenizer, TEMPLATES["qwen"], _cfg())
    decoded = [tiny_tokenizer.decode(r) for r in _label_runs(example.labels)]
    assert decoded == ["第一答<|im_end|>\n", "second answer<|im_end|>\n", "3<|im_end|>\n"]
    assert example.line == 7 and len(example.labels) == len(example.input_ids)


def test_mask_history_trains_only_the_last_turn(tiny_tokenizer) -> None:
    (example,), _ = tokenize_samples(
        [CONVERSATION], tiny_tokenizer, TEMPLATES["qwen"], _cfg(mask_history=True)
    )
    assert [tiny_tokenizer.decode(r) for r in _label_runs(example.labels)] == ["3<|im_end|>\n"]


def test_train_on_prompt(tiny_tokenizer) -> None:
    (example,), _ = tokenize_samples(
        [CONVERSATION], tiny_tokenizer, TEMPLATES["qwen"], _cfg(train_on_prompt=True)
    )
    assert example.labels == example.input_ids
    (masked,), _ = tokenize_samples(
        [CONVERSATION], tiny_tokenizer, TEMPLATES["qwen"], _cfg(train_on_prompt=True, mask_history=True)
    )
    runs = _label_runs(masked.labels)
    assert len(runs) == 1 and tiny_tokenizer.decode(runs[0]) == (
        "<|im_start|>user\nthird<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n"
    )


def test_system_precedence(tiny_tokenizer) -> None:
    plain = Sample(None, [("q", "a")], 1)
    own = Sample("OWN", [("q", "a")], 2)
    examples, _ = tokenize_samples([plain, own], tiny_tokenizer, TEMPLATES["qwen"], _cfg(system="CFG"))
    texts = [tiny_tokenizer.decode(e.input_ids) for e in examples]
    assert "system\nCFG" in texts[0] and "system\nOWN" in texts[1]
    (default,), _ = tokenize_samples([plain], tiny_tokenizer, TEMPLATES["qwen"], _cfg())
    assert "You are a helpful assistant." in tiny_tokenizer.decode(default.input_ids)


def test_truncation_keeps_prompt_end_and_response_start(tiny_tokenizer) -> None:
    long_query = "开头 " + "填充的句子，" * 30 + "结尾的问题？"
    long_answer = "answer starts here " + "more words " * 30
    sample = Sample(None, [(long_query, long_answer)], 1)
    short = Sample(None, [("q", "a")], 2)
    src, tgt = 20, 5
    template = TEMPLATES["chatglm2"]
    short_prompt = encode_turns(template, tiny_tokenizer, short.turns, None)[0][0]
    assert len(short_prompt) <= src
    examples, stats = tokenize_samples(
        [sample, short], tiny_tokenizer, template, _cfg(max_source_length=src, max_target_length=tgt)
    )
    assert (stats.samples, stats.kept, stats.truncated, stats.dropped) == (2, 2, 1, 0)
    ids, labels = examples[0].input_ids, examples[0].labels
    assert len(ids) == src + tgt
    prefix = encode_prefix(template, tiny_tokenizer)
    assert ids[: len(prefix)] == prefix == tiny_tokenizer.convert_tokens_to_ids(["[gMASK]", "sop"])
    assert tiny_tokenizer.decode(ids[len(prefix) : src]).endswith("结尾的问题？\n\n答：")
    assert "开头" not in tiny_tokenizer.decode(ids)
    assert tiny_tokenizer.decode(ids[src:]).startswith("answer starts")
    assert labels[:src] == [IGNORE_INDEX] * src and labels[src:] == ids[src:]
    assert stats.tokens == len(ids) + len(examples[1].input_ids)


def test_target_token_count(tiny_tokenizer) -> None:
    examples, stats = tokenize_samples([CONVERSATION], tiny_tokenizer, TEMPLATES["qwen"], _cfg())
    assert stats.target_tokens == sum(1 for label in examples[0].labels if label != IGNORE_INDEX)


# ----------------------------------------------------------------------------- collation, packing


def test_collate_right_pads() -> None:
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pack_examples_layout() -> None:
    examples = [Example(list(range(n)), list(range(n))) for n in (10, 7, 6, 3, 9, 2)]
    rows = pack_examples(examples, packing_length=16)
    assert sorted(n for r in rows for n in r.lengths) == [2, 3, 6, 7, 9, 10]
    assert len(rows) == 3 and all(len(r.input_ids) <= 16 for r in rows)
    for row in rows:
        start = 0
        for n in row.lengths:
            assert row.position_ids[start : start + n] == list(range(n))
            assert row.labels[start] == IGNORE_INDEX and row.labels[start + 1 : start + n] == list(
                range(1, n)
            )
            start += n
    with pytest.raises(ValueError, match="does not fit"):
        pack_examples([Example([1] * 20, [1] * 20)], 16)


def _tiny_llama(vocab: int, attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss of predicting labels[t + 1] from logits[t]; 0 where not a target."""
    return F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=IGNORE_INDEX
    )


@pytest.fixture(scope="module")
def mixed_examples(tiny_tokenizer) -> list[Example]:
    turns = [
        [("计算 3 + 4", "7")],
        [("What is the capital of France?", "Paris"), ("用中文怎么说？", "巴黎")],
        [("Translate 'cat' into Chinese.", "猫")],
        [("一个比较长的问题，需要更多的字来描述", "一个同样比较长的回答。")],
        [("hi", "hello")],
    ]
    samples = [Sample("S" if i % 2 else None, t, i + 1) for i, t in enumerate(turns)]
    examples, _ = tokenize_samples(samples, tiny_tokenizer, TEMPLATES["qwen"], _cfg(train_on_prompt=False))
    return examples


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["position_ids", "mask4d"])
def test_packed_loss_equals_unpacked(attn: str, mode: str, tiny_tokenizer, mixed_examples) -> None:
    model = _tiny_llama(len(tiny_tokenizer), attn)
    longest = max(len(e.input_ids) for e in mixed_examples)
    rows = pack_examples(mixed_examples, packing_length=longest + 40)
    assert any(len(r.lengths) > 1 for r in rows) and len(set(map(lambda r: len(r.input_ids), rows))) > 1
    batch = collate_packed(rows, tiny_tokenizer.pad_token_id, mode=mode)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        packed_losses = _token_losses(packed, batch["labels"])
        # Unpacked reference, in the order the rows hold the samples.
        by_length = sorted(mixed_examples, key=lambda e: -len(e.input_ids))
        reference: list[torch.Tensor] = []
        lookup = {tuple(e.input_ids): e for e in by_length}
        for row in rows:
            start = 0
            for n in row.lengths:
                example = lookup[tuple(row.input_ids[start : start + n])]
                logits = model(input_ids=torch.tensor([example.input_ids])).logits
                reference.append(_token_losses(logits, torch.tensor([example.labels]))[0])
                start += n
        got = [packed_losses[b][(batch["labels"][b, 1:] != IGNORE_INDEX)] for b in range(len(rows))]
        want = [loss[loss != 0] for loss in reference]
        assert torch.allclose(torch.cat(got), torch.cat(want), atol=1e-5, rtol=0)
        # transformers' own mean loss over the packed batch equals the token-weighted unpacked mean.
        loss = model(**batch, use_cache=False).loss
        assert abs(float(loss) - float(torch.cat(want).mean())) < 1e-5


def test_naive_packing_would_change_the_loss(tiny_tokenizer, mixed_examples) -> None:
    """Control: the equality above is not trivial; without the reset it differs a lot."""
    model = _tiny_llama(len(tiny_tokenizer), "sdpa")
    rows = pack_examples(mixed_examples, packing_length=200)
    batch = collate_packed(rows, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        right = model(**batch, use_cache=False).loss
        # The default use_cache=True creates a cache, and transformers then skips packed detection.
        cached = model(**batch).loss
        plain = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert abs(float(right) - float(plain)) > 1e-3
    assert abs(float(right) - float(cached)) > 1e-3


def test_detect_packing_mode_per_family() -> None:
    llama = _tiny_llama(100, "sdpa").train()
    assert detect_packing_mode(llama) == "position_ids"
    assert llama.training  # restored
    torch.manual_seed(0)
    falcon = FalconForCausalLM(
        FalconConfig(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            attn_implementation="eager",
        )
    )
    assert detect_packing_mode(falcon) == "mask4d"
    bloom = BloomForCausalLM(
        BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4, attn_implementation="eager")
    )
    with pytest.raises(ConfigError) as info:
        detect_packing_mode(bloom)
    assert info.value.problems[0].field == "data.packing" and "BloomForCausalLM" in info.value.reason


# ----------------------------------------------------------------------------- batching


def test_length_grouped_batches_cover_everything_and_group() -> None:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 500, (1003,), generator=gen).tolist()
    batches = length_grouped_batches(lengths, 8, seed=3, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1003))
    assert batches == length_grouped_batches(lengths, 8, seed=3, epoch=0)
    assert batches != length_grouped_batches(lengths, 8, seed=3, epoch=1)
    assert batches != length_grouped_batches(lengths, 8, seed=4, epoch=0)

    def padded_tokens(bs: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    assert padded_tokens(batches) < 0.7 * padded_tokens(shuffled_batches(1003, 8, seed=3, epoch=0))


@pytest.mark.parametrize("make", ["grouped", "shuffled"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_batches_split_evenly_across_ranks(make: str, world_size: int) -> None:
    lengths = [(i * 37) % 101 + 1 for i in range(103)]

    def build(rank: int) -> list[list[int]]:
        if make == "grouped":
            return length_grouped_batches(lengths, 4, seed=0, epoch=2, rank=rank, world_size=world_size)
        return shuffled_batches(len(lengths), 4, seed=0, epoch=2, rank=rank, world_size=world_size)

    per_rank = [build(rank) for rank in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1
    assert len(per_rank[0]) == -(-26 // world_size)
    covered = {i for batches in per_rank for b in batches for i in b}
    assert covered == set(range(103))
    if world_size == 1:
        assert sorted(i for b in per_rank[0] for i in b) == list(range(103))


def test_shard_batches_rejects_bad_rank() -> None:
    with pytest.raises(ValueError):
        shard_batches([[0]], rank=2, world_size=2)


def test_split_samples_is_deterministic() -> None:
    samples = [Sample(None, [(str(i), "a")], i) for i in range(50)]
    train, held = split_samples(samples, 0.1, seed=1)
    assert len(held) == 5 and len(train) == 45
    assert {s.line for s in train} | {s.line for s in held} == set(range(50))
    assert split_samples(samples, 0.1, seed=1) == (train, held)
    assert split_samples(samples, 0.0, seed=1) == (samples, [])


# ----------------------------------------------------------------------------- bundled data


def test_datagen_is_deterministic_and_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    first = generate_datasets(str(tmp_path / "a"), seed=0)
    assert time.perf_counter() - start < 2.0
    second = generate_datasets(str(tmp_path / "b"), seed=0)
    other = generate_datasets(str(tmp_path / "c"), seed=1)
    assert set(first) == {"cblue_train", "cblue_validation", "alpaca_train", "messages_train", "corpus"}
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name
    assert first["cblue_train"].read_bytes() != other["cblue_train"].read_bytes()
    assert first["corpus"].read_text(encoding="utf-8") == corpus_text(0)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cblue_held_out_is_disjoint_and_balanced(tmp_data: dict[str, Path]) -> None:
    train, validation = _rows(tmp_data["cblue_train"]), _rows(tmp_data["cblue_validation"])
    assert len(train) == 800 and len(validation) == 80
    sentence = lambda row: row["input"].split("\n")[1]  # noqa: E731
    assert not {sentence(r) for r in validation} & {sentence(r) for r in train}
    for rows in (train, validation):
        counts = {c: sum(r["target"] == c for r in rows) for c in CATEGORIES}
        assert set(counts.values()) == {len(rows) // len(CATEGORIES)}
    assert all(r["input"].endswith("答：") and "选项：" in r["input"] for r in train)
    assert any(re.search(r"[A-Za-z]{4,}", sentence(r)) for r in train)  # some English sentences


def test_alpaca_and_messages_answers_are_right(tmp_data: dict[str, Path]) -> None:
    alpaca, messages = _rows(tmp_data["alpaca_train"]), _rows(tmp_data["messages_train"])
    assert len(alpaca) == 200 and len(messages) == 100
    assert any(r["input"] for r in alpaca) and any("system" in r for r in alpaca)
    sums = [r for r in alpaca if re.fullmatch(r"计算 (\d+) \+ (\d+) 等于多少？", r["instruction"])]
    assert sums
    for row in sums:
        a, b = map(int, re.findall(r"\d+", row["instruction"]))
        assert row["output"] == str(a + b)
    assert {len([m for m in r["messages"] if m["role"] == "user"]) for r in messages} == {2, 3}
