"""Prompt templates: exact renderings, label masks per template, stop strings, jinja templates."""

from __future__ import annotations

import copy
import re

import pytest

from lorafleet.config import DataConfig
from lorafleet.data import IGNORE_INDEX, Sample, tokenize_sample
from lorafleet.errors import ConfigError
from lorafleet.templates import (
    TEMPLATE_SPECIAL_TOKENS,
    TEMPLATES,
    encode_prefix,
    encode_prompt,
    encode_turns,
    get_template,
    render_turns,
    stop_strings,
    stop_token_ids,
)

TURNS = [("你好，1+1 等于几？", "等于 2。"), ("And 'cat' in Chinese?", "猫"), ("What is {eos}?", "A marker.")]
SYSTEM = "SYSTEM-PROMPT 系统"

# What each template puts around an answer: (text before it, end marker after it).
ANSWER_FRAME = {
    "default": ("", "</s>"),
    "alpaca": ("", "</s>"),
    "qwen": ("", "<|im_end|>\n"),
    "chatml": ("", "<|im_end|>\n"),
    "llama2": (" ", " </s>"),
    "llama3": ("", "<|eot_id|>"),
    "baichuan": ("", "</s>"),
    "baichuan2": ("", "</s>"),
    "chatglm2": ("", "</s>"),
    "chatglm3": ("\n", "</s>"),
    "belle": ("", "</s>"),
    "tokenizer": ("", "<|im_end|>\n"),
}


def _label_runs(labels: list[int]) -> list[list[int]]:
    """Maximal runs of trained (non -100) label ids."""
    runs: list[list[int]] = []
    current: list[int] = []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return runs


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def test_every_template_has_a_frame() -> None:
    assert set(ANSWER_FRAME) == set(TEMPLATES)
    assert {
        "default",
        "alpaca",
        "qwen",
        "chatml",
        "llama2",
        "llama3",
        "baichuan",
        "baichuan2",
        "chatglm2",
        "chatglm3",
        "belle",
        "tokenizer",
    } <= set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_labels_are_exactly_the_assistant_turns(name: str, tiny_tokenizer) -> None:
    template = get_template(name, tiny_tokenizer)
    sample = Sample(system=SYSTEM, turns=TURNS, line=1)
    example, truncated = tokenize_sample(sample, tiny_tokenizer, template, DataConfig(train_file="x"))
    assert not truncated
    runs = [_decode(tiny_tokenizer, run) for run in _label_runs(example.labels)]
    before, end = ANSWER_FRAME[name]
    assert runs == [before + answer + end for _, answer in TURNS]
    trained = "".join(runs)
    assert "SYSTEM" not in trained and "系统" not in trained
    for query, _ in TURNS:
        assert query not in trained


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_pieces_concatenate_to_the_conversation(name: str, tiny_tokenizer) -> None:
    template = get_template(name, tiny_tokenizer)
    pieces = encode_turns(template, tiny_tokenizer, TURNS, SYSTEM)
    text = "".join(p + r for p, r in render_turns(template, tiny_tokenizer, TURNS, SYSTEM))
    ids = [i for prompt, response in pieces for i in prompt + response]
    assert _decode(tiny_tokenizer, ids) == text
    assert "{eos}" in text  # user braces are kept literally, not filled
    # The generation prompt is exactly the training ids up to where the last answer starts.
    prompt = encode_prompt(template, tiny_tokenizer, TURNS[:-1], TURNS[-1][0], SYSTEM)
    assert prompt == ids[: len(ids) - len(pieces[-1][1])]
    prefix = encode_prefix(template, tiny_tokenizer)
    assert pieces[0][0][: len(prefix)] == prefix


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_special_markers_are_registered(name: str, tiny_tokenizer) -> None:
    text = "".join(p + r for p, r in render_turns(TEMPLATES[name], tiny_tokenizer, TURNS, SYSTEM))
    markers = set(re.findall(r"<\|[a-z_]+\|>|<reserved_\d+>|\[gMASK\]", text))
    assert markers <= set(TEMPLATE_SPECIAL_TOKENS)


def test_tokenizer_has_every_marker_as_one_token(tiny_tokenizer) -> None:
    split = [
        m for m in TEMPLATE_SPECIAL_TOKENS if len(tiny_tokenizer.encode(m, add_special_tokens=False)) != 1
    ]
    assert split == [], f"the test tokenizer lacks these TEMPLATE_SPECIAL_TOKENS: {split}"


def _render(name: str, tokenizer, turns, system) -> str:
    return "".join(p + r for p, r in render_turns(TEMPLATES[name], tokenizer, turns, system))


