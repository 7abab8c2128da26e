"""The trainer API's ``JobSpec`` and the recipe's ``RunConfig``: one mapping, both directions.

The service turns a submitted spec into a run config (``spec_to_config``) and reports config problems
under the *spec's* field names (``spec.hyperparameters.learning_rate``, not ``train.learning_rate``),
so a client sees the names it sent. The CLI turns a YAML run config into a spec (``config_to_spec``),
so ``lorafleet submit examples/lora.yaml`` submits exactly what ``lorafleet train`` would run.

Fields the server owns (where runs and adapters live, rendezvous addresses) cannot be set by a client.
"""

from __future__ import annotations

from typing import Any

from lorafleet.config import RunConfig, _parse_override, _set_path, config_from_dict
from lorafleet.errors import ConfigError, FieldProblem
from lorafleet.v1 import trainer_pb2 as pb

# (spec message field, config section): fields with the same name on both sides.
_SECTIONS: list[tuple[str, str]] = [
    ("model", "model"),
    ("dataset", "data"),
    ("lora", "lora"),
    ("freeze", "freeze"),
    ("ptuning", "ptuning"),
    ("hyperparameters", "train"),
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
# Config keys only the server sets.
SERVER_OWNED = (
    "output.run_dir",
    "output.adapters_root",
    "output.version",
    "distributed.node_rank",
    "distributed.master_addr",
    "distributed.master_port",
)
# A list field where one of these words alone means the config's string form.
_LIST_KEYWORDS = {"target_modules": ("auto", "all-linear")}


def _config_to_spec_paths() -> dict[str, str]:
    paths: dict[str, str] = {}
    for msg, section in _SECTIONS:
        for f in getattr(pb, pb.JobSpec.DESCRIPTOR.fields_by_name[msg].message_type.name).DESCRIPTOR.fields:
            paths[f"{section}.{f.name}"] = f"spec.{msg}.{f.name}"
    for (msg, name), cfg in _RENAMED.items():
        paths[cfg] = f"spec.{msg}.{name}"
    paths["method"] = "spec.method"
    paths["output.adapter_name"] = "spec.adapter_name"
    return paths


SPEC_FIELD_FOR = _config_to_spec_paths()
"""Config path -> spec field path, for error messages."""


def spec_field(config_path: str) -> str:
    """The spec field a config path comes from (``spec.overrides[...]`` when it has no typed field)."""
    return SPEC_FIELD_FOR.get(config_path, f"spec.overrides[{config_path!r}]")


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


def spec_to_tree(spec: pb.JobSpec) -> dict[str, Any]:
    """The nested config mapping a spec describes (only what the client set; no server fields)."""
    tree: dict[str, Any] = {}
    for msg, section in _SECTIONS:
        if spec.HasField(msg):
            values = _message_values(getattr(spec, msg))
            if values:
                tree[section] = values
    for (msg, name), cfg in _RENAMED.items():
        sub = getattr(spec, msg)
        if spec.HasField(msg) and sub.HasField(name):
            _set_path(tree, cfg.split("."), getattr(sub, name))
    resources = spec.resources
    if resources.HasField("gpus_per_node") and not resources.HasField("processes_per_node"):
        # One process per GPU unless the client says otherwise.
        _set_path(tree, ["distributed", "nproc_per_node"], max(1, resources.gpus_per_node))
    if spec.method:
        tree["method"] = spec.method
    if spec.adapter_name:
        _set_path(tree, ["output", "adapter_name"], spec.adapter_name)
    return tree


def spec_to_config(spec: pb.JobSpec, server: dict[str, Any] | None = None) -> RunConfig:
    """Build and validate the run config of a spec, with the server's own settings applied last.

    Args:
        spec: the submitted spec.
        server: config paths the server sets (``output.run_dir`` ...), e.g.
            ``{"output.run_dir": "/runs/j1/run", "output.adapters_root": "/adapters"}``.

    Raises:
        ConfigError: every problem, each under the spec field the client used.
    """
    problems: list[FieldProblem] = []
    if not spec.model.name_or_path:
        problems.append(
            FieldProblem("spec.model.name_or_path", "", "required: a local model directory or a hub id")
        )
    if not spec.dataset.train_file:
        problems.append(FieldProblem("spec.dataset.train_file", "", "required: a JSON or JSONL file"))
    tree = spec_to_tree(spec)
    for key, raw in sorted(spec.overrides.items()):
        field = f"spec.overrides[{key!r}]"
        if key in SERVER_OWNED or (key.split(".")[0] == "output" and key != "output.adapter_name"):
            problems.append(FieldProblem(field, raw, "set by the server, not by a job"))
            continue
        try:
            path, value = _parse_override(f"{key}={raw}")
        except ConfigError as e:
            problems += [FieldProblem(field, raw, p.message) for p in e.problems]
            continue
        _set_path(tree, path, value)
    for key, value in (server or {}).items():
        _set_path(tree, key.split("."), value)
    try:
        config = config_from_dict(tree)
    except ConfigError as e:
        problems += [FieldProblem(spec_field(p.field), p.value, p.message) for p in e.problems]
    if problems:
        raise ConfigError(problems, context="invalid job spec")
    return config


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
    spec = pb.JobSpec(method=config.method, adapter_name=config.output.adapter_name)
    for msg, section in _SECTIONS:
        _set_message(getattr(spec, msg), tree[section])
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
    """One line for listings: method, model, dataset."""
    return f"{spec.method or 'lora'} {spec.model.name_or_path} <- {spec.dataset.train_file}"


__all__ = [
    "SERVER_OWNED",
    "config_to_spec",
    "spec_field",
    "spec_summary",
    "spec_to_config",
    "spec_to_tree",
]
