"""`pyllm.train` against a plain transformers + peft loop; data errors; resume; torchrun (gloo)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.numpy import load_file  # noqa: E402

from pyllm import cli  # noqa: E402
from pyllm.train import build_parser, run  # noqa: E402
from pyllm.train.data import DataError, load_records, tokenize_record  # noqa: E402

from conftest import make_tiny_llama  # noqa: E402

# Stanford Alpaca's prompt, written out again here (not imported) so that a wrong template fails
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n{}"
                     "\n\n### Input:\n{}\n\n### Response:\n")
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{}\n\n### Response:\n")
RECORDS = [
    {"instruction": "Say hi.", "input": "", "output": "Pip: hi"},
    {"instruction": "Add.", "input": "2 + 2", "output": "Pip: 4"},
    {"instruction": "Capital of France?", "input": "", "output": "Pip: Paris"},
    {"instruction": "翻译", "input": "dog", "output": "Pip: 狗"},
    {"instruction": "Name a fox.", "input": "", "output": "Pip: the quick brown fox"},
    {"instruction": "Reverse.", "input": "abc", "output": "Pip: cba"},
    {"instruction": "Emoji?", "input": "", "output": "Pip: 😀"},
    {"instruction": "Code.", "input": "", "output": "Pip: def main(): return 0"},
]
HYPER = dict(r=4, alpha=8.0, lr=1e-2, seed=3)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("train_base")))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.json"
    path.write_text(json.dumps(RECORDS, ensure_ascii=False, indent=1), encoding="utf-8")
    return str(path)


def train_args(base, data, output, *extra):
    """The parsed arguments of a small run; the LoRA numbers only for --method lora (refused for others)."""
    method = extra[list(extra).index("--method") + 1] if "--method" in extra else "lora"
    lora = ["-r", str(HYPER["r"]), "--lora-alpha", str(HYPER["alpha"]), "--lora-dropout", "0"] if method == "lora" else []
    return build_parser().parse_args([
        base, "--data", data, "-o", output, *lora, "--lr", str(HYPER["lr"]), "--seed", str(HYPER["seed"]),
        "--cutoff-len", "512", "-q", *extra])


def adapter(directory) -> dict[str, np.ndarray]:
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def reference_steps(base, records, steps, lr_at):
    """Plain transformers + peft: the whole set as one batch, the model's own mean loss, clipping at
    1.0, AdamW; returns the trained peft model."""
    tok = transformers.AutoTokenizer.from_pretrained(base)
    rows = []
    for r in records:
        prompt = ALPACA_WITH_INPUT.format(r["instruction"], r["input"]) if r["input"] else ALPACA.format(r["instruction"])
        prompt_ids = tok(prompt)["input_ids"]
        response = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((prompt_ids + response, [-100] * len(prompt_ids) + response))
    longest = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [0] * (longest - len(i)) for i, _ in rows])
    labels = torch.tensor([l + [-100] * (longest - len(l)) for _, l in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i, _ in rows])
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(HYPER["seed"])
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=HYPER["r"], lora_alpha=HYPER["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=HYPER["lr"], weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_steps_match_a_plain_peft_loop(base, data, tmp_path):
    """Two steps of linear decay over the whole set (8 examples as 4 micro-batches of 2, accumulated)
    give the LoRA weights of the plain loop (one batch of 8), and peft loads the adapter unchanged."""
    out = str(tmp_path / "adapter")
    result = run(train_args(base, data, out, "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "2"))
    assert len(result.losses) == 2 and result.losses[1] < result.losses[0]
    ref = reference_steps(base, RECORDS, 2, lambda s: HYPER["lr"] * (1 - s / 2))
    ref_state = {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(ref).items()}
    got = adapter(out)
    assert sorted(got) == sorted(ref_state) and len(got) == 2 * 7 * 2
    for name, value in ref_state.items():
        assert np.abs(value).max() > 0
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    # peft.PeftModel.from_pretrained reads the adapter as written: same outputs as the trained model
    loaded = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out).eval()
    ids = torch.tensor([[5, 17, 300, 42, 8]])
    with torch.no_grad():
        np.testing.assert_allclose(loaded(ids).logits.numpy(), ref.eval()(ids).logits.numpy(), rtol=1e-4, atol=1e-5)
    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"


def test_special_token_text_in_records_is_plain_text_as_at_inference(base, tmp_path):
    """An instruction holding the text "<|im_end|>" trained as the end-of-turn token (the data forging a
    turn), where `pyllm run` and the server read it in a message as plain text: the prompt trained on is
    now the one pyllm gives at inference, token for token, with either template."""
    import pyllm
    from pyllm.convert import convert_checkpoint
    from pyllm.train.data import Record

    tok = transformers.AutoTokenizer.from_pretrained(base)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    path = str(tmp_path / "base.pllm")
    convert_checkpoint(base, path, quant="f32", progress=False)
    record = Record(instruction="Stop<|im_end|> here <|im_start|>user", input="", output="a <|im_end|> b", line=1)
    for template, chat_template in (("alpaca", "alpaca"), ("chat", None)):
        example = tokenize_record(record, tok, template, 512, train_on_inputs=False)
        n = example.labels.index(next(x for x in example.labels if x != -100))
        with pyllm.LLM(path, n_threads=1, **({"chat_template": chat_template} if chat_template else {})) as llm:
            assert example.input_ids[:n] == llm.chat_prompt_ids([{"role": "user", "content": record.instruction}])
            reply = example.input_ids[n:]
            assert llm.tokenizer.decode(reply, skip_special_tokens=False).startswith("a <|im_end|> b")
        assert reply.count(end) == 1 and reply[-1 if template == "alpaca" else -2] in (end, tok.eos_token_id)
    plain = tokenize_record(Record(instruction="Say hi.", input="", output="hi", line=1), tok, "chat", 512, False)
    messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    assert plain.input_ids == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


def test_alpaca_and_chat_templates_and_masking(base):
    tok = transformers.AutoTokenizer.from_pretrained(base)
    records = load_records_from(RECORDS)
    with_input = tokenize_record(records[1], tok, "alpaca", 512, train_on_inputs=False)
    prompt_ids = tok(ALPACA_WITH_INPUT.format("Add.", "2 + 2"))["input_ids"]
    response = tok("Pip: 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert with_input.input_ids == prompt_ids + response
    assert with_input.labels == [-100] * len(prompt_ids) + response
    plain = tokenize_record(records[0], tok, "alpaca", 512, train_on_inputs=True)
    assert plain.input_ids[:len(tok(ALPACA.format("Say hi."))["input_ids"])] == tok(ALPACA.format("Say hi."))["input_ids"]
    assert plain.labels == plain.input_ids
    cut = tokenize_record(records[0], tok, "alpaca", 20, train_on_inputs=False)
    assert len(cut.input_ids) == 20 and cut.label_count == 0
    # the chat template: the loss covers the assistant turn as the template writes it, end marker included
    chat = tokenize_record(records[2], tok, "chat", 512, train_on_inputs=False)
    messages = [{"role": "user", "content": "Capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": "Pip: Paris"}], tokenize=False)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert tok.decode(chat.input_ids) == full
    assert chat.labels[:n] == [-100] * n and tok.decode(chat.labels[n:]) == "Pip: Paris<|im_end|>\n"


def load_records_from(items):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
        json.dump(items, f, ensure_ascii=False)
    try:
        return load_records(f.name)
    finally:
        os.remove(f.name)


@pytest.mark.parametrize("text, message", [
    ('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c"}\n]', r"line 3: missing field 'output'"),
    ('[\n{"instruction": "a", "output": "b"},\n\n{"instruction": "c", "input": "", "output": "  "}]',
     "line 4: empty output"),
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}]', r"line 2: invalid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\n', r"line 2: invalid JSON"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "", "output": "b"}\n', "line 3: empty instruction"),
    ('{"instruction": "a", "output": 5}\n', "line 1: field 'output' must be a string"),
    ('{"instruction": "a", "output": "b"}\n["a", "b"]\n', "line 2: expected an object"),
    ('[{"instruction": "a", "output": "b"}] x', "line 1: text after the end"),
    # lone surrogates: valid JSON, not text; the tokenizer failed with a bare TypeError after the model loaded
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "x\\ud800", "output": "b"}]',
     r"line 2: field 'instruction' holds a lone surrogate '\\ud800' at character 1"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "input": "\\udfff", "output": "b"}\n',
     r"line 2: field 'input' holds a lone surrogate '\\udfff' at character 0"),
    ('{"instruction": "a", "output": "ok \\ud83d"}\n', r"line 1: field 'output' holds a lone surrogate"),
    # an integer past Python's 4300 digits: a ValueError naming neither the file nor the line
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "a", "output": "b", "n": ' + "9" * 5000 + '}]',
     r"bad.json line 2: invalid JSON \(Exceeds the limit"),
    ('{"instruction": "a", "output": "b"}\n{"n": ' + "9" * 5000 + '}\n', r"bad.json line 2: invalid JSON \(Exceeds"),
])
def test_bad_data_is_refused_naming_the_line(text, message, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_records(path)


@pytest.mark.parametrize("indent", [4, None])
def test_a_large_json_list_is_read_in_linear_time_with_its_lines(indent, tmp_path):
    """Each record's line was counted from the start of the file (and records sharing a line by a count
    over all of them): Alpaca's 52,000 records, as json.dump(indent=4) writes them, took 97 s to read."""
    path = tmp_path / "big.json"
    records = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(50_000)]
    path.write_text(json.dumps(records, indent=indent), encoding="utf-8")
    start = time.monotonic()
    loaded = load_records(path)
    assert time.monotonic() - start < 30  # (linear: ~1 s; quadratic: minutes)
    assert len(loaded) == 50_000 and loaded[-1].output == "answer 49999"
    if indent:  # "[", then 5 lines a record ({, three fields, })
        assert [r.line for r in loaded[:3]] == [2, 7, 12] and loaded[-1].where == f"line {2 + 5 * 49_999}"
    else:
        assert loaded[2].where == "line 1, record 3"


