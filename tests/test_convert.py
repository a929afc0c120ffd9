"""`pyllm convert` on the checkpoint layouts Hugging Face writes, and its refusals."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import pyllm  # noqa: E402
from pyllm.convert import convert_checkpoint  # noqa: E402
from pyllm.convert.strategy import QuantOptions  # noqa: E402
from pyllm.formats.safetensors import FormatError  # noqa: E402

from conftest import nmse  # noqa: E402

IDS = [5, 17, 300, 42, 8, 99, 123, 7, 250, 3]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        return model, model(torch.tensor([IDS])).logits[0].numpy()


def copy_without_weights(src: str, dst: str) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json", "*.bin"))
    return dst


def logits_of(directory: str, out: str) -> np.ndarray:
    convert_checkpoint(directory, out, quant="f32", progress=False)
    return pyllm.LLM(out, n_threads=1).logits(IDS)


def test_tensors_no_recipe_reads_are_named_in_a_notice(tiny_llama, tmp_path):
    """A q_proj.bias beside a config without attention_bias, or a tensor of something else, was left out
    without a word (transformers reports them as UNEXPECTED): a config that forgot a flag gave another
    model. They are named now; a checkpoint without such tensors says nothing."""
    from safetensors.numpy import load_file, save_file

    log = io.StringIO()
    convert_checkpoint(tiny_llama, str(tmp_path / "plain.pllm"), quant="f32", progress=False, log=log)
    assert "not part of" not in log.getvalue()
    extra = tmp_path / "extra"
    shutil.copytree(tiny_llama, extra)
    tensors = load_file(str(extra / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.ones(64, np.float32)
    tensors["foo.weight"] = np.ones((2, 2), np.float32)
    save_file(tensors, str(extra / "model.safetensors"))
    log = io.StringIO()
    convert_checkpoint(str(extra), str(tmp_path / "extra.pllm"), quant="f32", progress=False, log=log)
    assert f"{extra}: 2 tensors of the checkpoint are not part of the llama model its config.json describes, left " \
           "out: foo.weight, model.layers.0.self_attn.q_proj.bias" in log.getvalue()


def test_sharded_safetensors_with_index(tiny_llama, reference, tmp_path):
    model, ref = reference
    d = copy_without_weights(tiny_llama, str(tmp_path / "sharded"))
    model.save_pretrained(d, max_shard_size="100KB")
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) > 1
    assert nmse(logits_of(d, str(tmp_path / "s.pllm")), ref) < 1e-10


def _two_shards(tiny_llama, directory: str) -> tuple[str, dict]:
    """tiny_llama's tensors split over two shards with an index; returns (directory, weight_map)."""
    from safetensors.numpy import load_file, save_file

    d = copy_without_weights(tiny_llama, directory)
    tensors = load_file(os.path.join(tiny_llama, "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(d, shard))
        weight_map.update(dict.fromkeys(part, shard))
    return d, weight_map


def _write_index(d: str, weight_map: dict, text: str | None = None) -> None:
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        f.write(text if text is not None else json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("case, message", [
    ("parent", r"mapped to '\.\./outside\.safetensors', not a \.safetensors file name inside"),
    ("absolute", r"mapped to '/.*outside\.safetensors', not a \.safetensors file name inside"),
    ("not_a_string", r"mapped to 5, not a \.safetensors file name"),
    ("not_safetensors", r"mapped to 'sub', not a \.safetensors file name"),
    ("listed_but_absent", r"lists tensor 'model\.layers\.0\.extra\.weight' in model-00001-of-00002\.safetensors, "
                          r"which does not hold it"),
    ("wrong_shard", r"lists tensor 'lm_head\.weight' in model-00002-of-00002\.safetensors, which does not hold it "
                    r"\(it is in model-00001-of-00002\.safetensors\)"),
    ("in_two_shards", r"tensor 'lm_head\.weight' is in two shards with different values, "
                      r"model-00001-of-00002\.safetensors and model-00002-of-00002\.safetensors"),
    ("listed_twice", r"weight_map lists tensor 'lm_head\.weight' twice"),
    ("no_weight_map", r"no weight_map object"),
])
def test_inconsistent_shard_index_is_refused_naming_the_tensor(tiny_llama, tmp_path, case, message):
    """The index of a sharded checkpoint is checked against its shards before anything is written:
    '../x.safetensors' or an absolute path read a file outside the checkpoint, a tensor listed but
    absent (or one in two shards, or listed twice) converted silently (the index's entry won)."""
    from safetensors.numpy import load_file, save_file

    d, weight_map = _two_shards(tiny_llama, str(tmp_path / "sharded"))
    second = os.path.join(d, "model-00002-of-00002.safetensors")
    text = None
    if case in ("parent", "absolute"):
        shutil.copy(second, tmp_path / "outside.safetensors")
        os.remove(second)
        target = "../outside.safetensors" if case == "parent" else str(tmp_path / "outside.safetensors")
        weight_map = {k: target if v == os.path.basename(second) else v for k, v in weight_map.items()}
    elif case == "not_a_string":
        weight_map["lm_head.weight"] = 5
    elif case == "not_safetensors":
        os.mkdir(os.path.join(d, "sub"))
        weight_map["lm_head.weight"] = "sub"
    elif case == "listed_but_absent":
        weight_map["model.layers.0.extra.weight"] = "model-00001-of-00002.safetensors"
    elif case == "wrong_shard":
        weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    elif case == "in_two_shards":
        tensors = load_file(second)
        tensors["lm_head.weight"] = np.full_like(load_file(os.path.join(d, weight_map["lm_head.weight"]))
                                                 ["lm_head.weight"], 7.0)
        save_file(tensors, second)
    elif case == "listed_twice":
        text = json.dumps({"weight_map": weight_map}).replace(
            '"weight_map": {', '"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors", ')
    elif case == "no_weight_map":
        text = json.dumps({"weight_map": list(weight_map)})
    _write_index(d, weight_map, text)
    out = tmp_path / "m.pllm"
    with pytest.raises(FormatError, match=message):
        convert_checkpoint(d, str(out), quant="f32", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["outside.safetensors", "sharded"][case not in ("parent", "absolute"):]


def test_a_tensor_of_a_shard_that_the_index_leaves_out_is_read_as_transformers_does(tiny_llama, reference,
                                                                                   tmp_path):
    """An index whose weight_map leaves out a tensor that a listed shard holds: transformers reads every
    tensor of the shards, pyllm refused the checkpoint as lacking lm_head.weight."""
    model, ref = reference
    d, weight_map = _two_shards(tiny_llama, str(tmp_path / "sharded"))
    del weight_map["lm_head.weight"]
    _write_index(d, weight_map)
    assert nmse(logits_of(d, str(tmp_path / "s.pllm")), ref) < 1e-10


def test_a_tensor_in_two_shards_with_the_same_bytes_is_read(tiny_llama, tmp_path):
    """Identical copies in two shards (transformers takes the one the index names) convert."""
    from safetensors.numpy import load_file, save_file

    d, weight_map = _two_shards(tiny_llama, str(tmp_path / "sharded"))
    second = os.path.join(d, "model-00002-of-00002.safetensors")
    tensors = load_file(second)
    tensors["lm_head.weight"] = load_file(os.path.join(d, weight_map["lm_head.weight"]))["lm_head.weight"]
    save_file(tensors, second)
    _write_index(d, weight_map)
    convert_checkpoint(d, str(tmp_path / "m.pllm"), quant="f32", progress=False)


def test_shards_in_a_subfolder_of_the_checkpoint_are_read(tiny_llama, reference, tmp_path):
    model, ref = reference
    d, weight_map = _two_shards(tiny_llama, str(tmp_path / "sharded"))
    os.mkdir(os.path.join(d, "weights"))
    for shard in set(weight_map.values()):
        os.rename(os.path.join(d, shard), os.path.join(d, "weights", shard))
    _write_index(d, {k: "weights/" + v for k, v in weight_map.items()})
    assert nmse(logits_of(d, str(tmp_path / "s.pllm")), ref) < 1e-10


def test_pytorch_bin_checkpoint(tiny_llama, reference, tmp_path):
    model, ref = reference
    d = copy_without_weights(tiny_llama, str(tmp_path / "bin"))
    torch.save(model.state_dict(), os.path.join(d, "pytorch_model.bin"))
    assert nmse(logits_of(d, str(tmp_path / "b.pllm")), ref) < 1e-10


def test_pytorch_bin_of_the_pre_zip_layout_is_read(tiny_llama, reference, tmp_path):
    """A pytorch_model.bin of torch < 1.6's layout (GPT-2's own, from 2019), which transformers reads,
    was refused as "not a readable PyTorch checkpoint (a refused pickle, or damaged)": mmap reads only
    the zip layout."""
    model, ref = reference
    d = copy_without_weights(tiny_llama, str(tmp_path / "bin"))
    torch.save(model.state_dict(), os.path.join(d, "pytorch_model.bin"), _use_new_zipfile_serialization=False)
    assert nmse(logits_of(d, str(tmp_path / "b.pllm")), ref) < 1e-10


@pytest.mark.parametrize("case, message", [
    ("wrong_shard", r"pytorch_model\.bin\.index\.json: lists tensor 'lm_head\.weight' in "
                    r"pytorch_model-00002-of-00002\.bin, which does not hold it"),
    ("int_tensor", r"pytorch_model-0000\d-of-00002\.bin: tensor 'model\.norm\.weight' has non-float dtype int64"),
    ("not_a_tensor", r"pytorch_model-0000\d-of-00002\.bin: 'model\.norm\.weight' holds a list, not a tensor"),
])
def test_inconsistent_pytorch_bin_shards_are_refused_naming_the_tensor(tiny_llama, reference, tmp_path, case,
                                                                        message):
    """A sharded pytorch_model.bin whose index names the wrong shard for a tensor stopped with a bare
    KeyError traceback; an int tensor where a float belongs was cast in silence (refused in safetensors),
    and a value that is not a tensor was a traceback."""
    model, _ = reference
    d = copy_without_weights(tiny_llama, str(tmp_path / "bin"))
    state = model.state_dict()
    names = sorted(state)
    parts = {f"pytorch_model-0000{i + 1}-of-00002.bin": names[i::2] for i in range(2)}
    weight_map = {n: shard for shard, part in parts.items() for n in part}
    if case == "wrong_shard":
        weight_map["lm_head.weight"] = "pytorch_model-00002-of-00002.bin"
        parts = {shard: [n for n in part if n != "lm_head.weight" or shard.startswith("pytorch_model-00001")]
                 for shard, part in parts.items()}
        parts["pytorch_model-00001-of-00002.bin"] = sorted({*parts["pytorch_model-00001-of-00002.bin"],
                                                            "lm_head.weight"})
    elif case == "int_tensor":
        state["model.norm.weight"] = state["model.norm.weight"].round().long()
    else:
        state["model.norm.weight"] = [1.0] * 64
    for shard, part in parts.items():
        torch.save({n: state[n] for n in part}, os.path.join(d, shard))
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with pytest.raises(FormatError, match=message):
        convert_checkpoint(d, str(tmp_path / "b.pllm"), quant="f32", progress=False)
    assert not os.path.exists(tmp_path / "b.pllm")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickle_with_code_is_refused_with_a_format_error(tiny_llama, tmp_path, monkeypatch):
    d = copy_without_weights(tiny_llama, str(tmp_path / "evil"))
    torch.save({"model.embed_tokens.weight": _Payload()}, os.path.join(d, "pytorch_model.bin"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FormatError, match="refused: its pickle holds more than plain tensors"):
        convert_checkpoint(d, str(tmp_path / "evil.pllm"), quant="f32", progress=False)
    assert not os.path.exists(tmp_path / "pwned.txt") and not os.path.exists(tmp_path / "evil.pllm")
    torch.save([1, 2], os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(FormatError, match="not a dict of tensors"):
        convert_checkpoint(d, str(tmp_path / "evil.pllm"), quant="f32", progress=False)


def test_a_refused_pickle_is_one_line_that_does_not_advise_running_it(tiny_llama, tmp_path, monkeypatch, capsys):
    """torch's refusal ran 8 lines, advised re-running torch.load with weights_only=False (which runs the
    pickle's code) and came after a torch warning on stderr. It is now one line naming the file."""
    from pyllm.cli import main

    d = copy_without_weights(tiny_llama, str(tmp_path / "evil"))
    torch.save({"model.embed_tokens.weight": _Payload()}, os.path.join(d, "pytorch_model.bin"))
    monkeypatch.chdir(tmp_path)
    assert main(["convert", d, "-o", str(tmp_path / "evil.pllm"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pyllm convert: error: {os.path.join(d, 'pytorch_model.bin')}: refused: its pickle holds "
                          "more than plain tensors") and err.count("\n") == 1 and "weights_only" not in err, err
    assert not os.path.exists(tmp_path / "pwned.txt")


@pytest.mark.parametrize("state, says", [
    (lambda: {5: torch.zeros(2)}, "a tensor name is not a string but int 5"),
    (lambda: {"model.norm.weight": torch.zeros(4, 4).to_sparse()}, "'model.norm.weight' is a sparse_coo tensor, not a dense one"),
])
def test_bin_entries_that_are_no_named_dense_tensors_are_refused(tiny_llama, tmp_path, state, says):
    """A pytorch_model.bin whose names were not strings failed with "TypeError: expected string or bytes-like
    object" and a sparse tensor with "can't convert Sparse layout tensor to numpy", neither naming the file."""
    d = copy_without_weights(tiny_llama, str(tmp_path / "odd"))
    torch.save(state(), os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(FormatError, match=f"^{re.escape(os.path.join(d, 'pytorch_model.bin'))}: {says}"):
        convert_checkpoint(d, str(tmp_path / "odd.pllm"), quant="f32", progress=False)


def test_non_finite_source_weights_are_refused_naming_the_tensor(tiny_llama, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = copy_without_weights(tiny_llama, str(tmp_path / "nan"))
    tensors = load_file(os.path.join(tiny_llama, "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"][3, 4] = np.nan
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    # the file and the source tensor are named (the message named pyllm's tensor name only)
    named = re.escape(os.path.join(d, "model.safetensors")) + r": tensor 'model\.layers\.0\.mlp\.up_proj\.weight' holds 1 NaN"
    for quant in ("f16", "int8"):
        with pytest.raises(FormatError, match=named):
            convert_checkpoint(d, str(tmp_path / "nan.pllm"), quant=quant, progress=False)
    assert not os.path.exists(tmp_path / "nan.pllm")


def test_a_weight_beyond_the_float16_range_is_refused_naming_the_tensor_and_the_way_out(tiny_llama, tmp_path):
    """A bf16 weight of 1e6 converted to f16 (the default for Hugging Face checkpoints) stopped with "weights
    reach 1e+06, beyond the float16 range (65504): this weight cannot be stored in this format": no
    tensor named, no way out said. bf16 keeps it."""
    from safetensors.torch import load_file, save_file

    d = copy_without_weights(tiny_llama, str(tmp_path / "big"))
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(os.path.join(tiny_llama, "model.safetensors")).items()}
    tensors["model.layers.0.mlp.up_proj.weight"][3, 3] = 1e6
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "big.pllm"
    with pytest.raises(FormatError, match=re.escape(os.path.join(d, "model.safetensors")) +
                       r": tensor 'model\.layers\.0\.mlp\.up_proj\.weight': weights reach 9\.99e\+05, beyond the "
                       r"float16 range \(65504\).*; convert with --quant bf16 or f32"):
        convert_checkpoint(d, str(out), progress=False)
    assert not out.exists()
    convert_checkpoint(d, str(out), quant="bf16", progress=False)


@pytest.mark.parametrize("quant", ["int4", "int4_sym", "int8"])
def test_a_weight_whose_scales_pass_the_float16_range_is_refused_naming_the_tensor(tiny_llama, tmp_path, quant):
    """A weight of 3e38 (finite in f32 and bf16) makes int4/int8 scales past float16's range: --quant int4,
    which measures every layout in worker processes first, stopped with a bare "int4 scales reach 3.75e+37,
    beyond the float16 range", naming no file or tensor (the other formats named both)."""
    from safetensors.numpy import load_file, save_file

    d = copy_without_weights(tiny_llama, str(tmp_path / "big"))
    tensors = load_file(os.path.join(tiny_llama, "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"][3, 4] = 3e38
    save_file(tensors, os.path.join(d, "model.safetensors"))
    out = tmp_path / "big.pllm"
    with pytest.raises(FormatError, match=re.escape(os.path.join(d, "model.safetensors")) +
                       r": tensor 'model\.layers\.1\.mlp\.down_proj\.weight': int[48] scales reach .*, beyond the "
                       r"float16 range \(65504\).*; convert with --quant bf16 or f32"):
        convert_checkpoint(d, str(out), quant=quant, progress=False)
    assert not out.exists()


def test_bf16_checkpoint(tiny_llama, reference, tmp_path):
    model, _ = reference
    d = copy_without_weights(tiny_llama, str(tmp_path / "bf16"))
    model.to(torch.bfloat16).save_pretrained(d)
    model.to(torch.float32)
    bf16 = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = bf16(torch.tensor([IDS])).logits[0].numpy()
    # the bf16 values widen exactly to f32
    assert nmse(logits_of(d, str(tmp_path / "bf.pllm")), ref) < 1e-10


def test_chat_template_from_jinja_file(tiny_llama, tmp_path):
    d = str(tmp_path / "jinja")
    shutil.copytree(tiny_llama, d)
    cfg_path = os.path.join(d, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg.pop("chat_template", None)
    json.dump(cfg, open(cfg_path, "w"))
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    out = str(tmp_path / "j.pllm")
    convert_checkpoint(d, out, quant="f32", progress=False)
    llm = pyllm.LLM(out)
    assert llm.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"


@pytest.mark.parametrize("kind", ["/dev/zero", "FIFO", "directory"])
@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                  "generation_config.json", "special_tokens_map.json", "added_tokens.json",
                                  "pytorch_model.bin"])
def test_a_checkpoint_file_that_is_not_a_regular_file_is_refused_by_name(tiny_llama, tmp_path, name, kind):
    """A checkpoint's small file that leads to /dev/zero (a symlink) was read until memory ran out, and
    one that is a FIFO waited for ever in open() for a writer (`pyllm convert`, `pyllm run DIR` hung):
    config.json, tokenizer files, chat templates and the generation config must be regular files. (A
    writer opens the FIFO after a few seconds, so that the old behaviour fails rather than hangs.)"""
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, d)
    (d / name).unlink(missing_ok=True)
    if name == "pytorch_model.bin":  # (torch.load waited for a writer, or read /dev/zero until memory ran out)
        (d / "model.safetensors").unlink()
    if kind == "FIFO":
        os.mkfifo(d / name)
        unblock = threading.Timer(5, lambda: os.close(os.open(d / name, os.O_WRONLY | os.O_NONBLOCK)))
        unblock.start()
    elif kind == "directory":  # (was "Is a directory: 4", naming a file descriptor)
        (d / name).mkdir()
    else:
        (d / name).symlink_to("/dev/zero")
    out = tmp_path / "x.pllm"
    what = {"FIFO": "a FIFO", "directory": "a directory"}.get(kind, "a character device")
    started = time.monotonic()
    try:
        with pytest.raises(FormatError, match=rf"^{re.escape(str(d / name))} is {what}, not a regular file$"):
            convert_checkpoint(str(d), str(out), quant="f32", progress=False)
        assert time.monotonic() - started < 4
    finally:
        if kind == "FIFO":
            unblock.cancel()
    assert not out.exists()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                  "generation_config.json"])
def test_a_symbolic_link_that_leads_nowhere_is_named_with_its_target(tiny_llama, tmp_path, name):
    """A hub cache snapshot links each file to a blob; a blob never downloaded (or a link that loops)
    made the directory "have no config.json: is it a Hugging Face model directory?", "no
    model.safetensors", "neither tokenizer.json nor tokenizer.model", or left tokenizer_config.json
    or generation_config.json out in silence (another tokenizer, other defaults)."""
    d = tmp_path / "snapshot"
    shutil.copytree(tiny_llama, d)
    (d / name).unlink(missing_ok=True)
    (d / name).symlink_to(tmp_path / "blobs" / "0123abcd")
    message = rf"{re.escape(str(d / name))} is a symbolic link to {re.escape(str(tmp_path / 'blobs'))}/0123abcd, " \
              r"which does not exist or loops \(a download that did not finish\?\)"
    out = tmp_path / "x.pllm"
    with pytest.raises((FileNotFoundError, FormatError), match=message):
        convert_checkpoint(str(d), str(out), quant="f32", progress=False)
    assert not out.exists()
    if name == "config.json":  # LLM(DIR) decides what the path is before converting it
        with pytest.raises(FileNotFoundError, match=message):
            pyllm.LLM(str(d))


def test_an_index_naming_a_missing_shard_is_named(tiny_llama, tmp_path):
    """A model.safetensors.index.json listing a shard that is not there (a download cut short) said only
    "cannot read …/model-00002-of-00002.safetensors: No such file or directory", naming no index or tensor."""
    d = tmp_path / "sharded"
    shutil.copytree(tiny_llama, d)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(d / 'model.safetensors.index.json'))} lists tensor "
                                                r"'lm_head\.weight' in model-00002-of-00002\.safetensors, which does not "
                                                r"exist \(a shard not downloaded\?\)$"):
        convert_checkpoint(str(d), str(tmp_path / "x.pllm"), quant="f32", progress=False)


def test_a_checkpoint_file_past_its_bound_is_refused_by_name(tiny_llama, tmp_path, monkeypatch):
    """config.json, tokenizer files and the like are read with a bound (MAX_CHECKPOINT_FILE_BYTES)."""
    from pyllm.convert import checkpoint

    monkeypatch.setattr(checkpoint, "MAX_CHECKPOINT_FILE_BYTES", 1 << 20)
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, d)
    with open(d / "tokenizer.json", "a") as f:
        f.write(" " * (1 << 20))
    with pytest.raises(FormatError, match=rf"^{re.escape(str(d / 'tokenizer.json'))} holds more than {1 << 20} bytes"):
        convert_checkpoint(str(d), str(tmp_path / "x.pllm"), quant="f32", progress=False)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                  "model.safetensors.index.json"])
def test_a_checkpoint_json_file_of_too_many_values_is_refused_before_parsing(tiny_llama, tmp_path, name):
    """Python's json takes ~60 bytes a value: a 205 MB model.safetensors.index.json of 8 million entries
    took 26 s and 2.7 GB before its first shard was found missing, and 256 MB of "[[],[],...]" would
    take 5 GB. Values are counted (commas, brackets, braces) before parsing."""
    from pyllm.convert.checkpoint import MAX_CHECKPOINT_JSON_VALUES, MAX_INDEX_JSON_VALUES

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, d)
    bound = MAX_INDEX_JSON_VALUES if name.endswith(".index.json") else MAX_CHECKPOINT_JSON_VALUES
    if name.endswith(".index.json"):  # (read only without a model.safetensors)
        (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / name).write_text('{"weight_map": {}, "x": [' + "[]," * (bound // 2) + "[]]}")
    with pytest.raises(FormatError, match=rf"^{re.escape(str(d / name))} holds more than {bound} JSON values"):
        convert_checkpoint(str(d), str(tmp_path / "x.pllm"), quant="f32", progress=False)
    (d / name).write_text('{"weight_map": {}, "x": [' + "[]," * (bound // 4) + "[]]}")  # within the bound: read
    try:
        convert_checkpoint(str(d), str(tmp_path / "x.pllm"), quant="f32", progress=False)
    except FormatError as e:  # (the file as a whole may not make sense)
        assert "JSON values" not in str(e)


def test_a_tokenizer_model_of_more_pieces_than_a_vocabulary_may_hold_is_refused(tiny_llama, tmp_path, monkeypatch):
    """tokenizer.model's pieces were read into a list without a bound: a 256 MB file of 5-byte pieces is 50
    million of them (some 6 GB of tuples). Past SIZE_LIMITS' vocab_size (1000 here) it is refused."""
    from pyllm.formats import packed

    monkeypatch.setitem(packed.SIZE_LIMITS, "vocab_size", 1000)
    d = tmp_path / "spm"
    shutil.copytree(tiny_llama, d)
    (d / "tokenizer.json").unlink()

    def field(number: int, payload: bytes) -> bytes:  # a length-delimited protobuf field (payloads < 128 bytes)
        return bytes([number << 3 | 2, len(payload)]) + payload

    (d / "tokenizer.model").write_bytes(b"".join(field(1, field(1, f"p{i}".encode())) for i in range(1001)))
    with pytest.raises(FormatError, match=rf"^{re.escape(str(d / 'tokenizer.model'))}: more than 1000 pieces"):
        convert_checkpoint(str(d), str(tmp_path / "x.pllm"), quant="f32", progress=False)


def test_a_tokenizer_model_varint_past_10_bytes_is_refused_at_once(tiny_llama, tmp_path):
    """tokenizer.model's protobuf reader read a varint for as long as its bytes had the high bit set,
    one growing Python int: a 1 MB run of 0xFF ran for hours (300 KB: 10 s, then accepted). Protobuf's
    varints hold 64 bits, 10 bytes at most; a longer one is refused, as is one the file cuts short."""
    d = tmp_path / "spm"
    shutil.copytree(tiny_llama, d)
    (d / "tokenizer.json").unlink()
    for blob, says in ((b"\xff" * 1_000_000, "a protobuf varint longer than 10 bytes"),
                       (b"\x0a\x05\x0a\x03abc" + b"\x08" + b"\xff" * 11, "a protobuf varint longer than 10 bytes"),
                       (b"\x0a\xff\xff", "truncated protobuf")):
        (d / "tokenizer.model").write_bytes(blob)
        start = time.monotonic()
        with pytest.raises(FormatError, match=rf"^{re.escape(str(d / 'tokenizer.model'))}: {says}"):
            convert_checkpoint(str(d), str(tmp_path / "x.pllm"), quant="f32", progress=False)
        assert time.monotonic() - start < 10
    assert not (tmp_path / "x.pllm").exists()


def test_a_tokenizer_json_is_checked_for_growth_before_any_text_is_encoded(tiny_llama, tmp_path):
    """The converter encoded a probe "a" (to read the post-processor's special tokens) before the growth
    check refused the normalizer: nine Replace steps of "a" by 8 characters (8^9 times longer) aborted the
    process on a failed 2 GB allocation, and eight took 42 s and 2.8 GB before the refusal."""
    d = copy_without_weights(tiny_llama, str(tmp_path / "grow9"))
    for name in os.listdir(tiny_llama):
        if name.endswith(".safetensors"):
            os.symlink(os.path.join(tiny_llama, name), os.path.join(d, name))
    tok = json.load(open(os.path.join(d, "tokenizer.json")))
    step = {"type": "Replace", "pattern": {"String": "a"}, "content": "a" * 8}
    tok["normalizer"] = {"type": "Sequence", "normalizers": [step] * 9}
    json.dump(tok, open(os.path.join(d, "tokenizer.json"), "w"))
    start = time.monotonic()
    with pytest.raises(FormatError, match=f"^{re.escape(d)}: the tokenizer.json normalizer can make a text "
                                          "1.34218e\\+08 times longer"):
        convert_checkpoint(d, str(tmp_path / "g.pllm"), quant="f32", progress=False)
    assert time.monotonic() - start < 20 and not (tmp_path / "g.pllm").exists()


def test_a_tokenizer_json_with_truncation_and_padding_tokenizes_as_transformers(tiny_llama, tmp_path):
    """tokenizer.json may carry "truncation" and "padding" settings; transformers turns both off for every
    encode that does not ask for them, and pyllm ran them: max_length 2 cut every prompt to 2 tokens in
    silence, and Fixed padding filled prompts with pad tokens (the text parsed literally too)."""
    from transformers import AutoTokenizer

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, d)
    config = json.loads((d / "tokenizer.json").read_text())
    config["truncation"] = {"max_length": 2, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}
    config["padding"] = {"strategy": {"Fixed": 40}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                         "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    (d / "tokenizer.json").write_text(json.dumps(config))
    out = str(tmp_path / "t.pllm")
    convert_checkpoint(str(d), out, quant="f32", progress=False)
    text = "The quick brown fox <|im_end|> jumps"
    expected = AutoTokenizer.from_pretrained(str(d)).encode(text)
    assert len(expected) > 2
    with pyllm.LLM(out) as llm:
        assert llm.tokenize(text) == expected
        literal = llm.tokenize(text, parse_special=False)
        assert len(literal) > len(expected) and 0 not in literal


def test_a_long_eos_token_id_list_is_read_in_linear_time(tiny_llama, tmp_path):
    """generation_config.json's eos_token_id list was deduplicated with `in` on a list: 30,000 ids took
    3 s, the 4 million its JSON may hold would take days. The ids past the vocabulary are then refused."""
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": list(range(100_000)) + [5, 2]}))
    started = time.monotonic()
    with pytest.raises(FormatError, match=r"eos_token_ids 512 is not a token of the model \(its vocabulary has 512\)"):
        convert_checkpoint(str(d), str(tmp_path / "x.pllm"), quant="f32", progress=False)
    assert time.monotonic() - started < 5


def test_long_extra_special_token_lists_are_merged_in_linear_time(tiny_llama, tmp_path):
    """special_tokens_map.json's extra_special_tokens were merged into tokenizer_config.json's with `in`
    on a list: two lists of 60,000 tokens took about a minute, the millions a file may hold days."""
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)  # (the older layout, which reads special_tokens_map.json)
    config["extra_special_tokens"] = [f"<a{i}>" for i in range(60_000)]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").write_text(json.dumps({"extra_special_tokens": [f"<b{i}>" for i in range(60_000)]
                                                           + ["<a5>", {"content": "<a6>"}]}))
    started = time.monotonic()
    with pytest.raises(FormatError, match=r"the tokenizer has 120\d\d\d tokens but the model's embeddings only 512"):
        convert_checkpoint(str(d), str(tmp_path / "x.pllm"), quant="f32", progress=False)
    assert time.monotonic() - started < 15


