"""Settings of the inference service: which base models to serve, where adapters live, the limits.

Three sources, later ones winning: the dataclass defaults, a YAML file (``--config``), command-line
flags (each flag's default reads ``LORAFLEET_INFERENCE_<FLAG>``, like the trainer's). A YAML file
looks like::

    # python -m services.inference.server --config serve.yaml
    adapters_root: .cache/adapters
    port: 50052
    metrics_port: 9102
    max_new_tokens_cap: 512
    kv_cache_mb: 2048          # KV cache budget per base model; 0 = max_batch_size x max_context tokens
    max_prefill_tokens: 512    # prompt tokens prefilled per iteration (long prompts go in chunks)
    max_published_models: 1    # full models published under adapters_root, served as name@version
    published_dtype: fp32
    models:
      - name: tiny
        path: .cache/tiny/llama
        dtype: fp32            # fp32 | bf16 | fp16
        quantization: none     # none | nf4 | int8
        template: auto         # auto = the family's default template

On the command line a model is ``--model NAME=PATH[:QUANTIZATION]`` (repeatable), e.g.
``--model tiny=.cache/tiny/llama:nf4``. :meth:`InferenceSettings.validate` checks everything at
once and raises one ``ConfigError`` listing every problem by field and value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafleet.errors import ConfigError, FieldProblem
from lorafleet.safe_yaml import load_bounded_yaml
from services.common.auth import AUTH_SCOPES, read_token

QUANTIZATIONS = ("none", "nf4", "int8")
DTYPES = ("fp32", "bf16", "fp16")
KV_CACHE_LAYOUTS = ("auto", "paged", "padded")
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class ModelSettings:
    """One base model the server loads, with its own engine and adapter registry."""

    name: str
    """What requests put in ``model``; letters, digits, ``.``, ``_``, ``-``."""
    path: str
    """Local directory or hub id of the base model."""
    dtype: str = "fp32"
    """Weights and compute dtype: fp32, bf16 or fp16 (compute dtype for quantized bases)."""
    quantization: str = "none"
    """none, nf4 (4-bit NormalFloat with double quantization) or int8 (bitsandbytes)."""
    template: str = "auto"
    """Chat template for requests on the base model; adapters use the one in their manifest.
    ``auto`` = the model family's default."""
    revision: str | None = None
    """Hub revision; ignored for local paths."""
    trust_remote_code: bool = False
    """Run the checkpoint's own modelling code (Baichuan, ChatGLM)."""
    adapters_root: str | None = None
    """This base's publish root; None = the server-wide ``adapters_root``."""


