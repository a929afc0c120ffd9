#!/usr/bin/env python3
"""GPU check in one go: build the CUDA backend, run tests/test_cuda.py, benchmark, print a table.

Run from the repository root on a machine with an NVIDIA GPU and a CUDA toolkit:

    python3 benchmarks/gpu_check.py                # build, tests, int4 and int8 benchmarks
    python3 benchmarks/gpu_check.py --skip-build   # reuse the modules already in pyllm/

Steps (each with its own time limit; a failing step is reported and the rest still run):
 1. build: CMake with -DPYLLM_CUDA=ON (sm_80 + sm_90) into build/gpu-check, the two modules
    copied next to the sources in pyllm/ (no pip, no network);
 2. tests: python -m pytest tests/test_cuda.py, the kernels and the LLaMA engine first, then the engine on
    every family of tests/families.py (--sanitize: the kernel tests again under compute-sanitizer);
 3. ceilings: device-to-device copy bandwidth (bytes read + written) and the dense f16
    matmul rate of cuBLAS (through torch) on the prefill shapes below;
 4. for int4 and int8: a random-initialised model with Llama-2-7B shapes (hidden 4096,
    ffn 11008, 32 layers, 32 heads, vocabulary 32000; every linear, lm_head and embeddings
    included, in that format with groups of 32) written as a .pllm with numpy, then
      decode: 128 single-token steps after a 16-token prompt -> tok/s, and GB/s = weight
              bytes read per token (all linears with their scales, one embedding row) x tok/s,
              as a fraction of the measured copy bandwidth;
      prefill: 512 tokens in one call -> tok/s and TFLOP/s (2 x linear parameters x tokens,
              plus causal attention), as a fraction of the cuBLAS f16 rate on the same shapes.
Results also go to $OUT/gpu_check.json (or --out) when set.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=128)
GROUP = 32
START = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def run(cmd: list[str], timeout: float, **kw) -> bool:
    log("$ " + " ".join(cmd))
    try:
        return subprocess.run(cmd, cwd=ROOT, timeout=timeout, **kw).returncode == 0
    except subprocess.TimeoutExpired:
        log(f"timed out after {timeout:.0f}s")
        return False


# --- 1. build ----------------------------------------------------------------------


def build(jobs: int, timeout: float) -> bool:
    import pybind11

    build_dir = os.path.join(ROOT, "build", "gpu-check")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    ok = run(["cmake", "-S", ROOT, "-B", build_dir, *generator, "-DCMAKE_BUILD_TYPE=Release", "-DPYLLM_CUDA=ON",
              f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"], timeout)
    ok = ok and run(["cmake", "--build", build_dir, "-j", str(jobs)], timeout)
    if not ok:
        return False
    for module in ("_core", "_cuda"):
        built = glob.glob(os.path.join(build_dir, "**", module + ".*.so"), recursive=True)
        if not built:
            log(f"build produced no {module} module")
            return False
        shutil.copy2(built[0], os.path.join(ROOT, "pyllm", os.path.basename(built[0])))
    return True


# --- 3. ceilings (torch, if present) -------------------------------------------------


def prefill_shapes(cfg: dict) -> list[tuple[int, int]]:
    """(N, K) of the matmuls of one layer as the engine runs them (q|k|v and gate|up stacked)."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    return [(q + 2 * kv, d), (d, q), (2 * f, d), (d, f)]


