"""CUDA backend tests: every pyllm._cuda kernel against its numpy reference
(tests/reference.py), and the CUDA engine against the CPU engine: tiny LLaMA
models, and every family of tests/families.py (the block description of issue 13).

Without the module (a CPU-only build) or without a GPU, every test that needs
one is skipped; what can run anywhere (the build check, the error a missing GPU
gives) still runs. Kernel outputs are filled with NaN bit patterns on the device
before each kernel runs (pyllm._cuda does it), so an element left unwritten
fails the finiteness check.

Tolerances, as normalised MSE (nmse = sum((a - e)^2) / sum(e^2)) against float64
references:
  f32 arithmetic (GEMV, embedding, norms, RoPE, attention): 1e-10
  tensor-core GEMM (activations and dequantized weights rounded to f16, f32
  accumulation): 1e-5 (two f16 roundings of relative size 2^-11 give ~2e-7)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import pyllm
from pyllm import _core, quant

from test_kernels import ref  # tests/reference.py, loaded by path there
from families import CASES as FAMILY_CASES  # the tiny random model of every family (tests/families.py)

try:
    from pyllm import _cuda
except ImportError:  # a CPU-only build
    _cuda = None

HAVE_GPU = _cuda is not None and _cuda.device_count() > 0
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA backend built or no CUDA device")

FLOAT_FORMATS = ("f32", "f16", "bf16")
QUANT_FORMATS = ("int8", "int4_sym", "int4_asym")
ALL_FORMATS = FLOAT_FORMATS + QUANT_FORMATS
GEMV_NMSE = 1e-10
GEMM_NMSE = 1e-5
F32_NMSE = 1e-10


def assert_nmse(got, expected, tol, what=""):
    assert np.isfinite(got).all(), f"{what}: NaN/inf in the output (an element was not written?)"
    err = ref.nmse(got, expected)
    assert err < tol, f"{what}: nmse {err:.3e} >= {tol:.1e}"


# =============================================================================
# without a GPU
# =============================================================================


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("PYLLM_CUDA", "AUTO").upper() == "OFF",
                    reason="no CUDA compiler here, or the CUDA build was switched off")
def test_cuda_module_was_built_and_imports_without_a_gpu():
    """With nvcc present, `pip install .` builds pyllm._cuda; it links the CUDA
    runtime statically and imports (and answers device_count) with no GPU."""
    assert _cuda is not None, "nvcc is on PATH but pyllm._cuda was not built"
    assert _cuda.device_count() >= 0


def test_device_argument_errors(tiny_llama_f32):
    with pytest.raises(ValueError, match="device must be one of"):
        pyllm.LLM(tiny_llama_f32, device="tpu")
    if HAVE_GPU:
        pytest.skip("a GPU is present: the missing-device error cannot be observed")
    with pytest.raises(RuntimeError, match="device='cuda'"):
        pyllm.LLM(tiny_llama_f32, device="cuda")


def test_cuda_only_options_are_refused_before_the_engine(tiny_llama_f32, monkeypatch):
    """n_parallel > 1 and an f16 / q8_0 KV cache on the CUDA engine: refused in Python as the options
    they are, since what the engine's constructor raises is reported as a fault of the file (FormatError)."""
    from pyllm import llm as llm_module
    from pyllm.formats.safetensors import FormatError

    monkeypatch.setattr(llm_module, "engine_module", lambda device: _core)  # refused before any engine: no GPU needed
    for options, message in (({"n_parallel": 2}, "the CUDA engine holds one sequence"),
                             ({"kv_cache": "f16"}, "the CUDA engine keeps its KV cache in f32")):
        with pytest.raises(ValueError, match=message) as info:
            pyllm.LLM(tiny_llama_f32, device="cuda", **options)
        assert not isinstance(info.value, FormatError)


