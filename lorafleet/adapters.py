"""The adapter publish layout: the contract between the trainer and the inference service.

::

    <adapters_root>/
      .staging/<name>-<random>/          # being written; same filesystem, never read by services
      .imports/<dir>/                    # PEFT adapters waiting for the trainer's ImportAdapter; never served
      <name>/<version>/                  # version = 1, 2, 3 ... (no padding)
        adapter_config.json              # PEFT kinds (lora, ptuning) ...
        adapter_model.safetensors
        (config.json, model*.safetensors, tokenizer files ...)   # ... or a full model (freeze/full)
        lorafleet_manifest.json          # Manifest: what it is, what it was trained from, file hashes

A version directory appears in one ``rename(2)`` of a complete, fsynced staging directory, so a
reader sees either no ``<name>/<version>`` or all of it. Published versions are never modified;
a new training result is a new version. The manifest lists every file with its sha256 and size, so
a reader can tell a corrupt or tampered artifact (:func:`verify_files`) before loading it.

Two publishers racing for the next version both try ``rename`` onto ``<name>/<n>``; the loser gets
"directory not empty" and tries ``n + 1``. This holds on local filesystems and on NFS/CephFS
ReadWriteMany volumes (directory rename is atomic there too).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lorafleet.errors import AdapterError, AdapterNotFoundError, DatasetError, show_value

MANIFEST_NAME = "lorafleet_manifest.json"
STAGING_DIR = ".staging"
KINDS = ("lora", "ptuning", "full_model")
MANIFEST_SCHEMA = 1
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_VERSION = 2**31 - 1
"""Highest adapter version: the protos carry versions as ``int32``, and every version directory,
manifest and reference is checked against this one bound, so no published version is unsendable."""
_VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")
_REQUIRED = ("name", "version", "kind", "method", "base_model", "created_at", "files")
_CHUNK = 1 << 20
_MAX_PUBLISH_ATTEMPTS = 1000


def utc_now() -> str:
    """The current time as ISO-8601 UTC with seconds, e.g. ``2026-01-31T12:00:00Z``."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Manifest:
    """What a published artifact is and how it was made; stored as ``lorafleet_manifest.json``."""

    name: str
    version: int
    """Set by :func:`publish`; 0 before publishing."""
    kind: str
    """``lora`` or ``ptuning`` (a PEFT adapter over ``base_model``) or ``full_model``."""
    method: str
    """Training method: lora, qlora, lora8bit, freeze, full, ptuning."""
    base_model: dict[str, Any]
    """The base: ``id`` or ``path``, ``revision``, a content hash of its config/weights index..."""
    family: str = ""
    template: str = ""
    """Prompt template used in training; inference must use the same one."""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    """:func:`dataset_fingerprint` of the data files plus sample counts."""
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    """ISO-8601 UTC."""
    lorafleet_version: str = ""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Relative POSIX path -> ``{"sha256": hex, "size": bytes}``, the manifest itself excluded."""
    run_id: str = ""
    """Stable id of the training run; a restarted run finds its own publication by it."""
    source: dict[str, Any] = field(default_factory=dict)
    """How an artifact not trained here was made; empty for a trained one. ``kind`` ``import``
    (``lorafleet.adapter_import``: source path, peft_type, the weights file and its sha256, whether
    a pickle was converted) or ``merge`` (``lorafleet.merge``: the adapter merged, dtype, and whether
    a quantized base was dequantized first)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this version of lorafleet does not know, kept so a rewrite does not drop them."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored on disk (unknown keys read earlier included)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {"schema": MANIFEST_SCHEMA, **data, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Build from a parsed manifest; tolerates unknown keys (kept in ``extra``).

        Raises:
            AdapterError: a required key is missing or has the wrong type, naming the key.
        """
        if not isinstance(data, dict):
            raise AdapterError(f"manifest must be a JSON object, got {type(data).__name__}")
        for key in _REQUIRED:
            if key not in data:
                raise AdapterError(f"manifest is missing required key {key!r}")
        _check_type(data, "name", str)
        _check_type(data, "kind", str)
        _check_type(data, "method", str)
        _check_type(data, "base_model", dict)
        _check_type(data, "created_at", str)
        _check_type(data, "files", dict)
        version = data["version"]
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= MAX_VERSION:
            raise AdapterError(
                f"manifest key 'version' must be an integer in [0, {MAX_VERSION}], got {version!r}"
            )
        if data["kind"] not in KINDS:
            raise AdapterError(f"manifest key 'kind' must be one of {list(KINDS)}, got {data['kind']!r}")
        for rel, info in data["files"].items():
            if not (
                isinstance(info, dict)
                and isinstance(info.get("sha256"), str)
                and isinstance(info.get("size"), int)
            ):
                raise AdapterError(
                    f"manifest key 'files' entry {rel!r} needs a sha256 string and an integer size"
                )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("hyperparameters", "dataset", "metrics", "source"):
            if kwargs.get(key) is None:
                kwargs[key] = {}
        extra = {k: v for k, v in data.items() if k not in known and k != "schema"}
        return cls(**kwargs, extra=extra)


def _check_type(data: dict[str, Any], key: str, kind: type) -> None:
    if not isinstance(data[key], kind):
        raise AdapterError(f"manifest key {key!r} must be a {kind.__name__}, got {data[key]!r}")


@dataclass(frozen=True)
class PublishedAdapter:
    """One published version: where it is and its manifest."""

    name: str
    version: int
    path: Path
    manifest: Manifest

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"


def validate_adapter_name(name: str) -> str:
    """Check an adapter name: 1-64 of letters, digits, ``.``, ``_``, ``-``, starting with a letter or
    digit, no ``..``; it becomes a directory name, so nothing that could leave the adapters root.

    Args:
        name: the proposed name.

    Returns:
        The name, unchanged.

    Raises:
        AdapterError: naming the value and the rule.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise AdapterError(
            f"adapter name {show_value(name)} is invalid: use 1-64 characters of ASCII letters, digits, '.', '_', '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def parse_adapter_ref(ref: str) -> tuple[str, int | None]:
    """Split ``name`` or ``name@<version>`` (``name@latest`` = latest) into name and version.

    Raises:
        AdapterError: an invalid name, or a version that is not a positive integer.
    """
    if not isinstance(ref, str):
        raise AdapterError(f"adapter reference {show_value(ref)} must be a string like 'name' or 'name@3'")
    name, sep, version = ref.partition("@")
    validate_adapter_name(name)
    if not sep or version == "latest":
        return name, None
    if not _is_version(version):
        raise AdapterError(
            f"adapter reference {show_value(ref)}: version {show_value(version)} must be an integer in "
            f"[1, {MAX_VERSION}] or 'latest'"
        )
    return name, int(version)


def _is_version(text: str) -> bool:
    """``text`` names a version directory: digits without padding, in ``[1, MAX_VERSION]``."""
    return bool(_VERSION_RE.fullmatch(text)) and int(text) <= MAX_VERSION


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _count_rows(path: Path) -> int | None:
    """Rows of a JSONL (non-blank lines) or JSON array file; None for other shapes."""
    if path.suffix.lower() == ".jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return len(data) if isinstance(data, list) else None
    return None


def dataset_fingerprint(paths: list[str]) -> dict[str, Any]:
    """Content fingerprint of the data files a run used, for the manifest.

    Args:
        paths: data files (train, validation).

    Returns:
        ``{"files": [{"path", "name", "sha256", "size", "rows"}...], "sha256": <hash of the file hashes>}``.

    Raises:
        DatasetError: a file does not exist.
    """
    files: list[dict[str, Any]] = []
    combined = hashlib.sha256()
    for raw in paths:
        p = Path(raw)
        if not p.is_file():
            raise DatasetError(f"dataset file {raw!r} does not exist")
        digest = sha256_file(p)
        combined.update(digest.encode())
        files.append(
            {
                "path": str(raw),
                "name": p.name,
                "sha256": digest,
                "size": p.stat().st_size,
                "rows": _count_rows(p),
            }
        )
    return {"files": files, "sha256": combined.hexdigest()}


def new_staging_dir(adapters_root: str | Path, name: str) -> Path:
    """A fresh, empty directory under ``<adapters_root>/.staging/`` to write an artifact into.

    Staging lives inside the adapters root so that publishing is a same-filesystem rename.

    Raises:
        AdapterError: an invalid name.
    """
    validate_adapter_name(name)
    staging_root = Path(adapters_root) / STAGING_DIR
    staging_root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=staging_root))
    # mkdtemp makes it 0700; once renamed into place the inference service (maybe another uid on
    # a shared volume) must be able to read it.
    path.chmod(0o755)
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _artifact_files(staging: Path) -> dict[str, dict[str, Any]]:
    """Hash every regular file of the staging tree (the manifest excluded), fsyncing as we go."""
    files: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(staging):
        here = Path(dirpath)
        for entry in [*dirnames, *filenames]:
            if (here / entry).is_symlink():
                raise AdapterError(
                    f"staging dir {str(staging)!r} holds a symlink {entry!r}; publish real files only"
                )
        for fname in filenames:
            path = here / fname
            rel = path.relative_to(staging).as_posix()
            if rel in (MANIFEST_NAME, MANIFEST_NAME + ".tmp"):  # ours, written after hashing
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
                os.fsync(f.fileno())
            files[rel] = {"sha256": digest.hexdigest(), "size": path.stat().st_size}
        _fsync_dir(here)
    return dict(sorted(files.items()))


