"""benchmarks/parallel_decode.py on a tiny model: its figures and its per-stage profile (--profile) come
out whole, and the profile counts decode steps only (the prefill is left out)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import parallel_decode  # noqa: E402

STAGES = {"embedding", "rmsnorm", "qkv_proj", "rope_cache_write", "attention", "o_proj", "gate_up_proj", "swiglu",
          "down_proj", "residual", "lm_head"}


def test_profile_is_per_decode_step(tiny_llama_f32, capsys, monkeypatch):
    monkeypatch.setenv("PYLLM_PROFILE", "0")  # --profile sets it to 1; put back after the test
    assert parallel_decode.main([tiny_llama_f32, "--parallel", "1,3", "-p", "64", "-n", "4", "-r", "2", "-t", "1",
                                 "--profile", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["aggregate_tokens_per_s"]["int8x2"]) == {"1", "3"}
    assert all(len(v) == 2 and min(v) > 0 for v in result["aggregate_tokens_per_s"]["int8x2"].values())
    stages = result["stage_ms_per_step"]["int8x2"]
    assert set(stages) == {"1", "3"} and all(set(s) == STAGES for s in stages.values())
    for n in ("1", "3"):
        step_ms = 1000 * int(n) / min(result["aggregate_tokens_per_s"]["int8x2"][n])
        # each stage's time is part of a decode step's: a 64-token prefill counted in would exceed it
        assert 0 < sum(stages[n].values()) <= 1.05 * step_ms, (n, stages[n], step_ms)
