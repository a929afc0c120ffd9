"""Aggregate decode speed of several sequences sharing each engine step (Engine.forward_rows).

    python benchmarks/parallel_decode.py [MODEL] [--parallel 1,2,4,8,16] [-p 128] [-n 64] [-r 3] [-t 2]
        [--activation-quant int8x2[,int8x2_outliers,int8]] [--profile]

For each N: N sequences each get a prefill of -p random tokens (one forward_rows call over all of
them), then -n decode steps of one row per sequence. Reported: aggregate generated tokens/s
(N * n / decode seconds), the ratio to N = 1, and the per-sequence step latency; median of -r
repetitions, the values of every N (and every --activation-quant given, one engine each) measured
in turn within each repetition (so machine noise spreads over all of them alike). The engine is
called directly: no sampling, no Python generation loop (LLM.generate with a list adds those).
--profile (sets PYLLM_PROFILE=1) also gives the milliseconds per decode step of each forward stage,
median over the repetitions: stage times move less with the machine's noise than the step does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir))


def decode_seconds(engine, n_seq: int, n_prompt: int, n_gen: int, rng: np.random.Generator, vocab: int,
                   on_prefilled=None) -> float:
    """Seconds of n_gen decode steps over n_seq sequences after their prefill (on_prefilled() called
    between the two)."""
    prompt = rng.integers(0, vocab, n_seq * n_prompt).astype(np.int32)
    seqs = np.repeat(np.arange(n_seq, dtype=np.int32), n_prompt)
    positions = np.tile(np.arange(n_prompt, dtype=np.int32), n_seq)
    engine.forward_rows(prompt, seqs, positions, np.arange(n_prompt - 1, n_seq * n_prompt, n_prompt))
    if on_prefilled is not None:
        on_prefilled()
    ids = rng.integers(0, vocab, (n_gen, n_seq)).astype(np.int32)
    all_rows = np.arange(n_seq)
    start = time.perf_counter()
    for step in range(n_gen):
        engine.forward_rows(ids[step], all_rows.astype(np.int32),
                            np.full(n_seq, n_prompt + step, dtype=np.int32), all_rows)
    return time.perf_counter() - start


def main(argv=None) -> int:
    from pyllm import LLM
    from pyllm.llm import ACTIVATION_QUANTS
    from pyllm.bench import cpu_name

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="a .pllm file (default: the default model)")
    p.add_argument("--parallel", default="1,2,4,8,16", help="sequence counts (default 1,2,4,8,16)")
    p.add_argument("-p", "--n-prompt", type=int, default=128)
    p.add_argument("-n", "--n-gen", type=int, default=64)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--activation-quant", default="int8x2",
                   help=f"LLM's activation_quant, or several separated by commas, compared side by side: "
                        f"{', '.join(ACTIVATION_QUANTS)} (default int8x2)")
    p.add_argument("--profile", action="store_true", help="also ms per decode step of each forward stage")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.profile:
        os.environ["PYLLM_PROFILE"] = "1"  # read by each engine as it is made
    path = args.model
    if path is None:
        from pyllm.default_model import default_model_path

        path = default_model_path()
    counts = [int(c) for c in args.parallel.split(",")]
    modes = args.activation_quant.split(",")
    if any(m not in ACTIVATION_QUANTS for m in modes) or len(set(modes)) != len(modes):
        p.error(f"--activation-quant: distinct names among {', '.join(ACTIVATION_QUANTS)}")
    llms = {m: LLM(path, n_threads=args.threads, context_length=args.n_prompt + args.n_gen, n_parallel=max(counts),
                   activation_quant=m) for m in modes}
    rng = np.random.default_rng(0)
    vocab = llms[modes[0]].config.vocab_size
    for llm in llms.values():
        decode_seconds(llm.engine, max(counts), 16, 4, rng, vocab)  # warm-up
    samples: dict[str, dict[int, list[float]]] = {m: {n: [] for n in counts} for m in modes}
    stages: dict[str, dict[int, list[dict[str, float]]]] = {m: {n: [] for n in counts} for m in modes}
    for _ in range(args.repetitions):
        for n in counts:
            for m in modes:
                engine, prefilled = llms[m].engine, {}
                seconds = decode_seconds(engine, n, args.n_prompt, args.n_gen, rng, vocab,
                                         (lambda: prefilled.update(engine.profile())) if args.profile else None)
                samples[m][n].append(n * args.n_gen / seconds)
                if args.profile:
                    stages[m][n].append({k: 1000 * (v - prefilled[k]) / args.n_gen for k, v in engine.profile().items()})
    median = {m: {n: statistics.median(v) for n, v in by_n.items()} for m, by_n in samples.items()}
    stage_ms = {m: {n: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for n, runs in by_n.items() if runs}
                for m, by_n in stages.items()}
    threads = llms[modes[0]].n_threads
    result = {"model": os.path.abspath(path), "cpu": cpu_name(), "threads": threads, "n_prompt": args.n_prompt,
              "n_gen": args.n_gen, "repetitions": args.repetitions,
              "aggregate_tokens_per_s": {m: {str(n): v for n, v in by_n.items()} for m, by_n in samples.items()}}
    if args.profile:
        result["stage_ms_per_step"] = {m: {str(n): v for n, v in by_n.items()} for m, by_n in stage_ms.items()}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{os.path.basename(path)}; {cpu_name()}, {threads} threads; prefill {args.n_prompt}, {args.n_gen} decode "
          f"steps, median of {args.repetitions}\n")
    print(f"| activations | sequences | aggregate tok/s | x one sequence | x {modes[0]} | ms per step |")
    print("|---|---|---|---|---|---|")
    for m in modes:
        for n in counts:
            print(f"| {m} | {n} | {median[m][n]:.1f} | {median[m][n] / median[m][counts[0]]:.2f} | "
                  f"{median[m][n] / median[modes[0]][n]:.2f} | {1000 * n / median[m][n]:.1f} |")
    if args.profile:
        names = list(next(iter(stage_ms[modes[0]].values())))
        print(f"\nms per decode step by stage (PYLLM_PROFILE=1), median of {args.repetitions}\n")
        print("| activations | sequences | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for m in modes:
            for n in counts:
                print(f"| {m} | {n} | " + " | ".join(f"{stage_ms[m][n][k]:.3f}" for k in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
