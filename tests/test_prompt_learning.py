"""Prompt tuning, P-tuning (MLP and LSTM) and prefix tuning (with and without projection) stored in
a .pllm file and run by the engine, against PEFT's PeftModel on the transformers model in fp32.

Adapters are made with peft on tiny random models (their trainable tensors randomised so that each
shows in the logits) and saved as peft saves them; pyllm converts the base with them attached."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import pyllm  # noqa: E402
from pyllm.adapters import prime  # noqa: E402
from pyllm.convert import convert_checkpoint  # noqa: E402
from pyllm.formats.safetensors import FormatError  # noqa: E402

from conftest import make_tiny_llama  # noqa: E402

INPUT_LEN = 48
RELATIVE_TOLERANCE = 1e-4

METHODS = {
    "prompt_random": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    "ptuning_mlp": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                     encoder_hidden_size=32),
    "ptuning_lstm": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                      encoder_hidden_size=32, encoder_reparameterization_type="LSTM"),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7),
    "prefix_projection": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                          prefix_projection=True, encoder_hidden_size=32),
}


def make_adapter(base: str, directory: str, method: str, seed: int = 1) -> str:
    """A peft prompt-learning adapter of `base` with randomised trainable tensors, saved as peft does."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, METHODS[method]())
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    pm.save_pretrained(directory)
    return directory


def peft_model(base: str, adapter: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, adapter).eval()


@pytest.fixture(scope="module", params=["gqa", "mha"])
def base(request, tmp_path_factory):
    heads = {"gqa": 2, "mha": 4}[request.param]
    return make_tiny_llama(str(tmp_path_factory.mktemp(f"pl_base_{request.param}")), seed=21,
                           num_key_value_heads=heads)


@pytest.mark.parametrize("method", list(METHODS))
def test_logits_and_greedy_tokens_match_peft(base, method, tmp_path):
    adapter = make_adapter(base, str(tmp_path / method), method)
    out = str(tmp_path / "tuned.pllm")
    convert_checkpoint(base, out, quant="f32", progress=False, adapters=[("task", adapter)])
    ids = [int(i) for i in np.random.default_rng(3).integers(3, 400, INPUT_LEN)]
    reference = peft_model(base, adapter)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits[0].numpy()
    with pyllm.LLM(out, n_threads=2) as llm:
        adapter_info = llm.model.adapters["task"]
        assert adapter_info.kind == ("prefix" if method.startswith("prefix") else "prompt")
        virtual = prime(llm.engine, adapter_info, 0)
        n = len(ids)
        got = llm.engine.forward_rows(np.array(ids, np.int32), np.zeros(n, np.int32),
                                      np.arange(virtual, virtual + n, dtype=np.int32), np.arange(n))
        # PEFT returns the virtual positions' logits too (prompt tuning): compare the real tokens'
        expected = expected[-n:]
        assert np.abs(got - expected).max() <= RELATIVE_TOLERANCE * np.abs(expected).max()
        # 32 greedy tokens through the cache against PEFT's forward over the whole sequence at each step
        sequence = list(ids)
        with torch.no_grad():
            for _ in range(32):
                sequence.append(int(reference(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
        generated = sequence[n:]
        ours, logits = [], got[-1]
        for step in range(32):
            token = int(np.argmax(logits))
            ours.append(token)
            logits = llm.engine.forward_rows(np.array([token], np.int32), np.zeros(1, np.int32),
                                             np.array([virtual + n + step], np.int32), np.arange(1))[0]
        assert ours == generated


def test_mismatched_adapters_are_refused(base, tmp_path):
    other = make_tiny_llama(str(tmp_path / "other"), seed=2, hidden_size=96, num_attention_heads=4)
    adapter = make_adapter(other, str(tmp_path / "prompt"), "prompt_random")
    with pytest.raises(FormatError, match="hidden size is 64"):
        convert_checkpoint(base, str(tmp_path / "x.pllm"), quant="f32", progress=False, adapters=[(None, adapter)])
    prefix = make_adapter(other, str(tmp_path / "prefix"), "prefix")
    with pytest.raises(FormatError, match="layers x 2 x kv_heads x head_dim"):
        convert_checkpoint(base, str(tmp_path / "x.pllm"), quant="f32", progress=False, adapters=[(None, prefix)])
    # a LoRA adapter is not a prompt-learning adapter
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    config["peft_type"] = "LORA"
    json.dump(config, open(os.path.join(adapter, "adapter_config.json"), "w"))
    with pytest.raises(FormatError, match="--lora"):
        convert_checkpoint(base, str(tmp_path / "x.pllm"), quant="f32", progress=False, adapters=[(None, adapter)])
    assert not (tmp_path / "x.pllm").exists()
