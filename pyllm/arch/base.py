"""What every architecture entry is made of: the Architecture record, the tensor recipes that turn a
checkpoint's tensors into pyllm's, and the config readers the families share.

pyllm's tensor names are LLaMA's Hugging Face names ("model.layers.0.self_attn.q_proj.weight"), plus
model.embed_positions, model.embed_norm and the layers' attn_post_norm / ffn_post_norm for the parts
LLaMA lacks (docs/FORMAT.md). A family maps its own names onto these, splitting fused matrices and
folding conventions (Gemma's (1 + w) norms, GLM's interleaved RoPE pairs, GPT-2's [in, out] Conv1D
weights) into plain tensors, so the engines see one block with a few switches (ModelConfig).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..formats.packed import ModelConfig, checked_size
from ..formats.safetensors import FormatError

Arrays = list  # list[np.ndarray]


@dataclass(frozen=True)
class TensorRecipe:
    """One pyllm tensor made from checkpoint tensors: make([f32 arrays of `sources`]) -> f32 array."""

    sources: tuple[str, ...]
    make: Callable[[Arrays], np.ndarray] = lambda arrays: arrays[0]


def same(name: str) -> TensorRecipe:
    return TensorRecipe((name,))


def transposed(name: str) -> TensorRecipe:
    """A Conv1D weight stored [in, out] (GPT-2) as [out, in]."""
    return TensorRecipe((name,), lambda a: np.ascontiguousarray(a[0].T))


def plus_one(name: str) -> TensorRecipe:
    """A norm weight w applied as (1 + w) (Gemma's RMSNorm), stored as 1 + w."""
    return TensorRecipe((name,), lambda a: (a[0].astype(np.float32) + np.float32(1.0)))


def row_block(name: str, start: int, stop: int, transpose: bool = False, total: int | None = None) -> TensorRecipe:
    """Rows [start, stop) of a fused matrix or bias (q/k/v stacked, gate/up stacked) of `total` rows
    (ValueError for another count: a Phi-3 config.json declaring 2 key heads over a 4-head qkv_proj
    gave q/k/v the first 128 of its 192 rows, a model that ran and answered wrongly)."""
    def make(a):
        w = a[0].T if transpose else a[0]
        if total is not None and w.shape[0] != total:
            raise ValueError(f"it has {w.shape[0]} rows where config.json's sizes make {total}")
        return np.ascontiguousarray(w[start:stop])
    return TensorRecipe((name,), make)


@dataclass(frozen=True)
class Architecture:
    """One model family: how its transformers checkpoints become a pyllm model.

    config_from_hf(config.json dict) -> ModelConfig, refusing by name what the engines do not run.
    tensors(config) -> {pyllm tensor name: TensorRecipe}: every tensor the .pllm file holds.
    hf_embedding / hf_lm_head: the checkpoint's names of the embedding and output matrices (LoRA's
    vocabulary rules act on them). lora_targets: the module names `pyllm train` adapts by default
    (every projection of the block, under the family's names)."""

    name: str
    model_types: tuple[str, ...]
    hf_classes: tuple[str, ...]
    config_from_hf: Callable[[dict], ModelConfig]
    tensors: Callable[[ModelConfig], dict[str, TensorRecipe]]
    hf_embedding: str = "model.embed_tokens.weight"
    hf_lm_head: str = "lm_head.weight"
    gguf_name: str | None = None
    conv1d_modules: tuple[str, ...] = ()  # module names ending so hold weights [in, out] (GPT-2's Conv1D)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    notes: str = ""  # one line for `pyllm convert --help` and the README's family table
    # the reordering of each key head's dims that tensors() gives k_proj's rows, applied to a prefix-tuning
    # adapter's keys f32 [layers, kv_heads, virtual, head_dim] (None: k_proj's rows are kept as they are)
    prefix_keys: Callable[[np.ndarray, ModelConfig], np.ndarray] | None = None
    # whether the family's transformers model rotates int(head_dim * partial_rotary_factor) dims of a head
    # (Phi-3, GLM); the others rotate the whole head whatever config.json says (LlamaRotaryEmbedding never
    # reads the factor, nor does llama.cpp's converter for them), so the factor is dropped from their configs
    partial_rotary: bool = False
    # config.json with transformers' config class defaults filled in for the keys it omits, where the class's
    # default is not what the readers below assume (GlmConfig's num_key_value_heads 2, Gemma2Config's
    # soft-capping, the layer_types a class derives from sliding_window_pattern or max_window_layers):
    # an omitted key ran another model than transformers' in silence. Hugging Face configs only (GGUF
    # metadata names everything).
    hf_defaults: Callable[[dict], dict] | None = None
    extra: dict = field(default_factory=dict)


# --- config readers shared by the families --------------------------------------------------------

# config keys whose presence (with a truthy value) means a feature the engines do not implement
REFUSED_KEYS = {
    "num_experts": "mixture-of-experts layers", "num_local_experts": "mixture-of-experts layers",
    "n_routed_experts": "mixture-of-experts layers", "moe_intermediate_size": "mixture-of-experts layers",
    "add_cross_attention": "cross-attention", "cross_attention_layers": "cross-attention",
    "use_bidirectional_attention": "bidirectional attention",
}
ROPE_TYPES = ("default", "linear", "llama3")


def refuse(what: str, family: str) -> FormatError:
    return FormatError(f"{family}: {what} is not supported by pyllm's engines; the model cannot be converted")


def check_refused(cfg: dict, family: str) -> None:
    for key, what in REFUSED_KEYS.items():
        if cfg.get(key):
            raise refuse(f"{what} ({key}={cfg[key]!r})", family)


def need(cfg: dict, *keys: str, default=None):
    """The first of `keys` present in cfg (transformers' names change between families)."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    if default is not None:
        return default
    raise FormatError(f"config.json lacks {' / '.join(keys)}")


def rope_from_hf(cfg: dict, family: str, parameters: dict | None = None) -> tuple[float, dict | None, float]:
    """(theta, scaling or None, partial_rotary_factor) from transformers 5's rope_parameters or 4.x's
    rope_theta / rope_scaling / partial_rotary_factor. Unknown scaling types are refused by name."""
    rope = dict(parameters if parameters is not None else (cfg.get("rope_parameters") or {}))
    legacy = cfg.get("rope_scaling")
    # transformers 5 reads rope_scaling as rope_parameters (convert_rope_params_to_dict): a rope_theta or
    # partial_rotary_factor inside it wins over the top-level one (pyllm took the top-level one, in silence)
    inner = legacy if parameters is None and isinstance(legacy, dict) and legacy else rope
    theta = inner.get("rope_theta", cfg.get("rope_theta", 10000.0))
    partial = inner.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    rope.pop("rope_theta", None)
    rope.pop("partial_rotary_factor", None)
    if parameters is None and rope and isinstance(legacy, dict) and _scaling_key(legacy) != _scaling_key(rope):
        # transformers takes rope_scaling over rope_parameters (convert_rope_params_to_dict), pyllm took
        # rope_parameters: the two would run the model with different positions, in silence
        raise FormatError(f"config.json: rope_parameters {rope!r:.120} and rope_scaling {legacy!r:.120} disagree; "
                          "keep one of them")
    scaling = rope or legacy or None
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta", "partial_rotary_factor")}
        scaling["rope_type"] = kind
        if kind == "default":
            scaling = None
        elif kind not in ROPE_TYPES:
            raise refuse(f"rope scaling type {kind!r} (supported: {', '.join(ROPE_TYPES[1:])})", family)
        elif kind == "llama3":
            # transformers' standardize_rope_params: a top-level original_max_position_embeddings wins over
            # the scaling's own, and max_position_embeddings stands in for a missing one (pyllm refused
            # the config, or took the scaling's value)
            if parameters is None and cfg.get("original_max_position_embeddings") is not None:
                scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
            elif cfg.get("max_position_embeddings") is not None:
                scaling.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
    return float(theta), scaling, float(partial)


def _scaling_key(scaling: dict) -> dict:
    """A RoPE scaling dict compared by meaning: 'type' as 'rope_type', theta and partial factor left out."""
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta", "partial_rotary_factor")}
    out["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return {} if out == {"rope_type": "default"} else out


def rotary_dim_for(head_dim: int, partial: float) -> int | None:
    """transformers' int(head_dim * partial_rotary_factor); None when that is the whole head."""
    dim = int(head_dim * partial)
    return None if dim == head_dim else dim


def defaults(values: dict) -> Callable[[dict], dict]:
    """An hf_defaults of fixed values: cfg's own keys win, null included."""
    return lambda cfg: {**values, **cfg}


def layer_types_from_hf(cfg: dict, layers: int) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types): which layers attend through a window, as transformers decides."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types is not None:
        types = list(types)
        if len(types) != layers or any(t not in ("full_attention", "sliding_attention") for t in types):
            raise FormatError(f"config.json: layer_types must list full_attention or sliding_attention for each "
                              f"of the {layers} layers, got {types!r}")
        if "sliding_attention" not in types:
            return None, None
        if not window:
            raise FormatError("config.json: sliding_attention layers need a sliding_window")
        return int(window), types
    if cfg.get("use_sliding_window") is False:
        return None, None
    return (int(window), None) if window else (None, None)


