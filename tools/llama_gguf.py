"""Writing llama-architecture GGUF files for llama.cpp comparisons (benchmarks and quality tables).

pyllm reads GGUF as a conversion source (pyllm/convert/gguf_source.py); the benchmarks also need
the other direction: the same weights that pyllm runs, handed to llama.cpp. Three entry points:

  write_llama_gguf(out, config, tensors, tokenizer_from)   Hugging Face-named f32 arrays -> GGUF
  dequantized_gguf(src, out)                               a GGUF with every tensor made F32
  llama_cpp_quantize(src, out, ftype)                      llama.cpp's own quantizer (Q8_0, Q4_0...)

Hugging Face checkpoints use rotate-half RoPE; llama.cpp expects q/k rows permuted for its
interleaved RoPE, as its convert_hf_to_gguf.py does: `_permute_rows` is the inverse of the
reader's `_unpermute_rows`. The tokenizer metadata (vocabulary, merges, special ids, chat
template) is copied from an existing GGUF, so a random model with that vocabulary size shares
its tokenizer. llama-cpp-python is a benchmark-only dependency; writing needs only `gguf`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from pyllm.convert.gguf_arch import GLOBAL_NAMES, LAYER_NAMES


def gguf_name(hf_name: str) -> str:
    """Hugging Face tensor name -> GGUF tensor name (llama architecture, whose names are pyllm's)."""
    base, _, kind = hf_name.rpartition(".")
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{kind}"
    parts = base.split(".")  # model.layers.{i}.{module...}
    if parts[:2] == ["model", "layers"]:
        module = ".".join(parts[3:])
        if module in LAYER_NAMES:
            return f"blk.{parts[2]}.{LAYER_NAMES[module]}.{kind}"
    raise ValueError(f"no GGUF name for tensor {hf_name!r}")


def _permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (rotate-half -> interleaved pairs); rows: [n, ...]."""
    n = rows.shape[0]
    return np.ascontiguousarray(
        rows.reshape(n_head, 2, n // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape))


def _copy_tokenizer(writer, tokenizer_from: str) -> None:
    import gguf

    reader = gguf.GGUFReader(tokenizer_from)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            _copy_field(writer, key, field)


def _copy_field(writer, key: str, field) -> None:
    import gguf

    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
        writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
    else:
        writer.add_key_value(key, field.contents(), vtype)


def _write_atomic(writer_factory, out: str, fill) -> str:
    partial = out + ".partial"
    writer = writer_factory(partial)
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, out)
    return out


def write_llama_gguf(out: str, config: dict, tensors: Iterable[tuple[str, np.ndarray]], tokenizer_from: str,
                     dtype: str = "F32", name: str = "pyllm-benchmark") -> str:
    """Write a llama GGUF. config: Hugging Face config.json keys; tensors: (hf_name, f32 array [out, in]).

    dtype F32 or F16 for matrices (norms stay F32, as llama.cpp's converter writes them).
    """
    import gguf

    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    raw_type = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16}[dtype]

    def fill(writer):
        writer.add_name(name)
        writer.add_file_type(0 if dtype == "F32" else 1)
        writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_block_count(int(config["num_hidden_layers"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(int(heads))
        writer.add_head_count_kv(int(kv_heads))
        writer.add_rope_dimension_count(int(head_dim))
        writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
        writer.add_vocab_size(int(config["vocab_size"]))
        _copy_tokenizer(writer, tokenizer_from)
        for hf_name, values in tensors:
            values = np.asarray(values, dtype=np.float32)
            if ".self_attn.q_proj." in hf_name:
                values = _permute_rows(values, heads)
            elif ".self_attn.k_proj." in hf_name:
                values = _permute_rows(values, kv_heads)
            if values.ndim == 2 and dtype == "F16":
                values = values.astype(np.float16)
            writer.add_tensor(gguf_name(hf_name), values, raw_dtype=raw_type if values.ndim == 2
                              else gguf.GGMLQuantizationType.F32)

    return _write_atomic(lambda path: gguf.GGUFWriter(path, "llama"), out, fill)


def dequantized_gguf(src: str, out: str) -> str:
    """`src` with every tensor dequantized to F32 (metadata and layout kept); cached at `out`."""
    import gguf
    from gguf import quants

    if os.path.exists(out):
        return out
    reader = gguf.GGUFReader(src)

    def fill(writer):
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            if key == "general.file_type":
                writer.add_file_type(0)
                continue
            _copy_field(writer, key, field)
        for t in reader.tensors:
            values = quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
            writer.add_tensor(t.name, values.reshape(tuple(int(d) for d in reversed(t.shape))),
                              raw_dtype=gguf.GGMLQuantizationType.F32)

    return _write_atomic(lambda path: gguf.GGUFWriter(path, "llama"), out, fill)


def llama_cpp_quantize(src: str, out: str, ftype: str) -> str:
    """llama.cpp's quantizer: ftype is a LLAMA_FTYPE_MOSTLY_* suffix (Q8_0, Q4_0, Q4_1, Q4_K_M, F16)."""
    import llama_cpp

    if not os.path.exists(out):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        if llama_cpp.llama_model_quantize(src.encode(), (out + ".partial").encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype}")
        os.replace(out + ".partial", out)
    return out
