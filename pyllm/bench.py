"""`pyllm bench`: prefill and decode speed of a .pllm file, in the manner of llama-bench.

    pyllm bench [MODEL] [-p 512] [-n 128] [-d 0] [-r 5] [-t THREADS] [--kv-cache f16|f32|q8_0]
        [--activation-quant int8x2|int8] [--json]

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
With PYLLM_PROFILE=1 in the environment (read once when the engine is made; off, the stages cost
one branch each) it adds where the time goes: milliseconds per token of each forward stage
(engine.profile(): norms, q/k/v, RoPE and cache writes, attention, o, gate/up, activation, down,
residuals, lm_head) in prefill and in decode, the wall time no stage holds ("outside stages": the
call from Python, RoPE angles, returning logits), and for decode the weight bytes each stage reads
(attention: the KV cache it reads) and the milliseconds that takes at the measured read bound.
benchmarks/compare.py reuses these pieces to put pyllm beside llama.cpp and transformers.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from collections import Counter

import numpy as np

from . import __version__
from .errors import ContextLengthWarning, LimitError
from .formats.packed import ModelConfig, PackedModel
from .limits import MAX_CONTEXT_LENGTH
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


def time_engine(engine, prompt: np.ndarray, decode_ids: np.ndarray, depth: int = 0,
                stages: dict[str, Counter] | None = None) -> tuple[float, float]:
    """Seconds for one prefill and for the decode steps after it.

    engine: a _core.Engine; prompt: int32 [p], run at positions depth.. (the cache holds positions
    0 .. depth-1 already: fill_context); decode_ids: int32 [n], fed one per call after the prompt.
    stages: {"prefill": Counter, "decode": Counter}, given when the engine profiles (PYLLM_PROFILE=1):
    each phase's seconds per forward stage (engine.profile()) are added to its Counter."""
    marks = [engine.profile()] if stages is not None else None
    start = time.perf_counter()
    engine.forward(prompt, depth, False)
    prefill = time.perf_counter() - start
    if marks is not None:
        marks.append(engine.profile())
    start = time.perf_counter()
    for i in range(len(decode_ids)):
        engine.forward(decode_ids[i:i + 1], depth + len(prompt) + i, False)
    decode = time.perf_counter() - start
    if marks is not None:
        marks.append(engine.profile())
        for phase, before, after in (("prefill", marks[0], marks[1]), ("decode", marks[1], marks[2])):
            stages[phase].update({stage: after[stage] - before[stage] for stage in after})
    return prefill, decode


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


# forward stage (engine.profile()) -> the weight names (pyllm's, the same for every family) it reads
STAGE_WEIGHTS = {"embedding": ("model.embed_tokens.", "model.embed_positions.", "model.embed_norm."),
                 "rmsnorm": ("input_layernorm.", "post_attention_layernorm."),
                 "qkv_proj": ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj."),
                 "rope_cache_write": ("self_attn.q_norm.", "self_attn.k_norm."),
                 "o_proj": ("self_attn.o_proj.", "attn_post_norm."),
                 "gate_up_proj": ("mlp.gate_proj.", "mlp.up_proj."),
                 "down_proj": ("mlp.down_proj.", "ffn_post_norm."),
                 "lm_head": ("lm_head.", "model.norm.")}


def stage_weight_bytes(model: PackedModel) -> dict[str, int]:
    """Weight bytes each forward stage reads per decode token (the embedding: one row; a tied output
    matrix counts under lm_head), keyed like engine.profile(); together weight_bytes_per_token."""
    sizes = {name: model.file.tensors[name].nbytes for name in model.engine_tensors()}
    out = dict.fromkeys(STAGE_WEIGHTS, 0)
    for name, size in sizes.items():
        stage = next((s for s, keys in STAGE_WEIGHTS.items() if any(k in name for k in keys)), "rmsnorm")
        out[stage] += size // model.config.vocab_size if name.startswith("model.embed_tokens.") else size
    if not any(n.startswith("lm_head.") for n in sizes):  # tied: the embedding is read whole as the output
        out["lm_head"] += sum(b for n, b in sizes.items() if n.startswith("model.embed_tokens."))
    return out


def decode_kv_bytes(config: ModelConfig, first: int, n: int, kv_cache: str) -> float:
    """Mean KV-cache bytes attention reads per decode step for steps at positions first .. first+n-1
    (each reads K and V of the positions it sees: all before it, or its layer's sliding window)."""
    from .llm import KV_CACHE_BYTES_PER_VALUE

    per_position = 2 * config.num_key_value_heads * config.head_dim * KV_CACHE_BYTES_PER_VALUE[kv_cache]
    positions = np.arange(first, first + n) + 1
    seen = sum(np.minimum(positions, w or positions[-1]).mean() for w in config.sliding_windows())
    return float(per_position * seen)


