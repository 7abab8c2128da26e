"""Size bounds of every trainer request, checked before any field is used or echoed.

A request is walked field by field from its descriptor, so a field added to a proto is bounded
without touching this module: every string, map and repeated field has a limit (the table below, or
the default). A refusal names the field and a shortened value (``show_value``), so the error itself
stays small whatever the client sent. Labels are bounded the way Kubernetes bounds its own (count,
key and value lengths), because they are stored and sent back in every listing.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from lorafleet.errors import ConfigError, FieldProblem

DEFAULT_STRING_CHARS = 1024
"""Characters of a string field without its own limit below."""
PATH_CHARS = 4096
"""Characters of a file or directory path (Linux ``PATH_MAX``)."""
DEFAULT_ITEMS = 256
"""Items of a repeated or map field without its own limit below."""
MAX_LABELS = 32
MAX_LABEL_KEY_CHARS = 63
MAX_LABEL_VALUE_CHARS = 256
MAX_OVERRIDES = 64
MAX_OVERRIDE_KEY_CHARS = 128
MAX_OVERRIDE_VALUE_CHARS = 4096
MAX_SPEC_BYTES = 64 * 1024
"""Serialized bytes of a submitted ``JobSpec``; what is stored is sent back in every listing."""

_STRING_CHARS: dict[str, int] = {
    "job_id": 64,
    "idempotency_key": 128,
    "page_token": 32,
    "reason": 1024,
    "name": 128,
    "ref": 160,
    "spec.model.name_or_path": PATH_CHARS,
    "spec.dataset.train_file": PATH_CHARS,
    "spec.dataset.validation_file": PATH_CHARS,
    "spec.dataset.system": 4096,
    "spec.adapter_name": 128,
}
_MAP_LIMITS: dict[str, tuple[int, int, int]] = {
    "spec.labels": (MAX_LABELS, MAX_LABEL_KEY_CHARS, MAX_LABEL_VALUE_CHARS),
    "spec.overrides": (MAX_OVERRIDES, MAX_OVERRIDE_KEY_CHARS, MAX_OVERRIDE_VALUE_CHARS),
}


def check_request(request: Message) -> None:
    """Refuse ``request`` when any of its fields passes its bound.

    Raises:
        ConfigError: every field over its bound, each with its name and a shortened value.
    """
    problems: list[FieldProblem] = []
    _walk(request, "", problems)
    spec = getattr(request, "spec", None)
    if isinstance(spec, Message) and spec.ByteSize() > MAX_SPEC_BYTES:
        problems.append(
            FieldProblem("spec", f"<{spec.ByteSize()} bytes>", f"at most {MAX_SPEC_BYTES} bytes serialized")
        )
    if problems:
        raise ConfigError(problems, context="request too large")


def _walk(message: Message, prefix: str, problems: list[FieldProblem]) -> None:
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            _check_map(path, value, problems)
        elif field.is_repeated:
            if len(value) > DEFAULT_ITEMS:
                problems.append(FieldProblem(path, f"<{len(value)} items>", f"at most {DEFAULT_ITEMS} items"))
                continue
            for i, item in enumerate(value):
                _check_one(f"{path}[{i}]", path, field, item, problems)
        else:
            _check_one(path, path, field, value, problems)


def _check_one(
    name: str, path: str, field: FieldDescriptor, value: Any, problems: list[FieldProblem]
) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        _walk(value, f"{name}.", problems)
    elif field.type == FieldDescriptor.TYPE_STRING:
        _check_chars(name, value, _STRING_CHARS.get(path, DEFAULT_STRING_CHARS), problems)


def _check_map(path: str, value: Any, problems: list[FieldProblem]) -> None:
    count, key_chars, value_chars = _MAP_LIMITS.get(path, (DEFAULT_ITEMS, 256, DEFAULT_STRING_CHARS))
    if len(value) > count:
        problems.append(FieldProblem(path, f"<{len(value)} entries>", f"at most {count} entries"))
        return
    for key in value:
        if _check_chars(f"{path} key", key, key_chars, problems) and isinstance(value[key], str):
            _check_chars(f"{path}[{key!r}]", value[key], value_chars, problems)


def _check_chars(name: str, value: str, limit: int, problems: list[FieldProblem]) -> bool:
    if len(value) <= limit:
        return True
    problems.append(FieldProblem(name, value, f"at most {limit} characters, got {len(value)}"))
    return False


__all__ = ["check_request"]
