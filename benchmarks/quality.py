"""Perplexity of two test models in every pyllm format, beside llama.cpp on the same weights and text.

    python benchmarks/quality.py [--windows 24] [--ctx 512] [--threads 2] [--out docs/QUALITY.md]

Protocol (llama.cpp's perplexity tool): the text of Python's documentation topics
(pydoc_data.topics, values sorted by key, joined by blank lines), non-overlapping windows of
--ctx tokens, the second half of each window scored. Every engine sees the same token ids.

Models:
- smollm2: SmolLM2-135M-Instruct, the default model's GGUF (Q4_1 matrices, Q8_0 embeddings)
  dequantized to f32 by transformers' GGUF loader (tools/reference_checkpoint.py). Its matrices sit
  on an asymmetric group-32 int4 grid, which flatters group-32 asymmetric int4.
- rotated: the same model with RMSNorm weights folded into the linears, the residual stream
  rotated by a random orthogonal matrix (seed 0) and the embeddings untied
  (tools/rotated_model.py): the same function (same f32 perplexity) on weights off any 4-bit grid.

pyllm files are converted from these Hugging Face checkpoints with `pyllm convert`'s options
(the "command" column); llama.cpp files from an F32 GGUF of the same weights, quantized with
llama.cpp's own quantizer. llama-cpp-python is a benchmark-only dependency
(pip install llama-cpp-python==0.3.36, built natively). Results are cached in --work/quality.json
(keyed by model, row, windows and ctx), so an interrupted run resumes; --fresh ignores the cache.
pyllm runs with its default KV cache (f16 for every format but f32), llama.cpp with its own (f16).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

import pyllm
from pyllm import default_model
from pyllm.convert import convert_checkpoint
from pyllm.convert.strategy import options_from_flags
from pyllm.perplexity import default_text, perplexity

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tools"))
from llama_gguf import dequantized_gguf, llama_cpp_quantize  # noqa: E402
from reference_checkpoint import default_reference_checkpoint  # noqa: E402
from rotated_model import default_rotated_checkpoint, write_rotated_gguf  # noqa: E402

# (label, `pyllm convert` flags after the source and -o)
PYLLM_VARIANTS = [
    ("f32", "--quant f32"),
    ("f16", "--quant f16"),
    ("int8 g32, round-to-nearest", "--quant int8 --calib none"),
    ("int8 g32 default: GPTQ", "--quant int8"),
    ("int4 sym g32, round-to-nearest", "--quant int4_sym --group-size 32 --rtn"),
    ("int4 asym g64, round-to-nearest", "--quant int4_asym --group-size 64 --rtn"),
    ("int4 asym g64, scale search", "--quant int4_asym --group-size 64"),
    ("int4 asym g64, GPTQ", "--quant int4_asym --group-size 64 --calib builtin"),
    ("int4 layouts per matrix, scale search", "--quant int4 --calib none"),
    ("int4 default: layouts per matrix, GPTQ", "--quant int4"),
]
LLAMA_VARIANTS = ["F32", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M"]

NOTES = """
Reading the tables:
- bits/weight counts the matrices of the transformer blocks, scales and mins included. The
  embeddings and lm_head of every pyllm int8/int4 row are int8 group 32 (8.5 bits/weight; 28.3M
  weights for SmolLM2's tied table, twice that for the untied rotated model); llama.cpp's
  Q4_0/Q4_1/Q4_K_M keep its output tensor at Q6_K or Q8_0 (Q4_K_M's block matrices mix Q4_K,
  Q6_K and fallbacks for 576-wide rows, hence their bits/weight).
- round-to-nearest: min/max scales. scale search: per group, the scale (and min) minimising the
  squared error over a grid of shrink factors with least-squares refits (pyllm/quant.py); int4
  only (for int8 it raised SmolLM2's perplexity: +0.42% against +0.29% with min/max scales).
  GPTQ: error-compensating rounding with Hessians from the built-in calibration text
  (standard-library docstrings, disjoint from the evaluation text; pyllm/convert/calibrate.py).
  layouts per matrix: int4_sym/int4_asym at group 32/64/128 chosen per matrix by measured error
  under a 4.6 bits/weight budget (pyllm/convert/strategy.py).
- SmolLM2's own matrices sit on a Q4_1 grid (asymmetric, group 32), so "int4 asym g32" recovers
  them exactly; the rotated model shows what the same formats do on weights that never saw a grid.
- int8 targets +0.3%: GPTQ (the default of `pyllm convert --quant int8`) stays within it on both
  models; round-to-nearest sits at its edge on SmolLM2.
- Rows missing from a table above were not measured in that run (--rows); `python
  benchmarks/quality.py` with no --rows measures all of them (about 40 minutes on 2 cores, most of
  it GPTQ and the scale search; the built-in calibration runs once per model).
"""


def parse_flags(flags: str) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant")
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--rtn", action="store_true")
    ap.add_argument("--keep-sensitive", type=int, default=0)
    ap.add_argument("--bits", type=float, default=None)
    a = ap.parse_args(flags.split())
    return dict(quant=a.quant, group_size=a.group_size,
                options=options_from_flags(a.quant, a.calib, a.rtn, a.keep_sensitive, a.bits, a.group_size))


def gguf_linear_bits(path: str) -> float:
    """Bits per weight of a GGUF's transformer-block matrices (embeddings / output excluded)."""
    import gguf

    reader = gguf.GGUFReader(path)
    blocks = [t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8.0 * sum(int(t.n_bytes) for t in blocks) / sum(int(t.n_elements) for t in blocks)


def llama_cpp_logits_fn(path: str, ctx: int, threads: int):
    from llama_cpp import Llama

    model = Llama(path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=threads, verbose=False)

    def logits(ids):
        model.reset()
        model.eval(ids)
        return np.array(model.scores[: len(ids)], dtype=np.float32)

    return model, logits


def f32_gguf(model: str, hf_dir: str, work: str) -> str:
    if model == "smollm2":
        return dequantized_gguf(default_model.fetch_gguf(), os.path.join(work, "smollm2-F32.gguf"))
    return write_rotated_gguf(hf_dir, os.path.join(work, f"{model}-F32.gguf"), default_model.fetch_gguf())


class Cache:
    def __init__(self, path: str, fresh: bool):
        self.path = path
        self.data = {} if fresh or not os.path.exists(path) else json.load(open(path, encoding="utf-8"))

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        with open(self.path + ".partial", "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1)
        os.replace(self.path + ".partial", self.path)


def text_tokens(hf_dir: str) -> list[int]:
    """The evaluation text's token ids, as LLM.tokenize gives them (the checkpoint's tokenizer)."""
    from pyllm.convert.checkpoint import Checkpoint
    from pyllm.tokenizer import Tokenizer

    ckpt = Checkpoint(hf_dir)
    try:
        return Tokenizer(*ckpt.tokenizer()).encode(default_text(), add_special_tokens=False)
    finally:
        ckpt.close()


def measure_model(model: str, hf_dir: str, args, cache: Cache) -> list[tuple]:
    rows, tokens = [], text_tokens(hf_dir)
    for label, flags in PYLLM_VARIANTS:
        if args.rows and label.split(",")[0] not in args.rows and label not in args.rows:
            continue
        key = f"{model}|pyllm|{flags}|{args.windows}|{args.ctx}"
        if cache.get(key) is None and args.cached_only:
            continue
        if cache.get(key) is None:
            path = os.path.join(args.work, f"{model}-{flags.replace('--', '').replace(' ', '_')}.pllm")
            start = time.perf_counter()
            report = convert_checkpoint(hf_dir, path, progress=False, **parse_flags(flags))
            convert_s = time.perf_counter() - start
            with pyllm.LLM(path, n_threads=args.threads, context_length=args.ctx) as llm:
                result = perplexity(llm.logits, tokens, ctx=args.ctx, windows=args.windows)
            os.remove(path)
            cache.put(key, {"bits": report.bits_per_weight, "ppl": result.perplexity, "convert_s": convert_s})
        r = cache.get(key)
        rows.append(("pyllm", label, f"`pyllm convert {model} -o out.pllm {flags}`", r["bits"], r["ppl"]))
        print(model, rows[-1], flush=True)
    if args.no_llama_cpp:
        return rows
    import llama_cpp

    f32 = None
    for name in LLAMA_VARIANTS:
        if args.rows and name not in args.rows:
            continue
        key = f"{model}|llama.cpp {llama_cpp.__version__}|{name}|{args.windows}|{args.ctx}"
        if cache.get(key) is None and args.cached_only:
            continue
        if cache.get(key) is None:
            f32 = f32 or f32_gguf(model, hf_dir, args.work)
            path = f32 if name == "F32" else llama_cpp_quantize(f32, os.path.join(args.work, f"{model}-{name}.gguf"), name)
            llm_cpp, fn = llama_cpp_logits_fn(path, args.ctx, args.threads)
            result = perplexity(fn, tokens, ctx=args.ctx, windows=args.windows)
            del llm_cpp
            cache.put(key, {"bits": gguf_linear_bits(path), "ppl": result.perplexity})
        r = cache.get(key)
        rows.append((f"llama.cpp {llama_cpp.__version__}", name, "llama_model_quantize", r["bits"], r["ppl"]))
        print(model, rows[-1], flush=True)
    return rows


def table(rows: list[tuple]) -> str:
    base = rows[0][4]
    lines = ["| engine | format | bits/weight (linear layers) | perplexity | vs f32 |", "|---|---|---|---|---|"]
    for engine, label, _, bpw, ppl in rows:
        lines.append(f"| {engine} | {label} | {bpw:.2f} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="smollm2,rotated")
    ap.add_argument("--work", default=os.path.join(default_model.cache_dir(), "bench"))
    ap.add_argument("--out", default=None, help="write the markdown page here")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--rows", type=lambda v: v.split(";"), default=None,
                    help="only these rows (labels separated by ';'), e.g. 'f32;Q4_0'")
    ap.add_argument("--cached-only", action="store_true", help="table of the cached results only, measure nothing")
    ap.add_argument("--fresh", action="store_true", help="measure again, ignoring cached results")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    cache = Cache(os.path.join(args.work, "quality.json"), args.fresh)
    sources = {"smollm2": default_reference_checkpoint, "rotated": default_rotated_checkpoint}
    sections = []
    for model in args.models.split(","):
        rows = measure_model(model, sources[model](), args, cache)
        commands = "\n".join(f"- {label}: {cmd}" for _, label, cmd, _, _ in rows if cmd.startswith("`"))
        sections.append(f"## {model}\n\n{table(rows)}\n\nCommands ({model} = {sources[model]()}):\n\n{commands}\n")
        print(sections[-1], flush=True)
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
              f"{args.threads} threads; first {args.windows} windows of {args.ctx} tokens.\n\n"
              f"Command: `python benchmarks/quality.py --windows {args.windows} --ctx {args.ctx} "
              f"--threads {args.threads} --out docs/QUALITY.md`\n")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("# Quality: perplexity of SmolLM2-135M-Instruct and its rotated twin\n\n"
                    + (__doc__ or "").split("\n\n", 1)[1] + "\n" + header + "\n" + "\n".join(sections) + NOTES)


if __name__ == "__main__":
    main()