def base_config(cfg: dict, architecture: str, **block) -> ModelConfig:
    """The sizes every family names the LLaMA way (config keys of Llama/Mistral/Qwen/Gemma/Phi/GLM),
    plus `block`'s description; validated."""
    check_refused(cfg, architecture)
    heads = checked_size("num_attention_heads", need(cfg, "num_attention_heads"), "config.json")
    hidden = checked_size("hidden_size", need(cfg, "hidden_size"), "config.json")
    head_dim = cfg.get("head_dim") or hidden // heads
    theta, scaling, partial = rope_from_hf(cfg, architecture)
    layers = checked_size("num_hidden_layers", need(cfg, "num_hidden_layers"), "config.json")
    window, types = layer_types_from_hf(cfg, layers)
    values = dict(
        architecture=architecture, vocab_size=need(cfg, "vocab_size"), hidden_size=hidden,
        intermediate_size=need(cfg, "intermediate_size"), num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
        norm_eps=float(need(cfg, "rms_norm_eps", default=1e-6)), rope_theta=theta, rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        attention_bias=bool(cfg.get("attention_bias", False)), attention_out_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)), rotary_dim=rotary_dim_for(head_dim, partial),
        sliding_window=window, layer_types=types,
    )
    values.update(block)
    config = ModelConfig(**values)
    config.validate()
    return config