@pytest.mark.parametrize("fmt", ["int4_asym", "int8"])
def test_gpu_check_model_writer(fmt, tmp_path):
    """benchmarks/gpu_check.py writes its Llama-2-7B-shaped models with numpy; a small one must
    load and run (here on the CPU engine) and count the weight bytes a decode step reads."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gpu_check

    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32)
    path = str(tmp_path / f"{fmt}.pllm")
    weight_bytes = gpu_check.write_random_model(path, fmt, cfg)
    llm = pyllm.LLM(path, n_threads=1, context_length=32)
    assert llm.model.linears["model.layers.1.mlp.down_proj"] == (fmt, gpu_check.GROUP)
    logits = llm.engine.forward(np.arange(2, 12, dtype=np.int32), 0, False)
    assert logits.shape == (300,) and np.isfinite(logits).all() and logits.std() > 0
    per_value = {"int4_asym": 0.5 + 4 / 32, "int8": 1 + 2 / 32}[fmt]  # weight + scales (+ mins) per value
    linear_values = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 96 * 64) + 300 * 64 + 64
    assert weight_bytes == pytest.approx(linear_values * per_value)
    llm.close()


# =============================================================================
# matmul: GEMV (decode) and tensor-core GEMM (prefill)
# =============================================================================

# (M, N, K, group): one row and many, K off the 32-chunk and off the group
# (576 = 4.5 groups of 128, K < group), N off the 4-row GEMV block and the
# 128-column GEMM tile, M off the 64-row GEMM tile.
MATMUL_SHAPES = [
    (1, 1, 31, 32),
    (1, 37, 576, 128),
    (2, 5, 100, 64),
    (3, 130, 33, 32),
    (8, 64, 1536, 32),
    (9, 37, 100, 128),
    (64, 129, 576, 64),
    (130, 257, 100, 32),
    (4, 16, 64, 32),
]


def _case(fmt, M, N, K, G, seed=0):
    rng = np.random.default_rng([M, N, K, G, ALL_FORMATS.index(fmt), seed])
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    args = quant.kernel_args(quant.quantize(w, fmt, G if fmt in QUANT_FORMATS else 0))
    W = ref.dequant_ref(fmt, args["data"], K, args["group_size"], args["scales"], args["mins"])
    return x, bias, args, W


@needs_gpu
@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=lambda s: "M{}-N{}-K{}-g{}".format(*s))
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_matmul(fmt, shape, with_bias, path):
    M, N, K, G = shape
    x, bias, args, W = _case(fmt, M, N, K, G)
    b = bias if with_bias else None
    y = _cuda.matmul(x, bias=b, path=path, **args)
    assert y.shape == (M, N) and y.dtype == np.float32
    assert_nmse(y, ref.matmul_ref(x, W, b), GEMV_NMSE if path == "gemv" else GEMM_NMSE, f"{fmt} {shape} {path}")


@needs_gpu
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_matmul_accumulates(path):
    x, bias, args, W = _case("int4_asym", 5, 70, 200, 64)
    y0 = np.random.default_rng(3).standard_normal((5, 70)).astype(np.float32)
    y = _cuda.matmul(x, bias=bias, path=path, accumulate=True, y0=y0, **args)
    assert_nmse(y, ref.matmul_ref(x, W, bias) + y0, GEMV_NMSE if path == "gemv" else GEMM_NMSE, "accumulate")


# =============================================================================
# element-wise and per-row operators
# =============================================================================


@needs_gpu
@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("cols,group", [(31, 32), (100, 64), (576, 128)])
def test_embedding(fmt, cols, group):
    w = np.random.default_rng([cols, group]).standard_normal((11, cols)).astype(np.float32)
    args = quant.kernel_args(quant.quantize(w, fmt, group if fmt in QUANT_FORMATS else 0))
    table = ref.dequant_ref(fmt, args["data"], cols, args["group_size"], args["scales"], args["mins"])
    ids = np.array([0, 10, 3, 3, 7], np.int32)
    out = _cuda.embedding(ids, **args)
    assert out.shape == (5, cols)
    assert_nmse(out, table[ids], F32_NMSE, f"embedding {fmt}")
    with pytest.raises(IndexError):
        _cuda.embedding(np.array([11], np.int32), **args)


@needs_gpu
@pytest.mark.parametrize("M,D", [(1, 576), (5, 100), (3, 4096), (2, 1)])
def test_rmsnorm(M, D):
    rng = np.random.default_rng([M, D])
    x = (rng.standard_normal((M, D)) * 3).astype(np.float32)
    weight = (1 + 0.5 * rng.standard_normal(D)).astype(np.float32)
    assert_nmse(_cuda.rmsnorm(x, weight, 1e-5), ref.rmsnorm_ref(x, weight, 1e-5), F32_NMSE, f"rmsnorm {M}x{D}")


@needs_gpu
@pytest.mark.parametrize("M,F", [(1, 1), (7, 100), (3, 1536)])
def test_swiglu(M, F):
    rng = np.random.default_rng([M, F])
    gate = (4 * rng.standard_normal((M, F))).astype(np.float32)
    up = rng.standard_normal((M, F)).astype(np.float32)
    assert_nmse(_cuda.swiglu(gate, up), ref.swiglu_ref(gate, up), F32_NMSE, "swiglu")


ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
}


@needs_gpu
@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
@pytest.mark.parametrize("M,H,D", [(1, 1, 16), (5, 3, 64), (9, 4, 128)])
def test_rope(scaling, M, H, D):
    rng = np.random.default_rng([M, H, D])
    x = rng.standard_normal((M, H, D)).astype(np.float32)
    positions = rng.integers(0, 5000, M).astype(np.int32)
    sc = ROPE_SCALINGS[scaling]
    out = _cuda.rope(x, positions, 500000.0, sc)
    # The angle is formed in f32 (position * inv_freq), as the CPU op does; the
    # reference takes that f32 angle and rotates in float64.
    inv_freq = ref.rope_inv_freq_ref(D, 500000.0, sc).astype(np.float32)
    angle = (positions.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)
    expected = np.empty((M, H, D))
    a, b = x[:, :, : D // 2].astype(np.float64), x[:, :, D // 2:].astype(np.float64)
    c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    expected[:, :, : D // 2] = a * c - b * s
    expected[:, :, D // 2:] = b * c + a * s
    assert_nmse(out, expected, F32_NMSE, f"rope {scaling}")
    # and the same rotation as the CPU op on the same input
    assert_nmse(out, _core.rope(x, positions, 500000.0, sc), F32_NMSE, "rope vs CPU")


@needs_gpu
def test_kv_write_touches_exactly_its_rows():
    rng = np.random.default_rng(5)
    k = rng.standard_normal((3, 2, 8)).astype(np.float32)
    v = rng.standard_normal((3, 2, 8)).astype(np.float32)
    positions = np.array([4, 5, 6], np.int32)
    k_cache, v_cache = _cuda.kv_write(k, v, positions, 10)
    for cache, new in ((k_cache, k), (v_cache, v)):
        np.testing.assert_array_equal(cache[:, 4:7], new.transpose(1, 0, 2))
        assert np.isnan(np.delete(cache, [4, 5, 6], axis=1)).all(), "rows outside the positions were written"


@needs_gpu
@pytest.mark.parametrize("M,D", [(1, 576), (5, 100), (3, 4096), (2, 1)])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm", "layer_norm_add", "rms_norm_add"])
def test_row_norm(kind, M, D):
    """LayerNorm (bias) and RMSNorm (no bias), written or added to y0 (the post-norm residual add)."""
    rng = np.random.default_rng([M, D, len(kind)])
    x = (rng.standard_normal((M, D)) * 3 + 1).astype(np.float32)
    weight = (1 + 0.5 * rng.standard_normal(D)).astype(np.float32)
    bias = rng.standard_normal(D).astype(np.float32) if kind.startswith("layer") else None
    y0 = rng.standard_normal((M, D)).astype(np.float32) if kind.endswith("add") else None
    got = _cuda.row_norm(x, weight, bias, 1e-5, y0=y0)
    expected = ref.layernorm_ref(x, weight, bias, 1e-5) if bias is not None else ref.rmsnorm_ref(x, weight, 1e-5)
    if y0 is not None:
        expected = expected + y0
    assert_nmse(got, expected, F32_NMSE, kind)


@needs_gpu
@pytest.mark.parametrize("M,H,D", [(1, 4, 16), (5, 3, 128), (2, 2, 36)])
def test_head_rmsnorm(M, H, D):
    rng = np.random.default_rng([M, H, D])
    x = (rng.standard_normal((M, H, D)) * 2).astype(np.float32)
    weight = (1 + 0.5 * rng.standard_normal(D)).astype(np.float32)
    assert_nmse(_cuda.head_rmsnorm(x, weight, 1e-6), ref.rmsnorm_ref(x, weight, 1e-6), F32_NMSE, "head_rmsnorm")


@needs_gpu
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "gelu", "relu"])
def test_ffn_activation(act, gated):
    rng = np.random.default_rng([len(act), gated])
    up = (3 * rng.standard_normal((7, 100))).astype(np.float32)
    gate = (3 * rng.standard_normal((7, 100))).astype(np.float32) if gated else None
    got = _cuda.ffn_activation(act, gate, up)
    expected = ref.activation_ref(act, gate) * up if gated else ref.activation_ref(act, up)
    assert_nmse(got, expected, F32_NMSE, f"{act} gated={gated}")
    # and the CPU operator on the same input
    assert_nmse(got, _core.ffn_activation(act, gate, up), F32_NMSE, f"{act} vs CPU")


@needs_gpu
def test_softcap():
    x = np.linspace(-200, 200, 1001, dtype=np.float32)
    assert_nmse(_cuda.softcap(x, 30.0), 30.0 * np.tanh(x.astype(np.float64) / 30.0), F32_NMSE, "softcap")


@needs_gpu
@pytest.mark.parametrize("with_table", [True, False], ids=["positions", "scale_only"])
def test_embedding_finish(with_table):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 48)).astype(np.float32)
    table = rng.standard_normal((20, 48)).astype(np.float32)
    positions = np.array([3, 4, 5, 6], np.int32)
    got = _cuda.embedding_finish(x, 8.0, table if with_table else None, positions)
    expected = x.astype(np.float64) * 8.0 + (table[positions] if with_table else 0.0)
    assert_nmse(got, expected, F32_NMSE, "embedding_finish")
    if with_table:  # a position outside the table never reads past it
        assert np.isnan(_cuda.embedding_finish(x, 1.0, table, np.array([3, 4, 5, 20], np.int32))[3]).all()


@needs_gpu
@pytest.mark.parametrize("M,H,D,R", [(1, 2, 16, 8), (5, 3, 32, 24), (4, 4, 64, 32), (3, 2, 128, 64)])
def test_rope_partial(M, H, D, R):
    """Partial rotary embedding: the first R dims turn, the rest pass through unchanged."""
    rng = np.random.default_rng([M, H, D, R])
    x = rng.standard_normal((M, H, D)).astype(np.float32)
    positions = rng.integers(0, 50, M).astype(np.int32)  # small angles: their f32 rounding stays below 1e-9
    out = _cuda.rope(x, positions, 10000.0, None, rotary_dim=R)
    np.testing.assert_array_equal(out[:, :, R:], x[:, :, R:])
    assert_nmse(out, _core.rope(x, positions, 10000.0, None, rotary_dim=R), F32_NMSE, "partial rope vs CPU")
    inv_freq = ref.rope_inv_freq_ref(R, 10000.0).astype(np.float32)
    assert_nmse(out, ref.rope_ref(x, positions, inv_freq), 1e-9, "partial rope")


# =============================================================================
# attention
# =============================================================================

# (M, H, Hkv, D, S, pos0): decode with short and long caches, prefill tiles of
# 16 queries plus remainders, GQA 6:1, head dims from 16 to 256 (256 needs more
# than 48 KB of shared memory) and one not a multiple of 32.
ATTENTION_CASES = [
    (1, 4, 2, 64, 100, 99),
    (1, 8, 2, 128, 2000, 1999),
    (3, 4, 4, 32, 10, 7),
    (17, 6, 1, 16, 40, 23),
    (64, 4, 4, 128, 64, 0),
    (5, 2, 1, 256, 50, 45),
    (2, 4, 2, 100, 300, 150),
]


@needs_gpu
@pytest.mark.parametrize("n_splits", [0, 1, 7], ids=["auto", "nosplit", "split7"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "M{}-H{}-Hkv{}-D{}-S{}-p{}".format(*c))
def test_attention(case, n_splits):
    M, H, Hkv, D, S, pos0 = case
    rng = np.random.default_rng(list(case))
    q = rng.standard_normal((M, H, D)).astype(np.float32)
    k_cache = rng.standard_normal((Hkv, S, D)).astype(np.float32)
    v_cache = rng.standard_normal((Hkv, S, D)).astype(np.float32)
    # cache rows past the last query's position hold NaN: the kernel must not read them
    k_cache[:, pos0 + M:] = np.nan
    v_cache[:, pos0 + M:] = np.nan
    scale = 1.0 / np.sqrt(D)
    out = _cuda.attention(q, k_cache, v_cache, pos0, scale, n_splits=n_splits)
    assert out.shape == (M, H, D)
    assert_nmse(out, ref.attention_ref(q, k_cache, v_cache, pos0, scale), F32_NMSE, f"attention {case}")


# (window, softcap, alibi): a sliding window shorter than the cache, soft-capping, ALiBi, and all of them
SHAPINGS = {"window": (24, 0.0, False), "softcap": (0, 5.0, False), "alibi": (0, 0.0, True),
            "all": (40, 3.0, True), "window1": (1, 0.0, False)}


@needs_gpu
@pytest.mark.parametrize("n_splits", [0, 1, 7], ids=["auto", "nosplit", "split7"])
@pytest.mark.parametrize("shaping", list(SHAPINGS))
@pytest.mark.parametrize("case", [(1, 4, 2, 64, 300, 299), (3, 4, 4, 32, 100, 70), (40, 6, 2, 16, 90, 30),
                                  (2, 2, 1, 128, 2000, 1500)],
                         ids=lambda c: "M{}-H{}-Hkv{}-D{}-S{}-p{}".format(*c))
def test_attention_shaped(case, shaping, n_splits):
    """Sliding window, soft-capping and ALiBi in the prefill kernel and the split decode path; cache rows
    before every query's window hold NaN (a window must not read them) like the rows after the last query."""
    M, H, Hkv, D, S, pos0 = case
    window, softcap, use_alibi = SHAPINGS[shaping]
    rng = np.random.default_rng(list(case) + [len(shaping)])
    q = (2 * rng.standard_normal((M, H, D))).astype(np.float32)
    k_cache = rng.standard_normal((Hkv, S, D)).astype(np.float32)
    v_cache = rng.standard_normal((Hkv, S, D)).astype(np.float32)
    k_cache[:, pos0 + M:] = np.nan
    v_cache[:, pos0 + M:] = np.nan
    if window > 0 and pos0 - window + 1 > 0:
        k_cache[:, :pos0 - window + 1] = np.nan
        v_cache[:, :pos0 - window + 1] = np.nan
    alibi = ref.alibi_slopes_ref(H).astype(np.float32) if use_alibi else None
    scale = 1.0 / np.sqrt(D)
    out = _cuda.attention(q, k_cache, v_cache, pos0, scale, n_splits=n_splits, window=window, softcap=softcap,
                          alibi=alibi)
    expected = ref.attention_ref(q, k_cache, v_cache, pos0, scale, window=window, softcap=softcap, alibi=alibi)
    assert_nmse(out, expected, F32_NMSE, f"attention {case} {shaping}")


