"""Import a PEFT adapter made elsewhere (LLaMA-Factory, axolotl, a PEFT script, a hub snapshot) into
the publish layout, so the inference service serves it like an adapter lorafleet trained.

Run as::

    lorafleet adapters import SRC --name NAME [--base PATH_OR_ID] [--template T] [--root .cache/adapters]

What an import checks, against the base (``--base``, else the adapter's ``base_model_name_or_path``),
before anything is published; every refusal names the field and the value:

- ``adapter_config.json``: ``peft_type`` LORA (plain, DoRA, rsLoRA) or a prompt-learning type
  (PREFIX_TUNING, P_TUNING, PROMPT_TUNING).
- the base: when the recorded ``base_model_name_or_path`` is a local directory here, its weights
  fingerprint (``lorafleet.models.base_model_fingerprint``) must equal the base's; a hub id recorded
  while ``--base`` is a local directory cannot be compared by name, so the structure decides;
- LoRA: every ``target_modules`` entry names a module of the base; every ``lora_A`` ``[r, in]``,
  ``lora_B`` ``[out, r]`` and DoRA ``lora_magnitude_vector`` ``[out]`` fits the module it attaches to,
  with ``r`` equal to the config's ``r`` (or its ``rank_pattern`` entry); a ``modules_to_save`` tensor
  has its base parameter's shape. The base is built on the ``meta`` device from its config, so the
  check reads no base weight and costs milliseconds even for a 70B base;
- prompt learning: ``token_dim`` and ``num_layers`` equal the base's, and ``prompt_embeddings`` holds
  ``num_virtual_tokens * num_transformer_submodules`` rows.

Pickle weights (``adapter_model.bin``) are read with ``torch.load(weights_only=True)``: the
unpickler accepts tensors and plain containers only, so a file whose objects would run code on load
(``__reduce__``) is refused and nothing in it runs. They are written back as
``adapter_model.safetensors``; the served artifact never holds a pickle.

The artifact is staged and published with ``lorafleet.adapters.publish`` (atomic rename, a new
version), with a manifest whose ``source`` records where it came from.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.errors import AdapterImportError, FieldProblem

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
LORA_TYPES = ("LORA",)
PROMPT_TYPES = ("PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING")
"""PEFT prompt-learning types, published as kind ``ptuning``."""
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$"
)
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(\.weight)?$")


@dataclass(frozen=True)
class ImportRequest:
    """One import, as the CLI and the trainer's ``ImportAdapter`` RPC give it."""

    source: str
    """A PEFT adapter directory: ``adapter_config.json`` plus safetensors or pickle weights."""
    name: str
    """The adapter name to publish under (a new version of it)."""
    base: str = ""
    """The base model (local directory or hub id); empty = the adapter's ``base_model_name_or_path``."""
    template: str = ""
    """Prompt template the adapter was trained with; empty = the base family's default."""


def _problem(field: str, value: Any, message: str) -> AdapterImportError:
    return AdapterImportError([FieldProblem(field, value, message)], "cannot import adapter")


