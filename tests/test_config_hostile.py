"""Hostile run configs and job overrides (issue 16 items 1, 4 and 5): each is refused with a problem
naming the field and the value, never with another exception, and nothing a client sends reaches the
settings the server owns.

- overflow: every numeric field of every config section has a finiteness check and an upper bound
  that fits the proto field carrying it; every string field has a length bound and must be storable
  text (no NUL, no lone surrogate);
- override keys: a key must be a known ``section.field`` spelled exactly, so no spelling of a
  server-owned key (spaces, case, look-alikes, empty segments, ``=``, whole sections) gets through;
- YAML: anchors, aliases and deep nesting are refused in override values and config files, and the
  size and number of overrides are bounded, so a few hundred bytes cannot cost seconds of CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import pytest
import yaml

from lorafleet.config import (
    MAX_OVERRIDE_VALUE_CHARS,
    MAX_OVERRIDES,
    NUMERIC_BOUNDS,
    OVERRIDE_KEYS,
    RunConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)
from lorafleet.errors import ConfigError
from lorafleet.v1 import trainer_pb2 as pb
from services.trainer.jobspec import (
    SERVER_OWNED,
    config_to_spec,
    request_to_config,
    spec_field,
    spec_from_request,
)
from services.trainer.store import JobRequest, ResourceRequest

GOOD = {"model": {"name_or_path": "org/model"}, "data": {"train_file": "x.jsonl"}}
SERVER = {"output.run_dir": "/srv/runs/j1/run", "output.adapters_root": "/srv/adapters"}


def _problems(tree: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(tree)
    return {p.field: p for p in info.value.problems}


def _with(path: str, value: Any) -> dict[str, Any]:
    section, _, name = path.rpartition(".")
    tree: dict[str, Any] = {k: dict(v) for k, v in GOOD.items()}
    if section:
        tree.setdefault(section, {})[name] = value
    else:
        tree[name] = value
    return tree


def _fields(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, field type text) of every leaf field of a config dataclass."""
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cls):
        default = getattr(cls(), f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(default):
            out += _fields(type(default), f"{path}.")
        else:
            out.append((path, str(f.type)))
    return out


LEAVES = _fields(RunConfig)
NUMERIC = [path for path, t in LEAVES if t.startswith(("int", "float")) and "str" not in t]
STRINGS = [path for path, t in LEAVES if t.startswith("str")]


# -- item 1: overflow ----------------------------------------------------------------------------------

OVERFLOW = [
    ("train.epochs=1e9", "train.epochs"),
    ("train.max_steps=2147483647", "train.max_steps"),
    ("lora.alpha=inf", "lora.alpha"),
    ("lora.alpha=.inf", "lora.alpha"),
    ("lora.alpha=1e400", "lora.alpha"),
    ("lora.alpha=" + "9" * 400, "lora.alpha"),  # an int too large for a float
    ("train.learning_rate=.nan", "train.learning_rate"),
    ("train.weight_decay=nan", "train.weight_decay"),
    ("train.max_grad_norm=1.0e999", "train.max_grad_norm"),
    ("train.epochs=-.inf", "train.epochs"),
    ("train.seed=99999999999", "train.seed"),
    ("data.max_samples=1099511627776", "data.max_samples"),
    ("data.max_source_length=1000000000", "data.max_source_length"),
    ("train.gradient_accumulation_steps=2147483648", "train.gradient_accumulation_steps"),
    ("distributed.nnodes=1000000000000", "distributed.nnodes"),
    ("train.save_steps=" + "1" * 30, "train.save_steps"),
    ("data.validation_split=nan", "data.validation_split"),
    ("ptuning.encoder_hidden_size=2147483647", "ptuning.encoder_hidden_size"),
]


@pytest.mark.parametrize("item,field", OVERFLOW, ids=[i for i, _ in OVERFLOW])
def test_overflowing_override_is_refused_naming_field_and_value(item: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.name_or_path=org/model", "data.train_file=x.jsonl", item])
    problems = {p.field: p for p in info.value.problems}
    assert field in problems, info.value.reason
    assert f"{field}=" in str(info.value)


def test_numeric_bounds_cover_every_numeric_field_and_fit_the_proto() -> None:
    assert sorted(NUMERIC_BOUNDS) == sorted(NUMERIC)
    int32 = 2**31 - 1
    for path, (low, high) in NUMERIC_BOUNDS.items():
        assert math.isfinite(low) and math.isfinite(high) and low <= high, path
        spec = spec_field(path)
        if spec.startswith("spec.overrides"):
            continue
        _, msg, name = spec.split(".")
        message = getattr(pb, pb.JobSpec.DESCRIPTOR.fields_by_name[msg].message_type.name)
        kind = message.DESCRIPTOR.fields_by_name[name].type
        if kind in (message.DESCRIPTOR.fields_by_name[name].TYPE_INT32,):
            assert -int32 - 1 <= low and high <= int32, f"{path} bound does not fit int32"


@pytest.mark.parametrize("path", NUMERIC)
def test_every_numeric_field_refuses_overflow_and_non_finite(path: str) -> None:
    low, high = NUMERIC_BOUNDS[path]
    is_float = isinstance(high, float)
    bad: list[Any] = [int(high) + 1 if not is_float else high * 10 + 1, 10**30, low - 1]
    if is_float:
        bad += [math.inf, -math.inf, math.nan]
    for value in bad:
        problems = _problems(_with(path, value))
        assert path in problems, (path, value, problems)
        assert len(str(problems[path])) < 400


@pytest.mark.parametrize("path", STRINGS)
def test_every_string_field_is_bounded_and_storable(path: str) -> None:
    for value in ("x" * 100_000, "a\x00b", "bad\ud800surrogate"):
        problems = _problems(_with(path, value))
        assert path in problems, (path, value[:20])
        assert len(str(problems[path])) < 400


def test_list_fields_are_bounded() -> None:
    for path in ("lora.target_modules", "lora.modules_to_save", "freeze.trainable_modules"):
        assert path in _problems(_with(path, [f"m{i}" for i in range(10_000)]))
        assert path in _problems(_with(path, ["x" * 10_000]))
        assert path in _problems(_with(path, ["a\x00"]))


def test_accepted_config_fits_the_proto() -> None:
    tree = _with("train.seed", NUMERIC_BOUNDS["train.seed"][1])
    for path in NUMERIC:
        if path.startswith("distributed.") or path == "train.seed":
            continue
        section, name = path.split(".")
        tree.setdefault(section, {})[name] = NUMERIC_BOUNDS[path][1]
    tree["train"]["learning_rate"] = 0.5
    tree["data"]["validation_split"] = 0.5
    tree["lora"]["dropout"] = 0.5
    tree["train"]["warmup_ratio"] = 0.5
    tree["ptuning"]["num_virtual_tokens"] = 512
    config = config_from_dict(tree)
    assert config_to_spec(config).ByteSize() > 0


# -- item 4: override keys -----------------------------------------------------------------------------

BYPASSES = [
    " output.version",
    "output.version ",
    "\toutput.version",
    "output.version\n",
    "OUTPUT.version",
    "Output.Version",
    "output..version",
    ".output.version",
    "output.version.",
    "output .version",
    "\u043eutput.version",  # Cyrillic o
    "ｏutput.version",  # fullwidth o
    "output.version\u200b",  # zero-width space
    "output.versi\u043en",
    "output",
    "distributed",
    "distributed.master_addr=evil.example",
    "distributed.master_port=1",
    "distributed.node_rank",
    "distributed.master_addr",
    "output.run_dir",
    "output.adapters_root",
    "output.version",
    "lora.target_modules.0",
    "lora.target_modules[0]",
    "lora.rank.extra",
    "",
    ".",
    "=",
    "train",
    "x" * 10_000,
]


@pytest.mark.parametrize("key", BYPASSES, ids=[repr(k)[:40] for k in BYPASSES])
def test_crafted_override_key_is_refused(key: str) -> None:
    value = "{master_addr: evil.example, version: 7}" if key in ("distributed", "output") else "7"
    request = JobRequest(config={k: dict(v) for k, v in GOOD.items()}, overrides={key: value})
    with pytest.raises(ConfigError) as info:
        request_to_config(request, SERVER)
    fields = [p.field for p in info.value.problems]
    assert len(fields) == 1 and fields[0].startswith("spec.overrides["), fields
    assert len(fields[0]) < 120


def test_every_server_owned_key_is_refused_and_known_keys_pass() -> None:
    assert {"output.version", "output.run_dir", "distributed.master_addr"} <= set(SERVER_OWNED)
    for key in SERVER_OWNED:
        request = JobRequest(config=dict(GOOD), overrides={key: "1"})
        with pytest.raises(ConfigError, match="set by the server"):
            request_to_config(request, SERVER)
    request = JobRequest(config=dict(GOOD), overrides={"lora.rank": "4", "method": "freeze"})
    config = request_to_config(request, SERVER)
    assert (config.lora.rank, config.method, config.output.run_dir) == (4, "freeze", SERVER["output.run_dir"])


def test_override_keys_are_exactly_the_leaf_fields() -> None:
    assert sorted(OVERRIDE_KEYS) == sorted(path for path, _ in LEAVES)


@pytest.mark.parametrize(
    "items,text",
    [
        (["lora.rank =4"], "must be a known"),
        (["lora.rank=4", "lora.rank=8"], "given more than once"),
        (["lora=4"], "must name a field"),
        (["lora.rnak=4"], "unknown field"),
        (["colour.red=4"], "unknown section"),
    ],
)
def test_cli_overrides_are_parsed_strictly(items: list[str], text: str) -> None:
    with pytest.raises(ConfigError, match=text):
        apply_overrides({}, items)


# -- item 4: what is stored survives a read ----------------------------------------------------------


def test_accepted_request_round_trips_through_the_store_and_the_proto() -> None:
    request = JobRequest(
        config={k: dict(v) for k, v in GOOD.items()},
        overrides={"train.seed": str(2**31 - 1), "lora.alpha": "1e3"},
        resources=ResourceRequest(cpu="2", memory="4Gi"),
    )
    config = request_to_config(request, SERVER)
    assert config.train.seed == 2**31 - 1
    spec = spec_from_request(JobRequest.from_dict(request.to_dict()))
    assert spec.overrides["train.seed"] == str(2**31 - 1)
    assert config_to_spec(config).hyperparameters.seed == 2**31 - 1


# -- item 5: YAML bombs --------------------------------------------------------------------------------


def _billion_laughs(levels: int = 9) -> str:
    lines = ["{a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return ", ".join(lines) + "}"


def test_alias_bomb_in_an_override_value_is_refused_quickly() -> None:
    bomb = _billion_laughs()
    assert len(bomb) < 600
    request = JobRequest(config=dict(GOOD), overrides={"data.system": bomb})
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        request_to_config(request, SERVER)
    assert time.perf_counter() - started < 2.0
    (problem,) = info.value.problems
    assert problem.field == "spec.overrides['data.system']"
    assert "anchors and aliases" in problem.message


def test_alias_bomb_in_a_config_file_is_refused(tmp_path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text("data: {train_file: x.jsonl}\nbomb: " + _billion_laughs() + "\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(path)
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize("value", ["[" * 3000, "{a: " * 3000, "- " * 3000])
def test_deeply_nested_override_value_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [f"data.system={value}"])
    assert info.value.problems[0].field == "data.system"


def test_override_size_and_count_are_bounded() -> None:
    with pytest.raises(ConfigError, match=f"at most {MAX_OVERRIDE_VALUE_CHARS}"):
        apply_overrides({}, ["data.system=" + "x" * (MAX_OVERRIDE_VALUE_CHARS + 1)])
    many = {key: "1" for key in sorted(OVERRIDE_KEYS)[: MAX_OVERRIDES + 1]}
    if len(many) <= MAX_OVERRIDES:
        many.update({f"x{i}.y": "1" for i in range(MAX_OVERRIDES + 1)})
    with pytest.raises(ConfigError) as info:
        request_to_config(JobRequest(config=dict(GOOD), overrides=many), SERVER)
    assert any(p.field == "spec.overrides" for p in info.value.problems)


def test_unsafe_tags_stay_text() -> None:
    raw = "!!python/object/apply:os.system ['true']"
    assert apply_overrides({}, [f"data.system={raw}"]) == {"data": {"system": raw}}


@pytest.mark.parametrize(
    "item",
    [
        "lora.target_modules=[0x" + "f" * 4000 + "]",
        "data.system=[[0x" + "f" * 4000 + "]]",
        "lora.rank=0x" + "f" * 4000,
    ],
)
def test_integer_too_long_to_print_is_refused(item: str) -> None:
    tree = apply_overrides({"data": {"train_file": "x.jsonl"}}, [item])
    with pytest.raises(ConfigError) as info:
        config_from_dict(tree)
    assert "bits>" in str(info.value) or "too long to show" in str(info.value)


def test_the_resolved_config_the_trainer_writes_loads_back(tmp_path) -> None:
    # The manager writes the accepted config with yaml.safe_dump; the recipe reads it with load_config.
    config = config_from_dict(_with("lora.target_modules", ["q_proj", "v_proj"]))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    assert load_config(path) == config