def activation_from_hf(name: str | None, family: str) -> str:
    """transformers' activation names -> pyllm's (ACTIVATIONS)."""
    names = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_pytorch_tanh", "gelu_new": "gelu_pytorch_tanh",
             "gelu_fast": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}
    if name not in names:
        raise refuse(f"activation {name!r} (supported: {', '.join(sorted(names))})", family)
    return names[name]


def require_silu(cfg: dict, family: str) -> None:
    """Refuses a hidden_act other than SiLU for a family whose block is gated SiLU."""
    if activation_from_hf(cfg.get("hidden_act", "silu"), family) != "silu":
        raise refuse(f"hidden_act {cfg.get('hidden_act')!r} (the {family} block is gated SiLU)", family)


# --- tensor tables -----------------------------------------------------------------------------------

def llama_tensors(config: ModelConfig, norm=same) -> dict[str, TensorRecipe]:
    """LLaMA's names, taken as they are (norm: how norm weights are read, plus_one for Gemma)."""
    recipes = {"model.embed_tokens.weight": same("model.embed_tokens.weight"),
               "model.norm.weight": norm("model.norm.weight")}
    if not config.tie_word_embeddings:
        recipes["lm_head.weight"] = same("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj"):
            recipes[p + name + ".weight"] = same(p + name + ".weight")
        for norm_name in ("input_layernorm", "post_attention_layernorm"):
            recipes[p + norm_name + ".weight"] = norm(p + norm_name + ".weight")
        if config.qk_norm:
            for which in ("q_norm", "k_norm"):
                recipes[p + f"self_attn.{which}.weight"] = norm(p + f"self_attn.{which}.weight")
    for name in config.bias_names():
        recipes[name] = same(name)
    return recipes


def split_rows(recipes: dict, fused: str, parts: dict[str, int], transpose: bool = False, bias: bool = False) -> None:
    """Adds recipes for the row blocks of a fused matrix `fused` (name without .weight): parts maps
    pyllm base names to row counts, in the fused order."""
    start, total = 0, sum(parts.values())
    for base, rows in parts.items():
        recipes[base + ".weight"] = row_block(fused + ".weight", start, start + rows, transpose, total)
        if bias:
            recipes[base + ".bias"] = row_block(fused + ".bias", start, start + rows, total=total)
        start += rows
