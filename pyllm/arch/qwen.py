"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM: q/k/v biases) and Qwen3 (Qwen3ForCausalLM: per-head q/k RMSNorm)."""

from __future__ import annotations

from .base import Architecture, base_config, llama_tensors, require_silu


def qwen2_config(cfg: dict):
    require_silu(cfg, "qwen2")
    # Qwen2's q/k/v always have biases and o_proj none (not configurable in transformers)
    return base_config(cfg, "qwen2", attention_bias=True, attention_out_bias=False)


def qwen3_config(cfg: dict):
    require_silu(cfg, "qwen3")
    bias = bool(cfg.get("attention_bias", False))
    return base_config(cfg, "qwen3", qk_norm=True, attention_bias=bias, attention_out_bias=bias)


QWEN2 = Architecture(
    name="qwen2", model_types=("qwen2",), hf_classes=("Qwen2ForCausalLM",), gguf_name="qwen2",
    config_from_hf=qwen2_config, tensors=llama_tensors, notes="LLaMA block with q/k/v biases",
)
QWEN3 = Architecture(
    name="qwen3", model_types=("qwen3",), hf_classes=("Qwen3ForCausalLM",), gguf_name="qwen3",
    config_from_hf=qwen3_config, tensors=llama_tensors, notes="LLaMA block with per-head q/k RMSNorm",
)
