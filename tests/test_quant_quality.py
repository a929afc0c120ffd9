"""Better int4/int8: scale search, GPTQ, per-tensor layouts, calibration forward, the rotated test model.

References are written out plainly here: GPTQ as one column at a time with the whole remaining
matrix updated after each column; the calibration forward against the engine's f32 logits; the
rotated model against the original's logits.
"""

from __future__ import annotations

import os
import sys

import zlib

import numpy as np
import pytest

from pyllm import quant
from pyllm.quant import QUANT_FORMATS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tools"))


def group_errors(w, p, weights=None):
    """Squared error of each group [rows, n_groups], float64, from the stored arrays."""
    d = (quant.dequantize(p).astype(np.float64) - w.astype(np.float64)) ** 2
    if weights is not None:
        d = d * weights[None, :]
    rows, cols = w.shape
    n_groups = -(-cols // p.group_size)
    padded = np.zeros((rows, n_groups * p.group_size))
    padded[:, :cols] = d
    return padded.reshape(rows, n_groups, p.group_size).sum(axis=2)


DISTRIBUTIONS = {
    "normal": lambda rng, shape: rng.standard_normal(shape),
    "student-t 1.5": lambda rng, shape: rng.standard_t(1.5, shape),
    "outliers": lambda rng, shape: rng.standard_normal(shape) * np.where(rng.random(shape) < 0.01, 50.0, 1.0),
    "skewed": lambda rng, shape: rng.exponential(1.0, shape) - 0.3,
}


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("weighted", [False, True])
def test_scale_search_never_worse_than_minmax(dist, fmt, group, weighted):
    rng = np.random.default_rng(zlib.crc32(repr((dist, fmt, group, weighted)).encode()))  # str hash() varies by run
    w = (DISTRIBUTIONS[dist](rng, (48, 200)) * 0.05).astype(np.float32)  # 200 columns: a short last group
    weights = rng.gamma(0.5, 1.0, 200).astype(np.float32) if weighted else None
    rtn = quant.quantize(w, fmt, group)
    searched = quant.quantize(w, fmt, group, search=True, importance=weights)
    before, after = group_errors(w, rtn, weights), group_errors(w, searched, weights)
    if fmt != "int4_asym_dq":  # whose 8-bit codes move each group's grid after the search: totals only
        assert np.all(after <= before * (1 + 1e-6) + 1e-30), np.max(after - before)
    # and it does find better grids: the total error falls (by 2-40% for int4; int8 with one heavy
    # outlier per group can gain as little as 0.05%)
    assert after.sum() < (0.999 if fmt != "int8" else 0.99999) * before.sum()


def test_scale_search_keeps_an_exact_grid():
    """Values already on an int4 grid (as SmolLM2's Q4_1 weights are) are reproduced exactly."""
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.01, 0.02, (16, 4, 1))
    low = rng.uniform(-0.2, -0.1, (16, 4, 1))
    codes = rng.integers(0, 16, (16, 4, 32))
    codes[..., 0], codes[..., 1] = 0, 15
    w = (codes * scale.astype(np.float16).astype(np.float64) + low.astype(np.float16)).reshape(16, 128)
    w = w.astype(np.float32)
    p = quant.quantize(w, "int4_asym", 32, search=True)
    assert quant.nmse(quant.dequantize(p), w) < 1e-10


def test_quantize_rejects_bad_importance():
    w = np.ones((2, 32), np.float32)
    with pytest.raises(ValueError, match="importance"):
        quant.quantize(w, "int8", 32, search=True, importance=np.ones(31))
    with pytest.raises(ValueError, match="importance"):
        quant.quantize(w, "int8", 32, search=True, importance=-np.ones(32))


# --- GPTQ ---------------------------------------------------------------------


