"""The adapter registry of the inference service: which adapters exist, which are usable, which are resident.

One registry serves one base model. It reads the publish layout of :mod:`lorafleet.adapters`
(``<root>/<name>/<version>/``), so adapters published while the server runs become servable without
a restart (:meth:`AdapterRegistry.start_watcher`), and a name always resolves to a concrete
``name@version``: a reload under the same name can never serve stale weights, because cached weights
are keyed by version *and* by the identity of the directory on disk.

Every adapter is validated before its first use (manifest, safetensors only, file hashes, base model,
rank, target modules, kind). A bad adapter fails only the requests that name it, with an error that
says why; it never falls back to the base model silently (TGI does, and users hate it), and the
failure is cached per version and file stamp so the same request fails fast and a republish is
retried. Loaded weights live in an LRU cache bounded by a count and optionally by bytes; entries
pinned by in-flight requests (:meth:`AdapterRegistry.acquire`) are never evicted, so a request that
started on ``v1`` finishes on ``v1`` while new requests get ``v2``.

Errors (``errors.py`` and ``lorafleet.errors``; ``server.py`` maps them to status codes):
``AdapterError`` for a bad
reference such as ``../x``, ``AdapterNotFoundError`` for no such name or version,
``AdapterIncompatibleError`` (another base, rank over the cap, missing modules, not LoRA),
``AdapterLoadError`` (corrupt, truncated, pickle-only, loader failed) and ``AdapterCapacityError``
(every resident slot is pinned by in-flight requests).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lorafleet.adapters import (
    MANIFEST_NAME,
    Manifest,
    PublishedAdapter,
    parse_adapter_ref,
    validate_adapter_name,
    verify_files,
)
from lorafleet.errors import AdapterError, AdapterNotFoundError
from lorafleet.method_specs import ARTIFACT_FULL_MODEL, ARTIFACT_PROMPT
from lorafleet.models import fingerprints_match
from services.inference.adapter_checks import (
    MAX_LISTED,
    PEFT_PREFIX,
    SAFETENSORS_WEIGHTS,
    check_lora,
    check_weights_format,
)
from services.inference.errors import AdapterCapacityError, AdapterIncompatibleError, AdapterLoadError
from services.inference.prompt_adapters import check_prompt_adapter
from services.inference.reward_heads import skipped_modules

logger = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")

State = Literal["available", "loaded", "failed"]
EventKind = Literal["load", "load_failure", "evict", "unload"]


@dataclass(frozen=True)
class ResolvedAdapter:
    """A validated, loaded adapter version, ready for the engine."""

    ref: str
    """``name@version``: always concrete, even when the request named only ``name``."""
    name: str
    version: int
    template: str
    """The prompt template the adapter was trained with; inference must use the same one."""
    manifest: Manifest
    weights: Any
    """Whatever the registry's ``loader`` returned for this directory."""
    generation: int
    """Unique per load: a changed generation for the same ref means the weights were reloaded, so an
    engine-side cache keyed by it can never hold stale tensors. Also how :meth:`release` finds the pin."""


@dataclass(frozen=True)
class AdapterStatus:
    """One published version as ListModels reports it."""

    name: str
    version: int
    ref: str
    base_model: str
    """The base named by the manifest (hub id@revision, or local path), empty when unreadable."""
    state: State
    reason: str
    """Why the version failed; empty otherwise."""
    rank: int | None
    template: str
    method: str


@dataclass(frozen=True)
class RegistryEvent:
    """What the metrics layer counts; the registry itself imports no metrics library."""

    kind: EventKind
    """``load`` (validated and loaded), ``load_failure`` (a validation or load attempt failed; cached
    repeats of the same failure are not reported again), ``evict`` (LRU or budget), ``unload``
    (explicit, or the version vanished or changed on disk)."""
    ref: str
    resident: int
    """Resident adapters after the event."""
    resident_bytes: int
    seconds: float = 0.0
    """For ``load``: validation plus loader time."""
    reason: str = ""


