"""Concurrent streaming clients against `pyllm serve --parallel N` beside `llama-server --parallel N`.

    python benchmarks/serve_load.py [--models smollm2,random-1.1b] [--clients 1,2,4,8,16] [-n 64]
        [--requests 2] [-r 2] [-t 2] [--llama-cpp-dir DIR] [--engines pyllm,pyllm-outliers,pyllm-int8,llama-server]
        [--json FILE]
        [--temperature 0] [--top-p 1] [--client events|objects]

Same weights (benchmarks/compare.py's files: SmolLM2-135M-Instruct's f32 weights as pyllm int4_sym
g32 beside llama.cpp's Q4_0 quantization of them; random weights with TinyLlama-1.1B's shapes the
same way), same threads (-t, both for generation and prompts), 127.0.0.1 only, the official `openai`
client (reading each stream's raw events unless --client objects; see CLIENT_MODES), greedy (or --temperature / --top-p) /v1/completions requests that stream and ignore the
end-of-sequence token (pyllm: logit_bias -100 on the model's end ids; llama-server: ignore_eos) so
that each generates exactly -n tokens. For each client count C both servers run with --parallel C
(each slot holding --ctx tokens); C clients send --requests streaming requests each, one after the
other (distinct ~60-token prompts), all at once. Reported per engine and C: aggregate generated tokens/s over the run (all
tokens over the wall time, prefill included), aggregate decode tokens/s (each client's tokens after
its first over the time it streamed them, summed over the clients: the issue's "decode
throughput"), time to first token (TTFT) and inter-token latency (ITL: gaps between streamed
chunks) at p50/p99 over all requests. At C = 8 (when measured) it also times a ~250-token prompt
arriving while 7 other clients stream, against the same request on the idle server (chunked
prefill). Per C the engines take turns every repetition (the order alternating), after one
warm-up request each; the table gives medians over -r repetitions. The ratios of the issue's
targets follow the table. Engine pyllm-int8 is `pyllm serve --activation-quant int8` (one int8 term
per activation value, as llama.cpp) on the same file, pyllm-outliers `--activation-quant
int8x2_outliers` (two terms only in outlier blocks).

The servers inherit the environment: on a shared machine OMP_WAIT_POLICY=passive makes llama-server's
OpenMP threads sleep instead of spinning while they wait (pyllm's thread pool does not use OpenMP).

llama-server: --llama-cpp-dir DIR or $LLAMA_CPP_DIR holds bin/llama-server (or llama-server). Build
it from the llama.cpp that llama-cpp-python's source distribution carries:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
          -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DGGML_OPENMP=ON && cmake --build build -j --target llama-server
Making the GGUF files needs llama-cpp-python's quantizer (CMAKE_ARGS="-DLLAMA_BUILD=OFF" pip install
llama_cpp_python-0.3.36.tar.gz, then LLAMA_CPP_LIB_PATH=DIR/bin) as benchmarks/compare.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, os.pardir))

TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
        "salt, wool and grain. Over the centuries the market grew into a town with walls, a cathedral and a "
        "university, and its bridges carried the roads of three kingdoms. ")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values, by linear interpolation; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


# -- servers --------------------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# pyllm's engines by name: the options `pyllm serve` gets beside the common ones
PYLLM_ENGINES = {"pyllm": [], "pyllm-outliers": ["--activation-quant", "int8x2_outliers"],
                 "pyllm-int8": ["--activation-quant", "int8"]}


class ServerProcess:
    """One server on 127.0.0.1 (its output in a temporary log); ready once /health answers 200."""

    def __init__(self, engine: str, path: str, parallel: int, ctx: int, threads: int, llama_server: str | None,
                 eos_ids: list[int]):
        self.engine, self.port, self.ctx = engine, _free_port(), ctx
        self._clients: dict[int, object] = {}  # client number -> its openai client (see client())
        self._clients_lock = threading.Lock()
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"serve_load_{engine}_", suffix=".log", delete=False)
        if engine in PYLLM_ENGINES:
            command = [sys.executable, "-m", "pyllm", "serve", path, "--host", "127.0.0.1", "--port", str(self.port),
                       "-t", str(threads), "--parallel", str(parallel), "--ctx", str(ctx), "--model-name", "m",
                       *PYLLM_ENGINES[engine]]
            self.extra = {"logit_bias": {str(i): -100 for i in eos_ids}}
        else:
            command = [llama_server, "-m", path, "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads),
                       "-tb", str(threads), "-np", str(parallel), "-c", str(ctx * parallel), "-a", "m"]
            self.extra = {"ignore_eos": True}
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 600
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.process.poll() is not None or time.time() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"{engine} server did not start:\n{self.log.read()[-3000:]}")
            time.sleep(0.2)

    def client(self, number: int):
        """Client `number`'s openai client, made once and kept for the server's life, as an application
        keeps its client: a client made per request took ~70% of the load generator's CPU (py-spy:
        `ssl.create_default_context` loading the CA bundle, for plain http) from the two cores the
        servers run on. Its connection stays open between its requests (HTTP keep-alive, both servers)."""
        with self._clients_lock:
            client = self._clients.get(number)
            if client is None:
                import openai

                client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=600)
                self._clients[number] = client
        return client

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        os.unlink(self.log.name)


# -- clients --------------------------------------------------------------------------------------

# The requests' sampling (--temperature, --top-p): greedy unless set. With temperature > 0 llama-server
# is also asked for top_k 0 and min_p 0 (its defaults are 40 and 0.05) and for temperature first in its
# sampler chain (its default applies it last, after top-p; pyllm, as transformers, first), so both
# draw from the same distribution.
SAMPLING = {"temperature": 0.0, "top_p": 1.0}
# How the clients read a stream (--client): "events" reads the official client's raw response and
# decodes each server-sent event with json.loads; "objects" iterates the client's Stream of parsed
# ChatCompletion-style objects. The clients are threads of this process, so their work is serialized
# on one GIL: measured on Zen 5, one client thread spends 0.21 ms of CPU a streamed token with
# "events" and 0.37-0.61 ms with "objects", and 8 clients parsing objects (1.3 ms a token with 8
# threads contending) became the load generator's own bottleneck at 8 streams on 2 cores.
CLIENT_MODES = ("events", "objects")
CLIENT = {"mode": "events"}
LLAMA_SERVER_SAMPLERS = ["temperature", "top_k", "top_p", "min_p"]


def stream_request(server: ServerProcess, prompt: str, max_tokens: int, stop_after: threading.Event | None = None,
                   first: threading.Event | None = None, number: int = 0) -> dict:
    """One streamed completion by client `number` (one request at a time each): {"sent", "chunks":
    [arrival times of content chunks], "tokens"}."""
    client = server.client(number)
    sent = time.perf_counter()
    chunks, tokens = [], None
    extra = dict(server.extra)
    if SAMPLING["temperature"] > 0 and server.engine == "llama-server":
        extra.update(top_k=0, min_p=0.0, samplers=LLAMA_SERVER_SAMPLERS)
    request = dict(model="m", prompt=prompt, max_tokens=max_tokens, stream=True, temperature=SAMPLING["temperature"],
                   top_p=SAMPLING["top_p"], stream_options={"include_usage": True}, extra_body=extra)

    def chunk(text: str | None, usage: int | None) -> bool:
        """Records one streamed chunk; True when the caller should stop reading."""
        nonlocal tokens
        if text:
            chunks.append(time.perf_counter())
            if first is not None and len(chunks) == 1:
                first.set()
        if usage is not None:
            tokens = usage
        return stop_after is not None and stop_after.is_set()

    if CLIENT["mode"] == "objects":
        stream = client.completions.create(**request)
        for c in stream:
            if chunk(c.choices[0].text if c.choices else None, c.usage.completion_tokens if c.usage else None):
                break
        stream.close()
    else:
        with client.completions.with_streaming_response.create(**request) as response:
            for event in sse_events(response.http_response.iter_raw()):
                if event == b"[DONE]":
                    break
                c = json.loads(event)
                usage = (c.get("usage") or {}).get("completion_tokens")
                if chunk(c["choices"][0].get("text") if c.get("choices") else None, usage):
                    break
    return {"sent": sent, "chunks": chunks, "tokens": tokens if tokens is not None else len(chunks)}


def sse_events(pieces):
    """The data of each server-sent event (bytes) in a stream of byte pieces (events end with a blank line)."""
    buffer = b""
    for piece in pieces:
        buffer += piece
        *events, buffer = buffer.replace(b"\r\n", b"\n").split(b"\n\n")
        for event in events:
            data = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
            if data:
                yield data


def run_load(server: ServerProcess, clients: int, requests: int, max_tokens: int, tag: str) -> dict:
    """clients threads, each sending `requests` streamed requests in turn, started together."""
    results, errors = [], []
    go = threading.Barrier(clients + 1)

    def client(c: int):
        try:
            go.wait()
            for j in range(requests):
                results.append({**stream_request(server, f"{tag} request {c}.{j}: {TEXT}", max_tokens, number=c),
                                "client": c})
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    gaps = [b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:])]
    decode = 0.0  # each client's tokens after the first over its time streaming them, summed over clients
    for c in range(clients):
        mine = [r for r in results if r["client"] == c and len(r["chunks"]) > 1]
        seconds = sum(r["chunks"][-1] - r["chunks"][0] for r in mine)
        decode += sum(r["tokens"] - 1 for r in mine) / seconds if seconds > 0 else 0.0
    return {"tokens_per_second": sum(r["tokens"] for r in results) / wall, "decode_tokens_per_second": decode,
            "ttft_p50": percentile([r["chunks"][0] - r["sent"] for r in results], 50),
            "ttft_p99": percentile([r["chunks"][0] - r["sent"] for r in results], 99),
            "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99),
            "short": sum(r["tokens"] != max_tokens for r in results)}


def probe_ttft(server: ServerProcess, others: int, max_tokens: int, tag: str) -> float:
    """Seconds to the first token of a ~250-token prompt, sent once `others` clients stream (0: idle)."""
    stop, started, threads = threading.Event(), [], []
    for c in range(others):
        first = threading.Event()
        started.append(first)
        threads.append(threading.Thread(target=stream_request, daemon=True,
                                        # as many tokens as a slot leaves beside the prompt (a request past
                                        # the context is refused); the probe's end stops them
                                        args=(server, f"{tag} stream {c}: {TEXT}", min(max_tokens * 8, server.ctx // 2),
                                              stop, first, c)))
        threads[-1].start()
    for first in started:
        first.wait(timeout=600)
    result = stream_request(server, f"{tag} probe: " + TEXT * 5, 2, number=others)
    stop.set()
    for t in threads:
        t.join()
    return result["chunks"][0] - result["sent"]


# -- the run --------------------------------------------------------------------------------------

def model_paths(model: str, engines: list[str], work: str) -> dict:
    """{pyllm engine: .pllm path, "llama-server": GGUF path} via benchmarks/compare.py's files."""
    from compare import model_files

    files = model_files(model, ["int4_sym"], ["pyllm"] + (["llama.cpp"] if "llama-server" in engines else []), work)
    return {**{e: files["pyllm"]["int4_sym"] for e in PYLLM_ENGINES},
            "llama-server": files["llama.cpp"].get("Q4_0")}


