"""Memory estimate of a training run, counted component by component before anything is loaded.

Peers quote a rule of thumb per billion parameters (LLaMA-Factory: full fp32 18 GB, full bf16 8 GB,
freeze/LoRA 2 GB, 8-bit QLoRA 1 GB, 4-bit QLoRA 0.5 GB, "+ activations"). That ignores the two
things that decide an out-of-memory in practice: activations (which grow with batch x sequence and
dominate LoRA runs) and how ZeRO / offload split the model states. This module counts, per process:

- weights: frozen parameters at their storage width (fp32 4 B, bf16/fp16 2 B, nf4 4 bits plus
  double-quantised block constants = 4.127 bits, int8 1 B plus one fp32 scale per row); embeddings
  and the output head stay unquantized, as bitsandbytes leaves them. Trainable parameters are fp32
  for the adapter methods (lorafleet upcasts them, like LLaMA-Factory); methods that train the
  base's own weights (``MethodSpec.trains_base_weights``: ``full``/``freeze``) in bf16/fp16 keep a
  16-bit working copy plus a 4 B fp32 master copy (DeepSpeed's layout; a plain PyTorch run that
  upcasts them to fp32 instead holds the same 16 B per parameter in total).
- gradients of the trainable parameters at their training width, AdamW's two fp32 moments (8 B).
- ZeRO: stage 1 shards optimizer state (moments + master), stage 2 also gradients, stage 3 also
  parameters, each over ``world_size``; ZeRO-3 gathers about two layers' parameters at a time.
  ``offload_optimizer`` moves optimizer state to host memory, ``offload_param`` the parameters.
- activations: per layer per token, the tensors autograd keeps, counted like Korthikanti et al.
  2022 ("Reducing Activation Recomputation in Large Transformer Models", sbh(34 + 5as/h) bytes for
  a 16-bit GPT layer) but for today's decoders: no dropout masks, a gated (SwiGLU) MLP of
  ``intermediate_size`` (4 tensors of that width), each norm's input upcast to fp32 plus its output,
  and no s^2 attention matrix unless the attention is ``eager`` (SDPA / FlashAttention keep O(s)
  statistics only). Backward materialises one more layer's worth of gradients. Gradient
  checkpointing keeps only each layer's input plus one layer being recomputed (and its gradients).
- logits: b*s*vocab for the logits, their fp32 log-softmax and its gradient (the loss runs in fp32).
- a fixed framework allowance: 512 MiB on CUDA (context, cuBLAS workspace, allocator slack),
  384 MiB on CPU (the resident size of a process that has imported torch + transformers).

It is an estimate: tests/test_memory.py checks the forward-saved tensors against autograd's own on
a tiny llama, and bench/README.md (Memory estimate) gives how measured peak RSS compares with it
(allocator slack and kernel scratch space are not modelled). Not counted: DeepSpeed's
communication buckets, LoRA dropout's copy of each adapted layer's input (roughly offset by frozen
linear layers not keeping theirs), KV-head sharing (GQA keeps smaller k/v: a slight overestimate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorafleet.config import DTYPES, QUANTIZATIONS
from lorafleet.errors import ConfigError, FieldProblem
from lorafleet.method_specs import METHODS, method_spec

GIB = 1024**3
MIB = 1024**2
CUDA_OVERHEAD_BYTES = 512 * MIB
"""CUDA context + cuBLAS workspace + caching-allocator slack per process."""
CPU_OVERHEAD_BYTES = 384 * MIB
"""Resident size of a Python process after importing torch and transformers, rounded up (bench/README.md)."""
NF4_BYTES_PER_PARAM = (4 + 0.127) / 8
"""4-bit code + double-quantised absmax (8 bits per 64-block, fp32 per 256 blocks) = 4.127 bits."""

_WIDTH = {"fp32": 4, "bf16": 2, "fp16": 2}
_ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
_MASTER_BYTES = 4
_ATTN_IMPLS = ("sdpa", "eager", "flash_attention_2")
_COMPONENTS = (
    "frozen_weights_bytes",
    "trainable_weights_bytes",
    "master_weights_bytes",
    "gradients_bytes",
    "optimizer_bytes",
    "gather_buffer_bytes",
    "activations_bytes",
    "logits_bytes",
    "overhead_bytes",
)
_HOST_COMPONENTS = ("host_weights_bytes", "host_optimizer_bytes")


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one training process, in bytes per component."""

    frozen_weights_bytes: int
    """Frozen parameters on the device, at their storage width (quantized or not)."""
    trainable_weights_bytes: int
    """Trainable parameters' working copy on the device."""
    master_weights_bytes: int
    """fp32 master copy of 16-bit trainable parameters (full/freeze in bf16/fp16)."""
    gradients_bytes: int
    """Gradients of the trainable parameters."""
    optimizer_bytes: int
    """AdamW moments on the device (0 when offloaded)."""
    gather_buffer_bytes: int
    """ZeRO-3: parameters gathered for the layers being computed."""
    activations_bytes: int
    """Tensors kept for the backward pass by the transformer layers."""
    logits_bytes: int
    """Logits, their fp32 log-softmax and its gradient."""
    overhead_bytes: int
    """Framework allowance (CUDA context or the CPU process baseline)."""
    host_weights_bytes: int = 0
    """Parameters offloaded to host memory (ZeRO-3 offload_param)."""
    host_optimizer_bytes: int = 0
    """Optimizer moments and master weights offloaded to host memory."""
    device: str = "cuda"
    """Where training runs: ``cuda`` or ``cpu`` (on CPU, device memory *is* host memory)."""
    assumptions: dict[str, Any] = field(default_factory=dict)
    """The inputs and derived sizes the estimate used, for the record."""

    @property
    def device_total_bytes(self) -> int:
        """Everything held in device memory by one process."""
        return sum(getattr(self, name) for name in _COMPONENTS)

    @property
    def host_total_bytes(self) -> int:
        """Host memory one process holds for offloaded state."""
        return self.host_weights_bytes + self.host_optimizer_bytes

    @property
    def model_states_bytes(self) -> int:
        """Weights, master copy, gradients and optimizer state on the device."""
        return (
            self.frozen_weights_bytes
            + self.trainable_weights_bytes
            + self.master_weights_bytes
            + self.gradients_bytes
            + self.optimizer_bytes
            + self.gather_buffer_bytes
        )

    def to_dict(self) -> dict[str, Any]:
        """Components and totals in bytes, the same rounded to GiB under ``gib``, and the assumptions."""
        out: dict[str, Any] = {name: getattr(self, name) for name in (*_COMPONENTS, *_HOST_COMPONENTS)}
        out["device_total_bytes"] = self.device_total_bytes
        out["host_total_bytes"] = self.host_total_bytes
        out["gib"] = {name.removesuffix("_bytes"): round(value / GIB, 3) for name, value in out.items()}
        out["device"] = self.device
        out["assumptions"] = dict(self.assumptions)
        return out

    def summary(self) -> str:
        """A few human lines: totals first, then each component in GiB."""

        def g(value: int) -> str:
            return f"{value / GIB:.2f}"

        lines = [
            f"estimated peak memory per process ({self.device}): {g(self.device_total_bytes)} GiB on the device"
            + (f", {g(self.host_total_bytes)} GiB on the host (offload)" if self.host_total_bytes else ""),
            f"  weights {g(self.frozen_weights_bytes + self.trainable_weights_bytes)} "
            f"(frozen {g(self.frozen_weights_bytes)}, trainable {g(self.trainable_weights_bytes)}), "
            f"master {g(self.master_weights_bytes)}, gradients {g(self.gradients_bytes)}, "
            f"optimizer {g(self.optimizer_bytes)}"
            + (f", ZeRO-3 gather {g(self.gather_buffer_bytes)}" if self.gather_buffer_bytes else ""),
            f"  activations {g(self.activations_bytes)}, logits {g(self.logits_bytes)}, "
            f"framework {g(self.overhead_bytes)}",
        ]
        rule = self.assumptions.get("rule_of_thumb_bytes")
        if rule is not None:
            lines.append(f"  (per-billion rule of thumb: {g(int(rule))} GiB + activations)")
        return "\n".join(lines)


