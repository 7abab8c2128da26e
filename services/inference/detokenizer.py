"""Token ids -> text for the layer above the engine: incremental detokenization with stop-string
hold-back, and the stop check the engine calls with each generated token.

The engine sees token ids only. The plane (``plane.py``) turns a request's streamed ids into text
with a :class:`Detokenizer`, and, when the request has stop strings, hands the engine a
:func:`stop_string_check` so that generation ends on the very token that completes one (the text is
cut before it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class Detokenizer:
    """Incremental detokenization with stop-string hold-back.

    Decodes a window of recent tokens and emits only text that is final: not ending in an
    incomplete UTF-8 sequence (byte-level BPE yields U+FFFD until the character is complete) and not
    a possible beginning of a stop string.
    """

    def __init__(self, tokenizer: Any, stop_strings: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all final text so far
        self.emitted = 0  # characters of ``text`` already emitted
        self.stopped = False  # a stop string matched: later tokens add no text

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns ``(text to emit now, whether a stop string matched)``."""
        if self.stopped:
            return "", True
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stop_strings:
            start = max(0, self.emitted - max(len(s) for s in self.stop_strings))
            hits = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._take(len(self.text)), True
            return self._take(len(self.text) - self._held_back()), False
        return self._take(len(self.text)), False

    def flush(self) -> str:
        """Everything not emitted yet (at the end of the request)."""
        return self._take(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest text suffix that could still grow into a stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out


def stop_string_check(tokenizer: Any, stop_strings: tuple[str, ...]) -> Callable[[int], bool]:
    """A ``GenerationRequest.stop_check``: fed every generated token, True once a stop string is in
    the text. Runs on the engine's loop thread, one incremental decode per token."""
    detokenizer = Detokenizer(tokenizer, stop_strings)
    return lambda token_id: detokenizer.add(token_id)[1]


def detokenize(tokenizer: Any, token_ids: Sequence[int], stop_strings: tuple[str, ...] = ()) -> str:
    """The whole text of ``token_ids``, cut before the first stop string: what a stream of the same
    tokens adds up to."""
    detokenizer = Detokenizer(tokenizer, stop_strings)
    parts = []
    for token_id in token_ids:
        text, stopped = detokenizer.add(token_id)
        parts.append(text)
        if stopped:
            break
    parts.append(detokenizer.flush())
    return "".join(parts)


__all__ = ["Detokenizer", "detokenize", "stop_string_check"]