def stage_profile(seconds: Counter, tokens: int, wall_seconds: float,
                  weight_bytes: dict[str, int] | None = None, kv_bytes: float = 0.0) -> dict:
    """One phase's profile: wall and per-stage milliseconds per token, each stage's share of the wall
    time; "outside stages" is the wall time no stage holds (the engine call from Python, RoPE angles,
    returning the logits). weight_bytes (decode): each stage's bytes read per token; kv_bytes (decode):
    the KV-cache bytes attention reads per token (decode_kv_bytes)."""
    per_token = {stage: 1e3 * t / tokens for stage, t in seconds.items()}
    wall = 1e3 * wall_seconds / tokens
    per_token["outside stages"] = wall - sum(per_token.values())
    stages = {}
    for stage, ms in per_token.items():
        stages[stage] = {"ms_per_token": ms, "share": ms / wall if wall > 0 else 0.0}
        if weight_bytes is not None:
            stages[stage]["weight_bytes"] = weight_bytes.get(stage, 0)
            stages[stage]["kv_cache_bytes"] = kv_bytes if stage == "attention" else 0.0
    return {"ms_per_token": wall, "stages": stages}


def check_probe_bytes(nbytes: int) -> None:
    """The read-bandwidth probe's buffer (0: no probe) must fit in half the memory this process may use, beside
    the model and its KV cache: LimitError before any test runs (the probe runs last: a buffer past
    the memory was std::bad_alloc after the whole benchmark, or the kernel's OOM killer)."""
    from .errors import ContextLengthWarning, LimitError
    from .limits import memory_limit

    if nbytes < 0:
        raise ValueError("--bandwidth-mib must be >= 0")
    limit = memory_limit()
    if limit is not None and nbytes > limit // 2:
        raise LimitError(f"the read-bandwidth probe's buffer of {nbytes >> 20} MiB exceeds half of the {limit >> 20} "
                         "MiB of memory this process may use (lower --bandwidth-mib, or 0 to skip the probe)")


