"""Reference forwards of the original Baichuan2 / Baichuan-7B and ChatGLM2/3 architectures (test code).

Written from the published equations (``modeling_baichuan.py`` of Baichuan2-7B, ``modeling_chatglm.py``
of ChatGLM3-6B), independent of transformers and of ``lorafleet.convert``. The module names are the
original ones, so ``load_state_dict`` takes an original checkpoint as is and PEFT can wrap
``W_pack`` / ``query_key_value`` the way users of the remote-code models do.

Shapes: ``input_ids`` [batch, seq] (no padding) -> logits [batch, seq, vocab].
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)`` over the last dimension, computed in fp32."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v; q, k, v [batch, heads, seq, d]."""
    seq, d = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [batch, heads, seq, seq]
    mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(-1) @ v


class _BaichuanAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.hidden = heads, hidden
        self.W_pack = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        d = self.hidden // self.heads
        # W_pack rows are [q | k | v], each [hidden]; heads split each of them.
        q, k, v = (
            t.view(batch, seq, self.heads, d).transpose(1, 2) for t in self.W_pack(x).split(self.hidden, -1)
        )
        # RoPE over the whole head: theta_i = 10000^(-2i/d), rotate_half pairs (x_i, x_{i+d/2}).
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        angles = torch.outer(torch.arange(seq).float(), inv_freq)  # [seq, d/2]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

        def rope(t: torch.Tensor) -> torch.Tensor:
            half1, half2 = t[..., : d // 2], t[..., d // 2 :]
            return t * cos + torch.cat([-half2, half1], -1) * sin

        out = _causal_attention(rope(q), rope(k), v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.hidden))


class _BaichuanMLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _BaichuanLayer(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        hidden = c["hidden_size"]
        self.self_attn = _BaichuanAttention(hidden, c["num_attention_heads"])
        self.mlp = _BaichuanMLP(hidden, c["intermediate_size"])
        self.input_layernorm = RMSNorm(hidden, c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(hidden, c["rms_norm_eps"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class BaichuanReference(nn.Module):
    """Baichuan2-7B (``norm_head=True``: logits = h @ normalize(W_head, dim=1).T) or Baichuan-7B."""

    def __init__(self, config: dict[str, Any], norm_head: bool) -> None:
        super().__init__()
        hidden, vocab = config["hidden_size"], config["vocab_size"]
        self.norm_head = norm_head
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, hidden)
        self.model.layers = nn.ModuleList(_BaichuanLayer(config) for _ in range(config["num_hidden_layers"]))
        self.model.norm = RMSNorm(hidden, config["rms_norm_eps"])
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x)
        x = self.model.norm(x)
        weight = F.normalize(self.lm_head.weight, dim=1) if self.norm_head else self.lm_head.weight
        return F.linear(x, weight)


class _GlmSelfAttention(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.heads = c["num_attention_heads"]
        self.groups = c["multi_query_group_num"] if c["multi_query_attention"] else self.heads
        self.d = c["kv_channels"]
        rows = (self.heads + 2 * self.groups) * self.d
        self.query_key_value = nn.Linear(c["hidden_size"], rows, bias=c["add_qkv_bias"])
        self.dense = nn.Linear(self.heads * self.d, c["hidden_size"], bias=c["add_bias_linear"])

    def forward(self, x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        d, heads, groups = self.d, self.heads, self.groups
        q, k, v = self.query_key_value(x).split([heads * d, groups * d, groups * d], -1)
        q = q.view(batch, seq, heads, d)
        k, v = k.view(batch, seq, groups, d), v.view(batch, seq, groups, d)
        # RoPE on the first d/2 dims, pairs (x[2i], x[2i+1]) rotated by position * inv_freq[i].
        angles = torch.outer(torch.arange(seq).float(), inv_freq.float())  # [seq, d/4]
        cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

        def rope(t: torch.Tensor) -> torch.Tensor:
            rot, rest = t[..., : d // 2], t[..., d // 2 :]
            pairs = rot.reshape(*rot.shape[:-1], d // 4, 2)
            x0, x1 = pairs[..., 0], pairs[..., 1]
            rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2)
            return torch.cat([rotated, rest], -1)

        q, k = rope(q), rope(k)
        # Multi-query attention: head h reads key/value group h // (heads / groups).
        k = k.repeat_interleave(heads // groups, dim=2)
        v = v.repeat_interleave(heads // groups, dim=2)
        out = _causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.dense(out.transpose(1, 2).reshape(batch, seq, heads * d))


class _GlmMLP(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(c["hidden_size"], 2 * c["ffn_hidden_size"], bias=c["add_bias_linear"])
        self.dense_4h_to_h = nn.Linear(c["ffn_hidden_size"], c["hidden_size"], bias=c["add_bias_linear"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, -1)  # swiglu: silu(first half) * second half
        return self.dense_4h_to_h(F.silu(gate) * up)


class _GlmBlock(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        eps = c["layernorm_epsilon"]
        self.input_layernorm = RMSNorm(c["hidden_size"], eps)
        self.self_attention = _GlmSelfAttention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], eps)
        self.mlp = _GlmMLP(c)

    def forward(self, x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), inv_freq)
        return x + self.mlp(self.post_attention_layernorm(x))


class ChatGLMReference(nn.Module):
    """ChatGLM2-6B / ChatGLM3-6B with the published switches (RMSNorm, pre-norm residual, qkv bias)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hidden, vocab = config["hidden_size"], config["padded_vocab_size"]
        rotary = config["kv_channels"] // 2
        self.transformer = nn.Module()
        self.transformer.embedding = nn.Module()
        self.transformer.embedding.word_embeddings = nn.Embedding(vocab, hidden)
        self.transformer.rotary_pos_emb = nn.Module()
        base = 10000 * config.get("rope_ratio", 1)
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary, 2).float() / rotary))
        self.transformer.rotary_pos_emb.register_buffer("inv_freq", inv_freq)
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.layers = nn.ModuleList(
            _GlmBlock(config) for _ in range(config["num_layers"])
        )
        self.transformer.encoder.final_layernorm = RMSNorm(hidden, config["layernorm_epsilon"])
        self.transformer.output_layer = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        x = t.embedding.word_embeddings(input_ids)
        for block in t.encoder.layers:
            x = block(x, t.rotary_pos_emb.inv_freq)
        return t.output_layer(t.encoder.final_layernorm(x))


def load_reference(model_dir: Any) -> nn.Module:
    """The reference model of an original-layout checkpoint directory, its weights loaded strictly."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(model_dir)
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    if config["model_type"] == "baichuan":
        model: nn.Module = BaichuanReference(config, norm_head="z_loss_weight" in config)
        state = torch.load(str(root / "pytorch_model.bin"), weights_only=True)
    else:
        model = ChatGLMReference(config)
        state = load_file(str(root / "model.safetensors"))
    model.load_state_dict(state, strict=True)
    return model.eval()


def reference_with_adapter(model_dir: Any, adapter_dir: Any) -> nn.Module:
    """PEFT over the reference model of ``model_dir`` with the original-layout adapter in ``adapter_dir``
    (``W_pack`` / ``query_key_value`` targets, as ``lorafleet export --layout original`` writes them).

    The reference is a plain module, not a generation model: the adapter loads as a plain PeftModel
    (its ``task_type`` only adds generation plumbing, not math). Shapes as :func:`load_reference`.
    """
    from peft import LoraConfig, PeftModel

    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.task_type = None
    return PeftModel.from_pretrained(load_reference(model_dir), str(adapter_dir), config=config).eval()
