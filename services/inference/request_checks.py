"""Checks of what a client sends the inference service, before anything is looked up or tokenized:
the length of every string field (model, adapter, prompt), the chat messages' roles, order and
sizes. Every problem is collected, each naming its field and value (``FieldProblem``, whose value
is shown shortened); the plane raises them together with the sampling problems
(``SamplingParams.validate``) as one ``InvalidRequestError``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.errors import FieldProblem

ROLES = ("system", "user", "assistant")
MAX_NAME_CHARS = 256
"""Longest ``model`` or ``adapter`` field (``name@version``); published names are far shorter."""


def check_name(field: str, value: str, problems: list[FieldProblem]) -> bool:
    """Append a problem when a ``model`` / ``adapter`` field is too long to name anything; True if
    it is fine. Run before the value is looked up, parsed or echoed."""
    if len(value) <= MAX_NAME_CHARS:
        return True
    problems.append(FieldProblem(field, _sized(value), f"longer than {MAX_NAME_CHARS} characters"))
    return False


def check_prompt(prompt: str, max_chars: int, problems: list[FieldProblem]) -> None:
    """Append a problem for an empty prompt or one over ``max_chars`` characters."""
    if not prompt:
        problems.append(FieldProblem("prompt", prompt, "must not be empty"))
    elif len(prompt) > max_chars:
        problems.append(FieldProblem("prompt", _sized(prompt), f"longer than {max_chars} characters"))


def _sized(value: str) -> str:
    """A stand-in for a huge value in an error: its size and its first characters."""
    return f"<{len(value)} characters: {value[:24]!r}...>"


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str


def split_messages(
    messages: list[Message], max_messages: int, problems: list[FieldProblem], max_chars: int
) -> tuple[str | None, list[tuple[str, str]], str]:
    """``(system, history turns, final query)`` from messages: an optional leading system
    message, then user/assistant alternating, ending with a user message. The count and the total
    size (``max_chars`` over every role and content) are checked first."""
    if not messages:
        problems.append(FieldProblem("messages", [], "give at least one user message"))
        return None, [], ""
    if len(messages) > max_messages:
        problems.append(FieldProblem("messages", f"<{len(messages)} messages>", f"at most {max_messages}"))
        return None, [], ""
    total = sum(len(m.role) + len(m.content) for m in messages)
    if total > max_chars:
        problems.append(
            FieldProblem(
                "messages",
                f"<{len(messages)} messages, {total} characters>",
                f"longer than {max_chars} characters together",
            )
        )
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
            why = (
                "only the first message may be a system message"
                if msg.role == "system"
                else (
                    f"expected a {expected} message here: user and assistant messages alternate, starting with user"
                )
            )
            problems.append(FieldProblem(f"messages[{i}].role", msg.role, why))
            continue
        if msg.role == "user" and not msg.content:
            problems.append(
                FieldProblem(f"messages[{i}].content", msg.content, "a user message must not be empty")
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
