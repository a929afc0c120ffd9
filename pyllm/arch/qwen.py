"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM: q/k/v biases) and Qwen3 (Qwen3ForCausalLM: per-head q/k RMSNorm)."""

from __future__ import annotations

from .base import Architecture, base_config, llama_tensors, require_silu


def qwen_defaults(head_dim: int | None):
    def fill(cfg: dict) -> dict:
        """Qwen2Config's / Qwen3Config's defaults: no window unless use_sliding_window, and then only on
        the layers from max_window_layers (28) on; pyllm windowed every layer when sliding_window was set."""
        cfg = {**({"head_dim": head_dim} if head_dim else {}), **cfg}
        if cfg.get("layer_types") is None:
            window = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window", False) else None
            start = cfg.get("max_window_layers", 28)
            cfg["layer_types"] = [
                "sliding_attention" if window is not None and i >= start else "full_attention"
                for i in range(cfg["num_hidden_layers"])] if isinstance(cfg.get("num_hidden_layers"), int) else None
            cfg["sliding_window"] = window
        return cfg
    return fill


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
    hf_defaults=qwen_defaults(None),
)
QWEN3 = Architecture(
    name="qwen3", model_types=("qwen3",), hf_classes=("Qwen3ForCausalLM",), gguf_name="qwen3",
    config_from_hf=qwen3_config, tensors=llama_tensors, notes="LLaMA block with per-head q/k RMSNorm",
    hf_defaults=qwen_defaults(128),
)