def eos_ids(path: str) -> list[int]:
    from pyllm.formats.packed import PackedModel
    from pyllm.tokenizer import Tokenizer

    with PackedModel(path) as model:
        return list(Tokenizer(model.tokenizer, model.tokenizer_blob()).eos_ids)


def find_llama_server(directory: str | None) -> str:
    directory = directory or os.environ.get("LLAMA_CPP_DIR")
    if not directory:
        raise SystemExit("llama-server: give --llama-cpp-dir DIR or set LLAMA_CPP_DIR (see the docstring to build "
                         "it), or --engines pyllm")
    for candidate in (os.path.join(directory, "bin", "llama-server"), os.path.join(directory, "llama-server")):
        if os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit(f"no llama-server in {directory} or {directory}/bin")


def measure_model(model: str, args, llama_server: str | None) -> dict:
    paths = model_paths(model, args.engines, args.work)
    ends = eos_ids(paths["pyllm"])
    table: dict = {}
    for clients in args.clients:
        servers = {e: ServerProcess(e, paths[e], clients, args.ctx, args.threads, llama_server, ends)
                   for e in args.engines}
        try:
            for e, server in servers.items():  # warm-up
                stream_request(server, f"warm-up: {TEXT}", 4)
            runs: dict = {e: [] for e in args.engines}
            probes: dict = {e: {"idle": [], "loaded": []} for e in args.engines}
            for rep in range(args.repetitions):
                order = args.engines if rep % 2 == 0 else args.engines[::-1]
                for e in order:
                    runs[e].append(run_load(servers[e], clients, args.requests, args.n_gen, f"{model} {clients} {rep}"))
                    if clients == 8 and not args.no_probe:
                        probes[e]["idle"].append(probe_ttft(servers[e], 0, args.n_gen, f"idle {rep}"))
                        probes[e]["loaded"].append(probe_ttft(servers[e], 7, args.n_gen, f"loaded {rep}"))
            for e in args.engines:
                row = {k: statistics.median(r[k] for r in runs[e]) for k in runs[e][0]}
                if probes[e]["idle"]:
                    row["probe_ttft_idle"] = statistics.median(probes[e]["idle"])
                    row["probe_ttft_loaded"] = statistics.median(probes[e]["loaded"])
                table.setdefault(e, {})[clients] = row
                print(f"{model} {e} C={clients}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()),
                      file=sys.stderr, flush=True)
        finally:
            for server in servers.values():
                server.stop()
    return table


