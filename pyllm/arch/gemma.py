"""Gemma 2 (Gemma2ForCausalLM) and Gemma 3 text (Gemma3ForCausalLM).

Both: RMSNorm with (1 + w) weights (stored here as 1 + w), embeddings scaled by sqrt(hidden_size),
norms after attention and after the feed-forward block as well as before, gated GELU-tanh,
queries scaled by query_pre_attn_scalar ** -0.5, local (sliding-window) and global layers.
Gemma 2 soft-caps attention scores and final logits; Gemma 3 normalises q/k heads and gives the
local layers their own RoPE theta."""

from __future__ import annotations

from ..formats.safetensors import FormatError
from .base import (Architecture, activation_from_hf, base_config, llama_tensors, plus_one, refuse, rope_from_hf)

_RENAMED_NORMS = {  # Gemma's names -> pyllm's
    "post_attention_layernorm": "attn_post_norm", "pre_feedforward_layernorm": "post_attention_layernorm",
    "post_feedforward_layernorm": "ffn_post_norm",
}


def _block(cfg: dict, family: str) -> dict:
    act = activation_from_hf(cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh", family)
    for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
        value = cfg.get(key)  # (query_pre_attn_scalar -16 gave a complex attention scale; a cap of 0, a
        # division by 0 in transformers, ran uncapped)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < float("inf")):
            raise FormatError(f"config.json {key} must be a positive number or null, got {value!r:.40}")
    scalar = cfg.get("query_pre_attn_scalar")
    return dict(hidden_act=act, embedding_scale=float(cfg["hidden_size"]) ** 0.5, post_norms=True,
                attention_scale=float(scalar) ** -0.5 if scalar else None,
                attn_logit_softcapping=cfg.get("attn_logit_softcapping") or None,
                final_logit_softcapping=cfg.get("final_logit_softcapping") or None,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def gemma_defaults(family: str):
    def fill(cfg: dict) -> dict:
        """Gemma2Config's / Gemma3TextConfig's defaults. layer_types, absent from the configs transformers
        4.42-4.52 wrote (every Gemma 2 and Gemma 3 on the Hub), alternate sliding and full layers (Gemma 2)
        or make every sliding_window_pattern-th layer full (Gemma 3, 6): pyllm windowed every layer."""
        own = {"sliding_window": 4096, "query_pre_attn_scalar": 256, "head_dim": 256, "num_key_value_heads": 4}
        if family == "gemma2":
            own.update(final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
        elif "rope_parameters" not in cfg and "rope_theta" not in cfg:
            own["rope_theta"] = 1_000_000.0  # the global layers' (Gemma3TextConfig.default_theta)
        cfg = {**own, **cfg}
        pattern = 2 if family == "gemma2" else cfg.get("sliding_window_pattern", 6)
        if cfg.get("layer_types") is None and isinstance(cfg.get("num_hidden_layers"), int) and \
                isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
            cfg["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                  for i in range(cfg["num_hidden_layers"])]
        return cfg
    return fill


def gemma2_config(cfg: dict):
    return base_config(cfg, "gemma2", **_block(cfg, "gemma2"))


def gemma3_config(cfg: dict):
    block = _block(cfg, "gemma3")
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" in rope or "sliding_attention" in rope:  # transformers 5: per layer type
        # a layer type left out takes rope_theta / rope_local_base_freq, else Gemma3TextConfig's default_theta
        # (convert_rope_params_to_dict; pyllm took 1e4 for the global layers)
        full = {"rope_theta": cfg.get("rope_theta", 1_000_000.0), **(rope.get("full_attention") or {})}
        sliding = {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0), **(rope.get("sliding_attention") or {})}
        theta, scaling, _ = rope_from_hf(cfg, "gemma3", full)
        local, local_scaling, _ = rope_from_hf(cfg, "gemma3", sliding)
    else:  # transformers 4.x: rope_theta / rope_scaling for global layers, rope_local_base_freq for local
        theta, scaling, _ = rope_from_hf(cfg, "gemma3")
        local, local_scaling = float(cfg.get("rope_local_base_freq", 10000.0)), None
    if local_scaling is not None:
        raise refuse("RoPE scaling on the sliding-window layers", "gemma3")
    config = base_config({k: v for k, v in cfg.items() if k != "rope_parameters"}, "gemma3", qk_norm=True,
                         rope_theta=theta, rope_scaling=scaling, rope_theta_local=local, **block)
    return config


def gemma_tensors(config):
    recipes = llama_tensors(config, norm=plus_one)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm"):
            del recipes[p + name + ".weight"]
        recipes[p + "input_layernorm.weight"] = plus_one(p + "input_layernorm.weight")
        for hf, ours in _RENAMED_NORMS.items():
            recipes[p + ours + ".weight"] = plus_one(p + hf + ".weight")
    return recipes


GEMMA2 = Architecture(
    name="gemma2", model_types=("gemma2",), hf_classes=("Gemma2ForCausalLM",), gguf_name="gemma2",
    config_from_hf=gemma2_config, tensors=gemma_tensors, hf_defaults=gemma_defaults("gemma2"),
    notes="(1+w) RMSNorm, post-norms, GeGLU, soft-capping, local/global layers",
)
GEMMA3 = Architecture(
    name="gemma3", model_types=("gemma3_text",), hf_classes=("Gemma3ForCausalLM",), gguf_name="gemma3",
    config_from_hf=gemma3_config, tensors=gemma_tensors, hf_defaults=gemma_defaults("gemma3"),
    notes="Gemma 2's block with q/k norms and local RoPE theta (text model)",
)