def _write_manifest(staging: Path, manifest: Manifest) -> None:
    tmp = staging / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_dict(), f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, staging / MANIFEST_NAME)
    _fsync_dir(staging)


def _existing_versions(name_dir: Path) -> list[int]:
    if not name_dir.is_dir():
        return []
    return sorted(int(p.name) for p in name_dir.iterdir() if _is_version(p.name) and p.is_dir())


def publish(
    staging_dir: str | Path,
    adapters_root: str | Path,
    name: str,
    manifest: Manifest,
    version: int | None = None,
) -> PublishedAdapter:
    """Publish a complete staging directory as ``<adapters_root>/<name>/<version>`` atomically.

    Hashes every file into ``manifest.files``, writes the manifest into the staging directory,
    fsyncs files and directories, then renames. The staging directory is gone afterwards.

    Args:
        staging_dir: the artifact, written completely (usually from :func:`new_staging_dir`).
        adapters_root: the adapters volume.
        name: adapter name.
        manifest: its ``name`` must be ``name`` or empty; ``version`` and ``files`` are filled in.
        version: an explicit version, or None for the next free one (safe against racing publishers).

    Returns:
        The published adapter, with the manifest as written.

    Raises:
        AdapterError: invalid name or version, an empty or foreign-filesystem staging directory,
            an explicit version that already exists.
    """
    validate_adapter_name(name)
    if manifest.name and manifest.name != name:
        raise AdapterError(f"manifest name {manifest.name!r} does not match the publish name {name!r}")
    if manifest.kind not in KINDS:
        raise AdapterError(f"manifest kind {manifest.kind!r} must be one of {list(KINDS)}")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION
    ):
        raise AdapterError(
            f"version {version!r} must be a positive integer up to {MAX_VERSION}, or None for the next"
        )
    staging, root = Path(staging_dir), Path(adapters_root)
    if not staging.is_dir():
        raise AdapterError(f"staging dir {str(staging)!r} does not exist")
    name_dir = root / name
    name_dir.mkdir(parents=True, exist_ok=True)
    if staging.stat().st_dev != root.stat().st_dev:
        raise AdapterError(
            f"staging dir {str(staging)!r} is not on the filesystem of {str(root)!r}: "
            "use new_staging_dir() so that publishing is an atomic rename"
        )
    files = _artifact_files(staging)
    if not files:
        raise AdapterError(f"staging dir {str(staging)!r} holds no file to publish")
    candidate = version if version is not None else (max(_existing_versions(name_dir), default=0) + 1)
    for _ in range(_MAX_PUBLISH_ATTEMPTS):
        if candidate > MAX_VERSION:
            raise AdapterError(f"cannot publish {name}: every version up to {MAX_VERSION} is taken")
        final = dataclasses.replace(manifest, name=name, version=candidate, files=files)
        _write_manifest(staging, final)
        target = name_dir / str(candidate)
        try:
            os.rename(staging, target)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise AdapterError(f"cannot publish {name}@{candidate}: {e}") from e
            if version is not None:
                raise AdapterError(f"adapter {name}@{version} already exists; versions are immutable") from e
            candidate = max([candidate, *_existing_versions(name_dir)]) + 1
            continue
        _fsync_dir(name_dir)
        _fsync_dir(root)
        return PublishedAdapter(name, candidate, target, final)
    raise AdapterError(f"cannot publish {name}: no free version after {_MAX_PUBLISH_ATTEMPTS} attempts")


