"""Preference rows: pairwise and KTO formats, every bad row reported with file, line and field;
the bundled tag task is balanced and its rule holds; stage/preference config errors name fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.config import DataConfig, PreferenceConfig, RunConfig
from lorafleet.config_checks import validate_config
from lorafleet.datagen import _TAG_DIGITS, preference_tables
from lorafleet.errors import ConfigError
from lorafleet.preference_data import load_preference_samples, tokenize_preference
from lorafleet.templates import get_template


def _write(path: Path, rows: list[object]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_pairwise_rows_parse_prompt_messages_and_assistant_messages(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Is 3 odd?", "chosen": "yes", "rejected": "no", "system": "be brief"},
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "Is 4 odd?"},
                ],
                "chosen": [{"role": "assistant", "content": "no"}],
                "rejected": {"role": "assistant", "content": "yes"},
            },
        ],
    )
    samples, problems = load_preference_samples(path, PreferenceConfig(), "dpo")
    assert problems == []
    assert (samples[0].system, samples[0].prompt, samples[0].chosen, samples[0].rejected) == (
        "be brief",
        "Is 3 odd?",
        "yes",
        "no",
    )
    assert (samples[1].system, samples[1].history, samples[1].prompt) == ("s", [("hi", "hello")], "Is 4 odd?")
    assert (samples[1].chosen, samples[1].rejected) == ("no", "yes")


def test_every_bad_pairwise_row_is_reported_with_line_and_field(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "q", "chosen": "a"},  # missing side
            {"prompt": "q", "chosen": "same", "rejected": "same"},  # identical
            {"chosen": "a", "rejected": "b"},  # no prompt
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "chosen": "x",
                "rejected": "y",
            },
            {"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"},
            ["not", "an", "object"],
        ],
    )
    samples, problems = load_preference_samples(path, PreferenceConfig(), "dpo")
    assert samples == []
    found = {(p.line, p.field) for p in problems}
    assert found == {
        (1, "rejected"),
        (2, "rejected"),
        (3, "prompt"),
        (4, "messages"),
        (5, "chosen.role"),
        (6, "<row>"),
    }
    assert all(p.path == path for p in problems)
    assert "identical" in next(p.message for p in problems if p.line == 2)


def test_mapped_columns_and_kto_labels(tmp_path: Path) -> None:
    cfg = PreferenceConfig(prompt_column="q", completion_column="a", label_column="ok")
    path = _write(
        tmp_path / "k.jsonl",
        [
            {"q": "x", "a": "y", "ok": True},
            {"q": "x", "a": "z", "ok": "undesirable"},
            {"q": "x", "a": "z", "ok": "maybe"},
            {"q": "x", "ok": False},
        ],
    )
    samples, problems = load_preference_samples(path, cfg, "kto")
    assert [s.desirable for s in samples] == [True, False]
    assert {(p.line, p.field) for p in problems} == {(3, "ok"), (4, "a")}


def test_over_length_answers_are_reported_not_truncated(tmp_path: Path, tiny_tokenizer) -> None:
    path = _write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "q", "chosen": "word " * 40, "rejected": "b"},
            {"prompt": "q", "chosen": "a", "rejected": "b"},
        ],
    )
    samples, _ = load_preference_samples(path, PreferenceConfig(), "dpo")
    template = get_template("chatml", tiny_tokenizer)
    examples, stats = tokenize_preference(samples, tiny_tokenizer, template, DataConfig(max_target_length=8))
    assert len(examples) == 1 and stats.dropped == 1
    assert [(p.line, p.field) for p in stats.problems] == [(1, "chosen")]
    assert "over-length" in stats.problems[0].message
    # The shared prompt is the template's rendering; answers end with the template's end marker.
    pair = examples[0]
    assert tiny_tokenizer.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(pair.chosen_ids).startswith("a")


def test_bundled_tag_task_is_balanced_and_follows_its_rule() -> None:
    tables = preference_tables(0)
    train, held_out = tables["preference_train"], tables["preference_validation"]
    assert len(train) == 400 and len(held_out) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    for row in train + held_out:
        (tag,) = {word for word in row["prompt"].split() if word in _TAG_DIGITS}  # the asked tag
        assert row["chosen"][:2] == tag + _TAG_DIGITS[tag]
        assert row["rejected"][:2] == tag + ({"3", "7"} - {_TAG_DIGITS[tag]}).pop()
        assert row["chosen"][2:] == row["rejected"][2:]  # the same answer: only the digit differs
    # Each digit is the right one for half the rows, so a constant preference ranks about half.
    threes = sum(r["chosen"][1] == "3" for r in held_out)
    assert 35 <= threes <= 65
    assert preference_tables(0) == tables and preference_tables(1) != tables
    assert [r["label"] for r in tables["kto_train"]].count(True) == 200


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"stage": "ppo"}, "stage"),
        ({"stage": "rm", "method": "full"}, "stage"),
        ({"stage": "dpo", "method": "ptuning"}, "stage"),
        ({"stage": "dpo", "preference.loss": "hinge"}, "preference.loss"),
        ({"stage": "dpo", "preference.beta": 0.0}, "preference.beta"),
        ({"stage": "dpo", "preference.label_smoothing": 0.5}, "preference.label_smoothing"),
        ({"stage": "kto", "preference.undesirable_weight": 0.0}, "preference.undesirable_weight"),
        ({"stage": "dpo", "preference.sft_adapter": "../x@1"}, "preference.sft_adapter"),
        ({"stage": "dpo", "preference.sft_adapter": "x@1", "method": "full"}, "preference.sft_adapter"),
        ({"stage": "dpo", "preference.precompute_reference": True}, "preference.precompute_reference"),
        (
            {"stage": "dpo", "method": "full", "distributed.deepspeed_stage": 3},
            "preference.precompute_reference",
        ),
        (
            {"stage": "kto", "method": "freeze", "distributed.deepspeed_stage": 3},
            "distributed.deepspeed_stage",
        ),
    ],
)
def test_stage_and_preference_errors_name_the_field(changes: dict[str, object], field: str) -> None:
    config = RunConfig()
    config.data.train_file = "train.jsonl"
    for key, value in changes.items():
        target = config
        *sections, name = key.split(".")
        for section in sections:
            target = getattr(target, section)
        setattr(target, name, value)
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    assert field in {p.field for p in caught.value.problems}


@pytest.mark.parametrize(
    "changes",
    [
        {"stage": "dpo", "distributed.deepspeed_stage": 2},
        {"stage": "kto", "distributed.deepspeed_stage": 3},
        {"stage": "rm", "distributed.deepspeed_stage": 3},
        {"stage": "dpo", "method": "full", "distributed.deepspeed_stage": 2},
        {
            "stage": "dpo",
            "method": "full",
            "distributed.deepspeed_stage": 3,
            "preference.precompute_reference": True,
        },
        {"stage": "dpo", "method": "freeze", "distributed.deepspeed_stage": 3, "preference.loss": "simpo"},
    ],
)
def test_preference_stages_take_deepspeed(changes: dict[str, object]) -> None:
    config = RunConfig()
    config.data.train_file = "train.jsonl"
    for key, value in changes.items():
        target = config
        *sections, name = key.split(".")
        for section in sections:
            target = getattr(target, section)
        setattr(target, name, value)
    validate_config(config)


def test_a_valid_dpo_config_passes() -> None:
    config = RunConfig(stage="dpo")
    config.data.train_file = "train.jsonl"
    config.preference.sft_adapter = "demo-sft@1"
    config.preference.loss = "simpo"
    validate_config(config)


def test_disable_dropout_zeroes_every_dropout_layer_lora_included() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from lorafleet import preference
    from lorafleet.fastpath import use_fast_lora_dropout

    base = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "2"], lora_dropout=0.05))
    use_fast_lora_dropout(model)
    assert preference.disable_dropout(model) == 3
    model.train()
    x = torch.randn(8, 4)
    assert torch.equal(model(x), model(x))  # no randomness left in train mode
