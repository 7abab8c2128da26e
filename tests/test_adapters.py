"""The publish layout: atomic publish, racing publishers, names, refs, verification, manifests."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lorafleet.adapters import (
    MANIFEST_NAME,
    STAGING_DIR,
    Manifest,
    PublishedAdapter,
    cleanup_stale_staging,
    dataset_fingerprint,
    get_adapter,
    list_adapters,
    new_staging_dir,
    parse_adapter_ref,
    publish,
    sha256_file,
    utc_now,
    validate_adapter_name,
    verify_files,
)
from lorafleet.errors import AdapterError, AdapterNotFoundError, DatasetError


def _manifest(name: str = "demo", **overrides: Any) -> Manifest:
    fields: dict[str, Any] = {
        "name": name,
        "version": 0,
        "kind": "lora",
        "method": "lora",
        "base_model": {"path": "/models/tiny", "revision": None, "config_sha256": "ab" * 32},
        "family": "llama",
        "template": "llama3",
        "hyperparameters": {"lora": {"rank": 8}},
        "dataset": {"sha256": "cd" * 32},
        "metrics": {"eval_loss": 1.5},
        "created_at": utc_now(),
        "lorafleet_version": "0.1.0",
        "run_id": "run-1",
    }
    fields.update(overrides)
    return Manifest(**fields)


def _stage(root: Path, name: str = "demo", payload: bytes = b"weights", big: int = 0) -> Path:
    staging = new_staging_dir(root, name)
    (staging / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"]}))
    (staging / "adapter_model.safetensors").write_bytes(payload + os.urandom(big))
    (staging / "tokenizer").mkdir()
    (staging / "tokenizer" / "tokenizer.json").write_text('{"model": {}}')
    return staging


def _publish(root: Path, name: str = "demo", version: int | None = None, big: int = 0) -> PublishedAdapter:
    return publish(_stage(root, name, big=big), root, name, _manifest(name), version=version)


def test_publish_layout_and_read_back(tmp_path: Path) -> None:
    staging = _stage(tmp_path)
    pub = publish(staging, tmp_path, "demo", _manifest())
    assert pub.version == 1 and pub.ref == "demo@1"
    assert pub.path == tmp_path / "demo" / "1"
    assert not staging.exists()
    assert sorted(pub.manifest.files) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer/tokenizer.json",
    ]
    on_disk = json.loads((pub.path / MANIFEST_NAME).read_text())
    assert on_disk["version"] == 1 and on_disk["name"] == "demo" and on_disk["schema"] == 1
    assert on_disk["files"]["adapter_model.safetensors"] == {
        "sha256": sha256_file(pub.path / "adapter_model.safetensors"),
        "size": len(b"weights"),
    }
    assert verify_files(pub) == []
    assert stat.S_IMODE(pub.path.stat().st_mode) == 0o755  # readable by a service running as another uid
    again = get_adapter(tmp_path, "demo")
    assert again.version == 1 and again.manifest == pub.manifest
    assert [a.ref for a in list_adapters(tmp_path)] == ["demo@1"]


def test_versions_increment_and_explicit_version_clash(tmp_path: Path) -> None:
    assert [_publish(tmp_path).version for _ in range(3)] == [1, 2, 3]
    assert _publish(tmp_path, version=10).version == 10
    assert _publish(tmp_path).version == 11
    staging = _stage(tmp_path)
    with pytest.raises(AdapterError, match=r"demo@2 already exists"):
        publish(staging, tmp_path, "demo", _manifest(), version=2)
    assert staging.exists()  # left for the caller to retry or clean up
    assert get_adapter(tmp_path, "demo").version == 11
    assert get_adapter(tmp_path, "demo", 2).manifest.version == 2
    with pytest.raises(AdapterError, match="positive integer"):
        publish(staging, tmp_path, "demo", _manifest(), version=0)


def test_reader_never_sees_a_partial_adapter(tmp_path: Path) -> None:
    """A reader polling while versions are published only ever sees complete, verifiable ones."""
    stop = threading.Event()
    seen: dict[str, list[str]] = {}
    polls = [0]
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            polls[0] += 1
            for pub in list_adapters(tmp_path):
                if pub.ref in seen:
                    continue
                problems = verify_files(pub)
                seen[pub.ref] = problems
                if problems or len(pub.manifest.files) != 3:
                    errors.append(f"{pub.ref}: {problems} {sorted(pub.manifest.files)}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(25):
            _publish(tmp_path, big=256 * 1024)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert polls[0] > 25 and len(seen) >= 5, (polls[0], len(seen))  # it really polled meanwhile
    assert len(list_adapters(tmp_path)) == 25


def _publisher(root: str, count: int, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        results.put([_publish(Path(root)).version for _ in range(count)])
    except Exception as e:  # report instead of dying silently, so the parent fails fast
        results.put(repr(e))


def test_two_processes_publishing_get_distinct_versions(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_publisher, args=(str(tmp_path), 12, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(g, list) for g in got), got
    versions = got[0] + got[1]
    assert sorted(versions) == list(range(1, 25))  # every version exactly once
    for pub in list_adapters(tmp_path):
        assert pub.manifest.version == pub.version and verify_files(pub) == []
    assert list((tmp_path / STAGING_DIR).iterdir()) == []


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/b",
        "a\\b",
        "",
        "a" * 65,
        ".hidden",
        "-dash",
        "_under",
        "a..b",
        "..",
        "名字",
        "café",
        "a b",
        "a\n",
        "a@1",
        "a:b",
        None,
        7,
    ],
)
def test_invalid_adapter_names(name: Any) -> None:
    with pytest.raises(AdapterError, match=re.escape(repr(name))):
        validate_adapter_name(name)


@pytest.mark.parametrize("name", ["a", "A1", "qwen2-7b_lora.v2", "x" * 64, "7b", "a.b-c_d"])
def test_valid_adapter_names(name: str) -> None:
    assert validate_adapter_name(name) == name


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("demo", ("demo", None)),
        ("demo@3", ("demo", 3)),
        ("demo@latest", ("demo", None)),
        ("a.b@12", ("a.b", 12)),
    ],
)
def test_parse_adapter_ref(ref: str, expected: tuple[str, int | None]) -> None:
    assert parse_adapter_ref(ref) == expected


@pytest.mark.parametrize(
    "ref", ["demo@0", "demo@-1", "demo@x", "demo@", "@3", "demo@1@2", "../x@1", "demo@03"]
)
def test_parse_adapter_ref_rejects(ref: str) -> None:
    with pytest.raises(AdapterError):
        parse_adapter_ref(ref)


def test_verify_files_detects_corruption(tmp_path: Path) -> None:
    pub = _publish(tmp_path)
    weights = pub.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, different content
    assert verify_files(pub) == ["adapter_model.safetensors: sha256 mismatch"]
    weights.write_bytes(b"short")
    assert verify_files(pub) == ["adapter_model.safetensors: size 5 != manifest 7"]
    (pub.path / "tokenizer" / "tokenizer.json").unlink()
    assert "tokenizer/tokenizer.json: missing" in verify_files(pub)
    evil = PublishedAdapter(
        pub.name,
        pub.version,
        pub.path,
        _manifest(files={"../../etc/passwd": {"sha256": "0" * 64, "size": 1}}),
    )
    assert verify_files(evil) == ["../../etc/passwd: path leaves the adapter directory"]


def test_manifest_round_trip_and_forward_compat() -> None:
    m = _manifest(version=3, files={"a.bin": {"sha256": "e" * 64, "size": 4}})
    data = m.to_dict()
    assert Manifest.from_dict(json.loads(json.dumps(data))) == m
    data["future_field"] = {"x": 1}
    loaded = Manifest.from_dict(data)
    assert loaded.extra == {"future_field": {"x": 1}}
    assert loaded.to_dict()["future_field"] == {"x": 1}  # kept on rewrite
    minimal = {
        "name": "n",
        "version": 1,
        "kind": "full_model",
        "method": "full",
        "base_model": {"id": "m"},
        "created_at": "2026-01-01T00:00:00Z",
        "files": {},
    }
    assert Manifest.from_dict(minimal).metrics == {}


@pytest.mark.parametrize("key", ["name", "version", "kind", "method", "base_model", "created_at", "files"])
def test_manifest_missing_required_key_is_named(key: str) -> None:
    data = _manifest(version=1).to_dict()
    del data[key]
    with pytest.raises(AdapterError, match=f"missing required key '{key}'"):
        Manifest.from_dict(data)


def test_manifest_bad_values_are_named() -> None:
    with pytest.raises(AdapterError, match="'kind'"):
        Manifest.from_dict({**_manifest(version=1).to_dict(), "kind": "adapter"})
    with pytest.raises(AdapterError, match="'version'"):
        Manifest.from_dict({**_manifest().to_dict(), "version": "1"})
    with pytest.raises(AdapterError, match="'files' entry 'x'"):
        Manifest.from_dict({**_manifest().to_dict(), "files": {"x": {"sha256": "a"}}})


def test_not_found_errors_name_what_was_asked(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFoundError, match="'ghost'"):
        get_adapter(tmp_path, "ghost")
    _publish(tmp_path)
    with pytest.raises(AdapterNotFoundError, match=r"demo@7 not found \(published versions: 1\)"):
        get_adapter(tmp_path, "demo", 7)


def test_listing_skips_staging_foreign_and_corrupt_dirs(tmp_path: Path) -> None:
    _publish(tmp_path)
    _publish(tmp_path)
    _stage(tmp_path)  # an unpublished staging dir
    (tmp_path / "demo" / "9").mkdir()  # a version dir without a manifest
    (tmp_path / "demo" / "notes").mkdir()
    (tmp_path / "not a name").mkdir()
    assert [a.ref for a in list_adapters(tmp_path)] == ["demo@1", "demo@2"]
    assert get_adapter(tmp_path, "demo").version == 2  # 9 has no manifest: not a publication
    (tmp_path / "demo" / "2" / MANIFEST_NAME).write_text("{not json")
    assert [a.ref for a in list_adapters(tmp_path)] == ["demo@1"]
    with pytest.raises(AdapterError, match="unreadable"):
        get_adapter(tmp_path, "demo")  # the latest is corrupt: refuse, never fall back silently
    assert list_adapters(tmp_path / "absent") == []


def test_publish_refuses_bad_staging(tmp_path: Path) -> None:
    empty = new_staging_dir(tmp_path, "demo")
    with pytest.raises(AdapterError, match="no file to publish"):
        publish(empty, tmp_path, "demo", _manifest())
    linked = _stage(tmp_path)
    (linked / "leak").symlink_to("/etc/hostname")
    with pytest.raises(AdapterError, match="symlink 'leak'"):
        publish(linked, tmp_path, "demo", _manifest())
    with pytest.raises(AdapterError, match="does not match"):
        publish(_stage(tmp_path), tmp_path, "demo", _manifest("other"))
    with pytest.raises(AdapterError, match="does not exist"):
        publish(tmp_path / "nowhere", tmp_path, "demo", _manifest())
    with pytest.raises(AdapterError, match="'bad/name'"):
        new_staging_dir(tmp_path, "bad/name")
    assert list_adapters(tmp_path) == []


def test_cleanup_stale_staging_keeps_active_writers(tmp_path: Path) -> None:
    stale, fresh = _stage(tmp_path), _stage(tmp_path)
    old = time.time() - 7200
    for dirpath, _, filenames in os.walk(stale):
        for f in filenames:
            os.utime(Path(dirpath) / f, (old, old))
        os.utime(dirpath, (old, old))
    # A writer still active deep in an otherwise old tree keeps it alive.
    for dirpath, _, _ in os.walk(fresh):
        os.utime(dirpath, (old, old))
    removed = cleanup_stale_staging(tmp_path, older_than_s=3600)
    assert removed == [stale]
    assert not stale.exists() and fresh.exists()
    assert cleanup_stale_staging(tmp_path / "absent", 1) == []


def test_dataset_fingerprint(tmp_path: Path) -> None:
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}\n', encoding="utf-8")
    array = tmp_path / "val.json"
    array.write_text(json.dumps([{"a": 1}, {"a": 2}]), encoding="utf-8")
    fp = dataset_fingerprint([str(jsonl), str(array)])
    assert [f["rows"] for f in fp["files"]] == [3, 2]
    assert fp["files"][0]["sha256"] == sha256_file(jsonl) and fp["files"][0]["size"] == jsonl.stat().st_size
    assert dataset_fingerprint([str(jsonl), str(array)])["sha256"] == fp["sha256"]
    array.write_text("[]", encoding="utf-8")
    assert dataset_fingerprint([str(jsonl), str(array)])["sha256"] != fp["sha256"]
    with pytest.raises(DatasetError, match=r"missing\.jsonl"):
        dataset_fingerprint([str(tmp_path / "missing.jsonl")])


def test_utc_now_is_iso_utc() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_now())
