"""The trainer API's ``JobSpec``, the plain ``JobRequest`` and the recipe's ``RunConfig``: one mapping.

The servicer turns a submitted spec into a plain request (``request_from_spec``) and back
(``spec_from_request``); the manager turns a request into a run config (``request_to_config``), which
reports config problems under the *spec's* field names (``spec.hyperparameters.learning_rate``, not
``train.learning_rate``), so a client sees the names it sent. The CLI turns a YAML run config into a spec (``config_to_spec``),
so ``lorafleet submit examples/lora.yaml`` submits exactly what ``lorafleet train`` would run.

Fields the server owns (where runs and adapters live, rendezvous addresses) cannot be set by a client.
"""

from __future__ import annotations

import copy
from typing import Any

from lorafleet.config import (
    MAX_OVERRIDES,
    RunConfig,
    check_override_key,
    config_from_dict,
    parse_override_value,
    set_override,
)
from lorafleet.errors import ConfigError, FieldProblem
from lorafleet.method_specs import STAGE_OPTIONS
from lorafleet.v1 import trainer_pb2 as pb
from services.trainer.store import JobRequest, ResourceRequest

# (spec message field, config section): fields with the same name on both sides.
_SECTIONS: list[tuple[str, str]] = [
    ("model", "model"),
    ("dataset", "data"),
    ("lora", "lora"),
    ("freeze", "freeze"),
    ("ptuning", "ptuning"),
    ("hyperparameters", "train"),
    ("preference", "preference"),
]
# Spec fields whose config name differs: (spec message, spec field) -> config path.
_RENAMED: dict[tuple[str, str], str] = {
    ("deepspeed", "zero_stage"): "distributed.deepspeed_stage",
    ("deepspeed", "offload_optimizer"): "distributed.offload_optimizer",
    ("deepspeed", "offload_param"): "distributed.offload_param",
    ("deepspeed", "launcher"): "distributed.launcher",
    ("resources", "nodes"): "distributed.nnodes",
    ("resources", "processes_per_node"): "distributed.nproc_per_node",
}
SERVER_OWNED = (
    "output.run_dir",
    "output.adapters_root",
    "output.version",
    "distributed.node_rank",
    "distributed.master_addr",
    "distributed.master_port",
)
"""Config keys only the server sets. Override keys are checked by ``check_override_key`` first, which
accepts exactly one spelling of each field, so comparing with this tuple cannot be sidestepped."""
_TOP_LEVEL = ("method", "stage")
"""Scalar spec fields that are run-config keys of the same name; empty = the recipe's default."""
# A list field where one of these words alone means the config's string form.
_LIST_KEYWORDS = {"target_modules": ("auto", "all-linear")}


def _config_to_spec_paths() -> dict[str, str]:
    paths: dict[str, str] = {}
    for msg, section in _SECTIONS:
        for f in getattr(pb, pb.JobSpec.DESCRIPTOR.fields_by_name[msg].message_type.name).DESCRIPTOR.fields:
            paths[f"{section}.{f.name}"] = f"spec.{msg}.{f.name}"
    for (msg, name), cfg in _RENAMED.items():
        paths[cfg] = f"spec.{msg}.{name}"
    for name in _TOP_LEVEL:
        paths[name] = f"spec.{name}"
    paths["output.adapter_name"] = "spec.adapter_name"
    return paths


SPEC_FIELD_FOR = _config_to_spec_paths()
"""Config path -> spec field path, for error messages."""


def spec_field(config_path: str) -> str:
    """The spec field a config path comes from (``spec.overrides[...]`` when it has no typed field)."""
    return SPEC_FIELD_FOR.get(config_path) or _override_field(config_path)


def _override_field(key: str) -> str:
    """``spec.overrides['key']``, the key shortened so that an echoed field name stays small."""
    text = repr(key)
    return f"spec.overrides[{text if len(text) <= 64 else text[:60] + '...' + text[0]}]"


def _message_values(message: Any) -> dict[str, Any]:
    """The fields a client set: optional scalars that are present, non-empty repeated fields."""
    out: dict[str, Any] = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        if f.is_repeated:
            if len(value):
                items = list(value)
                keywords = _LIST_KEYWORDS.get(f.name, ())
                out[f.name] = items[0] if len(items) == 1 and items[0] in keywords else items
        elif f.has_presence:
            if message.HasField(f.name):
                out[f.name] = value
        elif value:
            out[f.name] = value
    return out


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, name = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[name] = value


