"""Perplexity by domain of SmolLM2 and its rotated twins in every pyllm format, beside llama.cpp.

    python benchmarks/quality.py [--windows 24] [--ctx 512] [--threads 2] [--out docs/QUALITY.md]
        [--models smollm2,rotated-s0,rotated-s1] [--domains python-docs,english-prose,chinese-prose,code]
        [--llama-cpp-lib DIR]

Protocol (llama.cpp's perplexity tool), on each evaluation domain of pyllm.eval_texts (Python's
documentation, English prose, Chinese prose, source code; packages and paths in docs/QUALITY.md):
non-overlapping windows of --ctx tokens from the start of the text, the second half of each window
scored. Every engine sees the same token ids. Each format's row gives every domain's perplexity and
its change against f32, then the mean and the worst change over the domains.

Models:
- smollm2: SmolLM2-135M-Instruct, the default model's GGUF (Q4_1 matrices, Q8_0 embeddings)
  dequantized to f32 by transformers' GGUF loader (tools/reference_checkpoint.py). Its matrices sit
  on an asymmetric group-32 int4 grid, which flatters group-32 asymmetric int4.
- rotated-sN: the same model with RMSNorm weights folded into the linears, the residual stream
  rotated by a random orthogonal matrix (seed N) and the embeddings untied
  (tools/rotated_model.py): the same function (same f32 perplexity) on weights off any 4-bit grid.

pyllm files are converted from these Hugging Face checkpoints with `pyllm convert`'s options
(listed under each table), measured on every domain, then deleted; llama.cpp files are made from an
F32 GGUF of the same weights by llama.cpp's own quantizer and kept in --work. llama.cpp runs through
llama-cpp-python (a benchmark-only dependency): install it without compiling and point it at a
built libllama.so with --llama-cpp-lib DIR (or LLAMA_CPP_LIB_PATH):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   # the sdist vendors llama.cpp
    tar xf llama_cpp_python-0.3.36.tar.gz   # then build its vendored llama.cpp as a shared library:
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release
          -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DLLAMA_CURL=OFF   (one command)
    cmake --build build -j
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install llama_cpp_python-0.3.36.tar.gz
    python benchmarks/quality.py --llama-cpp-lib build/bin

Results are cached in --work/quality.json, keyed by model, row, domain, windows, ctx and, for
quantized pyllm rows, a hash of the quantizer's code and calibration data, so an interrupted run
resumes and a changed quantizer is measured again; --fresh ignores the cache.
pyllm runs with its default KV cache (f16 for every format but f32), llama.cpp with its own (f16).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
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
from pyllm.eval_texts import DOMAIN_NAMES, DOMAINS, domain_text, package_version
from pyllm.perplexity import logits_to_keep, perplexity, scored_rows

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
    ("int4 asym_dq g32 (8-bit coded scales), GPTQ", "--quant int4_asym_dq --calib builtin"),
    ("int4 layouts per matrix, scale search", "--quant int4 --calib none"),
    ("int4 layouts per matrix under 4.6 bits, GPTQ", "--quant int4 --bits 4.6"),
    ("int4 default (uniform int4_asym_dq g32 where it fits), GPTQ", "--quant int4"),
    ("int4 default with activation-aware scales (AWQ), GPTQ", "--quant int4 --awq"),
]
LLAMA_VARIANTS = ["F32", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M"]
INT8_DEFAULT, INT4_DEFAULT = "int8 g32 default: GPTQ", "int4 default (uniform int4_asym_dq g32 where it fits), GPTQ"
QUANTIZER_FILES = ("pyllm/quant.py", "pyllm/convert/gptq.py", "pyllm/convert/strategy.py", "pyllm/convert/awq.py",
                   "pyllm/convert/calibrate.py", "pyllm/data/calibration")

NOTES = """
Reading the tables:
- Each cell: perplexity (change against pyllm f32 on that domain). mean: the mean change over the
  domains; worst: the largest change and its domain. bits/weight counts the matrices of the
  transformer blocks, scales and mins included. The embeddings and lm_head of every pyllm int8/int4
  row are int8 group 32 (8.5 bits/weight); llama.cpp's Q4_0/Q4_1/Q4_K_M keep its output tensor at
  Q6_K or Q8_0 (Q4_K_M's block matrices mix Q4_K, Q6_K and fallbacks for 576-wide rows, hence their
  bits/weight). convert s: the conversion's wall time in this run (machine shared, see above).
