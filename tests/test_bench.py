"""`pyllm bench`: runs on a tiny model and reports every field with values that add up (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from pyllm import _core
from pyllm.bench import weight_bytes_per_token
from pyllm.cli import main
from pyllm.llm import LLM, kv_cache_stride


def run_cli(capsys, *argv) -> dict:
    assert main(["bench", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_json_fields(tiny_llama_f32, capsys):
    r = run_cli(capsys, tiny_llama_f32, "-p", "24", "-n", "6", "-r", "2", "-t", "2", "--bandwidth-mib", "16", "--json")
    # tiny_llama: vocab 512, hidden 64, FFN 128, 2 layers, 4 heads / 2 KV heads (head_dim 16), untied, f32
    vocab, d, f, layers, kv = 512, 64, 128, 2, 2 * 16
    per_layer = d * d + 2 * kv * d + d * d + 3 * f * d
    assert r["params"] == layers * per_layer + 2 * vocab * d + (2 * layers + 1) * d
    # every linear + lm_head + one embedding row + the norms, 4 bytes each
    assert r["weight_bytes_per_token"] == 4 * (layers * per_layer + vocab * d + d + (2 * layers + 1) * d)
    assert r["formats"] == {"f32": layers * 7 + 2}
    assert (r["n_prompt"], r["n_gen"], r["repetitions"], r["threads"]) == (24, 6, 2, 2)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "load_seconds"):
        s = r[key]
        assert 0 < s["min"] <= s["median"] <= s["max"] and s["stdev"] >= 0
    assert len(r["prefill_tokens_per_s"]["samples"]) == 2 and len(r["load_seconds"]["samples"]) == 3
    decode = r["decode_tokens_per_s"]["median"]
    assert r["decode_gb_per_s"] == pytest.approx(r["weight_bytes_per_token"] * decode / 1e9)
    assert r["read_bandwidth_gb_per_s"] > 0
    assert r["decode_fraction_of_bound"] == pytest.approx(r["decode_gb_per_s"] / r["read_bandwidth_gb_per_s"])
    assert r["kv_cache"] == "f32"  # an f32 model keeps an f32 cache
    # as allocated: the CPU engine pads a kv head's 30 positions to 3 lines of 16 f32 (kv_cache_stride)
    assert r["kv_cache_bytes"] == 2 * layers * kv * 48 * 4 == 2 * layers * kv * kv_cache_stride("f32", 24 + 6) * 4
    with LLM(tiny_llama_f32, n_threads=1, context_length=24 + 6) as llm:
        assert r["kv_cache_bytes"] == llm.kv_cache_bytes  # what the engine allocated
    assert r["file_plus_kv_bytes"] == r["file_bytes"] + r["kv_cache_bytes"]
    assert 0 < r["rss_before_load_bytes"] and 0 < r["rss_bytes"] <= r["peak_rss_bytes"]
    assert r["kernels"] == _core.active_kernels() and r["machine"]["cores"] >= 1
    assert r["activation_quant"] == "int8x2"


def test_bench_activation_quant_flag(tiny_llama_f32, capsys):
    r = run_cli(capsys, tiny_llama_f32, "-p", "8", "-n", "2", "-r", "1", "--bandwidth-mib", "0", "--json",
                "--activation-quant", "int8")
    assert r["activation_quant"] == "int8"
    with pytest.raises(SystemExit):
        main(["bench", tiny_llama_f32, "--activation-quant", "int4"])


def test_bench_kv_cache_flag(tiny_llama_f32, capsys):
    """--kv-cache f16 on an f32 model: the report says so and counts 2 bytes per cached value."""
    r = run_cli(capsys, tiny_llama_f32, "-p", "8", "-n", "2", "-r", "1", "--bandwidth-mib", "0", "--json",
                "--kv-cache", "f16")
    assert r["kv_cache"] == "f16"
    # K and V, layers, kv heads x head_dim, positions as allocated (10 padded to one line of 32 f16), bytes
    assert r["kv_cache_bytes"] == 2 * 2 * (2 * 16) * 32 * 2
    with pytest.raises(SystemExit):
        main(["bench", tiny_llama_f32, "--kv-cache", "q8"])


def test_bench_text_report_and_bad_arguments(tiny_llama_f32, capsys):
    assert main(["bench", tiny_llama_f32, "-p", "8", "-n", "2", "-r", "1", "--bandwidth-mib", "0"]) == 0
    out = capsys.readouterr().out
    assert "| pp8 |" in out and "| tg2 |" in out and "MB of weights per token" in out and "read bandwidth" not in out
    assert main(["bench", tiny_llama_f32, "-r", "0"]) == 1
    assert "at least 1" in capsys.readouterr().err
    # the context the tests need is -d + -p + -n: past the limit, the error named context_length, no flag of bench's
    for flags in (["-p", "16777216"], ["-d", "99999999999", "-p", "8"]):
        assert main(["bench", tiny_llama_f32, "-n", "2", "--bandwidth-mib", "0", *flags]) == 1
        err = capsys.readouterr().err
        assert "tokens exceed the context limit of 16777216" in err and f"{flags[0]} {flags[1]}" in err, err


def test_weight_bytes_per_token_tied_and_untied():
    untied = {"token_embd.weight": 1000, "output.weight": 1000, "blk.0.attn_q.weight": 50, "output_norm.weight": 4}
    assert weight_bytes_per_token(untied, "token_embd.", "output.", vocab_size=10) == 1000 + 100 + 50 + 4
    tied = {"model.embed_tokens.weight": 800, "model.embed_tokens.scales": 200, "model.norm.weight": 4}
    assert weight_bytes_per_token(tied, "model.embed_tokens.", "lm_head.", vocab_size=10) == 1000 + 100 + 4


def test_read_bandwidth_probe_checks_its_arguments():
    assert _core.read_bandwidth(1, 4 << 20, 1) > 0
    with pytest.raises(ValueError, match="at least 1 MiB"):
        _core.read_bandwidth(1, 1000, 1)
    with pytest.raises(ValueError, match="at least 1 MiB"):
        _core.read_bandwidth(1, 4 << 20, 0)


def test_bench_depth_runs_the_tests_after_a_filled_context(tiny_llama_f32, capsys):
    """-d N (llama-bench's meaning): N tokens sit in the KV cache before each test; the cache is sized
    for them, the JSON says the depth, the table marks its rows."""
    r = run_cli(capsys, tiny_llama_f32, "-p", "8", "-n", "4", "-d", "100", "-r", "1", "--bandwidth-mib", "0", "--json")
    # 112 positions padded to 7 lines of 16 f32, as allocated
    assert r["depth"] == 100 and r["kv_cache_bytes"] == 2 * 2 * (2 * 16) * 112 * 4
    assert main(["bench", tiny_llama_f32, "-p", "8", "-n", "2", "-d", "40", "-r", "1", "--bandwidth-mib", "0"]) == 0
    out = capsys.readouterr().out
    assert "| pp8 @ d40 |" in out and "| tg2 @ d40 |" in out
    assert main(["bench", tiny_llama_f32, "-d", "-1"]) == 1
    assert "-d -1: the depth must be >= 0" in capsys.readouterr().err


def test_a_count_out_of_range_is_named_with_its_value(tiny_llama_f32, capsys):
    """`pyllm bench -n 0` (or -p, -r, -t below 1) said "-p, -n and -r must be at least 1", naming three flags
    and no value. Each now names its own flag and the value given."""
    for flag, value, message in (("-p", "0", "-p 0: the tokens of the prefill test must be at least 1"),
                                 ("-n", "-5", "-n -5: the tokens of the decode test must be at least 1"),
                                 ("-r", "0", "-r 0: the repetitions must be at least 1"),
                                 ("-t", "0", "-t 0: the threads must be at least 1")):
        assert main(["bench", tiny_llama_f32, flag, value, "--bandwidth-mib", "0"]) == 1
        err = capsys.readouterr().err
        assert err == f"pyllm bench: error: {message}\n", err


def test_a_filled_context_is_what_the_tests_read(tiny_llama_f32):
    """fill_context writes positions 0 .. depth-1 as a forward pass of those tokens would."""
    import numpy as np

    import pyllm
    from pyllm.bench import fill_context

    with pyllm.LLM(tiny_llama_f32, n_threads=1) as llm:
        fill_context(llm.engine, llm.config.vocab_size, 30)
        after = llm.engine.forward(np.array([7], np.int32), 30, False)
        ids = np.random.default_rng(1).integers(0, llm.config.vocab_size, 30).astype(np.int32)
        whole = llm.engine.forward(np.concatenate([ids, [7]]).astype(np.int32), 0, False)
    np.testing.assert_allclose(after, whole, rtol=1e-5, atol=1e-5)


def test_bench_profile_accounts_for_the_wall_time(tiny_llama_f32, capsys, monkeypatch):
    """PYLLM_PROFILE=1: per-stage milliseconds per token in both phases, shares that add up to the wall
    time (the remainder is "outside stages"), and for decode the weight bytes of the stages, which sum
    to what the report says a decode step reads."""
    monkeypatch.setenv("PYLLM_PROFILE", "1")
    r = run_cli(capsys, tiny_llama_f32, "-p", "16", "-n", "4", "-r", "2", "-t", "1", "--bandwidth-mib", "16", "--json")
    stages = {"embedding", "rmsnorm", "qkv_proj", "rope_cache_write", "attention", "o_proj", "gate_up_proj", "swiglu",
              "down_proj", "residual", "lm_head", "outside stages"}
    for phase, tokens_per_s in (("prefill", r["prefill_tokens_per_s"]), ("decode", r["decode_tokens_per_s"])):
        p = r["profile"][phase]
        assert set(p["stages"]) == stages
        assert p["ms_per_token"] == pytest.approx(1e3 * sum(1 / v for v in tokens_per_s["samples"]) / 2)
        assert sum(s["ms_per_token"] for s in p["stages"].values()) == pytest.approx(p["ms_per_token"])
        assert sum(s["share"] for s in p["stages"].values()) == pytest.approx(1.0)
        assert all(s["ms_per_token"] >= 0 for name, s in p["stages"].items() if name != "outside stages")
        assert p["stages"]["qkv_proj"]["ms_per_token"] > 0 and p["stages"]["lm_head"]["ms_per_token"] > 0
    decode = r["profile"]["decode"]["stages"]
    assert sum(s["weight_bytes"] for s in decode.values()) == r["weight_bytes_per_token"]
    vocab, d, f, kv = 512, 64, 128, 2 * 16  # tiny_llama, f32 weights
    assert decode["lm_head"]["weight_bytes"] == 4 * (vocab * d + d)  # untied output + the final norm
    assert decode["embedding"]["weight_bytes"] == 4 * d  # one row
    assert decode["qkv_proj"]["weight_bytes"] == 2 * 4 * (d * d + 2 * kv * d)
    assert decode["gate_up_proj"]["weight_bytes"] == 2 * 4 * 2 * f * d
    assert decode["attention"]["weight_bytes"] == 0
    # positions 16..19 attend to 17..20 keys (mean 18.5) of 2 layers x K and V x 32 values x 4 bytes (f32 cache)
    assert decode["attention"]["kv_cache_bytes"] == pytest.approx(2 * 2 * kv * 4 * 18.5)
    assert sum(s["kv_cache_bytes"] for s in decode.values()) == decode["attention"]["kv_cache_bytes"]
    bound = r["read_bandwidth_gb_per_s"]
    assert decode["down_proj"]["ms_at_bound"] == pytest.approx(decode["down_proj"]["weight_bytes"] / (bound * 1e6))
    assert decode["attention"]["ms_at_bound"] == pytest.approx(decode["attention"]["kv_cache_bytes"] / (bound * 1e6))
    assert main(["bench", tiny_llama_f32, "-p", "8", "-n", "2", "-r", "1", "--bandwidth-mib", "0"]) == 0
    out = capsys.readouterr().out
    assert "profile (PYLLM_PROFILE=1" in out and "| outside stages |" in out and "| qkv_proj |" in out


@pytest.mark.parametrize("value", [None, "", "0", "false", "off", "No", " 0 "])
def test_bench_without_profile_reports_none(tiny_llama_f32, capsys, monkeypatch, value):
    """PYLLM_PROFILE unset, empty or an off word: "false" and "off" turned profiling on (only a leading
    '0' was off), csrc/core/env.h reads every switch one way."""
    if value is None:
        monkeypatch.delenv("PYLLM_PROFILE", raising=False)
    else:
        monkeypatch.setenv("PYLLM_PROFILE", value)
    r = run_cli(capsys, tiny_llama_f32, "-p", "8", "-n", "2", "-r", "1", "--bandwidth-mib", "0", "--json")
    assert r["profile"] is None
    assert main(["bench", tiny_llama_f32, "-p", "8", "-n", "2", "-r", "1", "--bandwidth-mib", "0"]) == 0
    assert "profile" not in capsys.readouterr().out


def test_decode_kv_bytes_counts_each_layers_window(tiny_llama_f32):
    """A sliding layer reads at most its window of keys, a full layer every position before the step."""
    import dataclasses

    from pyllm.bench import decode_kv_bytes
    from pyllm.formats.packed import PackedModel

    with PackedModel(tiny_llama_f32) as model:
        config = model.config
    per_position = 2 * 2 * 16 * 2  # K and V x 2 KV heads x head_dim 16 x f16
    assert decode_kv_bytes(config, 0, 1, "f16") == 2 * per_position  # 2 layers, one key each
    windowed = dataclasses.replace(config, sliding_window=3, layer_types=["sliding_attention", "full_attention"])
    # steps at positions 4, 5 see 5, 6 keys; the sliding layer 3 of them
    assert decode_kv_bytes(windowed, 4, 2, "f16") == pytest.approx(per_position * (3 + 5.5))
    assert decode_kv_bytes(windowed, 4, 2, "f32") == pytest.approx(2 * per_position * (3 + 5.5))


def test_a_probe_buffer_past_the_memory_is_refused_before_the_benchmark(tiny_llama_f32, capsys, monkeypatch):
    """--bandwidth-mib 100000000 ran the whole benchmark, then the probe failed with 'std::bad_alloc'
    (a buffer between the free and the physical memory could bring the OOM killer). A buffer past half
    the machine's memory is now refused first, from the command line and from run_bench."""
    from pyllm import bench
    from pyllm.errors import LimitError
    from pyllm.limits import memory_limit

    ran = []
    monkeypatch.setattr(bench, "time_engine", lambda *a, **k: ran.append(1) or (1.0, 1.0))
    half_mib = memory_limit() // 2 >> 20
    for mib in (100_000_000, 2**40, half_mib + 1):
        assert main(["bench", tiny_llama_f32, "-p", "8", "-n", "2", "-r", "1", "--bandwidth-mib", str(mib)]) == 1
        err = capsys.readouterr().err
        assert "--bandwidth-mib" in err and "bad_alloc" not in err and err.count("\n") == 1, err
        with pytest.raises(LimitError, match="half of the .* memory this process may use"):
            bench.run_bench(tiny_llama_f32, 8, 2, 1, bandwidth_bytes=mib << 20)
    assert main(["bench", tiny_llama_f32, "--bandwidth-mib", "-1"]) == 1
    assert ">= 0" in capsys.readouterr().err
    assert not ran  # refused before any test ran
