"""The examples a user copies from README.md and docs/*.md, checked against the code so the docs cannot
rot: every `pyllm ...` command line of a ```sh block is parsed by the CLI's own parser (a flag renamed
or removed fails here), and README's Python example runs on a tiny model built in-test."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shlex

import pytest

from pyllm import cli

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# what stands for "the rest of an earlier command" in the docs (`pyllm train ... --resume`)
ELLIPSIS_ARGS = {"train": ["./hf-model", "--data", "data.json", "-o", "adapter"]}


def code_blocks(path: str, language: str) -> list[tuple[int, str]]:
    """(first line number, text) of each ```language block of a Markdown file."""
    text = open(path, encoding="utf-8").read()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(rf"^```{language}\n(.*?)^```", text, re.S | re.M)]


def pyllm_commands(path: str) -> list[tuple[str, list[str]]]:
    """('FILE:LINE', argv after `pyllm`) of every pyllm command in the file's ```sh blocks; `torchrun ... -m
    pyllm.train` is `pyllm train`. Comments, environment assignments, pipes into pyllm and `&&` chains are
    taken apart; an optional part written `[--flag value]` is given."""
    commands = []
    for first, block in code_blocks(path, "sh"):
        lines = block.split("\n")
        number = 0
        while number < len(lines):
            where, line = f"{os.path.basename(path)}:{first + number}", lines[number]
            while line.rstrip().endswith("\\") and number + 1 < len(lines):  # a continued line
                number += 1
                line = line.rstrip()[:-1] + " " + lines[number]
            number += 1
            line = re.sub(r"\[([^\]]*)\]", r"\1", line.split("  #")[0].split(" # ")[0])
            for part in re.split(r"&&|\|", line):
                words = shlex.split(part)
                if "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["pyllm.train"]:
                    words = ["pyllm", "train", *words[words.index("-m") + 2:]]
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words = words[1:]
                if words[:1] == ["pyllm"] and len(words) > 1:
                    argv = words[1:]
                    if "..." in argv:
                        at = argv.index("...")
                        argv = argv[:at] + ELLIPSIS_ARGS.get(argv[0], []) + argv[at + 1:]
                    commands.append((where, argv))
    return commands


COMMANDS = [command for path in DOCS for command in pyllm_commands(path)]


def test_the_docs_have_commands_to_check():
    """The extraction itself: README's commands are found (a change of the blocks' fence would make the
    check below pass on nothing)."""
    names = {argv[0] for _, argv in COMMANDS}
    assert {"convert", "run", "serve", "train", "perplexity", "bench", "list", "rm", "verify", "merge"} <= names
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[f"{w}:{a[0]}" for w, a in COMMANDS])
def test_every_documented_command_line_parses(where, argv):
    parser = cli.build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `pyllm {shlex.join(argv)}`: {err.getvalue().strip()}")
    # words after the model are a prompt for `run` only (cli.main); anywhere else they are an error
    assert not extra or (args.command == "run" and not any(e.startswith("-") for e in extra)), (where, extra)


def test_the_readme_python_example_runs(tiny_llama_f32, monkeypatch, capsys):
    """README's ```python block, as written but for the model's path, on a tiny model: every keyword it
    passes exists and every call returns. Its last statement (device="cuda") needs a CUDA build and a GPU:
    without them it is the RuntimeError the comment promises."""
    import pyllm

    [(_, code)] = code_blocks(os.path.join(ROOT, "README.md"), "python")
    assert code.count('"model.pllm"') == 2
    body, cuda = code.split("\ngpu = ")
    monkeypatch.chdir(os.path.dirname(tiny_llama_f32))
    os.replace(tiny_llama_f32, "model.pllm")
    try:
        exec(compile(body, "README.md", "exec"), {"__name__": "readme"})
        try:
            gpu = eval(cuda.split("#")[0], {"pyllm": pyllm})
        except RuntimeError as e:
            assert "cuda" in str(e).lower()
        else:
            gpu.close()
    finally:
        os.replace("model.pllm", tiny_llama_f32)
    out = capsys.readouterr().out
    assert "Prompt:" in out and "Generation:" in out  # stream.stats.line()


def test_every_file_the_docs_name_exists():
    """Scripts, modules and documents the docs point to (`python3 benchmarks/compare.py`, pyllm/adapters.py,
    tests/test_cuda.py, docs/SECURITY.md, ...) are there: a file renamed or removed fails here."""
    named = set()
    for path in DOCS:
        text = open(path, encoding="utf-8").read()
        named |= set(re.findall(r"\b(?:benchmarks|tools|pyllm|tests|csrc|docs)/[\w./-]+\.(?:py|sh|md|cpp|cuh|cu|h|json|txt)\b",
                                text))
    assert len(named) > 20
    missing = sorted(n for n in named if not os.path.exists(os.path.join(ROOT, n)))
    assert not missing, missing