@needs_gpu
def test_attention_rejects_unsupported_head_dim():
    q = np.zeros((1, 1, 6), np.float32)
    cache = np.zeros((1, 4, 6), np.float32)
    with pytest.raises(ValueError, match="head_dim"):
        _cuda.attention(q, cache, cache, 0, 1.0)


# =============================================================================
# the engine: CUDA against CPU on the same file
# =============================================================================

ENGINE_CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mha_tied_ffn100": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                            intermediate_size=100),
    "llama3_rope": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=1, intermediate_size=160,
                        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=32)),
}
# quant -> (group size, what to compare, bound). Float files: max |cuda - cpu| / max |cpu| (the
# prefill GEMM rounds activations to f16); quantized files: NMSE (the CPU rounds activations to
# two int8 terms, the GPU GEMM to f16, the GEMV not at all).
ENGINE_TOLERANCES = {
    "f32": (0, "rel", 1e-2),
    "f16": (0, "rel", 1e-2),
    "int8": (32, "nmse", 1e-4),
    "int4_sym": (64, "nmse", 1e-4),
    "int4_asym": (32, "nmse", 1e-4),
}
PROMPT_LEN = 48


@pytest.fixture(scope="module", params=list(ENGINE_CONFIGS))
def engine_case(request, tmp_path_factory):
    if not HAVE_GPU:
        pytest.skip("no CUDA backend built or no CUDA device")
    pytest.importorskip("torch")
    from conftest import make_tiny_llama

    directory = make_tiny_llama(str(tmp_path_factory.mktemp("cuda_" + request.param)), seed=3,
                                **ENGINE_CONFIGS[request.param])
    return {"dir": directory, "out": tmp_path_factory.mktemp("cuda_pllm_" + request.param)}


