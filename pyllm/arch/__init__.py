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
    classes = cfg.get("architectures") if isinstance(cfg.get("architectures"), list) else []
    if model_type is None:  # as llama.cpp's converter, which goes by architectures[0]: "model_type None"
        for arch in ARCHITECTURES.values():
            if classes and classes[0] in arch.hf_classes:
                return arch
        raise FormatError(f"config.json has no model_type{f' and names {classes[0]!r:.60}' if classes else ''}; "
                          f"pyllm converts: {supported()}")
    text = cfg.get("text_config")
    if isinstance(text, dict) and any(text.get("model_type") in a.model_types for a in ARCHITECTURES.values()):
        # Gemma3ForConditionalGeneration and kin: said as one more unsupported type, with no hint why
        raise FormatError(f"model_type {model_type!r} is a multimodal model (its text model, text_config, is "
                          f"{text['model_type']!r}); pyllm converts text-only checkpoints: {supported()}")
    raise FormatError(f"model_type {model_type!r} is not supported; pyllm converts: {supported()}")


__all__ = ["ARCHITECTURES", "Architecture", "TensorRecipe", "for_hf_config", "supported"]