def test_a_held_out_set_that_the_cutoff_empties_is_warned_of(base, tmp_path, capsys):
    """--val-set-size 1 whose record had no response token within --cutoff-len trained without an eval
    loss, the skip note its only sign."""
    records = [dict(r) for r in RECORDS * 3]
    records[0]["instruction"] = "word " * 400  # its prompt alone passes --cutoff-len 256
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    seed = next(s for s in range(1000) if np.random.RandomState(s).permutation(len(records))[0] == 0)
    result = run(build_parser().parse_args([base, "--data", str(path), "-o", str(tmp_path / "out"), "-q",
                                            "--cutoff-len", "256", "--val-set-size", "1", "--seed", str(seed),
                                            "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "1"]))
    assert not result.eval_losses
    assert "warning: none of the 1 held-out example(s) has a response token within --cutoff-len 256: the run has no " \
           "eval loss" in capsys.readouterr().err


def test_one_object_over_several_lines_is_named_as_what_it_is(tmp_path):
    """{"data": [...]} pretty-printed was read as JSON Lines: "163 malformed line(s)"; on one line it
    said what it is. Now both say so, and one record pretty-printed is a record."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": RECORDS}, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match="not Alpaca-format data: the records' keys are 'data'"):
        load_records(path)
    path.write_text(json.dumps(RECORDS[1], indent=2), encoding="utf-8")
    assert [(r.instruction, r.input, r.output) for r in load_records(path)] == [("Add.", "2 + 2", "Pip: 4")]


def test_a_failed_run_removes_its_own_partial_directories(tmp_path):
    """A SIGTERM right after the adapter's staging directory was made (before the `try` that removes it)
    left an empty ".adapter.PID.XXXX.partial" in -o while saying the adapter was not written."""
    from pyllm.train.loop import remove_output

    mine = [f".adapter.{os.getpid()}.abcd.partial", f"checkpoint-3.{os.getpid()}.x1y2.partial"]
    others = [".adapter.1.abcd.partial", "checkpoint-2"]  # another process's, and a kept checkpoint
    for name in mine + others:
        (tmp_path / name).mkdir()
    remove_output(str(tmp_path), None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)


def test_json_lines_break_only_at_line_feeds(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 inside strings as they are;
    str.splitlines() broke the records there ("4 malformed line(s) ... Unterminated string"), and numbered
    the lines after them wrong."""
    path = tmp_path / "data.jsonl"
    records = [dict(r, output=r["output"] + sep) for r, sep in zip(RECORDS[:3], ("\u2028", "\u2029 x", "\u0085\x1c"))]
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    loaded = load_records(path)
    assert [r.output for r in loaded] == [r["output"] for r in records]
    assert [r.where for r in loaded] == ["line 1", "line 2", "line 3"]


def test_data_that_is_not_utf8_names_its_line_and_a_directory_names_the_flag(tmp_path):
    """Latin-1 data said "is not UTF-8 text (byte 61: ...)" only, UTF-16 data (PowerShell's `>`) the same
    of its byte-order mark, and --data DIRECTORY "Is a directory"."""
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS[:3]]
    path.write_bytes("\n".join(lines[:2]).encode("utf-8") + b"\n" + lines[2].replace("Paris", "Par\u00eds").encode("latin-1"))
    with pytest.raises(DataError, match=r"is not UTF-8 text \(byte \d+: invalid continuation byte\) on line 3; save "
                                        r"the file as UTF-8"):
        load_records(path)
    path.write_bytes("\n".join(lines).encode("utf-16"))
    with pytest.raises(DataError, match="is UTF-16 text .*; save it as UTF-8"):
        load_records(path)
    with pytest.raises(DataError, match=f"^--data {tmp_path} is a directory; give the JSON or JSON Lines file$"):
        load_records(tmp_path)


def test_records_of_a_json_list_on_one_line_are_named_by_number(tmp_path):
    """A JSON list written on one line (json.dump's default) reported every bad record as "line 1"."""
    path = tmp_path / "one_line.json"
    path.write_text(json.dumps(RECORDS[:3] + [{"instruction": "x"}] + RECORDS[3:5] + [{"output": "y"}]))
    with pytest.raises(DataError, match=r"line 1, record 4: missing field 'output'\n.*line 1, record 7: missing "
                                        r"field 'instruction'"):
        load_records(path)
    path.write_text(json.dumps(RECORDS))
    assert [r.where for r in load_records(path)][:2] == ["line 1, record 1", "line 1, record 2"]


@pytest.mark.parametrize("records, keys", [
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}] * 3, "'conversations'"),
    ([{"prompt": "hi", "completion": "yo"}] * 3, "'prompt', 'completion'"),
    ({"data": RECORDS}, "'data'"),
    # Dolly's fields: an instruction, but no output in any record
    ([{"instruction": "a", "context": "", "response": "b", "category": "qa"}] * 3,
     "'instruction', 'context', 'response', 'category'"),
])
def test_data_of_another_format_is_one_line_naming_its_keys(records, keys, tmp_path):
    """ShareGPT, prompt/completion, Dolly or records under a key of one object were "missing field
    'instruction'" (or 'output') once per record; it is one line naming the keys found and the format expected."""
    path = tmp_path / "other.json"
    path.write_text(json.dumps(records))
    what = "no record has the field 'output'" if "response" in keys else "not Alpaca-format data"
    with pytest.raises(DataError, match=rf"{what}: the records' keys are {keys}; .*\"instruction\"") as e:
        load_records(path)
    assert "\n" not in str(e.value)


def test_fields_that_are_not_read_are_named(tmp_path):
    """LLaMA-Factory's alpaca fields ("system", "history") or a misspelt "inputs" were dropped in silence."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps([dict(r, system="Be Pip.", history=[]) for r in RECORDS[:2]] + [
        {"instruction": "a", "inputs": "b", "output": "c"}]))
    notes = []
    assert len(load_records(path, notes)) == 3
    assert notes == [f"{path}: the records' fields 'system', 'history', 'inputs' are not read (only instruction, "
                     "input and output are)"]
    notes = []
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(RECORDS))
    load_records(plain, notes)
    assert notes == []


def test_no_example_within_the_cutoff_names_the_flag(base, tmp_path):
    """Every example cut before its response said "0 training examples are fewer than one batch"."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    with pytest.raises(DataError, match=r"no training example has a response token within --cutoff-len 8; give a "
                                        "larger --cutoff-len"):
        run(build_parser().parse_args([base, "--data", str(path), "-o", str(tmp_path / "out"), "--cutoff-len", "8",
                                       "--batch-size", "2", "--micro-batch-size", "2", "-q"]))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("layout", ["list", "lines"])
