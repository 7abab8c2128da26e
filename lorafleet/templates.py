"""Prompt templates: how a conversation becomes token ids, for training and for generation.

A template renders each turn as a *prompt* piece (everything up to where the assistant's answer
starts) and a *response* piece (the answer plus the marker that ends it: eos, ``<|im_end|>``,
``<|eot_id|>``...). Training labels the response pieces, so the model learns to stop; generation
feeds the prompt pieces and stops at :func:`stop_strings`. Use the SAME template in training and
inference: a mismatch is the usual cause of endless output or leaked ``<reserved_*>`` tokens.

Every piece is encoded on its own with ``add_special_tokens=False``; special markers (bos, eos,
``<|im_start|>``...) are written into the template text, so nothing is added twice. Concatenating the
pieces of :func:`encode_turns` gives the ids of the whole conversation.

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

from lorafleet.errors import ConfigError, FieldProblem

_SLOT_RE = re.compile(r"\{(query|answer|system|n|bos|eos)\}")
_PROBE_ANSWER = "LORAFLEET_PROBE_ANSWER"


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


def _system_text(template: Template, system: str | None) -> str:
    """Rendered system block, or empty when there is no system (or the template has no slot)."""
    chosen = template.default_system if system is None else system
    if not chosen or not template.system_format:
        return ""
    return _fill(template.system_format, {"system": chosen})


def render_turns(
    template: Template, tokenizer: Any, turns: list[tuple[str, str]], system: str | None
) -> list[tuple[str, str]]:
    """Render each turn as (prompt text, response text).

    The first prompt holds the template prefix and the system prompt. Concatenating all the pieces
    gives the whole conversation text.

    Args:
        template: A registry template (not the ``tokenizer`` one; that renders through jinja).
        tokenizer: Supplies the bos/eos texts.
        turns: (query, answer) pairs, oldest first.
        system: System prompt; None uses the template's default, "" means none.

    Returns:
        One (prompt, response) pair of strings per turn.
    """
    if template.use_chat_template:
        return _chat_template_pieces(tokenizer, turns, system)
    special = _special(tokenizer, template)
    system_block = _system_text(template, system)
    pieces: list[tuple[str, str]] = []
    for index, (query, answer) in enumerate(turns):
        if index == 0 and template.system_in_query:
            query = system_block + query
        prompt = _fill(template.user_format, {"query": query, "n": str(index + 1), **special})
        if index == 0:
            head = template.prefix if template.system_in_query else template.prefix + system_block
            prompt = _fill(head, special) + prompt
        else:
            prompt = template.separator + prompt
        pieces.append((prompt, _fill(template.assistant_format, {"answer": answer, **special})))
    return pieces


def _messages(turns: list[tuple[str, str]], system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    for query, answer in turns:
        messages.append({"role": "user", "content": query})
        messages.append({"role": "assistant", "content": answer})
    return messages


def _render_chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return str(text)


def _chat_template_pieces(
    tokenizer: Any, turns: list[tuple[str, str]], system: str | None
) -> list[tuple[str, str]]:
    """Split a jinja chat-template render into per-turn prompt/response strings by prefix diffs.

    Render i with the generation prompt ends where answer i starts; render i without it ends after
    answer i. Each render must extend the previous one, which holds for chatml-, llama3- and most
    other templates; templates that rewrite earlier turns (e.g. stripping past reasoning) cannot be
    split this way and raise a ConfigError.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            [
                FieldProblem(
                    "data.template", "tokenizer", "the tokenizer has no chat_template; pick a named template"
                )
            ]
        )
    messages = _messages(turns, system)
    offset = 1 if system else 0
    pieces: list[tuple[str, str]] = []
    done = ""
    for index in range(len(turns)):
        upto = messages[: offset + 2 * index + 1]
        prompt_text = _render_chat(tokenizer, upto, True)
        full_text = _render_chat(tokenizer, messages[: offset + 2 * index + 2], False)
        if not prompt_text.startswith(done) or not full_text.startswith(prompt_text):
            raise ConfigError(
                [
                    FieldProblem(
                        "data.template",
                        "tokenizer",
                        "the tokenizer's chat_template rewrites earlier "
                        "turns, so prompt and answer cannot be told apart; pick a named template",
                    )
                ]
            )
        pieces.append((prompt_text[len(done) :], full_text[len(prompt_text) :]))
        done = full_text
    return pieces


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_prefix(template: Template, tokenizer: Any) -> list[int]:
    """Ids of the template's conversation prefix (``[gMASK]sop``...); empty for jinja templates.

    The first prompt of :func:`encode_turns` starts with exactly these ids, so truncation can keep
    them.
    """
    if template.use_chat_template or not template.prefix:
        return []
    return _encode(tokenizer, _fill(template.prefix, _special(tokenizer, template)))


def encode_turns(
    template: Template, tokenizer: Any, turns: list[tuple[str, str]], system: str | None
) -> list[tuple[list[int], list[int]]]:
    """Encode a conversation as (prompt_ids, response_ids) per turn.

    Args:
        template: From :func:`get_template`.
        tokenizer: A Hugging Face tokenizer.
        turns: (query, answer) pairs, oldest first.
        system: System prompt; None uses the template's default, "" means none.

    Returns:
        One pair per turn. Response ids include the turn's end marker (eos, ``<|im_end|>``...).
        The first prompt starts with :func:`encode_prefix`'s ids.
    """
    prefix_ids = encode_prefix(template, tokenizer)
    encoded: list[tuple[list[int], list[int]]] = []
    for index, (prompt, response) in enumerate(render_turns(template, tokenizer, turns, system)):
        if index == 0 and prefix_ids:
            # The prefix is encoded on its own so its ids are stable whatever text follows.
            prefix_text = _fill(template.prefix, _special(tokenizer, template))
            prompt_ids = prefix_ids + _encode(tokenizer, prompt[len(prefix_text) :])
        else:
            prompt_ids = _encode(tokenizer, prompt)
        encoded.append((prompt_ids, _encode(tokenizer, response)))
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
        encoded = _encode(tokenizer, word)
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
