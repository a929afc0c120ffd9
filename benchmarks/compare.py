"""pyllm beside llama.cpp and transformers: same weights, same prompt, same threads, one table.

    python benchmarks/compare.py [--models smollm2,random-1.1b] [--formats int4_sym,int4_asym,int8,f16]
                                 [--engines pyllm,llama.cpp,transformers] [-p 512] [-n 128] [-r 3] [-t 2]

Models (files built once and cached under --work, default ~/.cache/pyllm/bench):
  smollm2      SmolLM2-135M-Instruct. Its GGUF (Q4_1 matrices, Q8_0 embeddings) dequantized to f32
               is the model: pyllm converts the Hugging Face checkpoint of those f32 weights
               (tools/reference_checkpoint.py), llama.cpp quantizes an F32 GGUF of them with its own
               quantizer (as benchmarks/quality.py does); transformers runs the checkpoint in fp32.
  random-1.1b  random weights (normal, std 0.02, rounded to f16 so that an F16 file holds them
               exactly; norms 1) with TinyLlama-1.1B's shapes (22 layers, hidden 2048, FFN 5632,
               32 heads / 4 KV heads, untied) and SmolLM2's vocabulary of 49152, written once as an
               F16 GGUF with SmolLM2's tokenizer (tools/llama_gguf.py); pyllm converts that GGUF,
               llama.cpp quantizes it. transformers is not run on it (too slow).
  random-1.1b-FAMILY  the same idea for the other families (qwen2, qwen3, gemma2, gemma3, phi3, bloom,
               gpt2, glm4, glm, opt; shapes and options in tools/random_family.py): a random transformers
               checkpoint in f16 with SmolLM2's tokenizer, written as an F16 GGUF by llama.cpp's own
               convert_hf_to_gguf.py (--llama-cpp-src); pyllm converts that GGUF, llama.cpp quantizes
               it. llama.cpp has no OPT: pyllm converts that checkpoint and runs alone (no ratios).
Formats, each a pyllm quantization beside a llama.cpp type: int4_sym (g32, 4.5 bits like Q4_0) /
Q4_0, int4_asym (g32, 5 bits) / Q4_0, int8 (g32) / Q8_0, f16 / F16. pyllm's int4/int8 files keep their embeddings
and lm_head in int8; llama.cpp's quantizer picks its own types there (Q6_K for the output matrix):
the MB/token column shows what each decode step reads.

Method (llama-bench's): prefill is one call over -p random token ids in a fresh context, decode
-n single-token calls through the KV cache after it, fed pre-drawn random ids (every engine gets
the same ids); tokenization and sampling are excluded. Every engine runs in its own worker
process (so its resident set is its own), loaded once; per model and format the engines take
turns every repetition, after one warm-up each; the table gives the median (min-max) of -r
repetitions. The bound is the machine's read bandwidth, measured with pyllm's probe
(_core.read_bandwidth, 1 GiB, the same thread count) before and after the runs; decode as a
fraction of it is MB/token x decode tok/s / bound. RSS: VmRSS of each worker after its runs
(VmHWM, the peak, in brackets), interpreter and libraries included. Load: the engine's
constructor (pyllm.LLM, llama_cpp.Llama, from_pretrained) with the file in the page cache.
Sanity check: the last-position logits of a
short prompt, pyllm (and transformers) against llama.cpp of the same model: NMSE beside each row.
f16 against F16 is the tight check (~1e-6; flagged "MISMATCH?" above 1e-3); the quantized pairs
differ by their quantizers' noise (int4_asym against Q4_0: ~0.2 on SmolLM2, where Q4_0 costs +24%
perplexity, ~0.6 on the random model), flagged only above 1, where two unrelated models lie.

Which llama.cpp: llama-cpp-python loads the libllama.so of --llama-cpp-lib DIR (default: the
LLAMA_CPP_LIB_PATH environment variable, else the library the wheel ships); the header prints its
system info (the instruction sets it uses). To compare with llama.cpp built for a given instruction
set (e.g. AVX2 only, beside PYLLM_KERNELS=avx2), build it from the llama-cpp-python sdist:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   # holds vendor/llama.cpp
    cmake -S vendor/llama.cpp -B avx2 -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_OPENMP=ON \
          -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
          -DGGML_AVX_VNNI=OFF -DGGML_BMI2=ON     # or -DGGML_NATIVE=ON for every instruction this CPU has
    cmake --build avx2 -j --target llama
and pass --llama-cpp-lib avx2/bin; install the binding without compiling it:
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install llama_cpp_python-0.3.36.tar.gz
The random families' GGUFs need llama.cpp's converter: --llama-cpp-src (default: LLAMA_CPP_SRC), the
vendor/llama.cpp directory of that sdist. --drop-sources deletes their F16 GGUFs and checkpoints once
the compared files are built (each is 2-3 GB); a later run with other formats builds them again.

llama-cpp-python (0.3.36) and torch/transformers are benchmark-only dependencies.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "tools"))
from random_family import FAMILIES  # noqa: E402

# pyllm quantization -> llama.cpp type made from the same weights
FORMAT_PAIRS = {"int4_sym": "Q4_0", "int4_asym": "Q4_0", "int8": "Q8_0", "f16": "F16"}
GROUP_SIZE = 32
RANDOM_1B_CONFIG = {  # TinyLlama-1.1B's shapes, SmolLM2's vocabulary
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
}
SANITY_PROMPT = "The capital of France is Paris. The capital of Germany is"
# logits NMSE above which a pair is flagged: f16 against F16 must agree closely; quantized pairs
# differ by their quantizers' noise, which deep random models amplify (int4_asym / Q4_0 ~0.6 on random-1.1b)
NMSE_SUSPICIOUS = {"f16": 1e-3, "quantized": 1.0}


# --- model files --------------------------------------------------------------------------------

def pyllm_file(source: Callable[[], str], out: str, quant: str) -> str:
    """source() (an HF directory or GGUF, made on demand) converted to out with pyllm's converter;
    reused while it opens."""
    from pyllm.convert import convert_checkpoint
    from pyllm.formats.packed import PackedModel
    from pyllm.formats.safetensors import FormatError

    if os.path.exists(out):
        try:
            PackedModel(out).close()
            return out
        except FormatError as e:  # an older format version: convert again
            print(f"reconverting {out}: {e}", file=sys.stderr)
    path = source()
    print(f"converting {path} -> {out} ({quant})", file=sys.stderr, flush=True)
    convert_checkpoint(path, out, quant=quant, group_size=GROUP_SIZE, progress=False)
    return out


def random_tensors(config: dict, seed: int = 0):
    """(Hugging Face name, f32 array) of a random llama model; values are exact in f16."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = [("model.embed_tokens.weight", (v, d))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (q, d)),
                   (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                   (p + "self_attn.o_proj.weight", (d, q)), (p + "post_attention_layernorm.weight", (d,)),
                   (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                   (p + "mlp.down_proj.weight", (d, f))]
    shapes += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    for index, (name, shape) in enumerate(shapes):
        if len(shape) == 1:
            yield name, np.ones(shape, dtype=np.float32)
        else:
            rng = np.random.default_rng([seed, index])
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            yield name, values.astype(np.float16).astype(np.float32)


def random_1b_gguf(path: str) -> str:
    """The random-1.1b model as an F16 GGUF with SmolLM2's tokenizer at `path`, written on first use."""
    from llama_gguf import write_llama_gguf

    from pyllm import default_model

    if not os.path.exists(path):
        print(f"writing {path} (random weights, TinyLlama-1.1B shapes)", file=sys.stderr, flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_llama_gguf(path, RANDOM_1B_CONFIG, random_tensors(RANDOM_1B_CONFIG),
                         tokenizer_from=default_model.fetch_gguf(), dtype="F16", name="random-1.1b")
    return path


def model_files(model: str, formats: list[str], engines: list[str], work: str, llama_cpp_src: str | None = None,
                drop_sources: bool = False) -> dict:
    """{"pyllm": {fmt: path}, "llama.cpp": {type: path}, "hf": dir or None} for one model; a family that
    llama.cpp cannot run gets no llama.cpp files. drop_sources: delete a random family's F16 GGUF and
    checkpoint once the files compared are built."""
    from llama_gguf import dequantized_gguf, llama_cpp_quantize
    from random_family import llama_cpp_runs, random_family_checkpoint, random_family_gguf

    from pyllm import default_model
    from pyllm.convert.pipeline import resolve_quant

    files: dict = {"pyllm": {}, "llama.cpp": {}, "hf": None}
    prefix = model
    family = model.removeprefix("random-1.1b-") if model.startswith("random-1.1b-") else None
    if model not in ("smollm2", "random-1.1b") and family is None:
        raise ValueError(f"unknown model {model!r} (smollm2, random-1.1b, random-1.1b-FAMILY)")
    if family is not None and not llama_cpp_runs(family):
        engines = [e for e in engines if e != "llama.cpp"]
    # the GGUF both engines start from (pyllm: except smollm2, converted from its checkpoint)
    base = os.path.join(work, f"{prefix}-F32.gguf" if model == "smollm2" else f"{prefix}-F16.gguf")
    checkpoint = os.path.join(work, f"{prefix}-hf")

    def source() -> str:
        """The GGUF (or, for OPT, the checkpoint) the compared files are made from, built on first use."""
        if model == "smollm2":
            return dequantized_gguf(default_model.fetch_gguf(), base)
        if model == "random-1.1b":
            return random_1b_gguf(base)
        if not llama_cpp_runs(family):  # pyllm alone, from the checkpoint
            return random_family_checkpoint(family, checkpoint)
        if not llama_cpp_src:
            raise ValueError(f"{model} needs llama.cpp's converter: pass --llama-cpp-src or set LLAMA_CPP_SRC")
        return random_family_gguf(family, base, work, llama_cpp_src)

    if model == "smollm2":
        from reference_checkpoint import default_reference_checkpoint

        files["hf"] = default_reference_checkpoint()
    for fmt in formats:
        if "pyllm" in engines:
            out = os.path.join(work, f"{prefix}-{resolve_quant(fmt, GROUP_SIZE)[0]}-g{GROUP_SIZE}.pllm")
            files["pyllm"][fmt] = pyllm_file((lambda: files["hf"]) if model == "smollm2" else source, out, fmt)
        if "llama.cpp" in engines:
            ltype = FORMAT_PAIRS[fmt]
            out = os.path.join(work, f"{prefix}-{ltype}.gguf")
            if out == base:
                files["llama.cpp"][ltype] = source()
            else:
                files["llama.cpp"][ltype] = out if os.path.exists(out) else llama_cpp_quantize(source(), out, ltype)
    if drop_sources and family is not None and base not in files["llama.cpp"].values():
        if os.path.exists(base):
            os.remove(base)
        shutil.rmtree(checkpoint, ignore_errors=True)
    return files


# --- workers: one engine each, in its own process -----------------------------------------------

class PyllmEngine:
    def __init__(self, path: str, threads: int, n_ctx: int):
        import pyllm
        from pyllm.bench import pyllm_weight_bytes_per_token

        start = time.perf_counter()
        self.llm = pyllm.LLM(path, n_threads=threads, context_length=n_ctx)
        self.load_seconds = time.perf_counter() - start
        self.bytes_per_token = pyllm_weight_bytes_per_token(self.llm.model)

    def run(self, prompt: np.ndarray, decode_ids: np.ndarray) -> tuple[float, float]:
        from pyllm.bench import time_engine

        return time_engine(self.llm.engine, prompt, decode_ids)

    def last_logits(self, prompt: np.ndarray) -> np.ndarray:
        return self.llm.engine.forward(prompt, 0, False)


class LlamaCppEngine:
    def __init__(self, path: str, threads: int, n_ctx: int):
        import gguf
        from llama_cpp import Llama

        from pyllm.bench import weight_bytes_per_token

        start = time.perf_counter()
        batch = min(n_ctx, 512)
        self.model = Llama(path, n_ctx=-(-n_ctx // 256) * 256, n_batch=batch, n_ubatch=batch, n_threads=threads,
                           n_threads_batch=threads, verbose=False)
        self.load_seconds = time.perf_counter() - start
        tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
        self.bytes_per_token = weight_bytes_per_token(tensors, "token_embd.", "output.", self.model.n_vocab())

    def run(self, prompt: np.ndarray, decode_ids: np.ndarray) -> tuple[float, float]:
        self.model.reset()
        start = time.perf_counter()
        self.model.eval(prompt.tolist())
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for token in decode_ids.tolist():
            self.model.eval([token])
        return prefill, time.perf_counter() - start

    def last_logits(self, prompt: np.ndarray) -> np.ndarray:
        self.model.reset()
        self.model.eval(prompt.tolist())  # without logits_all, llama.cpp keeps only the last row
        return np.ctypeslib.as_array(self.model._ctx.get_logits(), shape=(self.model.n_vocab(),)).copy()


class TransformersEngine:
    def __init__(self, path: str, threads: int, n_ctx: int):
        import torch
        from transformers import AutoModelForCausalLM

        from pyllm.bench import weight_bytes_per_token
        from pyllm.formats.safetensors import SafetensorsFile

        torch.set_num_threads(threads)
        self.torch = torch
        start = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.load_seconds = time.perf_counter() - start
        # transformers 5.2x renamed past_key_values to cache
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        with SafetensorsFile(os.path.join(path, "model.safetensors")) as f:
            tensors = {n: i.nbytes for n, i in f.tensors.items()}
        self.bytes_per_token = weight_bytes_per_token(tensors, "model.embed_tokens.", "lm_head.",
                                                      self.model.config.vocab_size)

    def _step(self, ids: np.ndarray, cache):
        """ids: int32 [k] appended to cache; returns the model output (logits of the last position only)."""
        return self.model(input_ids=self.torch.from_numpy(ids.astype(np.int64))[None], use_cache=True,
                          logits_to_keep=1, **{self.cache_argument: cache})

    def run(self, prompt: np.ndarray, decode_ids: np.ndarray) -> tuple[float, float]:
        from transformers import DynamicCache

        with self.torch.inference_mode():
            cache = DynamicCache()
            start = time.perf_counter()
            self._step(prompt, cache)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(len(decode_ids)):
                self._step(decode_ids[i:i + 1], cache)
            return prefill, time.perf_counter() - start

    def last_logits(self, prompt: np.ndarray) -> np.ndarray:
        from transformers import DynamicCache

        with self.torch.inference_mode():
            return self._step(prompt, DynamicCache()).logits[0, -1].float().numpy()


ENGINES = {"pyllm": PyllmEngine, "llama.cpp": LlamaCppEngine, "transformers": TransformersEngine}


def worker_main(spec: dict) -> None:
    """Answers one JSON command per stdin line with one JSON line on the original stdout."""
    from pyllm.bench import memory_status

    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, not into the replies
    engine = ENGINES[spec["engine"]](spec["path"], spec["threads"], spec["n_ctx"])
    reply.write(json.dumps({"load_seconds": engine.load_seconds, "bytes_per_token": engine.bytes_per_token}) + "\n")
    reply.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "run":
            prefill, decode = engine.run(np.asarray(cmd["prompt"], np.int32), np.asarray(cmd["decode"], np.int32))
            answer = {"prefill_seconds": prefill, "decode_seconds": decode}
        elif cmd["cmd"] == "memory":
            answer = memory_status()
        elif cmd["cmd"] == "logits":
            np.save(cmd["out"], engine.last_logits(np.asarray(cmd["prompt"], np.int32)))
            answer = {}
        else:
            break
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


class Worker:
    """The parent's handle on a worker process."""

    def __init__(self, engine: str, label: str, path: str, threads: int, n_ctx: int):
        self.engine, self.label, self.path = engine, label, path
        spec = {"engine": engine, "path": path, "threads": threads, "n_ctx": n_ctx}
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()
        self.prefill: list[float] = []
        self.decode: list[float] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.engine} worker for {self.path} died (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait()


# --- the comparison -----------------------------------------------------------------------------

def run_group(workers: list[Worker], prompt: np.ndarray, decode_ids: np.ndarray, sanity_ids: np.ndarray,
              repetitions: int, tmp: str) -> list[dict]:
    """Warm-up, then repetitions with the engines taking turns; memory and logits of each afterwards."""
    for w in workers:
        w.ask(cmd="run", prompt=prompt.tolist(), decode=decode_ids[:8].tolist())
    for rep in range(repetitions):
        for w in workers:
            r = w.ask(cmd="run", prompt=prompt.tolist(), decode=decode_ids.tolist())
            w.prefill.append(len(prompt) / r["prefill_seconds"])
            w.decode.append(len(decode_ids) / r["decode_seconds"])
            print(f"  {w.label} rep {rep + 1}: prefill {w.prefill[-1]:.1f} decode {w.decode[-1]:.1f} tok/s",
                  file=sys.stderr, flush=True)
    rows = []
    for w in workers:
        memory = w.ask(cmd="memory")
        out = os.path.join(tmp, f"{len(os.listdir(tmp))}.npy")
        w.ask(cmd="logits", prompt=sanity_ids.tolist(), out=out)
        rows.append({"engine": w.engine, "format": w.label, "path": w.path, "prefill": w.prefill,
                     "decode": w.decode, "bytes_per_token": w.info["bytes_per_token"],
                     "load_seconds": w.info["load_seconds"], "rss": memory.get("VmRSS"),
                     "peak_rss": memory.get("VmHWM"), "logits": np.load(out)})
        w.close()
    return rows


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def table(rows: list[dict], bound: float, p: int, n: int) -> str:
    from pyllm.quant import nmse

    lines = [(f"| model | engine | format | MB/token | prefill {p} tok/s | decode {n} tok/s | decode GB/s | "
             "% of bound | RSS MB (peak) | load s | prefill vs llama.cpp | decode vs llama.cpp | logits NMSE vs llama.cpp |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gbs = r["bytes_per_token"] * statistics.median(r["decode"]) / 1e9
        ratio_p = ratio_d = error = "-"
        ref = r.get("reference")
        if ref is not None:
            value = nmse(r["logits"], ref["logits"])
            limit = NMSE_SUSPICIOUS["f16" if r["format"] in ("f16", "fp32") else "quantized"]
            error = f"{value:.1e}" + (" (MISMATCH?)" if value > limit else "")
            if r["engine"] == "pyllm":  # transformers shows its NMSE only
                ratio_p = f"{statistics.median(r['prefill']) / statistics.median(ref['prefill']):.2f}x"
                ratio_d = f"{statistics.median(r['decode']) / statistics.median(ref['decode']):.2f}x"
        memory = f"{r['rss'] / 1e6:.0f} ({r['peak_rss'] / 1e6:.0f})" if r["rss"] else "-"
        lines.append(f"| {r['model']} | {r['engine']} | {r['format']} | {r['bytes_per_token'] / 1e6:.1f} | "
                     f"{cell(r['prefill'])} | {cell(r['decode'])} | {gbs:.2f} | {100 * gbs / bound:.0f}% | {memory} | "
                     f"{r['load_seconds']:.2f} | "
                     f"{ratio_p} | {ratio_d} | {error} |")
    return "\n".join(lines)


def versions() -> str:
    import platform

    import pyllm
    from pyllm import _core

    parts = [f"pyllm {pyllm.__version__} (kernels {_core.active_kernels()})", f"Python {platform.python_version()}",
             f"numpy {np.__version__}"]
    for module in ("llama_cpp", "torch", "transformers"):
        try:
            parts.append(f"{module.replace('_', '-').replace('llama-cpp', 'llama-cpp-python')} "
                         f"{__import__(module).__version__}")
        except ImportError:
            pass
    return ", ".join(parts)


def llama_cpp_system_info() -> str:
    """The loaded libllama's own summary (instruction sets it was built with) and where it came from."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return f"{info} (library: {os.environ.get('LLAMA_CPP_LIB_PATH') or 'the one llama-cpp-python ships'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2",
                    help="comma-separated: smollm2, random-1.1b, random-1.1b-FAMILY (" + ", ".join(FAMILIES) + ")")
    ap.add_argument("--formats", default="int4_sym,int4_asym,int8,f16", help=f"comma-separated: {', '.join(FORMAT_PAIRS)}")
    ap.add_argument("--engines", default="pyllm,llama.cpp,transformers", help="comma-separated: " + ", ".join(ENGINES))
    ap.add_argument("-p", type=int, default=512, help="prompt tokens (default 512)")
    ap.add_argument("-n", type=int, default=128, help="decoded tokens (default 128)")
    ap.add_argument("-r", type=int, default=3, help="repetitions, at least 3 for the table (default 3)")
    ap.add_argument("-t", type=int, default=2, help="threads of every engine (default 2)")
    ap.add_argument("--bandwidth-mib", type=int, default=1024, help="buffer of the read-bandwidth probe (MiB)")
    ap.add_argument("--work", default=None, help="where built model files are cached (default ~/.cache/pyllm/bench)")
    ap.add_argument("--llama-cpp-lib", default=os.environ.get("LLAMA_CPP_LIB_PATH"),
                    help="directory of the libllama.so llama-cpp-python loads (default: $LLAMA_CPP_LIB_PATH)")
    ap.add_argument("--llama-cpp-src", default=os.environ.get("LLAMA_CPP_SRC"),
                    help="llama.cpp source tree, for convert_hf_to_gguf.py (default: $LLAMA_CPP_SRC)")
    ap.add_argument("--drop-sources", action="store_true",
                    help="delete the random families' F16 GGUFs and checkpoints once the compared files exist")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    import pyllm
    from pyllm import _core, default_model
    from pyllm.bench import benchmark_tokens, cpu_name

    models = args.models.split(",")
    formats = args.formats.split(",")
    engines = args.engines.split(",")
    for name, known in (("format", FORMAT_PAIRS), ("engine", ENGINES)):
        for value in formats if name == "format" else engines:
            if value not in known:
                ap.error(f"unknown {name} {value!r}")
    if min(args.p, args.n, args.r, args.t) < 1:
        ap.error("-p, -n, -r and -t must be at least 1")
    for model in models:
        if model not in ("smollm2", "random-1.1b") and model.removeprefix("random-1.1b-") not in FAMILIES:
            ap.error(f"unknown model {model!r}")
    if args.llama_cpp_lib:
        if not os.path.isdir(args.llama_cpp_lib):
            ap.error(f"--llama-cpp-lib {args.llama_cpp_lib}: no such directory")
        os.environ["LLAMA_CPP_LIB_PATH"] = os.path.abspath(args.llama_cpp_lib)  # this process and the workers
    work = args.work or os.path.join(default_model.cache_dir(), "bench")
    os.makedirs(work, exist_ok=True)

    bounds = [_core.read_bandwidth(args.t, args.bandwidth_mib << 20, 5)]
    print(f"read bandwidth ({args.t} threads): {bounds[0]:.2f} GB/s", file=sys.stderr, flush=True)
    # both models use SmolLM2's tokenizer and vocabulary: the default model tokenizes the sanity prompt
    with pyllm.LLM(default_model.default_model_path(), context_length=16) as llm:
        vocab = llm.config.vocab_size
        sanity_ids = np.asarray(llm.tokenize(SANITY_PROMPT), np.int32)
    prompt, decode_ids = benchmark_tokens(vocab, args.p, args.n)
    n_ctx = max(args.p + args.n, len(sanity_ids))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            files = model_files(model, formats, engines, work, args.llama_cpp_src, args.drop_sources)
            groups = []
            for fmt in formats:
                group = []
                if "pyllm" in engines:
                    group.append(("pyllm", fmt, files["pyllm"][fmt]))
                if FORMAT_PAIRS[fmt] in files["llama.cpp"]:  # not for a family llama.cpp cannot run
                    group.append(("llama.cpp", FORMAT_PAIRS[fmt], files["llama.cpp"][FORMAT_PAIRS[fmt]]))
                groups.append(group)
            if "transformers" in engines and files["hf"]:
                groups.append([("transformers", "fp32", files["hf"])])
            llama_rows: dict[str, dict] = {}
            for group in groups:
                print(f"{model}: " + " vs ".join(f"{e} {f}" for e, f, _ in group), file=sys.stderr, flush=True)
                workers: list[Worker] = []
                try:
                    for engine, label, path in group:
                        workers.append(Worker(engine, label, path, args.t, n_ctx))
                    group_rows = run_group(workers, prompt, decode_ids, sanity_ids, args.r, tmp)
                except RuntimeError as e:  # a worker died: report it, keep the other groups' rows
                    print(f"{model}: skipped this group: {e}", file=sys.stderr, flush=True)
                    for w in workers:
                        w.proc.kill()
                        w.proc.wait()
                    continue
                for r in group_rows:
                    r["model"] = model
                    if r["engine"] == "llama.cpp":
                        llama_rows[r["format"]] = r
                    else:  # pyllm against its pair, transformers against the closest to fp32
                        r["reference_format"] = FORMAT_PAIRS.get(r["format"], "F16")
                rows += group_rows
            for r in rows:
                if r["model"] == model and "reference_format" in r:
                    r["reference"] = llama_rows.get(r["reference_format"])
    bounds.append(_core.read_bandwidth(args.t, args.bandwidth_mib << 20, 5))
    bound = max(bounds)
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu_name()} ({os.cpu_count()} cores), "
          f"{args.t} threads; median (min-max) of {args.r} repetitions, engines alternating.")
    print(f"Read-bandwidth bound ({args.t} threads, {args.bandwidth_mib} MiB): {bound:.2f} GB/s "
          f"(before {bounds[0]:.2f}, after {bounds[1]:.2f}).")
    print(f"Versions: {versions()}.")
    if "llama.cpp" in engines:
        print(f"llama.cpp: {llama_cpp_system_info()}")
    kernels = os.environ.get("PYLLM_KERNELS")
    print("Command: " + (f"PYLLM_KERNELS={kernels} " if kernels else "") +
          f"python benchmarks/compare.py --models {args.models} --formats {args.formats} "
          f"--engines {args.engines} -p {args.p} -n {args.n} -r {args.r} -t {args.t}" +
          (f" --llama-cpp-lib {args.llama_cpp_lib}" if args.llama_cpp_lib else "") +
          (f" --work {args.work}" if args.work else "") + "\n")
    print(table(rows, bound, args.p, args.n))


if __name__ == "__main__":
    main()