def measure_ceilings(cfg: dict, tokens: int) -> dict:
    try:
        import torch
    except ImportError:
        log("torch is not installed: no measured ceilings")
        return {}
    if not torch.cuda.is_available():
        return {}

    def median_ms(fn, reps: int) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return float(np.median(times))

    out = {"torch": torch.__version__}
    src = torch.randn(256 * 1024 * 1024, device="cuda")  # 1 GiB, random (not zeros)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 20)
    out["copy_GBps"] = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    del src, dst
    flops, seconds = 0.0, 0.0
    for n, k in prefill_shapes(cfg):
        x = torch.randn(tokens, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        ms = median_ms(lambda: torch.matmul(x, w.t()), 20)
        flops += 2.0 * tokens * n * k
        seconds += ms * 1e-3
    out["cublas_f16_TFLOPs"] = flops / seconds / 1e12
    torch.cuda.empty_cache()
    return out


# --- 4. Llama-2-7B-shaped model, written with numpy ------------------------------------


def write_random_model(path: str, fmt: str, cfg: dict, seed: int = 0) -> int:
    """A .pllm with random weights in `fmt` (every linear and the embeddings); returns weight bytes
    read per decoded token (all linears with scales/mins, lm_head included, embeddings excluded)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from pyllm import quant
    from pyllm.convert.pipeline import build_metadata
    from pyllm.formats.packed import ModelConfig, TokenizerSpec
    from pyllm.formats.safetensors import PlannedTensor, write_atomic

    config = ModelConfig(architecture="llama", norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                         tie_word_embeddings=False, max_position_embeddings=4096, **cfg)
    rng = np.random.default_rng(seed)
    plans, linears, per_token = [], {}, 0

    def random_bytes(shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(rng.bytes(n), dtype=dtype).reshape(shape)

    def scales(shape, value):
        return (value * (0.5 + rng.random(shape, dtype=np.float32))).astype(np.float16)

    for base, (rows, cols) in config.linear_shapes().items():
        linears[base] = (fmt, GROUP)
        parts = quant.packed_shapes(fmt, rows, cols, GROUP)
        nbytes = 0
        for part, (dtype, shape) in parts.items():
            if part == "weight":
                make = (lambda s=shape, d=dtype: random_bytes(s, np.int8 if d == "I8" else np.uint8))
            elif part == "scales":  # weights of std ~0.02 like a trained 7B model
                make = (lambda s=shape: scales(s, 0.02 / 7 if fmt != "int8" else 0.02 / 60).view(np.uint16))
            else:  # mins of int4_asym: centre the 16 levels
                make = (lambda s=shape: (-7.5 * scales(s, 0.02 / 7).astype(np.float32)).astype(np.float16).view(np.uint16))
            plans.append(PlannedTensor(f"{base}.{part}", dtype, shape, make))
            nbytes += int(np.prod(shape)) * (1 if dtype in ("I8", "U8") else 2)
        per_token += nbytes if base != "model.embed_tokens" else nbytes // rows
    for name in config.norm_names():
        plans.append(PlannedTensor(name, "F32", (config.hidden_size,),
                                   lambda: np.ones(config.hidden_size, np.float32)))
    blob = np.frombuffer(Tokenizer(WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).to_str().encode(), np.uint8)
    plans.append(PlannedTensor("tokenizer.json", "U8", (blob.size,), lambda: blob))
    metadata = build_metadata(config, linears, TokenizerSpec(kind="hf", unk_token="<unk>"), "", {},
                              {"converter": "benchmarks/gpu_check.py", "quant": fmt, "group_size": GROUP})
    write_atomic(path, metadata, plans)
    return per_token


def bench_model(path: str, weight_bytes: int, cfg: dict, prefill_tokens: int, decode_steps: int) -> dict:
    import pyllm

    t0 = time.monotonic()
    llm = pyllm.LLM(path, device="cuda", context_length=prefill_tokens + 64)
    out = {"load_s": time.monotonic() - t0}
    engine = llm.engine
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, cfg["vocab_size"], prefill_tokens, dtype=np.int32)

    engine.forward(prompt[:16], 0, False)  # warm-up: module load, graph capture
    engine.forward(prompt[:1], 16, False)
    times = []
    for _ in range(3):
        engine.forward(prompt[:16], 0, False)
        t0 = time.perf_counter()
        for i in range(decode_steps):
            logits = engine.forward(prompt[16 + i:17 + i], 16 + i, False)
        times.append(time.perf_counter() - t0)
        assert np.isfinite(logits).all(), "non-finite logits"
    per_token = float(np.median(times)) / decode_steps
    out["decode_tok_s"] = 1.0 / per_token
    out["decode_GBps"] = weight_bytes / per_token / 1e9

    engine.forward(prompt, 0, False)  # warm-up at full size
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        engine.forward(prompt, 0, False)
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    d, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    linear_params = L * sum(n * k for n, k in prefill_shapes(cfg)) + cfg["vocab_size"] * d / prefill_tokens
    attention_flops = L * 4.0 * cfg["num_attention_heads"] * cfg["head_dim"] * prefill_tokens * (prefill_tokens + 1) / 2
    out["prefill_tok_s"] = prefill_tokens / seconds
    out["prefill_TFLOPs"] = (2.0 * linear_params * prefill_tokens + attention_flops) / seconds / 1e12
    llm.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--sanitize", action="store_true",
                    help="also run the kernel tests (not the engine ones) under compute-sanitizer memcheck")
    ap.add_argument("--formats", default="int4_asym,int8", help="comma-separated weight formats to benchmark")
    ap.add_argument("--layers", type=int, default=LLAMA2_7B["num_hidden_layers"], help="layers of the model (32)")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole check; steps that would "
                    "not fit are skipped (default 540)")
    ap.add_argument("--workdir", default="/tmp/pyllm-gpu-check", help="where the model files go")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.path.insert(0, ROOT)
    report: dict = {"steps": {}}

    smi = shutil.which("nvidia-smi")
    if smi:
        subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv"])
    if shutil.which("nvcc"):
        subprocess.run(["nvcc", "--version"])

    if not args.skip_build:
        report["steps"]["build"] = build(args.jobs, timeout=420)
        log(f"build: {'ok' if report['steps']['build'] else 'FAILED'}")
        if not report["steps"]["build"]:
            return 1
    import pyllm
    from pyllm import _cuda

    report["device"] = _cuda.device_name() if _cuda.device_count() else "none"
    log(f"pyllm {pyllm.__version__} from {os.path.dirname(pyllm.__file__)}, device {report['device']}")

    if not args.skip_tests:
        pytest = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"]
        left = args.budget - (time.monotonic() - START)
        report["steps"]["tests"] = run(pytest + ["-k", "not family"], timeout=max(30.0, min(240.0, left - 200)))
        log(f"tests: {'passed' if report['steps']['tests'] else 'FAILED'}")
        left = args.budget - (time.monotonic() - START)
        report["steps"]["family_tests"] = run(pytest + ["-k", "family"], timeout=max(30.0, min(240.0, left - 150)))
        log(f"family tests: {'passed' if report['steps']['family_tests'] else 'FAILED'}")
    if args.sanitize and shutil.which("compute-sanitizer"):
        report["steps"]["memcheck"] = run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
                                           sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                           "tests/test_cuda.py", "-k", "not engine and not real_model and not family"], timeout=240)
        log(f"memcheck: {'clean' if report['steps']['memcheck'] else 'FAILED'}")

    cfg = dict(LLAMA2_7B, num_hidden_layers=args.layers)
    try:
        report["ceilings"] = measure_ceilings(cfg, args.prefill)
    except Exception as e:  # noqa: BLE001 - report and go on
        log(f"ceilings failed: {e!r}")
        report["ceilings"] = {}
    log(f"ceilings: {report['ceilings']}")

    os.makedirs(args.workdir, exist_ok=True)
    report["models"] = {}
    for fmt in [f for f in args.formats.split(",") if f]:
        path = os.path.join(args.workdir, f"llama2-7b-shape-{fmt}.pllm")
        if time.monotonic() - START > args.budget - 100:
            log(f"{fmt}: skipped, the time budget is spent")
            report["models"][fmt] = {"error": "skipped: time budget spent"}
            continue
        try:
            t0 = time.monotonic()
            weight_bytes = write_random_model(path, fmt, cfg)
            log(f"{fmt}: wrote {os.path.getsize(path) / 1e9:.2f} GB in {time.monotonic() - t0:.0f}s")
            result = bench_model(path, weight_bytes, cfg, args.prefill, args.decode)
            result["weight_GB_per_token"] = weight_bytes / 1e9
            report["models"][fmt] = result
            log(f"{fmt}: {result}")
        except Exception as e:  # noqa: BLE001 - report and go on
            log(f"{fmt}: FAILED {e!r}")
            report["models"][fmt] = {"error": repr(e)}
        finally:
            if os.path.exists(path):
                os.remove(path)

    ceil = report["ceilings"]
    bw, mm = ceil.get("copy_GBps"), ceil.get("cublas_f16_TFLOPs")
    print()
    print(f"device: {report['device']}; copy bandwidth {bw and f'{bw:.0f} GB/s'}; "
          f"cuBLAS f16 on the prefill shapes {mm and f'{mm:.0f} TFLOP/s'}")
    print(f"model: Llama-2-7B shapes, {args.layers} layers, random weights, groups of {GROUP}")
    print("| format | decode tok/s | decode GB/s | of copy bandwidth | prefill 512 tok/s | prefill TFLOP/s | of cuBLAS f16 |")
    print("|---|---|---|---|---|---|---|")
    for fmt, r in report["models"].items():
        if "error" in r:
            print(f"| {fmt} | failed: {r['error'][:80]} | | | | | |")
            continue
        frac_bw = f"{r['decode_GBps'] / bw:.0%}" if bw else "n/a"
        frac_mm = f"{r['prefill_TFLOPs'] / mm:.0%}" if mm else "n/a"
        print(f"| {fmt} | {r['decode_tok_s']:.1f} | {r['decode_GBps']:.0f} | {frac_bw} | {r['prefill_tok_s']:.0f} | "
              f"{r['prefill_TFLOPs']:.1f} | {frac_mm} |")
    print(f"steps: {report['steps']}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all(report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
