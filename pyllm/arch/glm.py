"""GLM (GlmForCausalLM, GLM-4-9B's first release) and GLM-4 (Glm4ForCausalLM), ChatGLM's successors.

Both: RoPE on the first half of each head (partial_rotary_factor 0.5) with interleaved pairs
(2i, 2i + 1), which the converter turns into rotate-half pairs (i, i + rotary_dim / 2) by permuting
the rows of q_proj and k_proj (and their biases) inside each head: q.k is unchanged by a common
permutation, so the engines keep one RoPE convention. Gate and up are fused in gate_up_proj (split
here); q/k/v have biases. GLM-4 adds norms after attention and after the MLP."""

from __future__ import annotations

import numpy as np

from .base import Architecture, TensorRecipe, base_config, llama_tensors, require_silu, same, split_rows


def _config(cfg: dict, family: str, post_norms: bool):
    require_silu(cfg, family)
    bias = bool(cfg.get("attention_bias", True))
    return base_config(cfg, family, attention_bias=bias, attention_out_bias=False, post_norms=post_norms)


def glm_defaults(cfg: dict) -> dict:
    """GlmConfig's and Glm4Config's defaults (base.Architecture.hf_defaults), partial_rotary_factor 0.5
    included: pyllm's 1.0 rotated whole heads where transformers rotates half of each."""
    cfg = {"num_key_value_heads": 2, "head_dim": 128, "rms_norm_eps": 1.5625e-07, **cfg}
    if not any("partial_rotary_factor" in (c if isinstance(c, dict) else {})
               for c in (cfg, cfg.get("rope_parameters"), cfg.get("rope_scaling"))):
        cfg["partial_rotary_factor"] = 0.5
    return cfg


def glm_config(cfg: dict):
    return _config(cfg, "glm", post_norms=False)


def glm4_config(cfg: dict):
    return _config(cfg, "glm4", post_norms=True)


def interleaved_to_half(rows: np.ndarray, heads: int, head_dim: int, rotary_dim: int) -> np.ndarray:
    """Rows (or bias entries) of q_proj / k_proj [heads * head_dim, ...]: within each head, the
    rotary dims ordered (0, 2, 4, ..., 1, 3, 5, ...) so interleaved pairs become rotate-half pairs."""
    order = np.concatenate([np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2), np.arange(rotary_dim, head_dim)])
    shaped = rows.reshape(heads, head_dim, *rows.shape[1:])
    return np.ascontiguousarray(shaped[:, order].reshape(rows.shape))


def prefix_keys(keys: np.ndarray, config) -> np.ndarray:
    """A prefix-tuning adapter's keys [layers, kv_heads, virtual, head_dim] in the order
    interleaved_to_half gives k_proj's rows, so that they meet the permuted queries as in PEFT."""
    hd = config.head_dim
    rotary = config.rotary_dim or hd
    order = np.concatenate([np.arange(0, rotary, 2), np.arange(1, rotary, 2), np.arange(rotary, hd)])
    return np.ascontiguousarray(keys[..., order])


def tensors(config):
    recipes = llama_tensors(config)
    f, hd = config.intermediate_size, config.head_dim
    rotary = config.rotary_dim or hd
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        split_rows(recipes, p + "mlp.gate_up_proj", {p + "mlp.gate_proj": f, p + "mlp.up_proj": f})
        for proj, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads)):
            for part in ("weight", "bias") if config.attention_bias else ("weight",):
                name = p + f"self_attn.{proj}.{part}"
                recipes[name] = TensorRecipe((name,), lambda a, h=heads: interleaved_to_half(a[0], h, hd, rotary))
        if config.post_norms:
            recipes[p + "attn_post_norm.weight"] = same(p + "post_self_attn_layernorm.weight")
            recipes[p + "ffn_post_norm.weight"] = same(p + "post_mlp_layernorm.weight")
    return recipes


GLM = Architecture(
    name="glm", model_types=("glm",), hf_classes=("GlmForCausalLM",), gguf_name="chatglm",
    config_from_hf=glm_config, tensors=tensors, prefix_keys=prefix_keys,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
    partial_rotary=True, hf_defaults=glm_defaults,
    notes="partial interleaved RoPE, fused gate_up, q/k/v biases",
)
GLM4 = Architecture(
    name="glm4", model_types=("glm4",), hf_classes=("Glm4ForCausalLM",), gguf_name="glm4",
    config_from_hf=glm4_config, tensors=tensors, prefix_keys=prefix_keys,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
    partial_rotary=True, hf_defaults=glm_defaults,
    notes="GLM with post-attention and post-MLP norms",
)
