"""The model families pyllm converts and runs: one Architecture entry each (pyllm/arch/base.py).

Adding a family: a module here with its config_from_hf and tensor table, one line in ARCHITECTURES,
and a tiny-model case in tests/families.py (docs/ARCHITECTURE.md, "Adding an architecture")."""

from __future__ import annotations

from ..formats.safetensors import FormatError
from .base import Architecture, TensorRecipe
from .bloom import BLOOM
from .gemma import GEMMA2, GEMMA3
from .glm import GLM, GLM4
from .gpt2 import GPT2
from .llama import LLAMA
from .mistral import MISTRAL
from .opt import OPT
from .phi3 import PHI3
from .qwen import QWEN2, QWEN3

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3, PHI3, BLOOM, OPT, GPT2, GLM, GLM4)}


def supported() -> str:
    """'llama (LlamaForCausalLM), mistral (...), ...' for error messages and help."""
    return ", ".join(f"{a.name} ({'/'.join(a.hf_classes)})" for a in ARCHITECTURES.values())


def for_hf_config(cfg: dict) -> Architecture:
    """The entry for a transformers config.json; FormatError naming the supported families otherwise."""
    model_type = cfg.get("model_type")
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    raise FormatError(f"model_type {model_type!r} is not supported; pyllm converts: {supported()}")


__all__ = ["ARCHITECTURES", "Architecture", "TensorRecipe", "for_hf_config", "supported"]