def _compare(kind, bound, got, expected, what):
    if kind == "rel":
        err = float(np.abs(got - expected).max() / np.abs(expected).max())
    else:
        err = ref.nmse(got, expected)
    assert np.isfinite(got).all() and err < bound, f"{what}: {kind} error {err:.3e} >= {bound:.0e}"


@needs_gpu
@pytest.mark.parametrize("quant_name", list(ENGINE_TOLERANCES))
def test_engine_logits_match_cpu(engine_case, quant_name):
    from pyllm.convert import convert_checkpoint

    group, kind, bound = ENGINE_TOLERANCES[quant_name]
    path = str(engine_case["out"] / f"{quant_name}.pllm")
    convert_checkpoint(engine_case["dir"], path, quant=quant_name, group_size=group or 32, progress=False)
    ids = [int(i) for i in np.random.default_rng(1).integers(3, 400, PROMPT_LEN)]
    cpu = pyllm.LLM(path, n_threads=2)
    gpu = pyllm.LLM(path, device="cuda")
    assert gpu.engine.device == "cuda"
    expected = cpu.logits(ids)
    # prefill: every position in one call (GEMM path)
    _compare(kind, bound, gpu.logits(ids), expected, f"{quant_name} prefill")
    # decode: the prompt minus 8 tokens, then one token at a time (GEMV path, split attention, graph)
    gpu.engine.forward(np.array(ids[:-8], np.int32), 0, False)
    for i in range(PROMPT_LEN - 8, PROMPT_LEN):
        step = gpu.engine.forward(np.array([ids[i]], np.int32), i, False)
        _compare(kind, bound, step, expected[i], f"{quant_name} decode step {i}")
    # a short prefill (GEMV path with several rows)
    _compare(kind, bound, gpu.engine.forward(np.array(ids[:5], np.int32), 0, True), expected[:5],
             f"{quant_name} 5-row prefill")


