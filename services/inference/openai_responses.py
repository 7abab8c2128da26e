"""The OpenAI response objects of one request: whole answers and streamed chunks, for chat and text
completions, with logprobs in OpenAI's two shapes (chat ``logprobs.content``, completions' parallel
lists). ``services.inference.openai_api`` serves them; this module only shapes them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from services.inference.openai_schemas import error_body, error_for

if TYPE_CHECKING:
    from services.inference.plane import Chunk, Completion, Generation, Logprob

log = logging.getLogger("lorafleet.inference.http")


class Failure:
    """An error raised while a generation streamed, carried through the chunk queue to the client."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Answer:
    """Builds the OpenAI response objects of one request (chat or text completion)."""

    def __init__(self, kind: str, model: str, n: int, include_usage: bool) -> None:
        self.kind = kind
        self.model = model
        self.n = n
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.prompt_only = False
        """``echo`` with ``max_tokens: 0``: the one generated token is dropped from every choice
        (its text, its logprob, its count in ``usage``) and the finish reason is ``length``."""

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        obj = self.object + (".chunk" if chunk and self.kind == "chat" else "")
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    # -- chat --------------------------------------------------------------------------------------

    def chat_body(self, completion: Completion) -> dict[str, Any]:
        choices = [
            {
                "index": s.index,
                "message": {"role": "assistant", "content": s.text},
                "logprobs": None if s.logprobs is None else {"content": _chat_logprobs(s.logprobs)},
                "finish_reason": s.finish_reason,
            }
            for s in completion.samples
        ]
        body = self._envelope(choices, chunk=False)
        body["usage"] = self._usage(completion.usage.prompt_tokens, completion.usage.generated_tokens)
        return body

    async def chat_stream(
        self, chunks: AsyncIterator[Chunk | Failure], generation: Generation
    ) -> AsyncIterator[str]:
        started: set[int] = set()
        async for chunk in chunks:
            if isinstance(chunk, Failure):
                yield self._stream_error(chunk.error)
                break
            if chunk.usage is not None:
                if self.include_usage:
                    yield self._usage_chunk(chunk.usage.prompt_tokens, chunk.usage.generated_tokens)
                continue
            choice: dict[str, Any] = {
                "index": chunk.index,
                "delta": {},
                "logprobs": None,
                "finish_reason": None,
            }
            if chunk.index not in started:
                started.add(chunk.index)
                choice["delta"]["role"] = "assistant"
            if chunk.text or "role" in choice["delta"]:
                choice["delta"]["content"] = chunk.text
            if chunk.logprobs:
                choice["logprobs"] = {"content": _chat_logprobs(chunk.logprobs)}
            if chunk.finish_reason is not None:
                choice["finish_reason"] = chunk.finish_reason
            elif not chunk.text and not chunk.logprobs and "role" not in choice["delta"]:
                continue  # text held back (a partial character or stop string): nothing to send
            yield self._chunk([choice])
        yield "[DONE]"

    # -- text --------------------------------------------------------------------------------------

    def text_body(self, completions: list[Completion], echo: list[str] | None) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        prompt_tokens = generated = 0
        for p, completion in enumerate(completions):
            prompt_tokens += completion.usage.prompt_tokens
            generated += 0 if self.prompt_only else completion.usage.generated_tokens
            prefix = echo[p] if echo is not None else ""
            for s in completion.samples:
                logprobs = None
                if s.logprobs is not None:
                    entries = list(completion.prompt_logprobs or []) if echo is not None else []
                    logprobs = _text_logprobs(entries + ([] if self.prompt_only else list(s.logprobs)))
                choices.append(
                    {
                        "index": p * self.n + s.index,
                        "text": prefix + ("" if self.prompt_only else s.text),
                        "logprobs": logprobs,
                        "finish_reason": "length" if self.prompt_only else s.finish_reason,
                    }
                )
        body = self._envelope(choices, chunk=False)
        body["usage"] = self._usage(prompt_tokens, generated)
        return body

    async def text_stream(
        self,
        streams: list[AsyncIterator[Chunk | Failure]],
        generations: list[Generation],
        echo: list[str] | None,
    ) -> AsyncIterator[str]:
        prompt_tokens = generated = 0
        for p, chunks in enumerate(streams):
            started: set[int] = set()
            prompt_entries: tuple[Logprob, ...] = ()
            async for chunk in chunks:
                if isinstance(chunk, Failure):
                    yield self._stream_error(chunk.error)
                    yield "[DONE]"
                    return
                if chunk.usage is not None:
                    prompt_tokens += chunk.usage.prompt_tokens
                    generated += 0 if self.prompt_only else chunk.usage.generated_tokens
                    continue
                if chunk.prompt_logprobs is not None:
                    prompt_entries = chunk.prompt_logprobs
                text = "" if self.prompt_only else chunk.text
                entries = [] if self.prompt_only else list(chunk.logprobs)
                finish = chunk.finish_reason
                if self.prompt_only and finish is not None:
                    finish = "length"
                if chunk.index not in started:
                    started.add(chunk.index)
                    if echo is not None:
                        text = echo[p] + text
                        entries = (
                            list(prompt_entries) + entries if chunk.logprobs or prompt_entries else entries
                        )
                if not text and not entries and finish is None:
                    continue
                choice = {
                    "index": p * self.n + chunk.index,
                    "text": text,
                    "logprobs": _text_logprobs(entries) if entries else None,
                    "finish_reason": finish,
                }
                yield self._chunk([choice])
        if self.include_usage:
            yield self._usage_chunk(prompt_tokens, generated)
        yield "[DONE]"

    # -- shared --------------------------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]]) -> str:
        body = self._envelope(choices, chunk=True)
        if self.include_usage:
            body["usage"] = None
        return to_json(body)

    def _usage_chunk(self, prompt_tokens: int, generated: int) -> str:
        body = self._envelope([], chunk=True)
        body["usage"] = self._usage(prompt_tokens, generated)
        return to_json(body)

    @staticmethod
    def _stream_error(error: BaseException) -> str:
        mapped = error_for(error, {})
        if mapped is None:
            log.error("HTTP stream failed", exc_info=error)
            return to_json(error_body(500, "internal error; the server logged the details", "internal"))
        return to_json(mapped[1])


def _chat_logprobs(entries: list[Logprob] | tuple[Logprob, ...]) -> list[dict[str, Any]]:
    """OpenAI chat ``logprobs.content``: token, logprob, UTF-8 bytes, alternatives."""
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": list(e.token.encode()),
            "top_logprobs": [
                {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())} for t in e.top
            ],
        }
        for e in entries
    ]


def _text_logprobs(entries: list[Logprob]) -> dict[str, Any]:
    """OpenAI completions ``logprobs``: parallel lists; ``text_offset`` counts the characters of the
    tokens before each (decoded alone, as vLLM reports it); the first prompt token (echo) has a
    null logprob and null alternatives."""
    offsets: list[int] = []
    at = 0
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }
