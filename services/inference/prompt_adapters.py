"""PEFT prompt-learning adapters (prefix tuning / P-tuning v2, P-tuning, prompt tuning) as per-layer
virtual-token keys and values, served per row in the engine's mixed batches.

What a ``PeftModelForCausalLM`` does with such an adapter, and what the engine reproduces:

* ``PREFIX_TUNING`` (P-tuning v2, Li & Liang 2021 / Liu et al. 2021): the saved
  ``prompt_embeddings`` ``[n_virtual, num_layers * 2 * token_dim]`` ARE the key/value prefix of
  every layer (PEFT saves the output of its projection MLP when ``prefix_projection`` is set).
  ``get_prompt`` casts them to the base's dtype and reads them as
  ``view(n_virtual, num_layers * 2, heads, head_dim).permute(1, 2, 0, 3)``: entry ``2l`` is layer
  ``l``'s keys, ``2l + 1`` its values, each ``[heads, n_virtual, head_dim]`` (``heads`` = the base's
  key/value heads under GQA). They go into the KV cache as they are (no rotary embedding applied);
  the attention mask gets ``n_virtual`` ones in front, and every real token's position id is
  shifted by ``n_virtual`` (``_adjust_prompt_learning_kwargs``).
* ``P_TUNING`` / ``PROMPT_TUNING``: the saved ``prompt_embeddings`` ``[n_virtual, hidden]`` are
  input embeddings PEFT puts in front of the prompt, at positions ``0 .. n_virtual - 1``. They are
  fixed after training, and causal attention means no later token changes their keys and values,
  so the engine computes their per-layer KV once by running the base on them (on its own thread,
  on first use: ``PromptAdapter.embeddings`` until then) and serves them exactly like a prefix.

Both become a :class:`PromptAdapter`. Prompt adapters hold no LoRA slot; the registry caches them
like LoRA weights (``ref``, ``nbytes``). :func:`load_adapter` is the registry's loader for every
PEFT adapter directory: it dispatches on ``peft_type``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.inference.adapter_checks import (
    ADAPTER_CONFIG,
    SAFETENSORS_WEIGHTS,
    _read_safetensors_header,
    check_weights_format,
)
from services.inference.errors import AdapterIncompatibleError, AdapterLoadError
from services.inference.lora_batch import adapter_weights_from_peft_dir

PREFIX_TUNING = "PREFIX_TUNING"
PROMPT_PEFT_TYPES = (PREFIX_TUNING, "P_TUNING", "PROMPT_TUNING")
"""PEFT types served as virtual tokens (their manifest kind is ``ptuning``)."""
PROMPT_TENSOR = "prompt_embeddings"
MAX_ABS_PROMPT = 1e4
"""Largest magnitude accepted in a prompt tensor: beyond it attention saturates (NaN or garbage)."""


@dataclass(frozen=True)
class KvLayout:
    """The base's KV cache per layer: ``layers`` x ``[kv_heads, tokens, head_dim]``, and its width."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int

    @classmethod
    def of(cls, config: Any) -> KvLayout:
        """The layout a transformers config describes (GQA: ``num_key_value_heads``).

        Raises:
            ValueError: the config lacks the sizes (an architecture this engine cannot serve
                prompt adapters on).
        """
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = getattr(text, "num_hidden_layers", None)
        hidden = getattr(text, "hidden_size", None)
        heads = getattr(text, "num_attention_heads", None)
        if not all(isinstance(v, int) for v in (layers, hidden, heads)):
            raise ValueError("the base config has no num_hidden_layers / hidden_size / num_attention_heads")
        assert isinstance(layers, int) and isinstance(hidden, int) and isinstance(heads, int)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        return cls(layers, int(kv_heads), int(head_dim), hidden)