def rule_of_thumb_bytes(total_params: int, method: str, quantization: str, dtype: str = "bf16") -> int:
    """The peers' per-billion-parameter rule (LLaMA-Factory's README table), activations excluded.

    Args:
        total_params: parameters of the base model.
        method: training method; its ``full_model_rule`` picks the full-tuning row, every other
            method counts like LoRA.
        quantization: ``none``, ``nf4`` or ``int8`` (qlora / lora8bit imply nf4 / int8).
        dtype: only distinguishes full fp32 (18 B/param) from full 16-bit (8 B/param).

    Returns:
        Bytes: full fp32 18, full 16-bit 8, freeze/LoRA 2, 8-bit 1, 4-bit 0.5 per parameter.

    Raises:
        ConfigError: ``method`` is not a training method.
    """
    spec = method_spec(method)
    quantization = spec.quantization(quantization)
    if spec.full_model_rule:
        per_param = 18.0 if dtype == "fp32" else 8.0
    elif quantization == "nf4":
        per_param = 0.5
    elif quantization == "int8":
        per_param = 1.0
    else:
        per_param = 2.0
    return int(total_params * per_param)


def _validate(values: dict[str, Any]) -> None:
    problems: list[FieldProblem] = []
    for name, allowed in (
        ("method", METHODS),
        ("dtype", DTYPES),
        ("quantization", QUANTIZATIONS),
        ("attn_implementation", _ATTN_IMPLS),
        ("device", ("cuda", "cpu")),
    ):
        if values[name] not in allowed:
            problems.append(FieldProblem(name, values[name], f"must be one of {list(allowed)}"))
    for name in (
        "total_params",
        "num_layers",
        "hidden_size",
        "vocab_size",
        "batch_size",
        "seq_len",
        "world_size",
    ):
        if not isinstance(values[name], int) or values[name] < 1:
            problems.append(FieldProblem(name, values[name], "must be a positive integer"))
    if not isinstance(values["trainable_params"], int) or values["trainable_params"] < 0:
        problems.append(
            FieldProblem("trainable_params", values["trainable_params"], "must be an integer >= 0")
        )
    for name in ("intermediate_size", "num_heads"):
        if values[name] is not None and (not isinstance(values[name], int) or values[name] < 1):
            problems.append(FieldProblem(name, values[name], "must be a positive integer or None"))
    if values["zero_stage"] not in (0, 1, 2, 3):
        problems.append(FieldProblem("zero_stage", values["zero_stage"], "must be 0, 1, 2 or 3"))
    if values["offload_param"] and values["zero_stage"] != 3:
        problems.append(FieldProblem("offload_param", True, "needs ZeRO stage 3"))
    if problems:
        raise ConfigError(problems, context="invalid memory estimate input")


