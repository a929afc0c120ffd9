"""The benchmark's random family models (tools/random_family.py): each configuration is one pyllm
converts, with the 1.1B-like shapes the tables state, and the GGUF step runs llama.cpp's converter
with only the changes it states (configs and a stand-in converter only; the 2-3 GB weights are built
by benchmarks/compare.py)."""

from __future__ import annotations

import json
import os
import sys

import pytest

transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tools"))

from random_family import BPE_VOCAB, FAMILIES, llama_cpp_runs, random_family_gguf  # noqa: E402

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
    if family == "gemma2":  # local and global layers alternating, as Gemma 2; soft-capping on
        assert c.sliding_windows() == [512 if i % 2 == 0 else 0 for i in range(22)]
        assert (c.attn_logit_softcapping, c.final_logit_softcapping) == (50.0, 30.0)
        assert c.attention_scale == pytest.approx(64 ** -0.5)  # what llama.cpp uses at these shapes


def test_llama_cpp_runs_every_family_but_opt():
    assert [f for f in FAMILIES if not llama_cpp_runs(f)] == ["opt"]
    with pytest.raises(ValueError, match="unknown family"):
        llama_cpp_runs("mamba")


# a stand-in for llama.cpp's converter: its conversion package's get_model_class and a script that
# writes, to --outfile, which vocabulary the class of the checkpoint's architecture writes
FAKE_CONVERSION = """
classes = {}
def get_model_class(name):
    return classes.setdefault(name, type(name, (), {"set_vocab": lambda self: "sentencepiece",
                                                    "_set_vocab_gpt2": lambda self: "gpt2"}))
"""
FAKE_SCRIPT = """import json, os, sys
from conversion import get_model_class
args = sys.argv[1:]
with open(os.path.join(args[0], "config.json")) as f:
    architecture = json.load(f)["architectures"][0]
with open(args[args.index("--outfile") + 1], "w") as f:
    f.write(f"{__name__} {architecture} {get_model_class(architecture)().set_vocab()}")
"""


def fake_llama_cpp(tmp_path, script: str) -> str:
    """A llama.cpp source tree whose convert_hf_to_gguf.py is `script`."""
    src = tmp_path / "llama.cpp"
    (src / "conversion").mkdir(parents=True)
    (src / "conversion" / "__init__.py").write_text(FAKE_CONVERSION)
    (src / "convert_hf_to_gguf.py").write_text(script)
    return str(src)


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_gguf_conversion_gives_only_sentencepiece_only_families_the_bpe_vocabulary(family, tmp_path):
    """Gemma 2's converter class reads only tokenizer.model; the wrapper around convert_hf_to_gguf.py
    makes that class (and no other family's) write SmolLM2's tokenizer.json as byte-level BPE."""
    src = fake_llama_cpp(tmp_path, FAKE_SCRIPT)
    model_class = FAMILIES[family][1]
    checkpoint = tmp_path / "work" / f"random-1.1b-{family}-hf"
    checkpoint.mkdir(parents=True)  # random_family_checkpoint reuses a directory holding a config
    (checkpoint / "config.json").write_text(json.dumps({"architectures": [model_class]}))
    out = tmp_path / "out.gguf"
    assert random_family_gguf(family, str(out), str(tmp_path / "work"), src) == str(out)
    vocabulary = "gpt2" if family == "gemma2" else "sentencepiece"
    assert out.read_text() == f"__main__ {model_class} {vocabulary}"
    assert not checkpoint.exists() and not os.path.exists(str(out) + ".partial")


def test_a_failing_gguf_conversion_raises_and_keeps_the_checkpoint(tmp_path):
    src = fake_llama_cpp(tmp_path, "import sys\nsys.exit('no tokenizer.model')\n")
    checkpoint = tmp_path / "work" / "random-1.1b-gemma2-hf"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="failed on gemma2: .*no tokenizer.model"):
        random_family_gguf("gemma2", str(tmp_path / "out.gguf"), str(tmp_path / "work"), src)
    assert checkpoint.exists() and not (tmp_path / "out.gguf").exists()


def test_bpe_vocabulary_families_are_families_llama_cpp_runs():
    assert BPE_VOCAB and all(llama_cpp_runs(f) for f in BPE_VOCAB)