@needs_gpu
def test_engine_without_graph_matches_graph(engine_case, monkeypatch):
    from pyllm.convert import convert_checkpoint

    path = str(engine_case["out"] / "graph-int4.pllm")
    convert_checkpoint(engine_case["dir"], path, quant="int4", group_size=32, progress=False)
    ids = [int(i) for i in np.random.default_rng(2).integers(3, 400, 20)]
    runs = []
    for graph in ("1", "0"):
        monkeypatch.setenv("PYLLM_CUDA_GRAPH", graph)
        llm = pyllm.LLM(path, device="cuda")
        llm.engine.forward(np.array(ids[:10], np.int32), 0, False)
        runs.append(np.stack([llm.engine.forward(np.array([ids[i]], np.int32), i, False) for i in range(10, 20)]))
        llm.close()
    np.testing.assert_array_equal(runs[0], runs[1])


@needs_gpu
def test_engine_rejects_bad_input(tiny_llama_f32):
    llm = pyllm.LLM(tiny_llama_f32, device="cuda", context_length=16)
    with pytest.raises(IndexError, match="exceed the context"):
        llm.engine.forward(np.arange(17, dtype=np.int32), 0, False)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        llm.engine.forward(np.array([10**6], np.int32), 0, False)


# --- every family of tests/families.py ------------------------------------------------------------
# The CUDA engine against the CPU engine on the same file (the CPU's KV cache in f32, like the GPU's).
# Decode steps and short prefills take the GEMV path (f32 activations): f32 files within 1e-4 (max
# error relative to the largest logit), other files within NMSE 1e-5. A long prefill takes the
# tensor-core GEMM, which rounds activations to f16: there the bounds of ENGINE_TOLERANCES hold.
FAMILY_QUANTS = {"f32": ("rel", 1e-4, 1e-2), "f16": ("nmse", 1e-5, 1e-4), "int8": ("nmse", 1e-5, 1e-4),
                 "int4": ("nmse", 1e-5, 1e-4)}
