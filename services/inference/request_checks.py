"""Checks of the chat messages a client sends the inference service, before anything is tokenized:
roles, order, sizes. Every problem is collected, each naming its field and value
(``FieldProblem``); the plane raises them together with the sampling problems
(``SamplingParams.validate``) as one ``InvalidRequestError``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.errors import FieldProblem

ROLES = ("system", "user", "assistant")
MAX_PROMPT_CHARS = 1_000_000
"""Prompts longer than this are refused before tokenizing (a tokenizer call is not free)."""


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str


def split_messages(
    messages: list[Message], max_messages: int, problems: list[FieldProblem]
) -> tuple[str | None, list[tuple[str, str]], str]:
    """``(system, history turns, final query)`` from messages: an optional leading system
    message, then user/assistant alternating, ending with a user message."""
    if not messages:
        problems.append(FieldProblem("messages", [], "give at least one user message"))
        return None, [], ""
    if len(messages) > max_messages:
        problems.append(FieldProblem("messages", f"<{len(messages)} messages>", f"at most {max_messages}"))
        return None, [], ""
    system: str | None = None
    rest = list(enumerate(messages))
    if messages[0].role == "system":
        system = messages[0].content
        rest = rest[1:]
    expected = "user"
    turns: list[tuple[str, str]] = []
    query = ""
    for i, msg in rest:
        if msg.role not in ROLES:
            problems.append(FieldProblem(f"messages[{i}].role", msg.role, f"must be one of {list(ROLES)}"))
            continue
        if msg.role != expected:
            why = "only the first message may be a system message" if msg.role == "system" else (
                f"expected a {expected} message here: user and assistant messages alternate, starting with user"
            )  # fmt: skip
            problems.append(FieldProblem(f"messages[{i}].role", msg.role, why))
            continue
        if msg.role == "user" and not msg.content:
            problems.append(
                FieldProblem(f"messages[{i}].content", msg.content, "a user message must not be empty")
            )
        if len(msg.content) > MAX_PROMPT_CHARS:
            problems.append(
                FieldProblem(f"messages[{i}].content", f"<{len(msg.content)} characters>", "too long")
            )
        if msg.role == "user":
            query = msg.content
            expected = "assistant"
        else:
            turns.append((query, msg.content))
            expected = "user"
    if not problems and expected != "assistant":
        last = len(messages) - 1
        problems.append(
            FieldProblem(
                f"messages[{last}].role", messages[last].role, "the last message must be a user message"
            )
        )
    return system, turns, query
