"""Mistral (MistralForCausalLM): the LLaMA block with sliding-window attention on every layer."""

from __future__ import annotations

from .base import Architecture, base_config, defaults, llama_tensors, require_silu


def config_from_hf(cfg: dict):
    require_silu(cfg, "mistral")
    return base_config(cfg, "mistral")


MISTRAL = Architecture(
    name="mistral", model_types=("mistral",), hf_classes=("MistralForCausalLM",), gguf_name="llama",
    config_from_hf=config_from_hf, tensors=llama_tensors, notes="LLaMA block, sliding-window attention",
    hf_defaults=defaults({"sliding_window": 4096, "num_key_value_heads": 8}),  # MistralConfig's
)
