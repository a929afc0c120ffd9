"""Prefill and decode speed of a .pllm model, optionally beside llama.cpp on a GGUF file, in one run.

    python benchmarks/speed.py MODEL.pllm [--gguf MODEL.gguf] [-p 512] [-n 128] [-r 3] [-t 2]

Both engines get the same random token ids; runs alternate between engines and the median of -r
repetitions is reported (min and max beside it). Prefill: one call over -p tokens in a fresh
context. Decode: -n greedy single-token steps through the KV cache after that prefill.
Tokenization and sampling are excluded. llama-cpp-python is a benchmark-only dependency.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

import pyllm
from pyllm import _core


def pyllm_runner(path: str, p: int, n: int, threads: int):
    llm = pyllm.LLM(path, n_threads=threads, context_length=p + n + 1)

    def run(prompt):
        start = time.perf_counter()
        logits = llm.engine.forward(np.asarray(prompt, dtype=np.int32), 0, False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(n):
            logits = llm.engine.forward(np.array([int(np.argmax(logits))], dtype=np.int32), p + i, False)
        return prefill, time.perf_counter() - start

    return run


def llama_cpp_runner(path: str, p: int, n: int, threads: int):
    from llama_cpp import Llama

    n_ctx = -(-(p + n + 1) // 256) * 256  # llama.cpp pads the context to 256
    model = Llama(path, n_ctx=n_ctx, n_batch=p, n_ubatch=p, n_threads=threads, n_threads_batch=threads,
                  verbose=False)

    n_vocab = model.n_vocab()

    def last_logits():  # without logits_all, llama.cpp keeps only the last token's row
        return np.ctypeslib.as_array(model._ctx.get_logits(), shape=(n_vocab,))

    def run(prompt):
        model.reset()
        start = time.perf_counter()
        model.eval(list(prompt))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n):
            model.eval([int(np.argmax(last_logits()))])
        return prefill, time.perf_counter() - start

    return run


def summary(rates: list[float]) -> str:
    return f"{statistics.median(rates):7.1f} ({min(rates):.1f}-{max(rates):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--gguf", help="a GGUF file to run with llama.cpp in the same run")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("-t", type=int, default=2)
    args = ap.parse_args()
    engines = {"pyllm " + os.path.basename(args.model): pyllm_runner(args.model, args.p, args.n, args.t)}
    if args.gguf:
        import llama_cpp

        engines[f"llama.cpp {llama_cpp.__version__} " + os.path.basename(args.gguf)] = llama_cpp_runner(
            args.gguf, args.p, args.n, args.t)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 49000, args.p)
    results = {name: ([], []) for name in engines}
    for name, run in engines.items():  # warm-up: page in the weights
        run(prompt[:16] if args.p > 16 else prompt)
    for _ in range(args.r):
        for name, run in engines.items():
            prefill, decode = run(prompt)
            results[name][0].append(args.p / prefill)
            results[name][1].append(args.n / decode)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.t} threads, "
          f"pyllm kernels: {_core.active_kernels()}, median (min-max) of {args.r}")
    print(f"| engine | prefill {args.p} tok/s | decode {args.n} tok/s |")
    print("|---|---|---|")
    for name, (pp, tg) in results.items():
        print(f"| {name} | {summary(pp)} | {summary(tg)} |")
    if len(results) == 2:
        (a_pp, a_tg), (b_pp, b_tg) = results.values()
        print(f"| ratio pyllm / llama.cpp | {statistics.median(a_pp) / statistics.median(b_pp):.2f}x | "
              f"{statistics.median(a_tg) / statistics.median(b_tg):.2f}x |")


if __name__ == "__main__":
    main()
