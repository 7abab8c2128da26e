"""Prompt templates: how a conversation becomes token ids, for training and for generation.

A template renders each turn as a *prompt* piece (everything up to where the assistant's answer
starts) and a *response* piece (the answer plus the marker that ends it: eos, ``<|im_end|>``,
``<|eot_id|>``...). Training labels the response pieces, so the model learns to stop; generation
feeds the prompt pieces and stops at :func:`stop_strings`. Use the SAME template in training and
inference: a mismatch is the usual cause of endless output or leaked ``<reserved_*>`` tokens.

Every piece is encoded on its own with ``add_special_tokens=False``; special markers (bos, eos,
``<|im_start|>``...) are written into the template text, so nothing is added twice. Concatenating the
pieces of :func:`encode_turns` gives the ids of the whole conversation.

Message content is always text: a control token's text inside a query, an answer or a system
prompt encodes as ordinary characters, so a user cannot forge a turn or a role (issue 16). Only the
template's own markers become control tokens.

The ``tokenizer`` template renders with the tokenizer's own jinja ``chat_template`` and splits
prompt from response by diffing the renders of growing conversations.

Formats follow the original models (see the registry at the bottom); for example ``qwen``::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{query}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from lorafleet.control_tokens import (
    ControlTokens,
    control_tokens,
    encode_keeping_content_text,
    encode_markup,
    holds_control_text,
)
from lorafleet.errors import ConfigError, FieldProblem

_SLOT_RE = re.compile(r"\{(query|answer|system|n|bos|eos)\}")
_PROBE_ANSWER = "LORAFLEET_PROBE_ANSWER"

_Part = tuple[str, bool]
"""A run of rendered text and whether it is message content (True) or template markup (False)."""


@dataclass(frozen=True)
class Template:
    """How one model family lays out a conversation.

    Slots: ``{query}``, ``{answer}``, ``{system}``, ``{n}`` (1-based round number), ``{bos}`` and
    ``{eos}`` (the tokenizer's bos / eos token text). Slots are filled in one pass, so braces inside
    user text are kept literally.
    """

    name: str
    prefix: str = ""
    """Text once at the start of the conversation (``[gMASK]sop``, ``<|begin_of_text|>``)."""
    system_format: str = ""
    """How a system prompt is rendered; empty = the template has no system slot."""
    default_system: str = ""
    """System prompt used when the sample and the config give none."""
    system_in_query: bool = False
    """Render the system inside the first query instead of before it (llama2's ``<<SYS>>``)."""
    user_format: str = "{query}"
    """One turn's prompt, ending where the assistant answer starts."""
    assistant_format: str = "{answer}{eos}"
    """One turn's response, including the marker that ends it."""
    separator: str = ""
    """Text between turns, put at the start of every prompt after the first."""
    stop_words: tuple[str, ...] = ()
    """Extra strings that end generation besides eos."""
    use_chat_template: bool = False
    """Render with the tokenizer's jinja chat_template (the ``tokenizer`` template)."""


def _fill(fmt: str, values: dict[str, str]) -> str:
    """Fill ``{slot}`` markers in one pass (values are not rescanned, so user braces are safe)."""
    return _SLOT_RE.sub(lambda m: values.get(m.group(1), m.group(0)), fmt)


def _fill_parts(fmt: str, values: dict[str, list[_Part]]) -> list[_Part]:
    """Fill ``{slot}`` markers with parts; the format's own text is markup."""
    parts: list[_Part] = []
    pos = 0
    for match in _SLOT_RE.finditer(fmt):
        if match.start() > pos:
            parts.append((fmt[pos : match.start()], False))
        parts.extend(values.get(match.group(1), [(match.group(0), False)]))
        pos = match.end()
    if pos < len(fmt):
        parts.append((fmt[pos:], False))
    return parts


def _join(parts: list[_Part]) -> str:
    return "".join(text for text, _ in parts)


def _special(tokenizer: Any, template: Template) -> dict[str, str]:
    """The bos/eos texts a template needs; raise when it needs an eos the tokenizer lacks."""
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    bos = getattr(tokenizer, "bos_token", None) if tokenizer is not None else None
    uses_eos = "{eos}" in template.user_format + template.assistant_format
    if uses_eos and not eos:
        raise ConfigError(
            [
                FieldProblem(
                    "data.template",
                    template.name,
                    "this template ends answers with eos, but the tokenizer defines no eos_token",
                )
            ]
        )
    return {"eos": str(eos or ""), "bos": str(bos or "")}


def _system_parts(template: Template, system: str | None) -> list[_Part]:
    """Rendered system block, or none when there is no system (or the template has no slot)."""
    chosen = template.default_system if system is None else system
    if not chosen or not template.system_format:
        return []
    return _fill_parts(template.system_format, {"system": [(chosen, True)]})


def _render_parts(
    template: Template, tokenizer: Any, turns: list[tuple[str, str]], system: str | None
) -> list[tuple[list[_Part], list[_Part]]]:
    """Each turn as (prompt parts, response parts); the first prompt opens with the prefix part."""
    if template.use_chat_template:
        return _chat_template_parts(tokenizer, turns, system)
    special_text = _special(tokenizer, template)
    special = {name: [(text, False)] for name, text in special_text.items()}
    system_block = _system_parts(template, system)
    pieces: list[tuple[list[_Part], list[_Part]]] = []
    for index, (query, answer) in enumerate(turns):
        query_parts: list[_Part] = [(query, True)]
        if index == 0 and template.system_in_query:
            query_parts = system_block + query_parts
        values = {"query": query_parts, "n": [(str(index + 1), False)], **special}
        prompt = _fill_parts(template.user_format, values)
        if index == 0:
            prefix = _fill(template.prefix, special_text)
            head: list[_Part] = [(prefix, False)] if prefix else []
            prompt = head + ([] if template.system_in_query else system_block) + prompt
        elif template.separator:
            prompt = [(template.separator, False), *prompt]
        response = _fill_parts(template.assistant_format, {"answer": [(answer, True)], **special})
        pieces.append((prompt, response))
    return pieces


def render_turns(
    template: Template, tokenizer: Any, turns: list[tuple[str, str]], system: str | None
) -> list[tuple[str, str]]:
    """Render each turn as (prompt text, response text).

    The first prompt holds the template prefix and the system prompt. Concatenating all the pieces
    gives the whole conversation text.

    Args:
        template: From :func:`get_template`.
        tokenizer: Supplies the bos/eos texts (and the jinja chat_template of ``tokenizer``).
        turns: (query, answer) pairs, oldest first.
        system: System prompt; None uses the template's default, "" means none.

    Returns:
        One (prompt, response) pair of strings per turn.
    """
    return [(_join(p), _join(r)) for p, r in _render_parts(template, tokenizer, turns, system)]


def _messages(turns: list[tuple[str, str]], system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    for query, answer in turns:
        messages.append({"role": "user", "content": query})
        messages.append({"role": "assistant", "content": answer})
    return messages


def _render_chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return str(text)


def _jinja_problem(message: str) -> ConfigError:
    return ConfigError([FieldProblem("data.template", "tokenizer", message)])


def _split_renders(tokenizer: Any, messages: list[dict[str, str]], turns: int) -> list[tuple[str, str]]:
    """Split a jinja chat-template render into per-turn prompt/response strings by prefix diffs.

    Render i with the generation prompt ends where answer i starts; render i without it ends after
    answer i. Each render must extend the previous one, which holds for chatml-, llama3- and most
    other templates; templates that rewrite earlier turns (e.g. stripping past reasoning) cannot be
    split this way and raise a ConfigError.
    """
    offset = len(messages) - 2 * turns
    pieces: list[tuple[str, str]] = []
    done = ""
    for index in range(turns):
        prompt_text = _render_chat(tokenizer, messages[: offset + 2 * index + 1], True)
        full_text = _render_chat(tokenizer, messages[: offset + 2 * index + 2], False)
        if not prompt_text.startswith(done) or not full_text.startswith(prompt_text):
            raise _jinja_problem(
                "the tokenizer's chat_template rewrites earlier "
                "turns, so prompt and answer cannot be told apart; pick a named template"
            )
        pieces.append((prompt_text[len(done) :], full_text[len(prompt_text) :]))
        done = full_text
    return pieces


def _chat_template_parts(
    tokenizer: Any, turns: list[tuple[str, str]], system: str | None
) -> list[tuple[list[_Part], list[_Part]]]:
    """Per-turn parts of a jinja chat-template render, telling message content from markup.

    Conversations whose content holds no control-token text render exactly as the template writes
    them. Otherwise every message's content (without its outer whitespace, which templates often
    trim) is wrapped in two private-use characters that appear nowhere else, the render is split
    at them, and the result must equal the plain render: a template that changes content in other
    ways (slices it, tests its first characters) cannot keep it apart from markup and is refused.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise _jinja_problem("the tokenizer has no chat_template; pick a named template")
    messages = _messages(turns, system)
    plain = _split_renders(tokenizer, messages, len(turns))
    controls = control_tokens(tokenizer)
    if not any(holds_control_text(tokenizer, m["content"], controls) for m in messages):
        return [([(p, False)], [(r, False)]) for p, r in plain]
    open_mark, close_mark = _free_marks(tokenizer, messages)
    marked = [{**m, "content": _wrap(m["content"], open_mark, close_mark)} for m in messages]
    parts = [
        (_unmark(p, open_mark, close_mark), _unmark(r, open_mark, close_mark))
        for p, r in _split_renders(tokenizer, marked, len(turns))
    ]
    if [(_join(p), _join(r)) for p, r in parts] != plain:
        raise _jinja_problem(
            "the tokenizer's chat_template changes message content, so the control tokens in "
            "it cannot be kept as text; pick a named template"
        )
    return parts


def _chat_template_pieces(
    tokenizer: Any, turns: list[tuple[str, str]], system: str | None
) -> list[tuple[str, str]]:
    """Per-turn (prompt, response) strings of a jinja chat-template render."""
    return [(_join(p), _join(r)) for p, r in _chat_template_parts(tokenizer, turns, system)]


# Private-use code points (BMP, planes 15 and 16) that can mark content inside a jinja render.
_MARK_CANDIDATES = (range(0xE000, 0xF900), range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE))


def _free_marks(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, str]:
    """Two characters found in no message, in the chat_template source nor in a special token."""
    specials = getattr(tokenizer, "special_tokens_map", {}) or {}
    used = set(str(tokenizer.chat_template)).union(str(specials), *(m["content"] for m in messages))
    free = (chr(c) for block in _MARK_CANDIDATES for c in block if chr(c) not in used)
    marks = [next(free, ""), next(free, "")]
    if not all(marks):
        raise _jinja_problem("the messages use every private-use character; pick a named template")
    return marks[0], marks[1]


def _wrap(text: str, open_mark: str, close_mark: str) -> str:
    core = text.strip()
    if not core:
        return text
    lead = len(text) - len(text.lstrip())
    return f"{text[:lead]}{open_mark}{core}{close_mark}{text[lead + len(core) :]}"


def _unmark(text: str, open_mark: str, close_mark: str) -> list[_Part]:
    """Split a marked render into parts; a lone mark means the template cut content apart."""
    parts: list[_Part] = []
    pos = 0
    for match in re.finditer(f"{re.escape(open_mark)}(.*?){re.escape(close_mark)}", text, re.DOTALL):
        parts += [(text[pos : match.start()], False), (match.group(1), True)]
        pos = match.end()
    parts.append((text[pos:], False))
    if any(open_mark in t or close_mark in t for t, _ in parts):
        raise _jinja_problem(
            "the tokenizer's chat_template cuts message content apart, so the control tokens in "
            "it cannot be kept as text; pick a named template"
        )
    return [(t, is_content) for t, is_content in parts if t]


def _encode_parts(tokenizer: Any, parts: list[_Part], controls: ControlTokens) -> list[int]:
    """Ids of rendered parts: markup may hold control tokens, content never does."""
    text = _join(parts)
    content: list[tuple[int, int]] = []
    pos = 0
    for piece, is_content in parts:
        if is_content and piece:
            content.append((pos, pos + len(piece)))
        pos += len(piece)
    if not content:
        return encode_markup(tokenizer, text)
    return encode_keeping_content_text(tokenizer, text, content, controls)


def encode_prefix(template: Template, tokenizer: Any) -> list[int]:
    """Ids of the template's conversation prefix (``[gMASK]sop``...); empty for jinja templates.

    The first prompt of :func:`encode_turns` starts with exactly these ids, so truncation can keep
    them.
    """
    if template.use_chat_template or not template.prefix:
        return []
    return encode_markup(tokenizer, _fill(template.prefix, _special(tokenizer, template)))


def encode_turns(
    template: Template, tokenizer: Any, turns: list[tuple[str, str]], system: str | None
) -> list[tuple[list[int], list[int]]]:
    """Encode a conversation as (prompt_ids, response_ids) per turn.

    Message content (queries, answers, the system prompt) is always text: a control token's text
    in it (``<|im_start|>``, ``</s>``...) encodes as ordinary characters, never as the control
    token, so content cannot forge turns or roles. Only the template's own markers become control
    tokens. Content without control-token text gets the ids it would get as part of the whole text.

    Args:
        template: From :func:`get_template`.
        tokenizer: A Hugging Face tokenizer.
        turns: (query, answer) pairs, oldest first.
        system: System prompt; None uses the template's default, "" means none.

    Returns:
        One pair per turn. Response ids include the turn's end marker (eos, ``<|im_end|>``...).
        The first prompt starts with :func:`encode_prefix`'s ids.

    Raises:
        ConfigError: the template cannot be used with this tokenizer (no eos, a jinja template
            that rewrites earlier turns or changes content holding control-token text).
    """
    prefix_ids = encode_prefix(template, tokenizer)
    controls = control_tokens(tokenizer)
    encoded: list[tuple[list[int], list[int]]] = []
    for index, (prompt, response) in enumerate(_render_parts(template, tokenizer, turns, system)):
        if index == 0 and prefix_ids:
            # The prefix is encoded on its own so its ids are stable whatever text follows.
            prompt_ids = prefix_ids + _encode_parts(tokenizer, prompt[1:], controls)
        else:
            prompt_ids = _encode_parts(tokenizer, prompt, controls)
        encoded.append((prompt_ids, _encode_parts(tokenizer, response, controls)))
    return encoded


def encode_prompt(
    template: Template,
    tokenizer: Any,
    history: list[tuple[str, str]],
    query: str,
    system: str | None,
) -> list[int]:
    """Ids to generate from: the history turns, then ``query``, ending where the answer starts.

    Produces the same ids as the training pieces of the same conversation, so training and
    inference see identical prompts.
    """
    turns = [*history, (query, "")]
    ids: list[int] = []
    pieces = encode_turns(template, tokenizer, turns, system)
    for prompt_ids, response_ids in pieces[:-1]:
        ids.extend(prompt_ids)
        ids.extend(response_ids)
    ids.extend(pieces[-1][0])
    return ids


def stop_strings(template: Template, tokenizer: Any) -> list[str]:
    """Strings that end generation: eos plus the template's end-of-turn markers."""
    found: list[str] = []
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        found.append(str(eos))
    words = list(template.stop_words)
    if template.use_chat_template:
        # The end marker is what the template puts after the answer, e.g. "<|im_end|>\n".
        ((_, response),) = _chat_template_pieces(tokenizer, [("q", _PROBE_ANSWER)], None)
        marker = response.split(_PROBE_ANSWER, 1)[-1].strip()
        if marker:
            words.append(marker)
    for word in words:
        if word not in found:
            found.append(word)
    return found


def stop_token_ids(template: Template, tokenizer: Any) -> list[int]:
    """Ids of the stop strings that are single tokens (for ``generate(eos_token_id=...)``)."""
    ids: list[int] = []
    for word in stop_strings(template, tokenizer):
        encoded = encode_markup(tokenizer, word)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


_CHATML = Template(
    name="qwen",
    system_format="<|im_start|>system\n{system}<|im_end|>\n",
    default_system="You are a helpful assistant.",
    user_format="<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n",
    assistant_format="{answer}<|im_end|>\n",
    stop_words=("<|im_end|>",),
)

TEMPLATES: dict[str, Template] = {
    "default": Template(
        name="default",
        system_format="System: {system}\n",
        user_format="Human: {query}{eos}\nAssistant:",
        assistant_format="{answer}{eos}",
        separator="\n",
    ),
    "alpaca": Template(
        name="alpaca",
        system_format="{system}\n\n",
        default_system=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        ),
        user_format="### Instruction:\n{query}\n\n### Response:\n",
        assistant_format="{answer}{eos}",
        separator="\n\n",
    ),
    "qwen": _CHATML,
    "chatml": dataclasses.replace(_CHATML, name="chatml"),
    "llama2": Template(
        name="llama2",
        system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
        system_in_query=True,
        user_format="{bos}[INST] {query} [/INST]",
        assistant_format=" {answer} {eos}",
    ),
    "llama3": Template(
        name="llama3",
        prefix="<|begin_of_text|>",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user_format=(
            "<|start_header_id|>user<|end_header_id|>\n\n{query}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        assistant_format="{answer}<|eot_id|>",
        stop_words=("<|eot_id|>",),
    ),
    "baichuan": Template(
        name="baichuan",
        system_format="{system}",
        user_format="<reserved_102>{query}<reserved_103>",
        assistant_format="{answer}{eos}",
    ),
    "baichuan2": Template(
        name="baichuan2",
        system_format="{system}",
        user_format="<reserved_106>{query}<reserved_107>",
        assistant_format="{answer}{eos}",
    ),
    "chatglm2": Template(
        name="chatglm2",
        prefix="[gMASK]sop",
        system_format="{system}\n\n",
        user_format="[Round {n}]\n\n问：{query}\n\n答：",
        assistant_format="{answer}{eos}",
        separator="\n\n",
    ),
    "chatglm3": Template(
        name="chatglm3",
        prefix="[gMASK]sop",
        system_format="<|system|>\n{system}",
        user_format="<|user|>\n{query}<|assistant|>",
        # ChatGLM3 itself ends a turn by emitting the next role token; ending every answer with eos
        # lets the model stop on its own, and <|user|> / <|observation|> still stop generation.
        assistant_format="\n{answer}{eos}",
        stop_words=("<|user|>", "<|observation|>"),
    ),
    "belle": Template(
        name="belle",
        system_format="{system}\n\n",
        user_format="Human: {query}\n\nBelle: ",
        assistant_format="{answer}{eos}",
        separator="\n\n",
    ),
    "tokenizer": Template(name="tokenizer", use_chat_template=True),
}

TEMPLATE_SPECIAL_TOKENS: list[str] = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "[gMASK]",
    "sop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<reserved_102>",
    "<reserved_103>",
    "<reserved_106>",
    "<reserved_107>",
]
"""Every special marker a registry template writes (besides the tokenizer's own bos/eos)."""


def get_template(name: str, tokenizer: Any = None) -> Template:
    """Look up a template by name.

    ``auto`` resolves to ``tokenizer`` when the tokenizer has a chat_template, else ``default``;
    callers that know the model family should resolve ``auto`` to the family's template first.

    Args:
        name: A key of :data:`TEMPLATES`, or ``auto``.
        tokenizer: Needed for ``auto`` and to check that ``tokenizer`` is usable.

    Raises:
        ConfigError: on ``data.template`` for an unknown name, or ``tokenizer`` without a chat_template.
    """
    has_jinja = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if name == "auto":
        name = "tokenizer" if has_jinja else "default"
    if name not in TEMPLATES:
        raise ConfigError(
            [FieldProblem("data.template", name, f"unknown template; known: {sorted(TEMPLATES)} or 'auto'")]
        )
    if name == "tokenizer" and tokenizer is not None and not has_jinja:
        raise ConfigError(
            [FieldProblem("data.template", name, "the tokenizer has no chat_template; pick a named template")]
        )
    return TEMPLATES[name]