def _frozen_weight_bytes(
    frozen: int,
    quantization: str,
    width: int,
    num_layers: int,
    hidden: int,
    intermediate: int,
    vocab: int,
    gated: bool,
) -> float:
    """Frozen parameters at storage width; only the layers' linear weights are quantized."""
    if quantization == "none":
        return frozen * width
    per_layer_linear = 4 * hidden * hidden + (3 if gated else 2) * hidden * intermediate
    # Embeddings (and an untied head) are not Linear4bit/Linear8bitLt: keep them at compute width.
    quantized = max(0, min(num_layers * per_layer_linear, frozen - vocab * hidden))
    per_param = NF4_BYTES_PER_PARAM if quantization == "nf4" else 1.0 + 4.0 / hidden  # int8 + row scale
    return quantized * per_param + (frozen - quantized) * width


def _activation_bytes_per_token_layer(
    width: int,
    hidden: int,
    intermediate: int,
    gated: bool,
    num_heads: int,
    seq_len: int,
    attn_implementation: str,
) -> float:
    """Bytes one decoder layer keeps per token for backward (see the module docstring)."""
    attention = 6 * hidden  # q/k/v input, q, k, v after RoPE, SDPA output, o_proj input
    mlp = (
        hidden + (4 if gated else 2) * intermediate
    )  # input, (gate, act(gate), up, product) or (fc1 out, act)
    per_token = width * (attention + mlp)
    # Each of the two norms keeps its input upcast to fp32 and its normalised output at compute width.
    per_token += 2 * (4 + width) * hidden
    if attn_implementation == "eager":
        # The fp32 softmax output, plus its cast back to 16-bit for the matmul with V: a * s per token.
        per_token += num_heads * seq_len * (4 + (width if width < 4 else 0))
    return per_token