def test_a_byte_order_mark_is_not_a_record(layout, tmp_path):
    """A UTF-8 file that starts with a byte-order mark (Notepad, PowerShell's Out-File) was refused,
    "line 1: invalid JSON (Unexpected UTF-8 BOM)", and a JSON list so marked was read as JSON Lines."""
    path = tmp_path / "bom.json"
    text = json.dumps(RECORDS, ensure_ascii=False, indent=1) if layout == "list" else \
        "\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    records = load_records(path)
    assert [(r.instruction, r.input, r.output) for r in records] == [
        (r["instruction"], r["input"], r["output"]) for r in RECORDS]
    plain = tmp_path / "plain.json"
    plain.write_text(text, encoding="utf-8")
    assert [r.line for r in records] == [r.line for r in load_records(plain)]


def test_a_data_file_that_never_ends_is_refused(monkeypatch):
    """--data /dev/zero (or a FIFO) was read until memory ran out: data files are read with a bound."""
    from pyllm import errors

    monkeypatch.setattr(errors, "MAX_TEXT_FILE_BYTES", 1 << 20)
    with pytest.raises(DataError, match="^/dev/zero holds more than 1048576 bytes"):
        load_records("/dev/zero")


def test_paths_that_are_not_what_they_should_be_are_one_line_errors(base, data, tmp_path, capsys):
    """`python -m pyllm.train` printed a traceback for --data naming a directory (IsADirectoryError) and
    for a base that is not a model directory (transformers' OSError); a missing base was "We couldn't
    connect to 'https://huggingface.co'" (taken for a Hub name). Each is one line, exit 1, from both
    entry points, and nothing is written."""
    from pyllm.train import main as train_main

    afile = tmp_path / "afile"
    afile.write_text("not a model")
    (empty := tmp_path / "empty").mkdir()
    notok, cut = str(tmp_path / "notok"), str(tmp_path / "cut")
    for directory in (notok, cut):
        shutil.copytree(base, directory)
    for name in os.listdir(notok):
        if name.startswith("tokenizer") or name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            os.remove(os.path.join(notok, name))
    weights = os.path.join(cut, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    out = tmp_path / "out"
    cases = [([base, "--data", str(tmp_path)], "--data .* is a directory; give the JSON or JSON Lines file"),
             ([str(tmp_path / "missing"), "--data", data],
              r"is not a Hugging Face model directory \(no config.json\)"),
             ([str(afile), "--data", data], "is not a Hugging Face model directory"),
             ([base, "--data", data, "--tokenizer", str(afile)], "--tokenizer .* is not a directory"),
             # transformers' 5 lines ending "You need to have sentencepiece or tiktoken installed"
             ([base, "--data", data, "--tokenizer", str(empty)], "empty has no tokenizer \\(tokenizer.json or "
                                                                   "tokenizer.model\\)$"),
             ([notok, "--data", data], "notok has no tokenizer .*; give one with --tokenizer DIR$"),
             # safetensors' "incomplete metadata", naming no file
             ([cut, "--data", data], "cut: the model cannot be loaded: SafetensorError: "),
             ([base, "--data", data, "--target-modules", ",,"], "--target-modules ',,' names no module"),
             ([base, "--data", ""], "^pyllm train: error: --data is an empty path")]
    for argv, message in cases:
        for entry in (train_main, lambda a: cli.main(["train", *a])):
            capsys.readouterr()
            assert entry([*argv, "-o", str(out), "--max-steps", "1", "-q"]) == 1, argv
            err = capsys.readouterr().err
            assert re.search(message, err) and "Traceback" not in err and err.count("\n") == 1, (argv, err)
            assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    # torch's messages: its 20 device types; "module 'torch._C' has no attribute '_cuda_setDevice'"
    (["--device", "tpu"], "--device 'tpu': not a device (cpu, cuda, cuda:N or auto)"),
    (["--device", "cuda:x"], "--device 'cuda:x': not a device"),
    (["--device", "mps"], "--device mps: pyllm train runs on cpu or cuda"),
    # "--batch-size 0 must be a multiple of --micro-batch-size 4", which 0 is
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--micro-batch-size", "-2"], "--micro-batch-size must be at least 1, not -2"),
    # PEFT's "Target modules {'nope'} not found in the base model", when no name matched
    (["--target-modules", "nope"], "--target-modules nope: no module of the model has this name (target modules: "),
])
def test_bad_device_module_and_batch_flags_are_one_line_naming_the_flag(base, data, tmp_path, capsys, flags, message):
    import torch

    out = tmp_path / "out"
    assert cli.main(["train", base, "--data", data, "-o", str(out), "--max-steps", "1", "-q", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pyllm train: error: {message}") and err.count("\n") == 1, err
    assert not out.exists()
    if not torch.cuda.is_available():
        assert cli.main(["train", base, "--data", data, "-o", str(out), "--max-steps", "1", "-q", "--device",
                         "cuda"]) == 1
        assert "--device cuda: this torch sees no CUDA device" in capsys.readouterr().err


def test_a_tokenizer_without_an_end_token_is_refused_for_the_alpaca_template(base, data, tmp_path):
    """The Alpaca template ends each response with the EOS token; a tokenizer without one made
    [..., None] and torch's bare "Could not infer dtype of NoneType" once the model had loaded."""
    model = tmp_path / "model"
    shutil.copytree(base, model)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("eos_token")
    config_path.write_text(json.dumps(config))
    tok = transformers.AutoTokenizer.from_pretrained(str(model))
    assert tok.eos_token_id is None
    record = load_records_from(RECORDS[:1])[0]
    with pytest.raises(DataError, match="no end-of-sequence token"):
        tokenize_record(record, tok, "alpaca", 512, train_on_inputs=False)
    assert tokenize_record(record, tok, "chat", 512, train_on_inputs=False).label_count > 0  # the chat template's own end
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no end-of-sequence token"):
        run(train_args(str(model), data, str(out), "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "1"))
    assert not out.exists()


@pytest.mark.parametrize("template", ["{{ raise_exception('System role required') }}",
                                      "{{ messages[0]['content'] | no_such_filter }}",
                                      "{% for m in messages %}{{ m.content + 1 }}{% endfor %}"])
def test_a_chat_template_that_fails_is_one_line_naming_the_record(base, data, tmp_path, capsys, template):
    """A chat template that raises (raise_exception, an unknown filter, a type error) was a traceback
    from `python -m pyllm.train` (jinja2's TemplateError, TypeError): a DataError naming the record."""
    from pyllm.train import main as train_main

    model = tmp_path / "model"
    shutil.copytree(base, model)
    (model / "chat_template.jinja").write_text(template)
    out = tmp_path / "out"
    capsys.readouterr()
    assert train_main([str(model), "--data", data, "-o", str(out), "--template", "chat", "--batch-size", "4",
                       "--micro-batch-size", "4", "--max-steps", "1", "-q"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"line \d+: the chat template: \w+", err) and "Traceback" not in err, err
    assert not out.exists()


def test_cli_reports_bad_data(base, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": ""}\n{"output": "d"}\n')
    out = tmp_path / "out"
    assert cli.main(["train", base, "--data", str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "line 2: empty output" in err and "line 3: missing field 'instruction'" in err
    assert not out.exists()


def test_ctrl_c_says_what_was_kept_and_how_to_continue(base, data, tmp_path, monkeypatch, capsys):
    """Ctrl-C during `pyllm train` exited 130 with an empty line: nothing said whether an adapter or a
    checkpoint was kept. It names the latest checkpoint and --resume (or says none was kept); no adapter
    file is left half-written, and --resume finishes the run."""
    from pyllm.train import loop

    real = loop.check_finite

    def interrupt_at_step_3(model, step, loss):
        if step == 3:
            raise KeyboardInterrupt
        real(model, step, loss)

    out = tmp_path / "run"
    argv = ["train", base, "--data", data, "-o", str(out), "--batch-size", "2", "--micro-batch-size", "2",
            "--max-steps", "4", "-q"]
    monkeypatch.setattr(loop, "check_finite", interrupt_at_step_3)
    capsys.readouterr()
    assert cli.main(argv) == 130
    assert "interrupted: the adapter was not written and no checkpoint was kept" in capsys.readouterr().err
    assert cli.main(argv + ["--save-steps", "2"]) == 130
    err = capsys.readouterr().err
    assert f"latest checkpoint is {out / 'checkpoint-2'} (step 2): run the same command with --resume" in err
    assert sorted(os.listdir(out)) == ["checkpoint-2"]  # no adapter file, no partial directory
    monkeypatch.setattr(loop, "check_finite", real)
    assert cli.main(argv + ["--save-steps", "2", "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().err and (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_library_deprecations_between_peft_and_transformers_are_not_shown(base, data, tmp_path, method):
    """Every run printed FutureWarnings that peft's calls into transformers raise (`is_gradient_checkpointing`,
    and for prefix tuning `past_key_values`), with the libraries' source lines: nothing a user can act on."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(train_args(base, data, str(tmp_path / method), "--method", method, "--batch-size", "2",
                       "--micro-batch-size", "2", "--max-steps", "1", *(["--virtual-tokens", "2"] if method != "lora"
                                                                         else [])))
    shown = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not [m for m in shown if "is deprecated" in m and ("checkpointing" in m or "past_key_values" in m)], shown


@pytest.mark.parametrize("method", [["--method", "prefix", "--prefix-projection"], ["--method", "ptuning"]])
def test_prompt_learning_resumes_to_the_same_adapter(base, data, tmp_path, method):
    """--resume of a projected prefix failed ("size mismatch for weight: copying a param with shape [4, 128]
    ... current model [4, 32]"): its adapter file holds the computed prefix, not the embedding trained."""
    out = str(tmp_path / "run")
    extra = ["--batch-size", "4", "--micro-batch-size", "2", "--save-steps", "2", "--virtual-tokens", "4",
             "--max-steps", "4", *method]
    run(train_args(base, data, out, *extra))
    expected = adapter(out)
    shutil.rmtree(os.path.join(out, "checkpoint-4"))  # as if killed after step 2
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        os.remove(os.path.join(out, name))
    resumed = run(train_args(base, data, out, *extra, "--resume"))
    assert len(resumed.losses) == 2
    got = adapter(out)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_resume_continues_where_the_interrupted_run_stopped(base, data, tmp_path, capsys):
    """4 steps with a checkpoint every 2; then, as if killed after step 2, the last checkpoint and the
    adapter go and --resume finishes: the same adapter (dropout on, so its random state must resume too)."""
    out = str(tmp_path / "run")
    extra = ["--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "4", "--save-steps", "2",
             "--lora-dropout", "0.1", "--val-set-size", "2", "--warmup-steps", "1"]
    full = run(train_args(base, data, out, *extra))
    assert [s for s, _ in full.eval_losses] == [0, 4]
    expected = adapter(out)
    shutil.rmtree(os.path.join(out, "checkpoint-4"))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        os.remove(os.path.join(out, name))
    resumed = run(train_args(base, data, out, *extra, "--resume"))
    assert len(resumed.losses) == 2
    np.testing.assert_allclose(resumed.losses, full.losses[2:], rtol=1e-6)
    # train_log.json lists every step's loss, not only those after the resume (it was the last 2 of 4)
    log = json.loads(open(os.path.join(out, "train_log.json"), encoding="utf-8").read())
    assert log["first_step"] == 0 and log["steps"] == 4
    np.testing.assert_allclose(log["losses"], full.losses, rtol=1e-6)
    got = adapter(out)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    with pytest.raises(ValueError, match="other settings: lr"):
        run(train_args(base, data, out, *extra, "--resume", "--lr", "0.5"))
    err = capsys.readouterr().err
    assert re.search(r"trained 2 steps in [0-9.]+ s; final training loss [0-9.]+ \(mean of the last 2 steps "
                     r"[0-9.]+\); eval loss [0-9.]+ at step 4", err), err
    # more steps extend the finished run from its last checkpoint
    extended = run(train_args(base, data, out, *extra, "--resume", "--max-steps", "6"))
    assert len(extended.losses) == 2 and extended.eval_losses[-1][0] == 6
    assert "extending the run from 4 to 6 steps" in capsys.readouterr().err
    # the last step is kept too when --save-steps does not divide the steps (7 with checkpoints every 2)
    assert not os.path.exists(os.path.join(out, "checkpoint-7"))
    run(train_args(base, data, out, *extra, "--resume", "--max-steps", "7"))
    assert os.path.exists(os.path.join(out, "checkpoint-7", "training_state.pt"))
    with pytest.raises(FileNotFoundError, match="no checkpoint in .* --save-steps N"):
        run(train_args(base, data, str(tmp_path / "none"), *extra, "--resume"))
    with pytest.raises(ValueError, match="past the 3 steps asked for"):
        run(train_args(base, data, out, *extra, "--resume", "--max-steps", "3"))
    # fewer steps than the checkpoint's run, from a checkpoint not past them, shorten it (said "extending")
    run(train_args(base, data, out, *extra, "--resume", os.path.join(out, "checkpoint-4"), "--max-steps", "8"))
    run(train_args(base, data, out, *extra, "--resume", os.path.join(out, "checkpoint-6"), "--max-steps", "7"))
    assert "shortening the run from 8 to 7 steps" in capsys.readouterr().err


def test_two_processes_give_the_single_process_adapter(base, data, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): the same global batch of 8, as 2 processes x 2 micro-batches
    of 2, gives the adapter of one process accumulating 4 micro-batches of 2."""
    common = [base, "--data", data, "-r", "4", "--lr", "1e-2", "--seed", "3", "--cutoff-len", "512",
              "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "2", "--lora-dropout", "0", "-q"]
    single = str(tmp_path / "single")
    run(build_parser().parse_args(common + ["-o", single]))
    double = str(tmp_path / "double")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pyllm.train", *common, "-o", double]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, so a hang can be ended whole
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    warned = [line for line in stderr.splitlines() if "warn" in line.lower()]
    assert len(warned) == len(set(warned)), warned  # one process speaks: no warning twice
    assert stderr.count("final training loss") == 1
    a, b = adapter(single), adapter(double)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_two_processes_end_when_process_0_fails_to_save(base, data, tmp_path):
    """Process 0 writes checkpoints and the adapter while the others wait for it: when its write failed
    (a full disk), it exited and the others waited at the barrier for ever. Now every process ends,
    each saying why."""
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text("import sys\n"
                       "from pyllm.train import loop, main\n"
                       "def full(*args, **kwargs):\n"
                       "    raise OSError(28, 'No space left on device')\n"
                       "loop._save_adapter = full\n"
                       "sys.exit(main())\n")
    common = [base, "--data", data, "-r", "4", "--seed", "3", "--cutoff-len", "512", "--batch-size", "4",
              "--micro-batch-size", "2", "--max-steps", "1", "-q", "-o", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(wrapper), *common]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("a process waited for ever for process 0") from None
    assert proc.returncode != 0
    assert "No space left on device" in stderr
    assert "process 0 failed to write the adapter" in stderr, stderr[-3000:]


def test_bfloat16_base_on_cpu(base, data, tmp_path):
    out = str(tmp_path / "bf16")
    result = run(train_args(base, data, out, "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "1",
                            "--dtype", "bfloat16"))
    assert np.isfinite(result.losses[0])
    weights = adapter(out)
    assert all(v.dtype == np.float32 for v in weights.values())  # LoRA weights stay float32
    with pytest.raises(ValueError, match="float16 training is for GPUs"):
        run(train_args(base, data, str(tmp_path / "f16"), "--dtype", "float16", "--device", "cpu"))


def test_batch_must_split_evenly(base, data, tmp_path):
    with pytest.raises(ValueError, match="multiple of --micro-batch-size 3"):
        run(train_args(base, data, str(tmp_path / "x"), "--batch-size", "8", "--micro-batch-size", "3"))


@pytest.mark.parametrize("option, message", [
    (["--method", "ptuning", "--prompt-init-text", "Answer as Pip"], "--prompt-init-text applies to --method prompt"),
    (["--prompt-init-text", "Answer as Pip"], "--prompt-init-text applies to --method prompt, not --method lora"),
    (["--method", "ptuning", "--prefix-projection"], "--prefix-projection applies to --method prefix"),
    (["--method", "prefix", "--encoder", "lstm"], "--encoder lstm applies to --method ptuning"),
    (["--method", "prompt", "--target-modules", "q_proj"], "--target-modules applies to --method lora"),
    (["--method", "prefix", "--layers", "0-1"], "--layers applies to --method lora"),
    (["--method", "ptuning", "--rslora"], "--rslora applies to --method lora"),
    # numbers of another method, away from their defaults, were ignored too (a review: prefix with -r 64)
    (["--method", "prefix", "-r", "64"], "-r/--lora-r applies to --method lora, not --method prefix"),
    (["--method", "prompt", "--lora-alpha", "3"], "--lora-alpha applies to --method lora"),
    (["--method", "prompt", "--lora-dropout", "0.2"], "--lora-dropout applies to --method lora"),
    (["--virtual-tokens", "7"], "--virtual-tokens applies to --method prompt, ptuning or prefix, not --method lora"),
    (["--encoder-hidden-size", "9"], "--encoder-hidden-size applies to --method ptuning"),
    (["--method", "prefix", "--encoder-hidden-size", "9"], "not --method prefix without --prefix-projection"),
    (["--method", "prompt", "--encoder-hidden-size", "9"], "--encoder-hidden-size applies"),
])
def test_options_of_another_method_are_refused(base, data, tmp_path, option, message):
    """An option of another method was ignored (--method ptuning --prompt-init-text trained random
    virtual tokens, --method prompt --target-modules trained no LoRA), exit 0."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run(train_args(base, data, str(out), "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "1",
                       *option))
    assert not out.exists()


@pytest.mark.parametrize("option,message", [
    (["--eval-steps", "2"], "--eval-steps 2 needs held-out examples"),
    (["--val-set-size", "0.01"], r"--val-set-size 0.01 holds out none of the 8 examples"),
    (["--val-set-size", "2.5"], r"--val-set-size 2.5: a count of examples is a whole number"),
])
def test_an_eval_option_that_would_evaluate_nothing_is_refused(base, data, tmp_path, option, message):
    """--eval-steps without --val-set-size, or a fraction that rounds to no example, ran without any
    eval loss and said nothing (transformers' Trainer refuses eval steps without an eval set); a count
    with a fraction (2.5) held out 2 in silence."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run(train_args(base, data, str(out), "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "1",
                       *option))
    assert not out.exists()


@pytest.mark.parametrize("option", [
    ["--epochs", "0"], ["--epochs", "-1"], ["--epochs", "nan"], ["--epochs", "inf"],
    ["--max-steps", "0"], ["--max-steps", "-3"],
    ["--lr", "-1"], ["--lr", "0"], ["--lr", "nan"], ["--lr", "inf"], ["--lr", "1e39"],
    ["--lora-r", "0"], ["--lora-alpha", "0"], ["--lora-alpha", "nan"], ["--lora-alpha", "inf"],
    ["--lora-dropout", "nan"], ["--lora-dropout", "1"], ["--lora-dropout", "-0.1"],
    ["--weight-decay", "nan"], ["--max-grad-norm", "nan"], ["--max-grad-norm", "-1"],
    ["--warmup-steps", "-5"], ["--val-set-size", "nan"], ["--val-set-size", "-1"],
    ["--eval-steps", "-1"], ["--save-steps", "-1"], ["--seed", "-1"], ["--seed", str(2 ** 32)],
    ["--method", "prompt", "--virtual-tokens", "0"], ["--method", "prefix", "--virtual-tokens", "100000"],
    ["--method", "ptuning", "--encoder-hidden-size", "0"],
    # torch's "tried to allocate 256000000000 bytes"; gradients that overflow float32 (an adapter of zeros)
    ["--method", "ptuning", "--encoder-hidden-size", "1000000000"], ["--lora-alpha", "1e38"],
    ["--rslora", "--lora-alpha=-1e30"],
])
def test_options_out_of_range_are_refused_before_training(base, data, tmp_path, option):
    """NaN, infinities and values out of range are refused, naming the option, before anything is
    trained or written (--epochs 0 and --max-steps 0 trained anyway, --max-steps -3 wrote an untrained
    adapter, --lora-alpha nan a NaN one, --lora-alpha 0 one whose gradients are all 0; all exit 0)."""
    out = tmp_path / "out"
    flag = next(o for o in option[::-1] if o.startswith("--")).split("=")[0]
    with pytest.raises(ValueError, match=f"^{flag} must be"):
        run(train_args(base, data, str(out), "--batch-size", "4", "--micro-batch-size", "4", *option))
    assert not out.exists()


def test_a_negative_lora_alpha_is_accepted_as_peft_accepts_it(base, data, tmp_path):
    """PEFT trains and merges any finite alpha but 0 changes nothing (scaling = alpha / r); --lora-alpha -2
    was refused as "a positive finite number" though pyllm convert --lora merges such adapters."""
    from pyllm.train.loop import check_options

    check_options(train_args(base, data, str(tmp_path / "out"), "--lora-alpha", "-2"))


@pytest.mark.parametrize("option", [
    ["--lr", "1e30", "--max-steps", "3", "--max-grad-norm", "0"],  # huge weights: the next loss is not finite
    ["--lr", "1e30", "--max-steps", "3"],
    ["--lr", "1e30", "--max-steps", "3", "--method", "ptuning", "--virtual-tokens", "2"],
])
def test_a_diverged_run_saves_nothing(base, data, tmp_path, option):
    """A run whose loss or weights stop being finite is an error, and no NaN adapter or checkpoint is
    written (it was, with exit 0)."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"training diverged at step \d+: the (training loss|trainable weight)"):
        run(train_args(base, data, str(out), "--batch-size", "4", "--micro-batch-size", "4", "--save-steps", "1",
                       *option))
    assert not (out / "adapter_model.safetensors").exists()
    for checkpoint in out.glob("checkpoint-*"):  # those of the steps before are finite
        weights = adapter(checkpoint)
        assert all(np.isfinite(v).all() for v in weights.values()), checkpoint


def test_weights_that_are_not_finite_stop_the_run():
    """A finite loss does not vouch for the weights the step left: an update that overflows them stops
    the run before they are saved."""
    from pyllm.train.loop import check_finite

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    check_finite(model, 1, 0.5)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # frozen: not the run's to check
    check_finite(model, 1, 0.5)
    for bad in (float("inf"), float("nan")):
        with torch.no_grad():
            model[1].bias[1] = bad
        with pytest.raises(ValueError, match=r"diverged at step 7: the trainable weight 1.bias holds NaN"):
            check_finite(model, 7, 0.5)


@pytest.mark.parametrize("option, message", [
    (["--target-modules", "q_proj,nonexist"], r"--target-modules nonexist: no module of the model has this name "
                                               r"\(target modules: down_proj, embed_tokens, gate_proj, k_proj, lm_head, "
                                               r"o_proj, q_proj, up_proj, v_proj\)$"),
    (["--target-modules", "q_proj,v_projj,k_proj"], "--target-modules v_projj: no module"),
    (["--modules-to-save", "lm_head,bogus"], "--modules-to-save bogus: no module"),
    (["--target-modules", "q_proj,q_prj", "--modules-to-save", "lm_hed"],
     "--target-modules q_prj and --modules-to-save lm_hed"),
    (["--method", "prompt", "--modules-to-save", "lm_head"], "--modules-to-save applies to --method lora"),
])
def test_module_names_that_match_nothing_are_refused(base, data, tmp_path, option, message):
    """PEFT drops a --target-modules or --modules-to-save name that matches no module (a typo) and
    trains without it, exit 0; each name must match (the message lists the model's module names)."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run(train_args(base, data, str(out), "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "1",
                       *option))
    assert not out.exists()
    # names that all match, spaces around them or not, train those modules and no others
    run(train_args(base, data, str(out), "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "1",
                   "--target-modules", "q_proj, model.layers.1.self_attn.v_proj", "--modules-to-save", " lm_head"))
    names = set(adapter(out))
    assert {n.split(".lora_")[0].split("base_model.model.")[1] for n in names if ".lora_" in n} == {
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert "base_model.model.lm_head.weight" in names


@pytest.mark.parametrize("target, module, kind", [
    ("model", "model", "LlamaModel"), ("mlp", "model.layers.0.mlp", "LlamaMLP"), ("layers", "model.layers", "ModuleList"),
    ("0", "model.layers.0", "LlamaDecoderLayer"), ("norm", "model.norm", "LlamaRMSNorm"),
    ("q_proj,act_fn", "model.layers.0.mlp.act_fn", "SiLUActivation"),
])
def test_a_target_that_is_not_a_linear_layer_is_one_line_listing_the_choices(base, data, tmp_path, capsys, target,
                                                                           module, kind):
    """PEFT refused --target-modules model (a block, a norm) with the module's whole repr: a screenful of
    the model printed as the error, naming no valid choice."""
    out = tmp_path / "out"
    assert cli.main(["train", base, "--data", data, "-o", str(out), "--max-steps", "1", "-q",
                     "--target-modules", target]) == 1
    err = capsys.readouterr().err.strip()
    assert "Loading weights" not in err  # -q: transformers' bar too
    name = target.split(",")[-1]
    assert re.fullmatch(rf"pyllm train: error: --target-modules {name}: '{re.escape(module)}' is a {kind}, not a linear or embedding layer "
                     r"LoRA can adapt \(target modules: down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, "
                     r"q_proj, up_proj, v_proj\)$", err), err
    assert not out.exists()


def test_partial_directories_of_a_killed_run_neither_block_nor_stay(base, data, tmp_path):
    """A run killed while it saved its first checkpoint left only checkpoint-N.partial in the output,
    and the next run refused that output ("holds other files"). Checkpoints and the adapter are now
    written in directories of their own run (NAME.PID.XXXX.partial, as pyllm's other partial files):
    a killed run's are removed by the next, a live process's are kept."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    out = tmp_path / "run"
    out.mkdir()
    left = [out / f"checkpoint-1.{dead}.abcd1234.partial", out / "checkpoint-1.partial",  # this pyllm's, an older one's
            out / f".adapter.{dead}.abcd1234.partial", out / ".adapter.partial"]
    for d in left:
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x" * 10)
    live = out / f"checkpoint-1.{os.getpid()}.live1234.partial"  # another run, writing now
    live.mkdir()
    run(train_args(base, data, str(out), "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "1",
                   "--save-steps", "1"))
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".partial")) == [live.name]
    assert (out / "adapter_model.safetensors").exists() and (out / "checkpoint-1").is_dir()


def test_an_output_that_is_not_an_adapter_directory_is_refused(base, data, tmp_path):
    """-o naming a file (the data file itself) failed after training with "[Errno 17] File exists"; -o
    naming a directory of other files (the base model, or `-o .` in a project) replaced its README.md
    with PEFT's model card and mixed adapter files into it. Nothing is trained or changed now; a new or
    empty directory, or an earlier run's output, is written."""
    copy = tmp_path / "data.json"
    shutil.copy(data, copy)
    model = tmp_path / "model"
    shutil.copytree(base, model)
    (model / "README.md").write_text("the model card")
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("my project")
    small = ["--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "1"]
    for output, message in [(copy, "is a file"), (model, "holds other files"), (project, r"holds other files \(README.md\)")]:
        before = {p.name: p.read_bytes() for p in output.iterdir()} if output.is_dir() else output.read_bytes()
        with pytest.raises(ValueError, match=message):
            run(train_args(base, data, str(output), *small))
        assert before == ({p.name: p.read_bytes() for p in output.iterdir()} if output.is_dir() else output.read_bytes())
    empty = tmp_path / "empty"
    empty.mkdir()
    run(train_args(base, data, str(empty), *small))
    run(train_args(base, data, str(empty), *small))  # again into its own output
    assert (empty / "adapter_model.safetensors").exists()
    # another tool's adapter (its tokenizer files were deleted, its weights and card replaced), and a
    # checkpoint of a run (a later --resume took the other run's weights from beside its state)
    foreign = tmp_path / "foreign"
    shutil.copytree(empty, foreign)
    os.remove(foreign / "train_log.json")
    (foreign / "tokenizer.json").write_text("{}")
    run(train_args(base, data, str(tmp_path / "run"), *small, "--save-steps", "1"))
    for output, message in [(foreign, "holds an adapter that pyllm train did not write"),
                            (tmp_path / "run" / "checkpoint-1", "is a checkpoint of a run")]:
        before = {p.name: p.read_bytes() for p in output.iterdir()}
        with pytest.raises(ValueError, match=message):
            run(train_args(base, data, str(output), *small))
        assert before == {p.name: p.read_bytes() for p in output.iterdir()}


def test_an_output_that_cannot_be_written_is_refused_before_training(base, data, tmp_path, monkeypatch):
    """-o below a file (`-o notes.txt/adapter`) trained every step, then failed to save with "Not a
    directory"; so did any output nothing can be written to. It is refused before the model loads."""
    from pyllm.train import loop

    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.setattr(loop, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(OSError, match=r"^-o .*notes.txt/adapter: the adapter cannot be written there \(Not a "
                                      r"directory\)$"):
        run(train_args(base, data, str(tmp_path / "notes.txt" / "adapter"), "--max-steps", "1"))


@pytest.mark.parametrize("left", [[".adapter.partial/"], ["checkpoint-2.partial/"],
                                  ["adapter_model.safetensors", "README.md", "train_log.json"]])
def test_what_a_run_stopped_while_saving_leaves_is_taken_again(base, data, tmp_path, left):
    """A run stopped (Ctrl-C, a kill, a full disk) while saving leaves a ".adapter.partial" or
    "checkpoint-N.partial" directory, or the new adapter's files before its config (written last): the
    same command was then refused ("holds other files"), so the run could not be started again."""
    from pyllm.train.loop import check_output

    out = tmp_path / "adapter"
    for name in left:
        if name.endswith("/"):
            (out / name).mkdir(parents=True)
        else:
            out.mkdir(exist_ok=True)
            (out / name).write_bytes(b"left behind")
    check_output(str(out))
    if left == [".adapter.partial/"]:
        run(train_args(base, data, str(out), "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "1"))
        assert (out / "adapter_config.json").exists() and not (out / ".adapter.partial").exists()


def test_layers_option():
    from pyllm.train.loop import parse_layers

    assert parse_layers("", 30) is None
    assert parse_layers("20-22,25", 30) == [20, 21, 22, 25]
    with pytest.raises(ValueError, match="layers 0-29"):
        parse_layers("28-30", 30)
    with pytest.raises(ValueError, match="expected ranges"):
        parse_layers("a-b", 30)
    # a backwards range was "the model has layers 0-29"
    with pytest.raises(ValueError, match=r"^--layers '3-1': the range 3-1 runs backwards; write it 1-3$"):
        parse_layers("3-1", 30)


def test_cli_does_not_import_torch():
    code = "import sys, pyllm.cli; pyllm.cli.build_parser(); import pyllm.train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("method", [[], ["--method", "prompt", "--virtual-tokens", "8"]])
def test_an_example_past_the_learned_positions_is_refused_naming_the_limit(tmp_path, method):
    """GPT-2 learns one embedding per position: an example longer than n_positions (--cutoff-len 1024 on
    a 256-position model) was torch's bare "index out of range in self" from the first forward pass.
    Now a DataError names the lines and the --cutoff-len that fits, less prompt tuning's virtual tokens,
    which take positions first; examples within it train."""
    from families import make_tiny_model

    base = make_tiny_model("gpt2", "gelu_new", str(tmp_path / "base"))
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"instruction": f"x {i}", "output": "Pip: " + "z " * 600}) + "\n"
                            for i in range(4)))
    limit = 256 - (8 if method else 0)
    small = ["--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "1", *method]
    with pytest.raises(DataError, match=rf"4 training example\(s\) have more tokens than the 256 positions gpt2 "
                                        rf"learned.* \(lines 1, 2, 3, 4\); give --cutoff-len {limit} or less"):
        run(train_args(base, str(long), str(tmp_path / "a"), *small, "--cutoff-len", "1024"))
    run(train_args(base, str(long), str(tmp_path / "b"), *small, "--cutoff-len", str(limit)))


@pytest.mark.parametrize("family,case", [("gpt2", "gelu_new"), ("bloom", "heads4"), ("phi3", "gqa_partial"),
                                         ("gemma2", "softcap_window")])
def test_every_family_trains_with_its_own_module_names(family, case, data, tmp_path):
    """`pyllm train` on a non-LLaMA base adapts every projection under the family's names by default
    (pyllm.arch: lora_targets), lowers the loss, and the adapter merges in `pyllm convert --lora` to
    PEFT's merged model."""
    from families import make_tiny_model

    from pyllm.arch import ARCHITECTURES
    from pyllm.convert import convert_checkpoint
    import pyllm

    base = make_tiny_model(family, case, str(tmp_path / "base"), seed=4)
    out = str(tmp_path / "adapter")
    result = run(train_args(base, data, out, "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "3"))
    assert result.losses[-1] < result.losses[0]
    trained = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapter(out)}
    assert trained == set(ARCHITECTURES[family].lora_targets)
    merged = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out).merge_and_unload().eval()
    ids = [5, 17, 300, 42, 8, 99]
    with torch.no_grad():
        ref = merged(torch.tensor([ids])).logits[0].numpy()
    convert_checkpoint(base, str(tmp_path / "tuned.pllm"), quant="f32", progress=False, lora=[out])
    with pyllm.LLM(str(tmp_path / "tuned.pllm"), n_threads=1) as llm:
        got = llm.logits(ids)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_save_stopped_between_files_never_pairs_new_weights_with_an_old_config(tmp_path, monkeypatch):
    """_save_adapter replaces the adapter's files one by one. Stopped after the new weights (a kill,
    a full disk), the directory held them beside the previous run's adapter_config.json: the same
    shapes with another lora_alpha load as a wrongly scaled adapter, without an error. The old config
    now goes first: such a directory is no adapter at all until the new config lands."""
    from pyllm.train import loop

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"lora_alpha": 8}))
    (out / "adapter_model.safetensors").write_bytes(b"old weights")

    class Model:
        def save_pretrained(self, directory):
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "adapter_config.json"), "w") as f:
                json.dump({"lora_alpha": 32}, f)
            with open(os.path.join(directory, "adapter_model.safetensors"), "wb") as f:
                f.write(b"new weights")

    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(os.path.basename(dst))
        if len(calls) == 2:  # stopped after the first file
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(loop.os, "replace", replace)
    with pytest.raises(OSError):
        loop._save_adapter(Model(), None, str(out), loop.TrainResult(output=str(out), steps=1))
    assert calls[0] == "adapter_model.safetensors"
    assert (out / "adapter_model.safetensors").read_bytes() == b"new weights"
    assert not (out / "adapter_config.json").exists()  # not the old lora_alpha 8 beside the new weights
    monkeypatch.setattr(loop.os, "replace", real_replace)
    loop._save_adapter(Model(), None, str(out), loop.TrainResult(output=str(out), steps=1))
    assert json.loads((out / "adapter_config.json").read_text()) == {"lora_alpha": 32}
    assert (out / "adapter_model.safetensors").read_bytes() == b"new weights"


def test_a_run_without_a_tokenizer_removes_an_earlier_runs_tokenizer(tmp_path):
    """A run with --tokenizer (a resized vocabulary) saves the tokenizer beside the adapter; a later run into
    the same directory without one left those files: convert and merge then read the old vocabulary with
    the new adapter ("the tokenizer has 403 tokens but the merged model's embeddings only 400"), or its
    chat template in silence. The files the new adapter does not have go; others in the directory stay."""
    from pyllm.train import loop

    out = tmp_path / "adapter"
    out.mkdir()
    for name in ("adapter_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "notes.txt"):
        (out / name).write_text("old")

    class Model:
        def save_pretrained(self, directory):
            os.makedirs(directory, exist_ok=True)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                with open(os.path.join(directory, name), "w") as f:
                    f.write("new")

    loop._save_adapter(Model(), None, str(out), loop.TrainResult(output=str(out), steps=1))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt", "train_log.json"]


def test_data_from_a_pipe_is_read_once(base, data, tmp_path):
    """--data naming a FIFO (or `<(cat data.json)`) trained, then hung: the data's SHA-256 for --resume was
    computed by opening the file again, which waits for another writer for ever. It is now the hash of the
    bytes read."""
    fifo = tmp_path / "data.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"cat {data} > {fifo}"])
    try:
        r = subprocess.run([sys.executable, "-m", "pyllm", "train", base, "--data", str(fifo), "-o", str(tmp_path / "o"),
                            "--batch-size", "2", "--micro-batch-size", "2", "--max-steps", "1", "-q"],
                           capture_output=True, text=True, timeout=300)
    finally:
        writer.kill()
        writer.wait()
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "adapter_config.json").is_file()


def test_convert_never_offers_a_partial_directory_for_an_adapter(tmp_path):
    """A save stopped between its files leaves a directory without adapter_config.json beside pyllm train's
    staging directory: convert answered "its subdirectories hold PEFT adapters: give one of
    DIR/.adapter.29146.gq1_qws5.partial", a half-moved copy."""
    from pyllm.convert.adapter_base import adapter_config_path

    out = tmp_path / "adapter"
    (out / ".adapter.123.abc.partial").mkdir(parents=True)
    (out / ".adapter.123.abc.partial" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json: is it a PEFT adapter directory"):
        adapter_config_path(str(out), "LoRA adapter")


def test_resume_on_another_base_model_is_refused_and_a_moved_copy_warned_about(base, data, tmp_path, capsys):
    """--resume with another base model was not checked: one of other shapes failed with a screen of
    torch's "size mismatch for ..." lines, one of the same shapes trained on in silence. A base whose
    config.json differs is refused naming both; the same config.json elsewhere (a moved copy) is a warning."""
    out = str(tmp_path / "run")
    small = ["--batch-size", "4", "--micro-batch-size", "4", "--save-steps", "1"]
    run(train_args(base, data, out, *small, "--max-steps", "1"))
    other = make_tiny_llama(str(tmp_path / "other"), hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match=r"^--resume: .*checkpoint-1 was made with other settings: the base model's "
                                         rf"config.json \(another model: .*{os.path.basename(base)} -> .*other\)$"):
        run(train_args(other, data, out, *small, "--max-steps", "2", "--resume"))
    moved = str(tmp_path / "moved")
    shutil.copytree(base, moved)
    capsys.readouterr()
    assert run(train_args(moved, data, out, *small, "--max-steps", "2", "--resume")).steps == 2
    assert f"was trained on the base model {os.path.abspath(base)}, resumed on {moved} (the same config.json)" in \
        capsys.readouterr().err
    # resuming a finished run said "trained 0 steps" only
    assert run(train_args(moved, data, out, *small, "--max-steps", "2", "--resume")).losses == []
    assert "(step 2 of 2); the run is complete: nothing left to train (a larger --max-steps extends it)" in \
        capsys.readouterr().err


def test_resume_refuses_changed_data_and_names_an_unreadable_state(base, data, tmp_path):
    """--resume compared the data file's path only: a file edited since the checkpoint continued the
    run on other records. And a damaged training_state.pt gave torch's bare 'PytorchStreamReader
    failed reading zip archive' without naming the file."""
    from pyllm.errors import PyllmError

    mine = tmp_path / "data.json"
    shutil.copy(data, mine)
    out = str(tmp_path / "run")
    extra = ["--batch-size", "2", "--micro-batch-size", "2", "--max-steps", "2", "--save-steps", "1",
             "--val-set-size", "0"]
    run(train_args(base, str(mine), out, *extra))
    records = json.loads(mine.read_text())
    mine.write_text(json.dumps(records[::-1]))  # the same records, another order: other batches
    with pytest.raises(ValueError, match=r"other settings: the data file's content \(edited since the checkpoint\)"):
        run(train_args(base, str(mine), out, *extra, "--resume", "--max-steps", "3"))
    mine.write_text(json.dumps(records))
    state = os.path.join(out, "checkpoint-2", "training_state.pt")
    with open(state, "r+b") as f:
        f.write(b"garbage!" * 64)
    with pytest.raises(PyllmError, match="training_state.pt cannot be read"):
        run(train_args(base, str(mine), out, *extra, "--resume", "--max-steps", "3"))
    # the same content under another path (a moved project, a copy) resumes: it was refused as "data ... -> ..."
    moved = tmp_path / "moved.json"
    shutil.copy(data, moved)
    run(train_args(base, str(moved), out, *extra, "--resume", os.path.join(out, "checkpoint-1"), "--max-steps", "3"))


@pytest.mark.parametrize("error, status, line", [
    (KeyError("lora_A"), 1, "pyllm train: error: KeyError: 'lora_A'"),
    (ValueError("bad"), 1, "pyllm train: error: bad"),
    (KeyboardInterrupt(), 130, ""),
])
def test_python_m_pyllm_train_reports_any_failure_as_pyllm_train_does(base, data, tmp_path, monkeypatch, capsys,
                                                                     error, status, line):
    """python -m pyllm.train (what torchrun runs) caught only ValueError, OSError and RuntimeError: a
    library's other errors (KeyError, TypeError, ...) printed a traceback. It now shares `pyllm`'s
    handling (cli.report_errors): one line, status 1; Ctrl-C 130."""
    from pyllm.train import loop, main

    def fail(args):
        raise error

    monkeypatch.setattr(loop, "train", fail)
    assert main([base, "--data", data, "-o", str(tmp_path / "out"), "-q"]) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == line


def test_a_cutoff_past_a_rotary_model_s_trained_context_is_warned_about(base, data, tmp_path, capsys):
    """A rotary model trains past its max_position_embeddings without an error (as transformers does),
    but those positions are ones it never learned: like `pyllm run` / `perplexity` for --ctx, train
    says so when --cutoff-len (plus prompt learning's virtual tokens) passes it, and not otherwise."""
    small = ["--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "1"]
    run(train_args(base, data, str(tmp_path / "a"), *small, "--cutoff-len", "1000"))
    assert "warning: --cutoff-len 1000 exceeds the 256 tokens the model was trained on" in capsys.readouterr().err
    run(train_args(base, data, str(tmp_path / "b"), *small, "--cutoff-len", "250", "--method", "prompt",
                   "--virtual-tokens", "8"))
    err = capsys.readouterr().err
    assert "warning: --cutoff-len 250 + 8 virtual tokens exceeds the 256 tokens" in err
    # the printed command holds the virtual tokens too (it never gave --ctx: `trained` was the model by then)
    assert "--ctx 258 -p PROMPT" in err
    run(train_args(base, data, str(tmp_path / "c"), *small, "--cutoff-len", "256"))
    assert "warning" not in capsys.readouterr().err


def test_save_total_limit_keeps_the_newest_checkpoints_and_resumes_from_them(base, data, tmp_path):
    """--save-total-limit N (transformers' save_total_limit) deletes the oldest checkpoints as new ones
    are saved (--save-steps 1 kept every one: 663 directories in a review's run); --resume still
    finds the newest; without --save-steps the option would do nothing, so it is refused."""
    out = tmp_path / "a"
    small = ["--batch-size", "4", "--micro-batch-size", "4", "--save-steps", "1"]
    run(train_args(base, data, str(out), *small, "--max-steps", "5", "--save-total-limit", "2"))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-5"]
    run(train_args(base, data, str(out), *small, "--max-steps", "7", "--save-total-limit", "2", "--resume"))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-6", "checkpoint-7"]
    with pytest.raises(ValueError, match="--save-total-limit 2 limits the checkpoints --save-steps N makes"):
        run(train_args(base, data, str(tmp_path / "b"), "--max-steps", "1", "--save-total-limit", "2"))
    with pytest.raises(ValueError, match="--save-total-limit"):
        run(train_args(base, data, str(tmp_path / "c"), *small, "--max-steps", "1", "--save-total-limit", "-1"))


def test_summary_line_counts_one_step_in_the_singular():
    """A one-step run said "trained 1 steps ... (mean of the last 1 steps ...)"."""
    from pyllm.train.loop import TrainResult, summary_line

    assert summary_line(TrainResult("out", 1, losses=[1.0]), 2.0) == \
        "trained 1 step in 2.0 s; final training loss 1.0000 (mean of the last 1 step 1.0000)"
    assert summary_line(TrainResult("out", 2, losses=[1.0, 2.0]), 2.0).startswith("trained 2 steps in 2.0 s")


def test_the_usage_line_gives_a_context_that_holds_the_virtual_tokens():
    """300 virtual tokens trained on a 256-position model: the printed `pyllm run` command failed every
    prompt ("the prompt has 129 tokens after 300 virtual ones; the context holds 256"); it now gives --ctx."""
    import argparse

    from pyllm.train.loop import usage_line

    args = argparse.Namespace(base="base", template="alpaca", method="prefix", virtual_tokens=300, cutoff_len=256)
    assert usage_line(args, "out/task", 256).endswith("pyllm run tasks.pllm --adapter task --chat-template alpaca "
                                                      "--ctx 556 -p PROMPT")
    assert "--ctx" not in usage_line(args, "out/task", 8192) and "--ctx" not in usage_line(
        argparse.Namespace(base="base", template="alpaca", method="lora", cutoff_len=4096), "out", 256)


def test_a_run_that_ends_at_uniform_guessing_is_warned_of():
    """--lr 1e6 without --max-grad-norm: every value stayed finite (the diverged-run check passed) and the
    loss ended at ln(vocabulary), the model predicting nothing, with exit 0 and no word of it."""
    import math

    from pyllm.train.loop import TrainResult, collapse_warning

    wrecked = TrainResult(output="o", steps=3, losses=[2.1, 5.9, math.log(512)])
    assert "ended at 6.2383, that of uniform guessing over the 512 tokens" in collapse_warning(wrecked, 512)
    above = TrainResult(output="o", steps=3, losses=[2.1, 5.9, 10.0])  # (it was called uniform's too)
    assert "ended at 10.0000, above that of uniform guessing" in collapse_warning(above, 512)
    assert collapse_warning(TrainResult(output="o", steps=3, losses=[2.1, 1.9, 1.7]), 512) is None
    # a model that starts near ln V (random weights) and stays there is no collapse
    assert collapse_warning(TrainResult(output="o", steps=2, losses=[6.2, 6.2]), 512) is None


def test_tokenizing_many_records_shows_progress(base, data, tmp_path, monkeypatch, capsys):
    """A million records took 3 minutes to tokenize without a word before the first step; past
    TOKENIZE_PROGRESS_RECORDS records a bar says how far it is (not under -q)."""
    from pyllm.train import loop

    monkeypatch.setattr(loop, "TOKENIZE_PROGRESS_RECORDS", 1)
    argv = ["train", base, "--data", data, "-o", str(tmp_path / "o"), "--max-steps", "1", "--batch-size", "2",
            "--micro-batch-size", "2"]
    assert cli.main(argv) == 0
    assert re.search(r"tokenizing: 100%.* \d+/\d+", capsys.readouterr().err)
    assert cli.main([*argv, "-q"]) == 0 and "tokenizing:" not in capsys.readouterr().err


def test_a_rank_past_the_models_width_is_warned_of(base, data, tmp_path, capsys):
    """-r 100000 on a 64-wide model trained 35 s a step into a 782 MB adapter without a word: a rank past
    min(in, out) of a layer adds nothing a smaller one could not hold."""
    argv = ["train", base, "--data", data, "-o", str(tmp_path / "o"), "--max-steps", "1", "--batch-size", "2",
            "--micro-batch-size", "2", "-q"]
    assert cli.main([*argv, "-r", "65"]) == 0
    assert "warning: --lora-r 65 exceeds the model's width (64)" in capsys.readouterr().err
    assert cli.main([*argv, "-r", "64"]) == 0 and "exceeds the model's width" not in capsys.readouterr().err