def _get_path(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def request_from_spec(spec: pb.JobSpec) -> JobRequest:
    """The plain request a spec describes: only what the client set, nothing validated yet."""
    tree: dict[str, Any] = {}
    for msg, section in _SECTIONS:
        if spec.HasField(msg):
            values = _message_values(getattr(spec, msg))
            if values:
                tree[section] = values
    for (msg, name), cfg in _RENAMED.items():
        sub = getattr(spec, msg)
        if spec.HasField(msg) and sub.HasField(name):
            _set_path(tree, cfg, getattr(sub, name))
    for name in _TOP_LEVEL:
        if getattr(spec, name):
            tree[name] = getattr(spec, name)
    if spec.adapter_name:
        _set_path(tree, "output.adapter_name", spec.adapter_name)
    r = spec.resources
    resources = ResourceRequest(
        gpus_per_node=r.gpus_per_node if r.HasField("gpus_per_node") else None,
        cpu=r.cpu if r.HasField("cpu") else None,
        memory=r.memory if r.HasField("memory") else None,
    )
    return JobRequest(
        config=tree,
        overrides=dict(spec.overrides),
        resources=resources,
        max_attempts=spec.max_attempts if spec.HasField("max_attempts") else None,
        labels=dict(spec.labels),
    )


def spec_from_request(request: JobRequest) -> pb.JobSpec:
    """The spec a client sent for ``request`` (the inverse of :func:`request_from_spec`)."""
    tree = request.config
    spec = pb.JobSpec(
        adapter_name=str(_get_path(tree, "output.adapter_name") or ""),
        overrides=request.overrides,
        labels=request.labels,
    )
    for name in _TOP_LEVEL:
        setattr(spec, name, str(tree.get(name, "")))
    for msg, section in _SECTIONS:
        if tree.get(section):
            _set_message(getattr(spec, msg), tree[section])
    for (msg, name), cfg in _RENAMED.items():
        value = _get_path(tree, cfg)
        if value is not None:
            setattr(getattr(spec, msg), name, value)
    r = request.resources
    for name in ("gpus_per_node", "cpu", "memory"):
        if getattr(r, name) is not None:
            setattr(spec.resources, name, getattr(r, name))
    if request.max_attempts is not None:
        spec.max_attempts = request.max_attempts
    return spec


def request_to_config(request: JobRequest, server: dict[str, Any] | None = None) -> RunConfig:
    """Build and validate the run config of a request, with the server's own settings applied last.

    Args:
        request: what the client asked for.
        server: config paths the server sets (``output.run_dir`` ...), e.g.
            ``{"output.run_dir": "/runs/j1/run", "output.adapters_root": "/adapters"}``.

    Raises:
        ConfigError: every problem, each under the spec field the client used.
    """
    problems: list[FieldProblem] = []
    if not _get_path(request.config, "model.name_or_path"):
        problems.append(
            FieldProblem("spec.model.name_or_path", "", "required: a local model directory or a hub id")
        )
    if not _get_path(request.config, "data.train_file"):
        problems.append(FieldProblem("spec.dataset.train_file", "", "required: a JSON or JSONL file"))
    tree = copy.deepcopy(request.config)
    gpus = request.resources.gpus_per_node
    if gpus is not None and _get_path(tree, "distributed.nproc_per_node") is None:
        # One process per GPU unless the client says otherwise.
        _set_path(tree, "distributed.nproc_per_node", max(1, gpus))
    _apply_overrides(tree, request.overrides, problems)
    for key, value in (server or {}).items():
        _set_path(tree, key, value)
    try:
        config = config_from_dict(tree)
    except ConfigError as e:
        problems += [FieldProblem(spec_field(p.field), p.value, p.message) for p in e.problems]
    if problems:
        raise ConfigError(problems, context="invalid job spec")
    return config


def _apply_overrides(tree: dict[str, Any], overrides: dict[str, str], problems: list[FieldProblem]) -> None:
    """Apply a spec's overrides to ``tree``, each key checked strictly and server-owned keys refused."""
    if len(overrides) > MAX_OVERRIDES:
        count = f"<{len(overrides)} overrides>"
        problems.append(FieldProblem("spec.overrides", count, f"at most {MAX_OVERRIDES} overrides"))
        return
    for key, raw in sorted(overrides.items()):
        field = _override_field(key)
        problem = check_override_key(key)
        owned = key in SERVER_OWNED or (key.startswith("output.") and key != "output.adapter_name")
        if problem is None and owned:
            problem = "set by the server, not by a job"
        if problem is not None:
            problems.append(FieldProblem(field, raw, problem))
            continue
        try:
            set_override(tree, key, parse_override_value(key, raw))
        except ConfigError as e:
            problems += [FieldProblem(field, raw, p.message) for p in e.problems]


def _set_message(message: Any, values: dict[str, Any]) -> None:
    for f in message.DESCRIPTOR.fields:
        if f.name not in values or values[f.name] is None:
            continue
        value = values[f.name]
        if f.is_repeated:
            items = [value] if isinstance(value, str) else list(value)
            getattr(message, f.name).extend(str(v) for v in items)
        else:
            setattr(message, f.name, value)


def config_to_spec(config: RunConfig) -> pb.JobSpec:
    """A spec that reproduces ``config`` on the server (server-owned fields left out)."""
    tree = config.to_dict()
    spec = pb.JobSpec(method=config.method, stage=config.stage, adapter_name=config.output.adapter_name)
    for msg, section in _SECTIONS:
        values = tree[section]
        if section == "preference":  # only what the stage reads: the server refuses the others
            values = {k: v for k, v in values.items() if k in STAGE_OPTIONS.get(config.stage, ())}
        _set_message(getattr(spec, msg), values)
    d = config.distributed
    if d.deepspeed_stage >= 0:
        spec.deepspeed.zero_stage = d.deepspeed_stage
    spec.deepspeed.offload_optimizer = d.offload_optimizer
    spec.deepspeed.offload_param = d.offload_param
    spec.deepspeed.launcher = d.launcher
    spec.resources.nodes = d.nnodes
    spec.resources.processes_per_node = d.nproc_per_node
    if d.deepspeed_config:
        spec.overrides["distributed.deepspeed_config"] = d.deepspeed_config
    return spec


def spec_summary(spec: pb.JobSpec) -> str:
    """One line for listings: method (and stage, when not sft), model, dataset."""
    stage = f"/{spec.stage}" if spec.stage and spec.stage != "sft" else ""
    return f"{spec.method or 'lora'}{stage} {spec.model.name_or_path} <- {spec.dataset.train_file}"


__all__ = [
    "SERVER_OWNED",
    "config_to_spec",
    "request_from_spec",
    "request_to_config",
    "spec_field",
    "spec_from_request",
    "spec_summary",
]