FAMILY_PROMPT = 48  # longer than every family case's sliding window (20-40)
FAMILY_GREEDY = 32


@pytest.fixture(scope="module", params=FAMILY_CASES, ids=[f"{f}-{c}" for f, c in FAMILY_CASES])
def family_case(request, tmp_path_factory):
    if not HAVE_GPU:
        pytest.skip("no CUDA backend built or no CUDA device")
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from families import make_tiny_model

    family, name = request.param
    directory = make_tiny_model(family, name, str(tmp_path_factory.mktemp(f"cuda_{family}_{name}")),
                                seed=len(family) + len(name))
    return {"name": f"{family}-{name}", "dir": directory, "out": tmp_path_factory.mktemp(f"cuda_{family}_{name}_pllm")}


def _forward_in_gemv_rows(llm, ids, start, end):
    """Runs ids[start:end] at their positions in pieces small enough for the GEMV path."""
    step = _cuda.MAX_GEMV_ROWS
    for i in range(start, end, step):
        llm.engine.forward(np.array(ids[i:min(i + step, end)], np.int32), i, False)


@needs_gpu
@pytest.mark.parametrize("quant_name", list(FAMILY_QUANTS))
def test_family_logits_match_cpu(family_case, quant_name):
    from pyllm.convert import convert_checkpoint

    kind, bound, prefill_bound = FAMILY_QUANTS[quant_name]
    path = str(family_case["out"] / f"{quant_name}.pllm")
    group_size = 32 if quant_name.startswith("int") else None
    convert_checkpoint(family_case["dir"], path, quant=quant_name, group_size=group_size, progress=False)
    ids = [int(i) for i in np.random.default_rng(4).integers(3, 400, FAMILY_PROMPT)]
    cpu = pyllm.LLM(path, n_threads=2, kv_cache="f32")
    gpu = pyllm.LLM(path, device="cuda")
    expected = cpu.logits(ids)
    what = f"{family_case['name']} {quant_name}"
    # prefill: every position in one call (GEMM path)
    _compare(kind, prefill_bound, gpu.logits(ids), expected, f"{what} prefill")
    # short prefills (GEMV path with several rows): from position 0, and past the sliding windows, the
    # cache in between filled by the same path (a GEMM prefill would leave f16-rounded keys behind)
    _compare(kind, bound, gpu.engine.forward(np.array(ids[:5], np.int32), 0, True), expected[:5], f"{what} rows 0-4")
    _forward_in_gemv_rows(gpu, ids, 5, 35)
    _compare(kind, bound, gpu.engine.forward(np.array(ids[35:41], np.int32), 35, True), expected[35:41],
             f"{what} rows 35-40")
    # decode: one token at a time (GEMV, split attention, graph) up to the end of the prompt
    for i in range(41, FAMILY_PROMPT):
        step = gpu.engine.forward(np.array([ids[i]], np.int32), i, False)
        _compare(kind, bound, step, expected[i], f"{what} decode step {i}")
    cpu.close()
    gpu.close()


