"""Everything checked before a job is accepted: nothing runs on a spec that would fail for a known reason.

One ``ConfigError`` lists every problem by spec field, so a client fixes its spec in one round trip.
Checks, cheapest first: the spec maps to a valid run config (types, ranges, method options together,
the stage and its preference options); the adapter name is safe; a preference stage sets only the
options it reads, and the SFT adapter it starts from is a published LoRA adapter of the same base; the model is an existing directory or a well-formed hub id, and remote code
only for allow-listed models; resources fit the launcher; the datasets exist and pass the core's
row validation (first bad rows quoted); the memory estimate fits a process's memory; the artifact the
run would publish is one the inference service serves (``lorafleet.method_specs.serving_problems``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet import adapters, data
from lorafleet.adapters import validate_adapter_name
from lorafleet.config import RunConfig
from lorafleet.errors import (
    AdapterNotFoundError,
    ConfigError,
    DatasetError,
    FieldProblem,
    LorafleetError,
    ModelLoadError,
)
from lorafleet.memory import MemoryEstimate
from lorafleet.method_specs import ARTIFACT_LORA, PREFERENCE_STAGES, STAGE_OPTIONS, serving_problems
from services.trainer.jobspec import request_to_config, spec_field, spec_from_request
from services.trainer.launchers.base import Capacity
from services.trainer.store import JobRequest

_GIB = 1024**3
_QUANTITY_RE = re.compile(r"[0-9]{1,12}(\.[0-9]{1,6})?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
"""A Kubernetes resource quantity in the forms a job asks for (``8``, ``500m``, ``64Gi``)."""


@dataclass
class Accepted:
    config: RunConfig
    estimate: MemoryEstimate | None


def _check_resources(
    request: JobRequest, config: RunConfig, cap: Capacity, problems: list[FieldProblem]
) -> None:
    d, gpus = config.distributed, request.resources.gpus_per_node
    if d.nnodes > cap.max_nodes:
        problems.append(
            FieldProblem(
                "spec.resources.nodes",
                d.nnodes,
                f"this launcher runs at most {cap.max_nodes} node(s) per job",
            )
        )
    if d.nproc_per_node > cap.max_processes_per_node:
        problems.append(
            FieldProblem(
                "spec.resources.processes_per_node",
                d.nproc_per_node,
                f"at most {cap.max_processes_per_node} process(es) per node here",
            )
        )
    if gpus is not None:
        if gpus < 0 or gpus > cap.max_gpus_per_node:
            problems.append(
                FieldProblem(
                    "spec.resources.gpus_per_node",
                    gpus,
                    f"must be in [0, {cap.max_gpus_per_node}] on this launcher",
                )
            )
        elif gpus and d.nproc_per_node != gpus:
            problems.append(
                FieldProblem(
                    "spec.resources.processes_per_node",
                    d.nproc_per_node,
                    f"must equal gpus_per_node ({gpus}): one process per GPU",
                )
            )


def _check_model(config: RunConfig, allow: list[str], problems: list[FieldProblem]) -> bool:
    from lorafleet.models import _is_local

    name = config.model.name_or_path
    try:
        _is_local(name)
    except ModelLoadError as e:
        problems.append(FieldProblem("spec.model.name_or_path", name, e.reason.split(": ", 1)[-1]))
        return False
    except (OSError, ValueError):  # a name the OS refuses, e.g. a component over NAME_MAX
        problems.append(FieldProblem("spec.model.name_or_path", name, "not a usable path or hub id"))
        return False
    if config.model.trust_remote_code and not _remote_code_allowed(name, allow):
        problems.append(
            FieldProblem(
                "spec.model.trust_remote_code",
                True,
                f"remote code is not allowed for {name!r}: the server's allow-list is "
                f"{allow or 'empty'} (--allow-remote-code)",
            )
        )
    return True


def _remote_code_allowed(name: str, allow: list[str]) -> bool:
    """An allow-list entry matches the hub id, a path, or a prefix ending in ``/`` (an organisation)."""
    resolved = str(Path(name).expanduser().resolve()) if Path(name).expanduser().exists() else name
    for entry in allow:
        if entry.endswith("/") and (name.startswith(entry) or resolved.startswith(entry)):
            return True
        if entry in (name, resolved):
            return True
    return False


def _check_data(config: RunConfig, problems: list[FieldProblem]) -> None:
    d = config.data
    for field_name, path in (("train_file", d.train_file), ("validation_file", d.validation_file)):
        if not path:
            continue
        spec_field = f"spec.dataset.{field_name}"
        if not _is_file(path):
            problems.append(FieldProblem(spec_field, path, "file not found on the server"))
            continue
        try:
            if config.stage in PREFERENCE_STAGES:
                _load_preference_rows(path, config)
            else:
                data.load_dataset(path, d)
        except DatasetError as e:
            problems.append(FieldProblem(spec_field, path, e.reason))


def _load_preference_rows(path: str, config: RunConfig) -> None:
    """Read a pairwise (dpo, rm) or KTO file as the recipe will; DatasetError on too many bad rows."""
    from lorafleet.preference_data import load_preference_samples

    samples, bad = load_preference_samples(path, config.preference, config.stage)
    data.check_bad_rows(path, len(samples) + data.count_bad_rows(bad), bad, config.data.max_bad_fraction)


def _check_stage_options(request: JobRequest, config: RunConfig, problems: list[FieldProblem]) -> None:
    """Refuse preference options the stage does not read: a client that sets one expects it to act."""
    used = STAGE_OPTIONS.get(config.stage, ())
    typed = request.config.get("preference") or {}
    given = [(spec_field(f"preference.{name}"), name, value) for name, value in typed.items()]
    given += [
        (f"spec.overrides[{key!r}]", key.removeprefix("preference."), value)
        for key, value in request.overrides.items()
        if key.startswith("preference.")
    ]
    for field, name, value in sorted(given, key=lambda g: g[0]):
        if name in used:
            continue
        readers = [stage for stage, names in STAGE_OPTIONS.items() if name in names]
        problems.append(
            FieldProblem(
                field, value, f"stage {config.stage} does not use it; it applies to stage(s) {readers}"
            )
        )


def _check_sft_adapter(config: RunConfig, model_ok: bool, problems: list[FieldProblem]) -> None:
    """``preference.sft_adapter`` names a published LoRA adapter of this base, in the adapters root."""
    from lorafleet.models import base_model_fingerprint, fingerprints_match

    ref = config.preference.sft_adapter
    if not ref or "sft_adapter" not in STAGE_OPTIONS.get(config.stage, ()):
        return
    field = "spec.preference.sft_adapter"
    try:
        name, version = adapters.parse_adapter_ref(ref)
        published = adapters.get_adapter(config.output.adapters_root, name, version)
    except AdapterNotFoundError as e:
        problems.append(FieldProblem(field, ref, f"not published here: {e.reason}"))
        return
    except LorafleetError as e:
        problems.append(FieldProblem(field, ref, e.reason))
        return
    if published.manifest.kind != ARTIFACT_LORA:
        problems.append(
            FieldProblem(field, ref, f"is a {published.manifest.kind} artifact, not a LoRA adapter")
        )
        return
    if not model_ok:
        return
    try:
        expected = base_model_fingerprint(config.model.name_or_path, config.model.revision)
    except (LorafleetError, OSError):
        return  # the model's own check names what is wrong with it
    if not fingerprints_match(published.manifest.base_model, expected):
        problems.append(
            FieldProblem(field, ref, f"was trained on another base than {config.model.name_or_path!r}")
        )


def _is_file(path: str) -> bool:
    """Whether ``path`` is a file; False for names the OS refuses (a component over NAME_MAX)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _check_quantities(request: JobRequest, problems: list[FieldProblem]) -> None:
    for name in ("cpu", "memory"):
        value = getattr(request.resources, name)
        if value is not None and not (isinstance(value, str) and _QUANTITY_RE.fullmatch(value)):
            message = "must be a Kubernetes quantity such as 8, 500m or 64Gi"
            problems.append(FieldProblem(f"spec.resources.{name}", value, message))


