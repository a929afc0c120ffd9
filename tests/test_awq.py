"""Activation-aware scaling (pyllm/convert/awq.py): the folded scales keep every family's function,
the scales' rules, the choice per input recorded in the file, and the flag's refusals."""

from __future__ import annotations

import numpy as np
import pytest

from families import CASES


def _random_scales(config, rng) -> dict[str, np.ndarray]:
    from pyllm.convert.awq import consumers, folding_targets, scales_for

    shapes = config.linear_shapes()
    scales = {}
    for layer in range(config.num_hidden_layers):
        for name in folding_targets(config, layer):
            cols = shapes[consumers(config, name)[0]][1]
            scales[name] = scales_for(np.exp(rng.uniform(-2.0, 2.0, cols)), 1.0, config, name)
    return scales


@pytest.mark.parametrize("family,case", CASES)
def test_folded_scales_keep_the_function(family, case, tmp_path):
    """Every foldable input scaled by random factors (e^-2..e^2 before the geometric-mean
    normalisation): the float32 model computes the same logits (relative error < 1e-5), and the
    folding really changed the norms / up_proj / v_proj it names."""
    pytest.importorskip("torch")
    from families import make_tiny_model

    import pyllm
    from pyllm.convert.awq import ScaledSource, folding_targets
    from pyllm.convert.checkpoint import ArchitectureView, Checkpoint
    from pyllm.convert.pipeline import write_float_model

    directory = make_tiny_model(family, case, str(tmp_path / "model"), seed=5)
    view = ArchitectureView(Checkpoint(directory))
    config = view.config
    scales = _random_scales(config, np.random.default_rng(1))
    assert {name.rsplit(".", 1)[1] for name in scales} == (
        {"attn_in", "mlp_in", "attn_out", "mlp_mid"} if config.ffn_type == "gated" else {"attn_in", "mlp_in", "attn_out"})
    scaled_view = ScaledSource(view, config, scales)
    for name in folding_targets(config, 0)[f"model.layers.0.attn_in"]:
        assert not np.allclose(scaled_view.load(name), view.load(name))
    plain, scaled = str(tmp_path / "plain.pllm"), str(tmp_path / "scaled.pllm")
    write_float_model(view, config, plain)
    write_float_model(scaled_view, config, scaled)
    view.close()
    ids = [int(i) for i in np.random.default_rng(2).integers(3, config.vocab_size, 40)]
    with pyllm.LLM(plain, n_threads=1) as llm:
        want = llm.logits(ids)
    with pyllm.LLM(scaled, n_threads=1) as llm:
        got = llm.logits(ids)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_scales_rules():
    """Geometric mean 1, alpha 0 gives ones, ratios clipped, dead channels finite, and attn_out's
    scales equal across the query heads of a kv head (v_proj's divisors one per kv channel)."""
    from types import SimpleNamespace

    from pyllm.convert.awq import MAX_RATIO, scales_for, value_divisor

    config = SimpleNamespace(num_attention_heads=6, num_key_value_heads=2, head_dim=4)
    rng = np.random.default_rng(0)
    rms = np.exp(rng.normal(0, 1, 24))
    s = scales_for(rms, 0.5, config, "model.layers.0.mlp_in")
    assert s.dtype == np.float32 and abs(np.mean(np.log(s.astype(np.float64)))) < 1e-6
    np.testing.assert_allclose(s[1:] / s[:-1], (rms[1:] / rms[:-1]) ** 0.5, rtol=1e-5)
    np.testing.assert_array_equal(scales_for(rms, 0.0, config, "model.layers.0.mlp_in"), np.ones(24, np.float32))
    wild = rms.copy()
    wild[3], wild[7] = 0.0, 1e12  # a dead channel and a huge one
    s = scales_for(wild, 1.0, config, "model.layers.0.attn_in")
    assert np.all(np.isfinite(s)) and s.max() <= MAX_RATIO * 1.0001 and s.min() >= 1 / MAX_RATIO / 1.0001
    tied = scales_for(rms, 0.7, config, "model.layers.0.attn_out").reshape(2, 3, 4)
    for kv in range(2):
        for head in range(1, 3):
            np.testing.assert_array_equal(tied[kv, head], tied[kv, 0])
    np.testing.assert_array_equal(value_divisor(config, tied.reshape(-1)), tied[:, 0, :].reshape(-1))