@dataclass
class PromptAdapter:
    """The virtual tokens of one prompt-learning adapter version, as the engine consumes them.

    Attributes:
        ref: identity of this exact version (as ``AdapterWeights.ref``).
        peft_type: ``PREFIX_TUNING``, ``P_TUNING`` or ``PROMPT_TUNING``.
        num_virtual_tokens: tokens put in front of every prompt; they count against the context.
        keys: per layer ``[kv_heads, num_virtual_tokens, head_dim]`` in the base's dtype; empty
            until computed for ``P_TUNING`` / ``PROMPT_TUNING`` (see ``embeddings``).
        values: as ``keys``.
        embeddings: ``P_TUNING`` / ``PROMPT_TUNING`` only: ``[num_virtual_tokens, hidden]`` input
            embeddings whose KV the engine computes on first use (:meth:`set_kv`); None for prefixes.
        kv_nbytes: bytes of ``keys`` and ``values`` once computed (what a cache budgets against).
    """

    ref: str
    peft_type: str
    num_virtual_tokens: int
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    embeddings: torch.Tensor | None = None
    kv_nbytes: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the virtual KV (computed or to be), plus embeddings still held."""
        held = self.embeddings.numel() * self.embeddings.element_size() if self.embeddings is not None else 0
        return self.kv_nbytes + held

    @property
    def has_kv(self) -> bool:
        return bool(self.keys)

    def set_kv(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Store the computed per-layer KV and drop the embeddings they came from."""
        self.keys, self.values, self.embeddings = keys, values, None

    def check_fits(self, layout: KvLayout) -> None:
        """Raise ValueError when the virtual KV does not fit a base with ``layout``."""
        if self.embeddings is not None:
            if tuple(self.embeddings.shape) != (self.num_virtual_tokens, layout.hidden_size):
                raise ValueError(
                    f"prompt adapter {self.ref!r}: embeddings {list(self.embeddings.shape)} do not fit "
                    f"[{self.num_virtual_tokens}, {layout.hidden_size}]"
                )
            return
        if len(self.keys) != layout.layers or len(self.values) != layout.layers:
            raise ValueError(
                f"prompt adapter {self.ref!r} has KV for {len(self.keys)} layers; the base has {layout.layers}"
            )
        want = (layout.kv_heads, self.num_virtual_tokens, layout.head_dim)
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if tuple(k.shape) != want or tuple(v.shape) != want:
                raise ValueError(
                    f"prompt adapter {self.ref!r}: layer {i} KV {list(k.shape)} / {list(v.shape)} do not fit "
                    f"{list(want)}"
                )


