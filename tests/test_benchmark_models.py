"""The benchmark's random family models (tools/random_family.py): each configuration is one pyllm
converts, with the 1.1B-like shapes the tables state (configs only; the 2-3 GB weights are built by
benchmarks/compare.py)."""

from __future__ import annotations

import os
import sys

import pytest

transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tools"))

from random_family import FAMILIES, llama_cpp_runs  # noqa: E402

from pyllm.convert.checkpoint import model_config_from_hf  # noqa: E402


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_family_configs_convert_with_the_stated_shapes(family):
    config_name, _, kwargs, _ = FAMILIES[family]
    hf = getattr(transformers, config_name)(**kwargs).to_dict()
    c = model_config_from_hf(hf)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (2048, 22, 32, 49152)
    assert c.head_dim == 64
    multi_head = family in ("bloom", "gpt2", "opt")  # no grouped KV heads, no gate: 4 x hidden
    assert c.num_key_value_heads == (32 if multi_head else 4)
    assert c.intermediate_size == (8192 if multi_head else 5632)
    if family == "gemma3":  # five sliding layers of 512 to one global, as Gemma 3 1B
        assert c.sliding_windows() == [0 if (i + 1) % 6 == 0 else 512 for i in range(22)]


def test_llama_cpp_runs_every_family_but_opt():
    assert [f for f in FAMILIES if not llama_cpp_runs(f)] == ["opt"]
    with pytest.raises(ValueError, match="unknown family"):
        llama_cpp_runs("mamba")