@needs_gpu
def test_family_greedy_tokens_match_cpu(family_case):
    from pyllm.convert import convert_checkpoint

    path = str(family_case["out"] / "greedy-f32.pllm")
    convert_checkpoint(family_case["dir"], path, quant="f32", progress=False)
    prompt = [int(i) for i in np.random.default_rng(5).integers(3, 400, FAMILY_PROMPT)]
    cpu = _greedy_ids(pyllm.LLM(path, n_threads=2), prompt, FAMILY_GREEDY)
    gpu = _greedy_ids(pyllm.LLM(path, device="cuda"), prompt, FAMILY_GREEDY)
    assert gpu == cpu


def _real_model_path():
    """The default model if it is already here (PYLLM_REAL_MODEL, or the cache): GPU machines
    often cannot reach the package index, and a test must not hang on a download."""
    from pyllm import default_model

    path = os.environ.get("PYLLM_REAL_MODEL") or os.path.join(default_model.cache_dir(), default_model.MODEL_FILE)
    if not os.path.exists(path):
        pytest.skip(f"the default model is not at {path} (set PYLLM_REAL_MODEL)")
    return path


def _greedy_ids(llm, prompt: list[int], n: int) -> list[int]:
    logits = llm.engine.forward(np.array(prompt, np.int32), 0, False)
    out = []
    for pos in range(len(prompt), len(prompt) + n):
        out.append(int(np.argmax(logits)))
        logits = llm.engine.forward(np.array(out[-1:], np.int32), pos, False)
    return out


@needs_gpu
def test_engine_greedy_64_tokens_match_cpu(engine_case):
    from pyllm.convert import convert_checkpoint

    path = str(engine_case["out"] / "greedy-f32.pllm")
    convert_checkpoint(engine_case["dir"], path, quant="f32", progress=False)
    prompt = [1, 17, 42, 99, 7, 250, 3]
    cpu = _greedy_ids(pyllm.LLM(path, n_threads=2), prompt, 64)
    gpu = _greedy_ids(pyllm.LLM(path, device="cuda"), prompt, 64)
    assert gpu == cpu


@needs_gpu
def test_real_model_greedy_64_tokens_match_cpu():
    path = _real_model_path()
    prompt = "The history of the printing press begins in"
    cpu = pyllm.LLM(path, n_threads=2).generate(prompt, max_new_tokens=64, temperature=0.0)
    gpu = pyllm.LLM(path, device="cuda").generate(prompt, max_new_tokens=64, temperature=0.0)
    assert gpu == cpu
