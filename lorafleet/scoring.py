"""Generation metrics: BLEU-4, ROUGE-1/2/L and exact-match accuracy, Chinese-aware.

The numbers are meant to be comparable with LLaMA-Factory's ``predict_with_generate`` report
(and ChatGLM's P-tuning scripts before it), which PromptCBLUE-style baselines are quoted in:

- BLEU-4: sentence BLEU with NLTK's ``SmoothingFunction().method3`` (NIST geometric smoothing),
  over characters for Chinese text. LLaMA-Factory scores ``list(label)``, i.e. characters; we do
  the same for Han characters but keep Latin words whole (character BLEU on English is meaningless)
  and drop whitespace.
- ROUGE-1/2/L: F-scores over jieba words, with the set semantics of the ``rouge-chinese`` package
  (each distinct n-gram counts once) by default; ``exclusive=False`` gives count-based ROUGE
  (Lin 2004). ``rouge-chinese`` also splits a text into sentences at Chinese sentence punctuation
  and takes a union LCS per reference sentence; we take one LCS over the whole text, which is
  identical for single-sentence answers and within a few points otherwise.
- Scores are percentages per sample rounded to 4 decimals, then averaged, like LLaMA-Factory.
  ``accuracy`` (exact match after normalisation) is a 0-1 fraction.

jieba is imported and initialised lazily (about 1 s on first use) with its startup logging silenced.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

_HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_HAN_RUN_RE = re.compile(f"([{_HAN}]+)")
_HAN_CHAR_RE = re.compile(f"[{_HAN}]")
# A Latin "word" keeps inner apostrophes, dots and hyphens (it's, 3.5, e-mail); any other
# non-space symbol is a token of its own.
_LATIN_TOKEN_RE = re.compile(r"[^\W_]+(?:['’.\-][^\W_]+)*|_+|[^\w\s]")
# Punctuation NFKC leaves alone, mapped to the ASCII that the full-width form means.
_CJK_PUNCT = str.maketrans(
    {
        "。": ".",
        "、": ",",
        "「": '"',
        "」": '"',
        "『": '"',
        "』": '"',
        "“": '"',
        "”": '"',
        "‘": "'",
        "’": "'",
        "【": "[",
        "】": "]",
        "《": "<",
        "》": ">",
        "〈": "<",
        "〉": ">",
        "…": "...",
        "—": "-",
        "–": "-",
        "·": ".",
    }
)

_jieba: Any = None
_jieba_lock = threading.Lock()


def _get_jieba() -> Any:
    """The jieba module, initialised once (its dictionary load logs to stderr unless silenced)."""
    global _jieba
    if _jieba is None:
        with _jieba_lock:
            if _jieba is None:
                import jieba

                jieba.setLogLevel(logging.WARNING)
                jieba.initialize()
                _jieba = jieba
    return _jieba


def tokenize_for_metrics(text: str) -> list[str]:
    """Words for ROUGE: jieba segmentation for Han text, words and symbols for everything else.

    Args:
        text: one prediction or reference.

    Returns:
        Tokens without whitespace, e.g. ``"患者发热，体温39.2℃ ok"`` ->
        ``["患者", "发热", "，", "体温", "39.2", "℃", "ok"]``.
    """
    tokens: list[str] = []
    for i, part in enumerate(_HAN_RUN_RE.split(text)):
        if not part:
            continue
        if i % 2 == 1:  # odd parts of a split with one capture group are the Han runs
            tokens.extend(w for w in _get_jieba().cut(part) if w.strip())
        else:
            tokens.extend(_LATIN_TOKEN_RE.findall(part))
    return tokens


def tokenize_for_bleu(text: str) -> list[str]:
    """Tokens for BLEU: each Han character alone (as LLaMA-Factory's character BLEU), Latin words whole.

    Args:
        text: one prediction or reference.

    Returns:
        Tokens without whitespace, e.g. ``"体温39.2℃ ok"`` -> ``["体", "温", "39.2", "℃", "ok"]``.
    """
    tokens: list[str] = []
    for i, part in enumerate(_HAN_RUN_RE.split(text)):
        if not part:
            continue
        tokens.extend(part if i % 2 == 1 else _LATIN_TOKEN_RE.findall(part))
    return tokens


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def bleu4(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """Sentence BLEU-4 (uniform weights) against one reference, smoothed like NLTK's ``method3``.

    Follows NLTK's ``sentence_bleu``: clipped n-gram precisions p_n = matches / max(1, hypothesis
    n-grams); 0 when no unigram matches; every p_n with zero matches becomes 1 / (2^k * denominator),
    k = 1, 2, ... in order (NIST geometric smoothing); brevity penalty exp(1 - r/c) when c < r.

    Args:
        prediction_tokens: hypothesis tokens.
        reference_tokens: reference tokens.

    Returns:
        BLEU in [0, 1].
    """
    hyp_len, ref_len = len(prediction_tokens), len(reference_tokens)
    if hyp_len == 0:
        return 0.0
    precisions: list[float] = []
    numerators: list[int] = []
    for n in range(1, 5):
        hyp_counts = Counter(_ngrams(prediction_tokens, n))
        ref_counts = Counter(_ngrams(reference_tokens, n))
        numerators.append(sum(min(c, ref_counts[g]) for g, c in hyp_counts.items()))
        denominator = max(1, sum(hyp_counts.values()))
        precisions.append(numerators[-1] / denominator)
    if numerators[0] == 0:
        return 0.0
    k = 1
    for i, num in enumerate(numerators):
        if num == 0:
            denominator = max(1, hyp_len - i)  # hypothesis (i+1)-grams, as NLTK's unreduced Fraction
            precisions[i] = 1.0 / (2**k * denominator)
            k += 1
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(math.fsum(0.25 * math.log(p) for p in precisions))


def _f1(overlap: int, hyp_count: int, ref_count: int) -> float:
    precision = overlap / hyp_count if hyp_count else 0.0
    recall = overlap / ref_count if ref_count else 0.0
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def rouge_n(
    prediction_tokens: Sequence[str], reference_tokens: Sequence[str], n: int = 1, *, exclusive: bool = True
) -> float:
    """ROUGE-N F-score.

    Args:
        prediction_tokens: hypothesis tokens.
        reference_tokens: reference tokens.
        n: n-gram order (1 for ROUGE-1, 2 for ROUGE-2).
        exclusive: count each distinct n-gram once, as ``rouge-chinese`` / ``rouge`` do; False counts
            repeated n-grams with clipping (Lin 2004, Google's ``rouge-score``).

    Returns:
        F1 of n-gram precision and recall, in [0, 1]; 0 when either side has no n-gram.
    """
    hyp = _ngrams(prediction_tokens, n)
    ref = _ngrams(reference_tokens, n)
    if exclusive:
        hyp_set, ref_set = set(hyp), set(ref)
        return _f1(len(hyp_set & ref_set), len(hyp_set), len(ref_set))
    hyp_counts, ref_counts = Counter(hyp), Counter(ref)
    overlap = sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
    return _f1(overlap, len(hyp), len(ref))


def _lcs(reference: Sequence[str], hypothesis: Sequence[str]) -> list[str]:
    """One longest common subsequence, reconstructed with ``rouge``'s tie-breaking (reference first)."""
    rows, cols = len(reference), len(hypothesis)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            if reference[i - 1] == hypothesis[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    out: list[str] = []
    i, j = rows, cols
    while i > 0 and j > 0:
        if reference[i - 1] == hypothesis[j - 1]:
            out.append(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def rouge_l(
    prediction_tokens: Sequence[str], reference_tokens: Sequence[str], *, exclusive: bool = True
) -> float:
    """ROUGE-L F-score from the longest common subsequence.

    Args:
        prediction_tokens: hypothesis tokens.
        reference_tokens: reference tokens.
        exclusive: ``rouge-chinese`` semantics: distinct tokens of the LCS over distinct tokens of
            each side; False uses plain lengths (Lin 2004).

    Returns:
        F1 of LCS precision and recall, in [0, 1].
    """
    if not prediction_tokens or not reference_tokens:
        return 0.0
    lcs = _lcs(reference_tokens, prediction_tokens)
    if exclusive:
        return _f1(len(set(lcs)), len(set(prediction_tokens)), len(set(reference_tokens)))
    return _f1(len(lcs), len(prediction_tokens), len(reference_tokens))


def normalize_answer(text: str) -> str:
    """Canonical form for exact match: NFKC (full-width -> half-width), CJK punctuation to ASCII,
    case-folded, whitespace collapsed and stripped, trailing periods removed."""
    text = unicodedata.normalize("NFKC", text).translate(_CJK_PUNCT).casefold()
    text = " ".join(text.split())
    # Whitespace next to a Han character is layout, not content ("发热 ，咳嗽" == "发热，咳嗽").
    text = re.sub(rf"\s*([{_HAN}]|[^\w\s])\s*", r"\1", text)
    return text.rstrip(".").strip()


def exact_match(prediction: str, reference: str) -> bool:
    """Whether two answers are equal after :func:`normalize_answer`.

    Args:
        prediction: generated text.
        reference: expected text.

    Returns:
        True when the normalised forms are identical.
    """
    return normalize_answer(prediction) == normalize_answer(reference)


def compute_generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """BLEU-4, ROUGE-1/2/L (percent, per-sample average) and exact-match accuracy (0-1).

    Args:
        predictions: generated texts, one per sample.
        references: expected texts, aligned with ``predictions``.

    Returns:
        ``{"bleu-4", "rouge-1", "rouge-2", "rouge-l", "accuracy", "num_samples"}``; every score 0
        when there is no sample. An empty prediction scores 0 and does not raise.

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    sums = {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    matches = 0
    for pred, ref in zip(predictions, references):
        words_p, words_r = tokenize_for_metrics(pred), tokenize_for_metrics(ref)
        sums["rouge-1"] += round(rouge_n(words_p, words_r, 1) * 100, 4)
        sums["rouge-2"] += round(rouge_n(words_p, words_r, 2) * 100, 4)
        sums["rouge-l"] += round(rouge_l(words_p, words_r) * 100, 4)
        sums["bleu-4"] += round(bleu4(tokenize_for_bleu(pred), tokenize_for_bleu(ref)) * 100, 4)
        matches += exact_match(pred, ref)
    count = len(predictions)
    result = {k: round(v / count, 4) if count else 0.0 for k, v in sums.items()}
    result["accuracy"] = matches / count if count else 0.0
    result["num_samples"] = float(count)
    return result