def _check_storable(request: JobRequest, config: RunConfig, problems: list[FieldProblem]) -> None:
    """What is accepted must survive the store (strict JSON, UTF-8) and every read back into a proto."""
    try:
        json.dumps(request.to_dict(), allow_nan=False).encode("utf-8")
        json.dumps(config.to_dict(), allow_nan=False).encode("utf-8")
        spec_from_request(JobRequest.from_dict(request.to_dict())).SerializeToString()
    except (ValueError, TypeError, OverflowError) as e:  # UnicodeEncodeError is a ValueError
        problems.append(FieldProblem("spec", type(e).__name__, f"cannot be stored and read back: {e}"))


def _check_memory(config: RunConfig, cap: Capacity, problems: list[FieldProblem]) -> MemoryEstimate | None:
    from lorafleet.estimate import estimate_for_config

    try:
        estimate = estimate_for_config(config)
    except ConfigError as e:  # e.g. target modules the model does not have
        problems += [FieldProblem(spec_field(p.field), p.value, p.message) for p in e.problems]
        return None
    except (LorafleetError, OSError, ValueError) as e:
        reason = e.reason if isinstance(e, LorafleetError) else str(e)
        problems.append(
            FieldProblem(
                "spec.model.name_or_path",
                config.model.name_or_path,
                f"cannot read the model config to estimate memory: {reason}",
            )
        )
        return None
    if cap.memory_bytes_per_process and estimate.device_total_bytes > cap.memory_bytes_per_process:
        problems.append(
            FieldProblem(
                "spec.hyperparameters.per_device_batch_size",
                config.train.per_device_batch_size,
                f"the run needs about {estimate.device_total_bytes / _GIB:.1f} GiB per process, over the "
                f"{cap.memory_bytes_per_process / _GIB:.1f} GiB available; lower the batch size or sequence "
                "lengths, use qlora, gradient checkpointing or ZeRO-3 offload",
            )
        )
    return estimate