def gptq_reference(w, h, fmt, group, damping=None):
    """GPTQ written plainly: H^-1 by inversion, then for each column j: pick the group's grid at its first
    column, round column j, and subtract err * Hinv[j, k] / Hinv[j, j] from every later column k, after
    which column j is removed from the problem (Hinv <- Schur complement)."""
    from pyllm.convert.gptq import DAMPING
    from pyllm.quant import search_group_params

    damping = DAMPING if damping is None else damping
    rows, cols = w.shape
    importance = np.diag(h).astype(np.float32)[None, None, :]
    h = h.astype(np.float64).copy()
    h[np.diag_indices_from(h)] += damping * np.mean(np.diag(h))
    hinv = np.linalg.inv(h)
    work = w.astype(np.float64).copy()
    out = np.zeros_like(work)
    lo, hi = quant.CODE_RANGE[fmt]
    offset = quant.CODE_OFFSET[fmt]
    for j in range(cols):
        if j % group == 0:
            g = work[:, j:j + group].astype(np.float32)[:, None, :]
            s, m = search_group_params(g, np.ones(g.shape, bool), fmt, importance[..., j:j + group])
            s = s[:, 0].astype(np.float64)
            m = None if m is None else m[:, 0].astype(np.float64)
        shifted = work[:, j] - (0 if m is None else m)
        q = np.clip(np.rint(np.where(s != 0, shifted / np.where(s != 0, s, 1), 0)) + offset, lo, hi)
        out[:, j] = (q - offset) * s + (0 if m is None else m)
        err = work[:, j] - out[:, j]
        work[:, j + 1:] -= np.outer(err / hinv[j, j], hinv[j, j + 1:])
        # eliminate column j from the inverse Hessian
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return out


def correlated_problem(rng, rows, cols, n=400):
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols)
    x = rng.standard_normal((n, cols)) @ (np.eye(cols) + 2 * mix) * rng.uniform(0.2, 3.0, cols)
    h = x.T @ x / n
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    return w, h


@pytest.mark.parametrize("fmt,group", [("int4_asym", 32), ("int4_sym", 64), ("int8", 32)])
def test_gptq_matches_plain_loop(fmt, group):
    from pyllm.convert.gptq import gptq_quantize

    rng = np.random.default_rng(3)
    w, h = correlated_problem(rng, 24, 192)
    ours = quant.dequantize(gptq_quantize(w, h, fmt, group)).astype(np.float64)
    ref = gptq_reference(w, h, fmt, group)
    # same algorithm; float order differs, so an occasional code may round the other way
    assert np.mean(np.isclose(ours, ref, rtol=1e-4, atol=1e-6)) > 0.995
    assert quant.nmse(ours, ref) < 1e-4


def output_error(w, deq, h):
    d = (deq - w).astype(np.float64)
    return float(np.sum((d @ h) * d))


@pytest.mark.parametrize("fmt,group", [("int4_asym", 64), ("int4_sym", 32), ("int4_asym_dq", 32)])
def test_gptq_lowers_output_error(fmt, group):
    from pyllm.convert.gptq import gptq_quantize

    rng = np.random.default_rng(4)
    w, h = correlated_problem(rng, 64, 256)
    searched = quant.dequantize(quant.quantize(w, fmt, group, search=True, importance=np.diag(h)))
    gptq = quant.dequantize(gptq_quantize(w, h, fmt, group))
    assert output_error(w, gptq, h) < 0.8 * output_error(w, searched, h)


def test_gptq_with_coded_scales_stays_near_f16_scales():
    """int4_asym_dq's GPTQ rounds on grids its 8-bit codes hold: its output error stays within 10% of
    int4_asym's (f16 scales and mins) at the same group size, and its arrays are the format's."""
    from pyllm.convert.gptq import gptq_quantize

    rng = np.random.default_rng(7)
    w, h = correlated_problem(rng, 48, 320)
    coded = gptq_quantize(w, h, "int4_asym_dq", 32)
    assert coded.scales.dtype == np.uint8 and coded.mins.dtype == np.int8 and coded.steps.shape == (48, 2)
    f16 = gptq_quantize(w, h, "int4_asym", 32)
    assert output_error(w, quant.dequantize(coded), h) < 1.1 * output_error(w, quant.dequantize(f16), h)


