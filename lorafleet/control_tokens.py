"""Control tokens of a tokenizer, and encoding that keeps message content as text.

A control token is a special or added token of the tokenizer (``<|im_start|>``, ``</s>``,
``[gMASK]``...). Template markup may contain them; message content must never become one, or a user
could forge turns and roles (issue 16). :func:`encode_keeping_content_text` encodes a rendered text
as a whole, as the model saw it in pre-training, so ordinary content keeps the ids it always had,
and re-encodes as plain text every control token that content made.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from dataclasses import dataclass
from typing import Any

from lorafleet.errors import ConfigError, FieldProblem


@dataclass(frozen=True)
class ControlTokens:
    """A tokenizer's control tokens: its special and added tokens, whitespace-only ones excepted."""

    ids: frozenset[int]
    """Their ids."""
    pattern: re.Pattern[str] | None
    """Any control token's text, longest first (None when there is none)."""


_CACHE: weakref.WeakKeyDictionary[Any, tuple[int, ControlTokens]] = weakref.WeakKeyDictionary()


def control_tokens(tokenizer: Any) -> ControlTokens:
    """The control tokens of ``tokenizer``: every added token (special or not) and special token.

    Cached per tokenizer while its added vocabulary keeps its size.

    Whitespace-only added tokens (Gemma's ``"\\n"`` runs) are plain text in every template and are
    not control tokens.
    """
    added: dict[int, Any] = dict(getattr(tokenizer, "added_tokens_decoder", None) or {})
    try:
        cached = _CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable: compute every time
        cached = None
    if cached is not None and cached[0] == len(added):
        return cached[1]
    texts = {int(i): str(getattr(t, "content", t)) for i, t in added.items()}
    specials = list(getattr(tokenizer, "all_special_tokens", None) or [])
    for text in specials:
        ids = tokenizer.convert_tokens_to_ids([text])
        if ids and isinstance(ids[0], int):
            texts.setdefault(ids[0], text)
    texts = {i: t for i, t in texts.items() if t and not t.isspace()}
    words = sorted(set(texts.values()), key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(w) for w in words)) if words else None
    controls = ControlTokens(frozenset(texts), pattern)
    with contextlib.suppress(TypeError):
        _CACHE[tokenizer] = (len(added), controls)
    return controls


def holds_control_text(tokenizer: Any, text: str, controls: ControlTokens) -> bool:
    """Whether ``text`` (or its normalized form) contains a control token's text anywhere."""
    if controls.pattern is None or not text:
        return False
    if controls.pattern.search(text):
        return True
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    return normalizer is not None and bool(controls.pattern.search(normalizer.normalize_str(text)))


def encode_markup(tokenizer: Any, text: str) -> list[int]:
    """Ids of template markup: control-token texts in it become control tokens."""
    if not text:
        return []
    return list(tokenizer.encode(text, add_special_tokens=False))


