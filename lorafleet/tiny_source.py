"""Tiny checkpoints in the *original* published layouts of Baichuan2 / Baichuan-7B and ChatGLM3 / ChatGLM2.

They hold what the real repositories hold, at toy sizes: ``config.json`` with ``model_type`` baichuan
or chatglm and an ``auto_map`` naming the repository's modelling code (never written here, never
run), the original tensor names and fused projections (``W_pack``; ``query_key_value`` with bias,
multi-query key/value groups; ``dense_h_to_4h`` holding gate and up), Baichuan's ``.bin`` pickle or
ChatGLM's safetensors, and a SentencePiece ``tokenizer.model`` with its ``tokenizer_config.json``.
Tests load them through ``lorafleet.convert`` and compare against an independent reference forward.

Weights are random (no pre-training: the point is the layout and the equations). Run as::

    lorafleet tiny --arch baichuan2 --out .cache/tiny/baichuan2
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from lorafleet.convert import BAICHUAN_MARKERS, CHATGLM2_SPECIAL_TOKENS, CHATGLM3_SPECIAL_TOKENS

SOURCE_ARCHS = ("baichuan2", "baichuan", "chatglm3", "chatglm2")
"""Original-layout architectures ``build_source_checkpoint`` writes."""

_CHATGLM3_CHAT_TEMPLATE = (
    "[gMASK]sop{% for m in messages %}{% if m['role'] == 'system' %}<|system|>"
    "{% elif m['role'] == 'user' %}<|user|>{% elif m['role'] == 'assistant' %}<|assistant|>"
    "{% else %}<|observation|>{% endif %}\n {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""ChatGLM3's published chat format as a jinja template (its role tokens are what tell it from ChatGLM2)."""