@dataclass(frozen=True)
class VersionInfo:
    """What a scan learned about one version directory; immutable, replaced when the directory changes."""

    name: str
    version: int
    path: Path
    identity: tuple[int, ...]
    manifest: Manifest | None
    manifest_error: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def is_full_model(self) -> bool:
        """A whole model (``freeze`` / ``full`` training, a merged export): the plane serves it as a
        base model of its own (``published_models.py``), so adapter listings leave it out."""
        return self.manifest is not None and self.manifest.kind == ARTIFACT_FULL_MODEL

    @property
    def has_manifest_file(self) -> bool:
        """Whether a manifest file exists (readable or not): the newest such version is "latest", so
        a corrupt newest manifest fails the request instead of silently serving an older version."""
        return self.identity[-1] != -1


@dataclass
class _Entry:
    resolved: ResolvedAdapter
    identity: tuple[int, ...]
    nbytes: int
    pins: int = 0
    drop_on_release: bool = False


@dataclass
class _Failure:
    error_type: type[AdapterError]
    reason: str
    stamp: tuple[Any, ...]


@dataclass
class _Validated:
    rank: int
    stamp: tuple[Any, ...]


def describe_base(fingerprint: Mapping[str, Any]) -> str:
    """A short human name for a ``base_model_fingerprint`` (hub id@revision, or path plus hash)."""
    if fingerprint.get("kind") == "hub":
        return f"{fingerprint.get('id')}@{fingerprint.get('revision') or 'main'}"
    if fingerprint.get("kind") == "local":
        return f"{fingerprint.get('path')} (sha256 {str(fingerprint.get('sha256', ''))[:12]})"
    return json.dumps(dict(fingerprint), sort_keys=True, default=str)[:120]


def content_ref(ref: str, manifest: Manifest) -> str:
    """``name@version#<sha256 prefix of the weights>``: the identity handed to the loader.

    The engine keys its weight slots by the loader's ref (``AdapterWeights.ref``). Versions are
    immutable by contract, but an operator can still delete ``name/3`` and publish a different
    ``name/3``; naming the content keeps such a reload from being served from the old slot, while
    an evict-and-reload of identical content keeps the same ref.
    """
    digest = str(manifest.files.get(SAFETENSORS_WEIGHTS, {}).get("sha256", ""))[:12]
    return f"{ref}#{digest}" if digest else ref