def _after_newline(encode: Any, text: str, newline: list[int]) -> list[int]:
    """Ids of ``text`` as if it followed other text: encoded after a newline that is then dropped.

    Without it, SentencePiece-style tokenizers would start every separately encoded run with the
    prefix space they give the start of a string.
    """
    ids = list(encode("\n" + text))
    if newline and ids[: len(newline)] == newline:
        return ids[len(newline) :]
    return list(encode(text))


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` with no added or special token matched: the model's own pieces only."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
    # The backend's pipeline without its added vocabulary; unlike split_special_tokens it also
    # skips non-special added tokens, and it sets no flag on the shared tokenizer.
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    words = (
        [text]
        if backend.pre_tokenizer is None
        else [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    )
    return [token.id for word in words for token in backend.model.tokenize(word)]


def _encode_as_text(tokenizer: Any, text: str, follows_text: bool, controls: ControlTokens) -> list[int]:
    """Ids of content text that provably holds no control id.

    A model whose vocabulary also holds a control token's text (``sop`` in a byte-level BPE) can
    still merge it back; such text is encoded one character at a time instead.

    Raises:
        ConfigError: a single character encodes to a control token, so it cannot be text.
    """
    if follows_text:
        ids = _after_newline(lambda s: _plain_ids(tokenizer, s), text, _plain_ids(tokenizer, "\n"))
    else:
        ids = _plain_ids(tokenizer, text)
    if controls.ids.isdisjoint(ids):
        return ids
    if len(text) == 1:
        raise ConfigError(
            [FieldProblem("data.template", text, "the tokenizer has no way to write this character as text")]
        )
    return [
        i
        for index, char in enumerate(text)
        for i in _encode_as_text(tokenizer, char, follows_text or index > 0, controls)
    ]


def _overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    return end > start and any(start < span_end and span_start < end for span_start, span_end in spans)


def _clip(spans: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """``spans`` cut to [start, end) and shifted to start at 0."""
    return [(max(s, start) - start, min(e, end) - start) for s, e in spans if s < end and e > start]


def _scan(
    tokenizer: Any, text: str, content: list[tuple[int, int]], follows_text: bool, controls: ControlTokens
) -> tuple[list[int], list[tuple[int, int]]]:
    """Encode ``text`` as markup; also return the spans of control tokens made from content.

    A fast tokenizer reports each token's characters, so a control token counts as made from
    content when its characters overlap content. A slow one cannot say, so every control-token
    text found inside content counts.
    """
    newline = encode_markup(tokenizer, "\n") if follows_text else []
    if not getattr(tokenizer, "is_fast", False):
        ids = (
            _after_newline(lambda s: encode_markup(tokenizer, s), text, newline)
            if follows_text
            else encode_markup(tokenizer, text)
        )
        pattern = controls.pattern
        found = [m.span() for s, e in content for m in pattern.finditer(text, s, e)] if pattern else []
        return ids, found
    shift = 1 if follows_text else 0
    encoding = tokenizer("\n" * shift + text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
    if shift and ids[: len(newline)] == newline:
        ids, offsets = ids[len(newline) :], offsets[len(newline) :]
    elif shift:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets, shift = list(encoding["input_ids"]), list(encoding["offset_mapping"]), 0
    found = [
        (start - shift, end - shift)
        for token, (start, end) in zip(ids, offsets, strict=True)
        if token in controls.ids and _overlaps(start - shift, end - shift, content)
    ]
    return ids, found


def encode_keeping_content_text(
    tokenizer: Any,
    text: str,
    content: list[tuple[int, int]],
    controls: ControlTokens,
    follows_text: bool = False,
) -> list[int]:
    """Ids of ``text`` where only markup may become control tokens; content stays text.

    The text is encoded as a whole, so ordinary content gets exactly the ids it always had. Each
    control token made (even in part) from content is re-encoded as plain text, and the runs
    between are encoded again the same way, until no content character is part of a control
    token. Each round works on strictly shorter text, so it ends.

    Args:
        tokenizer: A Hugging Face tokenizer, fast or slow.
        text: Rendered markup and content.
        content: [start, end) character spans of ``text`` that are message content.
        controls: From :func:`control_tokens`.
        follows_text: ``text`` continues earlier text (no string-start prefix space).

    Returns:
        The ids; none made from content is in ``controls.ids``.

    Raises:
        ConfigError: the tokenizer writes a character of the content only as a control token.
    """
    ids, found = _scan(tokenizer, text, content, follows_text, controls)
    if not found:
        return ids
    merged: list[tuple[int, int]] = []
    for start, end in sorted(found):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    out: list[int] = []
    pos = 0
    for start, end in [*merged, (len(text), len(text))]:
        if start > pos:
            run = text[pos:start]
            out += encode_keeping_content_text(
                tokenizer, run, _clip(content, pos, start), controls, follows_text or pos > 0
            )
        if end > start:
            out += _encode_as_text(tokenizer, text[start:end], follows_text or start > 0, controls)
        pos = end
    return out