def test_a_fifo_read_as_a_text_file_does_not_wait_for_a_writer(tmp_path):
    """A FIFO that no process writes, named where a text is read (a --chat-template or perplexity file),
    reads as empty instead of waiting for ever in open(); one with a writer (a shell's <(...)) is read."""
    from pyllm.errors import read_text

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    unblock = threading.Timer(5, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))
    unblock.start()
    started = time.monotonic()
    try:
        assert read_text(str(fifo)) == ""
        assert time.monotonic() - started < 4
    finally:
        unblock.cancel()
    with pytest.raises(IsADirectoryError, match=re.escape(f"Is a directory: '{tmp_path}'")):
        read_text(str(tmp_path))  # (named the descriptor: "Is a directory: 4")
    read, write = os.pipe()
    os.write(write, b"some text")
    os.close(write)
    assert read_text(f"/proc/self/fd/{read}") == "some text"
    os.close(read)


def test_a_stored_chat_template_that_is_not_jinja_is_named_with_the_way_out(tiny_llama, tmp_path, capsys, monkeypatch):
    """A checkpoint's chat_template.jinja that does not compile converts (the file keeps it as it is,
    as transformers keeps it), and the model generates; chat said only 'chat template is not valid
    Jinja', naming neither the model file nor the option that overrides it."""
    from pyllm import cli
    from pyllm.chat_template import TemplateError

    d = str(tmp_path / "broken")
    shutil.copytree(tiny_llama, d)
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}[{{ m['role'] }}]")  # no endfor
    out = str(tmp_path / "broken.pllm")
    convert_checkpoint(d, out, quant="f32", progress=False)
    llm = pyllm.LLM(out)
    assert isinstance(llm.generate("Hello", max_new_tokens=2), str)
    for call in (lambda: llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=2),
                 lambda: llm.apply_chat_template([{"role": "user", "content": "hi"}])):
        with pytest.raises(TemplateError, match=rf"^{re.escape(out)}: the chat template stored in the model file "
                                                r"cannot be used \(chat template is not valid Jinja: .*endfor.*\); "
                                                r"give another with chat_template="):
            call()
    assert pyllm.LLM(out, chat_template="chatml").chat([{"role": "user", "content": "hi"}], max_new_tokens=2) \
        is not None
    assert cli.main(["run", out, "-t", "1", "-p", "hi", "-n", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pyllm run: error: {out}: the chat template stored") and "--chat-template" in err
    assert cli.main(["run", out, "-t", "1", "-p", "hi", "-n", "2", "--chat-template", "chatml"]) == 0
    capsys.readouterr()
    from pyllm import serve

    def start(*args, **kw):  # the server would start here: its warning was printed before
        raise SystemExit(0)

    monkeypatch.setattr(serve, "listen", lambda host, port: None)
    monkeypatch.setattr(serve, "serve", start)
    with pytest.raises(SystemExit):
        cli.main(["serve", out, "-t", "1"])
    assert "pyllm serve: warning: chat requests will fail: " in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mamba"}, "model_type 'mamba' is not supported; pyllm converts: llama .*gpt2"),
    # a multimodal wrapper (Gemma3ForConditionalGeneration) and a config without model_type were one more
    # unsupported type ("model_type None")
    ({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}},
     "model_type 'gemma3' is a multimodal model \\(its text model, text_config, is 'gemma3_text'\\); pyllm converts "
     "text-only checkpoints"),
    ({"model_type": None, "architectures": ["MambaForCausalLM"]},
     "config.json has no model_type and names 'MambaForCausalLM'; pyllm converts: llama"),
    ({"num_local_experts": 8}, "mixture-of-experts"),
    ({"add_cross_attention": True}, "cross-attention"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "yarn"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    # sizes past SIZE_LIMITS, refused before a tensor table is built for them (a GGUF file claiming
    # 4,143,972,353 layers held the converter for minutes); zero heads never reach a division
    ({"num_hidden_layers": 4143972353}, "num_hidden_layers must be an integer in 1..1024"),
    ({"num_attention_heads": 0}, "num_attention_heads must be an integer in 1..4096, got 0"),
    ({"hidden_size": "64"}, "hidden_size must be an integer"),
    ({"intermediate_size": 1 << 40}, "intermediate_size must be an integer in 1..1048576"),
    ({"vocab_size": 1 << 30}, "vocab_size must be an integer in 1..4194304"),
    # values the engine refuses when it loads the file: converting wrote a file that could not be run
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 0}}, "factor must be positive"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": -2.0}}, "factor must be positive"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 4.0,
                          "high_freq_factor": 1.0, "original_max_position_embeddings": 128}}, "low_freq_factor <"),
    ({"sliding_window": 10**30}, "sliding_window must be null or a positive 64-bit integer"),
    # numbers of the wrong type or sign, named (were Python's own words, or taken for absent)
    ({"rms_norm_eps": "x"}, "rms_norm_eps must be a positive number, got 'x'"),
    ({"rope_theta": -1}, "rope_theta must be a positive number, got -1"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer, got 0"),
    ({"max_position_embeddings": "256"}, "max_position_embeddings must be a positive integer, got '256'"),
    ({"head_dim": "16"}, "head_dim must be a positive integer"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer"),
    ({"sliding_window": True}, "sliding_window must be a positive integer"),
    # counts given as floats (transformers refuses them: "expected int, got float"); int() truncated 256.5
    ({"max_position_embeddings": 256.5}, "config.json: max_position_embeddings must be a positive integer, got 256.5"),
    ({"max_position_embeddings": 256.0}, "max_position_embeddings must be a positive integer, got 256.0"),
    ({"sliding_window": 4.5}, "sliding_window must be a positive integer, got 4.5"),
    ({"head_dim": 16.0}, "head_dim must be a positive integer, got 16.0"),
    ({"num_key_value_heads": 2.0}, "num_key_value_heads must be a positive integer, got 2.0"),
    ({"layer_types": 5}, "config.json: layer_types must be a list \\(one entry per layer\\), got 5"),
    # transformers refuses a rope_scaling that is not an object; beside rope_parameters it was ignored in silence
    ({"rope_scaling": "linear"}, "config.json: rope_scaling must be an object or null, got 'linear'"),
    ({"rope_scaling": [1, 2]}, "config.json: rope_scaling must be an object or null, got \\[1, 2\\]"),
    ({"rope_parameters": [1]}, "config.json: rope_parameters must be an object or null, got \\[1\\]"),
    # flags read with bool(): the string "false" was True in silence
    ({"tie_word_embeddings": "false"}, "config.json: tie_word_embeddings must be true, false or null, got 'false'"),
    ({"attention_bias": 1}, "attention_bias must be true, false or null, got 1"),
    ({"mlp_bias": "no"}, "mlp_bias must be true, false or null"),
    # transformers takes rope_scaling over rope_parameters; pyllm took rope_parameters: other positions, in silence
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "rope_parameters .* and rope_scaling .* disagree"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
      "rope_scaling": {"type": "linear", "factor": 4.0}}, "rope_parameters .* and rope_scaling .* disagree"),
])
def test_unsupported_configs_are_refused(tiny_llama, tmp_path, change, message):
    d = str(tmp_path / "bad")
    shutil.copytree(tiny_llama, d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(change)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    out = tmp_path / "bad.pllm"
    with pytest.raises(FormatError, match=message):
        convert_checkpoint(d, str(out), progress=False)
    assert not out.exists()


@pytest.mark.parametrize("method", ["gptq", "fp8", "bitsandbytes", "compressed-tensors"])
def test_a_checkpoint_saved_quantized_is_refused_naming_its_quantization_config(tiny_llama, tmp_path, method):
    """config.json's quantization_config says the weights were saved quantized: GPTQ's qweight/scales
    were "lacks model.layers.0....weight", FP8's float8 tensors "unsupported dtype 'F8_E4M3'" and, in a
    pytorch_model.bin, were converted without their weight_scale_inv in silence."""
    d = str(tmp_path / "quantized")
    shutil.copytree(tiny_llama, d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    out = tmp_path / "q.pllm"
    with pytest.raises(FormatError, match=f"config.json: quantization_config \\(quant_method '{method}'\\): the "
                                          "checkpoint holds quantized weights, .*convert the original float"):
        convert_checkpoint(d, str(out), quant="f32", progress=False)
    assert not out.exists()


def test_a_config_without_model_type_is_read_by_its_architectures_class(tiny_llama, reference, tmp_path):
    """config.json without model_type but with architectures ["LlamaForCausalLM"] (llama.cpp's converter
    goes by that class) was refused as "model_type None is not supported"."""
    _, ref = reference
    d = str(tmp_path / "no_type")
    shutil.copytree(tiny_llama, d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    del cfg["model_type"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    assert nmse(logits_of(d, str(tmp_path / "t.pllm")), ref) < 1e-10


def test_a_hub_cache_folder_is_refused_naming_its_snapshot(tiny_llama, tmp_path):
    """~/.cache/huggingface/hub/models--org--name given for the model: "has no config.json: is it a
    Hugging Face model directory?", where the model is the snapshot inside."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(tiny_llama, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(repo))} is a Hugging Face hub cache folder, not a "
                                                f"model directory: give its snapshot, {re.escape(str(snapshot))}$"):
        convert_checkpoint(str(repo), str(tmp_path / "h.pllm"), quant="f32", progress=False)
    from pyllm import model_cache  # `pyllm run DIR` said "a directory without a config.json"

    with pytest.raises(FormatError, match="is a Hugging Face hub cache folder, not a model directory: give its"):
        model_cache.model_kind(str(repo))


def test_config_declaring_fewer_layers_than_the_weights_is_refused(tiny_llama, tmp_path):
    """num_hidden_layers below the checkpoint's layers converted the first ones and dropped the rest
    without a word: a model that ran, and answered wrongly."""
    d = str(tmp_path / "fewer")
    shutil.copytree(tiny_llama, d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    layers = cfg["num_hidden_layers"] = 1
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    out = tmp_path / "fewer.pllm"
    with pytest.raises(FormatError, match=f"declares {layers} layers .* also holds layer 1: the config and the weights"):
        convert_checkpoint(d, str(out), quant="f32", progress=False)
    assert not out.exists()
    # names under other prefixes that number their layers too (a vision tower) are not the model's
    from safetensors.numpy import load_file, save_file

    d2 = str(tmp_path / "tower")
    shutil.copytree(tiny_llama, d2)
    weights = load_file(os.path.join(d2, "model.safetensors"))
    weights["vision_tower.encoder.layers.7.mlp.weight"] = np.zeros((2, 2), np.float32)
    save_file(weights, os.path.join(d2, "model.safetensors"), metadata={"format": "pt"})
    convert_checkpoint(d2, str(tmp_path / "tower.pllm"), quant="f32", progress=False)


@pytest.mark.parametrize("where", ["top_level", "rope_parameters"])
def test_partial_rotary_factor_of_a_family_that_rotates_whole_heads_is_ignored_as_transformers_does(
        tiny_llama, tmp_path, where):
    """partial_rotary_factor 0.5 in a Llama config.json: transformers' LlamaForCausalLM (and llama.cpp's
    converter) rotate the whole head whatever it says; pyllm rotated half of it (nmse 0.16 from
    transformers' logits). Phi-3 and GLM, whose models read it, keep it (tests/test_families.py)."""
    d = str(tmp_path / "partial")
    shutil.copytree(tiny_llama, d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    if where == "top_level":
        cfg["partial_rotary_factor"] = 0.5
    else:
        cfg["rope_parameters"]["partial_rotary_factor"] = 0.5
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    model = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    assert nmse(logits_of(d, str(tmp_path / "p.pllm")), ref) < 1e-10


@pytest.mark.parametrize("family", ["glm", "glm4"])
def test_a_glm_config_without_partial_rotary_factor_rotates_half_of_each_head_as_transformers_does(family, tmp_path):
    """A GLM config.json without partial_rotary_factor: transformers' GlmConfig defaults it to 0.5,
    pyllm to 1.0 (whole heads rotated, every logit off transformers')."""
    from families import load_reference, make_tiny_model

    d = make_tiny_model(family, "gqa_partial", str(tmp_path / family))
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["rope_parameters"].pop("partial_rotary_factor") == 0.5
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with torch.no_grad():
        ref = load_reference(family, d)(torch.tensor([IDS])).logits[0].numpy()
    assert nmse(logits_of(d, str(tmp_path / "g.pllm")), ref) < 1e-10


@pytest.mark.parametrize("family, name, change, message", [
    ("phi3", "mha_tied", {"num_key_value_heads": 2},
     r"tensor 'model\.layers\.0\.self_attn\.qkv_proj\.weight' \(as 'model\.layers\.0\.self_attn\.q_proj\.weight'\) "
     r"cannot be made with config\.json's sizes: it has 192 rows where config\.json's sizes make 128"),
    ("phi3", "mha_tied", {"intermediate_size": 100},
     r"tensor 'model\.layers\.0\.mlp\.gate_up_proj\.weight' \(as .*\) cannot be made with config\.json's sizes: "
     r"it has 256 rows where config\.json's sizes make 200"),
    ("glm", "gqa_partial", {"num_key_value_heads": 4},
     r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' cannot be made with config\.json's sizes: cannot reshape"),
])
def test_fused_weights_the_config_does_not_split_are_refused_naming_the_tensor(family, name, change, message,
                                                                              tmp_path):
    """A config.json whose sizes do not match a fused matrix: Phi-3's qkv_proj of 4 key heads under a
    config declaring 2 was split at rows 64/96/128 of 192 and converted (transformers refuses the size
    mismatch); a GLM's was numpy's bare "cannot reshape array of size 2048 into shape (4,16,64)"."""
    from families import make_tiny_model

    d = make_tiny_model(family, name, str(tmp_path / family))
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(change)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    out = tmp_path / "f.pllm"
    with pytest.raises(FormatError, match=message):
        convert_checkpoint(d, str(out), quant="f32", progress=False)
    assert not out.exists()


@pytest.mark.parametrize("top_level", [None, 128])
def test_llama3_rope_takes_original_max_position_embeddings_as_transformers_does(tiny_llama, tmp_path, top_level):
    """llama3 RoPE scaling without original_max_position_embeddings was refused (transformers takes
    max_position_embeddings), and a top-level original_max_position_embeddings (which transformers
    prefers to the scaling's own) was ignored."""
    d = str(tmp_path / "llama3")
    shutil.copytree(tiny_llama, d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0}
    if top_level:
        cfg["rope_parameters"]["original_max_position_embeddings"] = 32
        cfg["original_max_position_embeddings"] = top_level
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    model = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    assert nmse(logits_of(d, str(tmp_path / "l.pllm")), ref) < 1e-10


def test_tied_embeddings_beside_a_different_lm_head_run_the_lm_head_as_transformers_does(tiny_llama, tmp_path):
    """tie_word_embeddings true in config.json while the checkpoint holds an lm_head.weight of other
    values: transformers 5 does not tie them and runs that lm_head; pyllm tied them (the embedding for
    both), and every logit differed from transformers'. An lm_head equal to the embedding stays tied."""
    from safetensors.numpy import load_file, save_file

    d = str(tmp_path / "tied")
    shutil.copytree(tiny_llama, d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["tie_word_embeddings"] = True
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    model = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    log = io.StringIO()
    out = str(tmp_path / "tied.pllm")
    convert_checkpoint(d, out, quant="f32", progress=False, log=log)
    assert "differs from model.embed_tokens.weight; using lm_head.weight, as transformers does" in log.getvalue()
    with pyllm.LLM(out, n_threads=1) as llm:
        assert not llm.config.tie_word_embeddings
        assert nmse(llm.logits(IDS), ref) < 1e-10
    weights = load_file(os.path.join(d, "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    save_file(weights, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    convert_checkpoint(d, out, quant="f32", progress=False, log=io.StringIO())
    with pyllm.LLM(out, n_threads=1) as llm:
        assert llm.config.tie_word_embeddings


def test_an_output_that_is_one_of_the_inputs_is_refused_and_the_input_kept(tiny_llama, tmp_path):
    """`pyllm convert hfc -o hfc/model.safetensors` replaced the checkpoint's weights with the .pllm
    file, and exit 0: the output may not be any file the conversion reads (a checkpoint's or an
    adapter's file, through symbolic links too); an earlier .pllm beside the weights may be replaced."""
    d = str(tmp_path / "hfc")
    shutil.copytree(tiny_llama, d)
    before = {name: open(os.path.join(d, name), "rb").read() for name in os.listdir(d)}
    link = tmp_path / "weights-link.safetensors"
    link.symlink_to(os.path.join(d, "model.safetensors"))
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    for out, kwargs in ((os.path.join(d, "model.safetensors"), {}), (os.path.join(d, "config.json"), {}),
                        (str(link), {}), (str(lora / "adapter_config.json"), {"lora": [str(lora)]})):
        with pytest.raises(FileExistsError, match="refusing to write .*which this conversion reads"):
            convert_checkpoint(d, out, quant="f32", progress=False, **kwargs)
    assert {name: open(os.path.join(d, name), "rb").read() for name in os.listdir(d)} == before
    assert (lora / "adapter_config.json").read_text() == "{}"
    # a .pllm in the checkpoint's directory is an output, written again
    for _ in range(2):
        convert_checkpoint(d, os.path.join(d, "model.pllm"), quant="f32", progress=False)
    with pyllm.LLM(os.path.join(d, "model.pllm")) as llm:
        assert llm.config.num_hidden_layers > 0


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 2.0}, {"rope_type": "linear", "factor": 2.0}])
def test_rope_scaling_beside_rope_parameters_that_agree_converts(tiny_llama, tmp_path, scaling):
    d = str(tmp_path / "both")
    shutil.copytree(tiny_llama, d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, rope_scaling=scaling)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    convert_checkpoint(d, str(tmp_path / "both.pllm"), quant="f32", progress=False)
    with pyllm.LLM(str(tmp_path / "both.pllm"), n_threads=1) as llm:
        assert llm.config.rope_scaling["factor"] == 2.0


@pytest.mark.parametrize("scaling", [{"rope_type": "default", "rope_theta": 500.0},
                                     {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
                                     {"type": "linear", "factor": 2.0, "partial_rotary_factor": 1.0}])
def test_rope_theta_inside_rope_scaling_is_read_as_transformers_reads_it(tiny_llama, tmp_path, scaling):
    """transformers 5 reads a legacy rope_scaling as rope_parameters: a rope_theta inside it wins over the
    top-level one. pyllm took the top-level theta in silence (logits 4e-3 NMSE from transformers')."""
    d = str(tmp_path / "inner_theta")
    shutil.copytree(tiny_llama, d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=10000.0, rope_scaling=scaling)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    ids = [1, 5, 9, 200, 31, 7, 64, 3, 18, 100, 2, 77]
    with torch.no_grad():
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        ref = model(torch.tensor([ids])).logits[0].numpy()
    convert_checkpoint(d, str(tmp_path / "t.pllm"), quant="f32", progress=False)
    with pyllm.LLM(str(tmp_path / "t.pllm"), n_threads=1) as llm:
        got = llm.logits(ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.parametrize("method", ["search", "gptq"])
def test_weight_shape_mismatch_is_refused_and_nothing_written(tiny_llama, reference, tmp_path, method):
    """The message names the shard that holds the tensor and the tensor (it named pyllm's name only:
    which of a sharded checkpoint's files was at fault was left to guess), on the plain path and on
    the calibrated one (load_matrix)."""
    model, _ = reference
    d = copy_without_weights(tiny_llama, str(tmp_path / "mismatch"))
    model.save_pretrained(d, max_shard_size="100KB")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["intermediate_size"] += 32
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    out = tmp_path / "m.pllm"
    with pytest.raises(FormatError, match="config implies") as error:
        convert_checkpoint(d, str(out), quant="int4", progress=False,
                           options=QuantOptions(method=method, calib_sequences=2) if method == "gptq" else None)
    m = re.match(r"(.+\.safetensors): tensor '(model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight)' has shape",
                 str(error.value))
    assert m, str(error.value)
    shard, tensor = m.group(1), m.group(2)
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    assert os.path.dirname(shard) == d and index[tensor] == os.path.basename(shard)
    assert not out.exists()
    assert [f for f in os.listdir(tmp_path) if f.endswith(".partial")] == []


@pytest.mark.parametrize("shape", [[63], [1, 64], [64, 1]])
def test_a_vector_of_another_shape_is_refused_naming_file_and_tensor(tiny_llama, tmp_path, shape):
    """A norm of 63 values for 64 is refused; so is one of [1, 64] (reshaped to [64] in silence, where
    transformers refuses the size mismatch)."""
    from safetensors.numpy import load_file, save_file

    d = copy_without_weights(tiny_llama, str(tmp_path / "vector"))
    weights = load_file(os.path.join(tiny_llama, "model.safetensors"))
    weights["model.norm.weight"] = np.resize(weights["model.norm.weight"], shape)
    save_file(weights, os.path.join(d, "model.safetensors"))
    with pytest.raises(FormatError, match=re.escape(os.path.join(d, "model.safetensors")) +
                       rf": tensor 'model\.norm\.weight' has shape {re.escape(str(shape))}, the config implies \[64\]"):
        convert_checkpoint(d, str(tmp_path / "v.pllm"), quant="f32", progress=False)


@pytest.mark.parametrize("where", ["vocab", "added_tokens"])
def test_a_tokenizer_larger_than_the_embeddings_is_refused_at_conversion(tiny_llama, tmp_path, where, monkeypatch):
    """Ids past the embedding's rows (tokens in the BPE vocabulary or added tokens): the file was
    written, then every pyllm.LLM load refused it (with a bare ValueError)."""
    d = copy_without_weights(tiny_llama, str(tmp_path / "big"))
    for name in os.listdir(tiny_llama):
        if name.endswith(".safetensors"):
            os.symlink(os.path.join(tiny_llama, name), os.path.join(d, name))
    size = json.load(open(os.path.join(d, "config.json")))["vocab_size"]
    tok = json.load(open(os.path.join(d, "tokenizer.json")))
    n = 1 + max([*tok["model"]["vocab"].values(), *(t["id"] for t in tok["added_tokens"])])
    if where == "vocab":
        tok["model"]["vocab"].update({f"zz{i}": i for i in range(n, size + 3)})
    else:
        tok["added_tokens"] += [{"id": i, "content": f"<x{i}>", "single_word": False, "lstrip": False, "rstrip": False,
                                 "normalized": False, "special": True} for i in range(n, size + 3)]
    json.dump(tok, open(os.path.join(d, "tokenizer.json"), "w"))
    out = tmp_path / "big.pllm"
    with pytest.raises(FormatError, match=f"{re.escape(d)}: the tokenizer has {size + 3} tokens but the model's "
                                          f"embeddings only {size}"):
        convert_checkpoint(d, str(out), quant="f32", progress=False)
    assert not out.exists()
    # such a file written by something else is a FormatError at load
    monkeypatch.setattr("pyllm.convert.pipeline.check_tokenizer_fits", lambda *args: None)
    convert_checkpoint(d, str(out), quant="f32", progress=False)
    with pytest.raises(FormatError, match=f"tokenizer has {size + 3} tokens but the model only {size} embeddings"):
        pyllm.LLM(str(out), n_threads=1)


@pytest.mark.parametrize("name, content, message", [
    # each was a bare TypeError / ValueError / AttributeError / UnicodeDecodeError out of convert,
    # then a "cannot be read: TypeError" naming no field
    ("tokenizer_config.json", {"bos_token": {"content": 5}}, "bos_token must be a token .*, got {'content': 5}"),
    ("tokenizer_config.json", {"added_tokens_decoder": {"x": {"content": "a"}}},
     "added_tokens_decoder must be an object keyed by token ids, got 'x'"),
    ("tokenizer_config.json", {"added_tokens_decoder": {"7": {"content": 5}}}, r"added_tokens_decoder\[7\] must be a token"),
    ("tokenizer_config.json", {"extra_special_tokens": 5}, "extra_special_tokens must be a list of tokens .*, got 5"),
    ("tokenizer_config.json", {"additional_special_tokens": [5]}, r"additional_special_tokens must be .*, got \[5\]"),
    # each was read as absent, in silence (transformers refuses the tokens: "Special token bos_token has
    # to be either str or AddedToken"; bool("false") is True)
    ("tokenizer_config.json", {"bos_token": 5}, "tokenizer_config.json: bos_token must be a token .*, got 5"),
    ("tokenizer_config.json", {"eos_token": ["<|im_end|>"]}, "eos_token must be a token"),
    ("tokenizer_config.json", {"pad_token": 5.5}, "pad_token must be a token"),
    ("tokenizer_config.json", {"extra_special_tokens": {"image_token": 5}}, "extra_special_tokens must be a list"),
    ("tokenizer_config.json", {"added_tokens_decoder": []}, "added_tokens_decoder must be an object of token id"),
    ("tokenizer_config.json", {"chat_template": 5}, "tokenizer_config.json: chat_template must be a string or a list"),
    ("tokenizer_config.json", {"add_bos_token": "false"}, "add_bos_token must be true, false or null, got 'false'"),
    ("tokenizer_config.json", {"legacy": 0}, "legacy must be true, false or null, got 0"),
    ("tokenizer_config.json", {"tokenizer_class": 5}, "tokenizer_config.json: tokenizer_class must be a class name"),
    ("config.json", {"tokenizer_class": ["LlamaTokenizer"]}, "config.json: tokenizer_class must be a class name"),
    ("special_tokens_map.json", b'{"bos_token": 5}', "special_tokens_map.json: bos_token must be a token"),
    ("tokenizer.json", b"[]", "tokenizer.json: expected a JSON object, got list"),
    ("tokenizer.json", b'{"model": "\xff"}', r"tokenizer.json is not UTF-8 text \(byte 11"),
    ("chat_template.jinja", b"{{ '\xfe' }}", r"chat_template.jinja is not UTF-8 text \(byte 4"),
])
def test_damaged_tokenizer_files_are_refused_naming_them(tiny_llama, tmp_path, name, content, message):
    d = copy_without_weights(tiny_llama, str(tmp_path / "damaged"))
    for weights in os.listdir(tiny_llama):
        if weights.endswith(".safetensors"):
            os.symlink(os.path.join(tiny_llama, weights), os.path.join(d, weights))
    path = os.path.join(d, name)
    if isinstance(content, dict):
        content = json.dumps({**json.load(open(path)), **content}).encode()
    if name == "special_tokens_map.json":  # read in the older layout only: without added_tokens_decoder
        config = json.load(open(os.path.join(d, "tokenizer_config.json")))
        config.pop("added_tokens_decoder", None)
        json.dump(config, open(os.path.join(d, "tokenizer_config.json"), "w"))
    with open(path, "wb") as f:
        f.write(content)
    out = tmp_path / "damaged.pllm"
    with pytest.raises(FormatError, match=message) as error:
        convert_checkpoint(d, str(out), quant="f32", progress=False)
    assert path in str(error.value)
    assert not out.exists()


def test_other_named_tokens_of_a_wrong_type_are_ignored_as_transformers_does(tiny_llama, tmp_path):
    """A "<name>_token" key other than transformers' named special tokens (image_token, ...) is an init
    argument of particular tokenizer classes: AutoTokenizer loads a directory whose image_token is 5,
    and so does pyllm, with the same ids."""
    transformers = pytest.importorskip("transformers")
    d = copy_without_weights(tiny_llama, str(tmp_path / "other"))
    for weights in os.listdir(tiny_llama):
        if weights.endswith(".safetensors"):
            os.symlink(os.path.join(tiny_llama, weights), os.path.join(d, weights))
    path = os.path.join(d, "tokenizer_config.json")
    json.dump({**json.load(open(path)), "image_token": 5}, open(path, "w"))
    hf = transformers.AutoTokenizer.from_pretrained(d)
    out = str(tmp_path / "other.pllm")
    convert_checkpoint(d, out, quant="f32", progress=False)
    with pyllm.LLM(out, n_threads=1) as llm:
        assert llm.tokenize("hello world") == hf.encode("hello world")


@pytest.mark.parametrize("template", [5, [5], [{"name": "default", "template": 5}], [{"template": "x"}], {"default": "x"}])
def test_a_chat_template_that_is_not_text_is_refused_naming_the_file(tiny_llama, tmp_path, template):
    """tokenizer_config.json's chat_template (without a chat_template.jinja) that is not a string or a
    list of {name, template} strings converted as no template at all (the model then chatted with
    pyllm's fallback); transformers loads it, then every apply_chat_template fails."""
    from pyllm.convert.checkpoint import read_chat_template

    d = copy_without_weights(tiny_llama, str(tmp_path / "template"))
    os.remove(os.path.join(d, "chat_template.jinja"))
    path = os.path.join(d, "tokenizer_config.json")
    json.dump({**json.load(open(path)), "chat_template": template}, open(path, "w"))
    with pytest.raises(FormatError, match=re.escape(path) + ": chat_template must be a string or a list"):
        read_chat_template(d)
    json.dump({**json.load(open(path)), "chat_template": [{"name": "tool_use", "template": "T"},
                                                          {"name": "default", "template": "D"}]}, open(path, "w"))
    assert read_chat_template(d) == "D"  # transformers' named templates: "default"


@pytest.mark.parametrize("defaults, message", [
    ('{"top_p": 2}', "'top_p' has an invalid value 2 \\(expected a number in \\[0, 1\\]\\)"),
    ('{"min_p": -0.5}', "'min_p' has an invalid value -0.5"),
    ('{"typical_p": 0}', "'typical_p' has an invalid value 0 \\(expected a number in \\(0, 1\\]\\)"),
    ('{"repetition_penalty": 0}', "'repetition_penalty' has an invalid value 0 \\(expected a number > 0 "),
    ('{"repetition_penalty": 1e-300}', "'repetition_penalty' has an invalid value 1e-300 \\(expected a number > 0 "
                                       "\\(at least 1e-250\\)\\)"),
    ('{"temperature": NaN, "do_sample": true}', "'temperature' has an invalid value nan"),
    ('{"temperature": "hot"}', "'temperature' has an invalid value 'hot'"),
    ('{"do_sample": "yes"}', "'do_sample' has an invalid value 'yes'"),
    ('{"top_k": -5}', "'top_k' has an invalid value -5 \\(expected an integer >= 0\\)"),
    ('{"max_new_tokens": 2.5}', "'max_new_tokens' has an invalid value 2.5"),
])
def test_generation_defaults_that_generate_refuses_are_refused_at_conversion(tiny_llama, tmp_path, defaults, message):
    """Each converted, then was refused by every load (NaN, "hot") or by every generate() that used it."""
    d = copy_without_weights(tiny_llama, str(tmp_path / "gen"))
    for weights in os.listdir(tiny_llama):
        if weights.endswith(".safetensors"):
            os.symlink(os.path.join(tiny_llama, weights), os.path.join(d, weights))
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        f.write(defaults)
    out = tmp_path / "gen.pllm"
    with pytest.raises(FormatError, match=re.escape(os.path.join(d, "generation_config.json")) + ": generation default " + message):
        convert_checkpoint(d, str(out), quant="f32", progress=False)
    assert not out.exists()


@pytest.mark.parametrize("eos, message", [
    (-1, "generation_config.json: eos_token_id must be a token id or a list of token ids, got -1"),  # written, then every load refused it
    ([2, "x"], r"generation_config.json: eos_token_id must be .*, got \[2, 'x'\]"),  # "x" dropped in silence
    (True, "generation_config.json: eos_token_id must be .*, got True"),
    (2.0, "generation_config.json: eos_token_id must be .*, got 2.0"),
    ([2, 10**6], "eos_token_ids 1000000 is not a token of the model"),  # an end that could never come
])
def test_end_of_generation_ids_that_are_not_tokens_are_refused(tiny_llama, tmp_path, eos, message):
    d = copy_without_weights(tiny_llama, str(tmp_path / "eos"))
    for weights in os.listdir(tiny_llama):
        if weights.endswith(".safetensors"):
            os.symlink(os.path.join(tiny_llama, weights), os.path.join(d, weights))
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "bos_token_id": 1}, f)
    out = tmp_path / "eos.pllm"
    with pytest.raises(FormatError, match=message) as error:
        convert_checkpoint(d, str(out), quant="f32", progress=False)
    assert d in str(error.value)
    assert not out.exists()


def test_unsupported_group_size_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="group size 48"):
        convert_checkpoint(tiny_llama, str(tmp_path / "g.pllm"), quant="int4", group_size=48, progress=False)


@pytest.mark.parametrize("fmt", ["f16", "int8", "int4_sym", "int4_asym", "int4_asym_dq"])
def test_quantizing_in_row_slices_changes_nothing(fmt, monkeypatch):
    """The converter quantizes big matrices slice by slice of rows to bound memory: same bytes as whole."""
    from pyllm import quant

    w = np.random.default_rng(0).standard_normal((300, 100)).astype(np.float32)
    whole = quant.quantize(w, fmt, 32)
    monkeypatch.setattr(quant, "SLICE_VALUES", 700)  # 7 rows per slice, the last one short
    assert len(quant.row_slices(300, 100)) == 43
    sliced = quant.quantize(w, fmt, 32)
    for name in ("data", "scales", "mins", "steps"):
        a, b = getattr(whole, name), getattr(sliced, name)
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)
    assert quant.quantization_nmse(sliced, w) == pytest.approx(quant.nmse(quant.dequantize(whole), w), rel=1e-9)


@pytest.mark.parametrize("calib", ["none", "builtin"])
def test_int4_keeps_an_explicit_group_size(tiny_llama, tmp_path, calib, capsys):
    """--quant int4 --group-size 64: every linear layer is written at group 64 (the per-matrix choice is
    only between int4_sym, int4_asym_dq and int4_asym); the summary lists what was written."""
    from pyllm import cli
    from pyllm.formats.packed import PackedModel

    out = str(tmp_path / "g64.pllm")
    assert cli.main(["convert", tiny_llama, "-o", out, "--quant", "int4", "--group-size", "64", "--calib", calib]) == 0
    model = PackedModel(out)
    layers = {base: layout for base, layout in model.linears.items() if base not in ("model.embed_tokens", "lm_head")}
    model.close()
    assert layers and {group for _, group in layers.values()} == {64}
    assert {fmt for fmt, _ in layers.values()} <= {"int4_sym", "int4_asym_dq", "int4_asym"}
    err = capsys.readouterr().err
    counts = {}
    for fmt, group in layers.values():
        counts[f"{fmt} g{group}"] = counts.get(f"{fmt} g{group}", 0) + 1
    for name, count in counts.items():
        assert f"{name} x{count}" in err  # the summary's layouts line
    assert "int8 g32 x2" in err  # embeddings and lm_head, by the documented rule
    assert "group size 64" not in err.splitlines()[-1]
    assert re.search(r"wrote .* in [0-9.]+ s from --quant int4", err)
    assert "choosing layouts: 100%" in err  # the allocation's progress bar, left on screen
    assert "writing: 100%" in err
    if calib == "builtin":
        assert "GPTQ: 100%" in err and "calibrating" in err


def test_int4_without_a_group_size_chooses_per_matrix(tiny_llama, tmp_path):
    report = convert_checkpoint(tiny_llama, str(tmp_path / "any.pllm"), quant="int4", progress=False)
    assert sum(report.layouts.values()) == 2 * 7 + 2
    assert "layouts: " in report.summary() and " in " in report.summary()


@pytest.mark.parametrize("flags, message", [
    (["--quant", "f16", "--group-size", "64"], "--group-size applies to --quant int8 and int4 only"),
    (["--group-size", "64"], "--group-size applies to --quant int8 and int4 only (this conversion: no --quant)"),
    (["--quant", "f16", "--keep-sensitive", "2", "--rtn"], "--rtn, --keep-sensitive apply to --quant int8"),
    (["--quant", "bf16", "--calib", "text.txt"], "--calib applies to --quant int8 and int4 only"),
    (["--quant", "int8", "--bits", "5"], "--bits is the budget of --quant int4"),
    # it stored the "sensitive" matrices at int8 g128, coarser than the others' g32
    (["--quant", "int8", "--keep-sensitive", "2"], "--keep-sensitive (keep_sensitive) keeps the N matrices"),
    # the converter's "group size 7 is not supported" named no flag
    (["--quant", "int4", "--group-size", "7"], "--group-size 7: group size 7 is not supported: use a multiple of 32 up to "
                                                "4096 (the usual: 32, 64, 128, 256)"),
    # (100000 took 30 s on a 64-wide model; 2^35 asked for 8 TiB)
    (["--quant", "int4", "--group-size", "100000"], "--group-size 100000: group size 100000 is not supported"),
    (["--quant", "int8", "--group-size", str(2**35)], f"--group-size {2**35}: group size {2**35} is not supported"),
    (["--quant", "int8", "--group-size", "0"], "--group-size 0: group size 0 is not supported"),
])
def test_options_without_effect_are_refused(tiny_llama, tmp_path, capsys, flags, message):
    from pyllm import cli

    out = tmp_path / "x.pllm"
    assert cli.main(["convert", tiny_llama, "-o", str(out), *flags]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00bad", "calibration file {} is not UTF-8 text (byte 0: invalid start byte)"),
    (None, "calibration file {} cannot be read: No such file or directory"),
])
def test_a_calibration_file_that_cannot_be_read_is_named(tiny_llama, tmp_path, capsys, content, message):
    """--calib naming a file that is not UTF-8 was the codec's bare "'utf-8' codec can't decode byte 0xff
    in position 0", a missing one "[Errno 2] No such file or directory": neither said it was the
    calibration text."""
    from pyllm import cli

    calib = tmp_path / "calib.txt"
    if content is not None:
        calib.write_bytes(content)
    out = tmp_path / "x.pllm"
    assert cli.main(["convert", tiny_llama, "-o", str(out), "--quant", "int8", "--calib", str(calib), "-q"]) == 1
    assert message.format(calib) in capsys.readouterr().err
    assert not out.exists()


def test_group_size_without_groups_is_refused_in_python(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="a group size applies to int8 and int4 formats, not to f16"):
        convert_checkpoint(tiny_llama, str(tmp_path / "x.pllm"), quant="f16", group_size=64, progress=False)




def test_sigterm_during_calibration_leaves_no_temporary_files(tiny_llama, tmp_path):
    """A conversion killed by SIGTERM (a timeout, a process manager) while its calibration holds a
    float copy of the model in a temporary directory exits 143 and removes that copy; no output
    or partial output is left. Python's default for SIGTERM dies without running cleanups."""
    import signal
    import subprocess
    import sys
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    proc = subprocess.Popen([sys.executable, "-m", "pyllm.cli", "convert", tiny_llama, "-o", str(out / "m.pllm"),
                             "--quant", "int4", "-q"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    copy = None
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        copy = next((d for d in tmp.glob("pyllm-calibration-*") if (d / "float.pllm").exists()), None)
        if copy is not None:
            break
        time.sleep(0.001)
    assert copy is not None, "the conversion ended before its calibration copy was seen"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert list(tmp.iterdir()) == []
    assert list(out.iterdir()) == []
    # and it says so (exit 130 / 143 said nothing)
    assert f"pyllm convert: interrupted: nothing was written ({out / 'm.pllm'} was not created)" in err.decode()


def test_sigterm_inside_a_finalizer_still_ends_the_run():
    """The CLI's SIGTERM handler raises SystemExit; raised inside a __del__ (tqdm's, while a bar is
    collected) Python prints and swallows it, and a conversion once ran to the end after its SIGTERM
    (CI). The handler sends the signal again from outside the finalizer: the run still ends with 143."""
    import signal
    import subprocess
    import sys

    script = (
        "import os, signal, time\n"
        "from pyllm.cli import _exit_cleanly_on_sigterm\n"
        "_exit_cleanly_on_sigterm()\n"
        "class Bar:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.2)\n"
        "Bar()\n"
        "end = time.monotonic() + 5\n"
        "while time.monotonic() < end:\n"
        "    time.sleep(0.01)\n"
        "print('ran to the end')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stdout, r.stderr)
    assert "ran to the end" not in r.stdout


def test_an_output_that_is_a_device_fifo_or_socket_or_no_file_name_is_refused_before_the_work(tiny_llama, tmp_path):
    """The finished file is renamed over what -o names: `pyllm convert DIR -o /dev/null` replaced the
    device with a regular file (as root) and reported "wrote /dev/null", `-o FIFO` did the same to a
    FIFO; an empty -o or a name ending in '/' failed only after the conversion (ENOENT '... -> ''').
    Each is now an OSError naming the path, and the path is left as it was."""
    import socket
    import stat

    from pyllm.cli import main
    from pyllm.formats.safetensors import check_output_path

    with pytest.raises(FileExistsError, match="cannot write /dev/null: it is a character device"):
        check_output_path("/dev/null")  # (checked alone: a conversion there would replace it if this failed)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        for out, message in ((str(fifo), "it is a FIFO"), (str(tmp_path / "sock"), "it is a socket"),
                             ("", "empty path"), (str(tmp_path / "new") + "/", "names a directory")):
            with pytest.raises(OSError, match=message):
                convert_checkpoint(tiny_llama, out, quant="f32", progress=False)
            assert main(["convert", tiny_llama, "-o", out, "-q"]) == 1
        assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_ISSOCK(os.stat(tmp_path / "sock").st_mode)
        assert sorted(os.listdir(tmp_path)) == ["fifo", "sock"]
    finally:
        sock.close()


def test_a_tokenizer_refused_when_read_is_refused_at_conversion_naming_the_checkpoint(tiny_llama, tmp_path):
    """A tokenizer.json the runtime refuses (a normalizer that lengthens text without bound) is refused
    by the converter, naming the checkpoint, before anything is written."""
    d = copy_without_weights(tiny_llama, str(tmp_path / "grow"))
    for name in os.listdir(tiny_llama):
        if name.endswith(".safetensors"):
            os.symlink(os.path.join(tiny_llama, name), os.path.join(d, name))
    tok = json.load(open(os.path.join(d, "tokenizer.json")))
    tok["normalizer"] = {"type": "Replace", "pattern": {"String": "a"}, "content": "b" * 10000}
    json.dump(tok, open(os.path.join(d, "tokenizer.json"), "w"))
    out = tmp_path / "grow.pllm"
    with pytest.raises(FormatError, match=f"^{re.escape(d)}: the tokenizer.json normalizer can make a text 10000 times "
                                          "longer .*MAX_TOKENIZER_GROWTH.*characters\\)$"):
        convert_checkpoint(d, str(out), quant="f32", progress=False)
    assert not out.exists()


def test_a_huge_chat_template_in_tokenizer_config_is_named_not_compiled(tiny_llama, tmp_path):
    """tokenizer_config.json's chat_template (and a GGUF file's) was bounded only by the file's 256 MiB:
    a model whose template was 28 MB took 273 s and 18 GB of memory to load, Jinja compiling it. A
    template past limits.MAX_CHAT_TEMPLATE_BYTES (as a chat_template.jinja file is bounded) is a fault
    of the model file, named at chat; the model loads and generates."""
    from pyllm.chat_template import TemplateError, check_chat_template
    from pyllm.limits import MAX_CHAT_TEMPLATE_BYTES

    huge = "{% if x %}{{ y }}{% endif %}" * (MAX_CHAT_TEMPLATE_BYTES // 28 + 1)
    with pytest.raises(TemplateError, match=f"is {len(huge)} bytes long, past limits.MAX_CHAT_TEMPLATE_BYTES"):
        check_chat_template(huge)
    d = str(tmp_path / "huge")
    shutil.copytree(tiny_llama, d)
    if os.path.exists(os.path.join(d, "chat_template.jinja")):
        os.remove(os.path.join(d, "chat_template.jinja"))
    path = os.path.join(d, "tokenizer_config.json")
    cfg = json.load(open(path))
    cfg["chat_template"] = huge
    json.dump(cfg, open(path, "w"))
    out = str(tmp_path / "huge.pllm")
    convert_checkpoint(d, out, quant="f32", progress=False)
    llm = pyllm.LLM(out)
    assert isinstance(llm.generate("Hello", max_new_tokens=2), str)
    with pytest.raises(TemplateError, match=rf"^{re.escape(out)}: the chat template stored in the model file cannot "
                                            r"be used \(the chat template is \d+ bytes long, past limits"):
        llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)


def test_a_chat_template_that_cannot_be_used_is_said_at_conversion(tiny_llama, tmp_path):
    """A checkpoint whose chat template is not valid Jinja (or past the size bound, as a GGUF's or a
    tokenizer_config's could be) converted without a word, and every chat with the file failed later:
    the conversion says so, naming the source and the way out."""
    import io
    import shutil

    from pyllm.convert import convert_checkpoint

    source = tmp_path / "model"
    shutil.copytree(tiny_llama, source)
    (source / "chat_template.jinja").write_text("{% for m in messages %}")
    log = io.StringIO()
    convert_checkpoint(str(source), str(tmp_path / "m.pllm"), quant="f32", progress=False, log=log)
    assert f"{source}: its chat template cannot be used (chat template is not valid Jinja" in log.getvalue()
    assert "--chat-template" in log.getvalue()
    log = io.StringIO()
    convert_checkpoint(tiny_llama, str(tmp_path / "ok.pllm"), quant="f32", progress=False, log=log)
    assert "cannot be used" not in log.getvalue()


def test_int4_that_cannot_keep_its_budget_says_so(tmp_path):
    """Rows of 72 values (no int4 group divides them) made --quant int4 a 5.36 bits/weight file with no
    word of its 4.6-bit budget."""
    from conftest import make_tiny_llama

    src = make_tiny_llama(str(tmp_path / "odd"), hidden_size=72, intermediate_size=144, num_attention_heads=4,
                          num_key_value_heads=2)
    log = io.StringIO()
    report = convert_checkpoint(src, str(tmp_path / "odd.pllm"), quant="int4", progress=False, log=log)
    assert report.bits_per_weight > 4.6
    assert f"note: the smallest layouts these matrices take ({report.bits_per_weight:.2f} bits per weight" in log.getvalue()
