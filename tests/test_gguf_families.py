"""GGUF files of the families pyllm converts (pyllm/convert/gguf_arch.py), each written from a tiny
transformers model the way llama.cpp's convert_hf_to_gguf.py writes that family:

* tensor names from gguf-py's own name map (gguf.get_tensor_name_map, what the converter uses), with
  the converter's per-family changes: BLOOM's per-head q/k/v regrouped into q; k; v (BloomModel),
  GPT-2's Conv1D weights transposed (GPT2Model), Gemma's norm weights stored as 1 + w (Gemma2Model,
  Gemma3Model), Phi-3's qkv_proj and gate_up_proj and GLM's gate_up_proj kept fused; no q/k
  permutation in these families (only "llama" files have one, tests/test_gguf.py);
* the metadata keys of each converter's set_gguf_parameters.

pyllm converts the file and its logits are compared with transformers loading the same GGUF file
(from_pretrained(..., gguf_file=...), its own reader of llama.cpp's layout) where transformers reads
the family, and with the transformers model the file was made from otherwise (glm4, chatglm). The
tiny configurations use the values transformers' GGUF reader assumes for keys GGUF does not carry
(Gemma's head_dim 256 and query_pre_attn_scalar 256, Gemma 2's soft-caps 50/30, GPT-2's 1024
positions, Qwen3's head_dim 128), so that both readers build the same model.
"""

from __future__ import annotations

import json
import re
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import pyllm  # noqa: E402
from pyllm.convert import convert_checkpoint  # noqa: E402
from pyllm.formats.safetensors import FormatError  # noqa: E402

from conftest import nmse  # noqa: E402
from families import load_reference, make_tiny_model  # noqa: E402

Q = gguf.GGMLQuantizationType
A = gguf.MODEL_ARCH

# name: (family in tests/families.py, its case, config overrides, GGUF architecture, transformers reads it)
CASES = {
    "qwen2": ("qwen2", "gqa", {}, A.QWEN2, True),
    "qwen3": ("qwen3", "gqa_head32", dict(head_dim=128), A.QWEN3, True),
    "gemma2": ("gemma2", "softcap_window", dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                                                final_logit_softcapping=30.0, num_hidden_layers=3), A.GEMMA2, True),
    "gemma3": ("gemma3", "local_global", dict(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6,
                                              sliding_window=16, layer_types=None, rope_parameters=None),
               A.GEMMA3, True),
    "phi3": ("phi3", "mha_tied", dict(num_key_value_heads=2, tie_word_embeddings=False), A.PHI3, True),
    "bloom": ("bloom", "heads4", {}, A.BLOOM, True),
    "gpt2": ("gpt2", "gelu_new", dict(n_positions=1024, n_ctx=1024), A.GPT2, True),
    "glm4": ("glm4", "gqa_partial", {}, A.GLM4, False),
    "chatglm": ("glm", "gqa_partial", dict(head_dim=16, rms_norm_eps=1e-5), A.CHATGLM, False),
}
PROMPT = [int(i) for i in np.random.default_rng(11).integers(3, 400, 64)]


def _tokenizer(w, hf_dir: str, vocab_size: int) -> None:
    """The tiny model's byte-level BPE as llama.cpp's _set_vocab_gpt2 writes it."""
    tok = json.load(open(os.path.join(hf_dir, "tokenizer.json"), encoding="utf-8"))
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    for t, i in {**tok["model"]["vocab"], **specials}.items():
        tokens[i] = t
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(specials["<|im_start|>"])
    w.add_eos_token_id(specials["<|im_end|>"])
    w.add_pad_token_id(specials["<|endoftext|>"])


