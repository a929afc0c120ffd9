"""Mistral (MistralForCausalLM): the LLaMA block with sliding-window attention on every layer."""

from __future__ import annotations

from .base import Architecture, activation_from_hf, base_config, llama_tensors, refuse


def config_from_hf(cfg: dict):
    if activation_from_hf(cfg.get("hidden_act", "silu"), "mistral") != "silu":
        raise refuse(f"hidden_act {cfg.get('hidden_act')!r} (Mistral uses silu)", "mistral")
    return base_config(cfg, "mistral")


MISTRAL = Architecture(
    name="mistral", model_types=("mistral",), hf_classes=("MistralForCausalLM",), gguf_name="llama",
    config_from_hf=config_from_hf, tensors=llama_tensors, notes="LLaMA block, sliding-window attention",
)
