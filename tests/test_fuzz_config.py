"""Property-based fuzzing of run configs, overrides and job validation (issue 16).

Inputs: arbitrary override items (known keys, near-miss spellings, any text; values that are text,
numbers, YAML collections, anchors and aliases, deep nesting), arbitrary config trees, and job
requests whose typed fields carry any value their proto type allows (NaN, infinities, int32 extremes,
odd unicode) beside arbitrary overrides and resources.

The properties, for every input:
- the entry point either accepts, and then what it accepted is storable (strict JSON) and converts
  into a ``JobSpec``, or raises a ``ConfigError`` with at least one field problem; nothing else
  escapes;
- every problem renders in bounded size whatever the input;
- each input is handled within the deadline (an exponential blow-up trips it).
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lorafleet.config import OVERRIDE_KEYS, RunConfig, apply_overrides, config_from_dict
from lorafleet.errors import ConfigError
from lorafleet.v1 import trainer_pb2 as pb
from services.trainer.jobspec import (
    SPEC_FIELD_FOR,
    config_to_spec,
    request_to_config,
    spec_from_request,
)
from services.trainer.launchers.base import Capacity
from services.trainer.store import JobRequest, ResourceRequest
from services.trainer.validation import validate_submission

_MAX_PROBLEM_CHARS = 1500
_SETTINGS = settings(
    max_examples=150,
    deadline=2000,  # ms per input; validation is linear, so this only trips on a blow-up
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    derandomize=True,
)
SERVER = {"output.run_dir": "/srv/runs/j1/run", "output.adapters_root": "/srv/adapters"}
KEYS = sorted(OVERRIDE_KEYS)

_ODD = "\u2028\x85\x00\ufeff\u200b\u202e\u0301\U0001f600\ud800\u043e\uff4f"
short_odd_text = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.sampled_from([*_ODD, "a", " ", ".", "=", "&a", "*a", "[", "{", ":", "-", "0x"]), max_size=30
    ).map("".join),
)
odd_text = st.one_of(short_odd_text, st.builds(lambda n: "x" * n, st.integers(250, 6000)))
numbers_text = st.one_of(
    st.integers().map(str),
    st.floats().map(repr),
    st.sampled_from(
        [
            "1e9",
            "inf",
            "-inf",
            ".inf",
            ".nan",
            "nan",
            "1.0e999",
            "2147483648",
            "-2147483649",
            "0x" + "f" * 3000,
        ]
    ),
)
yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), short_odd_text),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
_BOMB = "{a: &a [x, x, x, x, x, x, x, x], b: &b [*a, *a, *a, *a, *a, *a, *a, *a], c: [*b, *b, *b, *b, *b, *b, *b]}"
value_text = st.one_of(
    odd_text,
    numbers_text,
    yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True, allow_unicode=True).strip()),
    st.sampled_from(
        [_BOMB, "[" * 500, "{a: " * 400, "&x 1", "*x", "!!python/name:os.system", "a: b: c", "[1, 2"]
    ),
)


def _near_miss(key: str) -> st.SearchStrategy[str]:
    return st.sampled_from(
        [
            f" {key}",
            f"{key} ",
            key.upper(),
            key.replace(".", ".."),
            f".{key}",
            f"{key}.",
            f"{key}.0",
            f"{key}=x",
        ]
    )


keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).flatmap(_near_miss), odd_text)
# Mostly-valid overrides, so that acceptance (and what is stored then) is explored too.
plausible_value = st.one_of(
    st.integers(0, 5000).map(str),
    st.floats(0, 2).map(repr),
    st.sampled_from(
        ["true", "false", "auto", "lora", "freeze", "[q_proj, v_proj]", "all-linear", "cosine", "bf16"]
    ),
)
_PLAIN_KEYS = [k for k in KEYS if not k.startswith(("output.", "distributed.master", "distributed.node"))]
overrides = st.one_of(
    st.dictionaries(keys, value_text, max_size=6),
    st.dictionaries(st.sampled_from(_PLAIN_KEYS), plausible_value, max_size=4),
)


def _check_refusal(err: ConfigError) -> None:
    assert err.problems, err.reason
    for problem in err.problems:
        assert isinstance(problem.field, str) and problem.field
        assert len(str(problem)) < _MAX_PROBLEM_CHARS, str(problem)[:200]


def _check_accepted(config: RunConfig) -> None:
    json.dumps(config.to_dict(), allow_nan=False).encode("utf-8")
    yaml.safe_dump(config.to_dict(), allow_unicode=True).encode("utf-8")
    config_to_spec(config).SerializeToString()


@_SETTINGS
@given(
    items=st.one_of(
        st.lists(st.tuples(keys, value_text).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=6),
        overrides.map(lambda o: [f"{k}={v}" for k, v in o.items()]),
    )
)
def test_cli_overrides_accept_or_name_the_field(items: list[str]) -> None:
    tree: dict[str, Any] = {"data": {"train_file": "x.jsonl"}}
    try:
        config = config_from_dict(apply_overrides(tree, items))
    except ConfigError as e:
        event("refused")
        _check_refusal(e)
        return
    event("accepted")
    _check_accepted(config)


@_SETTINGS
@given(
    tree=st.dictionaries(
        st.sampled_from([*{k.partition(".")[0] for k in KEYS}, "x"]), yaml_values, max_size=5
    )
)
def test_config_trees_accept_or_name_the_field(tree: dict[str, Any]) -> None:
    try:
        config = config_from_dict(tree)
    except ConfigError as e:
        _check_refusal(e)
        return
    _check_accepted(config)


def _typed_value(field: Any) -> st.SearchStrategy[Any]:
    """Any value the proto field's type can carry."""
    d = field
    if d.type in (d.TYPE_INT32, d.TYPE_SINT32):
        scalar: st.SearchStrategy[Any] = st.one_of(
            st.integers(-(2**31), 2**31 - 1),
            st.sampled_from([0, -1, 2**31 - 1, -(2**31)]),
            st.integers(0, 64),
        )
    elif d.type == d.TYPE_DOUBLE:
        scalar = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1))
    elif d.type == d.TYPE_BOOL:
        scalar = st.booleans()
    else:
        scalar = odd_text.filter(lambda s: "\ud800" not in s)  # protobuf strings are valid UTF-8
    return st.lists(scalar, max_size=3) if d.is_repeated else scalar