def _sentencepiece_model(
    corpus: str, vocab_size: int, *, markers: tuple[str, ...], dummy_prefix: bool
) -> bytes:
    """A BPE SentencePiece model with byte fallback, as Baichuan's and ChatGLM's are."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    lines = [line for line in corpus.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=dummy_prefix,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        user_defined_symbols=list(markers),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return buffer.getvalue()


def _piece_count(model: bytes) -> int:
    import sentencepiece as spm

    return int(spm.SentencePieceProcessor(model_proto=model).get_piece_size())


def _normal(gen: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _norm_weight(gen: torch.Generator, size: int) -> torch.Tensor:
    # Not all ones, so a norm weight copied to the wrong place changes the logits.
    return 1.0 + _normal(gen, size, std=0.1)


def _baichuan(
    arch: str, vocab: int, s: dict[str, Any], gen: torch.Generator
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    hidden, inter, layers = s["hidden_size"], s["intermediate_size"], s["num_layers"]
    std = 1 / math.sqrt(hidden)
    config: dict[str, Any] = {
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_position_embeddings": 1024,
        "model_max_length": 1024,
        "model_type": "baichuan",
        "num_attention_heads": s["num_heads"],
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab,
    }
    if arch == "baichuan2":
        config["z_loss_weight"] = 0
    state = {"model.embed_tokens.weight": _normal(gen, vocab, hidden, std=1.0)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.W_pack.weight"] = _normal(gen, 3 * hidden, hidden, std=std)
        state[p + "self_attn.o_proj.weight"] = _normal(gen, hidden, hidden, std=std)
        state[p + "mlp.gate_proj.weight"] = _normal(gen, inter, hidden, std=std)
        state[p + "mlp.up_proj.weight"] = _normal(gen, inter, hidden, std=std)
        state[p + "mlp.down_proj.weight"] = _normal(gen, hidden, inter, std=1 / math.sqrt(inter))
        state[p + "input_layernorm.weight"] = _norm_weight(gen, hidden)
        state[p + "post_attention_layernorm.weight"] = _norm_weight(gen, hidden)
    state["model.norm.weight"] = _norm_weight(gen, hidden)
    # Rows of unequal norms: Baichuan2's NormHead normalises them, Baichuan-7B's plain head does not.
    head = _normal(gen, vocab, hidden, std=1.0)
    state["lm_head.weight"] = head * (0.5 + torch.rand(vocab, 1, generator=gen))
    return config, state


def _chatglm(
    vocab: int, s: dict[str, Any], gen: torch.Generator
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    hidden, inter, layers, heads = s["hidden_size"], s["intermediate_size"], s["num_layers"], s["num_heads"]
    groups, head_dim = s["num_kv_heads"], hidden // heads
    padded = 64 * math.ceil(vocab / 64)
    std = 1 / math.sqrt(hidden)
    config: dict[str, Any] = {
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": inter,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": hidden,
        "kv_channels": head_dim,
        "layernorm_epsilon": 1e-5,
        "model_type": "chatglm",
        "multi_query_attention": True,
        "multi_query_group_num": groups,
        "num_attention_heads": heads,
        "num_layers": layers,
        "original_rope": True,
        "padded_vocab_size": padded,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": 1024,
        "use_cache": True,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    rotary = head_dim // 2
    state = {
        "transformer.embedding.word_embeddings.weight": _normal(gen, padded, hidden, std=1.0),
        # Real checkpoints store the RoPE buffer; the converter drops it (Glm rebuilds it).
        "transformer.rotary_pos_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary)),
    }
    qkv_rows = (heads + 2 * groups) * head_dim
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        state[p + "input_layernorm.weight"] = _norm_weight(gen, hidden)
        state[p + "self_attention.query_key_value.weight"] = _normal(gen, qkv_rows, hidden, std=std)
        state[p + "self_attention.query_key_value.bias"] = _normal(gen, qkv_rows, std=0.1)
        state[p + "self_attention.dense.weight"] = _normal(gen, hidden, heads * head_dim, std=std)
        state[p + "post_attention_layernorm.weight"] = _norm_weight(gen, hidden)
        state[p + "mlp.dense_h_to_4h.weight"] = _normal(gen, 2 * inter, hidden, std=std)
        state[p + "mlp.dense_4h_to_h.weight"] = _normal(gen, hidden, inter, std=1 / math.sqrt(inter))
    state["transformer.encoder.final_layernorm.weight"] = _norm_weight(gen, hidden)
    state["transformer.output_layer.weight"] = _normal(gen, padded, hidden, std=std)
    return config, state


def _tokenizer_config(arch: str) -> dict[str, Any]:
    if arch.startswith("baichuan"):
        return {
            "tokenizer_class": "BaichuanTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<unk>",
            "model_max_length": 1024,
            "clean_up_tokenization_spaces": False,
        }
    config: dict[str, Any] = {
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "padding_side": "left",
        "remove_space": False,
        "do_lower_case": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
    }
    if arch == "chatglm3":
        config["chat_template"] = _CHATGLM3_CHAT_TEMPLATE
    return config


def write_source_checkpoint(out: Path, arch: str, corpus: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Write an original-layout checkpoint of ``arch`` into the empty directory ``out``.

    Returns:
        Facts for the tiny manifest: vocabulary (SentencePiece pieces, plus ChatGLM's special
        tokens), parameter count.
    """
    is_glm = arch.startswith("chatglm")
    markers = () if is_glm else BAICHUAN_MARKERS
    sp_model = _sentencepiece_model(corpus, settings["vocab_size"], markers=markers, dummy_prefix=is_glm)
    pieces = _piece_count(sp_model)
    gen = torch.Generator().manual_seed(settings["seed"])
    if is_glm:
        special = CHATGLM3_SPECIAL_TOKENS if arch == "chatglm3" else CHATGLM2_SPECIAL_TOKENS
        vocab = pieces + len(special)
        config, state = _chatglm(vocab, settings, gen)
    else:
        vocab = pieces
        config, state = _baichuan(arch, vocab, settings, gen)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "tokenizer.model").write_bytes(sp_model)
    (out / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(arch), indent=2), encoding="utf-8"
    )
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    if is_glm:
        from safetensors.torch import save_file

        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, str(out / "pytorch_model.bin"))  # Baichuan publishes pickled .bin shards
    parameters = sum(t.numel() for k, t in state.items() if not k.endswith("inv_freq"))
    return {"vocab_size": vocab, "num_parameters": parameters}
