"""Where a job may read from: the allow-list of data and model roots, checked before any file is opened.

The trainer runs as a service user; without this check a job naming ``/etc/shadow`` as its dataset
makes the service open the file, and the answer tells existing paths from missing ones. So every
path a job names (its data files, a local model directory, a DeepSpeed config) is resolved (``~``,
``..``, symlinks) and must fall under one of the server's roots; a path outside gets the same
message whether it exists or not, and nothing under it is touched. Hub ids (``org/name``) are not
paths and stay allowed for models.

Roots come from the server's settings (``--data-roots``, ``--model-roots``, or
``LORAFLEET_TRAINER_DATA_ROOTS`` / ``LORAFLEET_TRAINER_MODEL_ROOTS``, comma-separated); by default
the service's own data and model directories (``.cache/data``; ``.cache/tiny`` and ``.cache/models``),
and in Kubernetes the mounted datasets and models volumes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.config import apply_overrides
from lorafleet.errors import ConfigError, FieldProblem

DEFAULT_DATA_ROOTS = (".cache/data",)
DEFAULT_MODEL_ROOTS = (".cache/tiny", ".cache/models")

_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
"""The shape of a hub id (``name`` or ``namespace/name``); anything else is treated as a path."""

# (config path, spec field, kind): every run-config key that names a file the service reads.
_PATH_KEYS: tuple[tuple[str, str, str], ...] = (
    ("data.train_file", "spec.dataset.train_file", "data"),
    ("data.validation_file", "spec.dataset.validation_file", "data"),
    ("distributed.deepspeed_config", "spec.overrides['distributed.deepspeed_config']", "data"),
    ("model.name_or_path", "spec.model.name_or_path", "model"),
)


@dataclass(frozen=True)
class PathPolicy:
    """The roots a job's files must fall under, resolved once when the server starts."""

    data_roots: tuple[Path, ...]
    model_roots: tuple[Path, ...]

    @classmethod
    def from_roots(cls, data_roots: Iterable[str], model_roots: Iterable[str]) -> PathPolicy:
        return cls(tuple(_resolve(r) for r in data_roots if r), tuple(_resolve(r) for r in model_roots if r))

    def problems(self, config: dict[str, Any], overrides: dict[str, str]) -> list[FieldProblem]:
        """One problem per path of the request (typed field or override) outside its roots."""
        out: list[FieldProblem] = []
        for key, spec_field, kind in _PATH_KEYS:
            for field_name, value in _values(config, overrides, key, spec_field):
                if not isinstance(value, str) or not value:
                    continue  # the config's own validation reports missing or mistyped values
                roots = self.data_roots if kind == "data" else self.model_roots
                if _under(_resolve(value), roots):
                    continue
                # A hub id, unless a directory of that name in the working directory would be
                # loaded instead (the model loader prefers an existing directory).
                if kind == "model" and is_hub_id(value) and not os.path.lexists(value):
                    continue
                out.append(FieldProblem(field_name, value, _refusal(kind, roots)))
        return out

    def check(self, config: dict[str, Any], overrides: dict[str, str]) -> None:
        """Raise before anything is opened when a path of the request is outside its roots.

        Raises:
            ConfigError: every such path, each with the same message whether it exists or not.
        """
        problems = self.problems(config, overrides)
        if problems:
            raise ConfigError(problems, context="invalid job spec")


def is_hub_id(name: str) -> bool:
    """True for ``name`` or ``namespace/name`` without ``..``: what the hub accepts as a repo id."""
    return bool(_HUB_ID_RE.fullmatch(name)) and ".." not in name and not name.startswith(".")


def _values(
    config: dict[str, Any], overrides: dict[str, str], key: str, spec_field: str
) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is not None:
        out.append((spec_field, node))
    if key in overrides:
        tree: dict[str, Any] = {}
        try:
            apply_overrides(tree, [f"{key}={overrides[key]}"])
        except (ConfigError, ValueError, TypeError):
            return out  # the config's validation reports a malformed override
        value: Any = tree
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out.append((f"spec.overrides[{key!r}]", value))
    return out


def _resolve(path: str) -> Path:
    """Absolute, with ``~``, ``..`` and symlinks resolved; never fails, never tells if it exists."""
    try:
        return Path(os.path.realpath(os.path.expanduser(path)))
    except (OSError, ValueError):  # a NUL byte, a loop: an impossible path is outside every root
        return Path("/\0")


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _refusal(kind: str, roots: tuple[Path, ...]) -> str:
    names = ", ".join(str(r) for r in roots) or "none"
    what = "data files" if kind == "data" else "local models (or give a hub id such as 'org/name')"
    return f"not under the server's allowed roots for {what}: {names}"


__all__ = ["DEFAULT_DATA_ROOTS", "DEFAULT_MODEL_ROOTS", "PathPolicy", "is_hub_id"]