def _spec_descriptor(spec_path: str) -> Any:
    _, msg, name = spec_path.split(".")
    message = getattr(pb, pb.JobSpec.DESCRIPTOR.fields_by_name[msg].message_type.name)
    return message.DESCRIPTOR.fields_by_name[name]


TYPED = {cfg: _spec_descriptor(spec) for cfg, spec in SPEC_FIELD_FOR.items() if spec.count(".") == 2}


@st.composite
def requests(draw: st.DrawFn, train_file: str = "x.jsonl") -> JobRequest:
    config: dict[str, Any] = {"model": {"name_or_path": "org/model"}, "data": {"train_file": train_file}}
    for path in draw(st.lists(st.sampled_from(sorted(TYPED)), max_size=6, unique=True)):
        section, name = path.split(".")
        config.setdefault(section, {})[name] = draw(_typed_value(TYPED[path]))
    quantity = st.one_of(
        st.none(), st.sampled_from(["8", "500m", "64Gi"]), odd_text.filter(lambda s: "\ud800" not in s)
    )
    return JobRequest(
        config=config,
        overrides=draw(overrides.map(lambda o: {k: v for k, v in o.items() if "\ud800" not in k + v})),
        resources=ResourceRequest(
            gpus_per_node=draw(st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1))),
            cpu=draw(quantity),
            memory=draw(quantity),
        ),
        max_attempts=draw(st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1))),
    )


@_SETTINGS
@given(request=requests())
def test_job_requests_accept_or_name_the_field(request: JobRequest) -> None:
    try:
        config = request_to_config(request, SERVER)
    except ConfigError as e:
        event("refused")
        _check_refusal(e)
        return
    event("accepted")
    _check_accepted(config)
    assert config.output.run_dir == SERVER["output.run_dir"]
    spec_from_request(JobRequest.from_dict(json.loads(json.dumps(request.to_dict(), allow_nan=False))))


@_SETTINGS
@given(data=st.data())
def test_validate_submission_accepts_or_names_the_field(tmp_path_factory: Any, data: st.DataObject) -> None:
    train_file = tmp_path_factory.getbasetemp() / "fuzz_config_train.jsonl"
    if not train_file.exists():
        train_file.write_text('{"input": "q", "target": "a"}\n', encoding="utf-8")
    request = data.draw(requests(str(train_file)))
    try:
        accepted = validate_submission(request, Capacity(max_gpus_per_node=1), SERVER, check_memory=False)
    except ConfigError as e:
        event("refused")
        _check_refusal(e)
        return
    event("accepted")
    _check_accepted(accepted.config)
    assert accepted.config.output.run_dir == SERVER["output.run_dir"]
    assert accepted.config.distributed.master_addr == "127.0.0.1"
    assert accepted.config.output.version == "auto"
