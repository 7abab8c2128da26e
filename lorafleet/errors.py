"""Domain errors shared by the library and both services.

Every error carries a human ``reason``. Errors that come from user input also carry the list of
problems, each naming the field (or file and line) and the value it got, so that a service can
report all of them at once instead of the first one only. The gRPC layers map these classes to
status codes in one place each; nothing here imports grpc.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_MAX_VALUE_CHARS = 80


def show_value(value: Any) -> str:
    """Render a user value for an error message: repr, shortened so a huge value stays readable."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's 4300-digit conversion limit, possibly nested
        return f"<{type(value).__name__} too long to show>"
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


@dataclass(frozen=True)
class FieldProblem:
    """One thing wrong with one field of a spec or config."""

    field: str
    """Dotted path of the field, e.g. ``lora.rank``."""
    value: Any
    """The value that was given."""
    message: str
    """What is wrong and, where it helps, what would be accepted."""

    def __str__(self) -> str:
        return f"{self.field}={show_value(self.value)}: {self.message}"


@dataclass(frozen=True)
class RowProblem:
    """One thing wrong with one row of a dataset file."""

    path: str
    line: int
    """1-based line number (JSONL) or 1-based record index (JSON array)."""
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.message}"


class LorafleetError(Exception):
    """Base class of every error lorafleet raises on purpose."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(LorafleetError):
    """A config or job spec is invalid. Lists every problem found, not only the first."""

    def __init__(self, problems: list[FieldProblem], context: str = "invalid config") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{context}: {len(self.problems)} problem(s)\n{lines}")


class DatasetError(LorafleetError):
    """A dataset cannot be used: unreadable, or too many bad rows."""

    def __init__(self, reason: str, problems: list[RowProblem] | None = None) -> None:
        self.problems = list(problems or [])
        super().__init__(reason)


class ModelLoadError(LorafleetError):
    """A base model or tokenizer cannot be loaded as asked."""


class AdapterError(LorafleetError):
    """An adapter directory or manifest is invalid or cannot be published."""


class AdapterNotFoundError(AdapterError):
    """No published adapter (or version) under that name."""


class AdapterImportError(ConfigError):
    """An adapter directory brought in from outside (``lorafleet adapters import``) or an export
    (``lorafleet export --merge``) is refused: another base, targets the base lacks, shapes or ranks
    that disagree, an unreadable or code-carrying weights file. Lists every problem, each naming the
    field (``adapter_config.json`` key, tensor or file) and its value."""

    def __init__(self, problems: list[FieldProblem], context: str = "adapter refused") -> None:
        super().__init__(problems, context)
