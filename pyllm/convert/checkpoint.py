"""Reading Hugging Face checkpoints of the families in pyllm.arch: config, weights (tensor by tensor, under
the checkpoint's names or, through ArchitectureView, pyllm's), tokenizer, chat template."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import stat
import warnings
import zipfile
from typing import Iterator

import numpy as np

from ..arch import Architecture, for_hf_config
from ..chat_template import config_template
from ..errors import decode_text, file_kind, library_errors, read_bytes, read_text
from ..formats.packed import SIZE_LIMITS, ModelConfig, TokenizerSpec, check_generation_defaults
from ..formats.safetensors import FormatError, SafetensorsFile
from ..limits import MAX_CHAT_TEMPLATE_BYTES
from ..quant import bf16_bits_to_f32

# bytes of a checkpoint's small files read whole (config.json, tokenizer_config.json, an index,
# tokenizer.json, tokenizer.model; the largest released tokenizer.json files are ~35 MB); each must be a
# regular file (errors.read_bytes): a name that led to /dev/zero was read until memory ran out, one that
# led to a FIFO waited for ever for a writer
MAX_CHECKPOINT_FILE_BYTES = 256 * 2**20


# JSON values one of them may hold, counted as its commas, brackets and braces before parsing (inside
# strings too: an upper bound no escape hides), as for a .pllm header: Python's json takes ~60 bytes a
# value (a 205 MB index of 8 million entries took 26 s and 2.7 GB; 256 MB of "[[],[],...]" would take
# 5 GB). The largest released tokenizer.json (Gemma 3's 262k tokens and their merges) holds ~2 million;
# an index lists a tensor per entry (DeepSeek-V3's, ~92,000)
MAX_CHECKPOINT_JSON_VALUES = 1 << 22
MAX_INDEX_JSON_VALUES = 1 << 20


def _load_json_file(path: str, max_values: int = MAX_CHECKPOINT_JSON_VALUES, **hooks) -> tuple[str, object]:
    """(text, parsed value) of a checkpoint's JSON file: a regular file of at most MAX_CHECKPOINT_FILE_BYTES
    and max_values values (counted before parsing), valid JSON; FormatError naming the file otherwise."""
    raw = read_bytes(path, FormatError, MAX_CHECKPOINT_FILE_BYTES, regular=True)
    if raw.count(b",") + raw.count(b"[") + raw.count(b"{") > max_values:
        raise FormatError(f"{path} holds more than {max_values} JSON values (its commas, brackets and braces): too "
                          "many for what it should be")
    text = decode_text(raw, path, FormatError)
    try:
        return text, json.loads(text, **hooks)
    except (ValueError, RecursionError) as e:  # bad JSON; nesting deeper than the parser goes
        raise FormatError(f"{path}: invalid JSON ({type(e).__name__}: {e})") from None


def _read_json(path: str) -> dict:
    value = _load_json_file(path)[1]
    if not isinstance(value, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return value


class _Pairs(list):
    """A JSON object as its (key, value) pairs, duplicates kept."""


def _index_weight_map(index: str, suffix: str) -> dict[str, str]:
    """A shard index's weight_map as tensor name -> shard path. Shards are files of the index's own
    directory (a name ending in suffix, possibly under a subfolder; no absolute path, no '..'), and
    a tensor is listed once."""
    raw = _load_json_file(index, MAX_INDEX_JSON_VALUES, object_pairs_hook=_Pairs)[1]
    pairs = dict(raw).get("weight_map") if isinstance(raw, _Pairs) else None
    if not isinstance(pairs, _Pairs):
        raise FormatError(f"{index}: no weight_map object")
    directory = os.path.dirname(index)
    weights: dict[str, str] = {}
    for name, shard in pairs:
        if name in weights:
            raise FormatError(f"{index}: weight_map lists tensor '{name}' twice")
        parts = shard.replace("\\", "/").split("/") if isinstance(shard, str) else []
        if not parts or not shard.endswith(suffix) or os.path.isabs(shard) or shard.startswith(("/", "\\")) or \
                any(p in ("", ".", "..") for p in parts) or "\0" in shard:
            raise FormatError(f"{index}: tensor '{name}' is mapped to {shard!r}, not a {suffix} file name inside "
                              f"{directory or '.'}")
        weights[name] = os.path.join(directory, *parts)
    return weights


# config.json keys that hold positive numbers in every family that has them (transformers' names),
# checked by name before a family reads them: a string there became Python's own words ("could not
# convert string to float: 'x'"), and a zero max_position_embeddings or head_dim was taken for
# absent (2048, hidden_size / heads). The sizes are checked by the families (checked_size).
POSITIVE_NUMBER_KEYS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "rope_theta", "partial_rotary_factor",
                        "max_position_embeddings", "n_positions", "sliding_window", "head_dim", "num_key_value_heads")
# those of them that count something: integers, as transformers' configs declare them (it refuses 256.0
# or 4.5: "expected int, got float"); pyllm truncated a max_position_embeddings of 256.5 or a
# sliding_window of 4.5 with int() in silence
POSITIVE_INTEGER_KEYS = ("max_position_embeddings", "n_positions", "sliding_window", "head_dim", "num_key_value_heads")


# config.json keys that are flags in the families that have them: the families read them with bool(),
# so the string "false" was True (tied embeddings, biases that are not there) in silence
FLAG_KEYS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "enable_bias", "use_sliding_window",
             "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "layer_norm_elementwise_affine",
             "do_layer_norm_before", "apply_residual_connection_post_layernorm", "_remove_final_layer_norm")


def model_config_from_hf(cfg: dict, where: str = "config.json") -> ModelConfig:
    """Normalises a transformers config.json (4.x or 5.x layout) through its family's entry in pyllm.arch.
    FormatError for a config it cannot read, naming the key where it can (POSITIVE_NUMBER_KEYS,
    FLAG_KEYS, layer_types)."""
    arch = for_hf_config(cfg)
    quantized = cfg.get("quantization_config")
    if quantized:
        # weights saved quantized (GPTQ/AWQ qweight and scales, FP8 with weight_scale_inv, bitsandbytes'
        # packed bytes): read as floats they were "lacks ...weight", an "unsupported dtype F8_E4M3", or
        # the float8 values without their scales in silence
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise FormatError(f"{where}: quantization_config (quant_method {method!r:.40}): the checkpoint holds "
                          "quantized weights, which pyllm does not read; convert the original float checkpoint")
    if arch.hf_defaults is not None:
        cfg = arch.hf_defaults(cfg)
    for key in POSITIVE_NUMBER_KEYS:
        value = cfg.get(key)
        least = 0 if key == "sliding_window" else None  # 0 there means no window, as null
        integer = key in POSITIVE_INTEGER_KEYS
        if value is not None and (isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
                                  or not (value > 0 or value == least)):
            raise FormatError(f"{where}: {key} must be a positive {'integer' if integer else 'number'}, got "
                              f"{value!r:.60}")
    for key in FLAG_KEYS:
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise FormatError(f"{where}: {key} must be true, false or null, got {cfg[key]!r:.60}")
    for key in ("rope_scaling", "rope_parameters"):  # (transformers refuses others; one beside the other was ignored)
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise FormatError(f"{where}: {key} must be an object or null, got {cfg[key]!r:.60}")
    if cfg.get("layer_types") is not None and not isinstance(cfg["layer_types"], list):
        raise FormatError(f"{where}: layer_types must be a list (one entry per layer), got {cfg['layer_types']!r:.60}")
    if not arch.partial_rotary:  # rotated a part of each head in silence (Llama with 0.5: nmse 0.16)
        cfg = without_partial_rotary(cfg)
    try:
        return arch.config_from_hf(cfg)
    except FormatError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        raise FormatError(f"{where}: cannot read the {arch.name} configuration ({type(e).__name__}: {e})") from e


def without_partial_rotary(cfg: dict) -> dict:
    """cfg without partial_rotary_factor (top level, rope_parameters, rope_scaling): what the families
    whose transformers model rotates whole heads (Architecture.partial_rotary false) run."""
    cfg = {k: v for k, v in cfg.items() if k != "partial_rotary_factor"}
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(cfg.get(key), dict):
            cfg[key] = {k: v for k, v in cfg[key].items() if k != "partial_rotary_factor"}
    return cfg


def load_float32(f: SafetensorsFile, name: str) -> np.ndarray:
    """A float tensor of a safetensors file (F64, F32, F16 or BF16) as a float32 numpy array."""
    dtype = f.tensors[name].dtype
    raw = f.array(name)
    if dtype == "BF16":
        return bf16_bits_to_f32(raw)
    if dtype not in ("F32", "F16", "F64"):
        raise FormatError(f"{f.path}: tensor '{name}' has non-float dtype {dtype}")
    with np.errstate(over="ignore"):  # an F64 value past float32's range is inf, refused with the tensor's
        return raw.astype(np.float32)  # name by the converter's finite check (numpy's warning named nothing)


def present(path: str) -> bool:
    """Whether a model directory's file is there (os.path.exists); FileNotFoundError naming it for a
    symbolic link that leads nowhere (a hub cache snapshot whose blob was never downloaded, a link that
    loops), which os.path.exists calls absent: the directory "has no config.json", "neither tokenizer.json
    nor tokenizer.model", or a tokenizer_config.json left out in silence."""
    if os.path.exists(path):
        return True
    if os.path.islink(path):
        raise FileNotFoundError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist or loops "
                                "(a download that did not finish?)")
    return False