@pytest.mark.parametrize("n", [1, 7, 128, 129, 257, 1000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lower_triangular_inverse_matches_numpy_inverse(n, dtype):
    from pyllm.convert.gptq import lower_triangular_inverse

    rng = np.random.default_rng(n)
    lower = (np.tril(rng.standard_normal((n, n))) + 2 * np.sqrt(n) * np.eye(n)).astype(dtype)
    ours = lower_triangular_inverse(lower)
    ref = np.linalg.inv(lower.astype(np.float64))
    assert ours.dtype == dtype and np.all(np.triu(ours, 1) == 0)
    assert quant.nmse(ours, ref) < (1e-12 if dtype == np.float64 else 1e-12 * 1e5)


def test_inverse_hessian_factor_inverts_the_damped_hessian():
    from pyllm.convert.gptq import DAMPING, inverse_hessian_factor

    rng = np.random.default_rng(6)
    _, h = correlated_problem(rng, 4, 300)
    u, dead = inverse_hessian_factor(h)
    damped = h + DAMPING * np.mean(np.diag(h)) * np.eye(len(h))
    assert u.dtype == np.float64 and not dead.any() and np.all(np.tril(u, -1) == 0)
    assert quant.nmse(u.T @ u, np.linalg.inv(damped)) < 1e-20


def test_gptq_handles_dead_inputs():
    from pyllm.convert.gptq import gptq_quantize

    rng = np.random.default_rng(5)
    w, h = correlated_problem(rng, 8, 64)
    h[:, 5] = h[5, :] = 0
    p = gptq_quantize(w, h, "int4_asym", 32)
    assert np.isfinite(quant.dequantize(p)).all()


# --- calibration forward, conversion with calibration ---------------------------


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_hessian_sums_are_the_same_bits_for_any_number_of_workers(workers, monkeypatch):
    """HessianSums shares the inputs out among its worker threads by layer; each input's products are
    single-threaded and summed in arrival order, so the sums (which GPTQ's rounding is sensitive to)
    do not depend on how many workers there are: against a plain loop, bit for bit."""
    from threadpoolctl import threadpool_limits

    from pyllm.convert.calibrate import INPUT_NAMES, HessianSums

    monkeypatch.setattr(HessianSums, "WORKERS", workers)
    rng = np.random.default_rng(0)
    inputs = [(layer, kind, rng.standard_normal((rows, 24 if kind == 3 else 16)).astype(np.float32))
              for rows in (7, 256, 3) for layer in range(5) for kind in range(4)]
    sums = HessianSums()
    with sums:
        for layer, kind, x in inputs:
            sums.observe(layer, kind, x)
    expected: dict[str, np.ndarray] = {}
    with threadpool_limits(limits=1, user_api="blas"):  # as the workers' products
        for layer, kind, x in inputs:
            name = f"model.layers.{layer}.{INPUT_NAMES[kind]}"
            product = x.T @ x
            expected[name] = expected[name] + product if name in expected else product.astype(np.float64)
    assert sums.sums.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(sums.sums[name], value, err_msg=name)


@pytest.mark.parametrize("family,case", [("llama", "gqa"), ("gpt2", "gelu_new"), ("gemma2", "softcap_window"),
                                         ("phi3", "gqa_partial")])
def test_calibration_hessians_are_transformers_input_second_moments(family, case, tmp_path):
    """The engine's observed matrix inputs (Calibration) give the second moments of the inputs that
    transformers' own modules see, for every input kind, on families with different blocks."""
    torch = pytest.importorskip("torch")
    from families import load_reference, make_tiny_model

    from pyllm.convert.calibrate import Calibration
    from pyllm.convert.checkpoint import ArchitectureView, Checkpoint

    directory = make_tiny_model(family, case, str(tmp_path / "model"), seed=3)
    view = ArchitectureView(Checkpoint(directory))
    cal = Calibration(view, view.config, "The quick brown fox. " * 200, sequences=3, length=32, progress=False)
    view.close()
    hf = load_reference(family, directory)
    layer = hf.model.layers[1] if hasattr(hf, "model") else hf.transformer.h[1]
    modules = {"model.layers.1.mlp.down_proj": getattr(layer.mlp, "down_proj", None) or layer.mlp.c_proj,
               "model.layers.1.self_attn.o_proj": getattr(layer.self_attn if hasattr(layer, "self_attn") else
                                                          layer.attn, "o_proj", None) or layer.attn.c_proj}
    seen = {name: [] for name in modules}
    hooks = [module.register_forward_hook(lambda m, args, out, n=name: seen[n].append(args[0][0].detach()))
             for name, module in modules.items()]
    with torch.no_grad():
        for window in cal.windows:
            hf(torch.from_numpy(window[None]))
    for h in hooks:
        h.remove()
    assert len(cal.windows) == 3
    for name, xs in seen.items():
        x = torch.cat(xs).double().numpy()
        assert quant.nmse(cal.input_hessian(name), x.T @ x / len(x)) < 1e-9, name


@pytest.fixture(scope="module")
def tiny_calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    from conftest import TRAINING_TEXT

    path.write_text("\n".join(TRAINING_TEXT * 10), encoding="utf-8")
    return str(path)


def tiny_logits(path, ids):
    import pyllm

    with pyllm.LLM(path, n_threads=1) as llm:
        return llm.logits(ids)


def test_calibrated_int4_file_runs_in_the_kernels(tiny_llama, tiny_llama_f32, tiny_calib, tmp_path):
    """--quant int4 --calib: a valid .pllm (unchanged layouts) within the bits budget, closer to f32 than RTN."""
    from pyllm.cli import main
    from pyllm.convert import convert_checkpoint
    from pyllm.convert.strategy import QuantOptions
    from pyllm.formats.packed import PackedModel

    import pyllm
    from conftest import TRAINING_TEXT

    with pyllm.LLM(tiny_llama_f32, n_threads=1) as llm:  # text like the calibration text
        ids = llm.tokenize(TRAINING_TEXT[0] + TRAINING_TEXT[4])
    exact = tiny_logits(tiny_llama_f32, ids)
    rtn = str(tmp_path / "rtn.pllm")
    convert_checkpoint(tiny_llama, rtn, quant="int4_asym", group_size=64, progress=False,
                       options=QuantOptions(method="rtn"))
    out = str(tmp_path / "gptq.pllm")
    assert main(["convert", tiny_llama, "-o", out, "--quant", "int4", "--calib", tiny_calib, "-q"]) == 0
    model = PackedModel(out)
    assert {fmt for fmt, _ in model.linears.values()} <= set(QUANT_FORMATS)
    blocks = [model.linears[b] for b in model.linears if b.startswith("model.layers.")]
    assert len({layout for layout in blocks}) > 1  # layouts chosen per matrix
    from pyllm.convert.gptq import DAMPING

    record = model.source["quantizer"]  # how the file was made, read back from its metadata
    assert record == {"method": "gptq", "bits_budget": 4.6, "layouts": "per matrix", "damping": DAMPING,
                      "calibration": "file", "calibration_windows": {"file": record["calibration_windows"]["file"]}}
    assert record["calibration_windows"]["file"] >= 1
    model.close()
    assert quant.nmse(tiny_logits(out, ids), exact) < quant.nmse(tiny_logits(rtn, ids), exact)


def test_convert_flags_choose_the_method():
    from pyllm.convert.strategy import options_from_flags

    assert options_from_flags("int4", None, False, 0, None).method == "gptq"  # builtin calibration text
    assert options_from_flags("int4", None, False, 0, None).calib is None
    assert options_from_flags("int4", "none", False, 0, None).method == "search"
    assert options_from_flags("int8", None, False, 0, None).method == "gptq"  # int8 calibrates too
    assert options_from_flags("int8", "none", False, 0, None).method == "search"
    assert options_from_flags("int4_asym", None, True, 0, None).method == "rtn"
    assert options_from_flags("int8", "x.txt", False, 0, None).calib == "x.txt"
    with pytest.raises(ValueError, match="--bits is the budget of --quant int4"):  # no effect on int8: refused
        options_from_flags("int8", "x.txt", False, 0, 4.5)
    with pytest.raises(ValueError, match="with --quant int8 every matrix is int8 already"):
        options_from_flags("int8", "x.txt", False, 2, None)
    with pytest.raises(ValueError, match="exclude"):
        options_from_flags("int4", "x.txt", True, 0, None)
    with pytest.raises(ValueError, match="budget"):
        options_from_flags("int4", "none", False, 0, 3.0)


def test_int8_keeps_minmax_scales_without_calibration():
    """The scale search serves int4 only: int8 without calibration stores min/max scales and
    nearest codes (the search lowered int8's weight error but raised SmolLM2's perplexity)."""
    from pyllm.convert.strategy import Strategy

    w = np.random.default_rng(3).standard_normal((40, 96)).astype(np.float32)
    got = Strategy("search").quantize("m", w, "int8", 32)
    want = quant.quantize(w, "int8", 32, search=False)
    np.testing.assert_array_equal(got.data, want.data)
    np.testing.assert_array_equal(got.scales, want.scales)
    assert not np.array_equal(Strategy("search").quantize("m", w, "int4_asym", 32).scales,
                              quant.quantize(w, "int4_asym", 32, search=False).scales)


def test_file_records_how_its_matrices_were_quantized(tiny_llama, tmp_path):
    """pyllm.source's "quantizer" says the method actually used (int8 without calibration rounds to
    nearest: no scale search), the budget only where layouts were chosen, nothing for float files."""
    from pyllm.convert import convert_checkpoint
    from pyllm.convert.strategy import QuantOptions
    from pyllm.formats.packed import PackedModel

    cases = [("int8", QuantOptions(), {"method": "rtn"}),
             ("int4_asym", QuantOptions(), {"method": "search"}),
             ("int4", QuantOptions(bits_budget=5.0), {"method": "search", "bits_budget": 5.0, "layouts": "per matrix"}),
             ("f16", QuantOptions(), None)]
    for quant_name, options, want in cases:
        out = str(tmp_path / f"{quant_name}.pllm")
        convert_checkpoint(tiny_llama, out, quant=quant_name, progress=False, options=options)
        model = PackedModel(out)
        assert model.source.get("quantizer") == want, quant_name
        model.close()


def test_keep_sensitive_stores_matrices_at_int8(tiny_llama, tmp_path):
    from pyllm.convert import convert_checkpoint
    from pyllm.convert.strategy import QuantOptions
    from pyllm.formats.packed import PackedModel

    out = str(tmp_path / "keep.pllm")
    convert_checkpoint(tiny_llama, out, quant="int4_sym", group_size=32, progress=False,
                       options=QuantOptions(keep_sensitive=3))
    model = PackedModel(out)
    kept = [b for b, (fmt, _) in model.linears.items() if fmt == "int8" and b not in ("model.embed_tokens", "lm_head")]
    model.close()
    assert len(kept) == 3


def test_uniform_int4_where_it_fits_the_budget(tmp_path):
    """--quant int4 with the default budget writes every matrix int4_asym_dq g32 when that fits 4.6
    bits/weight (64 bits a row: rows of about 640 values and more); narrower models, an explicit
    --bits or --group-size get the per-matrix allocation."""
    from conftest import make_tiny_llama

    from pyllm.convert import convert_checkpoint
    from pyllm.convert.strategy import BITS_BUDGET, QuantOptions, UNIFORM_INT4, uniform_fits
    from pyllm.formats.packed import PackedModel

    smollm2 = {"q": (576, 576), "k": (192, 576), "o": (576, 576), "up": (1536, 576), "down": (576, 1536)}
    assert uniform_fits(smollm2) and not uniform_fits({"q": (64, 64), "down": (64, 128)})
    wide = make_tiny_llama(str(tmp_path / "wide"), hidden_size=640, intermediate_size=1280)
    for options, group, want in [(QuantOptions(), None, "uniform"),
                                 (QuantOptions(bits_budget=BITS_BUDGET), None, "per matrix"),
                                 (QuantOptions(), 64, None)]:
        out = str(tmp_path / f"{want}-{group}.pllm")
        convert_checkpoint(wide, out, quant="int4", group_size=group, progress=False, options=options)
        with PackedModel(out) as model:
            blocks = {model.linears[b] for b in model.linears if b.startswith("model.layers.")}
            assert model.source["quantizer"].get("layouts") == (want or "per matrix")
            assert (blocks == {UNIFORM_INT4}) == (want == "uniform")
            if group:
                assert {g for _, g in blocks} == {group}


def test_bits_budget_is_respected(tiny_llama, tmp_path):
    from pyllm.convert import convert_checkpoint
    from pyllm.convert.strategy import QuantOptions

    for budget in (4.3, 5.5):
        report = convert_checkpoint(tiny_llama, str(tmp_path / f"b{budget}.pllm"), quant="int4", progress=False,
                                    options=QuantOptions(bits_budget=budget))
        assert report.bits_per_weight <= budget
    assert report.bits_per_weight > 4.6  # a larger budget is used


# --- the rotated test model ------------------------------------------------------


def test_rotated_model_computes_the_same_function(tiny_llama, tiny_llama_f32, tmp_path):
    from rotated_model import rotated_checkpoint

    from pyllm.convert import convert_checkpoint
    from pyllm.convert.checkpoint import Checkpoint

    rotated = rotated_checkpoint(tiny_llama, str(tmp_path / "rotated"), seed=3)
    out = str(tmp_path / "rotated.pllm")
    convert_checkpoint(rotated, out, quant="f32", progress=False)
    ids = [5, 17, 42, 99, 3, 250, 7, 8]
    assert quant.nmse(tiny_logits(out, ids), tiny_logits(tiny_llama_f32, ids)) < 1e-9
    a, b = Checkpoint(tiny_llama), Checkpoint(rotated)
    q0, q1 = a.load("model.layers.0.self_attn.q_proj.weight"), b.load("model.layers.0.self_attn.q_proj.weight")
    assert not b.config.tie_word_embeddings
    assert np.allclose(b.load("model.norm.weight"), 1.0)
    assert quant.nmse(q1, q0) > 0.5  # the weights themselves changed
    a.close()
    b.close()


def test_forked_workers_write_the_file_one_process_writes(tiny_llama, tiny_calib, tmp_path, monkeypatch):
    """The layout table and GPTQ run in forked workers (pyllm/convert/workers.py): split over 1 or 3
    processes, the calibrated --quant int4 file is the same bytes (the sampled rows are drawn before
    the split; each task's arithmetic does not depend on where it runs)."""
    from pyllm import _core
    from pyllm.convert import convert_checkpoint
    from pyllm.convert.strategy import QuantOptions

    files = []
    for cpus in (1, 3):
        monkeypatch.setattr(_core, "default_threads", lambda cpus=cpus: cpus)  # the workers' default count
        out = tmp_path / f"split{cpus}.pllm"
        convert_checkpoint(tiny_llama, str(out), quant="int4", progress=False,
                           options=QuantOptions(method="gptq", calib=tiny_calib))
        files.append(out.read_bytes())
    assert files[0] == files[1]


def _worker_sigterm_is_default(_item) -> bool:
    import signal

    return (signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            and not {signal.SIGTERM, signal.SIGINT} & signal.pthread_sigmask(signal.SIG_BLOCK, []))


def _worker_dies_on_item_two(item) -> int:
    import os
    import signal

    if item == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer does
    return item


def _no_new_children(before: set, within: float = 10.0) -> bool:
    """True once every process started since `before` is reaped. The executor's own thread reaps the
    workers of a broken pool as forked_map's cleanup does: until it records a worker's exit status,
    multiprocessing lists that dead worker among active_children (its waitpid got ECHILD)."""
    import multiprocessing
    import time

    deadline = time.monotonic() + within
    while set(multiprocessing.active_children()) - before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_forked_worker_that_dies_raises_rather_than_waiting_for_ever():
    """multiprocessing.Pool replaced a dead worker and waited for its task for ever (a CI run hung
    for an hour in the conversion after a forked-worker test); forked_map raises, and ends the rest."""
    import multiprocessing

    from pyllm.convert.workers import forked_map

    before = set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match="worker process of the conversion died"):
        list(forked_map(_worker_dies_on_item_two, range(8), {}, processes=2))
    assert _no_new_children(before)


class _TwoArgumentError(Exception):
    def __init__(self, message, detail):  # pickled with args (message,): unpickling it fails
        super().__init__(message)


def _worker_raises_what_cannot_be_read_back(item) -> int:
    if item == 1:
        raise _TwoArgumentError("the real reason", "detail")
    return item


def _worker_sleeps(item) -> int:
    import time

    time.sleep(1)
    return item


def test_a_task_error_that_cannot_be_read_back_is_not_called_a_dead_worker():
    """A task's exception that cannot be unpickled broke the pool, and forked_map said a worker died
    for lack of memory; it says the answer could not be read back, and why."""
    from pyllm.convert.workers import forked_map

    with pytest.raises(RuntimeError, match="could not be read back .*: TypeError: .*missing 1 required"):
        list(forked_map(_worker_raises_what_cannot_be_read_back, range(4), {}, processes=2))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_workers_end_when_their_parent_is_killed(tmp_path):
    """SIGKILL of a conversion (the out-of-memory killer's way) left its forked GPTQ workers waiting for
    ever on the pool's pipes, ~640 MB each (a review: alive 1 min 45 s later, until killed by hand)."""
    import os
    import signal
    import subprocess
    import time

    pids = tmp_path / "pids"
    script = (f"import os, sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
              "from test_quant_quality import _worker_writes_its_pid_and_waits\n"
              "from pyllm.convert.workers import forked_map\n"
              f"list(forked_map(_worker_writes_its_pid_and_waits, [{str(pids)!r}] * 2, {{}}, processes=2))\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (pids.exists() and len(pids.read_text().split()) == 2):
            assert time.monotonic() < deadline and parent.poll() is None, "the workers did not start"
            time.sleep(0.05)
        workers = [int(p) for p in pids.read_text().split()]
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10

        def alive(pid: int) -> bool:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
            except FileNotFoundError:
                return False

        while any(alive(p) for p in workers):
            assert time.monotonic() < deadline, "a worker outlived its killed parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()


def _worker_writes_its_pid_and_waits(path: str) -> None:
    import os
    import time

    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(120)


def test_a_signal_while_the_workers_are_forked_still_ends_them(monkeypatch):
    """SIGTERM (the CLI's handler: SystemExit) or Ctrl-C while the workers were being forked (signals
    blocked there) acted once the mask was restored, before the `try` that ends the workers: they
    went on with every task and the exit waited for them. Now they end at once."""
    import multiprocessing
    import os
    import signal
    import time
    from concurrent.futures import ProcessPoolExecutor

    from pyllm.cli import _exit_cleanly_on_sigterm
    from pyllm.convert.workers import forked_map

    submit = ProcessPoolExecutor.submit
    submitted = []

    def submit_then_signal(self, *args, **kwargs):
        submitted.append(1)
        if len(submitted) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # blocked here: pending until the mask is restored
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(ProcessPoolExecutor, "submit", submit_then_signal)
    before = set(multiprocessing.active_children())
    restore = _exit_cleanly_on_sigterm()
    try:
        started = time.monotonic()
        with pytest.raises(SystemExit):
            list(forked_map(_worker_sleeps, range(8), {}, processes=2))
        assert time.monotonic() - started < 3  # (the 8 tasks take 4 s on 2 workers)
        assert _no_new_children(before)
    finally:
        restore()


def test_forked_workers_are_born_with_sigterm_blocked_and_die_of_one_sent_before_they_set_up():
    """A worker forked while the parent runs the CLI's SIGTERM handler (SystemExit) must never run
    it: forked_map forks with SIGTERM blocked, and _default_signals, the worker's first step, makes
    a SIGTERM that arrived before it kill the worker at once. Also: the caller's mask is restored."""
    import os
    import signal

    from pyllm.cli import _exit_cleanly_on_sigterm
    from pyllm.convert.workers import _WORKER_SIGNALS, _default_signals, forked_map

    restore = _exit_cleanly_on_sigterm()
    try:
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert list(forked_map(_worker_sigterm_is_default, range(3), {}, processes=2)) == [True] * 3
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        # a newborn worker: both signals blocked, the CLI's handler inherited, a SIGTERM pending
        signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                _default_signals(parent)
            finally:
                os._exit(3)  # reached only if the pending SIGTERM did not kill it
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        restore()


def test_forked_workers_die_on_sigterm_under_the_cli_handler():
    """The CLI turns SIGTERM into SystemExit for its own cleanups (cli._exit_cleanly_on_sigterm);
    forked workers must not inherit that: Pool.terminate stops them with SIGTERM, and a worker
    unwinding inside the pool's queue locks could leave the pool's join waiting for ever. Also: a
    caller that stops reading early ends the pool without waiting."""
    import time

    from pyllm.cli import _exit_cleanly_on_sigterm
    from pyllm.convert.workers import forked_map

    restore = _exit_cleanly_on_sigterm()
    try:
        assert list(forked_map(_worker_sigterm_is_default, range(4), {}, processes=2)) == [True] * 4
        started = time.monotonic()
        results = forked_map(_worker_sigterm_is_default, range(50), {}, processes=2)
        next(results)
        results.close()  # early exit: terminate
        assert time.monotonic() - started < 30
    finally:
        restore()