def test_awq_conversion_records_its_choice_per_input(tiny_llama, tiny_llama_f32, tmp_path):
    """--quant int4 --awq: an alpha from ALPHAS for every input of every layer in the file's record,
    the same file twice (deterministic), and logits as close to f32 as the conversion without it."""
    from conftest import TRAINING_TEXT

    import pyllm
    from pyllm.cli import main
    from pyllm.convert.awq import ALPHAS
    from pyllm.formats.packed import PackedModel

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(TRAINING_TEXT * 10), encoding="utf-8")
    outs = [str(tmp_path / f"awq{k}.pllm") for k in range(2)] + [str(tmp_path / "plain.pllm")]
    for out, extra in zip(outs, (["--awq"], ["--awq"], [])):
        assert main(["convert", tiny_llama, "-o", out, "--quant", "int4", "--calib", str(calib), "-q", *extra]) == 0
    model = PackedModel(outs[0])
    alphas = model.source["quantizer"]["activation_scaling"]
    model.close()
    assert sorted(alphas) == sorted(f"model.layers.{i}.{k}" for i in range(2)
                                    for k in ("attn_in", "mlp_in", "attn_out", "mlp_mid"))
    assert set(alphas.values()) <= set(ALPHAS)
    with open(outs[0], "rb") as a, open(outs[1], "rb") as b:
        assert a.read() == b.read()
    with pyllm.LLM(tiny_llama_f32, n_threads=1) as llm:
        ids = llm.tokenize(TRAINING_TEXT[0] + TRAINING_TEXT[4])
        exact = llm.logits(ids)

    def nmse(path):
        with pyllm.LLM(path, n_threads=1) as llm:
            got = llm.logits(ids)
        return float(np.sum((got - exact) ** 2) / np.sum(exact ** 2))

    assert nmse(outs[0]) < 1.5 * nmse(outs[2])


def test_awq_needs_calibration():
    from pyllm.convert.strategy import options_from_flags

    assert options_from_flags("int4", None, False, 0, None, awq=True).activation_scaling
    for args in [("int4", "none", False), ("int4_sym", None, True), ("f16", None, False)]:
        with pytest.raises(ValueError, match="--awq"):
            options_from_flags(*args, 0, None, awq=True)


def test_prefix_adapter_values_take_the_scales(tmp_path, monkeypatch):
    """A prefix-tuning adapter's values enter the attention beside v_proj's: with scales folded into
    v_proj they are divided alike, so the model with its prefix computes the same logits."""
    pytest.importorskip("peft")
    from conftest import make_tiny_llama
    from test_prompt_learning import make_adapter

    import pyllm
    from pyllm.adapters import prime
    from pyllm.convert import pipeline
    from pyllm.convert.checkpoint import ArchitectureView, Checkpoint

    base = make_tiny_llama(str(tmp_path / "base"), seed=21)
    adapter = make_adapter(base, str(tmp_path / "prefix"), "prefix")
    view = ArchitectureView(Checkpoint(base))
    config = view.config
    view.close()
    scales = _random_scales(config, np.random.default_rng(1))
    plan = pipeline.plan_quantization

    def with_scales(*args, **kwargs):
        strategy = plan(*args, **kwargs)
        strategy.scales = scales
        return strategy

    ids = [int(i) for i in np.random.default_rng(3).integers(3, 400, 20)]
    logits = []
    for planner in (plan, with_scales):
        monkeypatch.setattr(pipeline, "plan_quantization", planner)
        out = str(tmp_path / f"{len(logits)}.pllm")
        pipeline.convert_checkpoint(base, out, quant="f32", progress=False, adapters=[("task", adapter)])
        with pyllm.LLM(out, n_threads=1) as llm:
            virtual = prime(llm.engine, llm.model.adapters["task"], 0)
            logits.append(llm.engine.forward_rows(np.array(ids, np.int32), np.zeros(len(ids), np.int32),
                                                  np.arange(virtual, virtual + len(ids), dtype=np.int32),
                                                  np.arange(len(ids))))
    assert np.max(np.abs(logits[1] - logits[0])) <= 1e-5 * np.max(np.abs(logits[0]))


def test_matrices_kept_from_a_gguf_are_not_rescaled(tmp_path):
    """--quant int8 --awq from a Q8_0 GGUF: the matrices the file holds bit for bit stay so (their
    inputs are left unscaled) instead of being re-quantized by a folded scale."""
    from conftest import make_tiny_llama
    from test_gguf import Q, write_gguf

    from pyllm.convert import convert_checkpoint
    from pyllm.convert.strategy import options_from_flags

    base = make_tiny_llama(str(tmp_path / "base"), seed=3, hidden_size=128, intermediate_size=256)
    gguf = str(tmp_path / "model.gguf")
    write_gguf(base, gguf, Q.Q8_0)
    kept = []
    for awq in (False, True):
        report = convert_checkpoint(gguf, str(tmp_path / f"{awq}.pllm"), quant="int8", progress=False,
                                    options=options_from_flags("int8", None, False, 0, None, None, awq))
        kept.append(sorted(report.kept_exactly))
    assert kept[0] and kept[1] == kept[0]
    from pyllm.formats.packed import PackedModel

    model = PackedModel(str(tmp_path / "True.pllm"))
    alphas = model.source["quantizer"]["activation_scaling"]
    model.close()
    assert list(alphas) == [f"model.layers.{i}.{k}" for i in range(2) for k in ("attn_in", "mlp_in", "attn_out", "mlp_mid")]
    # every input reads, or folds into, a matrix kept bit for bit (q/k/v/o, gate/up; down's scales
    # would fold into up_proj): each is recorded unscaled
    assert {f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.o_proj",
                                                                  "mlp.up_proj")} <= set(kept[1])
    assert set(alphas.values()) == {0.0}