def _parameters(w, arch, c: dict) -> None:
    """The keys the family's set_gguf_parameters writes (c: the transformers config as a dict)."""
    hidden = c.get("hidden_size") or c.get("n_embd")
    heads = c.get("num_attention_heads") or c.get("n_head")
    w.add_block_count(c.get("num_hidden_layers") or c.get("n_layer"))
    w.add_embedding_length(hidden)
    w.add_head_count(heads)
    if arch in (A.BLOOM, A.GPT2):
        w.add_feed_forward_length(c.get("n_inner") or 4 * hidden)
        if arch == A.BLOOM:
            w.add_head_count_kv(heads)
        w.add_layer_norm_eps(c["layer_norm_epsilon"])
        w.add_context_length(c["n_ctx"] if arch == A.GPT2 else hidden)  # BloomModel: seq_length or n_embed
        return
    head_dim = c.get("head_dim") or hidden // heads
    # ChatGLMModel writes seq_length (else n_embed) and layernorm_epsilon (else 1e-5)
    w.add_context_length(hidden if arch == A.CHATGLM else c["max_position_embeddings"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(1e-5 if arch == A.CHATGLM else c["rms_norm_eps"])
    rope = c.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    if arch == A.GEMMA2:  # Gemma2Model writes no RoPE keys (llama.cpp's default theta, 10000)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_attn_logit_softcapping(c["attn_logit_softcapping"])
        w.add_final_logit_softcapping(c["final_logit_softcapping"])
        w.add_sliding_window(c["sliding_window"])
        return
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", 1.0)
    if arch == A.GEMMA3:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(c["sliding_window"])
        w.add_rope_freq_base_swa(10000.0)
    elif arch in (A.GLM4, A.CHATGLM, A.PHI3):
        w.add_rope_dimension_count(int(head_dim * partial))
        if arch == A.GLM4:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if arch == A.PHI3:
            w.add_rope_scaling_orig_ctx_len(c.get("original_max_position_embeddings") or c["max_position_embeddings"])
            w.add_sliding_window(c.get("sliding_window") or 0)
    elif "head_dim" in c:  # TextModel.set_gguf_parameters writes the head size only when config.json has it
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _tensors(arch, c: dict, model) -> dict[str, np.ndarray]:
    """HF tensor name -> the array the converter stores (before naming), per family."""
    out = {}
    for name, t in model.state_dict().items():
        value = t.detach().numpy().astype(np.float32)
        if name == "lm_head.weight" and c.get("tie_word_embeddings", arch in (A.BLOOM, A.GPT2, A.GEMMA2, A.GEMMA3)):
            continue  # tied: the converter skips it
        if arch == A.BLOOM:
            name = name.replace("transformer.", "")
            heads, hidden = c["n_head"], c["hidden_size"]
            if "query_key_value" in name:  # BloomModel.modify_tensors: per-head [q, k, v] -> q; k; v
                value = np.concatenate([value.reshape(heads, 3, hidden // heads, -1)[:, i].reshape(hidden, -1)
                                        for i in range(3)]).reshape(value.shape)
        elif arch == A.GPT2 and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            value = np.ascontiguousarray(value.T)  # GPT2Model.modify_tensors
        elif arch in (A.GEMMA2, A.GEMMA3) and name.endswith("norm.weight"):
            value = value + 1.0
        out[name] = value
    return out


def write_gguf(case: str, hf_dir: str, path: str, kind=Q.F32, extra=None) -> None:
    """Writes hf_dir's model as the family's GGUF; extra(writer) may add keys and tensors."""
    family, _, _, arch, _ = CASES[case]
    c = json.load(open(os.path.join(hf_dir, "config.json")))
    model = load_reference(family, hf_dir)
    layers = c.get("num_hidden_layers") or c.get("n_layer")
    names = gguf.get_tensor_name_map(arch, layers)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    _parameters(w, arch, c)
    _tokenizer(w, hf_dir, c["vocab_size"])
    for name, value in _tensors(arch, c, model).items():
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        if value.ndim == 1 or kind == Q.F32:
            w.add_tensor(gname, value, raw_dtype=Q.F32)
        elif kind == Q.F16:
            w.add_tensor(gname, value.astype(np.float16), raw_dtype=Q.F16)
        else:
            w.add_tensor(gname, gguf.quants.quantize(value, kind), raw_dtype=kind)
    if extra is not None:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def max_rel(out, ref):
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=list(CASES))
def source(request, tmp_path_factory):
    case = request.param
    family, name, overrides, _, _ = CASES[case]
    root = tmp_path_factory.mktemp(f"gguf_{case}")
    hf_dir = make_tiny_model(family, name, str(root / "hf"), seed=5, **overrides)
    return case, hf_dir, root


def _reference(case, hf_dir, root, gguf_name):
    """transformers' logits for the GGUF file (its GGUF reader) or, for families it cannot read, for
    the model the file was written from."""
    family, _, _, _, readable = CASES[case]
    if not readable:
        return _logits(load_reference(family, hf_dir), PROMPT)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(root), gguf_file=gguf_name, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    return _logits(model, PROMPT)


@pytest.mark.parametrize("kind", [Q.F32, Q.F16], ids=["f32", "f16"])
def test_gguf_family_logits_match_transformers(source, kind):
    case, hf_dir, root = source
    gguf_name = f"model-{kind.name}.gguf"
    write_gguf(case, hf_dir, str(root / gguf_name), kind)
    out = str(root / f"model-{kind.name}.pllm")
    convert_checkpoint(str(root / gguf_name), out, progress=False)
    ref = _reference(case, hf_dir, root, gguf_name)
    with pyllm.LLM(out, n_threads=2) as llm:
        assert llm.model.config.architecture == CASES[case][0]
        ours = llm.logits(PROMPT)
    if kind == Q.F32:
        assert max_rel(ours, ref) < 1e-4
        # the file holds the HF model exactly: also equal to the model it was written from
        assert max_rel(ours, _logits(load_reference(CASES[case][0], hf_dir), PROMPT)) < 1e-4
    else:  # the same f16-rounded weights on both sides (the reference dequantizes them to f32)
        assert nmse(ours, ref) < 1e-6
        assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.98


@pytest.mark.parametrize("case", ["phi3", "bloom", "gpt2"])
def test_fused_tensors_split_from_q8_0_blocks_bit_for_bit(case, tmp_path):
    """Phi-3's attn_qkv / ffn_up, BLOOM's and GPT-2's attn_qkv in Q8_0: every q/k/v and gate/up is a
    block of whole rows, copied without requantizing."""
    family, name, overrides, _, _ = CASES[case]
    hf_dir = make_tiny_model(family, name, str(tmp_path / "hf"), seed=9, **overrides)
    write_gguf(case, hf_dir, str(tmp_path / "model.gguf"), Q.Q8_0)
    report = convert_checkpoint(str(tmp_path / "model.gguf"), str(tmp_path / "m.pllm"), progress=False)
    c = json.load(open(os.path.join(hf_dir, "config.json")))
    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
               "mlp.down_proj"] + (["mlp.gate_proj"] if case == "phi3" else [])
    layers = c.get("num_hidden_layers") or c.get("n_layer")
    kept = set(report.kept_exactly)
    assert {f"model.layers.{i}.{m}" for i in range(layers) for m in modules} <= kept, sorted(kept)
    ref = _reference(case, hf_dir, tmp_path, "model.gguf")
    with pyllm.LLM(str(tmp_path / "m.pllm"), n_threads=2) as llm:
        ours = llm.logits(PROMPT)
    assert nmse(ours, ref) < 1e-5
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.95


def test_every_family_with_a_gguf_name_has_a_gguf_layout():
    from pyllm.arch import ARCHITECTURES
    from pyllm.convert.gguf_arch import GGUF_ARCHITECTURES

    named = {a.gguf_name for a in ARCHITECTURES.values() if a.gguf_name}
    assert named == set(GGUF_ARCHITECTURES)
    assert {g.family for g in GGUF_ARCHITECTURES.values()} == {a.name for a in ARCHITECTURES.values()
                                                               if a.gguf_name and a.name != "mistral"}
    # every GGUF architecture but llama's is exercised above
    assert {gguf.MODEL_ARCH_NAMES[c[3]] for c in CASES.values()} == set(GGUF_ARCHITECTURES) - {"llama"}


REFUSED = {
    # what the engines do not implement, written the way llama.cpp writes it: refused by name
    "yarn": (lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN), w.add_rope_scaling_factor(4.0)),
             "rope scaling 'yarn'"),
    # per-dimension factors other than llama3 scaling's (which is read: test_gguf.py)
    "rope_freqs": (lambda w: w.add_tensor("rope_freqs.weight", np.linspace(3, 1, 8, dtype=np.float32)), "rope_freqs"),
    "rope_factors_long": (lambda w: w.add_tensor("rope_factors_long.weight", np.ones(8, np.float32)),
                          "rope_factors_long"),
    "experts": (lambda w: w.add_expert_count(8), "mixture-of-experts layers (qwen2.expert_count=8)"),
    "extra_tensor": (lambda w: w.add_tensor("blk.0.attn_sinks.weight", np.ones(4, np.float32)),
                     "unexpected tensor 'blk.0.attn_sinks.weight'"),
}