def hub_cache_hint(directory: str) -> str | None:
    """The message for a Hugging Face hub cache folder (~/.cache/huggingface/hub/models--org--name) given
    for a model, naming its snapshots (the model directories); None for another directory. It was "has no
    config.json: is it a Hugging Face model directory?"."""
    snapshots = os.path.join(directory, "snapshots")
    if not os.path.isdir(snapshots):
        return None
    found = sorted(os.path.join(snapshots, s) for s in os.listdir(snapshots)
                   if os.path.exists(os.path.join(snapshots, s, "config.json")))
    if not found:
        return None
    return (f"{directory} is a Hugging Face hub cache folder, not a model directory: give its snapshot, "
            f"{' or '.join(found[:3])}")


class Checkpoint:
    """A Hugging Face model directory. Weights are loaded one tensor at a time as f32."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.fspath(directory)
        if not os.path.isdir(self.dir):
            raise FileNotFoundError(f"{self.dir} is not a directory")
        config_path = os.path.join(self.dir, "config.json")
        if not present(config_path):
            hint = hub_cache_hint(self.dir)
            if hint:
                raise FileNotFoundError(hint)
            raise FileNotFoundError(f"{self.dir} has no config.json: is it a Hugging Face model directory?")
        self.hf_config = _read_json(config_path)
        self.arch: Architecture = for_hf_config(self.hf_config)
        self.config = model_config_from_hf(self.hf_config, config_path)
        self._shards: dict[str, SafetensorsFile] = {}
        self._torch_state: dict | None = None
        self.notices: list[str] = []  # said by the converter before it starts
        try:
            self.weight_map = self._find_weights()
            self._untie_a_different_lm_head()
        except BaseException:
            self.close()  # the shards opened before the failure
            raise

    def _find_weights(self) -> dict[str, str]:
        """tensor name -> file holding it."""
        d = self.dir
        single = os.path.join(d, "model.safetensors")
        index = os.path.join(d, "model.safetensors.index.json")
        if present(single):
            return {name: single for name in self._shard(single).tensors}
        if present(index):
            weights = _index_weight_map(index, ".safetensors")
            self._check_shards(index, weights)
            return weights
        for name in ("pytorch_model.bin",):
            path = os.path.join(d, name)
            if present(path):
                return {k: path for k in self._torch(path)}
        index = os.path.join(d, "pytorch_model.bin.index.json")
        if present(index):
            weights = _index_weight_map(index, ".bin")
            for path in dict.fromkeys(weights.values()):  # a tensor the shard lacks was a KeyError traceback
                held = self._torch(path)
                for name in (n for n, p in weights.items() if p == path and n not in held):
                    raise FormatError(f"{index}: lists tensor '{name}' in {os.path.basename(path)}, which does "
                                      "not hold it")
            return weights
        raise FileNotFoundError(f"{d} has no model.safetensors, sharded safetensors or pytorch_model.bin")

    def _untie_a_different_lm_head(self) -> None:
        """tie_word_embeddings true beside an lm_head of other values: transformers 5 does not tie them
        ("both are present in the checkpoints with different values, so we will NOT tie them") and runs
        the checkpoint's lm_head, as llama.cpp does with an output.weight; pyllm used the embedding for
        both, and every logit differed from transformers'."""
        embedding, head = self.arch.hf_embedding, self.arch.hf_lm_head
        if not self.config.tie_word_embeddings or head not in self.weight_map or embedding not in self.weight_map:
            return
        if self._same_values(embedding, head):
            return
        self.config = dataclasses.replace(self.config, tie_word_embeddings=False)
        self.hf_config = dict(self.hf_config, tie_word_embeddings=False)
        self.notices.append(f"{self.dir}: config.json ties the word embeddings (tie_word_embeddings) but the "
                            f"checkpoint's {head} differs from {embedding}; using {head}, as transformers does")

    def _same_values(self, a: str, b: str) -> bool:
        """Whether tensors a and b hold the same values (compared in their stored dtype when both are
        safetensors of one dtype: no f32 copy of two vocabulary-sized matrices)."""
        if tuple(self.shape(a)) != tuple(self.shape(b)):
            return False
        path_a, path_b = self.weight_map[a], self.weight_map[b]
        if path_a.endswith(".safetensors") and path_b.endswith(".safetensors"):
            fa, fb = self._shard(path_a), self._shard(path_b)
            if fa.tensors[a].dtype == fb.tensors[b].dtype:
                return bool(np.array_equal(fa.array(a), fb.array(b)))
        return bool(np.array_equal(self.load(a), self.load(b)))

    def _check_shards(self, index: str, weights: dict[str, str]) -> None:
        """Every tensor the index lists is in the shard it names, and a tensor in two shards is the same
        bytes in both (reads the shards' headers, and a duplicate's bytes: transformers takes the copy
        the index names, and copies that differ leave no way to know which one was meant)."""
        held: dict[str, str] = {}
        for path in dict.fromkeys(weights.values()):
            if not present(path):  # (was "cannot read …/model-00002-of-00004.safetensors", the index unnamed)
                listed = next(n for n, p in weights.items() if p == path)
                raise FileNotFoundError(f"{index} lists tensor '{listed}' in {os.path.relpath(path, self.dir)}, "
                                        "which does not exist (a shard not downloaded?)")
            for name in self._shard(path).tensors:
                if name in held:
                    first, second = self._shards[held[name]], self._shards[path]
                    if (first.tensors[name].dtype, first.tensors[name].shape) != \
                            (second.tensors[name].dtype, second.tensors[name].shape) or \
                            first.bytes(name) != second.bytes(name):
                        raise FormatError(f"{index}: tensor '{name}' is in two shards with different values, "
                                          f"{os.path.basename(held[name])} and {os.path.basename(path)}")
                    continue
                held[name] = path
        for name, path in weights.items():
            if name not in self._shards[path].tensors:
                where = f" (it is in {os.path.basename(held[name])})" if name in held else ""
                raise FormatError(f"{index}: lists tensor '{name}' in {os.path.basename(path)}, which does not "
                                  f"hold it{where}")
        # a tensor of a listed shard that the index leaves out: transformers 5 reads every tensor of the
        # shards it opens, and pyllm said the checkpoint "lacks" it
        for name, path in held.items():
            weights.setdefault(name, path)

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
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):  # a FIFO hung torch.load in open(), /dev/zero was read until memory ran out
                raise FormatError(f"{path} is {file_kind(mode)}, not a regular file")
            # weights_only refuses arbitrary pickled code; mmap keeps memory near one tensor
            with library_errors(f"{path}: not a readable PyTorch checkpoint (damaged)", FormatError), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (torch's notes on the pickle protocol went to stderr)
                try:
                    # mmap reads only the zip layout of torch >= 1.6; older files (GPT-2's own, 2019) load whole
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
                except pickle.UnpicklingError as e:  # torch's message ran 8 lines and advised weights_only=False,
                    # which runs whatever code the pickle holds
                    reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
                    raise FormatError(f"{path}: refused: its pickle holds more than plain tensors"
                                      + (f" ({reason[1].strip():.120})" if reason else "")
                                      + "; pyllm loads only tensors (convert the checkpoint to safetensors where "
                                      "it comes from a source you trust)") from None
            if not isinstance(state, dict):
                raise FormatError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
            for name, value in state.items():  # as load_float32 for safetensors: .to(float32) took any
                if not isinstance(name, str):  # (a name of another type failed the layer scan: TypeError)
                    raise FormatError(f"{path}: a tensor name is not a string but {type(name).__name__} {name!r:.40}")
                if not isinstance(value, torch.Tensor):
                    raise FormatError(f"{path}: '{name}' holds a {type(value).__name__}, not a tensor")
                if value.layout != torch.strided:  # a sparse one failed .numpy() deep in the conversion
                    raise FormatError(f"{path}: '{name}' is a {str(value.layout).removeprefix('torch.')} tensor, "
                                      "not a dense one")
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
            if name not in f.tensors:
                raise FormatError(f"{path}: index says it holds '{name}' but it does not")
            return load_float32(f, name)
        import torch

        tensor = self._torch(path)[name]
        if not tensor.is_floating_point():  # an int tensor was cast to float in silence (safetensors: refused)
            raise FormatError(f"{path}: tensor '{name}' has non-float dtype {str(tensor.dtype).removeprefix('torch.')}")
        return tensor.to(torch.float32).numpy()

    def names(self) -> Iterator[str]:
        return iter(self.weight_map)

    def where(self, name: str) -> str:
        """The file holding tensor `name` and the name ("…/model-00002-of-00004.safetensors: tensor 'x'"),
        for messages about the tensor."""
        return f"{self.weight_map.get(name, self.dir)}: tensor '{name}'"

    def native_format(self, name: str) -> None:
        """Hugging Face checkpoints hold float weights only: nothing to keep bit for bit."""
        return None

    def tokenizer(self) -> tuple[TokenizerSpec, bytes]:
        return read_tokenizer(self.dir)

    def chat_template(self) -> str:
        return read_chat_template(self.dir)

    def generation_defaults(self) -> dict:
        return read_generation_defaults(self.dir)

    def close(self) -> None:
        for f in self._shards.values():
            f.close()
        self._shards.clear()
        self._torch_state = None


# a transformer block's index in a checkpoint's tensor names: model.layers.N., transformer.h.N.,
# model.decoder.layers.N., transformer.encoder.layers.N. (the families of pyllm/arch)
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


class ArchitectureView:
    """A Hugging Face source (a Checkpoint, or one with LoRA adapters merged) under pyllm's tensor names:
    load(name) builds each tensor from the checkpoint's through its family's recipe (pyllm/arch)."""

    def __init__(self, source):
        self.source = source
        self.dir = source.dir
        self.config: ModelConfig = source.config
        self.arch: Architecture = source.arch
        self.recipes = self.arch.tensors(self.config)
        missing = sorted({n for r in self.recipes.values() for n in r.sources if not source.has(n)})
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FormatError(f"{self.dir}: the {self.arch.name} checkpoint lacks {shown}")
        # a checkpoint holding more layers than config.json declares lost the extra layers silently
        # (only under the prefixes the family's own layers use: a multimodal checkpoint's vision tower
        # numbers its layers too)
        layers = self.config.num_hidden_layers
        prefixes = {n[:m.start(1)] for r in self.recipes.values() for n in r.sources if (m := _LAYER_INDEX.search(n))}
        extra = sorted({int(m.group(1)) for n in source.names() if (m := _LAYER_INDEX.search(n))
                        and n[:m.start(1)] in prefixes and int(m.group(1)) >= layers})
        if extra:
            raise FormatError(f"{self.dir}: config.json declares {layers} layers (num_hidden_layers) but the "
                              f"checkpoint also holds layer{'s' if len(extra) > 1 else ''} "
                              f"{', '.join(map(str, extra[:5]))}{' ...' if len(extra) > 5 else ''}: "
                              "the config and the weights disagree")
        self._last: tuple[str, np.ndarray] | None = None  # fused tensors are read once for their parts
        # tensors no recipe reads were dropped without a word: a q_proj.bias beside a config that forgot
        # attention_bias gave another model (transformers reports them as UNEXPECTED when it loads)
        read = {n for r in self.recipes.values() for n in r.sources}
        unused = sorted(n for n in source.names() if n not in read and not n.endswith("rotary_emb.inv_freq")
                        and not (n == self.arch.hf_lm_head and self.config.tie_word_embeddings))
        self.notices = [f"{self.dir}: {len(unused)} tensor{'s' if len(unused) > 1 else ''} of the checkpoint "
                        f"{'are' if len(unused) > 1 else 'is'} not part of the {self.arch.name} model its config.json "
                        f"describes, left out: {', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}"] if unused else []

    def _hf(self, name: str) -> np.ndarray:
        if self._last is None or self._last[0] != name:
            self._last = (name, self.source.load(name))
        return self._last[1]

    def has(self, name: str) -> bool:
        return name in self.recipes

    def names(self) -> Iterator[str]:
        return iter(self.recipes)

    def where(self, name: str) -> str:
        """The file(s) and checkpoint tensor(s) pyllm's tensor `name` is made from, and `name` when it
        differs (a row block of a fused matrix): "…/model.safetensors: tensor 'c_attn.weight' (as q_proj)"."""
        recipe = self.recipes.get(name)
        sources = recipe.sources if recipe is not None else (name,)
        where = "; ".join(self.source.where(n) for n in sources)
        return where if sources == (name,) else f"{where} (as '{name}')"

    def load(self, name: str) -> np.ndarray:
        """Tensor `name` (pyllm's name) as float32."""
        if name not in self.recipes:
            raise FormatError(f"{self.dir}: no tensor '{name}' in a {self.arch.name} model")
        recipe = self.recipes[name]
        arrays = [self._hf(n) for n in recipe.sources]
        try:
            return np.asarray(recipe.make(arrays), dtype=np.float32)
        except (ValueError, IndexError) as e:  # a fused matrix the config's sizes do not split: numpy's words
            raise FormatError(f"{self.where(name)} cannot be made with config.json's sizes: {e}") from None

    def native_format(self, name: str) -> None:
        return None

    def tokenizer(self) -> tuple[TokenizerSpec, bytes]:
        return self.source.tokenizer()

    def chat_template(self) -> str:
        return self.source.chat_template()

    def generation_defaults(self) -> dict:
        return self.source.generation_defaults()

    def close(self) -> None:
        self._last = None
        self.source.close()


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_token(value) -> bool:
    """A special token as transformers takes it: a string or an AddedToken dict with a string content."""
    return isinstance(value, str) or isinstance(value, dict) and isinstance(value.get("content"), str)


# tokenizer_config.json keys that are flags: bool() made the string "false" True
_TOKENIZER_FLAGS = ("add_bos_token", "add_eos_token", "legacy", "add_prefix_space")


def check_tokenizer_config(cfg: dict, path: str) -> None:
    """FormatError naming path and the field for a tokenizer_config.json (or special_tokens_map.json)
    value of a type that was read as absent or as something else: a special token (bos_token, ...)
    that is not a string or an AddedToken dict (transformers refuses it: "Special token bos_token has
    to be either str or AddedToken"), extra/additional special tokens that are not a list of them, an
    added_tokens_decoder that is not an object of id -> token, a chat_template that is not a string
    or a list of {name, template} strings (transformers loads it, then every chat fails: "Can't
    compile non template nodes"), a flag (add_bos_token, legacy, ...) that is not true/false/null,
    a tokenizer_class that is not a string. Other "<name>_token" keys (image_token, ...) are init
    arguments of particular classes: transformers ignores one that is not a token, and so does pyllm."""
    def bad(key: str, expected: str, value) -> FormatError:
        return FormatError(f"{path}: {key} must be {expected}, got {_shown(value)}")

    for key in _NAMED_SPECIAL_TOKENS:
        value = cfg.get(key)
        if value is not None and not _is_token(value):
            raise bad(key, "a token (a string or an object with a string content)", value)
    for key in ("extra_special_tokens", "additional_special_tokens"):
        value = cfg.get(key)
        tokens = list(value.values()) if isinstance(value, dict) and key == "extra_special_tokens" else value
        if value is not None and not (isinstance(tokens, list) and all(_is_token(t) for t in tokens)):
            raise bad(key, "a list of tokens (strings or objects with a string content)", value)
    decoder = cfg.get("added_tokens_decoder")
    if decoder is not None:
        if not isinstance(decoder, dict):
            raise bad("added_tokens_decoder", "an object of token id -> token", decoder)
        for i, entry in decoder.items():
            if not i.isdigit() or not i.isascii():
                raise bad("added_tokens_decoder", "an object keyed by token ids", i)
            if not _is_token(entry):
                raise bad(f"added_tokens_decoder[{i}]", "a token (an object with a string content)", entry)
    template = cfg.get("chat_template")
    if template is not None and not isinstance(template, str) and not (isinstance(template, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template)):
        raise bad("chat_template", "a string or a list of {\"name\", \"template\"} strings", template)
    for key in _TOKENIZER_FLAGS:
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise bad(key, "true, false or null", cfg[key])
    if cfg.get("tokenizer_class") is not None and not isinstance(cfg["tokenizer_class"], str):
        raise bad("tokenizer_class", "a class name", cfg["tokenizer_class"])


def read_tokenizer_config(path: str) -> dict:
    """tokenizer_config.json (or special_tokens_map.json) read and checked (check_tokenizer_config)."""
    cfg = _read_json(path)
    check_tokenizer_config(cfg, path)
    return cfg


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


# read_tokenizer reproduces the tokenizer transformers 5 (AutoTokenizer.from_pretrained) builds for a
# model directory of pyllm's families, so that pyllm's token ids and decoded text equal transformers':
# * The class is chosen as transformers chooses it (_tokenizer_class): the declared tokenizer_class
#   (tokenizer_config.json's, else config.json's), else the one config.json's model_type registers
#   (Qwen2Tokenizer for qwen2/qwen3, GemmaTokenizer for gemma*, GPT2Tokenizer for gpt2/opt; none for
#   llama and bloom; TokenizersBackend for mistral, phi3, glm, glm4), with transformers' overrides (a
#   model type registering a generic class wins over a declared one, so Phi-3's declared
#   LlamaTokenizer loads as TokenizersBackend; BloomTokenizer is TokenizersBackend).
# * TokenizersBackend / PreTrainedTokenizerFast (and classes pyllm does not model) with tokenizer.json:
#   the file is used as written.
# * Qwen2Tokenizer, GPT2Tokenizer, GemmaTokenizer and LlamaTokenizer (below) with tokenizer.json keep
#   only its BPE vocabulary, merges and post-processor and rebuild the rest as the class's __init__
#   does (_CLASS_BACKENDS), whatever pipeline the file itself describes.
# * TokenizersBackend with only tokenizer.model: transformers imitates sentencepiece in a `tokenizers`
#   backend built from the model's own settings (its normalizer, "▁" escaping, BPE merges ranked by
#   piece score or the unigram model, byte fallback) with legacy=true unless the config says otherwise:
#   every chunk of text between special tokens gets the dummy "▁" prefix (see _spm_backend).
# * LlamaTokenizer / LlamaTokenizerFast, unless tokenizer.json is byte-level (then TokenizersBackend):
#   transformers keeps only the vocabulary and merges (tokenizer.json's, or tokenizer.model's pieces
#   with merges generated from the piece order) and rebuilds everything else: no normalizer (the
#   sentencepiece model's own normalization rules are ignored), a Metaspace pre-tokenizer that adds "▁"
#   only before the first chunk of the text (legacy=false, the default; before every chunk when
#   legacy=true; never when add_prefix_space=false) without splitting words, BPE with byte fallback,
#   and a decoder that strips one leading space. This is not sentencepiece's own encoding (which
#   writes "▁▁" for a leading space and prefixes the text after a special token).
# In both tokenizer.model cases pyllm builds the same `tokenizers` object and embeds it as
# tokenizer.json (kind "hf"); the kind "sentencepiece" is only read, from older .pllm files.
# * BOS/EOS: with a tokenizer.json, transformers ignores add_bos_token/add_eos_token in
#   tokenizer_config.json and the post-processor decides (pyllm's Tokenizer runs the embedded
#   post-processor, so a two-token prefix such as GLM-4's [gMASK]<sop> is added too). With only
#   tokenizer.model they come from the config, and both default to false in transformers 5
#   (LlamaTokenizer included).
# * The named special tokens (bos/eos/unk/pad/..., extra_special_tokens) and the entries of
#   added_tokens_decoder are added to the backend as transformers adds them (_add_config_tokens).

_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_SPM_NORMAL, _SPM_CONTROL, _SPM_USER_DEFINED = 1, 3, 4


def _proto_fields(buf: bytes):
    """(field number, value) of a serialized protobuf message: ints for varints, bytes otherwise."""

    def varint(i: int) -> tuple[int, int]:
        # at most 10 bytes (64 bits), as protobuf's own readers: a run of 0xFF bytes grew one Python int
        # for ever (time quadratic in its length: a 1 MB run took hours)
        value = shift = 0
        for i in range(i, min(i + 10, len(buf))):
            b = buf[i]
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value & ((1 << 64) - 1), i + 1
            shift += 7
        if i + 1 >= len(buf) and shift < 70:
            raise FormatError("tokenizer.model: truncated protobuf")
        raise FormatError("tokenizer.model: a protobuf varint longer than 10 bytes: not a sentencepiece model")

    i = 0
    while i < len(buf):
        key, i = varint(i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
            if value >= 1 << 63:  # a negative int32/int64
                value -= 1 << 64
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = varint(i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise FormatError(f"tokenizer.model: unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise FormatError("tokenizer.model: truncated protobuf")
        yield number, value


def _read_spm(blob: bytes) -> dict:
    """The parts of a sentencepiece ModelProto that transformers uses (read without protobuf)."""
    import struct

    model = {"pieces": [], "model_type": 1, "byte_fallback": False, "unk_id": 0, "bos_id": 1, "eos_id": 2,
             "unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>", "precompiled_charsmap": b"",
             "add_dummy_prefix": True, "remove_extra_whitespaces": True, "escape_whitespaces": True}
    trainer_fields = {3: "model_type", 35: "byte_fallback", 40: "unk_id", 41: "bos_id", 42: "eos_id",
                      45: "unk_piece", 46: "bos_piece", 47: "eos_piece"}
    normalizer_fields = {2: "precompiled_charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                         5: "escape_whitespaces"}

    def read(message: bytes, fields: dict) -> None:
        for n, v in _proto_fields(message):
            if n in fields:
                key = fields[n]
                default = model[key]
                if isinstance(default, bool):
                    model[key] = bool(v)
                elif isinstance(default, str):
                    model[key] = v.decode("utf-8")
                elif isinstance(default, int) == isinstance(v, int):
                    model[key] = v

    most = SIZE_LIMITS["vocab_size"]  # (a 256 MB file of 5-byte pieces would be 50 million tuples, 6 GB)
    try:
        for number, value in _proto_fields(blob):
            if number == 1 and isinstance(value, bytes):  # ModelProto.pieces
                if len(model["pieces"]) == most:
                    raise FormatError(f"tokenizer.model: more than {most} pieces (formats.packed.SIZE_LIMITS "
                                      "vocab_size)")
                piece, score, kind = "", 0.0, _SPM_NORMAL
                for n, v in _proto_fields(value):
                    if n == 1 and isinstance(v, bytes):
                        piece = v.decode("utf-8")
                    elif n == 2 and isinstance(v, bytes) and len(v) == 4:
                        score = struct.unpack("<f", v)[0]
                        if score != score:  # NaN: merges ranked by it (or unigram paths) came out in no order
                            raise FormatError(f"tokenizer.model: piece {len(model['pieces'])} has score NaN")
                    elif n == 3 and isinstance(v, int):
                        kind = v
                model["pieces"].append((piece, score, kind))
            elif number == 2 and isinstance(value, bytes):
                read(value, trainer_fields)
            elif number == 3 and isinstance(value, bytes):
                read(value, normalizer_fields)
    except UnicodeDecodeError:
        raise FormatError("tokenizer.model: not a sentencepiece model") from None
    if not model["pieces"]:
        raise FormatError("tokenizer.model: not a sentencepiece model (no pieces)")
    first: dict[str, int] = {}
    for i, (piece, _, _) in enumerate(model["pieces"]):  # sentencepiece refuses them ("is already defined")
        j = first.setdefault(piece, i)
        if j != i:
            raise FormatError(f"tokenizer.model: the piece {piece!r:.60} is listed twice (ids {j} and {i}); one of "
                              "them would decode to no text")
    return model


def every_two_token_splits(vocab: dict):
    """(piece, its splits) for each piece of vocab, in its order: every (left, right) with left + right
    == piece and both in vocab, shortest left first. Only cuts where both halves have a token's length
    are sliced (trying every cut of a 1,000,000-character piece took two minutes). FormatError once the
    characters sliced pass MAX_MERGE_SPLIT_CHARS. The pieces "a", "aa", ... of every length to 1,200
    (a 720 KB vocabulary) have 718,000 splits of 575 M characters; to 3,000, 9 GB."""
    from ..limits import MAX_MERGE_SPLIT_CHARS

    ascending = sorted({len(t) for t in vocab})
    lengths = set(ascending)
    work = 0
    for piece in vocab:
        n, splits = len(piece), []
        for k in ascending:
            if k >= n:
                break
            work += 1
            if n - k in lengths:
                work += n
                left = piece[:k]
                if left in vocab and piece[k:] in vocab:
                    splits.append((left, piece[k:]))
            if work > MAX_MERGE_SPLIT_CHARS:
                raise FormatError(f"the vocabulary's pieces split into other pieces in more than "
                                  f"{MAX_MERGE_SPLIT_CHARS} characters' worth of ways (limits.MAX_MERGE_SPLIT_CHARS): "
                                  f"too many to rank as BPE merges (at piece {piece!r:.40}, {n} characters)")
        yield piece, splits


def _generate_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges of a sentencepiece vocabulary, ranked as transformers' generate_merges ranks them."""
    merges = []
    for piece, splits in every_two_token_splits(vocab):
        rank = vocab[piece]
        local = [(left, right, rank) for left, right in splits]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(left, right) for left, right, _ in merges]


def _added_token(value):
    """A tokenizers AddedToken from a tokenizer_config.json value (a string or an AddedToken dict)."""
    from tokenizers import AddedToken

    if isinstance(value, dict):
        flags = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
        return AddedToken(value["content"], **flags)
    return AddedToken(value, special=True, normalized=False)


def _legacy_added_tokens(path: str, tok_config: dict) -> dict:
    """added_tokens.json (token -> id, written by the slow tokenizers: a LLaMA fine-tune's "<pad>" 32000
    beside tokenizer.model) as added_tokens_decoder entries, as transformers 5 reads it when
    tokenizer_config.json has no added_tokens_decoder: special when it is a named or extra special
    token, else normalized. pyllm ignored the file: the token was split into pieces, and its id was
    never produced."""
    entries = _read_json(path)
    extras = [t for key in ("extra_special_tokens", "additional_special_tokens")
              if isinstance(tok_config.get(key), list) for t in tok_config[key]]
    special = {_token_content(tok_config.get(k)) for k in _NAMED_SPECIAL_TOKENS} | {_token_content(t) for t in extras}
    decoder = {}
    for content, i in entries.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0 or not content:
            raise FormatError(f"{path}: each entry must map a token to its id, got {_shown(content)}: {_shown(i)}")
        decoder[str(i)] = {"content": content, "single_word": False, "lstrip": False, "rstrip": False,
                           "normalized": content not in special, "special": content in special}
    return decoder


def _config_tokens(tok_config: dict, defaults: dict, model_extras: list | None = None) -> tuple[list, list]:
    """The named special tokens and the extra special tokens transformers 5 reads from a config."""
    named_values = {k: tok_config.get(k, defaults.get(k)) for k in _NAMED_SPECIAL_TOKENS}
    # any other "<name>_token" string is a model-specific named special token
    named_values.update({k: v for k, v in tok_config.items()
                         if k.endswith("_token") and k not in named_values and _token_content(v)})
    # additional_special_tokens is the old name of extra_special_tokens; a sentencepiece model's
    # control and user-defined pieces count as additional_special_tokens
    if tok_config.get("extra_special_tokens"):
        extra_values = tok_config["extra_special_tokens"]
    elif "additional_special_tokens" in tok_config:
        extra_values = tok_config["additional_special_tokens"] or []
    elif "extra_special_tokens" in tok_config or model_extras is None:
        extra_values = []
    else:
        extra_values = model_extras
    if isinstance(extra_values, dict):  # named model-specific tokens
        named_values.update(extra_values)
        extra_values = []
    named = []
    for value in named_values.values():
        if _token_content(value):
            token = _added_token(value)
            if not token.special:
                token.special = True
            named.append(token)
    extras = [v if not isinstance(v, (str, dict)) else _added_token(v) for v in extra_values
              if not isinstance(v, (str, dict)) or _token_content(v)]
    return named, extras


def _add_config_tokens(tok, added_tokens_decoder: dict, named: list, extras: list) -> None:
    """Adds what TokenizersBackend.__init__ adds to its backend: the entries of added_tokens_decoder
    it lacks, then the special tokens it lacks (with add_tokens, so each keeps its own flags)."""
    present = {repr(t) for t in tok.get_added_tokens_decoder().values()}
    encoder = {t.content for t in tok.get_added_tokens_decoder().values()}
    todo = []
    for _, entry in sorted(added_tokens_decoder.items(), key=lambda kv: int(kv[0])):
        if isinstance(entry, dict) and entry.get("content"):
            token = _added_token(entry)
            if repr(token) not in present:
                todo.append(token)
                encoder.add(token.content)
    for token in named + extras:
        if token.content not in encoder:
            todo.append(token)
            encoder.add(token.content)
    if todo:
        tok.add_tokens(todo)


def _llama_backend(vocab: dict[str, int], merges: list, tok_config: dict):
    """The backend tokenizer transformers 5's LlamaTokenizer builds from a vocabulary and merges."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    add_prefix_space = tok_config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    # transformers' _get_prepend_scheme: "first" unless legacy is truthy (LlamaTokenizer's legacy defaults to False)
    prepend = ("always" if tok_config.get("legacy") else "first") if add_prefix_space else "never"
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _qwen2_backend(vocab: dict[str, int], merges: list, tok_config: dict):
    """The backend transformers 5's Qwen2Tokenizer builds: NFC, its regex split, byte-level BPE."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.decoder = decoders.ByteLevel()
    tok.normalizer = normalizers.NFC()
    pattern = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(tok_config.get("add_prefix_space") or False), use_regex=False)])
    return tok


def _gpt2_backend(vocab: dict[str, int], merges: list, tok_config: dict):
    """The backend transformers 5's GPT2Tokenizer builds: byte-level BPE with GPT-2's regex."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(tok_config.get("add_prefix_space") or False))
    tok.decoder = decoders.ByteLevel()
    return tok


def _gemma_backend(vocab: dict[str, int], merges: list, tok_config: dict):
    """The backend transformers 5's GemmaTokenizer builds: spaces replaced by "▁" (no prefix), BPE with
    byte fallback."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    unk = _token_content(tok_config.get("unk_token", "<unk>"))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, dropout=None, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.normalizer = normalizers.Replace(" ", "▁")
    return tok


# class -> (backend builder from a vocabulary and merges, the class's default special tokens)
_CLASS_BACKENDS = {
    "LlamaTokenizer": (_llama_backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "Qwen2Tokenizer": (_qwen2_backend, {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                        "pad_token": "<|endoftext|>"}),
    "GPT2Tokenizer": (_gpt2_backend, {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                                      "eos_token": "<|endoftext|>"}),
    "GemmaTokenizer": (_gemma_backend, {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>",
                                        "pad_token": "<pad>", "mask_token": "<mask>"}),
}


def _spm_backend(model: dict, tok_config: dict, added_tokens_decoder: dict):
    """The backend tokenizer transformers 5 builds from a sentencepiece model for TokenizersBackend
    (SpmConverter.build_tokenizer_from_spm_proto): it follows the model's own settings."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    pieces = model["pieces"]
    names = {int(i): _token_content(e) for i, e in added_tokens_decoder.items() if _token_content(e)}
    user_defined = [i for i, (_, _, kind) in enumerate(pieces) if kind == _SPM_USER_DEFINED]
    if model["model_type"] == 1:  # unigram
        id_to_token = {i: p for i, (p, _, _) in enumerate(pieces)}
        tok = Tokenizer(Unigram(vocab=[(p, s) for p, s, _ in pieces], unk_id=model["unk_id"],
                                byte_fallback=model["byte_fallback"]))
    else:
        # added_tokens_decoder may rename pieces, unless two pieces would swap names
        kept = {p for i, (p, _, _) in enumerate(pieces) if i not in names}
        vocab = {(names[i] if i in names and names[i] not in kept else p): i for i, (p, _, _) in enumerate(pieces)}
        id_to_token = {i: t for t, i in vocab.items()}
        normal = {id_to_token[i]: (score, i) for i, (_, score, kind) in enumerate(pieces)
                  if kind == _SPM_NORMAL and i in id_to_token}
        ranked = []
        for token, (score, i) in normal.items():
            for k in range(1, len(token)):
                if token[:k] in normal and token[k:] in normal:
                    ranked.append((-score, i, token[:k], token[k:]))
        merges = [(left, right) for _, _, left, right in sorted(ranked)]
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=model["unk_piece"], fuse_unk=True,
                            byte_fallback=model["byte_fallback"], dropout=None, ignore_merges=bool(user_defined)))
    user_defined = [id_to_token[i] for i in user_defined if i in id_to_token]
    legacy = tok_config.get("legacy", True)
    steps = []
    if model["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(model["precompiled_charsmap"]))
    if model["remove_extra_whitespaces"]:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if model["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "▁"))
    if model["add_dummy_prefix"] and legacy:
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    tok.normalizer = normalizers.Sequence(steps)
    pre = []
    if model["add_dummy_prefix"]:
        pre.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always" if legacy else "first", split=False))
    if user_defined:
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if pre:
        tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    steps = [decoders.Replace("▁", " ")]
    if model["byte_fallback"]:
        steps.append(decoders.ByteFallback())
    if model["add_dummy_prefix"]:
        steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif model["byte_fallback"]:
        steps.append(decoders.Fuse())
    tok.decoder = decoders.Sequence(steps)
    return tok, set(user_defined)


# The tokenizer class transformers 5 registers for each model_type of pyllm's families (AutoTokenizer's
# TOKENIZER_MAPPING_NAMES); a model_type absent here has none. "TokenizersBackend" uses tokenizer.json
# as written; the other classes rebuild the backend from its vocabulary and merges (_CLASS_BACKENDS).
_REGISTERED_TOKENIZERS = {
    "qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer", "gemma": "GemmaTokenizer", "gemma2": "GemmaTokenizer",
    "gemma3": "GemmaTokenizer", "gemma3_text": "GemmaTokenizer", "gpt2": "GPT2Tokenizer", "opt": "GPT2Tokenizer",
    "mistral": "TokenizersBackend", "phi3": "TokenizersBackend", "glm": "TokenizersBackend",
    "glm4": "TokenizersBackend",
}
# model types whose hub tokenizer_class transformers distrusts (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)
_DISTRUSTED_HUB_CLASS = ("qwen2", "phi3")
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast", "PythonBackend", "BloomTokenizer")


def _tokenizer_class(directory: str, tok_config: dict, json_text: str | None) -> str:
    """The class AutoTokenizer.from_pretrained picks for the directory ("Fast" suffix dropped), as
    transformers 5 decides: the declared class (tokenizer_config.json's, else config.json's) unless the
    model_type registers a different one; a declared LlamaTokenizer over a byte-level tokenizer.json,
    and any class a model type registers as generic, load as TokenizersBackend."""
    config_path = os.path.join(directory, "config.json")
    config = _read_json(config_path) if present(config_path) else {}
    model_type = config.get("model_type")
    if config.get("tokenizer_class") is not None and not isinstance(config["tokenizer_class"], str):
        raise FormatError(f"{config_path}: tokenizer_class must be a class name, got {_shown(config['tokenizer_class'])}")
    declared = tok_config.get("tokenizer_class") or config.get("tokenizer_class")
    declared = declared.removesuffix("Fast") if isinstance(declared, str) else None
    registered = _REGISTERED_TOKENIZERS.get(model_type)
    if declared == "LlamaTokenizer" and json_text is not None and '"ByteLevel"' in json_text and (
            registered != "TokenizersBackend" and model_type not in _DISTRUSTED_HUB_CLASS):
        return "TokenizersBackend"
    if declared and registered and declared != registered:
        if registered in _GENERIC_TOKENIZERS:
            return "TokenizersBackend"
        chosen = registered if model_type in _DISTRUSTED_HUB_CLASS else declared
        return chosen if chosen in _CLASS_BACKENDS else "TokenizersBackend"
    cls = declared or registered or "TokenizersBackend"
    return "TokenizersBackend" if cls in _GENERIC_TOKENIZERS else cls


def _post_processor_flags(tok, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
    """Whether tok's post-processor puts bos_id before and eos_id after a single sequence."""
    if tok.post_processor is None:
        return False, False
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain):]
            return bos_id is not None and prefix == [bos_id], eos_id is not None and suffix == [eos_id]
    return False, False


