"""`pyllm train`: parameter-efficient fine-tuning (LoRA, prompt tuning, P-tuning, prefix tuning) of a Hugging
Face checkpoint on Alpaca-format data (torch, transformers, peft).

    pyllm train BASE_HF_DIR --data data.json -o ADAPTER_DIR
    torchrun --nproc_per_node N -m pyllm.train BASE_HF_DIR --data data.json -o ADAPTER_DIR

data.py reads and tokenizes the data (no torch); loop.py is the training loop. Importing this
package does not import torch: only running a training does.
"""

from __future__ import annotations

import argparse

TRAIN_REQUIREMENTS = "pip install 'pyllm[train]' (torch, transformers, peft)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="Hugging Face model directory to fine-tune (stays frozen)")
    p.add_argument("--data", required=True, metavar="FILE", help="Alpaca-format data: a JSON list or JSON Lines of "
                   "{instruction, input, output}")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="adapter directory (PEFT format; checkpoints go inside)")
    g = p.add_argument_group("prompt")
    g.add_argument("--template", choices=["alpaca", "chat"], default="alpaca",
                   help="Stanford Alpaca's prompt (default), or the base model's chat template")
    g.add_argument("--train-on-inputs", action="store_true", help="take the loss on the prompt too (default: on the response only)")
    g.add_argument("--cutoff-len", type=int, default=256, metavar="N", help="tokens per example at most (default 256)")
    g.add_argument("--tokenizer", metavar="DIR", help="a tokenizer directory with a larger vocabulary (embeddings are resized; "
                   "needs --modules-to-save embed_tokens,lm_head) (default: the base model's)")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["lora", "prompt", "ptuning", "prefix"], default="lora",
                   help="lora (default); prompt tuning; P-tuning (a prompt encoder); prefix tuning. The last three "
                        "train virtual tokens only and are run by pyllm from the base file with "
                        "`pyllm convert BASE --adapter DIR` (they cannot be merged into weights)")
    g.add_argument("--virtual-tokens", type=int, default=20, metavar="N",
                   help="prompt/ptuning/prefix: virtual tokens (default 20)")
    g.add_argument("--prompt-init-text", default="", metavar="TEXT",
                   help="prompt: initialise the virtual tokens from this text's embeddings (default: random)")
    g.add_argument("--encoder", choices=["mlp", "lstm"], default="mlp", help="ptuning: the prompt encoder (default mlp)")
    g.add_argument("--encoder-hidden-size", type=int, default=128, metavar="N",
                   help="ptuning and prefix --prefix-projection: the encoder's hidden size (default 128)")
    g.add_argument("--prefix-projection", action="store_true",
                   help="prefix: learn the prefix through a two-layer MLP (PEFT's prefix_projection) (default: off)")
    g = p.add_argument_group("LoRA")
    g.add_argument("-r", "--lora-r", type=int, default=8, metavar="R", help="LoRA rank (default 8)")
    g.add_argument("--lora-alpha", type=float, default=16, metavar="ALPHA",
                   help="LoRA scale numerator: alpha/r (default 16; negative allowed, as in PEFT; 0 refused)")
    g.add_argument("--lora-dropout", type=float, default=0.05, metavar="P", help="dropout on the LoRA input (default 0.05)")
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r (default: alpha/r)")
    g.add_argument("--target-modules", default="", metavar="NAMES",
                   help="comma-separated module names (default: every attention and MLP projection under the "
                        "family's names, e.g. q_proj,...,down_proj for LLaMA, c_attn,c_proj,c_fc for GPT-2)")
    g.add_argument("--layers", default="",
                   help="LoRA only in these decoder layers, e.g. 20-29 or 0,5,9 (default: all); training "
                        "only upper layers also saves the backward pass through the lower ones")
    g.add_argument("--modules-to-save", default="", metavar="NAMES", help="modules trained in full and saved, e.g. embed_tokens,lm_head (default: none)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=32, metavar="N", help="examples per optimiser step, over all processes (default 32)")
    g.add_argument("--micro-batch-size", type=int, default=4, metavar="N", help="examples per forward pass (per process) (default 4)")
    g.add_argument("--epochs", type=float, default=3, metavar="N", help="passes over the training data (default 3)")
    g.add_argument("--max-steps", type=int, default=None, metavar="N", help="optimiser steps (overrides --epochs; with --resume, more steps extend the run) (default: from --epochs)")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    g.add_argument("--lr-scheduler", choices=["linear", "cosine", "constant"], default="linear",
                   help="learning-rate decay after the warm-up (default linear)")
    g.add_argument("--warmup-steps", type=int, default=0, metavar="N", help="steps of linear warm-up (default 0)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default 1.0)")
    g.add_argument("--seed", type=int, default=42, help="seed of the data order, split and LoRA init (default 42)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="base weights: float32 or bfloat16 on CPU, bfloat16 or float16 on GPU "
                        "(default auto: float32 on CPU, bfloat16 on GPU); LoRA weights stay float32")
    g.add_argument("--device", default="auto", metavar="DEVICE", help="cpu, cuda (default auto: cuda when available)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--val-set-size", type=float, default=0, metavar="N",
                   help="held-out examples for the eval loss: a count, or a fraction below 1 (default 0: none)")
    g.add_argument("--eval-steps", type=int, default=0, metavar="N", help="eval loss every N steps, on the --val-set-size examples (default 0: at the start and the end)")
    g.add_argument("--save-steps", type=int, default=0, metavar="N", help="checkpoint every N steps and at the last (default 0: none)")
    g.add_argument("--save-total-limit", type=int, default=0, metavar="N",
                   help="keep only the N newest checkpoints, deleting older ones as new ones are saved "
                        "(transformers' save_total_limit; default 0: keep all)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                   help="resume from a checkpoint directory (default: the latest in --output)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar (default: shown)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyllm.train", description="LoRA fine-tuning on Alpaca-format data")
    add_arguments(p)
    return p


def run(args):
    """Trains as the arguments say; returns the TrainResult (loss history, eval losses)."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"training needs torch, transformers and peft ({e}); {TRAIN_REQUIREMENTS}") from None
    from .loop import train

    return train(args)


def main(argv: list[str] | None = None) -> int:
    from ..cli import report_errors

    args = build_parser().parse_args(argv)

    def train() -> int:
        run(args)
        return 0

    return report_errors("train", train)  # as `pyllm train`: a failure is one line, no traceback