def _read_manifest(version_dir: Path) -> Manifest:
    path = version_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise AdapterNotFoundError(f"{str(version_dir)!r} has no {MANIFEST_NAME}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{str(path)!r} is unreadable: {e}") from e
    try:
        return Manifest.from_dict(data)
    except AdapterError as e:
        raise AdapterError(f"{str(path)!r}: {e.reason}") from e


def _load(root: Path, name: str, version: int) -> PublishedAdapter:
    version_dir = root / name / str(version)
    manifest = _read_manifest(version_dir)
    if manifest.name != name or manifest.version != version:
        raise AdapterError(f"{str(version_dir)!r} holds a manifest for {manifest.name}@{manifest.version}")
    return PublishedAdapter(name, version, version_dir, manifest)


def list_adapters(adapters_root: str | Path) -> list[PublishedAdapter]:
    """Every published version under the root, sorted by name then version.

    Skips ``.staging``, names that are not valid adapter names, and version directories without a
    readable, consistent manifest (use :func:`get_adapter` to see why one is refused).
    """
    root = Path(adapters_root)
    if not root.is_dir():
        return []
    out: list[PublishedAdapter] = []
    for name_dir in sorted(root.iterdir()):
        if not name_dir.is_dir() or not _NAME_RE.fullmatch(name_dir.name) or ".." in name_dir.name:
            continue
        for version in _existing_versions(name_dir):
            try:
                out.append(_load(root, name_dir.name, version))
            except AdapterError:
                continue
    return out