def read_tokenizer(directory: str) -> tuple[TokenizerSpec, bytes]:
    """The tokenizer of a Hugging Face directory: its spec and the tokenizer.json to embed (see above).
    FormatError naming the directory for files that are damaged in ways the reading below does not
    name itself (an added_tokens_decoder key that is not an id, a token whose content is a number,
    extra_special_tokens that is not a list: KeyError, TypeError, AttributeError, ValueError)."""
    with library_errors(f"{directory}: the tokenizer cannot be read", FormatError):
        return _read_tokenizer(directory)


def _read_tokenizer(directory: str) -> tuple[TokenizerSpec, bytes]:
    from tokenizers import AddedToken, Tokenizer

    from ..tokenizer import check_growth, hf_tokenizer

    tok_config_path = os.path.join(directory, "tokenizer_config.json")
    tok_config = read_tokenizer_config(tok_config_path) if present(tok_config_path) else {}
    json_path = os.path.join(directory, "tokenizer.json")
    spm_path = os.path.join(directory, "tokenizer.model")
    json_text = tok_json = None
    if present(json_path):
        json_text, tok_json = _load_json_file(json_path)  # parsed once (tens of MB)
    elif not present(spm_path):
        raise FormatError(f"{directory} has neither tokenizer.json nor tokenizer.model")
    if json_text is not None and not isinstance(tok_json, dict):
        raise FormatError(f"{json_path}: expected a JSON object, got {type(tok_json).__name__}")
    if tok_json is not None:  # before any text is encoded below: a Replace chain 8^9 times longer aborted
        for where in ("normalizer", "decoder"):  # the process on the probe "a" (the check came only after)
            try:
                check_growth(tok_json.get(where), where)
            except FormatError as e:
                raise FormatError(f"{directory}: {e}") from None
    cls = _tokenizer_class(directory, tok_config, json_text)
    rebuild = _CLASS_BACKENDS.get(cls)
    if tok_json is not None and rebuild is not None and (tok_json.get("model") or {}).get("type") not in (None, "BPE"):
        rebuild = None  # the class rebuilds BPE only

    if isinstance(tok_config.get("added_tokens_decoder"), dict):
        added_decoder = tok_config["added_tokens_decoder"]
    else:  # older layouts: special_tokens_map.json and tokenizer.json's added tokens
        added_decoder = {}
        map_path = os.path.join(directory, "special_tokens_map.json")
        if present(map_path):
            tok_config = dict(tok_config)
            for key, value in read_tokenizer_config(map_path).items():
                if key == "extra_special_tokens" and isinstance(value, list):
                    # (tokens compared as JSON text in a set: `in` a list took hours for lists of 100,000s)
                    known = list(tok_config.get(key) or [])
                    seen = {json.dumps(v, sort_keys=True) for v in known}
                    value = known + [v for v in value if json.dumps(v, sort_keys=True) not in seen]
                elif isinstance(value, dict):
                    value = dict(value, special=True)
                tok_config[key] = value
        added_path = os.path.join(directory, "added_tokens.json")
        if present(added_path):  # then tokenizer.json's added tokens, which win for an id in both
            added_decoder = _legacy_added_tokens(added_path, tok_config)
        if tok_json is not None:
            added_decoder.update({str(t["id"]): t for t in tok_json.get("added_tokens") or []})

    model_extras = None
    if json_text is not None and rebuild is None:
        tok = hf_tokenizer(json_text)
        defaults = {}
    elif json_text is not None:
        model = tok_json.get("model") or {}
        vocab = model.get("vocab") or {}
        if isinstance(vocab, list):
            vocab = {(t[0] if isinstance(t, list) else t): i for i, t in enumerate(vocab)}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
        build, defaults = rebuild
        tok = build(vocab, merges, tok_config)
        tok.post_processor = Tokenizer.from_str(json_text).post_processor  # kept by transformers
    else:
        try:
            spm = _read_spm(read_bytes(spm_path, FormatError, MAX_CHECKPOINT_FILE_BYTES, regular=True))
        except FormatError as e:  # "tokenizer.model: ..." -> the file's path
            message = str(e)
            raise FormatError(message if message.startswith(spm_path) else os.path.join(directory, message)) from None
        pieces = spm["pieces"]
        model_extras = [AddedToken(p, normalized=False, special=kind == _SPM_CONTROL)
                        for p, _, kind in pieces if kind in (_SPM_CONTROL, _SPM_USER_DEFINED)]
        if rebuild is not None:  # LlamaTokenizer, GemmaTokenizer: the pieces, merges generated from their order
            vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
            build, defaults = rebuild
            tok = build(vocab, _generate_merges(vocab), tok_config)
        else:
            tok, user_defined = _spm_backend(spm, tok_config, added_decoder)
            # user-defined pieces stay with the model (its pre-tokenizer splits them out), not special tokens
            model_extras = [t for t in model_extras if t.content not in user_defined]
            if spm["add_dummy_prefix"]:  # added tokens match the raw text, so each chunk gets its own prefix
                added_decoder = {i: dict(e, normalized=False) if isinstance(e, dict) else e
                                 for i, e in added_decoder.items()}
            defaults = {f"{name}_token": spm[f"{name}_piece"] or f"<{name}>"
                        for name in ("bos", "eos", "unk") if spm[f"{name}_id"] >= 0}
    named, extras = _config_tokens(tok_config, defaults, model_extras)
    def added_tokens():
        return {i: repr(t) for i, t in tok.get_added_tokens_decoder().items()}

    before = added_tokens()
    _add_config_tokens(tok, added_decoder, named, extras)
    if json_text is not None and rebuild is None and added_tokens() == before:
        blob = json_text.encode("utf-8")  # nothing added: embed the file as written
    else:
        blob = tok.to_str().encode("utf-8")

    spec = TokenizerSpec(kind="hf")
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        setattr(spec, key, _token_content(tok_config.get(key, defaults.get(key))))
    lookup = tok.token_to_id
    spec.bos_token_id = lookup(spec.bos_token) if spec.bos_token else None
    eos_id = lookup(spec.eos_token) if spec.eos_token else None
    if json_text is not None:
        spec.add_bos_token, spec.add_eos_token = _post_processor_flags(tok, spec.bos_token_id, eos_id)
    else:
        spec.add_bos_token = bool(tok_config.get("add_bos_token", False)) and spec.bos_token_id is not None
        spec.add_eos_token = bool(tok_config.get("add_eos_token", False)) and eos_id is not None
    eos_ids = [eos_id] if eos_id is not None else []
    gen_path = os.path.join(directory, "generation_config.json")
    if present(gen_path):
        gen_eos = _read_json(gen_path).get("eos_token_id")
        seen = set(eos_ids)
        for i in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if i is None:
                continue
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:  # was dropped in silence, or (-1) written
                raise FormatError(f"{gen_path}: eos_token_id must be a token id or a list of token ids, got "
                                  f"{gen_eos!r:.80}")
            if i not in seen:  # (a set: `in` a list of a million ids took hours)
                eos_ids.append(i)
                seen.add(i)
    spec.eos_token_ids = eos_ids
    return spec, blob


def read_chat_template(directory: str) -> str:
    """chat_template.jinja, else tokenizer_config.json's chat_template ('default' of a list), else ''."""
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if present(jinja_path):
        return read_text(jinja_path, FormatError, MAX_CHAT_TEMPLATE_BYTES, regular=True)
    tok_config_path = os.path.join(directory, "tokenizer_config.json")
    if not present(tok_config_path):
        return ""
    return config_template(read_tokenizer_config(tok_config_path).get("chat_template"))  # (its shape checked)


GENERATION_KEYS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "do_sample",
                   "max_new_tokens")


def read_generation_defaults(directory: str) -> dict:
    path = os.path.join(directory, "generation_config.json")
    if not present(path):
        return {}
    cfg = _read_json(path)
    defaults = {k: cfg[k] for k in GENERATION_KEYS if k in cfg and cfg[k] is not None}
    check_generation_defaults(defaults, path)  # refused here, not by every load of the file written
    return defaults
