"""Perplexity of SmolLM2-135M-Instruct in every pyllm format, beside llama.cpp on the same weights and text.

    python benchmarks/quality.py [--windows 24] [--ctx 512] [--threads 2] [--out docs/QUALITY.md]

Protocol (llama.cpp's perplexity tool): the text of Python's documentation topics
(pydoc_data.topics, values sorted by key, joined by blank lines), non-overlapping windows of
--ctx tokens, the second half of each window scored. Every engine sees the same token ids.

Weights: the default model's GGUF (Q4_1 matrices, Q8_0 embeddings), dequantized to f32: that is
the "f32" model of every row. pyllm files are converted from a Hugging Face checkpoint of those
f32 weights (made with transformers' GGUF loader); llama.cpp files from an F32 GGUF of the same
weights, quantized with llama.cpp's own quantizer. llama-cpp-python is a benchmark-only
dependency (pip install llama-cpp-python==0.3.36, built natively).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

import pyllm
from pyllm import default_model
from pyllm.convert import convert_checkpoint
from pyllm.perplexity import default_text, perplexity

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tools"))
from llama_gguf import dequantized_gguf, llama_cpp_quantize  # noqa: E402
from reference_checkpoint import default_reference_checkpoint  # noqa: E402

PYLLM_VARIANTS = [  # (label, quant, group size)
    ("f32", "f32", 32), ("f16", "f16", 32), ("int8 g32", "int8", 32), ("int8 g128", "int8", 128),
    ("int4 asym g32", "int4_asym", 32), ("int4 asym g64", "int4_asym", 64), ("int4 asym g128", "int4_asym", 128),
    ("int4 sym g32", "int4_sym", 32), ("int4 sym g128", "int4_sym", 128),
]
LLAMA_VARIANTS = ["F32", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M"]


def llama_cpp_files(f32_path: str, work: str) -> dict[str, str]:
    files = {"F32": f32_path}
    for name in LLAMA_VARIANTS[1:]:
        files[name] = llama_cpp_quantize(f32_path, os.path.join(work, f"smollm2-{name}.gguf"), name)
    return files


def llama_cpp_logits_fn(path: str, ctx: int, threads: int):
    from llama_cpp import Llama

    model = Llama(path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=threads, verbose=False)

    def logits(ids):
        model.reset()
        model.eval(ids)
        return np.array(model.scores[: len(ids)], dtype=np.float32)

    return model, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(default_model.cache_dir(), "bench"))
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)

    hf_dir = default_reference_checkpoint()
    rows = []
    tokens = None
    for label, quant, group in PYLLM_VARIANTS:
        path = os.path.join(args.work, f"smollm2-{quant}-g{group}.pllm")
        report = convert_checkpoint(hf_dir, path, quant=quant, group_size=group, progress=False)
        llm = pyllm.LLM(path, n_threads=args.threads, context_length=args.ctx)
        if tokens is None:
            tokens = llm.tokenize(default_text(), add_special_tokens=False)
        start = time.perf_counter()
        result = perplexity(llm.logits, tokens, ctx=args.ctx, windows=args.windows)
        rows.append(("pyllm", label, report.bits_per_weight, result.perplexity, time.perf_counter() - start))
        print(rows[-1], flush=True)
        llm.close()
    if not args.no_llama_cpp:
        import llama_cpp

        files = llama_cpp_files(dequantized_gguf(default_model.fetch_gguf(), os.path.join(args.work, "smollm2-F32.gguf")),
                                args.work)
        bits = {"F32": 32.0, "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q4_K_M": float("nan")}
        for name, path in files.items():
            model, fn = llama_cpp_logits_fn(path, args.ctx, args.threads)
            start = time.perf_counter()
            result = perplexity(fn, tokens, ctx=args.ctx, windows=args.windows)
            rows.append((f"llama.cpp {llama_cpp.__version__}", name, bits[name], result.perplexity,
                         time.perf_counter() - start))
            print(rows[-1], flush=True)
            del model
    base = rows[0][3]
    lines = [
        "| engine | format | bits/weight (linear layers) | perplexity | vs pyllm f32 |",
        "|---|---|---|---|---|",
    ]
    for engine, label, bpw, ppl, _ in rows:
        bpw_text = "mixed" if bpw != bpw else f"{bpw:.2f}"
        lines.append(f"| {engine} | {label} | {bpw_text} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% |")
    table = "\n".join(lines)
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
              f"{args.threads} threads; first {args.windows} windows of {args.ctx} tokens.\n\n"
              f"Command: `python benchmarks/quality.py --windows {args.windows} --ctx {args.ctx} "
              f"--threads {args.threads} --out docs/QUALITY.md`\n")
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("# Quality: perplexity of SmolLM2-135M-Instruct\n\n" + (__doc__ or "").split("\n\n", 1)[1]
                    + "\n" + header + "\n" + table + "\n")


if __name__ == "__main__":
    main()