def read_adapter_config(source: Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` as a dict.

    Raises:
        AdapterImportError: no directory, no config, or a config that is not a JSON object.
    """
    if not source.is_dir():
        raise _problem("source", str(source), "is not a directory holding a PEFT adapter")
    path = source / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise _problem("source", str(source), f"has no {ADAPTER_CONFIG}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _problem(ADAPTER_CONFIG, str(path), f"is not readable JSON: {e}") from e
    if not isinstance(config, dict):
        raise _problem(ADAPTER_CONFIG, str(path), "must hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type not in (*LORA_TYPES, *PROMPT_TYPES):
        raise _problem(
            f"{ADAPTER_CONFIG}.peft_type", peft_type, f"must be one of {[*LORA_TYPES, *PROMPT_TYPES]}"
        )
    return config


def load_adapter_weights(source: Path) -> tuple[dict[str, Any], str]:
    """The adapter's tensors, without running anything stored in the file.

    Safetensors is read as is. A pickle (``adapter_model.bin``) goes through
    ``torch.load(weights_only=True)``, whose restricted unpickler refuses any global that is not a
    tensor type or a plain container, so a ``__reduce__`` payload is never called.

    Returns:
        ``(state, file_name)``: tensor name -> tensor, and the file they came from.

    Raises:
        AdapterImportError: no weights file, a truncated/corrupt one, a pickle that carries objects
            other than tensors, or a state that is not a flat mapping of names to tensors.
    """
    import torch

    safetensors_path, pickle_path = source / SAFETENSORS_WEIGHTS, source / PICKLE_WEIGHTS
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(safetensors_path))
        except Exception as e:  # safetensors raises SafetensorError, OSError or ValueError
            raise _problem(SAFETENSORS_WEIGHTS, str(safetensors_path), f"is corrupt or truncated: {e}") from e
        file_name = SAFETENSORS_WEIGHTS
    elif pickle_path.is_file():
        try:
            state = torch.load(str(pickle_path), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for a code-carrying file, RuntimeError for a corrupt one
            raise _problem(
                PICKLE_WEIGHTS,
                str(pickle_path),
                f"refused by the weights-only load (it holds something other than tensors, or is corrupt): {e}",
            ) from e
        file_name = PICKLE_WEIGHTS
    else:
        raise _problem("source", str(source), f"has neither {SAFETENSORS_WEIGHTS} nor {PICKLE_WEIGHTS}")
    if not isinstance(state, dict) or not state:
        raise _problem(file_name, type(state).__name__, "must hold a non-empty mapping of names to tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise _problem(
                f"{file_name}[{key!r}]", type(value).__name__, "must be a tensor under a string name"
            )
    return {k: v.contiguous() for k, v in state.items()}, file_name


def meta_base(base: str) -> Any:
    """The base causal LM built on the ``meta`` device from its config: module names and parameter
    shapes, no weight read or allocated.

    Raises:
        ModelLoadError: the base's config cannot be read (``lorafleet.models.load_model_config``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from lorafleet.config import ModelConfig
    from lorafleet.models import load_model_config

    hf_config = load_model_config(ModelConfig(name_or_path=base))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def _rank_for(config: dict[str, Any], module: str) -> int | None:
    """PEFT's rank for ``module``: the ``rank_pattern`` entry whose key matches the module path's
    tail (``(.*\\.)?key$``), else ``r``."""
    for key, value in (config.get("rank_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return int(value)
    rank = config.get("r")
    return rank if isinstance(rank, int) else None


def _target_matches(target: str, names: list[str]) -> bool:
    return any(n == target or n.endswith("." + target) for n in names)


def check_lora(config: dict[str, Any], state: dict[str, Any], base_model: Any) -> list[FieldProblem]:
    """Every way a LoRA / DoRA adapter does not fit the base (see the module docstring).

    Args:
        config: ``adapter_config.json``.
        state: the adapter's tensors (PEFT keys: ``base_model.model.<module>.lora_A.weight`` ...).
        base_model: the base (``meta_base``).

    Returns:
        The problems, empty when the adapter fits.
    """
    import torch

    modules = dict(base_model.named_modules())
    params = dict(base_model.named_parameters())
    names = list(modules)
    problems: list[FieldProblem] = []
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            problems.append(
                FieldProblem(f"{ADAPTER_CONFIG}.target_modules", targets, "matches no module of the base")
            )
    elif isinstance(targets, list):
        missing = [t for t in targets if not _target_matches(str(t), names)]
        if missing:
            problems.append(
                FieldProblem(
                    f"{ADAPTER_CONFIG}.target_modules", missing, "the base has no module of these names"
                )
            )
    lora_tensors = 0
    for key, tensor in state.items():
        inner = key.removeprefix(PEFT_PREFIX)
        lora = _LORA_KEY.match(inner)
        magnitude = _MAGNITUDE_KEY.match(inner)
        if lora is None and magnitude is None:
            base_param = params.get(inner) or params.get(inner.replace(".modules_to_save.", "."))
            if base_param is None:
                problems.append(
                    FieldProblem(f"tensor {key}", list(tensor.shape), "has no parameter of the base")
                )
            elif tuple(base_param.shape) != tuple(tensor.shape):
                problems.append(
                    FieldProblem(
                        f"tensor {key}", list(tensor.shape), f"the base's {inner} is {list(base_param.shape)}"
                    )
                )
            continue
        match = lora or magnitude
        assert match is not None
        module_name = match["module"]
        module = modules.get(module_name)
        weight = getattr(module, "weight", None)
        if module is None or not isinstance(weight, torch.Tensor):
            problems.append(
                FieldProblem(f"tensor {key}", list(tensor.shape), f"the base has no module {module_name}")
            )
            continue
        out_features, in_features = _io_features(module, weight)
        if magnitude is not None:
            if not config.get("use_dora"):
                problems.append(
                    FieldProblem(f"{ADAPTER_CONFIG}.use_dora", config.get("use_dora"), f"{key} is DoRA")
                )
            if tuple(tensor.shape) != (out_features,):
                problems.append(
                    FieldProblem(
                        f"tensor {key}", list(tensor.shape), f"{module_name} has {out_features} outputs"
                    )
                )
            continue
        lora_tensors += 1
        rank = _rank_for(config, module_name)
        part = match["part"]
        expected = (rank, in_features) if part.endswith("A") else (out_features, rank)
        if part.startswith("lora_embedding"):
            expected = (rank, out_features) if part.endswith("A") else (in_features, rank)
        if tuple(tensor.shape) != expected:
            problems.append(
                FieldProblem(
                    f"tensor {key}",
                    list(tensor.shape),
                    f"expected {list(expected)} for {module_name} ({in_features} -> {out_features}) at r={rank}",
                )
            )
    if lora_tensors == 0:
        problems.append(FieldProblem("weights", sorted(state)[:5], "hold no lora_A / lora_B tensor"))
    return problems


def _io_features(module: Any, weight: Any) -> tuple[int, int]:
    """``(out, in)`` of a Linear ``[out, in]`` weight; an Embedding ``[vocab, dim]`` reads as
    ``(dim, vocab)`` so that its ``lora_embedding_A [r, vocab]`` / ``B [dim, r]`` check the same way."""
    import torch

    if isinstance(module, torch.nn.Embedding):
        return int(weight.shape[1]), int(weight.shape[0])
    return int(weight.shape[0]), int(weight.shape[1])


def check_prompt(config: dict[str, Any], state: dict[str, Any], base_model: Any) -> list[FieldProblem]:
    """Every way a prompt-learning adapter does not fit the base: ``token_dim``, ``num_layers``, and
    the rows of ``prompt_embeddings`` (``num_virtual_tokens * num_transformer_submodules``)."""
    hf = base_model.config
    problems: list[FieldProblem] = []
    hidden, layers = getattr(hf, "hidden_size", None), getattr(hf, "num_hidden_layers", None)
    kv_heads = getattr(hf, "num_key_value_heads", None) or getattr(hf, "num_attention_heads", None)
    heads = getattr(hf, "num_attention_heads", None)
    dims = {hidden}
    if isinstance(hidden, int) and isinstance(heads, int) and isinstance(kv_heads, int) and heads:
        dims.add(hidden // heads * kv_heads)  # prefix tuning over grouped-query attention
    if config.get("token_dim") not in dims:
        problems.append(
            FieldProblem(
                f"{ADAPTER_CONFIG}.token_dim", config.get("token_dim"), f"the base's hidden size is {hidden}"
            )
        )
    if config.get("num_layers") is not None and config.get("num_layers") != layers:
        problems.append(
            FieldProblem(
                f"{ADAPTER_CONFIG}.num_layers", config.get("num_layers"), f"the base has {layers} layers"
            )
        )
    embeddings = state.get("prompt_embeddings")
    virtual = config.get("num_virtual_tokens")
    rows = (virtual or 0) * (config.get("num_transformer_submodules") or 1)
    if embeddings is None:
        problems.append(FieldProblem("weights", sorted(state)[:5], "hold no prompt_embeddings tensor"))
    elif embeddings.shape[0] != rows:
        problems.append(
            FieldProblem(
                "tensor prompt_embeddings",
                list(embeddings.shape),
                f"expected {rows} rows (num_virtual_tokens={virtual})",
            )
        )
    return problems


def check_base(recorded: Any, base: str) -> list[FieldProblem]:
    """The recorded ``base_model_name_or_path`` against the base given: by weights fingerprint when
    both are local directories, by name when both are hub ids; a hub id against a local directory is
    left to the structural checks (names cannot tell)."""
    from lorafleet.models import _is_local, base_model_fingerprint, fingerprints_match

    if not recorded or not isinstance(recorded, str) or recorded == base:
        return []
    field = f"{ADAPTER_CONFIG}.base_model_name_or_path"
    recorded_local, base_local = Path(recorded).expanduser().is_dir(), _is_local(base)
    if recorded_local and base_local:
        if not fingerprints_match(base_model_fingerprint(recorded, None), base_model_fingerprint(base, None)):
            return [FieldProblem(field, recorded, f"holds other weights than the base {base!r}")]
        return []
    if not recorded_local and not base_local and not Path(recorded).is_absolute():
        return [FieldProblem(field, recorded, f"names another base than {base!r}")]
    return []


def _resolve_template(template: str, family: str) -> str:
    from lorafleet.families import get_family
    from lorafleet.templates import TEMPLATES

    name = template or get_family(family).template
    if name not in TEMPLATES:
        raise _problem("template", name, f"must be one of {sorted(TEMPLATES)}")
    return name


def import_adapter(request: ImportRequest, adapters_root: str | Path) -> Any:
    """Check, convert and publish the adapter in ``request.source`` as a new version of ``request.name``.

    Args:
        request: source directory, name, optional base and template.
        adapters_root: the adapters volume.

    Returns:
        The ``lorafleet.adapters.PublishedAdapter``.

    Raises:
        AdapterImportError: every problem found, each naming the field and the value.
        AdapterError: an invalid name, or a publish failure.
        ModelLoadError: the base's config cannot be read.
    """
    from safetensors.torch import save_file

    from lorafleet import adapters
    from lorafleet.families import detect_family
    from lorafleet.models import base_model_fingerprint

    adapters.validate_adapter_name(request.name)
    source = Path(request.source).expanduser()
    config = read_adapter_config(source)
    base = request.base or config.get("base_model_name_or_path") or ""
    if not base:
        raise _problem(f"{ADAPTER_CONFIG}.base_model_name_or_path", base, "is empty: pass --base PATH_OR_ID")
    state, weights_file = load_adapter_weights(source)
    base_model = meta_base(base)
    problems = check_base(config.get("base_model_name_or_path"), base)
    is_lora = config["peft_type"] in LORA_TYPES
    problems += check_lora(config, state, base_model) if is_lora else check_prompt(config, state, base_model)
    if problems:
        raise AdapterImportError(problems, f"cannot import {str(source)!r} over base {base!r}")
    family = detect_family(base_model.config, base).name
    template = _resolve_template(request.template, family)
    staging = adapters.new_staging_dir(adapters_root, request.name)
    try:
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if weights_file == SAFETENSORS_WEIGHTS:
            shutil.copyfile(source / SAFETENSORS_WEIGHTS, staging / SAFETENSORS_WEIGHTS)
        else:
            save_file(state, str(staging / SAFETENSORS_WEIGHTS), metadata={"format": "pt"})
        manifest = adapters.Manifest(
            name=request.name,
            version=0,
            kind="lora" if is_lora else "ptuning",
            method="lora" if is_lora else "ptuning",
            base_model=base_model_fingerprint(base, None),
            family=family,
            template=template,
            hyperparameters=_hyperparameters(config, state),
            created_at=adapters.utc_now(),
            source=_source_record(source, config, weights_file),
        )
        return adapters.publish(staging, adapters_root, request.name, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after a publish; left over after a refusal


def _hyperparameters(config: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    if config["peft_type"] not in LORA_TYPES:
        prompt_keys = ("peft_type", "num_virtual_tokens", "token_dim", "num_layers", "prefix_projection")
        return {"ptuning": {k: config.get(k) for k in prompt_keys}}
    ranks = [int(t.shape[0]) for k, t in state.items() if ".lora_A" in k]
    keys = ("lora_alpha", "target_modules", "use_dora", "use_rslora", "modules_to_save", "rank_pattern")
    return {"lora": {"rank": max(ranks, default=config.get("r")), **{k: config.get(k) for k in keys}}}


def _source_record(source: Path, config: dict[str, Any], weights_file: str) -> dict[str, Any]:
    from lorafleet.adapters import sha256_file

    return {
        "kind": "import",
        "path": str(source.resolve()),
        "peft_type": config.get("peft_type"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "weights_file": weights_file,
        "weights_sha256": sha256_file(source / weights_file),
        "converted": (
            "pickle read with torch.load(weights_only=True), written as safetensors"
            if weights_file == PICKLE_WEIGHTS
            else ""
        ),
    }


def serving_note(config: dict[str, Any]) -> str:
    """What the inference service cannot serve yet in an imported adapter, from the same table that
    refuses such training runs (``lorafleet.method_specs``); empty when it serves all of it."""
    from lorafleet.method_specs import LORA_OPTION_SERVABLE, METHOD_SPECS

    if config.get("peft_type") in PROMPT_TYPES:
        return (
            ""
            if METHOD_SPECS["ptuning"].servable
            else "the inference service cannot serve prompt-learning adapters yet"
        )
    unserved = [o for o, servable in LORA_OPTION_SERVABLE.items() if config.get(o) and not servable]
    return f"the inference service cannot serve adapters with {', '.join(unserved)} yet" if unserved else ""


def main(argv: list[str] | None = None) -> int:
    """``lorafleet adapters import SRC --name NAME``: check, convert and publish a PEFT adapter."""
    parser = argparse.ArgumentParser(prog="lorafleet adapters import", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="PEFT adapter directory (adapter_config.json + weights)")
    parser.add_argument("--name", required=True, help="adapter name to publish under (a new version)")
    parser.add_argument("--base", default="", help="base model path or hub id (default: the adapter's own)")
    parser.add_argument(
        "--template", default="", help="prompt template it was trained with (default: the family's)"
    )
    parser.add_argument("--root", default=".cache/adapters", help="adapters root")
    args = parser.parse_args(argv)
    request = ImportRequest(args.source, args.name, args.base, args.template)
    published = import_adapter(request, args.root)
    converted = published.manifest.source.get("converted")
    print(
        f"imported {args.source} as {published.ref} ({published.manifest.kind}, template {published.manifest.template})"
    )
    if converted:
        print(f"  {converted}")
    print(f"  {published.path}")
    note = serving_note(read_adapter_config(published.path))
    if note:
        print(f"note: {note}; it is published, and served once that lands")
    return 0


__all__ = ["ImportRequest", "import_adapter", "main"]
