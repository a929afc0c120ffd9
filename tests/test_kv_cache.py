"""The q8_0 KV cache (llama.cpp's -ctk/-ctv q8_0): the whole engine with its keys and values kept
as blocks of 32 int8 codes with an f16 scale, against the f32 and f16 caches of the same f32 file;
with several sequences (forward_rows, copy_sequence, set_cache). The kernels themselves are tested
against numpy in test_kernels.py (test_attention*, test_quantize_q8_0_matches_reference).

Tolerances (an f32 model, so the cache is the only rounding): q8_0 moves the logits by NMSE
Q8_MAX_NMSE at most against the f32 cache (measured 7.5e-5 .. 1.5e-4 on these random models, whose
widened weights make attention sharp; the f16 cache 1e-7 .. 2.6e-7); paths that store the same
quantized values agree to float summation order (SAME).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

import pyllm  # noqa: E402
from pyllm.convert import convert_checkpoint  # noqa: E402

from conftest import make_tiny_llama, nmse  # noqa: E402
from reference import dequantize_q8_0_ref, quantize_q8_0_ref  # noqa: E402

Q8_MAX_NMSE = 1e-3
# relative to the largest logit: the same cache contents, another order of summation (a key computed
# with another batch size's matmul may round to the neighbouring q8_0 code: measured up to 1.4e-5)
SAME = 1e-4

# head_dim 64 with 3 query heads per kv head (SmolLM2's attention shape); head_dim 96 (3 blocks), MHA
CONFIGS = {
    "gqa3": dict(hidden_size=192, num_attention_heads=3, num_key_value_heads=1, head_dim=64, intermediate_size=128),
    "mha_d96": dict(hidden_size=96, num_attention_heads=2, num_key_value_heads=2, head_dim=96, intermediate_size=64,
                    num_hidden_layers=3),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_file(request, tmp_path_factory):
    base = make_tiny_llama(str(tmp_path_factory.mktemp("kv_base")), seed=3, max_position_embeddings=512,
                           **CONFIGS[request.param])
    out = str(tmp_path_factory.mktemp("kv") / "f32.pllm")
    convert_checkpoint(base, out, quant="f32", progress=False)
    return out


def prompt(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 500, n).astype(np.int32)


def close(a, b, rel=SAME) -> None:
    assert np.abs(a - b).max() <= rel * np.abs(b).max()


def test_q8_0_cache_logits_close_to_f32_cache(model_file):
    ids = prompt(200)
    with pyllm.LLM(model_file, n_threads=2) as exact_llm:
        assert exact_llm.engine.kv_cache == "f32"
        exact = exact_llm.engine.forward(ids, 0, True)
    with pyllm.LLM(model_file, n_threads=2, kv_cache="f16") as half_llm:
        half = half_llm.engine.forward(ids, 0, True)
    with pyllm.LLM(model_file, n_threads=2, kv_cache="q8_0") as llm:
        assert llm.engine.kv_cache == "q8_0"
        q8 = llm.engine.forward(ids, 0, True)
        # decoding through the cache token by token reads what one prefill call stored
        steps = [llm.engine.forward(ids[:150], 0, False)]
        steps += [llm.engine.forward(ids[p:p + 1], p, False) for p in range(150, 200)]
    print(f"q8_0 cache NMSE {nmse(q8, exact):.2e}, f16 cache {nmse(half, exact):.2e}")
    assert nmse(half, exact) < nmse(q8, exact) < Q8_MAX_NMSE  # q8_0 really is coarser than f16
    assert (q8.argmax(-1) == exact.argmax(-1)).mean() >= 0.95
    close(np.array(steps), q8[149:])


def test_q8_0_cache_with_several_sequences(model_file):
    """forward_rows over 3 sequences equals each alone; a prefix copied with copy_sequence and
    continued in another sequence equals the whole prompt run there."""
    prompts = [prompt(n, seed=n) for n in (40, 7, 130)]
    with pyllm.LLM(model_file, n_threads=2, kv_cache="q8_0", n_parallel=3) as llm:
        alone = [llm.logits(p) for p in prompts]
        together = llm.logits_many(prompts)
        for a, b in zip(together, alone):
            close(a, b)
        e = llm.engine
        whole = e.forward(prompts[2], 0, True)
        e.forward_rows(prompts[2][:100], np.zeros(100, np.int32), np.arange(100, dtype=np.int32), np.array([], np.int64))
        e.copy_sequence(0, 2, 100)
        rest = e.forward_rows(prompts[2][100:], np.full(30, 2, np.int32), np.arange(100, 130, dtype=np.int32),
                              np.arange(30, dtype=np.int64))
        close(rest, whole[100:])


def test_set_cache_quantizes_what_it_is_given(model_file):
    """Keys and values written with set_cache (prefix tuning) are stored as q8_0 blocks: giving the
    values those blocks stand for stores the same blocks (the same logits after them), and the
    logits stay within the q8_0 tolerance of an f32 cache given the exact values."""
    ids = prompt(20, seed=9)
    positions, rows = np.arange(12, 32, dtype=np.int32), np.arange(20, dtype=np.int64)
    with pyllm.LLM(model_file, n_threads=2, kv_cache="q8_0", n_parallel=2) as llm:
        c = llm.config
        shape = (c.num_hidden_layers, c.num_key_value_heads, 12, c.head_dim)
        rng = np.random.default_rng(5)
        keys, values = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
        read_back = [dequantize_q8_0_ref(quantize_q8_0_ref(a), shape).astype(np.float32) for a in (keys, values)]
        got = []
        for seq, (k, v) in enumerate([(keys, values), read_back]):
            llm.engine.set_cache(seq, 0, k, v)
            got.append(llm.engine.forward_rows(ids, np.full(20, seq, np.int32), positions, rows))
    with pyllm.LLM(model_file, n_threads=2, kv_cache="f32") as exact:
        exact.engine.set_cache(0, 0, keys, values)
        want = exact.engine.forward(ids, 12, True)
    close(got[0], got[1])
    assert 0 < nmse(got[0], want) < Q8_MAX_NMSE


def test_kv_cache_choices_and_refusals(model_file, tmp_path):
    with pytest.raises(ValueError, match="kv_cache must be one of auto, f16, f32, q8_0, not 'q8'"):
        pyllm.LLM(model_file, kv_cache="q8")
    # head_dim 16: no whole q8_0 block per head
    base = make_tiny_llama(str(tmp_path / "d16"), seed=1)
    out = str(tmp_path / "d16.pllm")
    convert_checkpoint(base, out, quant="f32", progress=False)
    with pytest.raises(ValueError, match="head_dim a multiple of 32.*is 16"):
        pyllm.LLM(out, kv_cache="q8_0")


def test_q8_0_refusal_names_the_option_not_the_file(tmp_path, capsys):
    """`pyllm run FILE --kv-cache q8_0` on a head_dim-16 model said "FILE: a q8_0 KV cache needs ...: use
    kv_cache='f16'": the file blamed, and a Python keyword the command line does not take."""
    from pyllm import cli

    base = make_tiny_llama(str(tmp_path / "d16"), seed=1)
    out = str(tmp_path / "d16.pllm")
    convert_checkpoint(base, out, quant="f32", progress=False)
    capsys.readouterr()  # (the checkpoint's own progress bars)
    assert cli.main(["run", out, "--kv-cache", "q8_0", "-p", "hi", "-n", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--kv-cache f16" in err and "is 16" in err and out not in err and len(err.splitlines()) == 1


def test_q8_0_cache_size_is_counted():
    from pyllm.llm import kv_cache_bytes

    class Shape:
        num_hidden_layers, num_key_value_heads, head_dim = 30, 3, 64

    assert kv_cache_bytes(Shape, 4096, "f16") == 2 * 30 * 3 * 64 * 4096 * 2
    assert kv_cache_bytes(Shape, 4096, "q8_0", n_seq=2) == 2 * 30 * 3 * 4096 * 2 * 2 * 34


@pytest.mark.parametrize("kv_cache, n_ctx, positions", [
    ("f16", 512, 544),  # 16 lines of 32 positions: even, one more
    ("f16", 100, 160),  # 4 lines (rounded up): even, 5
    ("f16", 96, 96),  # 3 lines: odd already
    ("f32", 512, 528),  # 32 lines of 16 positions -> 33
    ("f32", 17, 48),  # 2 -> 3
    ("q8_0", 512, 512),  # keys read position by position: no padding
])
def test_allocated_cache_gives_transposed_key_rows_an_odd_line_count(model_file, kv_cache, n_ctx, positions):
    """The CPU engine pads each kv head's positions so that a transposed key row spans an odd number
    of 64-byte lines (kv_cache_stride in kernels.h: at a power-of-two stride the head_dim rows read
    side by side share cache sets); LLM.kv_cache_bytes reports the allocation, padding included."""
    from pyllm.llm import kv_cache_bytes

    with pyllm.LLM(model_file, n_threads=1, context_length=n_ctx, kv_cache=kv_cache, n_parallel=2) as llm:
        assert llm.kv_cache_bytes == kv_cache_bytes(llm.config, positions, kv_cache, n_seq=2)
        # the padding is never read: the last position of the context is, and equals a fresh prefill
        ids = prompt(n_ctx)
        whole = llm.engine.forward(ids, 0, False)
        llm.engine.forward(ids[:-1], 0, False)
        close(llm.engine.forward(ids[-1:], n_ctx - 1, False), whole)


def test_bench_with_a_q8_0_cache(model_file, capsys):
    """`pyllm bench --kv-cache q8_0 -d N`: runs at depth over the q8_0 cache and counts its bytes."""
    import json

    from pyllm.cli import main

    assert main(["bench", model_file, "-p", "8", "-n", "2", "-d", "40", "-r", "1", "--bandwidth-mib", "0", "--json",
                 "--kv-cache", "q8_0"]) in (0, None)
    r = json.loads(capsys.readouterr().out)
    with pyllm.LLM(model_file) as llm:
        c = llm.config
    assert r["kv_cache"] == "q8_0" and r["depth"] == 40
    assert r["kv_cache_bytes"] == 2 * c.num_hidden_layers * c.num_key_value_heads * (c.head_dim // 32) * 34 * (40 + 8 + 2)



@pytest.mark.parametrize("quant", ["f32", "int8"])
def test_the_memory_check_counts_what_the_engine_allocates(tmp_path, monkeypatch, quant):
    """The check before loading counted n_ctx positions of f16 values: the CPU engine pads each kv
    head's positions (kv_cache_stride) and keeps an f32 model's "auto" cache in f32, so a cache that
    did not fit passed the check. engine_kv_cache_bytes mirrors the engine: equal to its allocation
    for every element type, context and sequence count; the check refuses at that size."""
    from pyllm.errors import LimitError
    from pyllm.formats.packed import PackedModel
    from pyllm.llm import engine_kv_cache_bytes, kv_cache_bytes

    base = make_tiny_llama(str(tmp_path / "base"), seed=3, max_position_embeddings=512, **CONFIGS["gqa3"])
    path = str(tmp_path / f"{quant}.pllm")
    convert_checkpoint(base, path, quant=quant, progress=False)
    with PackedModel(path) as m:
        config, linears = m.config, m.linears
    for kv_cache in ("auto", "f16", "f32", "q8_0"):
        for n_ctx in (17, 96, 100, 512):
            for n_parallel in (1, 3):
                with pyllm.LLM(path, n_threads=1, context_length=n_ctx, kv_cache=kv_cache, n_parallel=n_parallel) as llm:
                    assert engine_kv_cache_bytes(config, n_ctx, kv_cache, n_parallel, linears) == llm.kv_cache_bytes, \
                        (kv_cache, n_ctx, n_parallel)
                    if kv_cache == "auto":
                        assert llm.engine.kv_cache == ("f32" if quant == "f32" else "f16")
    # a machine with just the unpadded f16 count of memory: refused before the engine allocates
    monkeypatch.setattr("pyllm.limits.memory_limit", lambda: kv_cache_bytes(config, 512, "f16", 2))
    with pytest.raises(LimitError, match=r"2 sequence\(s\) of 512 positions needs a KV cache of"):
        pyllm.LLM(path, n_threads=1, context_length=512, kv_cache="f16", n_parallel=2)