def validate_submission(
    request: JobRequest,
    capacity: Capacity,
    server_fields: dict[str, Any],
    remote_code_allow: list[str] | None = None,
    check_memory: bool = True,
) -> Accepted:
    """Accept ``request`` or raise one ``ConfigError`` listing every problem found.

    Args:
        request: what the client asked for.
        capacity: the launcher's limits.
        server_fields: run-config paths the server sets (run dir, adapters root).
        remote_code_allow: models that may use ``trust_remote_code``.
        check_memory: estimate memory and refuse runs that cannot fit.
    """
    problems: list[FieldProblem] = []
    adapter_name = request.config.get("output", {}).get("adapter_name", "")
    if adapter_name:
        try:
            validate_adapter_name(adapter_name)
        except LorafleetError as e:
            problems.append(FieldProblem("spec.adapter_name", adapter_name, e.reason.split(": ", 1)[-1]))
    if request.max_attempts is not None and not 1 <= request.max_attempts <= 20:
        problems.append(FieldProblem("spec.max_attempts", request.max_attempts, "must be in [1, 20]"))
    _check_quantities(request, problems)
    resume = request.overrides.get("train.resume", request.config.get("train", {}).get("resume"))
    if isinstance(resume, str) and resume.strip() not in ("auto", "never"):
        # Checked before the config is built, whose own check would stat the path: a job resumes from
        # its own run's checkpoints (retries do by themselves), never from a path a client names.
        problems.append(
            FieldProblem("spec.overrides['train.resume']", resume, "a job may only say auto or never")
        )
        raise ConfigError(problems, context="invalid job spec")
    try:
        config = request_to_config(request, server_fields)
    except ConfigError as e:
        # The name's own check already said it; don't say it twice.
        named = {p.field for p in problems}
        problems += [p for p in e.problems if p.field not in named]
        raise ConfigError(problems, context="invalid job spec") from None
    _check_storable(request, config, problems)
    # What the inference service cannot serve is refused now, not trained and refused at serving.
    problems += [FieldProblem(spec_field(p.field), p.value, p.message) for p in serving_problems(config)]
    if problems:
        raise ConfigError(problems, context="invalid job spec")
    _check_resources(request, config, capacity, problems)
    _check_stage_options(request, config, problems)
    model_ok = _check_model(config, remote_code_allow or [], problems)
    _check_sft_adapter(config, model_ok, problems)
    _check_data(config, problems)
    estimate = None
    if model_ok and check_memory and not problems and Path(config.model.name_or_path).expanduser().is_dir():
        estimate = _check_memory(config, capacity, problems)
    if problems:
        raise ConfigError(problems, context="invalid job spec")
    return Accepted(config, estimate)
