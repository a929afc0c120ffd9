"""`pyllm bench`: prefill and decode speed of a .pllm file, in the manner of llama-bench.

    pyllm bench [MODEL] [-p 512] [-n 128] [-d 0] [-r 5] [-t THREADS] [--kv-cache f16|f32|q8_0] [--json]

Prefill: one engine call over -p random token ids in a fresh context (position 0). Decode: -n
single-token engine calls through the KV cache after that prefill, fed pre-drawn random ids. The
engine is called directly: tokenization, sampling and the Python generation loop are excluded.
One warm-up run pages the weights in; then -r repetitions give the median, min, max and standard
deviation of tokens/s.

Beside the speed it reports what bounds it:
  - the weight bytes one decode step reads (from the file's tensor table) and the GB/s that
    decode achieves over them;
  - the machine's read bandwidth, measured in the same process with the same thread count
    (`_core.read_bandwidth`, a sum over a buffer larger than the caches), and decode as a
    fraction of it;
  - the time to open the file (LLM(), memory-mapped; median of 3 loads);
  - the resident set while generating (VmRSS, VmHWM) beside the file size + the KV cache, in a
    process that has loaded the model once (the other load timings come after).
benchmarks/compare.py reuses these pieces to put pyllm beside llama.cpp and transformers.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import Counter

import numpy as np

from . import __version__
from .formats.packed import PackedModel
from .quant import layout_name

LOAD_REPETITIONS = 3


def spread(values: list[float]) -> dict:
    """Median, min, max, standard deviation and the samples themselves."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "samples": list(values)}


def memory_status() -> dict[str, int]:
    """Resident set now and at its peak, in bytes (VmRSS, VmHWM of /proc/self/status; {} off Linux)."""
    out = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024  # reported in kB
    except OSError:
        pass
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def weight_bytes_per_token(tensor_bytes: dict[str, int], embedding_prefix: str, output_prefix: str,
                           vocab_size: int) -> int:
    """Bytes of weights one decode step reads: every tensor once, except the embedding table, of
    which only one row is read, unless it doubles as the output matrix (tied: no tensor named
    output_prefix...), when it is read whole as well. Works for any file's tensor table: pyllm
    ("model.embed_tokens.", "lm_head."), GGUF ("token_embd.", "output.")."""
    embedding = sum(b for n, b in tensor_bytes.items() if n.startswith(embedding_prefix))
    rest = sum(b for n, b in tensor_bytes.items() if not n.startswith(embedding_prefix))
    tied = not any(n.startswith(output_prefix) for n in tensor_bytes)
    return rest + embedding // vocab_size + (embedding if tied else 0)


def pyllm_weight_bytes_per_token(model: PackedModel) -> int:
    """weight_bytes_per_token of a .pllm file (the tokenizer blob and padding are not weights)."""
    tensors = {name: model.file.tensors[name].nbytes for name in model.engine_tensors()}
    return weight_bytes_per_token(tensors, "model.embed_tokens.", "lm_head.", model.config.vocab_size)


