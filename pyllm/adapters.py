"""Prompt-learning adapters (PEFT prompt tuning, P-tuning, prefix tuning) stored in a .pllm file and
run by the engine without touching the base weights: many tasks on one copy of the model.

What PEFT saves (adapter_model.safetensors, `prompt_embeddings`) is what its forward uses at
inference: for P-tuning (MLP or LSTM encoder) and projected prefixes, the encoder's output, computed
when the adapter was saved (peft's get_prompt_embedding_to_save). So no encoder runs here.

  prompt tuning, P-tuning   prompt_embeddings [virtual, hidden]: input embeddings of `virtual`
                            positions 0..virtual-1, before the real tokens (PEFT concatenates them to
                            inputs_embeds); stored as `adapter.NAME.prompt` f32 [virtual, hidden]
  prefix tuning             prompt_embeddings [virtual, layers * 2 * kv_heads * head_dim], which PEFT views
                            as [virtual, layers * 2, kv_heads, head_dim] and permutes into each layer's
                            key and value (pairs 2l, 2l + 1) passed as past_key_values: keys as given (no
                            RoPE; GLM's head dims reordered as its k_proj rows are, Architecture.prefix_keys),
                            the real tokens at positions virtual.. after them; stored as
                            `adapter.NAME.prefix` f32 [layers, 2, kv_heads, virtual, head_dim]

The file's metadata `pyllm.adapters` (JSON) lists them: {name: {"type": "prompt" | "prefix",
"virtual_tokens": n, "peft_type": ..., "base_model": ...}} (docs/FORMAT.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .formats.packed import ModelConfig
from .formats.safetensors import FormatError, PlannedTensor, SafetensorsFile, loads_json

PEFT_TYPES = {"PROMPT_TUNING": "prompt", "P_TUNING": "prompt", "PREFIX_TUNING": "prefix"}
METADATA_KEY = "pyllm.adapters"
MAX_VIRTUAL_TOKENS = 4096
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass
class PromptAdapter:
    """One prompt-learning adapter. tensor: f32 [virtual, hidden] (prompt) or
    [layers, 2, kv_heads, virtual, head_dim] (prefix)."""

    name: str
    kind: str  # "prompt" or "prefix"
    tensor: np.ndarray
    peft_type: str = ""
    base_model: str = ""

    @property
    def virtual_tokens(self) -> int:
        return int(self.tensor.shape[0] if self.kind == "prompt" else self.tensor.shape[3])

    @property
    def tensor_name(self) -> str:
        return f"adapter.{self.name}.{self.kind}"

    def metadata(self) -> dict:
        return {"type": self.kind, "virtual_tokens": self.virtual_tokens, "peft_type": self.peft_type,
                "base_model": self.base_model}


def check_name(name: str) -> str:
    if not name or len(name) > 64 or not set(name) <= NAME_CHARS or name == "base":
        raise ValueError(f"adapter name {name!r}: use 1-64 letters, digits, '_', '-' or '.' (and not 'base')")
    return name


def read_peft_adapter(directory: str, config: ModelConfig, name: str | None = None,
                      base_dir: str | None = None, log=None) -> PromptAdapter:
    """The PEFT prompt-learning adapter in `directory`, checked against the base `config` (and, given
    the base's Hugging Face directory, against the model its adapter_config.json names).

    Raises FormatError for another kind of adapter, a tensor of the wrong shape (another hidden size,
    layer count or kv-head count: trained on another model) or tensors besides the virtual tokens
    (PEFT's modules_to_save, which the engine would not run). A base model of another name is a warning
    on log (default stderr), as for LoRA adapters (pyllm/convert/adapter_base.py says why)."""
    from .convert.adapter_base import adapter_config_path, adapter_weights_path
    from .convert.checkpoint import _read_json

    directory = os.fspath(directory)
    config_path = adapter_config_path(directory, "adapter")
    try:
        cfg = _read_json(config_path)  # (bounded, as every checkpoint file: a FIFO or /dev/zero is refused)
    except OSError as e:
        raise FormatError(f"{config_path}: not readable ({e.strerror or e})") from None
    peft_type = cfg.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise FormatError(f"{directory}: peft_type {peft_type!r} is not a prompt-learning adapter "
                          f"({', '.join(PEFT_TYPES)}; LoRA adapters are merged with --lora)")
    # null: PEFT's own default, 1 for a causal LM (an adapter_config.json written by hand, or by an older PEFT)
    if cfg.get("num_transformer_submodules") not in (None, 1):
        raise FormatError(f"{directory}: num_transformer_submodules {cfg['num_transformer_submodules']!r:.40}: "
                          "adapters of encoder-decoder models are not supported")
    # as for LoRA adapters: one trained for classification (SEQ_CLS, with its own head) or another task was
    # stored, and its virtual tokens ran for generation, which nobody trained them for
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise FormatError(f"{directory}: task_type {cfg.get('task_type')!r}; only CAUSAL_LM adapters apply to a "
                          "causal language model")
    if name is None:  # the directory's name (of its absolute path: `--adapter .` was named "."): say so, and how
        name = os.path.basename(os.path.abspath(directory))  # to give another
        try:
            check_name(name)
        except ValueError as e:
            raise ValueError(f"{e}; it is the directory's name: name the adapter (--adapter NAME={directory})") from None
    weights = adapter_weights_path(directory)
    with SafetensorsFile(weights) as f:
        if "prompt_embeddings" not in f.tensors:
            raise FormatError(f"{weights}: no 'prompt_embeddings' tensor")
        # PEFT saves a trained copy of each module in modules_to_save (lm_head, embed_tokens, a classifier)
        # beside the virtual tokens, and its forward runs them: dropped here, the stored adapter gave other
        # logits than PEFT's, silently
        others = sorted(set(f.tensors) - {"prompt_embeddings"})
        if others:
            listed = cfg.get("modules_to_save")
            raise FormatError(
                f"{weights}: holds {len(others)} tensor(s) besides 'prompt_embeddings' ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}){f', the modules_to_save {listed}' if listed else ''}: "
                "a prompt-learning adapter stored beside the base weights carries its virtual tokens only; "
                "train it without modules_to_save")
        from .convert.checkpoint import load_float32

        raw = load_float32(f, "prompt_embeddings")
    kind = PEFT_TYPES[peft_type]
    virtual = cfg.get("num_virtual_tokens")
    if (raw.ndim != 2 or not isinstance(virtual, int) or raw.shape[0] != virtual
            or not 0 < virtual <= MAX_VIRTUAL_TOKENS):
        raise FormatError(f"{weights}: prompt_embeddings has shape {list(raw.shape)}, expected "
                          f"[num_virtual_tokens={virtual!r} (at most {MAX_VIRTUAL_TOKENS}), ...]")
    if not np.isfinite(raw).all():
        raise FormatError(f"{weights}: prompt_embeddings holds NaN or infinite values")
    layers, kv, hd = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    if kind == "prompt":
        if raw.shape[1] != config.hidden_size:
            raise FormatError(f"{weights}: tensor 'prompt_embeddings' has {raw.shape[1]} dims, the base model's "
                              f"hidden size is {config.hidden_size}: trained on another model?")
        tensor = np.ascontiguousarray(raw, dtype=np.float32)
    else:
        if raw.shape[1] != layers * 2 * kv * hd:
            raise FormatError(
                f"{weights}: tensor 'prompt_embeddings' (a prefix) has {raw.shape[1]} values per virtual token; the "
                f"base model needs layers x 2 x kv_heads x head_dim = {layers} x 2 x {kv} x {hd} = {layers * 2 * kv * hd}: trained "
                f"on another model (layer count {cfg.get('num_layers')}, heads {cfg.get('num_attention_heads')})?")
        # [virtual, layers * 2, kv_heads, head_dim] -> [layers, 2, kv_heads, virtual, head_dim]
        tensor = np.ascontiguousarray(raw.reshape(virtual, layers, 2, kv, hd).transpose(1, 2, 3, 0, 4),
                                      dtype=np.float32)
        from .arch import ARCHITECTURES

        arch = ARCHITECTURES.get(config.architecture)
        if arch is not None and arch.prefix_keys is not None:  # GLM: k_proj's rows are reordered on conversion
            tensor[:, 0] = arch.prefix_keys(tensor[:, 0], config)
    if base_dir and os.path.isdir(base_dir):
        from .convert.adapter_base import warn_if_other_base

        warn_if_other_base(cfg, directory, base_dir, log, kind="prompt-learning")
    return PromptAdapter(check_name(name), kind, tensor,
                         peft_type, str(cfg.get("base_model_name_or_path") or ""))


def planned_tensors(adapters: list[PromptAdapter]) -> tuple[dict, list[PlannedTensor]]:
    """The metadata entry and the tensors that store `adapters` in a .pllm file."""
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"two adapters are named alike: {names}; give each its own name (--adapter NAME=DIR)")
    plans = [PlannedTensor(a.tensor_name, "F32", tuple(a.tensor.shape), lambda t=a.tensor: t) for a in adapters]
    return {a.name: a.metadata() for a in adapters}, plans


def load_from_file(meta: dict, tensors: dict, array, config: ModelConfig, path: str) -> dict[str, PromptAdapter]:
    """The adapters a .pllm file lists, checked (FormatError naming what is wrong).
    meta: metadata; tensors: name -> info with .dtype/.shape; array(name) -> numpy view."""
    listed = loads_json(meta[METADATA_KEY], f"{path}: metadata '{METADATA_KEY}'") if METADATA_KEY in meta else {}
    if not isinstance(listed, dict):
        raise FormatError(f"{path}: metadata '{METADATA_KEY}' must be a JSON object")
    out = {}
    for name, info in listed.items():
        if not isinstance(info, dict) or info.get("type") not in ("prompt", "prefix"):
            raise FormatError(f"{path}: adapter {name!r} has no valid type")
        try:
            check_name(name)
        except ValueError as e:
            raise FormatError(f"{path}: {e}") from None
        kind = info["type"]
        tensor_name = f"adapter.{name}.{kind}"
        if tensor_name not in tensors or tensors[tensor_name].dtype != "F32":
            raise FormatError(f"{path}: adapter {name!r} lacks its F32 tensor '{tensor_name}'")
        shape = tuple(tensors[tensor_name].shape)
        virtual = shape[0] if kind == "prompt" else (shape[3] if len(shape) == 5 else 0)
        d, layers, kv, hd = config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        expected = (virtual, d) if kind == "prompt" else (layers, 2, kv, virtual, hd)
        if not 0 < virtual <= MAX_VIRTUAL_TOKENS or shape != expected:
            raise FormatError(f"{path}: adapter {name!r} tensor is {list(shape)}, the model needs {list(expected)} "
                              f"with 1..{MAX_VIRTUAL_TOKENS} virtual tokens")
        if info.get("virtual_tokens", virtual) != virtual:
            raise FormatError(f"{path}: adapter {name!r} lists {info['virtual_tokens']!r:.40} virtual tokens but its "
                              f"tensor holds {virtual}")
        tensor = array(tensor_name)
        # as read_peft_adapter and the writer refuse them: loaded, it made every generate() with it fail
        if not np.isfinite(tensor).all():
            raise FormatError(f"{path}: adapter {name!r} tensor '{tensor_name}' holds NaN or infinite values")
        out[name] = PromptAdapter(name, kind, tensor, str(info.get("peft_type", "")), str(info.get("base_model", "")))
    # an adapter's tensor without its entry: the listing edited (or cut) to leave it out, silently
    unlisted = sorted(n for n in tensors if n.startswith("adapter.") and n not in {a.tensor_name for a in out.values()})
    if unlisted:
        raise FormatError(f"{path}: tensor '{unlisted[0]}' is not an adapter that metadata '{METADATA_KEY}' lists")
    return out


def prime(engine, adapter: PromptAdapter, seq: int = 0) -> int:
    """Writes the adapter's virtual positions 0 .. virtual-1 into sequence `seq` of the engine's cache;
    returns how many. The real tokens then start at that position."""
    if adapter.kind == "prompt":
        engine.forward_embeddings(np.ascontiguousarray(adapter.tensor, dtype=np.float32), seq, 0)
    else:
        t = adapter.tensor
        engine.set_cache(seq, 0, np.ascontiguousarray(t[:, 0]), np.ascontiguousarray(t[:, 1]))
    return adapter.virtual_tokens