def _read_config(ref: str, path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AdapterLoadError(f"adapter {ref}: {ADAPTER_CONFIG} is missing or unreadable: {e}") from e
    return config


def _positive_int(ref: str, config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterIncompatibleError(
            f"prompt adapter {ref}: {ADAPTER_CONFIG} {key} is {value!r}; need an integer >= 1"
        )
    return value


def _expected_width(ref: str, config: dict[str, Any]) -> int:
    """Columns of ``prompt_embeddings`` the config implies."""
    token_dim = _positive_int(ref, config, "token_dim")
    if config["peft_type"] != PREFIX_TUNING:
        return token_dim
    layers = _positive_int(ref, config, "num_layers")
    heads = _positive_int(ref, config, "num_attention_heads")
    if token_dim % heads:
        raise AdapterIncompatibleError(
            f"prompt adapter {ref}: token_dim {token_dim} is not a multiple of num_attention_heads {heads}"
        )
    return layers * 2 * token_dim


def _base_problems(config: dict[str, Any], layout: KvLayout) -> list[str]:
    """The config's sizes that do not match the base (each naming the field and both values)."""
    if config["peft_type"] != PREFIX_TUNING:
        if config["token_dim"] != layout.hidden_size:
            return [f"token_dim {config['token_dim']} (the base's hidden_size is {layout.hidden_size})"]
        return []
    problems = []
    if config["num_layers"] != layout.layers:
        problems.append(f"num_layers {config['num_layers']} (the base has {layout.layers} layers)")
    if config["num_attention_heads"] != layout.kv_heads:
        problems.append(
            f"num_attention_heads {config['num_attention_heads']} (the base has {layout.kv_heads} key/value heads)"
        )
    head_dim = config["token_dim"] // config["num_attention_heads"]
    if head_dim != layout.head_dim:
        problems.append(
            f"head dim token_dim / num_attention_heads = {head_dim} (the base's head_dim is {layout.head_dim})"
        )
    return problems


def check_prompt_adapter(
    ref: str, path: Path, layout: KvLayout | None = None, max_context: int | None = None
) -> int:
    """PEFT type, virtual tokens, sizes and the tensor table of a prompt-learning adapter directory,
    from ``adapter_config.json`` and the safetensors header, without loading any tensor.

    Args:
        ref: the adapter's name in messages.
        path: the adapter directory.
        layout: the base's KV layout; None checks the directory alone (the registry's static check;
            the loader checks again against the base).
        max_context: the base's context; the virtual tokens must leave room for a prompt.

    Returns:
        ``num_virtual_tokens``.

    Raises:
        AdapterLoadError: unreadable config or weights (pickle-only included).
        AdapterIncompatibleError: not a prompt-learning type, not a causal LM adapter, sizes that do
            not fit the base or the tensor, tensors other than ``prompt_embeddings``; each names the
            field and its value.
    """
    config = _read_config(ref, path)
    peft_type = config.get("peft_type")
    if peft_type not in PROMPT_PEFT_TYPES:
        raise AdapterIncompatibleError(
            f"adapter {ref}: peft_type {peft_type!r} is not a prompt-learning type {list(PROMPT_PEFT_TYPES)}"
        )
    if config.get("task_type") != "CAUSAL_LM":
        raise AdapterIncompatibleError(
            f"prompt adapter {ref}: task_type {config.get('task_type')!r}; this server serves CAUSAL_LM"
        )
    n_virtual = _positive_int(ref, config, "num_virtual_tokens")
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterIncompatibleError(
            f"prompt adapter {ref}: num_transformer_submodules {config.get('num_transformer_submodules')!r}; "
            "a decoder-only base has 1"
        )
    if max_context is not None and n_virtual >= max_context:
        raise AdapterIncompatibleError(
            f"prompt adapter {ref}: num_virtual_tokens {n_virtual} leaves no room for a prompt in the "
            f"base's context of {max_context} tokens"
        )
    width = _expected_width(ref, config)
    if layout is not None:
        problems = _base_problems(config, layout)
        if problems:
            raise AdapterIncompatibleError(
                f"prompt adapter {ref} does not fit the base: {ADAPTER_CONFIG} " + "; ".join(problems)
            )
    check_weights_format(ref, path)
    try:
        header = _read_safetensors_header(path / SAFETENSORS_WEIGHTS)
    except (OSError, ValueError) as e:
        raise AdapterLoadError(f"adapter {ref}: {SAFETENSORS_WEIGHTS} is unreadable: {e}") from e
    if set(header) != {PROMPT_TENSOR}:
        raise AdapterIncompatibleError(
            f"prompt adapter {ref}: {SAFETENSORS_WEIGHTS} holds {sorted(header)}; expected only {PROMPT_TENSOR!r}"
        )
    shape = header[PROMPT_TENSOR].get("shape") if isinstance(header[PROMPT_TENSOR], dict) else None
    if shape != [n_virtual, width]:
        raise AdapterIncompatibleError(
            f"prompt adapter {ref}: {PROMPT_TENSOR} has shape {shape}; {ADAPTER_CONFIG} implies "
            f"[{n_virtual}, {width}] (num_virtual_tokens {n_virtual}, "
            + (
                f"num_layers {config['num_layers']} * 2 * token_dim {config['token_dim']})"
                if peft_type == PREFIX_TUNING
                else f"token_dim {config['token_dim']})"
            )
        )
    return n_virtual


def load_prompt_adapter(path: str | Path, ref: str, base_model: nn.Module) -> PromptAdapter:
    """Read a PEFT prompt-learning adapter directory into a :class:`PromptAdapter` for ``base_model``.

    Prefix tuning gives its per-layer KV at once, in the base's dtype (PEFT's ``get_prompt``);
    P-tuning and prompt tuning give their embeddings, in the dtype of the base's input embeddings,
    whose KV the engine computes on first use.

    Raises:
        AdapterLoadError: missing, unreadable or corrupt files.
        AdapterIncompatibleError: see :func:`check_prompt_adapter`; values not finite or too large.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    config = getattr(base_model, "config", None)
    try:
        layout = KvLayout.of(config)
    except ValueError as e:
        raise AdapterIncompatibleError(f"prompt adapter {ref}: {e}") from e
    max_context = getattr(config, "max_position_embeddings", None)
    n_virtual = check_prompt_adapter(ref, root, layout, max_context if isinstance(max_context, int) else None)
    try:
        emb = load_file(str(root / SAFETENSORS_WEIGHTS))[PROMPT_TENSOR]
    except (OSError, SafetensorError, ValueError) as e:
        raise AdapterLoadError(f"adapter {ref}: {SAFETENSORS_WEIGHTS} is corrupt: {e}") from e
    if not emb.is_floating_point() or not bool(emb.float().abs().max() <= MAX_ABS_PROMPT):
        raise AdapterIncompatibleError(
            f"prompt adapter {ref}: {PROMPT_TENSOR} holds values that are not finite or too large "
            f"(|x| > {MAX_ABS_PROMPT:g})"
        )
    peft_type = json.loads((root / ADAPTER_CONFIG).read_text(encoding="utf-8"))["peft_type"]
    device = next(base_model.parameters()).device
    kv_dtype = getattr(base_model, "dtype", torch.float32)
    kv_nbytes = 2 * layout.layers * layout.kv_heads * n_virtual * layout.head_dim * kv_dtype.itemsize
    adapter = PromptAdapter(ref, peft_type, n_virtual, kv_nbytes=kv_nbytes)
    if peft_type != PREFIX_TUNING:
        embed = base_model.get_input_embeddings()  # type: ignore[operator]
        adapter.embeddings = emb.to(device=device, dtype=embed.weight.dtype)
        return adapter
    # PEFT's get_prompt: cast, then [n, L*2, H, D] -> [L*2, H, n, D]; 2l = keys, 2l+1 = values.
    kv = emb.to(device=device, dtype=kv_dtype).view(
        n_virtual, layout.layers * 2, layout.kv_heads, layout.head_dim
    )
    kv = kv.permute(1, 2, 0, 3)
    adapter.set_kv(
        [kv[2 * i].contiguous() for i in range(layout.layers)],
        [kv[2 * i + 1].contiguous() for i in range(layout.layers)],
    )
    return adapter


def adapter_peft_type(path: str | Path) -> str | None:
    """The ``peft_type`` of an adapter directory's config; None when it cannot be read."""
    try:
        config = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return config.get("peft_type") if isinstance(config, dict) else None


def load_adapter(
    path: str | Path,
    ref: str,
    base_model: nn.Module,
    lora_loader: Callable[[Path, str], Any] | None = None,
) -> Any:
    """The registry's loader: a prompt-learning adapter as a :class:`PromptAdapter`, anything else
    through ``lora_loader`` (default ``lora_batch.adapter_weights_from_peft_dir``, which refuses
    what is not LoRA)."""
    if adapter_peft_type(path) in PROMPT_PEFT_TYPES:
        return load_prompt_adapter(path, ref, base_model)
    if lora_loader is not None:
        return lora_loader(Path(path), ref)
    return adapter_weights_from_peft_dir(path, ref, base_model)


def prompt_aware_loader(
    base_model: nn.Module, lora_loader: Callable[[Path, str], Any]
) -> Callable[[Path, str], Any]:
    """:func:`load_adapter` over ``base_model`` as a registry loader ``(path, ref) -> weights``."""
    return lambda path, ref: load_adapter(path, ref, base_model, lora_loader)


@torch.inference_mode()
def compute_prompt_kv(model: nn.Module, adapter: PromptAdapter, cache_config: Any) -> None:
    """Run ``model`` (the plain base: no LoRA rows set) on a P-tuning / prompt-tuning adapter's
    embeddings at positions ``0 .. n - 1`` and keep every layer's keys and values in ``adapter``.

    This is what PeftModel computes for the virtual tokens in front of every prompt: causal
    attention means the prompt cannot change them.
    """
    from transformers import DynamicCache

    assert adapter.embeddings is not None, "prefix adapters carry their KV already"
    n = adapter.num_virtual_tokens
    cache = DynamicCache(config=cache_config)
    model(
        inputs_embeds=adapter.embeddings.unsqueeze(0),
        attention_mask=torch.ones(1, n, dtype=torch.long, device=adapter.embeddings.device),
        position_ids=torch.arange(n, device=adapter.embeddings.device).unsqueeze(0),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    layers: list[Any] = list(cache.layers)
    adapter.set_kv(
        [layer.keys[0].contiguous() for layer in layers], [layer.values[0].contiguous() for layer in layers]
    )
    adapter.kv_nbytes = sum(t.numel() * t.element_size() for t in (*adapter.keys, *adapter.values))


def virtual_tokens(adapter: object) -> int:
    """Virtual tokens a request's adapter puts in front of its prompt (0 for LoRA or none)."""
    return adapter.num_virtual_tokens if isinstance(adapter, PromptAdapter) else 0


__all__ = [
    "PREFIX_TUNING",
    "PROMPT_PEFT_TYPES",
    "KvLayout",
    "PromptAdapter",
    "adapter_peft_type",
    "check_prompt_adapter",
    "compute_prompt_kv",
    "load_adapter",
    "load_prompt_adapter",
    "prompt_aware_loader",
    "virtual_tokens",
]