def run_bench(path: str, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 5, threads: int | None = None,
              bandwidth_bytes: int = 1 << 30, log=None, kv_cache: str = "auto", device: str = "cpu",
              depth: int = 0, activation_quant: str = "int8x2") -> dict:
    """Runs the benchmark and returns its results as one JSON-ready dict (see the module docstring).
    depth: tokens already in the cache before each test (llama-bench's -d); activation_quant: LLM's."""
    from . import _core
    from .llm import LLM

    # each names its flag and the value given (it was "-p, -n and -r must be at least 1" for any of them)
    for flag, value, what in (("-p", n_prompt, "tokens of the prefill test"), ("-n", n_gen, "tokens of the "
                              "decode test"), ("-r", repetitions, "repetitions"), ("-t", threads, "threads")):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: the {what} must be at least 1")
    if depth < 0:
        raise ValueError(f"-d {depth}: the depth must be >= 0")
    check_probe_bytes(bandwidth_bytes if device == "cpu" else 0)
    before = memory_status()
    n_ctx = depth + n_prompt + n_gen
    if n_ctx > MAX_CONTEXT_LENGTH:  # (LLM's own message named context_length, which bench has no flag for)
        raise LimitError(f"-d {depth} + -p {n_prompt} + -n {n_gen} = {n_ctx} tokens exceed the context limit of "
                         f"{MAX_CONTEXT_LENGTH}")
    loads = []

    def load() -> LLM:
        start = time.perf_counter()
        # in the command's words (the library's named context_length, which bench has no flag for, and its
        # warning came as Python's, with a source line)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ContextLengthWarning)
            try:
                opened = LLM(path, n_threads=threads, context_length=n_ctx, kv_cache=kv_cache, device=device,
                             activation_quant=activation_quant)
            except LimitError as e:
                raise LimitError(f"-d {depth} + -p {n_prompt} + -n {n_gen} = {n_ctx} tokens of context: {e}") from None
        loads.append(time.perf_counter() - start)
        trained = opened.config.max_position_embeddings
        if len(loads) == 1 and n_ctx > trained:
            print(f"pyllm bench: warning: -d {depth} + -p {n_prompt} + -n {n_gen} = {n_ctx} tokens exceed the "
                  f"{trained} the model was trained on (speed is measured all the same)", file=sys.stderr)
        return opened

    # The first load is the one measured for memory; the other load timings come after it is closed.
    llm = load()
    try:
        config = llm.config
        prompt, decode_ids = benchmark_tokens(config.vocab_size, n_prompt, n_gen)
        if log:
            print(f"warm-up, then {_count(repetitions, 'repetition')} of pp{n_prompt} + tg{n_gen} on "
                  f"{_count(llm.n_threads, 'thread')}",
                  file=log, flush=True)
        if depth:
            fill_context(llm.engine, config.vocab_size, depth)
        time_engine(llm.engine, prompt, decode_ids[:8], depth)
        prefill, decode = [], []
        # PYLLM_PROFILE=1 (read when the engine is made): the engine keeps seconds per forward stage
        stages = {"prefill": Counter(), "decode": Counter()} if llm.engine.profile() else None
        for _ in range(repetitions):
            p_seconds, d_seconds = time_engine(llm.engine, prompt, decode_ids, depth, stages)
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
            "activation_quant": llm.engine.activation_quant,
            # as allocated (the CPU engine pads each kv head's positions), the memory it takes beside the file
            "kv_cache_bytes": llm.kv_cache_bytes,
            "read_bandwidth_gb_per_s": None,
            "decode_fraction_of_bound": None,
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
            "profile": None if stages is None else {
                "prefill": stage_profile(stages["prefill"], n_prompt * repetitions, sum(n_prompt / v for v in prefill)),
                "decode": stage_profile(stages["decode"], n_gen * repetitions, sum(n_gen / v for v in decode),
                                        stage_weight_bytes(model),
                                        decode_kv_bytes(config, depth + n_prompt, n_gen, llm.engine.kv_cache)),
            },
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
            if stages is not None:
                for s in result["profile"]["decode"]["stages"].values():
                    s["ms_at_bound"] = (s["weight_bytes"] + s["kv_cache_bytes"]) / (bound * 1e6)
    finally:
        llm.close()
    for _ in range(LOAD_REPETITIONS - 1):
        load().close()
    result["load_seconds"] = spread(loads)
    return result


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _parameters(n: int) -> str:
    """llama-bench's units: "1.10B", "135M", "41.0K" (a tiny test model read "0M")."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M" if n >= 1e6 \
        else f"{n / 1e3:.1f}K"


def format_report(r: dict) -> str:
    """The human-readable report of run_bench's dict."""
    def row(test: str, s: dict) -> str:
        return f"| {test} | {s['median']:.1f} | {s['min']:.1f} | {s['max']:.1f} | {s['stdev']:.1f} |"

    mb = 1e6
    formats = ", ".join(f"{k} x{v}" for k, v in r["formats"].items())
    lines = [
        f"{os.path.basename(r['model'])}: {_parameters(r['params'])} parameters, {r['file_bytes'] / mb:.1f} MB ({formats})",
        f"{r['machine']['cpu']}, {_count(r['threads'], 'thread')}, kernels {r['kernels']}, "
        + (f"activations {r['activation_quant']}, " if any(k.startswith("int") for k in r["formats"]) else "")
        + _count(r["repetitions"], "repetition"),
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
    if r.get("profile"):
        lines += ["", profile_table(r)]
    return "\n".join(lines)


def profile_table(r: dict) -> str:
    """PYLLM_PROFILE=1's table: milliseconds per token of each forward stage in prefill and decode,
    with the MB each decode stage reads (weights; attention: the KV cache) and the time that takes at
    the measured read bound."""
    prefill, decode = r["profile"]["prefill"], r["profile"]["decode"]
    lines = ["| stage | prefill ms/token | share | decode ms/token | share | MB read | at the bound ms |",
             "|---|---|---|---|---|---|---|"]
    for stage, d in decode["stages"].items():
        p = prefill["stages"][stage]
        bound = f"{d['ms_at_bound']:.3f}" if "ms_at_bound" in d else "-"
        lines.append(f"| {stage} | {p['ms_per_token']:.3f} | {100 * p['share']:.1f}% | {d['ms_per_token']:.3f} | "
                     f"{100 * d['share']:.1f}% | {(d['weight_bytes'] + d['kv_cache_bytes']) / 1e6:.1f} | {bound} |")
    bounds = [d["ms_at_bound"] for d in decode["stages"].values() if "ms_at_bound" in d]
    lines.append(f"| total | {prefill['ms_per_token']:.3f} | 100% | {decode['ms_per_token']:.3f} | 100% | "
                 f"{sum(d['weight_bytes'] + d['kv_cache_bytes'] for d in decode['stages'].values()) / 1e6:.1f} | "
                 f"{f'{sum(bounds):.3f}' if bounds else '-'} |")
    return (f"profile (PYLLM_PROFILE=1; wall time of each forward stage over the {r['repetitions']} repetitions):\n"
            + "\n".join(lines))


def bench_command(args) -> int:
    """`pyllm bench` (arguments registered in cli.py)."""
    from .cli import model_path

    check_probe_bytes(args.bandwidth_mib << 20)
    path = model_path(args)
    result = run_bench(path, args.n_prompt, args.n_gen, args.repetitions, args.threads,
                       args.bandwidth_mib << 20, log=None if args.json else sys.stderr, kv_cache=args.kv_cache,
                       device=args.device, depth=args.depth, activation_quant=args.activation_quant)
    print(json.dumps(result) if args.json else format_report(result))
    return 0