- round-to-nearest: min/max scales. scale search: per group, the scale (and min) minimising the
  squared error over a grid of shrink factors with least-squares refits (pyllm/quant.py); int4 only.
  GPTQ: error-compensating rounding with Hessians from the built-in calibration set (English and
  Chinese prose, chat in the model's template, docstrings and code; pyllm/convert/calibrate.py),
  which shares no 64-character span with any evaluation text (tests/test_calibration_set.py).
  layouts per matrix: int4_sym/int4_asym at group 32/64/128 and int4_asym_dq at group 32 (int4_asym
  with its scales and mins as 8-bit codes of a step per row: 4.5 bits/weight plus 64 bits a row)
  chosen per matrix by measured error under a 4.6 bits/weight budget (pyllm/convert/strategy.py).
- SmolLM2's own matrices sit on a Q4_1 grid (asymmetric, group 32), so "int4 asym g32" recovers
  them exactly; the rotated models show what the same formats do on weights that never saw a grid.
"""


def parse_flags(flags: str) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant")
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--rtn", action="store_true")
    ap.add_argument("--keep-sensitive", type=int, default=0)
    ap.add_argument("--bits", type=float, default=None)
    ap.add_argument("--awq", action="store_true")
    a = ap.parse_args(flags.split())
    return dict(quant=a.quant, group_size=a.group_size,
                options=options_from_flags(a.quant, a.calib, a.rtn, a.keep_sensitive, a.bits, a.group_size,
                                                  a.awq))


def quantizer_hash() -> str:
    """A short hash of the quantizer's code and the calibration data (a cache key of quantized rows)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
    digest = hashlib.sha256()
    for rel in QUANTIZER_FILES:
        path = os.path.join(root, rel)
        files = sorted(os.path.join(path, n) for n in os.listdir(path)) if os.path.isdir(path) else [path]
        for name in files:
            with open(name, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:12]


def gguf_linear_bits(path: str) -> float:
    """Bits per weight of a GGUF's transformer-block matrices (embeddings / output excluded)."""
    import gguf

    reader = gguf.GGUFReader(path)
    blocks = [t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8.0 * sum(int(t.n_bytes) for t in blocks) / sum(int(t.n_elements) for t in blocks)


def llama_cpp_logits_fn(path: str, ctx: int, threads: int):
    """(model, logits(ids) -> f32 [scored_rows(ctx), vocab]: the logits perplexity() scores, a copy of those only)."""
    from llama_cpp import Llama

    model = Llama(path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=threads, verbose=False)

    def logits(ids):
        model.reset()
        model.eval(ids)
        return np.array(model.scores[len(ids) - scored_rows(ctx):len(ids)], dtype=np.float32)

    return model, logits


def model_source(model: str) -> str:
    """'smollm2' or 'rotated-sN' (N a seed; 'rotated' is seed 0) -> its Hugging Face directory."""
    if model == "smollm2":
        return default_reference_checkpoint()
    if model == "rotated" or model.startswith("rotated-s") and model[len("rotated-s"):].isdigit():
        return default_rotated_checkpoint(int(model[len("rotated-s"):] or 0) if model != "rotated" else 0)
    raise SystemExit(f"unknown model {model!r}: smollm2, rotated-s0, rotated-s1, ...")


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


def domain_tokens(hf_dir: str, domains: list[str]) -> dict[str, list[int]]:
    """Each domain's evaluation text as token ids, as LLM.tokenize gives them (the checkpoint's tokenizer)."""
    from pyllm.convert.checkpoint import Checkpoint
    from pyllm.tokenizer import Tokenizer

    ckpt = Checkpoint(hf_dir)
    try:
        tokenizer = Tokenizer(*ckpt.tokenizer())
        return {d: tokenizer.encode(domain_text(d), add_special_tokens=False) for d in domains}
    finally:
        ckpt.close()


def selected(label: str, rows) -> bool:
    return not rows or label in rows or label.split(",")[0] in rows


def measure_model(model: str, hf_dir: str, args, cache: Cache) -> list[dict]:
    """Rows {engine, label, command, bits, ppl: {domain: perplexity}, convert_s} of one model."""
    rows, tokens, qhash = [], domain_tokens(hf_dir, args.domains), quantizer_hash()
    for label, flags in PYLLM_VARIANTS:
        if not selected(label, args.rows):
            continue
        version = qhash if "int" in flags else "float"
        keys = {d: f"{model}|pyllm|{flags}|{version}|{d}|{args.windows}|{args.ctx}" for d in args.domains}
        missing = [d for d in args.domains if cache.get(keys[d]) is None]
        if missing and not args.cached_only:
            path = os.path.join(args.work, f"{model}-{flags.replace('--', '').replace(' ', '_')}.pllm")
            start = time.perf_counter()
            report = convert_checkpoint(hf_dir, path, progress=False, **parse_flags(flags))
            convert_s = time.perf_counter() - start
            with pyllm.LLM(path, n_threads=args.threads, context_length=args.ctx) as llm:
                for d in missing:
                    result = perplexity(functools.partial(llm.logits, logits_to_keep=logits_to_keep(args.ctx)),
                                        tokens[d], ctx=args.ctx, windows=args.windows)
                    cache.put(keys[d], {"bits": report.bits_per_weight, "ppl": result.perplexity,
                                        "convert_s": convert_s})
            os.remove(path)
        found = {d: cache.get(keys[d]) for d in args.domains if cache.get(keys[d]) is not None}
        if not found:
            continue
        first = next(iter(found.values()))
        rows.append(dict(engine="pyllm", label=label, command=f"`pyllm convert {model} -o out.pllm {flags}`",
                         bits=first["bits"], ppl={d: r["ppl"] for d, r in found.items()},
                         convert_s=first.get("convert_s")))
        print(model, rows[-1], flush=True)
    if args.no_llama_cpp:
        return rows
    import llama_cpp

    engine = f"llama.cpp {llama_cpp.__version__}"
    f32 = None
    for name in LLAMA_VARIANTS:
        if not selected(name, args.rows):
            continue
        keys = {d: f"{model}|{engine}|{name}|{d}|{args.windows}|{args.ctx}" for d in args.domains}
        missing = [d for d in args.domains if cache.get(keys[d]) is None]
        if missing and not args.cached_only:
            f32 = f32 or f32_gguf(model, hf_dir, args.work)
            path = f32 if name == "F32" else llama_cpp_quantize(f32, os.path.join(args.work, f"{model}-{name}.gguf"), name)
            llm_cpp, fn = llama_cpp_logits_fn(path, args.ctx, args.threads)
            for d in missing:
                result = perplexity(fn, tokens[d], ctx=args.ctx, windows=args.windows)
                cache.put(keys[d], {"bits": gguf_linear_bits(path), "ppl": result.perplexity})
            del llm_cpp
        found = {d: cache.get(keys[d]) for d in args.domains if cache.get(keys[d]) is not None}
        if found:
            rows.append(dict(engine=engine, label=name, command="llama_model_quantize",
                             bits=next(iter(found.values()))["bits"], ppl={d: r["ppl"] for d, r in found.items()},
                             convert_s=None))
            print(model, rows[-1], flush=True)
    return rows


def changes(row: dict, base: dict) -> dict[str, float]:
    """domain -> relative change of the row's perplexity against `base` (the f32 row), in percent."""
    return {d: 100 * (p / base["ppl"][d] - 1) for d, p in row["ppl"].items() if d in base["ppl"]}


def table(rows: list[dict], domains: list[str]) -> str:
    base = rows[0]
    lines = ["| engine | format | bits/weight | " + " | ".join(domains) + " | mean | worst | convert s |",
             "|---|---|---|" + "---|" * len(domains) + "---|---|---|"]
    for row in rows:
        delta = changes(row, base)
        cells = [f"{row['ppl'][d]:.3f} ({delta[d]:+.2f}%)" if d in delta else "" for d in domains]
        worst = max(delta, key=delta.get) if delta else None
        summary = (f"{np.mean(list(delta.values())):+.2f}% | {delta[worst]:+.2f}% {worst}" if delta else " | ")
        seconds = f"{row['convert_s']:.0f}" if row.get("convert_s") else ""
        lines.append(f"| {row['engine']} | {row['label']} | {row['bits']:.2f} | " + " | ".join(cells)
                     + f" | {summary} | {seconds} |")
    return "\n".join(lines)


def targets(model_rows: dict[str, list[dict]], domains: list[str]) -> str:
    """The issue's targets, checked on the measured rows of every model (a line per model and target)."""
    lines = ["| model | int4 default bits/weight (<= 4.6) | int4 default worst (<= +3%) | "
             "int4 default < Q4_K_M on every domain | int8 default within +-0.3% on every domain |",
             "|---|---|---|---|---|"]
    for model, rows in model_rows.items():
        by = {r["label"]: r for r in rows}
        base = rows[0]
        int4, int8, q4km = by.get(INT4_DEFAULT), by.get(INT8_DEFAULT), by.get("Q4_K_M")
        cells = []
        if int4:
            d4 = changes(int4, base)
            worst = max(d4, key=d4.get)
            cells += [f"{int4['bits']:.2f} {'yes' if int4['bits'] <= 4.6 + 1e-9 else 'NO'}",
                      f"{d4[worst]:+.2f}% ({worst}) {'yes' if d4[worst] <= 3 else 'NO'}"]
            if q4km:
                lost = [d for d in domains if d in int4["ppl"] and d in q4km["ppl"] and int4["ppl"][d] >= q4km["ppl"][d]]
                cells.append("yes" if not lost else "NO: " + ", ".join(lost))
            else:
                cells.append("not measured")
        else:
            cells += ["not measured"] * 3
        if int8:
            d8 = changes(int8, base)
            out = [d for d, v in d8.items() if abs(v) > 0.3]
            cells.append("yes" if not out else "NO: " + ", ".join(f"{d} {d8[d]:+.2f}%" for d in out))
        else:
            cells.append("not measured")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sources_table(domains: list[str], args) -> str:
    lines = ["| domain | package (version) | files | tokens scored |", "|---|---|---|---|"]
    for d in domains:
        info = DOMAINS[d][0]
        lines.append(f"| {d} | {info.package} ({package_version(d) or 'version unknown'}) | {info.paths} | "
                     f"{args.windows} x {args.ctx // 2 - 1} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="smollm2,rotated-s0,rotated-s1")
    ap.add_argument("--domains", type=lambda v: v.split(","), default=list(DOMAIN_NAMES))
    ap.add_argument("--work", default=os.path.join(default_model.cache_dir(), "quality"),
                    help="cache of results and llama.cpp files")
    ap.add_argument("--out", default=None, help="write the markdown page here")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--llama-cpp-lib", default=os.environ.get("LLAMA_CPP_LIB_PATH"),
                    help="directory of a built libllama.so for llama-cpp-python (LLAMA_CPP_LIB_PATH)")
    ap.add_argument("--rows", type=lambda v: v.split(";"), default=None,
                    help="only these rows (labels separated by ';'), e.g. 'f32;Q4_0'")
    ap.add_argument("--cached-only", action="store_true", help="table of the cached results only, measure nothing")
    ap.add_argument("--fresh", action="store_true", help="measure again, ignoring cached results")
    args = ap.parse_args()
    unknown = [d for d in args.domains if d not in DOMAINS]
    if unknown:
        raise SystemExit(f"unknown domains {unknown}: choose from {', '.join(DOMAIN_NAMES)}")
    if args.llama_cpp_lib:
        os.environ["LLAMA_CPP_LIB_PATH"] = args.llama_cpp_lib
    os.makedirs(args.work, exist_ok=True)
    cache = Cache(os.path.join(args.work, "quality.json"), args.fresh)
    sections, model_rows = [], {}
    for model in args.models.split(","):
        source = model_source(model)
        rows = measure_model(model, source, args, cache)
        if not rows:
            continue
        model_rows[model] = rows
        commands = "\n".join(f"- {r['label']}: {r['command']}" for r in rows if r["command"].startswith("`"))
        sections.append(f"## {model}\n\n{table(rows, args.domains)}\n\nCommands ({model} = {source}):\n\n{commands}\n")
        print(sections[-1], flush=True)
    summary = "## Targets (issue 18)\n\n" + targets(model_rows, args.domains) + "\n"
    print(summary, flush=True)
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
              f"{args.threads} threads (machine shared with other work); first {args.windows} windows of "
              f"{args.ctx} tokens of each domain; quantizer {quantizer_hash()}.\n\n"
              f"Command: `python benchmarks/quality.py --windows {args.windows} --ctx {args.ctx} "
              f"--threads {args.threads} --models {args.models} --out docs/QUALITY.md`\n\n"
              "Evaluation texts:\n\n" + sources_table(args.domains, args) + "\n")
    if args.out:
        with open(args.out + ".partial", "w", encoding="utf-8") as f:
            f.write("# Quality: perplexity by domain of SmolLM2-135M-Instruct and its rotated twins\n\n"
                    + (__doc__ or "").split("\n\n", 1)[1] + "\n" + header + "\n" + summary + "\n"
                    + "\n".join(sections) + NOTES)
        os.replace(args.out + ".partial", args.out)


if __name__ == "__main__":
    main()
