"""Phi-3 / Phi-4-mini (Phi3ForCausalLM): the LLaMA block with q/k/v fused in qkv_proj and gate/up
fused in gate_up_proj (split here), partial rotary embedding in some versions."""

from __future__ import annotations

from .base import Architecture, base_config, defaults, llama_tensors, require_silu, split_rows


def config_from_hf(cfg: dict):
    require_silu(cfg, "phi3")
    return base_config(cfg, "phi3")


def tensors(config):
    recipes = llama_tensors(config)
    q, kv, f = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim, \
        config.intermediate_size
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        split_rows(recipes, p + "self_attn.qkv_proj",
                   {p + "self_attn.q_proj": q, p + "self_attn.k_proj": kv, p + "self_attn.v_proj": kv})
        split_rows(recipes, p + "mlp.gate_up_proj", {p + "mlp.gate_proj": f, p + "mlp.up_proj": f})
    return recipes


PHI3 = Architecture(
    name="phi3", model_types=("phi3",), hf_classes=("Phi3ForCausalLM",), gguf_name="phi3",
    config_from_hf=config_from_hf, tensors=tensors,
    lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    partial_rotary=True, hf_defaults=defaults({"rms_norm_eps": 1e-5}),
    notes="LLaMA block, fused qkv and gate_up, partial RoPE",
)