def time_engine(engine, prompt: np.ndarray, decode_ids: np.ndarray, depth: int = 0) -> tuple[float, float]:
    """Seconds for one prefill and for the decode steps after it.

    engine: a _core.Engine; prompt: int32 [p], run at positions depth.. (the cache holds positions
    0 .. depth-1 already: fill_context); decode_ids: int32 [n], fed one per call after the prompt."""
    start = time.perf_counter()
    engine.forward(prompt, depth, False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(len(decode_ids)):
        engine.forward(decode_ids[i:i + 1], depth + len(prompt) + i, False)
    return prefill, time.perf_counter() - start


def fill_context(engine, vocab_size: int, depth: int, seed: int = 1) -> None:
    """Puts `depth` random tokens into the engine's cache at positions 0 .. depth-1 (llama-bench's -d:
    the tests then run as if that much conversation came before them)."""
    ids = np.random.default_rng(seed).integers(0, vocab_size, depth).astype(np.int32)
    for start in range(0, depth, 512):
        engine.forward(ids[start:start + 512], start, False)


def benchmark_tokens(vocab_size: int, n_prompt: int, n_gen: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The random prompt int32 [n_prompt] and decode ids int32 [n_gen] every engine is given."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, vocab_size, n_prompt).astype(np.int32),
            rng.integers(0, vocab_size, n_gen).astype(np.int32))


def run_bench(path: str, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 5, threads: int | None = None,
              bandwidth_bytes: int = 1 << 30, log=None, kv_cache: str = "auto", device: str = "cpu",
              depth: int = 0) -> dict:
    """Runs the benchmark and returns its results as one JSON-ready dict (see the module docstring).
    depth: tokens already in the cache before each test (llama-bench's -d)."""
    from . import _core
    from .llm import LLM, kv_cache_bytes

    if n_prompt < 1 or n_gen < 1 or repetitions < 1:
        raise ValueError("-p, -n and -r must be at least 1")
    if threads is not None and threads < 1:
        raise ValueError("-t must be at least 1")
    if depth < 0:
        raise ValueError("-d must be >= 0")
    before = memory_status()
    n_ctx = depth + n_prompt + n_gen
    loads = []

    def load() -> LLM:
        start = time.perf_counter()
        opened = LLM(path, n_threads=threads, context_length=n_ctx, kv_cache=kv_cache, device=device)
        loads.append(time.perf_counter() - start)
        return opened

    # The first load is the one measured for memory; the other load timings come after it is closed.
    llm = load()
    try:
        config = llm.config
        prompt, decode_ids = benchmark_tokens(config.vocab_size, n_prompt, n_gen)
        if log:
            print(f"warm-up, then {repetitions} repetitions of pp{n_prompt} + tg{n_gen} on {llm.n_threads} threads",
                  file=log, flush=True)
        if depth:
            fill_context(llm.engine, config.vocab_size, depth)
        time_engine(llm.engine, prompt, decode_ids[:8], depth)
        prefill, decode = [], []
        for _ in range(repetitions):
            p_seconds, d_seconds = time_engine(llm.engine, prompt, decode_ids, depth)
            prefill.append(n_prompt / p_seconds)
            decode.append(n_gen / d_seconds)
        memory = memory_status()  # before the probe, whose buffer would count in the peak
        model = llm.model
        bytes_per_token = pyllm_weight_bytes_per_token(model)
        result = {
            "model": os.path.abspath(path),
            "file_bytes": model.file_size,
            "params": (sum(rows * cols for rows, cols in config.linear_shapes().values())
                       + len(config.norm_names()) * config.hidden_size),
            "formats": dict(Counter(layout_name(fmt, group) for fmt, group in model.linears.values())),
            "threads": llm.n_threads,
            "device": device,
            "kernels": _core.active_kernels() if device == "cpu" else device,
            "n_prompt": n_prompt,
            "depth": depth,
            "n_gen": n_gen,
            "repetitions": repetitions,
            "prefill_tokens_per_s": spread(prefill),
            "decode_tokens_per_s": spread(decode),
            "weight_bytes_per_token": bytes_per_token,
            "decode_gb_per_s": bytes_per_token * statistics.median(decode) / 1e9,
            "rss_before_load_bytes": before.get("VmRSS"),
            "rss_bytes": memory.get("VmRSS"),
            "peak_rss_bytes": memory.get("VmHWM"),
            "kv_cache": llm.engine.kv_cache,
            "kv_cache_bytes": kv_cache_bytes(config, n_ctx, llm.engine.kv_cache),
            "read_bandwidth_gb_per_s": None,
            "decode_fraction_of_bound": None,
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
            "pyllm_version": __version__,
        }
        result["file_plus_kv_bytes"] = result["file_bytes"] + result["kv_cache_bytes"]
        if bandwidth_bytes and device == "cpu":  # the host-memory bound means nothing for a GPU
            if log:
                print(f"read bandwidth probe: {bandwidth_bytes >> 20} MiB on {llm.n_threads} threads", file=log,
                      flush=True)
            bound = _core.read_bandwidth(llm.n_threads, bandwidth_bytes, 5)
            result["read_bandwidth_gb_per_s"] = bound
            result["decode_fraction_of_bound"] = result["decode_gb_per_s"] / bound
    finally:
        llm.close()
    for _ in range(LOAD_REPETITIONS - 1):
        load().close()
    result["load_seconds"] = spread(loads)
    return result


def format_report(r: dict) -> str:
    """The human-readable report of run_bench's dict."""
    def row(test: str, s: dict) -> str:
        return f"| {test} | {s['median']:.1f} | {s['min']:.1f} | {s['max']:.1f} | {s['stdev']:.1f} |"

    mb = 1e6
    formats = ", ".join(f"{k} x{v}" for k, v in r["formats"].items())
    lines = [
        f"{os.path.basename(r['model'])}: {r['params'] / 1e6:.0f}M parameters, {r['file_bytes'] / mb:.1f} MB ({formats})",
        f"{r['machine']['cpu']}, {r['threads']} threads, kernels {r['kernels']}, {r['repetitions']} repetitions",
        "",
        "| test | tokens/s median | min | max | stdev |",
        "|---|---|---|---|---|",
        row(f"pp{r['n_prompt']}" + (f" @ d{r['depth']}" if r.get("depth") else ""), r["prefill_tokens_per_s"]),
        row(f"tg{r['n_gen']}" + (f" @ d{r['depth']}" if r.get("depth") else ""), r["decode_tokens_per_s"]),
        "",
        f"decode reads {r['weight_bytes_per_token'] / mb:.1f} MB of weights per token: {r['decode_gb_per_s']:.2f} GB/s",
    ]
    if r["read_bandwidth_gb_per_s"] is not None:
        lines.append(f"read bandwidth ({r['threads']} threads): {r['read_bandwidth_gb_per_s']:.2f} GB/s; decode at "
                     f"{100 * r['decode_fraction_of_bound']:.0f}% of that bound")
    load = r["load_seconds"]
    lines.append(f"load: {load['median']:.3f} s (median of {len(load['samples'])})")
    if r["rss_bytes"] is not None:
        lines.append(
            f"memory while generating: RSS {r['rss_bytes'] / mb:.1f} MB (peak {r['peak_rss_bytes'] / mb:.1f} MB); "
            f"file {r['file_bytes'] / mb:.1f} MB + KV cache ({r['kv_cache']}) {r['kv_cache_bytes'] / mb:.1f} MB = "
            f"{r['file_plus_kv_bytes'] / mb:.1f} MB; the process held {r['rss_before_load_bytes'] / mb:.1f} MB "
            "before loading")
    return "\n".join(lines)


def bench_command(args) -> int:
    """`pyllm bench` (arguments registered in cli.py)."""
    from .cli import model_path

    path = model_path(args)
    if args.bandwidth_mib < 0:
        raise ValueError("--bandwidth-mib must be >= 0")
    result = run_bench(path, args.n_prompt, args.n_gen, args.repetitions, args.threads,
                       args.bandwidth_mib << 20, log=None if args.json else sys.stderr, kv_cache=args.kv_cache,
                       device=args.device, depth=args.depth)
    print(json.dumps(result) if args.json else format_report(result))
    return 0