def report(model: str, table: dict, clients: list[int]) -> str:
    lines = [f"### {model}", "",
             "| engine | clients | tok/s over the run | decode tok/s | decode x 1 client | TTFT p50 / p99 (ms) | "
             "ITL p50 / p99 (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for engine, rows in table.items():
        one = rows.get(1, {}).get("decode_tokens_per_second")
        for c in clients:
            r = rows[c]
            ratio = f"{r['decode_tokens_per_second'] / one:.2f}x" if one else "-"
            lines.append(f"| {engine} | {c} | {r['tokens_per_second']:.1f} | {r['decode_tokens_per_second']:.1f} | {ratio} | "
                         f"{r['ttft_p50'] * 1e3:.0f} / {r['ttft_p99'] * 1e3:.0f} | "
                         f"{r['itl_p50'] * 1e3:.1f} / {r['itl_p99'] * 1e3:.1f} |")
    lines.append("")
    for engine, rows in table.items():
        notes = []
        if 1 in rows and 8 in rows:
            notes.append(f"8 streams / 1: {rows[8]['decode_tokens_per_second'] / rows[1]['decode_tokens_per_second']:.2f}x "
                         f"decode throughput ({rows[8]['tokens_per_second'] / rows[1]['tokens_per_second']:.2f}x over the "
                         "run, prefill included), "
                         f"ITL p50 {rows[8]['itl_p50'] / rows[1]['itl_p50']:.2f}x")
        if 8 in rows and "probe_ttft_idle" in rows[8]:
            r = rows[8]
            notes.append(f"TTFT of a 250-token prompt while 7 stream / idle: {r['probe_ttft_loaded'] * 1e3:.0f} / "
                         f"{r['probe_ttft_idle'] * 1e3:.0f} ms = {r['probe_ttft_loaded'] / r['probe_ttft_idle']:.2f}x")
        short = sum(r["short"] for r in rows.values())
        if short:
            notes.append(f"{short} request(s) ended before -n tokens")
        if notes:
            lines.append(f"- {engine}: " + "; ".join(notes))
    for engine in (e for e in PYLLM_ENGINES if e in table and "llama-server" in table):
        for c in clients:
            p, q = table[engine][c], table["llama-server"][c]
            lines.append(f"- {engine} / llama-server at {c} client(s): decode "
                         f"{p['decode_tokens_per_second'] / q['decode_tokens_per_second']:.2f}x, "
                         f"over the run {p['tokens_per_second'] / q['tokens_per_second']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    from pyllm.bench import cpu_name

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,random-1.1b", help="smollm2, random-1.1b (default both)")
    p.add_argument("--engines", default="pyllm,llama-server",
                   help="pyllm, pyllm-outliers (--activation-quant int8x2_outliers), pyllm-int8 (--activation-quant "
                        "int8), llama-server (default pyllm,llama-server)")
    p.add_argument("--clients", default="1,2,4,8,16", help="concurrent clients = --parallel (default 1,2,4,8,16)")
    p.add_argument("-n", "--n-gen", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--requests", type=int, default=2, help="requests per client per run (default 2)")
    p.add_argument("-r", "--repetitions", type=int, default=2, help="repetitions per client count (default 2)")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=512, help="tokens per slot (default 512)")
    p.add_argument("--no-probe", action="store_true", help="skip the TTFT-under-load probe at 8 clients")
    p.add_argument("--temperature", type=float, default=0.0, help="the requests' temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="the requests' top_p (default 1)")
    p.add_argument("--client", choices=CLIENT_MODES, default="events",
                   help="how the openai client's streams are read: events (its raw response, each event decoded "
                        "with json.loads; the default) or objects (its Stream of parsed chunks, ~2x the client CPU)")
    p.add_argument("--llama-cpp-dir", default=None, help="where llama-server is (default $LLAMA_CPP_DIR)")
    p.add_argument("--work", default=os.path.expanduser("~/.cache/pyllm/bench"), help="model files (cached)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",")]
    args.clients = [int(c) for c in args.clients.split(",")]
    SAMPLING.update(temperature=args.temperature, top_p=args.top_p)
    CLIENT["mode"] = args.client
    unknown = set(args.engines) - {*PYLLM_ENGINES, "llama-server"}
    if unknown:
        raise SystemExit(f"unknown engine(s) {', '.join(sorted(unknown))} ({', '.join(PYLLM_ENGINES)}, llama-server)")
    llama_server = find_llama_server(args.llama_cpp_dir) if "llama-server" in args.engines else None
    os.makedirs(args.work, exist_ok=True)
    results = {}
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; -t {args.threads}; -n {args.n_gen}; "
          f"{args.requests} request(s) per client; median of {args.repetitions}; temperature {args.temperature}, "
          f"top_p {args.top_p}; clients read {args.client}")
    for model in args.models.split(","):
        results[model] = measure_model(model, args, llama_server)
        print(report(model, results[model], args.clients), flush=True)
    if args.json:
        with open(args.json + ".partial", "w") as f:
            json.dump({"machine": cpu_name(), "args": {k: v for k, v in vars(args).items()}, "results": results}, f,
                      indent=1)
        os.replace(args.json + ".partial", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
