"""BLOOM (BloomForCausalLM): LayerNorm with biases (also right after the embedding), ALiBi instead of
position embeddings, q/k/v fused per head in query_key_value ([heads, 3, head_dim] rows, split here),
GELU-tanh MLP, biases everywhere, tied output."""

from __future__ import annotations

import numpy as np

from .base import Architecture, TensorRecipe, base_config, need, refuse, same


def config_from_hf(cfg: dict):
    if cfg.get("apply_residual_connection_post_layernorm"):
        raise refuse("apply_residual_connection_post_layernorm=true", "bloom")
    hidden = need(cfg, "hidden_size", "n_embed")
    heads = need(cfg, "n_head", "num_attention_heads")
    return base_config(
        dict(cfg, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
             num_hidden_layers=need(cfg, "n_layer", "num_hidden_layers"), intermediate_size=4 * hidden,
             rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5), max_position_embeddings=2048,
             rope_parameters=None, attention_bias=True, tie_word_embeddings=cfg.get("tie_word_embeddings", True)),
        "bloom", norm_type="layer_norm", embedding_norm=True, position_embedding="alibi", ffn_type="plain",
        hidden_act="gelu_pytorch_tanh", attention_bias=True, attention_out_bias=True, mlp_bias=True)


def _qkv_part(name: str, part: int, heads: int, head_dim: int) -> TensorRecipe:
    """q (0), k (1) or v (2) of a per-head interleaved fused weight [heads * 3 * head_dim, ...] or bias."""
    def make(a):
        w = a[0].reshape(heads, 3, head_dim, -1)[:, part]
        return np.ascontiguousarray(w.reshape(heads * head_dim, -1).squeeze(-1) if a[0].ndim == 1 else
                                    w.reshape(heads * head_dim, -1))
    return TensorRecipe((name,), make)


def tensors(config):
    h = "transformer."
    recipes = {"model.embed_tokens.weight": same(h + "word_embeddings.weight")}
    for part in ("weight", "bias"):
        recipes[f"model.embed_norm.{part}"] = same(h + f"word_embeddings_layernorm.{part}")
        recipes[f"model.norm.{part}"] = same(h + f"ln_f.{part}")
    if not config.tie_word_embeddings:
        recipes["lm_head.weight"] = same("lm_head.weight")
    heads, hd = config.num_attention_heads, config.head_dim
    for i in range(config.num_hidden_layers):
        src, p = f"{h}h.{i}.", f"model.layers.{i}."
        for part in ("weight", "bias"):
            recipes[p + f"input_layernorm.{part}"] = same(src + f"input_layernorm.{part}")
            recipes[p + f"post_attention_layernorm.{part}"] = same(src + f"post_attention_layernorm.{part}")
            for index, ours in enumerate(("q_proj", "k_proj", "v_proj")):
                recipes[p + f"self_attn.{ours}.{part}"] = _qkv_part(src + f"self_attention.query_key_value.{part}",
                                                                     index, heads, hd)
            recipes[p + f"self_attn.o_proj.{part}"] = same(src + f"self_attention.dense.{part}")
            recipes[p + f"mlp.up_proj.{part}"] = same(src + f"mlp.dense_h_to_4h.{part}")
            recipes[p + f"mlp.down_proj.{part}"] = same(src + f"mlp.dense_4h_to_h.{part}")
    return recipes


BLOOM = Architecture(
    name="bloom", model_types=("bloom",), hf_classes=("BloomForCausalLM",), gguf_name="bloom",
    config_from_hf=config_from_hf, tensors=tensors,
    lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    hf_embedding="transformer.word_embeddings.weight",
    notes="LayerNorm (+ after embedding), ALiBi, fused per-head qkv, GELU MLP, biases",
)
