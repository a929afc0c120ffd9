"""Hostile and corrupt model files: each must raise a clear Python exception, never crash the process.

Broken copies of a valid tiny .pllm are made by rewriting its JSON header
(8-byte little-endian length + JSON, the data section kept as is). Every case
goes through the public entry point, pyllm.LLM(path); the most dangerous ones
(offsets past the end, huge shapes, huge lengths) also run in a child process,
whose exit status must be a Python error exit (1), not a signal. The C++ engine
is also driven directly with bad tensor tables, to prove that it re-checks
every range itself. Last, write_atomic: failures leave nothing behind, and what
it writes is a standard, 64-byte aligned safetensors file.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import stat
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

import pyllm
from pyllm import _core
from pyllm.errors import LimitError
from pyllm.formats.packed import PackedModel
from pyllm.formats.safetensors import (ALIGNMENT, CHECKSUM_KEY, HEADER_CHECKSUM_KEY, MAX_TENSORS, FormatError,
                                       PlannedTensor, SafetensorsFile, verify_checksums, write_atomic)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = "model.layers.0.self_attn.q_proj.weight"  # F32 [64, 64] in the tiny model
K = "model.layers.0.self_attn.k_proj.weight"  # F32 [32, 64]
DOWN1 = "model.layers.1.mlp.down_proj.weight"


# --------------------------------------------------------------------------- helpers


def split_file(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join_file(header: dict | None, data: bytes, raw_json: bytes | None = None, align: bool = True) -> bytes:
    """8-byte length + JSON (+ spaces so the data section stays 64-byte aligned) + data."""
    body = raw_json if raw_json is not None else json.dumps(header).encode("utf-8")
    if align:
        body += b" " * (-(8 + len(body)) % ALIGNMENT)
    return len(body).to_bytes(8, "little") + body + data


def meta_json(header: dict, key: str, edit) -> None:
    """Applies edit (which mutates its argument) to the JSON object stored as a string under metadata key."""
    value = json.loads(header["__metadata__"][key])
    edit(value)
    header["__metadata__"][key] = json.dumps(value)


def set_config(**changes):
    return lambda h, d: join_file(_with(h, lambda: meta_json(h, "pyllm.config", lambda c: c.update(changes))), d)


def set_tokenizer(**changes):
    return lambda h, d: join_file(_with(h, lambda: meta_json(h, "pyllm.tokenizer", lambda c: c.update(changes))), d)


def set_linear(base: str, value):
    return lambda h, d: join_file(_with(h, lambda: meta_json(h, "pyllm.linears", lambda c: c.__setitem__(base, value))), d)


def set_meta(key: str, value):
    def make(h, d):
        if value is None:
            del h["__metadata__"][key]
        else:
            h["__metadata__"][key] = value
        return join_file(h, d)

    return make


def set_entry(name: str, **fields):
    """Replaces fields of a tensor entry; callables get the old entry."""

    def make(h, d):
        entry = h[name]
        for k, v in fields.items():
            entry[k] = v(entry) if callable(v) else v
        return join_file(h, d)

    return make


def header_edit(edit):
    return lambda h, d: join_file(_with(h, lambda: edit(h)), d)


def raw_header(raw: bytes):
    return lambda h, d: join_file(None, d, raw_json=raw)


def _with(h: dict, action) -> dict:
    action()
    return h


def with_duplicate(key: str, in_metadata: bool = False):
    """JSON text in which key appears twice (json.dumps cannot write that)."""

    def make(h, d):
        if in_metadata:
            meta = h.pop("__metadata__")
            text = json.dumps(meta)
            text = text[:-1] + ", " + json.dumps(key) + ": " + json.dumps(meta[key]) + "}"
            raw = ('{"__metadata__": ' + text + ", " + json.dumps(h)[1:]).encode()
        else:
            text = json.dumps(h)
            raw = (text[:-1] + ", " + json.dumps(key) + ": " + json.dumps(h[key]) + "}").encode()
        return join_file(None, d, raw_json=raw)

    return make


def truncate_at(where):
    """Cuts the valid file at where(header_len, file_len) bytes."""

    def make(h, d):
        blob = join_file(h, d)
        n = int.from_bytes(blob[:8], "little")
        return blob[: where(n, len(blob))]

    return make


def with_extra_tensor(name: str, shape: list[int]):
    """The file with one more tensor, F32 zeros of shape, after the others."""

    def make(h, d):
        size = 4 * int(np.prod(shape))
        d += b"\0" * (-len(d) % ALIGNMENT)
        h[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(d), len(d) + size]}
        return join_file(h, d + b"\0" * size)

    return make


def with_adapter(values: np.ndarray, **listing):
    """The file with a prompt adapter 'a' (tensor values, f32 [virtual, 64]) listed as listing says (not
    listed without it)."""

    def make(h, d):
        blob = np.ascontiguousarray(values, dtype=np.float32).tobytes()
        d += b"\0" * (-len(d) % ALIGNMENT)
        h["adapter.a.prompt"] = {"dtype": "F32", "shape": list(values.shape),
                                 "data_offsets": [len(d), len(d) + len(blob)]}
        if listing:
            h["__metadata__"]["pyllm.adapters"] = json.dumps({"a": {"type": "prompt", **listing}})
        return join_file(h, d + blob)

    return make


def length_field(value: int):
    def make(h, d):
        blob = join_file(h, d)
        return value.to_bytes(8, "little") + blob[8:]

    return make


def expect_error(path, *fragments, exc=FormatError, with_path=True) -> str:
    with pytest.raises(exc) as info:
        pyllm.LLM(path, n_threads=1)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"expected {f!r} in error message: {msg}"
    if with_path:
        assert os.fspath(path) in msg, f"the message should name the file: {msg}"
    assert len(msg) < 2000, "error message should be concise"
    return msg


CHILD = """
import sys
import pyllm
pyllm.LLM(sys.argv[1], n_threads=1)
print("LOADED")
"""


def run_child(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def assert_clean_error_exit(proc: subprocess.CompletedProcess, exc_name: str, fragment: str) -> None:
    assert proc.returncode >= 0, f"child killed by signal {-proc.returncode}:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 1, f"expected a Python error exit (1), got {proc.returncode}:\n{proc.stderr[-3000:]}"
    last = proc.stderr.strip().splitlines()[-1]
    assert exc_name in last and fragment in last, last


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def valid(tiny_llama_f32) -> tuple[dict, bytes]:
    with open(tiny_llama_f32, "rb") as f:
        return split_file(f.read())


@pytest.fixture
def make_file(valid, tmp_path):
    """make_file(case) writes case(header copy, data) under a fresh name and returns its path."""
    counter = iter(range(10**6))

    def make(case, name: str = "model") -> str:
        header, data = valid
        path = tmp_path / f"{name}-{next(counter)}.pllm"
        path.write_bytes(case(copy.deepcopy(header), data))
        return str(path)

    return make


# --------------------------------------------------------------------------- sanity


def test_rewritten_header_still_loads(make_file):
    """The header rewriter itself is faithful: an unmodified rewrite loads and runs."""
    path = make_file(lambda h, d: join_file(h, d))
    with pyllm.LLM(path, n_threads=1) as llm:
        logits = llm.logits([1, 2, 3])
        assert logits.shape == (3, 512) and np.isfinite(logits).all()


def test_converted_file_is_standard_and_aligned(tiny_llama_f32, valid):
    from safetensors import safe_open

    header, _ = valid
    data_start = 8 + int.from_bytes(open(tiny_llama_f32, "rb").read(8), "little")
    assert data_start % ALIGNMENT == 0
    ours = SafetensorsFile(tiny_llama_f32)
    with safe_open(tiny_llama_f32, framework="numpy") as f:
        assert set(f.keys()) == set(ours.tensors)
        for name, info in ours.tensors.items():
            assert (data_start + info.begin) % ALIGNMENT == 0 or name.startswith("__pad__"), name
            np.testing.assert_array_equal(f.get_tensor(name), ours.array(name))
    ours.close()


# --------------------------------------------------------------------------- corrupt files

HUGE = 2**62

CASES = {
    # --- whole file
    "empty": (lambda h, d: b"", ["the file is empty (0 bytes)"]),
    "shorter_than_8_bytes": (lambda h, d: b"\x10\x00\x00", ["too short"]),
    "only_length_field": (lambda h, d: (100).to_bytes(8, "little"), ["runs past the end"]),
    "truncated_in_header": (truncate_at(lambda n, size: 8 + n // 2), ["truncated"]),
    "truncated_at_data_start": (truncate_at(lambda n, size: 8 + n), ["truncated"]),
    "truncated_in_data": (truncate_at(lambda n, size: (8 + n + size) // 2), ["truncated"]),
    "truncated_last_byte": (truncate_at(lambda n, size: size - 1), ["truncated"]),
    # --- header length field
    "header_len_max_u64": (length_field(2**64 - 1), ["implausibly large"]),
    "header_len_2_40": (length_field(2**40), ["implausibly large"]),
    "header_len_past_eof": (length_field(10**7), ["runs past the end"]),
    "header_len_zero": (length_field(0), ["not valid JSON"]),
    # --- header syntax
    "header_not_json": (raw_header(b"this is not json"), ["not valid JSON"]),
    "header_not_utf8": (raw_header(b'{"\xff\xfe": 1}'), ["not valid JSON", "utf-8"]),
    "header_json_array": (raw_header(b"[1, 2, 3]"), ["not a JSON object"]),
    "header_json_string": (raw_header(b'"pyllm"'), ["not a JSON object"]),
    "header_json_null": (raw_header(b"null"), ["not a JSON object"]),
    "header_deeply_nested": (raw_header(b"[" * 100_000 + b"]" * 100_000), ["not valid JSON"]),
    "header_giant_integer": (
        raw_header(b'{"t": {"dtype": "U8", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 1]}}'),
        ["not valid JSON"],
    ),
    "header_empty_object": (raw_header(b"{}"), ["not a pyllm model file"]),
    # a 100 MB header of 1.3 million entries took 18 s to parse and check; empty lists, 11 s
    "header_too_many_tensors": (raw_header(b"{" + b",".join(b'"t%d": {"dtype": "U8", "shape": [1], "data_offsets": '
                                                          b'[%d, %d]}' % (i, i, i + 1) for i in range(1_300_000))
                                           + b"}"), ["more than 2097152 JSON values"]),
    "header_too_many_values": (raw_header(b'{"x": [' + b",".join([b"[]"] * 30_000_000) + b"]}"),
                               ["more than 2097152 JSON values"]),
    "header_too_many_tensors_after_parsing": (
        raw_header(b"{" + b",".join(b'"t%d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}' % (i, i, i + 1)
                                    for i in range(MAX_TENSORS + 1)) + b"}"), ["more than 131072 tensors"]),
    "metadata_not_object": (header_edit(lambda h: h.__setitem__("__metadata__", ["format", "pyllm"])),
                            ["__metadata__ must map strings to strings"]),
    "metadata_value_not_string": (set_meta("pyllm.format_version", 1), ["__metadata__ must map strings to strings"]),
    "name_lone_surrogate": (
        header_edit(lambda h: h.__setitem__("x\ud800", {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]})),
        ["not valid Unicode"],
    ),
    "duplicate_tensor": (with_duplicate(Q), ["lists", "twice", Q]),
    "duplicate_metadata_key": (with_duplicate("format", in_metadata=True), ["'format' twice"]),
    # --- tensor entries
    "entry_not_object": (header_edit(lambda h: h.__setitem__(Q, [1, 2])), ["entry for", "is not an object"]),
    "offsets_past_end": (set_entry(Q, data_offsets=lambda e: [e["data_offsets"][0] + 10**6, e["data_offsets"][1] + 10**6]),
                         ["ends at byte", "truncated"]),
    "offsets_2_62": (set_entry(Q, data_offsets=lambda e: [HUGE, HUGE + 16384]), ["ends at byte"]),
    "offsets_beyond_u64": (set_entry(Q, data_offsets=lambda e: [2**70, 2**70 + 16384]), ["ends at byte"]),
    "end_before_begin": (set_entry(Q, data_offsets=lambda e: e["data_offsets"][::-1]), ["ends before it begins"]),
    "negative_offset": (set_entry(Q, data_offsets=[-16384, 0]), ["invalid data_offsets"]),
    "three_offsets": (set_entry(Q, data_offsets=[0, 16384, 32768]), ["invalid data_offsets"]),
    "string_offsets": (set_entry(Q, data_offsets=["0", "16384"]), ["invalid data_offsets"]),
    "float_offsets": (set_entry(Q, data_offsets=lambda e: [float(o) for o in e["data_offsets"]]), ["invalid data_offsets"]),
    "size_mismatch": (set_entry(Q, data_offsets=lambda e: [e["data_offsets"][0], e["data_offsets"][1] - 4]),
                      ["occupies 16380 bytes", "needs 16384"]),
    "shape_mismatch_bytes": (set_entry(Q, shape=[64, 65]), ["occupies 16384 bytes", "needs 16640"]),
    "shape_product_overflows_u64": (set_entry(Q, shape=[HUGE, 8]), ["shape no array can hold"]),
    "shape_beyond_i64": (set_entry(Q, shape=[2**64 + 1, 2**64 + 1]), ["shape no array can hold"]),
    "shape_many_huge_dims": (set_entry(Q, shape=[HUGE] * 100_000), ["shape no array can hold"]),
    "shape_past_memory": (set_entry(Q, shape=[2**40, 2**10]), ["needs more bytes than"]),
    # zero bytes, but numpy cannot reshape to it ("cannot reshape array of size 0"): a ValueError deep in a load
    "shape_huge_dims_beside_a_zero": (set_entry(Q, shape=[2**62, 2**62, 0]), ["shape no array can hold"]),
    "shape_33_dims": (set_entry(Q, shape=[1] * 33), ["shape no array can hold", "more than 32 dimensions"]),
    "shape_negative_dims": (set_entry(Q, shape=[-64, -64]), ["invalid shape"]),
    "shape_one_negative_dim": (set_entry(Q, shape=[-1, 64, 64]), ["invalid shape"]),
    "shape_float_dims": (set_entry(Q, shape=[64.0, 64]), ["invalid shape"]),
    "shape_bool_dims": (set_entry(Q, shape=[True, 64]), ["invalid shape"]),
    "shape_not_list": (set_entry(Q, shape="64x64"), ["invalid shape"]),
    "dtype_unknown": (set_entry(Q, dtype="F8_E4M3"), ["unsupported dtype", "F8_E4M3"]),
    "dtype_lowercase": (set_entry(Q, dtype="f32"), ["unsupported dtype"]),
    "dtype_list": (set_entry(Q, dtype=["F32"]), ["unsupported dtype"]),
    "dtype_missing": (header_edit(lambda h: h[Q].pop("dtype")), ["unsupported dtype None"]),
    "dtype_wrong_for_weight": (set_entry(Q, dtype="I8", shape=[64, 256]), [Q, "is I8 [64, 256], expected F32 [64, 64]"]),
    "dtype_wrong_same_shape": (set_entry(Q, dtype="I32"), [Q, "is I32 [64, 64], expected F32 [64, 64]"]),
    "norm_wrong_shape": (set_entry("model.norm.weight", shape=[32, 2]), ["model.norm.weight", "expected F32 [64]"]),
    "overlap": (set_entry(K, data_offsets=lambda e: [e["data_offsets"][0] - 4096, e["data_offsets"][1] - 4096]),
                ["overlap"]),
    "overlap_identical": (header_edit(lambda h: h[K].update(dtype="F32", shape=[64, 64], data_offsets=h[Q]["data_offsets"])),
                          ["overlap"]),
    "missing_weight": (header_edit(lambda h: h.pop(DOWN1)), ["missing tensor", DOWN1]),
    "missing_norm": (header_edit(lambda h: h.pop("model.norm.weight")), ["missing tensor 'model.norm.weight'"]),
    "missing_tokenizer_blob": (header_edit(lambda h: h.pop("tokenizer.json")), ["lacks its 'tokenizer.json' blob"]),
    # --- pyllm metadata
    "format_wrong": (set_meta("format", "gguf"), ["not a pyllm model file", "'gguf'"]),
    "format_missing": (set_meta("format", None), ["not a pyllm model file"]),
    "format_version_3": (set_meta("pyllm.format_version", "3"), ["format version '3' is not supported",
                                                                 "written by a newer pyllm: upgrade pyllm, or convert"]),
    "format_version_0": (set_meta("pyllm.format_version", "0"), ["format version '0' is not supported", "); convert"]),
    "format_version_abc": (set_meta("pyllm.format_version", "abc"), ["format version 'abc' is not supported"]),
    "format_version_missing": (set_meta("pyllm.format_version", None), ["format version None is not supported"]),
    "config_missing": (set_meta("pyllm.config", None), ["lacks 'pyllm.config'"]),
    "config_not_json": (set_meta("pyllm.config", "{vocab_size: 512"), ["'pyllm.config' is not valid JSON"]),
    "config_json_list": (set_meta("pyllm.config", "[512, 64]"), ["'pyllm.config' must be a JSON object"]),
    "config_deeply_nested": (set_meta("pyllm.config", "[" * 100_000), ["'pyllm.config' is not valid JSON"]),
    "config_key_missing": (header_edit(lambda h: meta_json(h, "pyllm.config", lambda c: c.pop("hidden_size"))),
                           ["invalid pyllm metadata", "hidden_size"]),
    "config_unknown_key": (set_config(sliding_windows=128), ["invalid pyllm metadata", "sliding_windows"]),
    "config_unknown_architecture": (set_config(architecture="mamba"), ["unknown architecture 'mamba'"]),
    "config_bad_norm_type": (set_config(norm_type="batch_norm"), ["norm_type must be one of"]),
    "config_bad_activation": (set_config(hidden_act="swiglu"), ["hidden_act must be one of"]),
    "config_rotary_dim_odd": (set_config(rotary_dim=7), ["rotary_dim must be an even number"]),
    "config_layer_types_short": (set_config(sliding_window=8, layer_types=["sliding_attention"]),
                                 ["layer_types must list"]),
    "config_zero_hidden": (set_config(hidden_size=0), ["hidden_size must be an integer in 1..65536, got 0"]),
    "config_negative_layers": (set_config(num_hidden_layers=-2), ["num_hidden_layers must be an integer in 1..1024, got -2"]),
    "config_string_vocab": (set_config(vocab_size="512"), ["vocab_size must be an integer in 1..4194304"]),
    "config_float_heads": (set_config(num_attention_heads=4.0), ["num_attention_heads must be an integer in 1..4096"]),
    # sizes past SIZE_LIMITS are refused before anything loops over or allocates for them
    "config_huge_layers": (set_config(num_hidden_layers=4143972353), ["num_hidden_layers must be an integer in 1..1024"]),
    "config_huge_vocab": (set_config(vocab_size=1 << 40), ["vocab_size must be an integer in 1..4194304"]),
    "config_huge_context": (set_config(max_position_embeddings=1 << 31), ["max_position_embeddings must be an integer"]),
    "config_heads_not_divisible": (set_config(num_key_value_heads=3), ["multiple of num_key_value_heads"]),
    "config_odd_head_dim": (set_config(head_dim=15), ["head_dim must be even"]),
    "config_hidden_inconsistent": (set_config(hidden_size=32), ["model.embed_tokens.weight", "expected F32 [512, 32]"]),
    "config_head_dim_inconsistent": (set_config(head_dim=32), [Q, "expected F32 [128, 64]"]),
    "config_vocab_inconsistent": (set_config(vocab_size=1024), ["expected F32 [1024, 64]"]),
    # parts the model no longer uses loaded and ran without them (the untied lm_head, a q_proj bias)
    "config_tied_beside_lm_head": (set_config(tie_word_embeddings=True),
                                   ["tensor 'lm_head.weight' is no part of the model its config"]),
    "config_bias_left_out": (with_extra_tensor(Q[:-len("weight")] + "bias", [64]),
                             ["tensor 'model.layers.0.self_attn.q_proj.bias' is no part of the model"]),
    "config_extra_layer": (set_config(num_hidden_layers=3), ["declares 3 layers"]),
    # fewer layers than the file holds: ran the first, ignored the rest
    "config_fewer_layers": (set_config(num_hidden_layers=1), ["declares 1 layers but the file also holds tensors of layer 1"]),
    "config_absurd_layers": (set_config(num_hidden_layers=10**12), ["num_hidden_layers must be an integer in 1..1024, got 1000000000000"]),
    "config_more_layers_than_held": (set_config(num_hidden_layers=1000), ["declares 1000 layers"]),
    "config_eps_string": (set_config(norm_eps="1e-6"), ["norm_eps must be a positive finite number"]),
    "config_eps_negative": (set_config(norm_eps=-1e-6), ["norm_eps must be a positive finite number"]),
    "config_eps_nan": (set_config(norm_eps=float("nan")), ["norm_eps must be a positive finite number"]),
    # the engines compute in float32: these became infinity or 0 there, and the file loaded to answer garbage
    # (every logit 0, or NaN)
    "config_eps_past_float32": (set_config(norm_eps=1e39), ["norm_eps must be a positive finite number (float32's"]),
    "config_embedding_scale_past_float32": (set_config(embedding_scale=1e300), ["embedding_scale must be a positive"]),
    "config_embedding_scale_below_float32": (set_config(embedding_scale=1e-300),
                                             ["embedding_scale must be a positive"]),
    "config_attention_scale_past_float32": (set_config(attention_scale=1e300), ["attention_scale must be null or"]),
    "config_softcap_below_float32": (set_config(final_logit_softcapping=1e-300), ["final_logit_softcapping must be"]),
    "config_rope_factor_past_float32": (set_config(rope_scaling={"rope_type": "linear", "factor": 1e300}),
                                        ["rope_scaling must be null or an object", "within float32's range"]),
    "config_rope_factor_below_float32": (set_config(rope_scaling={"rope_type": "linear", "factor": 1e-300}),
                                         ["rope_scaling factor must be positive"]),
    "config_theta_zero": (set_config(rope_theta=0), ["rope_theta must be a positive finite number"]),
    "config_theta_infinite": (set_config(rope_theta=float("inf")), ["rope_theta must be a positive finite number"]),
    "config_tie_not_bool": (set_config(tie_word_embeddings="no"), ["tie_word_embeddings must be true or false"]),
    "config_rope_scaling_string": (set_config(rope_scaling="linear"), ["rope_scaling must be null or an object"]),
    "config_rope_factor_string": (set_config(rope_scaling={"rope_type": "linear", "factor": "2"}), ["rope_scaling"]),
    "config_rope_factor_zero": (set_config(rope_scaling={"rope_type": "linear", "factor": 0}),
                                ["rope_scaling factor must be positive"]),
    "config_rope_factor_negative": (set_config(rope_scaling={"rope_type": "llama3", "factor": -8.0, "low_freq_factor": 1.0,
                                                             "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 8192}),
                                    ["rope_scaling factor must be positive"]),
    "config_rope_llama3_freqs_reversed": (set_config(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                   "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                                                                   "original_max_position_embeddings": 8192}),
                                          ["low_freq_factor <"]),
    # keys transformers reads without a default: absent, they were filled in with guesses
    "config_rope_llama3_keys_missing": (set_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                                        ["llama3 rope_scaling needs low_freq_factor, high_freq_factor, "
                                         "original_max_position_embeddings"]),
    "config_rope_linear_factor_missing": (set_config(rope_scaling={"rope_type": "linear"}),
                                          ["linear rope_scaling needs factor"]),
    "config_sliding_window_past_int64": (set_config(sliding_window=2**63), ["sliding_window must be null or a positive"]),
    # refused by the C++ engine with a ValueError that did not name the file
    "config_rope_type_unknown": (set_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
                                 ["unsupported rope_scaling type 'yarn'"]),
    "linears_missing": (set_meta("pyllm.linears", None), ["lacks 'pyllm.linears'"]),
    "linears_json_list": (set_meta("pyllm.linears", "[1, 2]"), ["'pyllm.linears' must be a JSON object"]),
    "linear_entry_missing": (header_edit(lambda h: meta_json(h, "pyllm.linears", lambda c: c.pop("lm_head"))),
                             ["no format recorded for 'lm_head'"]),
    "linear_bad_format": (set_linear("lm_head", ["f8", 0]), ["'lm_head' has unknown format 'f8'"]),
    "linear_group_48": (set_linear("lm_head", ["int8", 48]), ["'lm_head' has invalid group size 48"]),
    "linear_group_0": (set_linear("lm_head", ["int4_sym", 0]), ["invalid group size 0"]),
    "linear_group_negative": (set_linear("lm_head", ["int4_asym", -32]), ["invalid group size -32"]),
    "linear_group_huge": (set_linear("lm_head", ["int8", 2**70]), ["invalid group size"]),
    "linear_group_string": (set_linear("lm_head", ["int8", "32"]), ["must be [format, group_size]"]),
    "linear_entry_string": (set_linear("lm_head", "f32"), ["must be [format, group_size]"]),
    "linear_entry_short": (set_linear("lm_head", ["f32"]), ["must be [format, group_size]"]),
    "linear_format_vs_dtype": (set_linear("lm_head", ["int8", 32]), ["'lm_head.weight' is F32", "expected I8"]),
    "linear_extra_entry_bad": (set_linear("model.layers.0.extra_proj", ["q2", 0]), ["unknown format 'q2'"]),
    # the header refuses a name given twice; the JSON inside its metadata took the last one
    "config_duplicate_key": (set_meta("pyllm.config", '{"hidden_size": 64, "hidden_size": 32}'),
                             ["metadata 'pyllm.config' lists 'hidden_size' twice"]),
    "generation_duplicate_key": (set_meta("pyllm.generation", '{"temperature": 0.5, "temperature": 9}'),
                                 ["metadata 'pyllm.generation' lists 'temperature' twice"]),
    "linears_duplicate_key": (set_meta("pyllm.linears", '{"lm_head": ["f32", 0], "lm_head": ["int8", 32]}'),
                              ["metadata 'pyllm.linears' lists 'lm_head' twice"]),
    "adapters_duplicate_name": (set_meta("pyllm.adapters", '{"a": {"type": "prompt"}, "a": {"type": "prefix"}}'),
                                ["metadata 'pyllm.adapters' lists 'a' twice"]),
    # loaded; then every generate() with the adapter failed on non-finite logits
    "adapter_nan": (with_adapter(np.full((4, 64), np.nan), virtual_tokens=4),
                    ["adapter 'a' tensor 'adapter.a.prompt' holds NaN or infinite values"]),
    "adapter_virtual_tokens_disagree": (with_adapter(np.zeros((4, 64)), virtual_tokens=7),
                                        ["adapter 'a' lists 7 virtual tokens but its tensor holds 4"]),
    "adapter_unlisted": (with_adapter(np.zeros((4, 64))), ["tensor 'adapter.a.prompt' is not an adapter that"]),
    "adapters_not_json": (set_meta("pyllm.adapters", "{"), ["metadata 'pyllm.adapters' is not valid JSON"]),
    "tokenizer_spec_missing": (set_meta("pyllm.tokenizer", None), ["lacks 'pyllm.tokenizer'"]),
    "tokenizer_kind_unknown": (set_tokenizer(kind="bpe"), ["unknown kind 'bpe'"]),
    "tokenizer_eos_not_list": (set_tokenizer(eos_token_ids=2), ["eos_token_ids must be a list"]),
    "tokenizer_added_not_dict": (set_tokenizer(added_tokens=["<x>"]), ["added_tokens must map"]),
    # loaded; then every generate() refused its own BOS ("token ids must lie in [0, 512)"), or never ended there
    "tokenizer_bos_past_vocab": (set_tokenizer(bos_token_id=512, add_bos_token=True),
                                 ["bos_token_id 512 is not a token of the model (its vocabulary has 512)"]),
    "tokenizer_eos_past_vocab": (set_tokenizer(eos_token_ids=[2, 10**6]), ["eos_token_ids 1000000 is not a token"]),
    "tokenizer_unknown_field": (set_tokenizer(vocab="x"), ["invalid pyllm metadata", "vocab"]),
    "generation_not_object": (set_meta("pyllm.generation", "[]"), ["'pyllm.generation' must be a JSON object"]),
    "generation_bad_value": (set_meta("pyllm.generation", '{"temperature": "hot"}'), ["'temperature'", "'hot'"]),
    # loaded, then every generate() that used the default raised a ValueError that did not name the file
    "generation_top_p_past_1": (set_meta("pyllm.generation", '{"top_p": 2}'), ["'top_p'", "in [0, 1]"]),
    "generation_min_p_past_1": (set_meta("pyllm.generation", '{"min_p": 5}'), ["'min_p'", "in [0, 1]"]),
    "generation_zero_penalty": (set_meta("pyllm.generation", '{"repetition_penalty": 0}'), ["'repetition_penalty'", "> 0"]),
    "generation_negative_temperature": (set_meta("pyllm.generation", '{"temperature": -1, "do_sample": true}'),
                                        ["'temperature'", ">= 0"]),
    "generation_negative_top_k": (set_meta("pyllm.generation", '{"top_k": -5, "do_sample": true}'), ["'top_k'", "integer >= 0"]),
    # json reads a 400-digit number as an int that no float holds: OverflowError from math.isfinite at load, or
    # from float() at every generate()
    "generation_int_past_float": (set_meta("pyllm.generation", '{"temperature": ' + "9" * 400 + '}'),
                                  ["generation default 'temperature' has an invalid value 9999", "a finite number"]),
    "generation_int_past_float_max_tokens": (set_meta("pyllm.generation", '{"max_new_tokens": ' + "9" * 400 + '}'),
                                             ["'max_new_tokens'", "a finite number"]),
    # truncated to 2 by int()
    "generation_fractional_max_new_tokens": (set_meta("pyllm.generation", '{"max_new_tokens": 2.5}'),
                                             ["'max_new_tokens'", "integer >= 0"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_file_raises_clear_error(make_file, case):
    build, fragments = CASES[case]
    path = make_file(build, case)
    start = time.perf_counter()
    expect_error(path, *fragments)
    assert time.perf_counter() - start < 10, "rejecting a bad file must be quick"


# The ones that would read out of bounds, allocate absurdly or recurse without the checks.
DANGEROUS = ["empty", "truncated_last_byte", "truncated_in_data", "header_len_max_u64", "header_len_past_eof",
             "header_deeply_nested", "offsets_past_end", "offsets_2_62", "shape_product_overflows_u64",
             "shape_beyond_i64", "shape_negative_dims", "overlap", "config_absurd_layers",
             "config_rope_type_unknown"]  # the last refused by the C++ engine


@pytest.mark.parametrize("case", DANGEROUS)
def test_dangerous_file_in_subprocess(make_file, case):
    build, fragments = CASES[case]
    path = make_file(build, case)
    proc = run_child(CHILD, path)
    assert "LOADED" not in proc.stdout
    assert_clean_error_exit(proc, "FormatError", fragments[0])


def test_not_a_regular_file(tmp_path):
    expect_error(tmp_path, "not a regular file")
    with pytest.raises(FileNotFoundError, match="cannot read"):
        pyllm.LLM(tmp_path / "absent.pllm")


def test_a_gguf_file_given_as_a_pllm_file_is_named_as_such(tmp_path, capsys):
    """`pyllm verify model.gguf` said "header length 14064895815 is implausibly large (corrupt file?)" of a
    sound GGUF file (its magic read as a safetensors header length): the message says what it is."""
    from pyllm.cli import main
    from pyllm.formats.packed import PackedModel

    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(64))
    with pytest.raises(FormatError, match="model.gguf: is a GGUF file, not a safetensors"):
        PackedModel(str(path))
    assert main(["verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert "is a GGUF file" in err and "implausibly" not in err and len(err.splitlines()) == 1, err


def test_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "model.pllm"
    os.mkfifo(fifo)
    proc = run_child(CHILD, str(fifo), timeout=30)  # would hang forever if the reader opened it
    assert_clean_error_exit(proc, "FormatError", "not a regular file")


def test_garbage_tokenizer_blob_raises(make_file, valid):
    """A tokenizer.json blob that is not a tokenizer: an exception, not a crash (checked in a child too)."""
    header, data = valid
    b, e = header["tokenizer.json"]["data_offsets"]

    def garbage(h, d):
        return join_file(h, d[:b] + (b"{" * (e - b)) + d[e:])

    path = make_file(garbage)
    with pytest.raises(FormatError, match="embedded tokenizer cannot be read"):  # parsed beside the engine's load
        pyllm.LLM(path, n_threads=1)
    proc = run_child(CHILD, path)
    assert proc.returncode == 1, proc.stderr[-3000:]


def test_tokenizer_ids_past_the_embeddings_are_refused_at_load(make_file, valid):
    """A tokenizer.json of 400 tokens, one of them with id 100000: its count fitted the 512 embeddings,
    then every text holding that token failed generate() ("token ids must lie in [0, 512)")."""
    header, data = valid
    b, e = header["tokenizer.json"]["data_offsets"]
    tokenizer = json.loads(data[b:e])
    vocab = tokenizer["model"]["vocab"]
    vocab[next(t for t, i in vocab.items() if i == 42)] = 100000

    def moved(h, d):
        blob = json.dumps(tokenizer).encode()
        d += b"\0" * (-len(d) % ALIGNMENT)
        h["tokenizer.json"].update(shape=[len(blob)], data_offsets=[len(d), len(d) + len(blob)])
        return join_file(h, d + blob)

    expect_error(make_file(moved), "tokenizer has 100001 tokens but the model only 512 embeddings")


def test_flipped_header_bytes_never_crash(make_file, valid, tmp_path):
    """Random single-byte corruptions of the header (fixed seed), loaded in a child process.

    Each must give a ValueError (FormatError, or the engine's ValueError) or, where
    the flip is harmless (padding whitespace, a token string, the chat template),
    load and run.
    """
    header, data = valid
    clean = join_file(header, data)
    n = int.from_bytes(clean[:8], "little")
    rng = random.Random(20240607)
    positions = sorted(rng.sample(range(8, 8 + n), 96)) + [8 + n - 1, 8 + n - 2, 8, 9]
    paths = []
    for i, pos in enumerate(positions):
        blob = bytearray(clean)
        # alternately any byte value (mostly invalid UTF-8) and one low bit (stays ASCII: subtler damage)
        blob[pos] ^= rng.randrange(1, 256) if i % 2 else 1 << rng.randrange(7)
        p = tmp_path / f"flip-{i}-{pos}.pllm"
        p.write_bytes(bytes(blob))
        paths.append(str(p))
    code = """
import json, sys
import pyllm
for path in sys.argv[1:]:
    try:
        with pyllm.LLM(path, n_threads=1) as llm:
            ok = llm.logits([1, 2, 3]).shape[0] == 3
        print(json.dumps([path, "ok" if ok else "bad logits", ""]), flush=True)
    except Exception as e:
        print(json.dumps([path, type(e).__name__, isinstance(e, ValueError), str(e)[:300]]), flush=True)
"""
    proc = run_child(code, *paths, timeout=120)
    assert proc.returncode == 0, f"child died ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r[0] for r in results] == paths
    errors = 0
    for path, kind, *rest in results:
        if kind == "ok":
            continue
        assert kind != "bad logits", path
        is_value_error, msg = rest
        assert is_value_error and msg, f"{path}: {kind}: {msg}"
        errors += 1
    assert errors >= len(paths) // 2, "most header flips should be detected"


def test_learned_positions_past_the_context_are_an_option_error_not_a_file_error(make_file, valid):
    """A context longer than a model's learned position table is the caller's option, refused as a
    LimitError before the engine (whose refusals are about the file, FormatError naming it)."""
    header, data = valid
    rows = 256 * 64 * 4  # F32 [max_position_embeddings, hidden]

    def learned(h, d):
        d += b"\0" * (-len(d) % ALIGNMENT)
        h["model.embed_positions.weight"] = {"dtype": "F32", "shape": [256, 64],
                                             "data_offsets": [len(d), len(d) + rows]}
        meta_json(h, "pyllm.config", lambda c: c.update(position_embedding="learned"))
        return join_file(h, d + b"\0" * rows)

    path = make_file(learned)
    with pytest.raises(LimitError, match="context_length 300 exceeds the model's 256 learned positions") as info:
        pyllm.LLM(path, n_threads=1, context_length=300)
    assert not isinstance(info.value, FormatError)
    with pyllm.LLM(path, n_threads=1, context_length=256) as llm:
        assert llm.context_length == 256


# --------------------------------------------------------------------------- the C++ layer on its own


@pytest.fixture(scope="module")
def engine_args(tiny_llama_f32):
    model = PackedModel(tiny_llama_f32)
    args = dict(path=tiny_llama_f32, data_offset=model.file.data_offset, tensors=model.engine_tensors(),
                linears=model.linears, config=model.engine_config(), context_length=16, n_threads=1)
    size = model.file_size
    model.close()
    return args, size


def engine(args, **changes):
    kw = copy.deepcopy(args)
    kw.update(changes)
    return _core.Engine(**kw)


def test_cpp_engine_accepts_valid_table(engine_args):
    args, _ = engine_args
    e = engine(args)
    logits = e.forward(np.array([1, 2, 3], dtype=np.int32), 0, False)
    assert logits.shape == (512,) and np.isfinite(logits).all()


def _retable(args, name, entry):
    tensors = copy.deepcopy(args["tensors"])
    if entry is None:
        del tensors[name]
    else:
        tensors[name] = entry
    return tensors


CPP_CASES = {
    # name: (how to change the tensor table / args, message fragment)
    "past_end": (lambda a, size: {"tensors": _retable(a, Q, ("F32", [64, 64], size, size + 16384))},
                 "past the end of the file"),
    "straddles_end": (lambda a, size: {"tensors": _retable(a, Q, ("F32", [64, 64], size - a["data_offset"] - 64,
                                                                  size - a["data_offset"] - 64 + 16384))},
                      "past the end of the file"),
    "far_past_end": (lambda a, size: {"tensors": _retable(a, Q, ("F32", [64, 64], 2**62, 2**62 + 16384))},
                     "past the end of the file"),
    "near_i64_max": (lambda a, size: {"tensors": _retable(a, Q, ("F32", [64, 64], 2**63 - 1 - 16384, 2**63 - 1))},
                     "past the end of the file"),
    "misaligned": (lambda a, size: {"tensors": _retable(a, Q, ("F32", [64, 64], a["tensors"][Q][2] + 2,
                                                               a["tensors"][Q][3] + 2))}, "not aligned"),
    "size_mismatch": (lambda a, size: {"tensors": _retable(a, Q, ("F32", [64, 64], a["tensors"][Q][2],
                                                                  a["tensors"][Q][3] - 4))},
                      "holds 16380 bytes but F32 [64, 64] needs 16384"),
    "end_before_begin": (lambda a, size: {"tensors": _retable(a, Q, ("F32", [0], 100, 0))}, "end offset before begin"),
    "negative_offset": (lambda a, size: {"tensors": _retable(a, Q, ("F32", [64, 64], -16384, 0))}, "negative offset"),
    "shape_overflows_u64": (lambda a, size: {"tensors": _retable(a, Q, ("F32", [HUGE, 8], 0, 16384))}, "overflows"),
    "bytes_overflow_i64": (lambda a, size: {"tensors": _retable(a, Q, ("F32", [2**60, 8], 0, 16384))},
                           "byte size overflows"),
    "negative_dim": (lambda a, size: {"tensors": _retable(a, Q, ("F32", [-64, -64], 0, 16384))}, "negative dimension"),
    "unknown_dtype": (lambda a, size: {"tensors": _retable(a, Q, ("F64", [64, 32], *a["tensors"][Q][2:]))},
                      f"tensor '{Q}': unsupported tensor dtype 'F64'"),
    "wrong_dtype_for_weight": (lambda a, size: {"tensors": _retable(a, Q, ("I8", [64, 256], *a["tensors"][Q][2:]))},
                               f"'{Q}' has an unexpected dtype"),
    "wrong_shape_for_config": (lambda a, size: {"tensors": _retable(a, Q, ("F32", [32, 128], *a["tensors"][Q][2:]))},
                               "has shape [32, 128], expected [64, 64]"),
    "missing_tensor": (lambda a, size: {"tensors": _retable(a, DOWN1, None)}, f"lacks tensor '{DOWN1}'"),
    "data_offset_past_end": (lambda a, size: {"data_offset": size + 1}, "data section starts past the end"),
    "data_offset_huge": (lambda a, size: {"data_offset": 2**63}, "data section starts past the end"),
    "group_size_48": (lambda a, size: {"linears": {**a["linears"], "lm_head": ("int8", 48)}}, "group size 48"),
    "unknown_format": (lambda a, size: {"linears": {**a["linears"], "lm_head": ("f8", 0)}}, "unknown weight format 'f8'"),
    "missing_linear": (lambda a, size: {"linears": {k: v for k, v in a["linears"].items() if k != "lm_head"}},
                       "no quantization entry for 'lm_head'"),
    "heads_not_divisible": (lambda a, size: {"config": {**a["config"], "num_key_value_heads": 3}},
                            "multiple of num_key_value_heads"),
    "zero_hidden": (lambda a, size: {"config": {**a["config"], "hidden_size": 0}}, "sizes must be positive"),
    "zero_context": (lambda a, size: {"context_length": 0}, "context length must be positive"),
}


@pytest.mark.parametrize("case", list(CPP_CASES))
def test_cpp_engine_validates_on_its_own(engine_args, case):
    args, size = engine_args
    change, fragment = CPP_CASES[case]
    with pytest.raises(ValueError) as info:
        engine(args, **change(args, size))
    assert fragment in str(info.value), str(info.value)


def test_cpp_engine_rechecks_against_the_actual_file(engine_args, tmp_path):
    """A table that was right for the file Python checked, but the file on disk is now shorter."""
    args, size = engine_args
    short = tmp_path / "short.pllm"
    last_end = args["data_offset"] + max(entry[3] for entry in args["tensors"].values())
    with open(args["path"], "rb") as f:
        short.write_bytes(f.read(last_end - 1))
    with pytest.raises(ValueError, match="past the end of the file"):
        engine(args, path=str(short))
    empty = tmp_path / "empty.pllm"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        engine(args, path=str(empty))
    with pytest.raises(ValueError, match="not a regular file"):
        engine(args, path=str(tmp_path))
    with pytest.raises(RuntimeError, match="cannot open"):
        engine(args, path=str(tmp_path / "absent.pllm"))


CPP_CHILD = """
import copy, json, sys
from pyllm import _core
from pyllm.formats.packed import PackedModel
path, name, begin, end = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
m = PackedModel(path)
tensors = m.engine_tensors()
dtype, shape = json.loads(sys.argv[5]) if len(sys.argv) > 5 else tensors[name][:2]
tensors[name] = (dtype, shape, begin, end)
_core.Engine(path, m.file.data_offset, tensors, m.linears, m.engine_config(), 16, 1)
print("BUILT")
"""


@pytest.mark.parametrize("case", ["past_end", "far_past_end", "overflow"])
def test_cpp_dangerous_table_in_subprocess(engine_args, case):
    args, size = engine_args
    extra = []
    if case == "past_end":
        begin, fragment = size - args["data_offset"], "past the end of the file"
    elif case == "far_past_end":
        begin, fragment = 2**62, "past the end of the file"
    else:
        begin, fragment = 0, "overflows"
        extra = [json.dumps(["F32", [HUGE, 8]])]
    proc = run_child(CPP_CHILD, args["path"], Q, str(begin), str(begin + 16384), *extra)
    assert "BUILT" not in proc.stdout
    assert_clean_error_exit(proc, "ValueError", fragment)


# --------------------------------------------------------------------------- write_atomic


class Boom(Exception):
    pass


class Interrupt(BaseException):
    """Like KeyboardInterrupt: not an Exception."""


def _plans(fail_at: int | None = None, exc: type[BaseException] = Boom):
    rng = np.random.default_rng(0)
    values = {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.f16": rng.standard_normal((7,)).astype(np.float16),
        "c.i8": rng.integers(-128, 128, (2, 3, 4), dtype=np.int8),
        "d.u8": rng.integers(0, 256, (13,), dtype=np.uint8),
        "e.i32": rng.integers(-(2**31), 2**31, (1, 1), dtype=np.int32),
        "f.i64": rng.integers(-(2**63), 2**63, (3,), dtype=np.int64),
        "g.f64": rng.standard_normal((2, 2)),
        "h.scalar": np.array(1.5, dtype=np.float32),
        "i.empty": np.zeros((0, 4), dtype=np.float32),
        "j.i16": rng.integers(-(2**15), 2**15, (5,), dtype=np.int16),
        "k.bool": rng.integers(0, 2, (9,)).astype(bool),
    }
    dtypes = {np.float32: "F32", np.float16: "F16", np.int8: "I8", np.uint8: "U8", np.int32: "I32", np.int64: "I64",
              np.float64: "F64", np.int16: "I16", np.bool_: "BOOL"}
    plans = []
    for i, (name, v) in enumerate(values.items()):
        def produce(v=v, i=i):
            if i == fail_at:
                raise exc("producer failed")
            return v
        plans.append(PlannedTensor(name, dtypes[v.dtype.type], v.shape, produce))
    return plans, values


def test_write_atomic_roundtrip_with_official_reader(tmp_path):
    from safetensors import safe_open

    plans, values = _plans()
    path = tmp_path / "out.safetensors"
    size = write_atomic(path, {"k": "v", "unicode": "café"}, plans)
    assert size == os.path.getsize(path)
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        sums = json.loads(meta.pop(CHECKSUM_KEY))
        assert re.fullmatch("[0-9a-f]{8}", meta.pop(HEADER_CHECKSUM_KEY))
        assert meta == {"k": "v", "unicode": "café"}
        assert {k for k in f.keys() if not k.startswith("__pad__")} == set(values) == set(sums)
        for name, v in values.items():
            got = f.get_tensor(name)
            assert got.dtype == v.dtype and got.shape == v.shape, name
            np.testing.assert_array_equal(got, v)
            assert sums[name] == f"{zlib.crc32(np.ascontiguousarray(v).tobytes()):08x}"
    with SafetensorsFile(path) as ours:
        for name, v in values.items():
            np.testing.assert_array_equal(ours.array(name), v)


def test_write_atomic_alignment(tmp_path):
    plans, values = _plans()
    path = tmp_path / "out.safetensors"
    write_atomic(path, {}, plans)
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    assert (8 + n) % ALIGNMENT == 0, "the data section starts on a 64-byte boundary"
    spans = sorted(tuple(e["data_offsets"]) for k, e in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(blob) - 8 - n, "the data section is covered exactly"
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "no holes between tensors"
    for name in values:
        assert header[name]["data_offsets"][0] % ALIGNMENT == 0, name
    for name, e in header.items():
        if name.startswith("__pad__"):
            assert e["dtype"] == "U8" and e["shape"][0] < ALIGNMENT
            b, end = e["data_offsets"]
            assert blob[8 + n + b:8 + n + end] == bytes(end - b)


def test_write_atomic_file_mode_follows_umask(tmp_path):
    plans, _ = _plans()
    path = tmp_path / "out.safetensors"
    write_atomic(path, {}, plans)
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("exc", [Boom, Interrupt])
@pytest.mark.parametrize("fail_at", [0, 4, 10])
def test_write_atomic_failure_leaves_nothing(tmp_path, exc, fail_at):
    plans, _ = _plans(fail_at, exc)
    path = tmp_path / "out.safetensors"
    with pytest.raises(exc, match="producer failed"):
        write_atomic(path, {}, plans)
    assert os.listdir(tmp_path) == [], "no output and no temporary file may remain"


def test_write_atomic_failure_keeps_existing_file(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"the previous model")
    before = os.stat(path)
    plans, _ = _plans(fail_at=5)
    with pytest.raises(Boom):
        write_atomic(path, {}, plans)
    assert path.read_bytes() == b"the previous model"
    assert os.stat(path).st_ino == before.st_ino
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_write_atomic_replaces_existing_file_on_success(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"the previous model")
    plans, values = _plans()
    write_atomic(path, {}, plans)
    with SafetensorsFile(path) as f:
        np.testing.assert_array_equal(f.array("a.f32"), values["a.f32"])
    assert os.listdir(tmp_path) == ["out.safetensors"]


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (lambda v: v.astype(np.float64), "produced float64, planned F32"),
        (lambda v: v.reshape(5, 3), "produced shape (5, 3), planned (3, 5)"),
        (lambda v: v[:, :4], "produced shape (3, 4)"),
    ],
)
def test_write_atomic_rejects_wrong_product(tmp_path, bad, fragment):
    plans, _ = _plans()
    good = plans[0].produce
    plans[0].produce = lambda: bad(good())
    path = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        write_atomic(path, {}, plans)
    assert os.listdir(tmp_path) == []


def test_write_atomic_failing_callback_leaves_nothing(tmp_path):
    plans, _ = _plans()
    calls = []

    def on_tensor(p, v):
        calls.append(p.name)
        if len(calls) == 3:
            raise Boom("progress bar broke")

    with pytest.raises(Boom):
        write_atomic(tmp_path / "out.safetensors", {}, plans, on_tensor=on_tensor)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda plans, meta: plans.append(PlannedTensor("a.f32", "F32", (1,), lambda: np.zeros(1, np.float32))),
         "duplicate tensor names"),
        (lambda plans, meta: plans.append(PlannedTensor("x", "Q4", (1,), lambda: np.zeros(1, np.uint8))),
         "unknown dtype 'Q4'"),
        (lambda plans, meta: plans.append(PlannedTensor("x", "F32", (-1, 4), lambda: np.zeros(1, np.float32))),
         "invalid shape"),
        (lambda plans, meta: plans.append(PlannedTensor("__pad__.1", "U8", (1,), lambda: np.zeros(1, np.uint8))),
         "reserved"),
        (lambda plans, meta: plans.append(PlannedTensor("__metadata__", "U8", (1,), lambda: np.zeros(1, np.uint8))),
         "reserved"),
        (lambda plans, meta: meta.update(version=1), "metadata must map strings to strings"),
    ],
)
def test_write_atomic_rejects_bad_plans_before_writing(tmp_path, change, fragment):
    plans, _ = _plans()
    meta = {"format": "x"}
    change(plans, meta)
    with pytest.raises(ValueError, match=fragment):
        write_atomic(tmp_path / "out.safetensors", meta, plans)
    assert os.listdir(tmp_path) == []


# -- checksums, non-finite values, and what a killed writer leaves -------------------------------------

def test_verify_finds_one_flipped_byte_in_any_tensor(tiny_llama_f32, tmp_path):
    from pyllm import cli

    assert cli.main(["verify", tiny_llama_f32]) == 0
    assert PackedModel(tiny_llama_f32).verify() > 0
    f = SafetensorsFile(tiny_llama_f32)
    for name in ("model.layers.1.mlp.down_proj.weight", "tokenizer.json", "model.norm.weight"):
        t = f.tensors[name]
        copy_path = tmp_path / "flipped.pllm"
        data = bytearray(open(tiny_llama_f32, "rb").read())
        data[f.data_offset + (t.begin + t.end) // 2] ^= 0x10
        copy_path.write_bytes(bytes(data))
        with pytest.raises(FormatError, match=re.escape(name)):
            PackedModel(str(copy_path)).verify()
        with pytest.raises(FormatError, match="checksums"):
            pyllm.LLM(str(copy_path), n_threads=1, verify=True)
        if name != "tokenizer.json":
            pyllm.LLM(str(copy_path), n_threads=1).close()  # without verify=True: loads as before
        r = subprocess.run([sys.executable, "-m", "pyllm", "verify", str(copy_path)], capture_output=True, text=True)
        assert r.returncode == 1 and name in r.stderr and "Traceback" not in r.stderr
    f.close()


def test_verify_finds_a_changed_header(make_file, valid):
    """A flipped digit of the config (rope_theta 10000 read as 10001), another chat template or end of
    generation: loaded, answering differently, while `pyllm verify` said OK (the tensors' CRCs cover
    only their bytes). The header's own checksum finds it; reformatted JSON is no change."""
    from pyllm import cli

    header, _ = valid
    assert HEADER_CHECKSUM_KEY in header["__metadata__"]
    reformatted = make_file(lambda h, d: join_file(None, d, raw_json=json.dumps(h, indent=2, sort_keys=True).encode()))
    assert cli.main(["verify", reformatted]) == 0
    edits = {
        "config": lambda h: meta_json(h, "pyllm.config", lambda c: c.update(rope_theta=c["rope_theta"] + 1)),
        "chat_template": lambda h: h["__metadata__"].update({"pyllm.chat_template": "{{ messages }}"}),
        "tokenizer": lambda h: meta_json(h, "pyllm.tokenizer", lambda t: t.update(eos_token_ids=[3])),
    }
    for what, edit in edits.items():
        path = make_file(header_edit(edit))
        with pyllm.LLM(path, n_threads=1):
            pass  # loads: only the checksums can tell
        with pytest.raises(FormatError, match=f"{re.escape(path)}: the header does not match its checksum"):
            PackedModel(path).verify()
        r = subprocess.run([sys.executable, "-m", "pyllm", "verify", path], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 1 and "header does not match" in r.stderr, (what, r.stderr)


def test_verify_refuses_a_file_without_checksums(tmp_path):
    from safetensors.numpy import save_file

    path = str(tmp_path / "old.safetensors")
    save_file({"a": np.zeros(4, np.float32)}, path)
    with SafetensorsFile(path) as f, pytest.raises(FormatError, match="no checksums"):
        verify_checksums(f)


def test_verify_refuses_a_tensor_listed_twice_in_the_checksums(tmp_path):
    """A wrong CRC, then the right one, for the same tensor: json.loads kept the last and verify passed."""
    from safetensors.numpy import save_file

    path = str(tmp_path / "twice.safetensors")
    value = np.arange(4, dtype=np.float32)
    right = f"{zlib.crc32(value.tobytes()):08x}"
    save_file({"a": value}, path, metadata={CHECKSUM_KEY: f'{{"a": "00000000", "a": "{right}"}}'})
    with SafetensorsFile(path) as f, pytest.raises(FormatError, match=f"{CHECKSUM_KEY}' lists 'a' twice"):
        verify_checksums(f)


@pytest.mark.parametrize("dtype,bad", [("F32", np.float32(np.nan)), ("F64", -np.inf), ("F16", np.float16(np.inf)),
                                       ("BF16", np.uint16(0x7FC0))])
def test_writer_refuses_non_finite_values_naming_the_tensor(tmp_path, dtype, bad):
    value = np.zeros((3, 4), dtype={"F32": np.float32, "F64": np.float64, "F16": np.float16,
                                    "BF16": np.uint16}[dtype])
    value[1, 2] = bad
    path = tmp_path / "x.safetensors"
    with pytest.raises(FormatError, match="'layer.bad'.*1 NaN or infinite"):
        write_atomic(path, {}, [PlannedTensor("good", "F32", (2,), lambda: np.ones(2, np.float32)),
                                PlannedTensor("layer.bad", dtype, (3, 4), lambda: value)])
    assert os.listdir(tmp_path) == []


FULL_DISK_WRITER = r"""
import resource, signal, sys
import numpy as np
from pyllm.formats.safetensors import PlannedTensor, write_atomic

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as a full disk's ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
big = np.ones(1 << 20, np.float32)
try:
    write_atomic(sys.argv[1], {}, [PlannedTensor("big", "F32", big.shape, lambda: big)])
except OSError as e:
    print(e.filename, e.strerror, sep="|")
"""


def test_a_write_that_fails_names_the_output_and_leaves_nothing(tmp_path):
    """A conversion whose write failed (a full disk) said "[Errno 28] No space left on device" after
    minutes of work, naming no file: the error names the output (the partial file removed)."""
    out = tmp_path / "model.pllm"
    r = subprocess.run([sys.executable, "-c", FULL_DISK_WRITER, str(out)], capture_output=True, text=True, timeout=120)
    assert r.stdout == f"{out}|File too large\n", (r.stdout, r.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_where_no_file_can_be_made_names_the_output():
    """`pyllm convert ... -o /proc/x.pllm` (a directory that exists but takes no new files) said
    "/proc/x.pllm.23791.panymd73.partial: No such file or directory", naming the temporary file."""
    from pyllm.formats.safetensors import partial_file

    with pytest.raises(OSError) as e:
        partial_file("/proc/x.pllm")
    assert e.value.filename == "/proc/x.pllm" and "cannot create a file in /proc" in e.value.strerror, e.value


KILLED_WRITER = r"""
import sys, time
import numpy as np
from pyllm.formats.safetensors import PlannedTensor, write_atomic

def stall():
    print("writing", flush=True)
    time.sleep(600)
    return np.zeros(4, np.float32)

big = np.ones(1 << 20, np.float32)
write_atomic(sys.argv[1], {}, [PlannedTensor("big", "F32", big.shape, lambda: big),
                               PlannedTensor("stall", "F32", (4,), stall)])
"""


def test_a_writer_killed_mid_write_leaves_nothing(tmp_path):
    import signal

    out = tmp_path / "out"
    out.mkdir()
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out / "model.pllm")], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline() == "writing\n"  # 4 MB written, the next tensor on its way
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert os.listdir(out) == []
