"""The whole engine against transformers fp32: logits at every position and greedy continuations.

Models are tiny random LlamaForCausalLM instances built in the test (see conftest.make_tiny_llama),
converted with `pyllm convert`'s code path into each weight format.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import pyllm  # noqa: E402
from pyllm import _core  # noqa: E402
from pyllm.convert import convert_checkpoint  # noqa: E402

from conftest import make_tiny_llama, nmse  # noqa: E402

CONFIGS = {
    # grouped-query attention, untied embeddings, default theta
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
    # plain multi-head attention, tied embeddings, a second theta, FFN not a multiple of 32
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=100000.0,
                     intermediate_size=100),
    # llama3 rope scaling, 8 query heads on 1 kv head, hidden size not a multiple of 64
    "llama3_rope": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=1, intermediate_size=160,
                        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=32)),
    # linear rope scaling, three layers, explicit head_dim different from hidden / heads
    "linear_rope": dict(num_hidden_layers=3, head_dim=32, num_attention_heads=4, num_key_value_heads=2,
                        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
}

PROMPT_LEN = 64
# f16 KV cache (test_f16_kv_cache): measured max rel 2.7e-4..5.4e-4 against transformers, NMSE 6e-8..1.8e-7
# against the f32 cache; f16 weights give ~5e-3
KV_F16_MAX_REL = 2e-3
KV_F16_MAX_NMSE = 1e-6


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    directory = make_tiny_llama(str(tmp_path_factory.mktemp(request.param)), seed=len(request.param),
                                **CONFIGS[request.param])
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = [int(i) for i in np.random.default_rng(1).integers(3, 400, PROMPT_LEN)]
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0].numpy()
    return {"name": request.param, "dir": directory, "hf": hf, "ids": ids, "ref": reference,
            "out": tmp_path_factory.mktemp(request.param + "_pllm")}


def load(case, quant, group_size=None, n_threads=2):
    path = str(case["out"] / f"{quant}-{group_size}.pllm")
    convert_checkpoint(case["dir"], path, quant=quant, group_size=group_size, progress=False)
    return pyllm.LLM(path, n_threads=n_threads)


def max_rel(out, ref):
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def test_f32_logits_match_transformers(case):
    out = load(case, "f32").logits(case["ids"])
    assert out.shape == case["ref"].shape
    assert max_rel(out, case["ref"]) < 1e-4


def test_f16_logits_match_transformers(case):
    # f16 weights carry ~5e-4 relative rounding per weight; through the layers that stays well under 1e-2
    out = load(case, "f16").logits(case["ids"])
    assert max_rel(out, case["ref"]) < 1e-2


def test_bf16_logits_close(case):
    # bf16 keeps 8 mantissa bits (~4e-3 relative per weight): NMSE, not max error, is the fair measure
    out = load(case, "bf16").logits(case["ids"])
    assert nmse(out, case["ref"]) < 1e-3


@pytest.mark.parametrize("quant,group_size,max_nmse,min_top1", [
    # Thresholds: these random models (weights N(0, 0.08)) are far more sensitive than trained ones;
    # measured NMSE is ~6e-4 (int8) and ~5e-2 (int4 g32) with top-1 ~0.97 / ~0.7. The bounds leave
    # ~3x margin yet still fail for any real defect (a wrong group, scale or nibble gives NMSE ~1).
    ("int8", 32, 5e-3, 0.85),
    ("int8", 128, 5e-3, 0.85),
    ("int4", 32, 0.15, 0.5),
    ("int4_asym", 64, 0.2, 0.45),
    ("int4_asym_dq", 32, 0.2, 0.4),  # measured as int4_asym g32 (NMSE 3e-2..1.15e-1, top-1 0.42..0.81)
    ("int4_sym", 32, 0.2, 0.45),
    ("int4_sym", 128, 0.3, 0.4),
])
def test_quantized_logits(case, quant, group_size, max_nmse, min_top1):
    out = load(case, quant, group_size).logits(case["ids"])
    ref = case["ref"]
    error = nmse(out, ref)
    top1 = float((out.argmax(-1) == ref.argmax(-1)).mean())
    print(f"{case['name']} {quant} g{group_size}: NMSE {error:.2e}, top-1 agreement {top1:.2f}")
    assert np.isfinite(out).all()
    assert error < max_nmse
    assert top1 >= min_top1


def test_greedy_continuation_matches_transformers(case):
    llm = load(case, "f32")
    prompt = case["ids"][:16]
    # transformers' greedy choice at each step (no logits processors, so EOS may be chosen too)
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(32):
            sequence.append(int(case["hf"](torch.tensor([sequence])).logits[0, -1].argmax()))
    hf_out = sequence[len(prompt):]
    # step by step through the KV cache, as generation does
    ours = []
    logits = llm.engine.forward(np.array(prompt, dtype=np.int32), 0, False)
    for pos in range(len(prompt), len(prompt) + 32):
        token = int(np.argmax(logits))
        ours.append(token)
        logits = llm.engine.forward(np.array([token], dtype=np.int32), pos, False)
    assert ours == hf_out


@pytest.mark.parametrize("quant", ["f32", "f16", "int8", "int4"])
def test_portable_kernels_give_the_same_model_output(case, quant):
    llm = load(case, quant, 32 if quant.startswith("int") else None)
    fast = llm.logits(case["ids"])
    _core.select_kernels("portable")
    try:
        portable = llm.logits(case["ids"])
    finally:
        _core.select_kernels("auto")
    if quant == "f32":
        # float kernels (and an f32 KV cache): only the summation order differs
        assert nmse(portable, fast) < 1e-10
    elif quant == "f16":
        # the same, but a summation-order difference can flip the f16 rounding of a cached key or
        # value (the KV cache is f16 for f16 models), which these random models amplify (measured
        # 4e-10); a kernel defect gives NMSE near 1
        assert nmse(portable, fast) < 1e-8
    else:
        # same integer dot products, but a float-order difference can flip the int8 rounding of an
        # activation, and these random models amplify that (measured up to ~1e-4, against ~1e-3..5e-2 of
        # quantization error); a kernel defect gives NMSE near 1
        assert nmse(portable, fast) < 0.05 * nmse(fast, case["ref"])


def test_thread_count_does_not_change_results(case):
    one = load(case, "int8", n_threads=1).logits(case["ids"])
    two = load(case, "int8", n_threads=2).logits(case["ids"])
    np.testing.assert_array_equal(one, two)


def test_incremental_decode_equals_full_prompt(case):
    """Feeding the prompt in pieces through the KV cache gives the logits of one full pass."""
    llm = load(case, "f32")
    ids = np.array(case["ids"], dtype=np.int32)
    full = llm.engine.forward(ids, 0, True)
    parts = [llm.engine.forward(ids[:10], 0, True), llm.engine.forward(ids[10:11], 10, True),
             llm.engine.forward(ids[11:], 11, True)]
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=0, atol=1e-5 * np.abs(full).max())


def test_f16_kv_cache(case):
    """The KV cache holds f16 unless the model is f32 (or kv_cache says otherwise): each cached key
    and value rounded to f16 (relative error <= 2^-11) moves the logits far less than f16 weights do."""
    f32 = load(case, "f32")
    assert f32.engine.kv_cache == "f32"
    assert load(case, "int8").engine.kv_cache == "f16" and load(case, "f16").engine.kv_cache == "f16"
    half = pyllm.LLM(f32.path, n_threads=2, kv_cache="f16")
    assert half.engine.kv_cache == "f16"
    out, exact = half.logits(case["ids"]), f32.logits(case["ids"])
    print(f"{case['name']}: f16 cache max rel {max_rel(out, case['ref']):.2e}, NMSE {nmse(out, exact):.2e}")
    assert max_rel(out, case["ref"]) < KV_F16_MAX_REL
    assert 0 < nmse(out, exact) < KV_F16_MAX_NMSE  # > 0: the cache really is rounded
    # decoding through the cache, token by token, gives what one prefill call gives
    stepwise = [half.engine.forward(np.array(case["ids"][:8], np.int32), 0, False)]
    for pos in range(8, 16):
        stepwise.append(half.engine.forward(np.array([case["ids"][pos]], np.int32), pos, False))
    np.testing.assert_allclose(np.array(stepwise), out[7:16], rtol=0, atol=1e-4 * np.abs(out).max())
    with pytest.raises(ValueError, match="kv_cache"):
        pyllm.LLM(f32.path, kv_cache="int8")