@pytest.mark.parametrize("what", list(REFUSED))
def test_features_outside_the_engine_are_refused_by_name(what, tmp_path):
    family, name, overrides, _, _ = CASES["qwen2"]
    hf_dir = make_tiny_model(family, name, str(tmp_path / "hf"), seed=1, **overrides)
    add, message = REFUSED[what]
    write_gguf("qwen2", hf_dir, str(tmp_path / "model.gguf"), extra=add)
    with pytest.raises(FormatError, match=re.escape(message)):
        convert_checkpoint(str(tmp_path / "model.gguf"), str(tmp_path / "model.pllm"), progress=False)
    assert not (tmp_path / "model.pllm").exists()


def test_unknown_architecture_and_missing_tensor_are_refused(tmp_path):
    family, name, overrides, _, _ = CASES["qwen2"]
    hf_dir = make_tiny_model(family, name, str(tmp_path / "hf"), seed=1, **overrides)
    path = str(tmp_path / "model.gguf")
    write_gguf("qwen2", hf_dir, path)
    raw = open(path, "rb").read()
    # an architecture outside the table: named, with the supported list
    odd = tmp_path / "odd.gguf"
    odd.write_bytes(raw.replace(b"qwen2", b"qwen9"))
    with pytest.raises(FormatError, match=r"'qwen9' is not supported \(supported: llama, qwen2"):
        convert_checkpoint(str(odd), str(tmp_path / "odd.pllm"), progress=False)
    # a qwen2 file without its q/k/v biases: the missing tensors are named
    reader = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(tmp_path / "nobias.gguf"), "qwen2")
    for key, field in reader.fields.items():
        if key.startswith("qwen2.") and not key.startswith("GGUF."):
            value = field.contents()
            if isinstance(value, int):
                w.add_uint32(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
    for t in reader.tensors:
        if t.name != "blk.1.attn_q.bias":
            w.add_tensor(t.name, np.asarray(t.data).reshape(tuple(reversed([int(d) for d in t.shape]))),
                         raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match=r"lacks blk\.1\.attn_q\.bias"):
        convert_checkpoint(str(tmp_path / "nobias.gguf"), str(tmp_path / "nobias.pllm"), progress=False)
    assert not (tmp_path / "odd.pllm").exists() and not (tmp_path / "nobias.pllm").exists()


# llama.cpp's own converter, where a llama.cpp source tree is at hand (PYLLM_LLAMA_CPP_DIR: a checkout, or
# vendor/llama.cpp of the llama-cpp-python source distribution, `pip download --no-deps --no-binary :all:
# llama-cpp-python`). The tiny vocabularies have no pre-tokenizer hash llama.cpp knows, so the check is
# bypassed and every family's vocabulary written as byte-level BPE; tensors and metadata are the converter's.
LLAMA_CPP = os.environ.get("PYLLM_LLAMA_CPP_DIR")
_CONVERT = r"""
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
import convert_hf_to_gguf as c
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
lookup = c.get_model_class
def get_model_class(*a, **k):
    model = lookup(*a, **k)
    for klass in model.__mro__:
        if "set_vocab" in klass.__dict__ and klass is not TextModel:
            klass.set_vocab = TextModel._set_vocab_gpt2
    return model
c.get_model_class = get_model_class
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
c.main()
"""


@pytest.mark.skipif(not LLAMA_CPP or not os.path.exists(os.path.join(LLAMA_CPP or "", "convert_hf_to_gguf.py")),
                    reason="PYLLM_LLAMA_CPP_DIR does not name a llama.cpp source tree")
@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_converter_output_converts_and_matches_the_writer_here(case, tmp_path):
    import subprocess
    import sys

    family, name, overrides, arch, _ = CASES[case]
    hf_dir = make_tiny_model(family, name, str(tmp_path / "hf"), seed=5, **overrides)
    theirs, ours = str(tmp_path / "theirs.gguf"), str(tmp_path / "ours.gguf")
    result = subprocess.run([sys.executable, "-c", _CONVERT, LLAMA_CPP, hf_dir, "--outfile", theirs, "--outtype", "f32"],
                            capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-3000:]
    write_gguf(case, hf_dir, ours)
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    prefix = gguf.MODEL_ARCH_NAMES[arch] + "."
    keys = {r: {k: f.contents() for k, f in r.fields.items() if k.startswith(prefix)} for r in (a, b)}
    assert set(keys[a]) == set(keys[b])
    for k in keys[a]:
        assert keys[a][k] == pytest.approx(keys[b][k], rel=1e-6), k
    ta, tb = ({t.name: np.asarray(t.data) for t in r.tensors} for r in (a, b))
    assert set(ta) == set(tb)
    for n in ta:
        if n == "token_embd.weight" and arch == A.GEMMA3:  # Gemma3Model drops rows past the tokenizer's tokens
            assert np.array_equal(ta[n][:len(tb[n])], tb[n])
        else:
            assert np.array_equal(ta[n], tb[n]), n
    out = str(tmp_path / "theirs.pllm")
    if len(b.fields["tokenizer.ggml.tokens"].contents()) > len(tb["token_embd.weight"]):
        # Gemma3Model cut the embedding to the tiny tokenizer.json's tokens but listed the padded vocabulary
        with pytest.raises((FormatError, ValueError), match="embeddings"):
            convert_checkpoint(theirs, out, progress=False)
            pyllm.LLM(out, n_threads=1)
        return
    convert_checkpoint(theirs, out, progress=False)
    ref = _logits(load_reference(family, hf_dir), PROMPT)
    with pyllm.LLM(out, n_threads=2) as llm:
        logits = llm.logits(PROMPT)
    assert max_rel(logits, ref[:, :logits.shape[1]]) < 1e-4
