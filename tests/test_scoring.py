"""Generation metrics against hand-computed values (NLTK method3 BLEU, rouge-chinese semantics)."""

from __future__ import annotations

import math

import pytest

from lorafleet.scoring import (
    bleu4,
    compute_generation_metrics,
    exact_match,
    normalize_answer,
    rouge_l,
    rouge_n,
    tokenize_for_bleu,
    tokenize_for_metrics,
)


def test_bleu_identical_is_one() -> None:
    tokens = ["the", "cat", "sat", "on", "the", "mat"]
    assert bleu4(tokens, tokens) == pytest.approx(1.0)


def test_bleu_one_missing_fourgram_uses_first_smoothing_step() -> None:
    # p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/1 -> 1/(2^1 * 1); equal lengths -> no brevity penalty.
    expected = (0.75 * (2 / 3) * 0.5 * 0.5) ** 0.25
    assert bleu4(["a", "b", "c", "d"], ["a", "b", "c", "e"]) == pytest.approx(expected)
    assert expected == pytest.approx(0.594604, abs=1e-6)


def test_bleu_short_hypothesis_smoothing_and_brevity_penalty() -> None:
    # hyp "a b" vs ref "a b c d": p1 = 2/2, p2 = 1/1, p3 = 0/1 -> 1/2, p4 = 0/1 -> 1/4 (k grows);
    # brevity penalty exp(1 - 4/2).
    expected = math.exp(1 - 4 / 2) * (1 * 1 * 0.5 * 0.25) ** 0.25
    assert bleu4(["a", "b"], ["a", "b", "c", "d"]) == pytest.approx(expected)
    assert expected == pytest.approx(0.218742, abs=1e-6)


def test_bleu_clipped_counts_and_smoothing_denominators() -> None:
    # hyp "the the the the" vs ref "the cat": p1 = clipped 1/4; p2 = 0/3 -> 1/(2*3);
    # p3 = 0/2 -> 1/(4*2); p4 = 0/1 -> 1/(8*1); hyp longer than ref -> no brevity penalty.
    expected = (0.25 * (1 / 6) * (1 / 8) * (1 / 8)) ** 0.25
    assert bleu4(["the"] * 4, ["the", "cat"]) == pytest.approx(expected)


def test_bleu_zero_cases() -> None:
    assert bleu4([], ["a"]) == 0.0
    assert bleu4(["x", "y"], ["a", "b"]) == 0.0  # no unigram match: NLTK returns 0
    assert bleu4(["a"], []) == 0.0


def test_rouge_matches_rouge_chinese_on_a_known_example() -> None:
    # The tw_rouge / rouge-chinese README example: '我是人' vs '我是一個人' by character gives
    # rouge-1 f 0.75, rouge-2 f 0.3333, rouge-l f 0.75.
    hyp, ref = list("我是人"), list("我是一個人")
    assert rouge_n(hyp, ref, 1) == pytest.approx(0.75)
    assert rouge_n(hyp, ref, 2) == pytest.approx(1 / 3)
    assert rouge_l(hyp, ref) == pytest.approx(0.75)


def test_rouge_set_semantics_versus_counts() -> None:
    hyp, ref = ["a", "a", "a"], ["a", "b"]
    # Distinct unigrams: p = 1/1, r = 1/2.
    assert rouge_n(hyp, ref, 1) == pytest.approx(2 / 3)
    # Counts: overlap min(3, 1) = 1, p = 1/3, r = 1/2.
    assert rouge_n(hyp, ref, 1, exclusive=False) == pytest.approx(0.4)


def test_rouge_l_uses_subsequence_not_substring() -> None:
    hyp, ref = ["a", "x", "b", "y", "c"], ["a", "b", "c"]
    # LCS = a b c: p = 3/5, r = 3/3.
    assert rouge_l(hyp, ref, exclusive=False) == pytest.approx(2 * 0.6 / 1.6)
    assert rouge_l([], ref) == 0.0
    assert rouge_n([], ref, 2) == 0.0


def test_tokenizers_split_chinese_and_latin() -> None:
    words = tokenize_for_metrics("患者发热，体温39.2℃ It's ok.")
    assert "患者" in words and "发热" in words and "，" in words
    assert "39.2" in words and "It's" in words and "ok" in words and "." in words
    assert " " not in words
    assert tokenize_for_bleu("体温39.2 ok!") == ["体", "温", "39.2", "ok", "!"]


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("阳性", "阳性", True),
        (" 阳性。", "阳性", True),
        ("Yes.", "yes", True),
        ("ＡＢＣ，ｄ", "abc,d", True),  # full-width letters and comma
        ("发热 ，咳嗽", "发热，咳嗽", True),
        ("new  york", "New York", True),
        ("阴性", "阳性", False),
        ("yes", "no", False),
        ("3.5", "35", False),
        ("", "阳性", False),
    ],
)
def test_exact_match_normalisation(prediction: str, reference: str, expected: bool) -> None:
    assert exact_match(prediction, reference) is expected


def test_normalize_answer_strips_only_trailing_periods() -> None:
    assert normalize_answer("a.b.") == "a.b"


def test_compute_generation_metrics_perfect_and_empty() -> None:
    refs = ["患者出现发热和咳嗽症状。", "The answer is positive."]
    perfect = compute_generation_metrics(list(refs), refs)
    assert perfect["bleu-4"] == pytest.approx(100.0)
    assert perfect["rouge-1"] == pytest.approx(100.0, abs=1e-3)
    assert perfect["rouge-l"] == pytest.approx(100.0, abs=1e-3)
    assert perfect["accuracy"] == 1.0
    assert perfect["num_samples"] == 2

    empty = compute_generation_metrics(["", refs[1]], refs)
    # Sample 1 scores 0 everywhere, sample 2 is perfect: the averages are 50.
    assert empty["bleu-4"] == pytest.approx(50.0)
    assert empty["rouge-2"] == pytest.approx(50.0, abs=1e-3)
    assert empty["accuracy"] == 0.5


def test_compute_generation_metrics_partial_overlap_is_between() -> None:
    metrics = compute_generation_metrics(["患者出现发热症状"], ["患者出现发热和咳嗽症状"])
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert 0.0 < metrics[key] < 100.0, key
    assert metrics["rouge-1"] > metrics["rouge-2"]
    assert metrics["accuracy"] == 0.0


def test_compute_generation_metrics_no_samples_and_length_mismatch() -> None:
    assert compute_generation_metrics([], []) == {
        "bleu-4": 0.0,
        "rouge-1": 0.0,
        "rouge-2": 0.0,
        "rouge-l": 0.0,
        "accuracy": 0.0,
        "num_samples": 0.0,
    }
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        compute_generation_metrics(["a", "b"], ["a"])
