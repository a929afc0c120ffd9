"""LLaMA (LlamaForCausalLM): the reference block. Also Llama 2/3, TinyLlama, SmolLM, Chinese-LLaMA."""

from __future__ import annotations

from .base import Architecture, base_config, llama_tensors, require_silu


def config_from_hf(cfg: dict):
    require_silu(cfg, "llama")
    return base_config(cfg, "llama")


LLAMA = Architecture(
    name="llama", model_types=("llama",), hf_classes=("LlamaForCausalLM",), gguf_name="llama",
    config_from_hf=config_from_hf, tensors=llama_tensors,
    notes="RMSNorm, RoPE (linear/llama3 scaling), GQA, gated SiLU",
)
