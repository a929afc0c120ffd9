"""int4_asym_dq: int4_asym whose group scales and mins are 8-bit codes of one f32 step per row.

The numpy reference here recomputes every value from the stored arrays in float64 (docs/FORMAT.md's
formula); the quantizer, the converter's file and the engine (which expands the codes at load) must
agree with it exactly, and a file with a bad step is refused with the tensor's name.
"""

from __future__ import annotations

import numpy as np
import pytest

import pyllm
from pyllm import quant
from pyllm.convert import convert_checkpoint
from pyllm.formats.safetensors import FormatError
from reference import f16_bits_to_f64, nmse, unpack_int4_ref


def dq_dequant_ref(p: quant.PackedWeight) -> np.ndarray:
    """float64 [rows, cols] from the stored arrays: q * f16(scale_code * step0) + f16(min_code * step1)."""
    step = np.asarray(p.steps, dtype=np.float32)
    scale = f16_bits_to_f64((p.scales.astype(np.float32) * step[:, :1]).astype(np.float16).view(np.uint16))
    mins = f16_bits_to_f64((p.mins.astype(np.float32) * step[:, 1:]).astype(np.float16).view(np.uint16))
    q = unpack_int4_ref(p.data, p.cols).astype(np.float64)
    g = np.arange(p.cols) // p.group_size
    return q * scale[:, g] + mins[:, g]


SHAPES = [(1, 32, 32), (7, 100, 32), (16, 576, 32), (5, 33, 64), (9, 200, 128), (3, 1536, 256)]


@pytest.mark.parametrize("rows,cols,group", SHAPES)
@pytest.mark.parametrize("search", [False, True])
def test_dequantize_matches_the_reference_and_stays_near_int4_asym(rows, cols, group, search):
    rng = np.random.default_rng([rows, cols, group, search])
    w = (rng.standard_normal((rows, cols)) * np.exp(rng.standard_normal((rows, 1)))).astype(np.float32)
    p = quant.quantize(w, "int4_asym_dq", group, search=search)
    assert p.scales.dtype == np.uint8 and p.mins.dtype == np.int8 and p.steps.dtype == np.float32
    assert p.steps.shape == (rows, 2) and (p.steps >= 0).all()
    np.testing.assert_array_equal(quant.dequantize(p), dq_dequant_ref(p).astype(np.float32))
    # the codes cost little against f16 scales and mins: on N(0, s) rows within 15% of int4_asym's error
    asym = quant.quantize(w, "int4_asym", group, search=search)
    assert nmse(quant.dequantize(p), w) < 1.15 * nmse(quant.dequantize(asym), w)
    assert nmse(quant.dequantize(p), w) < 0.02
    # the packed parts are what packed_shapes says
    for part, (dtype, shape) in quant.packed_shapes("int4_asym_dq", rows, cols, group).items():
        array = {"weight": p.data, "scales": p.scales, "mins": p.mins, "steps": p.steps}[part]
        assert array.shape == shape and array.dtype == {"U8": np.uint8, "I8": np.int8, "F32": np.float32}[dtype]


def test_zero_rows_and_constant_groups():
    """A row of zeros has zero steps; constant groups (zero scale) keep scale code 0 and are exact."""
    w = np.zeros((4, 64), dtype=np.float32)
    w[1] = 0.5
    w[2, :32] = -3.0
    w[3] = np.linspace(-1, 1, 64)
    p = quant.quantize(w, "int4_asym_dq", 32, search=True)
    assert p.steps[0].tolist() == [0.0, 0.0]
    out = quant.dequantize(p)
    np.testing.assert_array_equal(out[0], 0)
    np.testing.assert_allclose(out[1], 0.5, rtol=1e-3)
    np.testing.assert_allclose(out[2, :32], -3.0, rtol=1e-3)
    assert np.abs(out[3] - w[3]).max() < 0.08


def test_kernel_args_expand_to_int4_asym():
    """Kernels see int4_asym with the expanded f16 scales: the matmul equals x @ dequantize(p)^T."""
    from pyllm import _core

    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 96)).astype(np.float32)
    p = quant.quantize(w, "int4_asym_dq", 32, search=True)
    args = quant.kernel_args(p)
    assert args["format"] == "int4_asym"
    x = rng.standard_normal((3, 96)).astype(np.float32)
    out = _core.matmul(x, **args, n_threads=1)
    ref = x.astype(np.float64) @ dq_dequant_ref(p).T
    assert nmse(out, ref) < 1e-6  # the activations' two int8 terms (~15 bits)


def test_engine_reads_the_codes_as_int4_asym(tiny_llama, tmp_path, monkeypatch):
    """The engine's logits from an int4_asym_dq file equal those from the int4_asym file with the same
    codes and the expanded scales and mins: the load-time expansion is exact."""
    from pyllm.formats.packed import PackedModel

    dq_path = str(tmp_path / "dq.pllm")
    convert_checkpoint(tiny_llama, dq_path, quant="int4_asym_dq", progress=False)
    model = PackedModel(dq_path)
    layouts = dict(model.linears)
    model.close()
    blocks = {fmt for base, (fmt, _) in layouts.items() if base not in ("model.embed_tokens", "lm_head")}
    assert blocks == {"int4_asym_dq"}
    ids = list(range(3, 40))
    with pyllm.LLM(dq_path, n_threads=1) as llm:
        dq_logits = llm.logits(ids)
    # the same conversion, each int4_asym matrix written as the expansion of its int4_asym_dq quantization
    from pyllm.convert import strategy

    real = strategy.quantize

    def expanded(w, fmt, group, **kw):
        if fmt != "int4_asym":
            return real(w, fmt, group, **kw)
        return quant.as_int4_asym(real(w, "int4_asym_dq", group, **kw))

    monkeypatch.setattr(strategy, "quantize", expanded)
    asym_path = str(tmp_path / "asym.pllm")
    convert_checkpoint(tiny_llama, asym_path, quant="int4_asym", progress=False)
    with pyllm.LLM(asym_path, n_threads=1) as llm:
        asym_logits = llm.logits(ids)
    np.testing.assert_array_equal(dq_logits, asym_logits)


@pytest.mark.parametrize("step", [-1.0, float("nan"), float("inf"), 1e30])
def test_a_bad_step_is_refused_naming_the_tensor(tiny_llama, tmp_path, step):
    """Steps come from the file: a negative, non-finite or f16-overflowing one is an error at load."""
    from pyllm.formats.packed import PackedModel

    path = str(tmp_path / "dq.pllm")
    convert_checkpoint(tiny_llama, path, quant="int4_asym_dq", progress=False)
    model = PackedModel(path)
    info = model.file.tensors["model.layers.1.mlp.down_proj.steps"]
    offset = model.file.data_offset + info.begin
    model.close()
    with open(path, "r+b") as f:
        f.seek(offset + 4 * 2)  # row 1's scale step (row r: [2r] scale step, [2r + 1] min step)
        f.write(np.float32(step).tobytes())
    # refused by the C++ engine: a FormatError naming the file (its ValueError named neither)
    with pytest.raises(FormatError, match=r"model.layers.1.mlp.down_proj.steps' row 1") as info:
        pyllm.LLM(path, n_threads=1)
    assert path in str(info.value)
