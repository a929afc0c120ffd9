"""Reading Hugging Face LLaMA-family checkpoints: config, weights (tensor by tensor), tokenizer, chat template."""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np

from ..formats.packed import ModelConfig, TokenizerSpec
from ..formats.safetensors import FormatError, SafetensorsFile
from ..quant import bf16_bits_to_f32

SUPPORTED_MODEL_TYPES = ("llama",)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return value


def model_config_from_hf(cfg: dict) -> ModelConfig:
    """Normalises a transformers config.json (4.x or 5.x layout) for the llama architecture."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise FormatError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)}; "
            "architectures: LlamaForCausalLM)"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise FormatError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
    # transformers 5 keeps theta and scaling in rope_parameters; 4.x in rope_theta / rope_scaling
    rope = dict(cfg.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = rope or cfg.get("rope_scaling") or None
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = {k: v for k, v in scaling.items() if k != "type"}
        scaling["rope_type"] = kind
        if kind == "default":
            scaling = None
        elif kind not in ("linear", "llama3"):
            raise FormatError(f"rope scaling type {kind!r} is not supported (supported: linear, llama3)")
    heads = cfg["num_attention_heads"]
    config = ModelConfig(
        architecture="llama",
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )
    config.validate()
    return config


class Checkpoint:
    """A Hugging Face model directory. Weights are loaded one tensor at a time as f32."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.fspath(directory)
        if not os.path.isdir(self.dir):
            raise FileNotFoundError(f"{self.dir} is not a directory")
        config_path = os.path.join(self.dir, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{self.dir} has no config.json: is it a Hugging Face model directory?")
        self.hf_config = _read_json(config_path)
        self.config = model_config_from_hf(self.hf_config)
        self._shards: dict[str, SafetensorsFile] = {}
        self._torch_state: dict | None = None
        self.weight_map = self._find_weights()

    def _find_weights(self) -> dict[str, str]:
        """tensor name -> file holding it."""
        d = self.dir
        single = os.path.join(d, "model.safetensors")
        index = os.path.join(d, "model.safetensors.index.json")
        if os.path.exists(single):
            return {name: single for name in self._shard(single).tensors}
        if os.path.exists(index):
            mapping = _read_json(index).get("weight_map")
            if not isinstance(mapping, dict):
                raise FormatError(f"{index}: no weight_map")
            return {name: os.path.join(d, shard) for name, shard in mapping.items()}
        for name in ("pytorch_model.bin",):
            path = os.path.join(d, name)
            if os.path.exists(path):
                return {k: path for k in self._torch(path)}
        if os.path.exists(os.path.join(d, "pytorch_model.bin.index.json")):
            mapping = _read_json(os.path.join(d, "pytorch_model.bin.index.json"))["weight_map"]
            return {name: os.path.join(d, shard) for name, shard in mapping.items()}
        raise FileNotFoundError(f"{d} has no model.safetensors, sharded safetensors or pytorch_model.bin")

    def _shard(self, path: str) -> SafetensorsFile:
        if path not in self._shards:
            self._shards[path] = SafetensorsFile(path)
        return self._shards[path]

    def _torch(self, path: str) -> dict:
        try:
            import torch
        except ImportError:
            raise RuntimeError(
                f"{path} is a PyTorch pickle; reading it needs torch (pip install torch), "
                "or convert the checkpoint to safetensors first"
            ) from None
        if self._torch_state is None or self._torch_state.get("__path__") != path:
            # weights_only refuses arbitrary pickled code; mmap keeps memory near one tensor
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            self._torch_state = {"__path__": path, **state}
        return {k: v for k, v in self._torch_state.items() if k != "__path__"}

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        path = self.weight_map[name]
        if path.endswith(".safetensors"):
            return self._shard(path).tensors[name].shape
        return tuple(self._torch(path)[name].shape)

    def load(self, name: str) -> np.ndarray:
        """The tensor as a float32 numpy array."""
        if name not in self.weight_map:
            raise FormatError(f"{self.dir}: checkpoint lacks tensor '{name}'")
        path = self.weight_map[name]
        if path.endswith(".safetensors"):
            f = self._shard(path)
            info = f.tensors.get(name)
            if info is None:
                raise FormatError(f"{path}: index says it holds '{name}' but it does not")
            raw = f.array(name)
            if info.dtype == "BF16":
                return bf16_bits_to_f32(raw)
            if info.dtype not in ("F32", "F16", "F64"):
                raise FormatError(f"{path}: tensor '{name}' has non-float dtype {info.dtype}")
            return raw.astype(np.float32)
        import torch

        return self._torch(path)[name].to(torch.float32).numpy()

    def names(self) -> Iterator[str]:
        return iter(self.weight_map)

    def close(self) -> None:
        for f in self._shards.values():
            f.close()
        self._shards.clear()
        self._torch_state = None


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer(directory: str) -> tuple[TokenizerSpec, bytes]:
    """The tokenizer of a Hugging Face directory: its spec and the blob to embed."""
    tok_config_path = os.path.join(directory, "tokenizer_config.json")
    tok_config = _read_json(tok_config_path) if os.path.exists(tok_config_path) else {}
    json_path = os.path.join(directory, "tokenizer.json")
    spm_path = os.path.join(directory, "tokenizer.model")
    spec = TokenizerSpec(kind="hf")
    spec.bos_token = _token_content(tok_config.get("bos_token"))
    spec.eos_token = _token_content(tok_config.get("eos_token"))
    spec.pad_token = _token_content(tok_config.get("pad_token"))
    spec.unk_token = _token_content(tok_config.get("unk_token"))
    added = {}
    for token_id, entry in (tok_config.get("added_tokens_decoder") or {}).items():
        content = _token_content(entry)
        if content is not None:
            added[content] = int(token_id)

    if os.path.exists(json_path):
        from tokenizers import Tokenizer

        with open(json_path, "rb") as f:
            blob = f.read()
        tok = Tokenizer.from_str(blob.decode("utf-8"))
        lookup = tok.token_to_id
        spec.kind = "hf"
        if "add_bos_token" in tok_config:
            spec.add_bos_token = bool(tok_config["add_bos_token"])
        else:  # the tokenizer.json post-processor decides, as in transformers
            bos = lookup(spec.bos_token) if spec.bos_token else None
            ids = tok.encode("a", add_special_tokens=True).ids
            spec.add_bos_token = bos is not None and bool(ids) and ids[0] == bos
        spec.add_eos_token = bool(tok_config.get("add_eos_token", False))
    elif os.path.exists(spm_path):
        import sentencepiece as spm

        with open(spm_path, "rb") as f:
            blob = f.read()
        sp = spm.SentencePieceProcessor(model_proto=blob)
        spec.kind = "sentencepiece"

        def lookup(token: str):
            if token in added:
                return added[token]
            i = sp.piece_to_id(token)
            return None if i == sp.unk_id() and token != sp.id_to_piece(sp.unk_id()) else i

        spec.bos_token = spec.bos_token or (sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None)
        spec.eos_token = spec.eos_token or (sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None)
        spec.add_bos_token = bool(tok_config.get("add_bos_token", True))
        spec.add_eos_token = bool(tok_config.get("add_eos_token", False))
        spec.added_tokens = {t: i for t, i in added.items() if i >= sp.get_piece_size()}
    else:
        raise FileNotFoundError(f"{directory} has neither tokenizer.json nor tokenizer.model")

    spec.bos_token_id = lookup(spec.bos_token) if spec.bos_token else None
    eos_ids = []
    if spec.eos_token and lookup(spec.eos_token) is not None:
        eos_ids.append(lookup(spec.eos_token))
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.exists(gen_path):
        gen_eos = _read_json(gen_path).get("eos_token_id")
        for i in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if isinstance(i, int) and i not in eos_ids:
                eos_ids.append(i)
    spec.eos_token_ids = eos_ids
    return spec, blob


def read_chat_template(directory: str) -> str:
    """chat_template.jinja, else tokenizer_config.json's chat_template ('default' of a list), else ''."""
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    tok_config_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.exists(tok_config_path):
        return ""
    template = _read_json(tok_config_path).get("chat_template") or ""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), "")
    return template if isinstance(template, str) else ""


GENERATION_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "do_sample", "max_new_tokens")


def read_generation_defaults(directory: str) -> dict:
    path = os.path.join(directory, "generation_config.json")
    if not os.path.exists(path):
        return {}
    cfg = _read_json(path)
    return {k: cfg[k] for k in GENERATION_KEYS if k in cfg and cfg[k] is not None}
