"""How long `pyllm convert` takes, phase by phase, and what the files score.

    python benchmarks/convert_speed.py [--models smollm2,random-1.1b] [--quants int4,int8] [-r 3]
                                       [--reference DIR] [--texts FILE,...] [--windows 24] [-t 2]

Each conversion runs `pyllm convert SOURCE -o FILE --quant Q` (the defaults: GPTQ calibrated on
the built-in text, --quant int4 choosing layouts per matrix) in a fresh process, so that nothing
is cached between repetitions; the table gives the median (min-max) of -r runs of the wall time,
the process's CPU time (user + system, all threads), the phases the converter reports (float32
copy and calibration forward, layout choice, GPTQ, writing) and the source's MB/s.

Models: smollm2 is SmolLM2-135M-Instruct as the Hugging Face checkpoint of its GGUF's weights
(tools/reference_checkpoint.py); random-1.1b has TinyLlama-1.1B's shapes with random weights
(the F16 GGUF that benchmarks/compare.py writes, converted from there).

--reference DIR: files of the same names (MODEL-QUANT.pllm) made by another pyllm (the slow path
before a change, e.g. `git worktree add ../old <commit>` and this script with --out there); the
perplexity of both files is printed per text (--texts, default: pyllm perplexity's default text),
so that a faster converter is seen to give the same quality. Perplexity: `pyllm perplexity
FILE -c 512 --windows N` (second halves of each window scored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "tools"))

WORKER = """
import json, sys
from dataclasses import asdict
from pyllm.convert import convert_checkpoint
from pyllm.convert.strategy import options_from_flags
src, out, quant = sys.argv[1:4]
report = convert_checkpoint(src, out, quant, options=options_from_flags(quant, None, False, 0, None), progress=False)
print(json.dumps(asdict(report)))
"""


def source_for(model: str) -> str:
    if model == "smollm2":
        from reference_checkpoint import default_reference_checkpoint

        return default_reference_checkpoint()
    if model == "random-1.1b":  # the file benchmarks/compare.py writes, in its work directory
        from compare import random_1b_gguf

        return random_1b_gguf(os.path.join(os.path.expanduser("~/.cache/pyllm/bench"), "random-1.1b-F16.gguf"))
    raise SystemExit(f"unknown model {model!r} (smollm2, random-1.1b)")


def convert_once(src: str, out: str, quant: str, threads: int) -> dict:
    """One conversion in a fresh process: the report as a dict, plus wall and CPU seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    before = os.times()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WORKER, src, out, quant], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = os.times()
    if done.returncode != 0:
        raise SystemExit(f"conversion failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["wall"] = wall
    report["cpu"] = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return report


def perplexity_of(path: str, text: str | None, windows: int, threads: int) -> float:
    cmd = [sys.executable, "-m", "pyllm", "perplexity", path, "-c", "512", "--windows", str(windows), "-t", str(threads)]
    if text:
        cmd += ["--text", text]
    done = subprocess.run(cmd, capture_output=True, text=True)
    match = re.search(r"perplexity[^0-9]*([0-9.]+)", done.stdout + done.stderr, re.IGNORECASE)
    if done.returncode != 0 or not match:
        raise SystemExit(f"perplexity failed on {path}:\n{(done.stdout + done.stderr)[-2000:]}")
    return float(match.group(1))


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2")
    ap.add_argument("--quants", default="int4,int8")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.expanduser("~/.cache/pyllm/convert-speed"),
                    help="where the converted files are written (MODEL-QUANT.pllm)")
    ap.add_argument("--reference", help="directory of the same files made by another pyllm (perplexity compared)")
    ap.add_argument("--texts", default="", help="comma-separated text files for the perplexity check")
    ap.add_argument("--windows", type=int, default=24)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; -t {args.threads}",
          file=sys.stderr)
    rows = []
    for model in args.models.split(","):
        src = source_for(model)
        for quant in args.quants.split(","):
            out = os.path.join(args.out, f"{model}-{quant}.pllm")
            runs = []
            for r in range(args.repetitions):
                runs.append(convert_once(src, out, quant, args.threads))
                print(f"{model} {quant} run {r + 1}: {runs[-1]['wall']:.1f} s", file=sys.stderr)
            phases = {name: [run["phases"].get(name, 0.0) for run in runs] for name in runs[0]["phases"]}
            mbps = [run["source_bytes"] / 1e6 / run["wall"] for run in runs]
            rows.append((model, quant, spread([x["wall"] for x in runs]), spread([x["cpu"] for x in runs]),
                         ", ".join(f"{n} {statistics.median(v):.1f}" for n, v in phases.items()),
                         f"{statistics.median(mbps):.1f}", f"{runs[0]['file_size'] / 1e6:.1f}"))
            if args.reference:
                ref = os.path.join(args.reference, os.path.basename(out))
                for text in (args.texts.split(",") if args.texts else [None]):
                    new, old = (perplexity_of(p, text, args.windows, args.threads) for p in (out, ref))
                    print(f"{model} {quant} perplexity on {text or 'default text'}: this {new:.4f}, reference "
                          f"{old:.4f} ({100 * (new / old - 1):+.2f}%)")
    print("| model | --quant | wall s | CPU s | phases (median s) | source MB/s | file MB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
