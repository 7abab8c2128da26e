"""The inference service's adapter registry, on real PEFT adapters published into a real directory.

Every adapter here is made by PEFT (``get_peft_model`` + ``save_pretrained``) on the tiny llama and
published with ``lorafleet.adapters.publish``, so manifests, hashes and safetensors headers are the
real ones the trainer writes.
"""

from __future__ import annotations

import copy
import gc
import json
import pickle
import random
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import services.inference.registry as registry_module
from lorafleet.adapters import MANIFEST_NAME, Manifest, PublishedAdapter, new_staging_dir, publish, utc_now
from lorafleet.errors import AdapterError, AdapterNotFoundError
from lorafleet.models import base_model_fingerprint
from services.inference.errors import AdapterCapacityError, AdapterIncompatibleError, AdapterLoadError
from services.inference.registry import AdapterRegistry, RegistryEvent, content_ref

# ---------------------------------------------------------------------------------------------
# Real adapters, made once per module


class _Weights:
    """What the test loader returns: the adapter's tensors, weak-referenceable to detect leaks."""

    live: ClassVar[weakref.WeakSet[_Weights]] = weakref.WeakSet()

    def __init__(self, ref: str, tensors: dict[str, torch.Tensor]) -> None:
        self.ref = ref
        self.tensors = tensors
        _Weights.live.add(self)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class _Loader:
    """Loads the safetensors (never anything else) and counts calls per ref."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path: Path, ref: str) -> _Weights:
        self.calls.append(ref)
        return _Weights(ref, load_file(str(path / "adapter_model.safetensors")))


def _save_lora(
    base: Any, out: Path, *, rank: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 0
) -> Path:
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def base(tiny_llama: Path) -> dict[str, Any]:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    return {
        "path": tiny_llama,
        "model": model,
        "fingerprint": base_model_fingerprint(str(tiny_llama), None),
        "modules": {name for name, _ in model.named_modules()},
    }


@pytest.fixture(scope="module")
def sources(base: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapter directories (not yet published) of every shape the tests need."""
    root = tmp_path_factory.mktemp("sources")
    model = base["model"]
    out = {f"lora{i}": _save_lora(model, root / f"lora{i}", seed=i) for i in range(4)}
    out["rank16"] = _save_lora(model, root / "rank16", rank=16)
    out["rank8"] = _save_lora(model, root / "rank8", rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    # Same module names, one layer more: its layer-2 tensors match nothing in the 2-layer base.
    deeper_config = AutoConfig.from_pretrained(base["path"])
    deeper_config.num_hidden_layers = 3
    out["deeper"] = _save_lora(AutoModelForCausalLM.from_config(deeper_config), root / "deeper")
    # A target module the base has no such layer for, written into a real PEFT config.
    bad_target = _save_lora(model, root / "bad_target")
    cfg = json.loads((bad_target / "adapter_config.json").read_text())
    cfg["target_modules"] = [*cfg["target_modules"], "query_key_value"]
    (bad_target / "adapter_config.json").write_text(json.dumps(cfg))
    out["bad_target"] = bad_target
    ptuning = get_peft_model(
        copy.deepcopy(model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    ptuning.save_pretrained(str(root / "ptuning"), safe_serialization=True)
    out["ptuning"] = root / "ptuning"
    # The same adapter as lora0, but pickled the way old PEFT versions saved it.
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(out["lora0"] / "adapter_config.json", pickled)
    torch.save(load_file(str(out["lora0"] / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    out["pickled"] = pickled
    return out


@pytest.fixture(scope="module")
def other_base(base: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A second tiny llama: same architecture, different weights, so a different fingerprint."""
    model = copy.deepcopy(base["model"])
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    path = tmp_path_factory.mktemp("other") / "llama-other"
    model.save_pretrained(str(path))
    return {"path": path, "fingerprint": base_model_fingerprint(str(path), None)}


def _publish(
    root: Path,
    name: str,
    src: Path,
    fingerprint: dict[str, Any],
    *,
    kind: str = "lora",
    version: int | None = None,
    rank: int = 4,
    template: str = "chatml",
) -> PublishedAdapter:
    staging = new_staging_dir(root, name)
    shutil.copytree(src, staging, dirs_exist_ok=True)
    manifest = Manifest(
        name=name,
        version=0,
        kind=kind,
        method="ptuning" if kind == "ptuning" else "lora",
        base_model=fingerprint,
        family="llama",
        template=template,
        hyperparameters={"lora": {"rank": rank}},
        created_at=utc_now(),
    )
    return publish(staging, root, name, manifest, version=version)


@pytest.fixture
def make(
    base: dict[str, Any], tmp_path: Path
) -> Iterator[Callable[..., tuple[AdapterRegistry, _Loader, list[RegistryEvent]]]]:
    """Build registries over ``tmp_path/adapters`` with a counting loader and an event log."""
    made: list[AdapterRegistry] = []

    def factory(**kwargs: Any) -> tuple[AdapterRegistry, _Loader, list[RegistryEvent]]:
        loader, events = _Loader(), []
        options: dict[str, Any] = {"max_rank": 8, "capacity": 4, "loader": loader, "on_event": events.append}
        options.update(kwargs)
        reg = AdapterRegistry(
            tmp_path / "adapters", str(base["path"]), base["fingerprint"], base["modules"], **options
        )
        made.append(reg)
        return reg, loader, events

    yield factory
    for reg in made:
        reg.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "adapters"
    path.mkdir()
    return path


def _count(events: list[RegistryEvent], kind: str) -> int:
    return sum(1 for e in events if e.kind == kind)


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 2.0) -> float:
    """Seconds until ``predicate`` held; fails the test past ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, "not seen within the deadline"
        time.sleep(0.02)
    return time.monotonic() - start


# ---------------------------------------------------------------------------------------------
# Discovery and resolution


def test_watcher_discovers_new_adapters_and_versions_and_drops_removed_ones(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    reg, _, _ = make()
    reg.start_watcher(interval_s=0.5)
    assert reg.statuses() == []
    (root / ".hidden").mkdir()  # dot-directories and unfinished staging dirs are never adapters
    new_staging_dir(root, "unfinished")

    def refs() -> list[str]:
        return [s.ref for s in reg.statuses()]

    _publish(root, "alpha", sources["lora0"], base["fingerprint"])
    assert _wait_for(lambda: refs() == ["alpha@1"]) < 2.0
    _publish(root, "alpha", sources["lora1"], base["fingerprint"])
    assert _wait_for(lambda: refs() == ["alpha@1", "alpha@2"]) < 2.0
    assert reg.resolve("alpha").ref == "alpha@2"
    shutil.rmtree(root / "alpha" / "1")
    assert _wait_for(lambda: refs() == ["alpha@2"]) < 2.0
    with pytest.raises(AdapterNotFoundError, match=r"alpha@1 not found \(published versions: 2\)"):
        reg.resolve("alpha@1")


def test_name_resolves_to_newest_and_name_at_version_to_that_version(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    v1 = _publish(root, "support", sources["lora0"], base["fingerprint"], template="chatml")
    v2 = _publish(root, "support", sources["lora1"], base["fingerprint"], template="llama3")
    reg, loader, events = make()  # no scan yet: the first request finds the name on disk itself
    newest = reg.resolve("support")
    assert (newest.ref, newest.name, newest.version, newest.template) == ("support@2", "support", 2, "llama3")
    assert reg.resolve("support@latest") is newest
    first = reg.resolve("support@1")
    assert (first.ref, first.template, first.manifest.version) == ("support@1", "chatml", 1)
    assert not torch.equal(*(next(iter(r.weights.tensors.values())) for r in (first, newest)))
    assert loader.calls == [content_ref("support@2", v2.manifest), content_ref("support@1", v1.manifest)]
    assert loader.calls[0].startswith("support@2#") and loader.calls[0] != loader.calls[1]
    assert _count(events, "load") == 2 and all(e.seconds > 0 for e in events if e.kind == "load")
    assert {s.ref: s.state for s in reg.statuses()} == {"support@1": "loaded", "support@2": "loaded"}
    status = reg.statuses()[0]
    assert (status.rank, status.method, status.template, status.base_model) == (
        4,
        "lora",
        "chatml",
        str(base["path"]),
    )


def test_unknown_and_invalid_references(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    _publish(root, "known", sources["lora0"], base["fingerprint"])
    reg, loader, _ = make()
    with pytest.raises(AdapterNotFoundError, match="'nope' not found"):
        reg.resolve("nope")
    with pytest.raises(AdapterNotFoundError, match=r"known@7 not found \(published versions: 1\)"):
        reg.resolve("known@7")
    for bad in ("../x", "known@0", "known@v2", "", "a/b"):
        with pytest.raises(AdapterError) as info:
            reg.resolve(bad)
        assert not isinstance(info.value, AdapterNotFoundError)  # INVALID_ARGUMENT, not NOT_FOUND
        assert repr(bad.partition("@")[0]) in info.value.reason or repr(bad) in info.value.reason
    assert loader.calls == []


def test_republished_version_is_never_served_stale(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    """An operator deletes name/1 and publishes different weights as name/1: new requests get the
    new weights (a new generation and content ref), the request holding the old ones keeps them."""
    _publish(root, "fix", sources["lora0"], base["fingerprint"])
    reg, loader, _ = make()
    old = reg.acquire("fix@1")
    shutil.rmtree(root / "fix" / "1")
    _publish(root, "fix", sources["lora1"], base["fingerprint"], version=1)
    reg.scan()
    new = reg.resolve("fix@1")
    assert new.generation != old.generation and loader.calls[0] != loader.calls[1]
    assert not torch.equal(*(next(iter(r.weights.tensors.values())) for r in (old, new)))
    reg.release(old)
    assert reg.resident() == ["fix@1"] and reg.resolve("fix").generation == new.generation


# ---------------------------------------------------------------------------------------------
# Validation before first use


def test_pickle_only_adapter_is_refused_without_unpickling(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    _publish(root, "old-format", sources["pickled"], base["fingerprint"])
    reg, loader, events = make()
    with pytest.raises(AdapterLoadError, match=r"only pickle weights \(adapter_model\.bin\).*never loaded"):
        reg.resolve("old-format")
    assert loader.calls == [] and _count(events, "load_failure") == 1
    (status,) = reg.statuses()
    assert status.state == "failed" and "pickle" in status.reason


def test_adapter_for_another_base_is_incompatible_naming_both(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any], other_base: dict[str, Any]
) -> None:
    _publish(root, "foreign", sources["lora0"], other_base["fingerprint"])
    _publish(root, "native", sources["lora1"], base["fingerprint"])
    reg, loader, _ = make()
    with pytest.raises(AdapterIncompatibleError) as info:
        reg.resolve("foreign")
    message = info.value.reason
    assert str(other_base["path"]) in message and str(base["path"]) in message
    assert (
        other_base["fingerprint"]["sha256"][:12] in message and base["fingerprint"]["sha256"][:12] in message
    )
    assert isinstance(info.value, AdapterError)
    assert reg.resolve("native").ref == "native@1"  # one bad adapter fails only its own requests
    assert len(loader.calls) == 1


def test_rank_above_the_cap_is_incompatible(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    _publish(root, "wide", sources["rank16"], base["fingerprint"], rank=16)
    _publish(root, "ok", sources["rank8"], base["fingerprint"], rank=8)
    reg, loader, _ = make(max_rank=8)
    with pytest.raises(AdapterIncompatibleError, match=r"rank 16, above this server's max_rank 8"):
        reg.resolve("wide")
    assert reg.resolve("ok").ref == "ok@1" and loader.calls == [loader.calls[0]]
    assert {s.ref: s.rank for s in reg.statuses()} == {"ok@1": 8, "wide@1": 16}


def test_truncated_weights_fail_that_version_only_fast_and_are_retried_after_a_fix(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = _publish(root, "broken", sources["lora0"], base["fingerprint"])
    _publish(root, "healthy", sources["lora1"], base["fingerprint"])
    weights = broken.path / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])
    verifications: list[str] = []
    real_verify = registry_module.verify_files

    def counting_verify(published: PublishedAdapter) -> list[str]:
        verifications.append(published.ref)
        return real_verify(published)

    monkeypatch.setattr(registry_module, "verify_files", counting_verify)
    reg, loader, events = make()
    reg.scan()
    for _ in range(5):  # the same clear error every time, from the cache after the first
        with pytest.raises(AdapterLoadError, match=r"adapter_model.safetensors: size \d+ != manifest \d+"):
            reg.resolve("broken@1")
    assert verifications == ["broken@1"] and _count(events, "load_failure") == 1 and loader.calls == []
    assert reg.resolve("healthy").ref == "healthy@1"
    states = {s.ref: (s.state, s.reason) for s in reg.statuses()}
    assert states["healthy@1"] == ("loaded", "")
    assert states["broken@1"][0] == "failed" and "truncated or corrupt" in states["broken@1"][1]
    weights.write_bytes(original)  # fixed in place: the file stamp changed, so it is validated again
    assert reg.resolve("broken").ref == "broken@1"
    assert verifications.count("broken@1") == 2
    assert {s.ref: s.state for s in reg.statuses()}["broken@1"] == "loaded"


def test_corrupt_newest_manifest_fails_instead_of_serving_an_older_version(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    _publish(root, "svc", sources["lora0"], base["fingerprint"])
    v2 = _publish(root, "svc", sources["lora1"], base["fingerprint"])
    (v2.path / MANIFEST_NAME).write_text("{not json")
    reg, _, _ = make()
    with pytest.raises(
        AdapterLoadError, match=r"svc@2 cannot be used: lorafleet_manifest.json is unreadable"
    ):
        reg.resolve("svc")
    assert reg.resolve("svc@1").ref == "svc@1"


@pytest.mark.parametrize(
    ("source", "missing"), [("bad_target", "query_key_value"), ("deeper", "model.layers.2.self_attn.q_proj")]
)
def test_target_modules_missing_from_the_base_are_incompatible(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any], source: str, missing: str
) -> None:
    _publish(root, "misfit", sources[source], base["fingerprint"])
    reg, loader, _ = make()
    with pytest.raises(
        AdapterIncompatibleError, match=rf"module\(s\) that base model .* does not have: .*{missing}"
    ):
        reg.resolve("misfit")
    assert loader.calls == []


def test_non_lora_artifacts_are_incompatible(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    _publish(root, "prompts", sources["ptuning"], base["fingerprint"], kind="ptuning")
    full = root.parent / "full"
    full.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base["path"] / name, full)
    _publish(root, "whole", full, base["fingerprint"], kind="full_model")
    reg, loader, _ = make()
    # A prompt adapter is served (prompt_adapters.py): checked as one, then handed to the loader.
    assert reg.resolve("prompts").ref == "prompts@1" and loader.calls[0].startswith("prompts@1#")
    # A full model is a base model (the plane's published-model catalog), never a failed adapter.
    with pytest.raises(AdapterIncompatibleError, match=r"whole@1 is a full model .* model='whole@1'"):
        reg.resolve("whole")
    assert len(loader.calls) == 1 and [(s.ref, s.state) for s in reg.statuses()] == [("prompts@1", "loaded")]


# ---------------------------------------------------------------------------------------------
# The cache: LRU, pins, explicit load/unload, memory budget


def test_lru_eviction_order_with_capacity_two_and_events(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    for name, src in (("a", "lora0"), ("b", "lora1"), ("c", "lora2")):
        _publish(root, name, sources[src], base["fingerprint"])
    reg, loader, events = make(capacity=2)
    reg.resolve("a")
    reg.resolve("b")
    reg.resolve("a")  # a becomes the most recently used
    reg.resolve("c")  # evicts b
    assert reg.resident() == ["a@1", "c@1"]
    reg.resolve("b")  # evicts a
    assert reg.resident() == ["c@1", "b@1"]
    assert [e.ref for e in events if e.kind == "evict"] == ["b@1", "a@1"]
    assert _count(events, "load") == 4 and len(loader.calls) == 4
    assert max(e.resident for e in events) == 2 and events[-1].resident == 2
    assert events[-1].resident_bytes == reg.resident_bytes() > 0


def test_pinned_entries_are_not_evicted_and_in_flight_requests_keep_their_version(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    for name, src in (("a", "lora0"), ("b", "lora1"), ("c", "lora2")):
        _publish(root, name, sources[src], base["fingerprint"])
    reg, _, events = make(capacity=2)
    held_a = reg.acquire("a")
    reg.resolve("b")
    reg.resolve("c")  # a is pinned, so b goes although a is older
    assert reg.resident() == ["a@1", "c@1"]
    held_c = reg.acquire("c")
    with pytest.raises(AdapterCapacityError, match=r"2 resident adapter\(s\) are in use"):
        reg.resolve("b")
    assert reg.resident() == ["a@1", "c@1"]
    reg.release(held_a)
    assert reg.resolve("b").ref == "b@1" and reg.resident() == ["c@1", "b@1"]
    reg.release(held_c)

    # A request that started on v1 finishes on v1 while new requests get v2.
    _publish(root, "m", sources["lora0"], base["fingerprint"])
    on_v1 = reg.acquire("m")
    _publish(root, "m", sources["lora3"], base["fingerprint"])
    reg.scan()
    on_v2 = reg.acquire("m")
    assert (on_v1.ref, on_v2.ref) == ("m@1", "m@2")
    assert set(reg.resident()) == {"m@1", "m@2"}  # both pinned; b and c were evicted
    assert _Weights.live >= {on_v1.weights, on_v2.weights}
    reg.release(on_v1)
    reg.release(on_v2)
    reg.release(on_v2)  # one release too many is logged and ignored, never a negative pin
    assert all(e.pins == 0 for e in reg._entries.values())
    assert _count(events, "load_failure") == 0


def test_load_and_unload_are_idempotent_and_unload_of_a_pinned_adapter_waits(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    _publish(root, "x", sources["lora0"], base["fingerprint"])
    _publish(root, "x", sources["lora1"], base["fingerprint"])
    reg, loader, events = make()
    reg.scan()
    assert {s.state for s in reg.statuses()} == {"available"}
    first = reg.load("x@1")
    assert reg.load("x@1") is first and len(loader.calls) == 1
    assert reg.unload("x@1") == ["x@1"] and reg.unload("x@1") == []
    assert reg.unload("never-published") == [] and reg.resident() == []
    with pytest.raises(AdapterError, match="invalid"):
        reg.unload("../x")
    held = reg.acquire("x@1")
    reg.load("x@2")
    assert sorted(reg.unload("x")) == ["x@1", "x@2"]  # a bare name unloads every version
    assert reg.resident() == ["x@1"]  # still serving the request that holds it
    assert {s.ref: s.state for s in reg.statuses()} == {"x@1": "available", "x@2": "available"}
    reg.release(held)
    assert reg.resident() == [] and _count(events, "unload") == 3 and _count(events, "evict") == 0


def test_memory_budget_evicts_by_bytes_and_refuses_an_adapter_bigger_than_it(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    for name, src in (("a", "lora0"), ("b", "lora1"), ("c", "lora2"), ("big", "rank8")):
        _publish(root, name, sources[src], base["fingerprint"])
    size = _Loader()(root / "a" / "1", "probe").nbytes
    reg, _, events = make(capacity=10, memory_budget_bytes=int(size * 2.5))
    for name in ("a", "b", "c"):
        reg.resolve(name)
        assert reg.resident_bytes() <= size * 2.5
    assert reg.resident() == ["b@1", "c@1"] and [e.ref for e in events if e.kind == "evict"] == ["a@1"]
    with pytest.raises(AdapterIncompatibleError, match=r"big@1 needs \d+ bytes, more than the memory budget"):
        reg.resolve("big")
    assert reg.resident() == ["b@1", "c@1"]


def test_many_load_evict_cycles_do_not_grow_the_cache(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    names = ["p", "q", "r"]
    for name, src in zip(names, ("lora0", "lora1", "lora2")):
        _publish(root, name, sources[src], base["fingerprint"])
    reg, loader, events = make(capacity=2)
    for i in range(500):
        reg.resolve(names[i % 3])  # round-robin over 3 with room for 2: every request misses
        assert len(reg.resident()) <= 2
    assert len(loader.calls) == 500 and _count(events, "evict") == 498
    gc.collect()
    assert len(_Weights.live) <= 2  # evicted weights are freed, not kept alive by the registry
    assert not reg._loading and not reg._failures and len(reg._by_ref) == 2


def test_concurrent_requests_with_the_watcher_running_keep_the_invariants(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    names = ["w0", "w1", "w2", "w3"]
    for name, src in zip(names, ("lora0", "lora1", "lora2", "lora3")):
        _publish(root, name, sources[src], base["fingerprint"])
    reg, _, _ = make(capacity=2)
    reg.start_watcher(interval_s=0.05)
    errors: list[BaseException] = []
    capacity_refusals = [0]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                try:
                    held = reg.acquire(rng.choice(names))
                except AdapterCapacityError:
                    capacity_refusals[0] += 1
                    continue
                assert held.weights.tensors
                time.sleep(rng.random() * 0.001)
                reg.release(held)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(reg.resident()) <= 2 and all(e.pins == 0 for e in reg._entries.values())
    assert not reg._loading


def test_event_callback_errors_never_break_serving(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    _publish(root, "ok", sources["lora0"], base["fingerprint"])

    def broken_metrics(event: RegistryEvent) -> None:
        raise RuntimeError("metrics backend down")

    reg, _, _ = make(on_event=broken_metrics)
    assert reg.resolve("ok").ref == "ok@1"


def test_with_the_engine_loader(
    make: Any, root: Path, sources: dict[str, Path], base: dict[str, Any]
) -> None:
    """The registry wired to the engine's real loader: budgets use its byte count, and the weights
    carry the content ref the engine keys its slots by."""
    lora_batch = pytest.importorskip("services.inference.lora_batch")
    pub = _publish(root, "engine", sources["lora0"], base["fingerprint"])
    reg, _, _ = make(
        loader=lambda path, ref: lora_batch.adapter_weights_from_peft_dir(path, ref, base["model"])
    )
    resolved = reg.resolve("engine")
    weights = resolved.weights
    assert isinstance(weights, lora_batch.AdapterWeights)
    assert weights.ref == content_ref("engine@1", pub.manifest) and weights.rank == 4
    assert reg.resident_bytes() == weights.nbytes > 0