def estimate_training_memory(
    *,
    total_params: int,
    trainable_params: int,
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
    method: str,
    dtype: str,
    quantization: str,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    zero_stage: int,
    world_size: int,
    offload_optimizer: bool,
    offload_param: bool,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    gated_mlp: bool = True,
    attn_implementation: str = "sdpa",
    device: str = "cuda",
) -> MemoryEstimate:
    """Estimate the peak memory of one training process (see the module docstring for the model).

    Args:
        total_params: every parameter of the model (with or without the adapter's own: the
            difference is negligible).
        trainable_params: parameters the method trains.
        num_layers: transformer blocks.
        hidden_size: model width h.
        vocab_size: output vocabulary.
        method: lora, qlora, lora8bit, freeze, full or ptuning.
        dtype: fp32, bf16 or fp16 (weights and compute).
        quantization: none, nf4 or int8 (what the method implies: qlora -> nf4).
        batch_size: micro-batch per process.
        seq_len: tokens per row (the longest row of the data).
        gradient_checkpointing: recompute activations in backward.
        zero_stage: ZeRO stage 0-3 (0 also for plain PyTorch / DDP).
        world_size: processes the ZeRO partitions are spread over.
        offload_optimizer: optimizer state in host memory.
        offload_param: parameters in host memory (ZeRO-3).
        intermediate_size: MLP width; None assumes 4h (non-gated) / 8h/3 (gated).
        num_heads: attention heads (only used for eager attention); None assumes h / 128.
        gated_mlp: SwiGLU-style MLP (LLaMA, Qwen2, Mistral, Baichuan, ChatGLM2/3); False for
            GPT-NeoX, Falcon, BLOOM.
        attn_implementation: sdpa / flash_attention_2 keep no s^2 scores; eager does.
        device: cuda or cpu; sets the framework allowance.

    Returns:
        The estimate, each component per process.

    Raises:
        ConfigError: an input out of range, naming each.
    """
    _validate(dict(locals()))
    w = _WIDTH[dtype]
    gated = gated_mlp
    inter = intermediate_size or (8 * hidden_size // 3 if gated else 4 * hidden_size)
    heads = num_heads or max(1, hidden_size // 128)
    trainable = min(trainable_params, total_params)
    frozen = total_params - trainable

    frozen_w = _frozen_weight_bytes(
        frozen, quantization, w, num_layers, hidden_size, inter, vocab_size, gated
    )
    sixteen_bit_full = method_spec(method).trains_base_weights and w == 2
    trainable_w: float = trainable * (w if sixteen_bit_full else 4)
    master: float = trainable * _MASTER_BYTES if sixteen_bit_full else 0
    grads: float = trainable * (w if sixteen_bit_full else 4)
    optimizer: float = trainable * _ADAM_BYTES
    gather = 0.0
    if zero_stage >= 1:
        optimizer, master = optimizer / world_size, master / world_size
    if zero_stage >= 2:
        grads /= world_size
    if zero_stage == 3:
        layer_params = total_params / max(num_layers, 1)
        gather = min(2 * layer_params * w, frozen_w + trainable_w)
        frozen_w, trainable_w = frozen_w / world_size, trainable_w / world_size
    host_weights = host_optimizer = 0.0
    if offload_optimizer:
        host_optimizer, optimizer, master = optimizer + master, 0.0, 0.0
    if offload_param:
        host_weights, frozen_w, trainable_w = frozen_w + trainable_w, 0.0, 0.0

    tokens = batch_size * seq_len
    per_layer = _activation_bytes_per_token_layer(
        w, hidden_size, inter, gated, heads, seq_len, attn_implementation
    )
    # Backward materialises the gradients of one layer's saved tensors at a time: one more layer.
    if gradient_checkpointing:
        activations = tokens * (num_layers * hidden_size * w + 2 * per_layer)
    else:
        activations = tokens * (num_layers + 1) * per_layer
    activations += tokens * 2 * hidden_size * w  # final norm input and the head's input
    logits = tokens * vocab_size * (12 + (w if w < 4 else 0))

    assumptions = {
        "total_params": total_params,
        "trainable_params": trainable_params,
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "intermediate_size": inter,
        "num_heads": heads,
        "vocab_size": vocab_size,
        "method": method,
        "dtype": dtype,
        "quantization": quantization,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "gradient_checkpointing": gradient_checkpointing,
        "zero_stage": zero_stage,
        "world_size": world_size,
        "offload_optimizer": offload_optimizer,
        "offload_param": offload_param,
        "gated_mlp": gated,
        "attn_implementation": attn_implementation,
        "rule_of_thumb_bytes": rule_of_thumb_bytes(total_params, method, quantization, dtype),
    }
    return MemoryEstimate(
        frozen_weights_bytes=int(frozen_w),
        trainable_weights_bytes=int(trainable_w),
        master_weights_bytes=int(master),
        gradients_bytes=int(grads),
        optimizer_bytes=int(optimizer),
        gather_buffer_bytes=int(gather),
        activations_bytes=int(activations),
        logits_bytes=int(logits),
        overhead_bytes=CUDA_OVERHEAD_BYTES if device == "cuda" else CPU_OVERHEAD_BYTES,
        host_weights_bytes=int(host_weights),
        host_optimizer_bytes=int(host_optimizer),
        device=device,
        assumptions=assumptions,
    )
