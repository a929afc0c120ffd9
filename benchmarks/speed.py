"""Prefill and decode speed of a .pllm model (median of repetitions), tokenization and sampling excluded.

    python benchmarks/speed.py MODEL.pllm [-p 512] [-n 128] [-r 3] [-t 2]

Decode runs greedy single-token steps through the KV cache after a prefill of -p tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import pyllm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("-t", type=int, default=2)
    args = ap.parse_args()
    llm = pyllm.LLM(args.model, n_threads=args.t, context_length=args.p + args.n + 1)
    prompt = np.random.default_rng(0).integers(100, llm.config.vocab_size - 100, args.p).astype(np.int32)
    prefill, decode = [], []
    for _ in range(args.r):
        start = time.perf_counter()
        logits = llm.engine.forward(prompt, 0, False)
        prefill.append(args.p / (time.perf_counter() - start))
        start = time.perf_counter()
        for i in range(args.n):
            logits = llm.engine.forward(np.array([int(np.argmax(logits))], dtype=np.int32), args.p + i, False)
        decode.append(args.n / (time.perf_counter() - start))
    print(f"{args.model}: {args.t} threads, kernels {pyllm._core.active_kernels()}")
    print(f"prefill {args.p}: {statistics.median(prefill):.1f} tok/s (min {min(prefill):.1f}, max {max(prefill):.1f})")
    print(f"decode {args.n}: {statistics.median(decode):.1f} tok/s (min {min(decode):.1f}, max {max(decode):.1f})")


if __name__ == "__main__":
    main()