def get_adapter(adapters_root: str | Path, name: str, version: int | None = None) -> PublishedAdapter:
    """One published version; the highest version when ``version`` is None.

    The latest is the highest version directory that holds a manifest; if that manifest is corrupt
    this raises rather than silently serving an older version.

    Raises:
        AdapterNotFoundError: no such name, or no such version (naming both).
        AdapterError: an invalid name, or a manifest that is unreadable or inconsistent.
    """
    validate_adapter_name(name)
    root = Path(adapters_root)
    versions = [v for v in _existing_versions(root / name) if (root / name / str(v) / MANIFEST_NAME).exists()]
    if version is None:
        if not versions:
            raise AdapterNotFoundError(f"adapter {name!r} not found under {str(root)!r}")
        return _load(root, name, versions[-1])
    if version not in versions:
        known = ", ".join(map(str, versions)) or "none"
        raise AdapterNotFoundError(f"adapter {name}@{version} not found (published versions: {known})")
    return _load(root, name, version)


def verify_files(published: PublishedAdapter) -> list[str]:
    """Compare the files on disk with the manifest: missing, size or sha256 mismatch.

    Returns:
        Problems, one line each naming the file; empty when the artifact is intact.
    """
    problems: list[str] = []
    base = published.path.resolve()
    if not published.manifest.files:
        problems.append("manifest lists no file")
    for rel, info in published.manifest.files.items():
        path = (base / rel).resolve()
        if Path(rel).is_absolute() or not path.is_relative_to(base):
            problems.append(f"{rel}: path leaves the adapter directory")
            continue
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != info.get("size"):
            problems.append(f"{rel}: size {size} != manifest {info.get('size')}")
            continue
        if sha256_file(path) != info.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch")
    return problems


def cleanup_stale_staging(adapters_root: str | Path, older_than_s: float) -> list[Path]:
    """Remove staging directories left by crashed publishers.

    A directory counts as stale when nothing in it was modified for ``older_than_s`` seconds,
    so a slow writer still filling its directory is left alone.

    Returns:
        The removed directories.
    """
    staging_root = Path(adapters_root) / STAGING_DIR
    if not staging_root.is_dir():
        return []
    cutoff = time.time() - older_than_s
    removed: list[Path] = []
    for entry in sorted(staging_root.iterdir()):
        try:
            newest = _newest_mtime(entry)
        except FileNotFoundError:
            continue  # published or removed meanwhile
        if newest < cutoff:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for entry in [*dirnames, *filenames]:
                try:
                    newest = max(newest, (Path(dirpath) / entry).lstat().st_mtime)
                except FileNotFoundError:
                    continue
    return newest