def test_chatml_exact_with_default_system(tiny_tokenizer) -> None:
    assert _render("qwen", tiny_tokenizer, [("hi", "hello")], None) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )
    # An explicitly empty system drops the block.
    assert _render("chatml", tiny_tokenizer, [("hi", "hello")], "").startswith("<|im_start|>user\n")


def test_chatglm2_rounds_count_from_one(tiny_tokenizer) -> None:
    assert _render("chatglm2", tiny_tokenizer, [("q1", "a1"), ("q2", "a2")], None) == (
        "[gMASK]sop[Round 1]\n\n问：q1\n\n答：a1</s>\n\n[Round 2]\n\n问：q2\n\n答：a2</s>"
    )


def test_chatglm3_exact(tiny_tokenizer) -> None:
    assert _render("chatglm3", tiny_tokenizer, [("q", "a")], "S") == (
        "[gMASK]sop<|system|>\nS<|user|>\nq<|assistant|>\na</s>"
    )


def test_baichuan_exact(tiny_tokenizer) -> None:
    assert _render("baichuan2", tiny_tokenizer, [("q1", "a1"), ("q2", "a2")], None) == (
        "<reserved_106>q1<reserved_107>a1</s><reserved_106>q2<reserved_107>a2</s>"
    )
    assert _render("baichuan", tiny_tokenizer, [("q", "a")], None) == "<reserved_102>q<reserved_103>a</s>"


def test_llama2_with_system_exact(tiny_tokenizer) -> None:
    assert _render("llama2", tiny_tokenizer, [("q1", "a1"), ("q2", "a2")], "S") == (
        "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nq1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>"
    )


def test_llama3_and_simple_formats_exact(tiny_tokenizer) -> None:
    assert _render("llama3", tiny_tokenizer, [("q", "a")], "S") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\na<|eot_id|>"
    )
    assert _render("belle", tiny_tokenizer, [("q", "a")], None) == "Human: q\n\nBelle: a</s>"
    assert _render("default", tiny_tokenizer, [("q", "a")], None) == "Human: q</s>\nAssistant:a</s>"
    assert (
        _render("alpaca", tiny_tokenizer, [("q", "a")], "") == "### Instruction:\nq\n\n### Response:\na</s>"
    )


def test_tokenizer_template_matches_chatml(tiny_tokenizer) -> None:
    jinja = encode_turns(get_template("tokenizer", tiny_tokenizer), tiny_tokenizer, TURNS, SYSTEM)
    assert jinja == encode_turns(TEMPLATES["qwen"], tiny_tokenizer, TURNS, SYSTEM)
    jinja_prompt = encode_prompt(TEMPLATES["tokenizer"], tiny_tokenizer, TURNS[:1], "next?", SYSTEM)
    assert jinja_prompt == encode_prompt(TEMPLATES["qwen"], tiny_tokenizer, TURNS[:1], "next?", SYSTEM)


def test_tokenizer_template_that_rewrites_history_is_refused(tiny_tokenizer) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # Marks only the last message, so every render changes earlier text.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    )
    with pytest.raises(ConfigError, match="rewrites earlier turns"):
        encode_turns(TEMPLATES["tokenizer"], tokenizer, TURNS, None)


def test_stop_strings(tiny_tokenizer) -> None:
    assert stop_strings(TEMPLATES["qwen"], tiny_tokenizer) == ["</s>", "<|im_end|>"]
    assert stop_strings(TEMPLATES["llama3"], tiny_tokenizer) == ["</s>", "<|eot_id|>"]
    assert stop_strings(TEMPLATES["tokenizer"], tiny_tokenizer) == ["</s>", "<|im_end|>"]
    assert "<|user|>" in stop_strings(TEMPLATES["chatglm3"], tiny_tokenizer)
    ids = stop_token_ids(TEMPLATES["qwen"], tiny_tokenizer)
    assert ids == [tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_get_template_errors_and_auto(tiny_tokenizer) -> None:
    with pytest.raises(ConfigError) as info:
        get_template("vicuna")
    problem = info.value.problems[0]
    assert problem.field == "data.template" and "chatglm2" in problem.message and "qwen" in problem.message
    assert get_template("auto", tiny_tokenizer).name == "tokenizer"
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    assert get_template("auto", plain).name == "default"
    with pytest.raises(ConfigError, match="no chat_template"):
        get_template("tokenizer", plain)


def test_eos_is_required_when_the_template_uses_it(tiny_tokenizer) -> None:
    no_eos = copy.deepcopy(tiny_tokenizer)
    no_eos.eos_token = None
    with pytest.raises(ConfigError, match="no eos_token"):
        encode_turns(TEMPLATES["baichuan"], no_eos, TURNS, None)
    # chatml ends answers with <|im_end|>, not eos, so it still works.
    assert encode_turns(TEMPLATES["qwen"], no_eos, TURNS, None)