@dataclass
class InferenceSettings:
    """Everything one inference server process needs."""

    models: list[ModelSettings] = field(default_factory=list)
    """Base models to serve (at least one)."""
    adapters_root: str = ".cache/adapters"
    """Publish root of adapters (``<root>/<name>/<version>/``), watched for new versions."""
    host: str = "127.0.0.1"
    """Address to bind (the gRPC port and the metrics port)."""
    port: int = 50052
    """gRPC port; 0 picks a free one."""
    metrics_port: int = -1
    """``/metrics`` port; 0 picks a free one, -1 turns the exporter off."""
    http_port: int = -1
    """Port of the OpenAI-compatible HTTP API (``openai_api.py``), served by the same process and
    plane as gRPC; 0 picks a free one, -1 turns it off."""
    auth_token: str = ""
    """When set, the RPCs of ``auth_scope`` need ``authorization: Bearer <token>``. Set it in the YAML
    file or ``LORAFLEET_INFERENCE_AUTH_TOKEN``, or name a file in ``auth_token_file``; never on a
    command line, where ``ps`` shows it."""
    auth_token_file: str = ""
    """File holding the bearer token (a mounted Secret); read once by :meth:`validate`."""
    auth_scope: str = "writes"
    """What the token guards: ``writes`` (LoadAdapter, UnloadAdapter) or ``all`` (every RPC but health
    and reflection); see ``services.common.auth``."""
    tls_cert: str = ""
    """PEM certificate chain; with ``tls_key`` the server speaks TLS only."""
    tls_key: str = ""
    """PEM private key of ``tls_cert``."""
    max_new_tokens_cap: int = 512
    """Largest ``max_new_tokens`` a request may ask for."""
    default_max_new_tokens: int = 128
    """``max_new_tokens`` of a request that sets none (clipped to the cap)."""
    max_batch_size: int = 32
    """Rows decoded together per base model."""
    max_queued: int = 256
    """Requests waiting for a batch row per base model; more are refused with RESOURCE_EXHAUSTED."""
    kv_cache: str = "auto"
    """KV cache layout of each engine (``engine.py``): ``paged`` (blocks under ``kv_cache_mb``, prefix
    reuse, chunked unpadded prefill), ``padded`` (one left-padded cache whose only limit is
    ``max_batch_size``), or ``auto``: paged when the model allows it (its attention goes through
    transformers' attention interface), else padded, with a log line saying why. With ``paged`` a
    model that does not allow it fails to load."""
    kv_cache_mb: float = 0.0
    """Budget of the paged KV cache per base model (each published full model too), in MiB: keys and
    values of every layer. 0 = room for ``max_batch_size`` sequences of the model's full context.
    Memory is touched only as blocks are first used; when the budget is full, requests wait for
    blocks (and, as a last resort, a running one is preempted and recomputed later). It must hold one
    sequence of the model's full context, else the base fails to load saying how much it needs."""
    kv_block_size: int = 16
    """Tokens per block of the paged KV cache: the unit of allocation and of prefix reuse."""
    prefix_caching: bool = True
    """Reuse the cached blocks of a prompt prefix (system prompt, chat history) already computed for
    the same base and adapter version (paged layout)."""
    max_prefill_tokens: int = 512
    """Prompt tokens prefilled per engine iteration, next to the running rows' decode steps: longer
    prompts are prefilled in chunks of this size (paged layout), so they do not stall the running
    streams for longer than one chunk."""
    num_slots: int = 8
    """Adapters resident in the engine's batched-LoRA tables at once, per base model."""
    max_rank: int = 64
    """Largest LoRA rank accepted; higher-rank adapters fail with FAILED_PRECONDITION."""
    adapter_capacity: int = 16
    """Adapters kept loaded in host memory per base model (LRU beyond that)."""
    adapter_memory_budget_mb: float = 0.0
    """Cap on the summed weights of resident adapters per base model, in MiB; 0 = none."""
    scan_interval_s: float = 0.5
    """How often the adapters root is rescanned for new and removed versions."""
    max_stop_sequences: int = 8
    """Stop sequences a request may give."""
    max_stop_length: int = 64
    """Characters per stop sequence."""
    max_messages: int = 256
    """Messages per chat request."""
    max_prompt_chars: int = 200_000
    """Characters of a prompt, or of all chat messages together, refused (INVALID_ARGUMENT) before
    anything is tokenized: tokenizing is the costly part of a refusal (a million characters took
    seconds of CPU). The default is well above what a 32k-token context holds at ~4 characters per
    token; longer prompts that do get tokenized are still refused by their token count."""
    grpc_workers: int = 128
    """gRPC handler threads; each in-flight request (streaming or not) holds one."""
    torch_threads: int = 0
    """Threads of torch's CPU operations (``torch.set_num_threads``), set by ``lorafleet
    inference-server`` at start; 0 = the CPUs this process may use (affinity, capped by a cgroup CPU
    quota) minus one (at least 1), leaving a
    core to the decode loop's and the gRPC handlers' Python threads, as vLLM's CPU backend reserves
    one (the measurement behind this default: bench/README.md and the README's Benchmark)."""
    max_published_models: int = 1
    """Full models published under ``adapters_root`` (``freeze`` / ``full`` training, merged exports)
    resident at once, each a base model of its own (weights, engine, KV cache) named ``name@version``;
    the least recently used idle one is unloaded to make room. 0 = do not serve published models."""
    published_dtype: str = "fp32"
    """Weights and compute dtype of published full models: fp32, bf16 or fp16."""
    published_quantization: str = "none"
    """Quantization of published full models when loaded: none, nf4 or int8."""
    published_load_wait_s: float = 30.0
    """How long a request for a published model that is loading waits for it; past that it gets
    UNAVAILABLE and retries (the load goes on). An explicit LoadAdapter waits for the whole load."""
    warmup_timeout_s: float = 600.0
    """How long the one-token warm-up of each base may take before the base is marked failed."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM, how long in-flight requests may run to completion (new ones are refused) before
    the rest are cancelled. A second SIGTERM/SIGINT cancels them at once."""

    def validate(self) -> InferenceSettings:
        """Check every field; returns ``self`` so calls chain.

        Raises:
            ConfigError: listing every problem, each naming the field and the value.
        """
        problems: list[FieldProblem] = []
        if self.auth_scope not in AUTH_SCOPES:
            problems.append(
                FieldProblem("auth_scope", self.auth_scope, f"use one of {', '.join(AUTH_SCOPES)}")
            )
        try:
            self.auth_token = read_token(self.auth_token, self.auth_token_file, "auth_token_file")
        except ConfigError as e:
            problems += e.problems
        if not self.models:
            problems.append(FieldProblem("models", [], "give at least one base model (--model NAME=PATH)"))
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            where = f"models[{i}]"
            if not isinstance(m.name, str) or not _MODEL_NAME_RE.fullmatch(m.name):
                problems.append(
                    FieldProblem(f"{where}.name", m.name, "use 1-64 letters, digits, '.', '_', '-'")
                )
            elif m.name in seen:
                problems.append(FieldProblem(f"{where}.name", m.name, "two models have this name"))
            seen.add(m.name)
            if not m.path:
                problems.append(FieldProblem(f"{where}.path", m.path, "give a local directory or hub id"))
            if m.dtype not in DTYPES:
                problems.append(FieldProblem(f"{where}.dtype", m.dtype, f"must be one of {list(DTYPES)}"))
            if m.quantization not in QUANTIZATIONS:
                problems.append(
                    FieldProblem(
                        f"{where}.quantization", m.quantization, f"must be one of {list(QUANTIZATIONS)}"
                    )
                )
        if self.kv_cache not in KV_CACHE_LAYOUTS:
            problems.append(
                FieldProblem("kv_cache", self.kv_cache, f"must be one of {list(KV_CACHE_LAYOUTS)}")
            )
        elif self.kv_cache == "padded" and _is_number(self.kv_cache_mb) and self.kv_cache_mb > 0:
            problems.append(
                FieldProblem(
                    "kv_cache_mb",
                    self.kv_cache_mb,
                    "the padded layout has no block budget; use kv_cache auto or paged",
                )
            )
        if _is_number(self.kv_cache_mb) and not math.isfinite(self.kv_cache_mb):
            problems.append(FieldProblem("kv_cache_mb", self.kv_cache_mb, "must be a finite number of MiB"))
        if not isinstance(self.prefix_caching, bool):
            problems.append(FieldProblem("prefix_caching", self.prefix_caching, "must be true or false"))
        if self.published_dtype not in DTYPES:
            problems.append(
                FieldProblem("published_dtype", self.published_dtype, f"must be one of {list(DTYPES)}")
            )
        if self.published_quantization not in QUANTIZATIONS:
            problems.append(
                FieldProblem(
                    "published_quantization",
                    self.published_quantization,
                    f"must be one of {list(QUANTIZATIONS)}",
                )
            )
        for name, low in (
            ("max_published_models", 0),
            ("max_new_tokens_cap", 1),
            ("default_max_new_tokens", 1),
            ("max_batch_size", 1),
            ("max_queued", 0),
            ("kv_block_size", 1),
            ("max_prefill_tokens", 1),
            ("num_slots", 1),
            ("max_rank", 1),
            ("adapter_capacity", 1),
            ("max_stop_sequences", 0),
            ("max_stop_length", 1),
            ("max_messages", 1),
            ("max_prompt_chars", 1),
            ("grpc_workers", 4),
            ("torch_threads", 0),
            ("port", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(FieldProblem(name, value, f"must be an integer >= {low}"))
        if isinstance(self.port, int) and self.port > 65535:
            problems.append(FieldProblem("port", self.port, "must be <= 65535"))
        for name in ("metrics_port", "http_port"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= 65535:
                problems.append(FieldProblem(name, value, "must be -1 (off), 0 (any) or a port"))
        for name in (
            "kv_cache_mb",
            "adapter_memory_budget_mb",
            "scan_interval_s",
            "warmup_timeout_s",
            "shutdown_grace_s",
            "published_load_wait_s",
        ):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                problems.append(FieldProblem(name, value, "must be a number >= 0"))
        if isinstance(self.scan_interval_s, int | float) and self.scan_interval_s == 0:
            problems.append(FieldProblem("scan_interval_s", 0, "must be > 0"))
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append(FieldProblem("tls_key", self.tls_key, "tls_cert and tls_key go together"))
        for name in ("tls_cert", "tls_key"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                problems.append(FieldProblem(name, value, "no such file"))
        if problems:
            raise ConfigError(problems, "invalid inference settings")
        return self

    @property
    def effective_torch_threads(self) -> int:
        """``torch_threads``, with 0 resolved as described there."""
        return resolve_torch_threads(self.torch_threads)

    @property
    def engine_kv_cache_mb(self) -> float | None:
        """``kv_cache_mb`` as the engine takes it: None for 0 (the engine's default budget)."""
        return float(self.kv_cache_mb) if self.kv_cache_mb else None

    @property
    def memory_budget_bytes(self) -> int | None:
        """``adapter_memory_budget_mb`` in bytes, None when unset."""
        return int(self.adapter_memory_budget_mb * 1024 * 1024) if self.adapter_memory_budget_mb else None

    def model_names(self) -> list[str]:
        return [m.name for m in self.models]


def _is_number(value: Any) -> bool:
    """An int or float, not a bool (YAML's ``yes`` is a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_bool(name: str, text: str) -> bool:
    """``true/false``, ``1/0``, ``yes/no``, ``on/off`` (any case) from an environment variable.

    Raises:
        ConfigError: anything else, naming ``name`` and the value.
    """
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError([FieldProblem(name, text, "use true or false")])


def resolve_torch_threads(setting: int, cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """``setting`` if positive, else the CPUs this process may use minus one (at least 1).

    The CPUs it may use are its affinity set, capped by a cgroup v2 CPU quota (``cpu.max``, what a
    Kubernetes CPU limit becomes): a pod limited to 2 CPUs on a 64-core node gets 1 thread, not 63.
    """
    if setting > 0:
        return setting
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity set is the limit
    return max(1, cpus - 1)


def parse_model_flag(text: str) -> ModelSettings:
    """Parse ``NAME=PATH[:QUANTIZATION]`` (``tiny=.cache/tiny/llama:nf4``).

    The suffix counts as a quantization only when it is one of :data:`QUANTIZATIONS`, so a path with a
    colon (``C:\\models``) still works.

    Raises:
        ConfigError: on ``--model`` without ``=``.
    """
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ConfigError([FieldProblem("--model", text, "expected NAME=PATH[:none|nf4|int8]")])
    path, colon, quant = rest.rpartition(":")
    if colon and quant in QUANTIZATIONS and path:
        return ModelSettings(name=name, path=path, quantization=quant)
    return ModelSettings(name=name, path=rest)


def load_yaml(path: str | Path) -> InferenceSettings:
    """Read settings from a YAML file (see the module docstring).

    Raises:
        ConfigError: unreadable file, unknown keys, wrong shapes; every problem at once.
    """
    try:
        data = load_bounded_yaml(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError([FieldProblem("--config", str(path), f"cannot read: {e}")]) from e
    if not isinstance(data, dict):
        raise ConfigError([FieldProblem("--config", str(path), "must hold a mapping")])
    return from_dict(data)


def from_dict(data: dict[str, Any]) -> InferenceSettings:
    """Build settings from a plain mapping (parsed YAML), refusing unknown keys.

    Raises:
        ConfigError: unknown keys or malformed model entries.
    """
    problems: list[FieldProblem] = []
    known = {f.name for f in dataclasses.fields(InferenceSettings)}
    model_keys = {f.name for f in dataclasses.fields(ModelSettings)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            problems.append(FieldProblem(str(key), value, f"unknown setting; known: {sorted(known)}"))
        elif key != "models":
            kwargs[key] = value
    models: list[ModelSettings] = []
    raw_models = data.get("models") or []
    if not isinstance(raw_models, list):
        problems.append(FieldProblem("models", raw_models, "must be a list of {name, path, ...}"))
        raw_models = []
    for i, entry in enumerate(raw_models):
        if not isinstance(entry, dict):
            problems.append(FieldProblem(f"models[{i}]", entry, "must be a mapping with name and path"))
            continue
        unknown = [k for k in entry if k not in model_keys]
        for k in unknown:
            problems.append(
                FieldProblem(f"models[{i}].{k}", entry[k], f"unknown key; known: {sorted(model_keys)}")
            )
        if "name" not in entry or "path" not in entry:
            problems.append(FieldProblem(f"models[{i}]", entry, "needs name and path"))
            continue
        if not unknown:
            models.append(ModelSettings(**entry))
    if problems:
        raise ConfigError(problems, "invalid inference settings")
    return InferenceSettings(models=models, **kwargs)
