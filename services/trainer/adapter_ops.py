"""The trainer service's adapter operations: import a PEFT adapter, merge-export a published one.

Plain requests in, plain results out: ``server.py`` converts protobuf and calls one function here;
the work is in the core (``lorafleet.adapter_import``, ``lorafleet.export``). A client names an
import source relative to the server's import directory, ``<adapters_root>/.imports``, never an
arbitrary server path (the same rule as a job's resume path): operators or a sidecar copy adapters
there, on the adapters volume. The inference registry never reads dot-directories, so nothing there
is served before it is imported.

Both run in the RPC's thread. An import reads the base's config only (a meta-device skeleton); a
merge loads the base and so needs the base's memory in this process for its duration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafleet import adapters as adapter_store
from lorafleet.errors import ConfigError, FieldProblem
from services.trainer.paths import PathPolicy

IMPORT_DIR = ".imports"
"""Directory under the adapters root that ``ImportAdapter`` sources are resolved in."""


@dataclass(frozen=True)
class ExportResult:
    """A merged model published as a full-model artifact, and what the merge had to say."""

    published: adapter_store.PublishedAdapter
    notice: str
    """Non-empty when the base was quantized in training and was dequantized first."""


def import_source(adapters_root: Path, source: str) -> Path:
    """The directory ``source`` names inside ``<adapters_root>/.imports``.

    Raises:
        ConfigError: on ``source`` when it is empty, absolute, or resolves (through ``..`` or a
            symlink) outside the import directory.
    """
    root = (adapters_root / IMPORT_DIR).resolve()
    if not source or Path(source).is_absolute():
        raise ConfigError(
            [
                FieldProblem(
                    "source", source, f"must be a directory relative to the import directory {str(root)!r}"
                )
            ],
            "invalid import request",
        )
    path = (root / source).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ConfigError(
            [FieldProblem("source", source, f"leaves the import directory {str(root)!r}")],
            "invalid import request",
        )
    return path


def import_from_request(
    adapters_root: Path,
    source: str,
    name: str,
    base: str = "",
    template: str = "",
    policy: PathPolicy | None = None,
) -> adapter_store.PublishedAdapter:
    """Import ``<adapters_root>/.imports/<source>`` as the next version of ``name``.

    Args:
        policy: the server's model roots; the base (given, or the one the adapter records) must be
            under them or a hub id, as a job's model must.

    Raises:
        ConfigError: a bad ``source`` or a base outside the model roots (field ``base``);
            AdapterImportError: the adapter does not fit its base
            (``lorafleet.adapter_import.import_adapter``); AdapterError: a bad name.
    """
    from lorafleet.adapter_import import ImportRequest, import_adapter, read_adapter_config

    path = import_source(adapters_root, source)
    effective = base or str(read_adapter_config(path).get("base_model_name_or_path") or "")
    if policy is not None and effective:
        problems = policy.problems({"model": {"name_or_path": effective}}, {})
        if problems:
            raise ConfigError(
                [FieldProblem("base", effective, p.message) for p in problems], "invalid import request"
            )
    return import_adapter(ImportRequest(str(path), name, base, template), adapters_root)


def export_from_request(adapters_root: Path, ref: str, publish_name: str, dtype: str = "") -> ExportResult:
    """Merge the published adapter ``ref`` into its base and publish it as ``publish_name``.

    Raises:
        ConfigError: an empty ``publish_name`` or an unknown ``dtype``; AdapterNotFoundError: no such
            adapter; AdapterImportError: not a LoRA adapter.
    """
    from lorafleet.export import MERGE_DTYPES, merge_and_publish  # torch only when used

    dtype = dtype or "bf16"
    problems = []
    if dtype not in MERGE_DTYPES:
        problems.append(FieldProblem("dtype", dtype, f"must be one of {list(MERGE_DTYPES)}"))
    if not publish_name:
        problems.append(FieldProblem("publish_name", publish_name, "name the merged model's artifact"))
    if problems:
        raise ConfigError(problems, "invalid export request")
    adapter_store.validate_adapter_name(publish_name)
    name, version = adapter_store.parse_adapter_ref(ref)
    published = adapter_store.get_adapter(adapters_root, name, version)
    merged, result = merge_and_publish(published, adapters_root, publish_name, dtype)
    return ExportResult(merged, result.notice)