def _dir_identity(path: Path) -> tuple[int, ...] | None:
    """Cheap identity of a version directory: a republish under the same version (delete, then
    rename a new one in) changes the inode or the manifest's mtime. None when the directory is gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    try:
        mst = (path / MANIFEST_NAME).stat()
        manifest_part: tuple[int, ...] = (mst.st_mtime_ns, mst.st_size)
    except FileNotFoundError:
        manifest_part = (-1, -1)
    return (st.st_dev, st.st_ino, st.st_mtime_ns, *manifest_part)


def files_stamp(path: Path) -> tuple[Any, ...]:
    """Size and mtime of every file of a version: a cached verdict holds only while this is unchanged,
    so an artifact fixed in place (or republished) is validated again."""
    out: list[tuple[str, int, int]] = []
    for dirpath, _, filenames in os.walk(path):
        for fname in filenames:
            full = Path(dirpath) / fname
            try:
                st = full.stat()
            except FileNotFoundError:
                continue
            out.append((full.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
    return (_dir_identity(path), tuple(sorted(out)))


def scan_names(root: Path) -> list[str]:
    """The valid artifact names under a publish root, sorted (dot-directories, ``.staging`` and
    temp names are not artifacts)."""
    names: list[str] = []
    try:
        candidates = sorted(root.iterdir())
    except FileNotFoundError:
        candidates = []
    for path in candidates:
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            names.append(validate_adapter_name(path.name))
        except AdapterError:
            continue
    return names


def scan_versions(root: Path, name: str, old: Mapping[int, VersionInfo]) -> dict[int, VersionInfo]:
    """Every version directory of ``name``; an unchanged directory keeps its entry in ``old``, so
    only new or changed versions have their manifest read (a scan of an unchanged root costs two
    ``stat`` calls per version). Used by the adapter registry and the published-model catalog."""
    fresh: dict[int, VersionInfo] = {}
    try:
        version_dirs = [p for p in (root / name).iterdir() if _VERSION_RE.fullmatch(p.name) and p.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        version_dirs = []
    for vdir in version_dirs:
        identity = _dir_identity(vdir)
        if identity is None:
            continue
        version = int(vdir.name)
        previous = old.get(version)
        if previous is not None and previous.identity == identity:
            fresh[version] = previous
        else:
            fresh[version] = read_version(name, version, vdir, identity)
    return fresh


def read_version(name: str, version: int, vdir: Path, identity: tuple[int, ...]) -> VersionInfo:
    """What one version directory holds: its parsed manifest, or why there is none usable."""
    try:
        data = json.loads((vdir / MANIFEST_NAME).read_text(encoding="utf-8"))
        manifest = Manifest.from_dict(data)
    except FileNotFoundError:
        why = (
            f"{MANIFEST_NAME} is missing: a plain PEFT adapter directory is served only once "
            f"imported (lorafleet adapters import DIR --name {name})"
        )
        return VersionInfo(name, version, vdir, identity, None, why)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return VersionInfo(name, version, vdir, identity, None, f"{MANIFEST_NAME} is unreadable: {e}")
    except AdapterError as e:
        return VersionInfo(name, version, vdir, identity, None, f"{MANIFEST_NAME}: {e.reason}")
    if manifest.name != name or manifest.version != version:
        why = f"{MANIFEST_NAME} describes {manifest.name}@{manifest.version}, not {name}@{version}"
        return VersionInfo(name, version, vdir, identity, None, why)
    return VersionInfo(name, version, vdir, identity, manifest, "")


def _weights_nbytes(obj: Any, _depth: int = 0) -> int:
    """Bytes of the tensors (anything with an integer ``nbytes``) inside what a loader returned."""
    if _depth > 6 or obj is None or isinstance(obj, str | bytes | int | float | bool):
        return 0
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(obj, Mapping):
        return sum(_weights_nbytes(v, _depth + 1) for v in obj.values())
    if isinstance(obj, list | tuple | set | frozenset):
        return sum(_weights_nbytes(v, _depth + 1) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_weights_nbytes(getattr(obj, f.name), _depth + 1) for f in dataclasses.fields(obj))
    return 0


class AdapterRegistry:
    """Discovers, validates, loads and caches the LoRA adapters of one base model. Thread-safe.

    Args:
        adapters_root: the publish root (``<root>/<name>/<version>/``).
        base_model: the base's ``name_or_path``, used in messages.
        base_fingerprint: ``lorafleet.models.base_model_fingerprint`` of the base; an adapter whose
            manifest names another base is refused (``fingerprints_match``).
        module_names: the base's module paths (``{n for n, _ in model.named_modules()}``); a PEFT
            wrapper's ``base_model.model.`` prefix is stripped. Used to refuse adapters whose
            targets do not exist, which would otherwise silently serve the base model.
        max_rank: largest LoRA rank accepted (the engine sizes its batched-LoRA buffers by it).
        capacity: most adapters resident at once.
        loader: turns a validated adapter directory and its :func:`content_ref` into weights
            (``lora_batch.adapter_weights_from_peft_dir`` with the base bound); called outside the
            registry lock, at most once at a time per version.
        memory_budget_bytes: optional cap on the summed weight bytes of resident adapters.
        on_event: optional callback for metrics; called outside the lock, its exceptions are logged.
    """

    def __init__(
        self,
        adapters_root: str | Path,
        base_model: str,
        base_fingerprint: Mapping[str, Any],
        module_names: Iterable[str],
        *,
        max_rank: int,
        capacity: int,
        loader: Callable[[Path, str], Any],
        memory_budget_bytes: int | None = None,
        on_event: Callable[[RegistryEvent], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        if memory_budget_bytes is not None and memory_budget_bytes < 1:
            raise ValueError(f"memory_budget_bytes must be positive or None, got {memory_budget_bytes}")
        self.root = Path(adapters_root)
        self.base_model = base_model
        self.base_fingerprint = dict(base_fingerprint)
        self.module_names = frozenset(n.removeprefix(PEFT_PREFIX) for n in module_names if n)
        self.max_rank = max_rank
        self.capacity = capacity
        self.memory_budget_bytes = memory_budget_bytes
        self._loader = loader
        self._on_event = on_event
        self._lock = threading.RLock()
        self._index: dict[str, dict[int, VersionInfo]] = {}
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # generation -> entry, LRU first
        self._by_ref: dict[str, int] = {}  # ref -> generation of the entry new requests may use
        self._failures: dict[str, _Failure] = {}
        self._validated: dict[str, _Validated] = {}
        self._loading: dict[str, threading.Event] = {}
        self._generation = 0
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    # ---------------------------------------------------------------------------------------
    # Discovery

    def scan(self) -> None:
        """Re-read the adapters root: new names and versions appear, removed or replaced ones go.

        Only versions that are new or whose directory changed have their manifest read, so a scan
        of an unchanged root costs two ``stat`` calls per version. Names that are not valid adapter
        names (``.staging``, dot-directories, temp names) are ignored.
        """
        names = scan_names(self.root)
        with self._lock:
            gone = [n for n in self._index if n not in names]
        for name in names + gone:
            self._scan_name(name)

    def _scan_name(self, name: str) -> None:
        """Re-read one name's versions (disk I/O outside the lock), then swap them in."""
        with self._lock:
            old = dict(self._index.get(name, {}))
        fresh = scan_versions(self.root, name, old)
        with self._lock:
            current = self._index.get(name, {})
            events: list[RegistryEvent] = []
            for version, info in current.items():
                now = fresh.get(version)
                if now is None or now.identity != info.identity:
                    why = "removed from disk" if now is None else "changed on disk"
                    events += self._forget_ref(info.ref, why)
            if fresh:
                self._index[name] = fresh
            else:
                self._index.pop(name, None)
        self._emit(events)

    def _forget_ref(self, ref: str, why: str) -> list[RegistryEvent]:
        """Drop everything known about a version that vanished or changed (lock held). A pinned
        entry stays until released but is no longer handed to new requests."""
        self._failures.pop(ref, None)
        self._validated.pop(ref, None)
        gen = self._by_ref.pop(ref, None)
        if gen is None:
            return []
        entry = self._entries[gen]
        if entry.pins:
            entry.drop_on_release = True
            return []
        del self._entries[gen]
        return [self._event("unload", ref, reason=why)]

    def start_watcher(self, interval_s: float = 0.5) -> None:
        """Scan now, then every ``interval_s`` seconds in a daemon thread, until :meth:`close`."""
        if self._watcher is not None and self._watcher.is_alive():
            return
        self._stop.clear()
        self.scan()

        def watch() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.scan()
                except Exception:  # a bad scan must not kill discovery for good
                    logger.exception("adapter scan of %s failed", self.root)

        self._watcher = threading.Thread(target=watch, name="adapter-watcher", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop the watcher thread, if any."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None

    def __enter__(self) -> AdapterRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------
    # Resolution

    def resolve(self, ref: str) -> ResolvedAdapter:
        """Validate (first use), load (if not resident) and return an adapter, without pinning it.

        Args:
            ref: ``name`` (the newest version), ``name@latest`` or ``name@<version>``.

        Raises:
            AdapterError: an invalid reference, naming the value.
            AdapterNotFoundError: no such name or version.
            AdapterIncompatibleError: another base, rank over ``max_rank``, missing target modules,
                not a LoRA adapter, bigger than the memory budget.
            AdapterLoadError: unreadable manifest, corrupt files, pickle-only weights, loader failure.
            AdapterCapacityError: no slot can be freed because every resident adapter is pinned.
        """
        return self._get(ref, pin=False)

    def load(self, ref: str) -> ResolvedAdapter:
        """Explicitly load an adapter (idempotent: a resident one is only marked recently used).

        Raises:
            The same errors as :meth:`resolve`.
        """
        return self._get(ref, pin=False)

    def acquire(self, ref: str) -> ResolvedAdapter:
        """Like :meth:`resolve`, and pin the entry: it is not evicted until :meth:`release`.

        Raises:
            The same errors as :meth:`resolve`.
        """
        return self._get(ref, pin=True)

    def release(self, resolved: ResolvedAdapter) -> None:
        """Drop one pin taken by :meth:`acquire`; an entry unloaded or replaced meanwhile goes now."""
        events: list[RegistryEvent] = []
        with self._lock:
            entry = self._entries.get(resolved.generation)
            if entry is None or entry.pins == 0:
                logger.error(
                    "release of %s (generation %d) that holds no pin", resolved.ref, resolved.generation
                )
                return
            entry.pins -= 1
            if entry.pins == 0 and entry.drop_on_release:
                del self._entries[resolved.generation]
                if self._by_ref.get(resolved.ref) == resolved.generation:
                    del self._by_ref[resolved.ref]
                events.append(self._event("unload", resolved.ref, reason="released after unload"))
        self._emit(events)

    def unload(self, ref: str) -> list[str]:
        """Unload ``name@version``, or every version of ``name``. Idempotent: nothing resident is fine.

        A pinned version is dropped when its last pin is released; until then it keeps serving the
        requests that hold it, and a new request for it simply keeps it.

        Returns:
            The refs unloaded now or marked to be dropped on release.

        Raises:
            AdapterError: an invalid reference.
        """
        name, version = parse_adapter_ref(ref)
        events: list[RegistryEvent] = []
        affected: list[str] = []
        with self._lock:
            refs = [r for r in self._by_ref if r.split("@", 1)[0] == name]
            if version is not None:
                refs = [r for r in refs if r == f"{name}@{version}"]
            for r in refs:
                gen = self._by_ref[r]
                entry = self._entries[gen]
                affected.append(r)
                if entry.pins:
                    entry.drop_on_release = True
                    continue
                del self._entries[gen]
                del self._by_ref[r]
                events.append(self._event("unload", r, reason="explicit unload"))
        self._emit(events)
        return affected

    def _get(self, ref: str, *, pin: bool) -> ResolvedAdapter:
        name, version = parse_adapter_ref(ref)
        while True:
            info = self._lookup(name, version)
            stale: list[RegistryEvent] = []
            with self._lock:
                gen = self._by_ref.get(info.ref)
                entry = self._entries.get(gen) if gen is not None else None
                if gen is not None and entry is not None and entry.identity == info.identity:
                    entry.drop_on_release = False
                    entry.pins += int(pin)
                    self._entries.move_to_end(gen)
                    return entry.resolved
                if entry is not None:  # loaded from a directory since replaced: never serve it again
                    stale = self._forget_ref(info.ref, "changed on disk")
                failure = self._failures.get(info.ref)
                loading = self._loading.get(info.ref)
                i_load = loading is None
                if loading is None:
                    loading = self._loading[info.ref] = threading.Event()
            self._emit(stale)
            if not i_load:
                loading.wait()
                continue  # the other loader's result is cached now, or its failure is
            try:
                if failure is not None and failure.stamp == files_stamp(info.path):
                    raise failure.error_type(failure.reason)
                return self._load_new(info, pin=pin)
            finally:
                with self._lock:
                    self._loading.pop(info.ref, None)
                loading.set()

    def _lookup(self, name: str, version: int | None) -> VersionInfo:
        """The version a reference means, rescanning that name once when the index does not know it
        yet (published since the last scan), so a fresh adapter is servable before the watcher runs."""
        for attempt in range(2):
            with self._lock:
                versions = self._index.get(name, {})
                if version is None:
                    with_manifest = [v for v in versions.values() if v.has_manifest_file]
                    if with_manifest:
                        return max(with_manifest, key=lambda v: v.version)
                    if versions:  # versions without a manifest: the same answer as ListModels
                        newest = versions[max(versions)]
                        raise AdapterLoadError(
                            f"adapter {newest.ref} cannot be used: {newest.manifest_error}"
                        )
                elif version in versions:
                    return versions[version]
            if attempt == 0:
                self._scan_name(name)
        with self._lock:
            known = ", ".join(str(v) for v in sorted(self._index.get(name, {}))) or "none"
        if version is None or known == "none":
            # No filesystem path in the message: it reaches remote clients (gRPC and HTTP 404s).
            raise AdapterNotFoundError(f"adapter {name!r} not found: no version of it is published")
        raise AdapterNotFoundError(f"adapter {name}@{version} not found (published versions: {known})")

    def _load_new(self, info: VersionInfo, *, pin: bool) -> ResolvedAdapter:
        """Validate and load one version (no lock held while doing I/O), then cache it."""
        started = time.perf_counter()
        try:
            manifest = self._validate(info)
        except (AdapterIncompatibleError, AdapterLoadError) as e:
            self._record_failure(info, e)
            raise
        except OSError as e:
            if not info.path.is_dir():  # removed between the scan and now
                self._scan_name(info.name)
                raise AdapterNotFoundError(f"adapter {info.ref} was removed") from e
            err = AdapterLoadError(f"adapter {info.ref} is unreadable: {e}")
            self._record_failure(info, err)
            raise err from e
        weights = self._call_loader(info, content_ref(info.ref, manifest))
        seconds = time.perf_counter() - started
        nbytes = _weights_nbytes(weights) or (info.path / SAFETENSORS_WEIGHTS).stat().st_size
        if self.memory_budget_bytes is not None and nbytes > self.memory_budget_bytes:
            too_big = AdapterIncompatibleError(
                f"adapter {info.ref} needs {nbytes} bytes, more than the memory budget of "
                f"{self.memory_budget_bytes} bytes for all resident adapters"
            )
            self._record_failure(info, too_big)
            raise too_big
        events: list[RegistryEvent] = []
        with self._lock:
            self._generation += 1
            gen = self._generation
            resolved = ResolvedAdapter(
                info.ref, info.name, info.version, manifest.template, manifest, weights, gen
            )
            current = self._index.get(info.name, {}).get(info.version)
            if current is None or current.identity != info.identity:
                # Removed or replaced while loading: hand these weights to this request only.
                if pin:
                    self._entries[gen] = _Entry(resolved, info.identity, nbytes, pins=1, drop_on_release=True)
                return resolved
            self._entries[gen] = _Entry(resolved, info.identity, nbytes, pins=int(pin))
            self._by_ref[info.ref] = gen
            self._failures.pop(info.ref, None)
            try:
                events += self._evict_for(gen)
            except AdapterCapacityError:
                del self._entries[gen]
                del self._by_ref[info.ref]
                raise
            events.append(self._event("load", info.ref, seconds=seconds))
        self._emit(events)
        return resolved

    def _call_loader(self, info: VersionInfo, loader_ref: str) -> Any:
        """Run the loader; deterministic failures are cached like validation failures, while out of
        memory and I/O errors are not, so the next request tries again."""
        try:
            return self._loader(info.path, loader_ref)
        except (AdapterIncompatibleError, AdapterLoadError) as e:
            self._record_failure(info, e)
            raise
        except Exception as e:
            message = f"adapter {info.ref} could not be loaded: {type(e).__name__}: {e}"
            if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
                self._emit([self._event("load_failure", info.ref, reason=message)])
                raise AdapterCapacityError(message) from e
            if isinstance(e, OSError):
                self._emit([self._event("load_failure", info.ref, reason=message)])
                raise AdapterLoadError(message) from e
            err = AdapterLoadError(message)
            self._record_failure(info, err)
            raise err from e

    def _record_failure(self, info: VersionInfo, error: AdapterError) -> None:
        stamp = files_stamp(info.path)
        with self._lock:
            self._failures[info.ref] = _Failure(type(error), error.reason, stamp)
            event = self._event("load_failure", info.ref, reason=error.reason)
        logger.warning("adapter %s refused: %s", info.ref, error.reason)
        self._emit([event])

    def _evict_for(self, new_gen: int) -> list[RegistryEvent]:
        """Evict least-recently-used unpinned entries until count and bytes fit (lock held)."""
        events: list[RegistryEvent] = []
        while self._over_limits():
            victim = next((g for g, e in self._entries.items() if e.pins == 0 and g != new_gen), None)
            if victim is None:
                pinned = sum(1 for e in self._entries.values() if e.pins)
                raise AdapterCapacityError(
                    f"cannot make room for adapter {self._entries[new_gen].resolved.ref}: {pinned} resident "
                    f"adapter(s) are in use by in-flight requests (capacity {self.capacity}, memory budget "
                    f"{self.memory_budget_bytes} bytes); retry shortly"
                )
            entry = self._entries.pop(victim)
            if self._by_ref.get(entry.resolved.ref) == victim:
                del self._by_ref[entry.resolved.ref]
            events.append(self._event("evict", entry.resolved.ref, reason="least recently used"))
        return events

    def _over_limits(self) -> bool:
        if len(self._entries) > self.capacity:
            return True
        budget = self.memory_budget_bytes
        return budget is not None and sum(e.nbytes for e in self._entries.values()) > budget

    # ---------------------------------------------------------------------------------------
    # Validation

    def _validate(self, info: VersionInfo) -> Manifest:
        """Every check an adapter must pass before its weights are read; cheap ones first, the file
        hashes once per on-disk state (a reload after eviction only re-stats the files).

        Returns:
            The manifest.

        Raises:
            AdapterIncompatibleError, AdapterLoadError: see :meth:`resolve`.
            OSError: a file vanished or cannot be read.
        """
        ref = info.ref
        if info.manifest is None:
            raise AdapterLoadError(f"adapter {ref} cannot be used: {info.manifest_error}")
        manifest = info.manifest
        if manifest.kind == ARTIFACT_FULL_MODEL:
            raise AdapterIncompatibleError(
                f"{ref} is a full model (method {manifest.method!r}), not an adapter: request it as "
                f"the base model, model={ref!r} with no adapter"
            )
        if manifest.kind not in ("lora", ARTIFACT_PROMPT):
            raise AdapterIncompatibleError(
                f"adapter {ref} is a {manifest.kind!r} artifact (method {manifest.method!r}); this server "
                "serves LoRA and prompt (ptuning) adapters only"
            )
        if not fingerprints_match(manifest.base_model, self.base_fingerprint):
            raise AdapterIncompatibleError(
                f"adapter {ref} was trained on base model {describe_base(manifest.base_model)}, but this "
                f"server serves {self.base_model!r} = {describe_base(self.base_fingerprint)}; route it to "
                "a server with that base or retrain it on this one"
            )
        check_weights_format(info.ref, info.path)
        stamp = files_stamp(info.path)
        with self._lock:
            known = self._validated.get(ref)
        if known is not None and known.stamp == stamp:
            return manifest
        problems = verify_files(PublishedAdapter(info.name, info.version, info.path, manifest))
        if problems:
            raise AdapterLoadError(
                f"adapter {ref} does not match its manifest (truncated or corrupt upload?): "
                + "; ".join(problems[:MAX_LISTED])
            )
        if manifest.kind == ARTIFACT_PROMPT:  # no LoRA rank; the loader checks it against the base
            check_prompt_adapter(info.ref, info.path)
            with self._lock:
                self._validated[ref] = _Validated(0, stamp)
            return manifest
        rank = check_lora(
            info.ref,
            info.path,
            max_rank=self.max_rank,
            module_names=self.module_names,
            base_model=self.base_model,
            skip_modules_to_save=skipped_modules(manifest),  # a reward model's value head
        )
        with self._lock:
            self._validated[ref] = _Validated(rank, stamp)
        return manifest

    # ---------------------------------------------------------------------------------------
    # Reporting

    def statuses(self) -> list[AdapterStatus]:
        """Every published adapter version with its state, sorted by name then version (for
        ListModels); full models are base models, listed by the plane's published-model catalog."""
        with self._lock:
            out: list[AdapterStatus] = []
            for name in sorted(self._index):
                for version in sorted(self._index[name]):
                    info = self._index[name][version]
                    if not info.is_full_model:
                        out.append(self._status(info))
            return out

    def _status(self, info: VersionInfo) -> AdapterStatus:
        manifest = info.manifest
        state: State = "available"
        reason = ""
        failure = self._failures.get(info.ref)
        if manifest is None:
            state, reason = "failed", info.manifest_error
        elif info.ref in self._by_ref and not self._entries[self._by_ref[info.ref]].drop_on_release:
            state = "loaded"
        elif failure is not None:
            state, reason = "failed", failure.reason
        validated = self._validated.get(info.ref)
        rank = validated.rank if validated is not None else None
        if rank is None and manifest is not None:
            lora = manifest.hyperparameters.get("lora")
            rank = lora.get("rank") if isinstance(lora, dict) and isinstance(lora.get("rank"), int) else None
        base = ""
        if manifest is not None:
            base = str(manifest.base_model.get("id") or manifest.base_model.get("path") or "")
        return AdapterStatus(
            name=info.name,
            version=info.version,
            ref=info.ref,
            base_model=base,
            state=state,
            reason=reason,
            rank=rank,
            template=manifest.template if manifest else "",
            method=manifest.method if manifest else "",
        )

    def resident(self) -> list[str]:
        """Refs of resident adapters, least recently used first (pinned-but-unloaded ones included)."""
        with self._lock:
            return [e.resolved.ref for e in self._entries.values()]

    def resident_bytes(self) -> int:
        """Summed weight bytes of resident adapters."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def _event(self, kind: EventKind, ref: str, *, seconds: float = 0.0, reason: str = "") -> RegistryEvent:
        with self._lock:
            resident, nbytes = len(self._entries), sum(e.nbytes for e in self._entries.values())
        return RegistryEvent(kind, ref, resident, nbytes, seconds, reason)

    def _emit(self, events: list[RegistryEvent]) -> None:
        if self._on_event is None:
            return
        for event in events:
            try:
                self._on_event(event)
            except Exception:  # metrics must never break serving
                logger.exception("adapter registry event callback failed on %s", event)
