"""Full models published under the adapters root, served as base models named ``name@version``.

``freeze`` / ``full`` training and ``lorafleet export --merge --publish NAME`` publish whole
transformers model directories (manifest kind ``full_model``) into the same publish layout as
adapters (``<root>/<name>/<version>/``, ``lorafleet.adapters``). :class:`PublishedModels` lists them
(the adapter registry's scan of that layout, ``registry.scan_versions``), so a model published while
the server runs is servable without a restart, and hosts them on demand:

- A request whose ``model`` is ``name@version``, or ``name`` (its newest full-model version,
  resolved to a concrete version per request, as adapters are), pins that version's host; the
  first such request starts the load (a ``BaseModelHost``: its own weights, engine and adapter
  registry, template from the manifest, dtype and quantization from the server's
  ``published_dtype`` / ``published_quantization``) and waits up to ``published_load_wait_s`` for
  it; past that it gets ``ModelNotReadyError`` (UNAVAILABLE, retry) while the load goes on.
- At most ``max_published_models`` hosts are resident. Making room unloads the least recently used
  idle one; when every resident host is pinned by in-flight requests (or loading) the request gets
  ``AdapterCapacityError`` (RESOURCE_EXHAUSTED) naming the limit.
- A bad artifact (files that do not match the manifest, no config, pickle-only weights, a load that
  fails) fails with ``AdapterLoadError`` (FAILED_PRECONDITION) naming why; the verdict is cached
  per version and file stamp (a fixed or republished artifact is tried again) and touches no other
  model.
- A new version published under a name is what ``name`` resolves to for new requests; requests
  pinned to the old version finish on it. A version removed or replaced on disk is unloaded once
  its last request ends.

The host itself is built by the plane (``make_host``); this module knows nothing of gRPC.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lorafleet.adapters import PublishedAdapter, parse_adapter_ref, verify_files
from lorafleet.errors import AdapterError, show_value
from services.inference.adapter_checks import MAX_LISTED
from services.inference.errors import (
    AdapterCapacityError,
    AdapterLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from services.inference.registry import VersionInfo, describe_base, files_stamp, scan_names, scan_versions

logger = logging.getLogger(__name__)

AVAILABLE, LOADING, READY, FAILED = "available", "loading", "ready", "failed"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class Host(Protocol):
    """What this module needs of a ``plane.BaseModelHost``."""

    state: str
    reason: str

    def load(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PublishedModelStatus:
    """One published full-model version as ListModels reports it."""

    ref: str
    path: str
    state: str
    """available (published, not resident), loading, ready or failed."""
    reason: str
    template: str
    method: str
    base_model: str
    """What the model was trained or merged from (``describe_base`` of the manifest's base)."""
    host: Any = None
    """The resident host (loading or ready), else None."""


@dataclass(eq=False)
class _Resident:
    info: VersionInfo
    host: Any
    ready: threading.Event = field(default_factory=threading.Event)
    pins: int = 0
    drop_on_release: bool = False
    error: AdapterError | None = None


@dataclass
class PublishedLease:
    """A pinned host: it is not unloaded until :meth:`release` (idempotent)."""

    ref: str
    host: Any
    _release: Callable[[], None]
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release()


def check_full_model(info: VersionInfo) -> None:
    """What a full-model artifact must pass before it is loaded: its files match the manifest, and it
    is a transformers model directory with safetensors weights (nothing pickled is ever loaded).

    Raises:
        AdapterLoadError: naming the version and what is wrong.
    """
    assert info.manifest is not None
    problems = verify_files(PublishedAdapter(info.name, info.version, info.path, info.manifest))
    if problems:
        raise AdapterLoadError(
            f"published model {info.ref} does not match its manifest (truncated or corrupt upload?): "
            + "; ".join(problems[:MAX_LISTED])
        )
    if not (info.path / "config.json").is_file():
        raise AdapterLoadError(f"published model {info.ref} has no config.json: not a transformers model")
    names = [p.name for p in info.path.iterdir() if p.is_file()]
    if not any(n.endswith(".safetensors") for n in names):
        pickled = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
        why = f"only pickle weights ({', '.join(pickled[:MAX_LISTED])})" if pickled else "no weights"
        raise AdapterLoadError(
            f"published model {info.ref} has {why}; it is served from safetensors only "
            f"(lorafleet artifacts are; re-save with safe_serialization=True)"
        )


class PublishedModels:
    """The catalog of published full models and the bounded set of resident hosts. Thread-safe.

    Args:
        root: the publish root (the server's ``adapters_root``).
        capacity: ``max_published_models``; 0 serves none (they are still listed).
        load_wait_s: how long a request waits for a loading model before ``ModelNotReadyError``.
        make_host: builds an unloaded host for a version (the plane's ``BaseModelHost``).
    """

    def __init__(
        self,
        root: Path,
        capacity: int,
        load_wait_s: float,
        make_host: Callable[[VersionInfo], Host],
    ) -> None:
        self.root = root
        self.capacity = capacity
        self.load_wait_s = load_wait_s
        self._make_host = make_host
        self._lock = threading.RLock()
        self._index: dict[str, dict[int, VersionInfo]] = {}
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # ref -> host, LRU first
        self._draining: list[_Resident] = []  # unloaded or replaced, still pinned
        self._failures: dict[str, tuple[AdapterError, Any]] = {}  # ref -> (error, files stamp)
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    # -- discovery --------------------------------------------------------------------------------

    def scan(self) -> None:
        """Re-read the publish root; a version removed or changed on disk is unloaded (once idle)."""
        names = scan_names(self.root)
        with self._lock:
            names += [n for n in self._index if n not in names]
        for name in names:
            self._scan_name(name)

    def _scan_name(self, name: str) -> None:
        with self._lock:
            old = dict(self._index.get(name, {}))
        fresh = scan_versions(self.root, name, old)
        closing: list[Any] = []
        with self._lock:
            for version, info in old.items():
                now = fresh.get(version)
                if now is None or now.identity != info.identity:
                    self._failures.pop(info.ref, None)
                    closing += self._unload_ref(info.ref)
            if fresh:
                self._index[name] = fresh
            else:
                self._index.pop(name, None)
        _close_hosts(closing)

    def start_watcher(self, interval_s: float) -> None:
        """Scan now, then every ``interval_s`` seconds in a daemon thread, until :meth:`close`."""
        if self._watcher is not None:
            return
        self.scan()

        def watch() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.scan()
                except Exception:  # a bad scan must not end discovery for good
                    logger.exception("published-model scan of %s failed", self.root)

        self._watcher = threading.Thread(target=watch, name="published-model-watcher", daemon=True)
        self._watcher.start()

    def _lookup(self, name: str, version: int | None, rescan: bool = True) -> VersionInfo | None:
        """The full-model version a reference means (the newest for ``name``), rescanning the name
        once when the index does not know it yet (published since the last scan)."""
        for attempt in range(2):
            with self._lock:
                fulls = {v: i for v, i in self._index.get(name, {}).items() if i.is_full_model}
            if version is None and fulls:
                return fulls[max(fulls)]
            if version is not None and version in fulls:
                return fulls[version]
            if attempt == 0 and rescan:
                self._scan_name(name)
        return None

    def knows(self, model: str) -> bool:
        """Whether ``model`` (``name`` or ``name@version``) names a published full model. Rescans
        only a name never seen, so routing an adapter request costs no disk I/O."""
        try:
            name, version = parse_adapter_ref(model)
        except AdapterError:
            return False
        with self._lock:
            seen = name in self._index
        return self._lookup(name, version, rescan=not seen) is not None

    # -- hosting ----------------------------------------------------------------------------------

    def acquire(self, model: str, wait_s: float | None = -1.0) -> PublishedLease:
        """Pin the host of ``model``, loading it first if needed.

        Args:
            wait_s: how long to wait for a load; -1 = ``load_wait_s``, None = until it ends.

        Raises:
            AdapterError: a malformed reference.
            ModelNotFoundError: no such published full model.
            AdapterLoadError: the artifact cannot be served (cached per version and file stamp).
            AdapterCapacityError: ``max_published_models`` hosts are resident and none is idle.
            ModelNotReadyError: still loading after the wait; retry.
        """
        name, version = parse_adapter_ref(model)
        info = self._lookup(name, version)
        if info is None:
            raise ModelNotFoundError(
                f"model={show_value(model)}: no such base model or published full model; ListModels lists them"
            )
        self._raise_cached_failure(info)
        entry, start, closing = self._pin(info)
        _close_hosts(closing)
        if start:
            threading.Thread(target=self._load, args=(entry,), name=f"load-{info.ref}", daemon=True).start()
        if not entry.ready.wait(self.load_wait_s if wait_s == -1.0 else wait_s):
            self._unpin(entry)
            raise ModelNotReadyError(f"model {info.ref} is loading; retry in a few seconds")
        if entry.error is not None:
            self._unpin(entry)
            raise type(entry.error)(entry.error.reason)  # one instance per raising thread
        return PublishedLease(info.ref, entry.host, lambda: self._unpin(entry))

    def _raise_cached_failure(self, info: VersionInfo) -> None:
        with self._lock:
            failure = self._failures.get(info.ref)
        if failure is not None:
            error, stamp = failure
            if stamp == files_stamp(info.path):
                raise type(error)(error.reason)
            with self._lock:
                self._failures.pop(info.ref, None)

    def _pin(self, info: VersionInfo) -> tuple[_Resident, bool, list[Any]]:
        """The resident entry of ``info`` pinned once (made, and room made for it, when absent)."""
        if self.capacity == 0:
            raise AdapterCapacityError(
                f"model {info.ref} is a published full model, but this server serves none "
                "(max_published_models is 0)"
            )
        closing: list[Any] = []
        with self._lock:
            entry = self._resident.get(info.ref)
            if entry is not None and entry.info.identity != info.identity:
                closing += self._unload_ref(info.ref)  # replaced on disk: never serve the old one
                entry = None
            start = entry is None
            if entry is None:
                busy = self._busy()
                if len(busy) >= self.capacity:
                    raise self._capacity_error(info.ref, busy)
                entry = self._resident[info.ref] = _Resident(info, self._make_host(info))
            entry.pins += 1
            self._resident.move_to_end(info.ref)
        return entry, start, closing

    def _busy(self) -> list[str]:
        """Refs of hosts that cannot be unloaded now: serving requests, loading, or draining (lock held)."""
        busy = [r for r, e in self._resident.items() if e.pins or not e.ready.is_set()]
        return sorted([*busy, *(e.info.ref for e in self._draining)])

    def _capacity_error(self, ref: str, busy: list[str]) -> AdapterCapacityError:
        return AdapterCapacityError(
            f"cannot load published model {ref}: max_published_models={self.capacity} and every resident "
            f"one is serving requests or loading ({', '.join(busy)}); retry shortly, or raise "
            "--max-published-models"
        )

    def _make_room(self, entry: _Resident) -> list[Any]:
        """Unload least-recently-used idle hosts until ``entry`` (resident, still loading) fits
        (lock held). Runs once its artifact has passed its checks, so a bad artifact never unloads
        a good model.

        Raises:
            AdapterCapacityError: the others became busy meanwhile.
        """
        closing: list[Any] = []
        while len(self._resident) + len(self._draining) > self.capacity:
            idle = [r for r, e in self._resident.items() if e.pins == 0 and e.ready.is_set()]
            if not idle:
                raise self._capacity_error(entry.info.ref, [r for r in self._busy() if r != entry.info.ref])
            victim = self._resident.pop(idle[0])
            logger.info("unloading published model %s (least recently used) for %s", idle[0], entry.info.ref)
            closing.append(victim.host)
        return closing

    def _load(self, entry: _Resident) -> None:
        info = entry.info
        try:
            check_full_model(info)
            with self._lock:
                closing = self._make_room(entry)
            _close_hosts(closing)
            entry.host.load()
            if entry.host.state != READY:
                raise AdapterLoadError(f"published model {info.ref} failed to load: {entry.host.reason}")
        except (AdapterLoadError, AdapterCapacityError) as e:
            self._fail(entry, e)
        except Exception as e:  # I/O while checking: the files vanished or cannot be read
            self._fail(entry, AdapterLoadError(f"published model {info.ref} is unreadable: {e}"))
        else:
            logger.info("published model %s ready", info.ref)
        finally:
            entry.ready.set()
        self._close_if_drained(entry)  # unloaded or replaced while it loaded

    def _fail(self, entry: _Resident, error: AdapterError) -> None:
        entry.error = error
        low = error.reason.lower()
        transient = isinstance(error, AdapterCapacityError) or "out of memory" in low or "outofmemory" in low
        stamp = None if transient else files_stamp(entry.info.path)
        with self._lock:
            if stamp is not None:
                self._failures[entry.info.ref] = (error, stamp)
            if self._resident.get(entry.info.ref) is entry:
                del self._resident[entry.info.ref]
            if entry in self._draining:
                self._draining.remove(entry)
        logger.warning("published model refused: %s", error.reason)
        _close_hosts([entry.host])

    def _unpin(self, entry: _Resident) -> None:
        with self._lock:
            entry.pins -= 1
        self._close_if_drained(entry)

    def _unload_ref(self, ref: str) -> list[Any]:
        """Take ``ref`` out of the resident set (lock held): an idle host is returned for closing; a
        pinned or loading one drains and closes when its last request ends or its load does."""
        entry = self._resident.pop(ref, None)
        if entry is None:
            return []
        if entry.pins or not entry.ready.is_set():
            self._draining.append(entry)
            return []
        return [entry.host]

    def _close_if_drained(self, entry: _Resident) -> None:
        with self._lock:
            done = entry.pins == 0 and entry.ready.is_set() and entry in self._draining
            if done:
                self._draining.remove(entry)
        if done:
            _close_hosts([entry.host])

    def load(self, model: str) -> PublishedModelStatus:
        """Load ``model`` now (idempotent) and wait for the whole load.

        Raises:
            The errors of :meth:`acquire` but ``ModelNotReadyError``.
        """
        lease = self.acquire(model, wait_s=None)
        lease.release()
        return self.status(lease.ref)

    def unload(self, model: str) -> list[str]:
        """Unload ``name@version`` or every version of ``name``; a host serving requests goes when
        they end. Idempotent for published models.

        Raises:
            AdapterError: a malformed reference.
            ModelNotFoundError: nothing by that name is published as a full model.
        """
        name, version = parse_adapter_ref(model)
        if self._lookup(name, version) is None:
            raise ModelNotFoundError(f"model={show_value(model)}: no such published full model")
        closing: list[Any] = []
        with self._lock:
            refs = [r for r in self._resident if r.split("@", 1)[0] == name]
            refs = [r for r in refs if version is None or r == f"{name}@{version}"]
            for ref in refs:
                closing += self._unload_ref(ref)
        _close_hosts(closing)
        return refs

    # -- reporting ---------------------------------------------------------------------------------

    def statuses(self) -> list[PublishedModelStatus]:
        """Every published full-model version with its state, by name then version."""
        with self._lock:
            infos = [
                i for n in sorted(self._index) for _, i in sorted(self._index[n].items()) if i.is_full_model
            ]
            return [self._status_of(i) for i in infos]

    def status(self, ref: str) -> PublishedModelStatus:
        name, version = parse_adapter_ref(ref)
        info = self._lookup(name, version)
        if info is None:
            raise ModelNotFoundError(f"model={show_value(ref)}: no such published full model")
        with self._lock:
            return self._status_of(info)

    def _status_of(self, info: VersionInfo) -> PublishedModelStatus:
        manifest = info.manifest
        assert manifest is not None
        entry = self._resident.get(info.ref)
        failure = self._failures.get(info.ref)
        state, reason, host = AVAILABLE, "", None
        if entry is not None and entry.info.identity == info.identity:
            state, host = (READY if entry.ready.is_set() else LOADING), entry.host
        elif failure is not None:
            state, reason = FAILED, failure[0].reason
        return PublishedModelStatus(
            info.ref,
            str(info.path),
            state,
            reason,
            manifest.template,
            manifest.method,
            describe_base(manifest.base_model),
            host,
        )

    def resident(self) -> list[str]:
        """Refs of resident hosts (loading or ready), least recently used first."""
        with self._lock:
            return list(self._resident)

    def close(self) -> None:
        """Stop the watcher and close every host."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            hosts = [e.host for e in (*self._resident.values(), *self._draining)]
            self._resident.clear()
            self._draining.clear()
        _close_hosts(hosts)


def _close_hosts(hosts: list[Any]) -> None:
    """Close hosts outside any lock (an engine's close joins its thread), then return the memory."""
    if not hosts:
        return
    for host in hosts:
        try:
            host.close()
        except Exception:
            logger.exception("closing a published model's host failed")
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


__all__ = [
    "PublishedLease",
    "PublishedModelStatus",
    "PublishedModels",
    "check_full_model",
]
