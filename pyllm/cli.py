"""The `pyllm` command: convert and run models."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import warnings

QUANT_NAMES = ["f32", "f16", "bf16", "int8", "int4", "int4_sym", "int4_asym", "int4_asym_dq"]


# Flags take transformers' spelling (--max-new-tokens, --repetition-penalty, --context-length) and
# llama.cpp's (-n/--n-predict, --repeat-penalty, -c/--ctx-size, --temp) as aliases of one another.

def _add_sampling(p: argparse.ArgumentParser, serve: bool = False) -> None:
    """serve: the options are defaults for requests that leave them unset ("the model's setting": its
    generation_config.json, read with transformers' rules: do_sample without a temperature is 1.0, without
    top_k 50)."""
    p.add_argument("-n", "--max-tokens", "--max-new-tokens", "--n-predict", dest="max_tokens", type=int, default=None,
                   metavar="N", help="most tokens to generate, -1: until the context is full (default: the model's "
                                     "setting, else 256)")
    p.add_argument("--temperature", "--temp", type=float, default=None, metavar="T",
                   help="0 = greedy (default: the model's setting, 1 when it samples without one; else 0)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the k most likely tokens, 0 or -1 = all (default: the model's setting, 50 "
                        "when it samples without one; else 0)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: the smallest set of tokens holding this probability (default: the "
                        "model's setting, else 1 = off)")
    p.add_argument("--min-p", type=float, default=None, metavar="P",
                   help="drop tokens less likely than min-p times the most likely one (default: the model's "
                        "setting, else 0 = off)")
    p.add_argument("--typical", "--typical-p", dest="typical_p", type=float, default=None, metavar="P",
                   help="locally typical sampling: tokens whose surprisal is nearest the entropy, holding this "
                        "probability (default: the model's setting, else 1 = off)")
    p.add_argument("--repeat-penalty", "--repetition-penalty", dest="repeat_penalty", type=float, default=None,
                   metavar="PENALTY", help="penalty on tokens already in the prompt or reply (transformers' "
                                           "repetition_penalty: their logits divided by it, multiplied when "
                                           "negative), 1 = off (default: the model's setting, else 1)")
    if serve:  # a seed given here seeds every request that sends none: each then samples the same way
        p.add_argument("--seed", type=int, default=None, metavar="N",
                       help="seed of requests that send none (each such request then gives the same text for "
                            "the same prompt); -1: unseeded (default: unseeded)")
    else:
        p.add_argument("--seed", type=int, default=None, metavar="N",
                       help="random seed of sampling, set once per session; -1: unseeded (default: a fresh one "
                            "each run)")


# SamplingParams field -> (argparse dest, flag) of _add_sampling's options
SAMPLING_FLAGS = {"temperature": ("temperature", "--temperature"), "top_k": ("top_k", "--top-k"),
                  "top_p": ("top_p", "--top-p"), "min_p": ("min_p", "--min-p"), "typical_p": ("typical_p", "--typical"),
                  "repetition_penalty": ("repeat_penalty", "--repeat-penalty")}


def _check_sampling(args) -> None:
    """_add_sampling's options out of range: ValueError naming the flag, before the model loads
    (`pyllm serve --temperature nan` started, then refused every request that left temperature unset
    with a 400 blaming the client's request; `pyllm run` failed at its first reply). -n -1: until the
    context is full."""
    from .sampling import SamplingParams, check_seed

    if args.max_tokens is not None and args.max_tokens < -1:
        raise ValueError("-n / --max-new-tokens must be >= 0, or -1 (until the context is full); "
                         f"got {args.max_tokens}")
    if args.top_k == -1:  # off, as 0 (llama.cpp's spelling; the server's requests take it too)
        args.top_k = 0
    for field, (dest, flag) in SAMPLING_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            try:
                SamplingParams(**{field: value}).validate()
            except ValueError as e:
                raise ValueError(f"{flag} {value}: {e}") from None
    try:  # (it was checked once the model was converted and loaded, naming no flag)
        check_seed(getattr(args, "seed", None))
    except ValueError as e:
        raise ValueError(f"--seed: {e}") from None


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="a .pllm file, a GGUF file or a Hugging Face model directory (the last two are converted "
                        "once into the cache and reused; `pyllm list`) (default: SmolLM2-135M-Instruct, fetched "
                        "and converted on first use)")
    p.add_argument("--quant", default=None, choices=QUANT_NAMES,
                   help="weight format when converting a GGUF file or a model directory (default: f16 for a "
                        "directory, the file's own formats for GGUF)")
    p.add_argument("--lora", action="append", metavar="ADAPTER", default=[],
                   help="PEFT LoRA adapter directory (pyllm train's output) merged into a Hugging Face model "
                        "directory as it is converted into the cache, as `pyllm convert --lora` (repeat to stack) "
                        "(default: none)")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--threads", "--n-threads", dest="threads", type=int, default=None, metavar="N",
                   help="threads (default: the CPUs this process may use: its affinity mask, at most a container's "
                        "CPU quota)")


def _add_context(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--ctx", "--ctx-size", "--context-length", "--n-ctx", dest="ctx", type=int, default=None,
                   metavar="TOKENS", help="context length in tokens (default: the model's, at most 4096)")


def _add_chat_template(p: argparse.ArgumentParser) -> None:
    from .chat_template import builtin_template_names

    p.add_argument("--chat-template", "--chat-format", "--chat_format", dest="chat_template", metavar="NAME|FILE",
                   default=None,
                   help=f"override the model's chat template: {builtin_template_names()}, or a Jinja "
                        "file (or a tokenizer_config.json) (default: the model's own)")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs (default cpu)")


def _add_kv_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache", choices=["auto", "f16", "f32", "q8_0"], default="auto",
                   help="element type of the KV cache, as llama.cpp's -ctk/-ctv: q8_0 halves the f16 cache's bytes "
                        "(head_dim a multiple of 32) (default auto: f32 for f32 models, else f16)")


def _add_activation_quant(p: argparse.ArgumentParser) -> None:
    p.add_argument("--activation-quant", choices=["int8x2", "int8", "int8x2_outliers"], default="int8x2",
                   help="activations of int4/int8 matrices (CPU): int8x2 keeps two int8 terms per value (~15 "
                        "bits); int8 one, as llama.cpp does: faster prompts and batches, perplexity "
                        "+0.1-0.5%%; int8x2_outliers two terms only in outlier blocks (docs/QUALITY.md) "
                        "(default int8x2)")


def _add_server_limits(p: argparse.ArgumentParser) -> None:
    from .limits import ServerLimits

    d = ServerLimits()
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, metavar="BYTES",
                   help=f"largest request body; larger ones get 413 (default {d.max_body_bytes})")
    p.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars, metavar="CHARS",
                   help=f"most characters of prompt text per request (default {d.max_prompt_chars})")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout, metavar="SECONDS",
                   help=f"seconds a client may take to send its request headers, and its body (default "
                        f"{d.body_timeout:g})")
    p.add_argument("--send-timeout", type=float, default=d.send_timeout, metavar="SECONDS",
                   help=f"seconds a client may leave a reply unread before it is dropped (default {d.send_timeout:g})")
    p.add_argument("--template-timeout", type=float, default=d.template_timeout, metavar="SECONDS",
                   help=f"seconds the chat template may take per request (default {d.template_timeout:g})")
    p.add_argument("--timeout-graceful-shutdown", type=float, default=d.timeout_graceful_shutdown, metavar="SECONDS",
                   help="seconds the requests in progress may take to finish once the server is asked to stop "
                        f"(SIGTERM, Ctrl-C); the rest are then ended (default {d.timeout_graceful_shutdown:g})")


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint

    from .convert.strategy import options_from_flags
    from .quant import check_group_size

    if args.group_size is not None and (args.quant or "").startswith("int"):
        try:  # the converter's message named no flag ("group size 7 is not supported")
            check_group_size("int8", args.group_size)
        except ValueError as e:
            raise ValueError(f"--group-size {args.group_size}: {e}") from None
    options = options_from_flags(args.quant, args.calib, args.rtn, args.keep_sensitive, args.bits, args.group_size,
                                 args.awq)
    with _saying_when_interrupted("convert", args.output):
        report = convert_checkpoint(args.source, args.output, quant=args.quant, group_size=args.group_size,
                                    progress=not args.quiet, lora=args.lora or (), options=options, log=sys.stderr,
                                    adapters=[_named_adapter(a) for a in args.adapter])
    if args.verbose:
        for name, error in report.nmse.items():
            print(f"  {name}: NMSE {error:.3e}", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    return 0


@contextlib.contextmanager
def _saying_when_interrupted(command: str, output: str):
    """Ctrl-C or SIGTERM (the CLI's SystemExit 143) during a write: one line saying that nothing was
    written and what became of the output (exit 130 said nothing; the writes are atomic)."""
    existed = os.path.lexists(output)
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, KeyboardInterrupt) or e.code == 143:
            print(f"\npyllm {command}: interrupted: nothing was written ({output} "
                  f"{'is as it was' if existed else 'was not created'})", file=sys.stderr)
        raise


def _named_adapter(text: str) -> tuple[str | None, str]:
    """--adapter NAME=DIR or DIR -> (name or None, directory)."""
    name, sep, directory = text.partition("=")
    if not sep or os.path.exists(text):
        return None, text
    if not name or not directory:
        raise ValueError(f"--adapter {text!r}: the {'name' if not name else 'directory'} is empty; give NAME=DIR "
                         "or DIR")
    return name, directory


def cmd_train(args) -> int:
    from .train import run

    run(args)
    return 0


def cmd_merge(args) -> int:
    from .convert.lora import write_merged_checkpoint

    with _saying_when_interrupted("merge", args.output):
        written = write_merged_checkpoint(args.base, args.lora, args.output, dtype=args.dtype)
    print(f"wrote {written}", file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    from .formats.packed import PackedModel

    from .formats.safetensors import HEADER_CHECKSUM_KEY

    path = args.model
    if not os.path.lexists(path):  # a cached model's name, as `pyllm list` shows it and `pyllm run` takes it
        from .model_cache import resolve_model

        try:
            path = resolve_model(path)  # (only looks the name up: nothing is converted for a path that is not there)
        except FileNotFoundError:  # (its words listed GGUF files and model directories, which verify does not take)
            raise FileNotFoundError(f"{path}: no such .pllm file or cached model (`pyllm list` shows them)") from None
    with PackedModel(path) as model:
        checked = model.verify()
    header = ("the header matches its own" if HEADER_CHECKSUM_KEY in model.file.metadata
              else "the header has none (written by an older pyllm): not checked")
    print(f"{path}: OK ({len(model.file.tensors)} tensors, {checked} bytes match their checksums; {header})")
    return 0


def model_path(args) -> str:
    """The .pllm file the command's model argument names (converted into the cache when needed)."""
    if args.model is None:
        if args.quant is not None:
            raise ValueError("--quant applies to a GGUF file or a model directory given as the model")
        if args.lora:
            raise ValueError("--lora applies to a Hugging Face model directory given as the model (the base the "
                             "adapter was trained on)")
        from .default_model import default_model_path

        return default_model_path()
    adapter = getattr(args, "adapter", None)
    if adapter not in (None, "base") and (os.path.isdir(args.model) or args.model.lower().endswith(".gguf")):
        # (the whole model was converted into the cache first, then the adapter refused)
        raise ValueError(f"--adapter {adapter}: prompt-learning adapters are stored in a .pllm file, and {args.model} "
                         f"converts into one without any: pyllm convert MODEL_DIR --adapter {adapter}=ADAPTER_DIR -o "
                         "FILE.pllm, then run FILE.pllm")
    from .model_cache import resolve_model

    return resolve_model(args.model, quant=args.quant, lora=args.lora)


def _check_sizes(args) -> None:
    """-t, --ctx and --parallel out of range: ValueError naming the flag (the library's message named its
    parameter: `pyllm run --ctx 0` said "context_length must be a positive integer")."""
    from .limits import check_context_length, check_parallel, check_threads

    for flag, dest, check in (("-t", "threads", check_threads), ("--ctx", "ctx", check_context_length),
                              ("--parallel", "parallel", check_parallel)):
        value = getattr(args, dest, None)
        if value is not None:
            try:
                check(value)
            except ValueError as e:
                raise ValueError(f"{flag} {value}: {e}") from None


def _open(args, path: str | None = None):
    """The command's LLM (path: model_path(args) when the caller resolved it already); a warning on
    stderr when --ctx passes the positions the model was trained on (rotary and ALiBi models run
    there, as in llama.cpp and transformers, but predict poorly; a model with learned positions
    refuses such a context)."""
    from .errors import ContextLengthWarning, LimitError
    from .llm import LLM

    _check_sizes(args)
    path = path or model_path(args)
    adapter = getattr(args, "adapter", None) if args.command in ("run", "perplexity") else None
    ctx = args.ctx
    if adapter is not None and args.command == "perplexity":  # each window follows the adapter's virtual
        ctx += _virtual_tokens(path, adapter)  # tokens: the context holds both
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ContextLengthWarning)  # said below, in the command's words
        try:
            llm = LLM(path, n_threads=args.threads, context_length=ctx,
                      chat_template=getattr(args, "chat_template", None), device=getattr(args, "device", "cpu"),
                      kv_cache=args.kv_cache, n_parallel=getattr(args, "parallel", 1),
                      activation_quant=args.activation_quant, adapter=adapter)
        except LimitError as e:  # a context past learned positions or memory: it named context_length, no flag
            given = f"--ctx {ctx}" + (f" --parallel {args.parallel}" if getattr(args, "parallel", 1) > 1 else "")
            raise LimitError(f"{given}: {e}") from None
    trained = llm.config.max_position_embeddings
    if args.ctx is not None and args.ctx > trained:
        print(f"pyllm {args.command}: warning: --ctx {args.ctx} exceeds the {trained} tokens the model was trained "
              "on; positions beyond them give unreliable predictions", file=sys.stderr)
    if llm.chat_template_fault and args.command == "serve":  # `pyllm run` stops at its first chat with it
        print(f"pyllm serve: warning: chat requests will fail: {llm.chat_template_fault}", file=sys.stderr)
    return llm


def _virtual_tokens(path: str, name: str) -> int:
    """The virtual tokens of the adapter `name` stored in the .pllm file (0 for a name it lacks: LLM then
    says which adapters it has)."""
    from .formats.packed import PackedModel

    with PackedModel(path) as model:
        adapter = model.adapters.get(name)
        return adapter.virtual_tokens if adapter is not None else 0


def cmd_run(args) -> int:
    from .repl import cut_notice

    sampling = dict(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed,
                    typical_p=args.typical_p)
    from .tokenizer import check_text

    prompt = args.prompt
    if args.prompt_words:
        if prompt is not None:
            raise ValueError(f"the prompt is given twice: -p, and {' '.join(args.prompt_words)!r} after the model; "
                             "give one")
        prompt = " ".join(args.prompt_words)
    if prompt is None and sys.stdin is None:  # started with stdin closed (`<&-`): Python sets it to None
        raise ValueError("stdin is closed: nothing to read a prompt from (give one with -p)")
    for value, flag in ((prompt, "-p"), (args.system, "--system")):
        if value is not None:  # an argument that is not UTF-8 arrives with lone surrogates in it
            check_text(value, f"the {flag} argument")
    if args.raw and args.system:
        raise ValueError("--system is a chat message: --raw continues the prompt as plain text, without one")
    _check_sampling(args)
    _check_sizes(args)
    # the model before stdin: `producer | pyllm run MISSING` waited for the producer to finish (or said
    # "stdin was empty") before naming the missing model
    path = model_path(args)
    if args.prompt_words and sys.stdin is not None and _piped(sys.stdin):
        # `cat notes.txt | ollama run M summarize`: ollama's prompt is the piped text, then the words (the
        # piped text was dropped in silence); only a pipe or a file, so a script's idle stdin is not waited on
        piped = _read_stdin()
        prompt = f"{piped.rstrip()}\n\n{prompt}" if piped.strip() else prompt
    if prompt is None and not sys.stdin.isatty():
        prompt = _read_stdin()
        if not prompt.strip():
            raise ValueError("stdin was empty: nothing to answer (pipe a prompt in, give -p, or run in a "
                             "terminal without -p to chat)")
    if prompt is not None and not prompt.strip():
        raise ValueError("the prompt is empty (give some text with -p, or leave -p out to chat)")
    if args.raw and prompt is None:
        raise ValueError("--raw continues a prompt as plain text: give one with -p or on stdin (the chat "
                         "without -p always uses the chat template)")
    llm = _open(args, path)
    if args.max_tokens == -1:  # llama.cpp's -n -1, as `pyllm serve -n -1` takes it (it was "must be >= 0")
        sampling["max_new_tokens"] = llm.context_length
    _note_unused_sampling(llm, args, sampling)
    if prompt is not None:
        if not llm.chat_template and not args.raw and args.system:
            raise ValueError("--system is a chat message, and the model has no chat template: give one with "
                             "--chat-template NAME, or leave --system out for plain completion")
        try:
            if llm.chat_template and not args.raw:
                messages = ([{"role": "system", "content": args.system}] if args.system else [])
                pieces = llm.chat(messages + [{"role": "user", "content": prompt}], stream=True, **sampling)
            else:
                if not args.raw:
                    print("(the model has no chat template: plain completion; --chat-template NAME to chat)",
                          file=sys.stderr)
                pieces = llm.generate(prompt, stream=True, **sampling)
        except ValueError as e:  # ("18 tokens exceed the context length of 4" named no way out)
            if "context" not in str(e):
                raise
            from .repl import too_long_advice

            raise ValueError(f"{e}: {too_long_advice(llm, 'the prompt')}") from None
        from .repl import for_terminal

        for piece in pieces:
            sys.stdout.write(for_terminal(piece, sys.stdout))
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        cut = cut_notice(llm.last_stats, llm.context_length)
        if cut:
            print(cut + "]", file=sys.stderr)
        print(llm.last_stats.line(), file=sys.stderr)
        return 0
    from .repl import chat_loop

    return chat_loop(llm, args.system, sampling)


def _piped(stream) -> bool:
    """Whether stream is a pipe or a file (`cat notes.txt |`, `< notes.txt`): not a terminal, /dev/null, a
    socket, or no file at all (a host's own stream)."""
    import stat

    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError, AttributeError):  # (io.UnsupportedOperation is both)
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def _read_stdin() -> str:
    """stdin's text, whole, at most MAX_STDIN_BYTES (a ValueError past it, or when it is not UTF-8)."""
    from .errors import decode_text
    from .limits import MAX_STDIN_BYTES

    binary = getattr(sys.stdin, "buffer", None)  # absent when a host replaced stdin with a text stream
    data = binary.read(MAX_STDIN_BYTES + 1) if binary is not None else sys.stdin.read(MAX_STDIN_BYTES + 1)
    if len(data) > MAX_STDIN_BYTES:
        raise ValueError(f"stdin holds more than {MAX_STDIN_BYTES >> 20} MiB: too long for a prompt (an "
                         f"endless pipe, such as `yes |`, never ends)")
    return decode_text(data, "stdin") if binary is not None else data


def _note_unused_sampling(llm, args, sampling: dict) -> None:
    """A note on stderr when sampling options were given but decoding is greedy (temperature 0, given or
    the model's default), where they change nothing (transformers warns the same way)."""
    if llm._sampling(*(sampling[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                              "seed", "typical_p"))).temperature != 0:
        return
    given = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--min-p", args.min_p),
                                      ("--typical", args.typical_p), ("--seed", args.seed)) if value is not None]
    if given:
        print(f"pyllm {args.command}: note: {', '.join(given)} change{'s' if len(given) == 1 else ''} nothing while "
              f"decoding is greedy "
              f"(temperature 0{'' if args.temperature is not None else ', the default'}): give --temperature "
              f"above 0 to sample", file=sys.stderr)


def cmd_serve(args) -> int:
    from .limits import DEFAULT_PARALLEL, ServerLimits
    from .serve import MISSING, Starlette, listen, serve

    if Starlette is None:
        raise RuntimeError(MISSING)
    _check_sampling(args)
    _check_sizes(args)
    if args.model_name is not None and not args.model_name.strip():  # (it fell back to the file name in silence)
        raise ValueError("--model-name is empty: give the model id clients send, or leave the flag out (the file "
                         "name)")
    if args.max_queue < 1:  # (Server takes 0, every request then busy: a test's way to see the 503)
        raise ValueError(f"--max-queue must be at least 1, got {args.max_queue}: every request would get 503")
    for field in dataclasses.fields(ServerLimits):  # each flag is the field's name: --max-body-bytes, ...
        try:
            ServerLimits(**{field.name: getattr(args, field.name)})
        except ValueError as e:
            raise ValueError(f"--{field.name.replace('_', '-')} {getattr(args, field.name)}: {e}") from None
    limits = ServerLimits(**{field.name: getattr(args, field.name) for field in dataclasses.fields(ServerLimits)})
    if args.device == "cuda":
        if args.parallel not in (None, 1):
            print("pyllm serve: --parallel is CPU-only (the CUDA engine holds one sequence): serving one request "
                  "at a time", file=sys.stderr)
        args.parallel = 1
    elif args.parallel is None:
        args.parallel = DEFAULT_PARALLEL
    if args.max_num_batched_tokens < args.parallel:
        raise ValueError(f"--max-num-batched-tokens ({args.max_num_batched_tokens}) must be at least --parallel "
                         f"({args.parallel}): every running request gets a row in each step")
    env_key = os.environ.get("PYLLM_API_KEY")
    if args.api_key == "" or (args.api_key is None and env_key == ""):
        # `--api-key "$KEY"` with KEY unset served without any key, and said nothing
        where = "--api-key" if args.api_key == "" else "PYLLM_API_KEY"
        raise ValueError(f"{where} is empty (an unset variable?): give the key clients must send, or leave "
                         f"{where} out to serve without one")
    api_key = args.api_key or env_key or None
    unsendable = api_key is not None and (api_key != api_key.strip()
                                          or any(c < " " and c != "\t" or c == "\x7f" for c in api_key))
    if unsendable:
        # an HTTP header holds no control characters and its value arrives stripped: such a key (a CR
        # from a Windows env file, a trailing space) matched no request, and every one was 401
        where = "--api-key" if args.api_key else "PYLLM_API_KEY"
        raise ValueError(f"{where} holds control characters or spaces around it, which no client can send in "
                         f"its Authorization header (every request would be refused); got {api_key!r:.40}")
    for origin in args.cors_origin or ():
        # a browser's Origin header is SCHEME://HOST[:PORT], compared as a string: "example.com" or
        # "https://example.com/" matched none, so every page's call was refused in silence
        scheme, sep, rest = origin.partition("://")
        if origin not in ("*", "null") and not (scheme and rest and "/" not in rest and origin == origin.strip()):
            raise ValueError(f"--cors-origin {origin!r} is not an origin as browsers send it: give "
                             "SCHEME://HOST[:PORT] with no path (such as https://example.com), or '*'")
    sock = listen(args.host, args.port)  # a port in use fails now, not after loading the model
    llm = _open(args)
    defaults = dict(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed, typical_p=args.typical_p)
    serve(llm, host=args.host, port=args.port, model_name=args.model_name, max_queue=args.max_queue,
          defaults={k: v for k, v in defaults.items() if v is not None},
          api_key=api_key, cors_origins=args.cors_origin or (),
          limits=limits, max_num_batched_tokens=args.max_num_batched_tokens, sock=sock,
          reasoning_format=args.reasoning_format)
    return 0


def cmd_perplexity(args) -> int:
    import functools

    from . import limits
    from .errors import read_text
    from .perplexity import (PIECE_CHARS, PerplexityInterrupted, default_text, leading_tokens, logits_to_keep,
                             perplexity, text_tokens)
    from .progress import progress_bar

    # checked before the model is opened and the progress bar drawn (an error after it shared stderr
    # with a half-drawn bar; --windows 0 or negative was a ZeroDivisionError)
    if args.windows is not None and args.windows < 1:
        raise ValueError(f"--windows must be at least 1, got {args.windows}")
    if args.ctx < 4:
        raise ValueError(f"--ctx must be at least 4 for perplexity, got {args.ctx}")
    from .eval_texts import DOMAIN_NAMES, domain_text

    if args.text and args.text in DOMAIN_NAMES and not os.path.exists(args.text):
        text = domain_text(args.text)  # docs/QUALITY.md's evaluation texts, by name (a file of that name wins)
    elif args.text:
        text = read_text(args.text)
    else:
        text = default_text()
    if getattr(args, "device", "cpu") == "cuda":
        args.parallel = 1  # the CUDA engine holds one sequence
    _check_sizes(args)  # (--parallel 0 is named before it is bounded below)
    if args.windows is not None:
        # slots past the windows scored are never used, and their KV cache is filled in all the same:
        # --windows 2 --parallel 64 --ctx 4096 took 6 GB for SmolLM2 where 2 windows need 190 MB
        args.parallel = min(args.parallel, args.windows)
    llm = _open(args)
    # the text is data, as in llama.cpp's perplexity (parse_special=false): a "<|im_end|>" written in
    # it is scored as the characters it is, not as the model's end-of-turn token
    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text, add_special_tokens=False, parse_special=False)

    # with --windows N, only the first N windows' tokens (of a text that may be a whole corpus); else all of
    # them, a piece of the text at a time (a whole corpus at once took ~180 bytes a character)
    if args.windows is not None:
        tokens = leading_tokens(tokenize, text, args.windows * args.ctx)
    else:  # (a long text took minutes without a word: a bar past a few pieces)
        with progress_bar(len(text), "tokenizing", "char", len(text) > 4 * PIECE_CHARS, unit_scale=True) as bar:
            tokens = text_tokens(tokenize, text, progress=lambda done: bar.update(done - bar.n))
    bos = llm.tokenizer.bos_id if llm.tokenizer.spec.add_bos_token else None
    available = len(tokens) // args.ctx
    if available == 0:
        where = f"--text {args.text}" if args.text else "the built-in text"
        raise ValueError(f"{where} has {len(tokens)} tokens, fewer than one window of --ctx {args.ctx}: give a "
                         "longer text, or a smaller --ctx")
    if args.windows is not None and args.windows > available:  # (the result line alone said "over 3 windows")
        print(f"pyllm perplexity: warning: --windows {args.windows}: the text holds {available} window(s) of "
              f"--ctx {args.ctx} ({len(tokens)} tokens); scoring those", file=sys.stderr)
    bar = progress_bar(min(args.windows or available, available), "perplexity", "window")

    def show(done, total, ppl):
        bar.set_postfix(ppl=f"{ppl:.3f}", refresh=False)
        bar.update(1)

    keep = logits_to_keep(args.ctx)  # (the logits of the positions scored only: half the memory)
    # as many windows per call as limits.MAX_LOGITS_BYTES of logits allow (--parallel 64 --ctx 4096: 25 GB)
    batch = max(1, min(llm.n_parallel, limits.MAX_LOGITS_BYTES // ((keep or args.ctx) * llm.config.vocab_size * 4)))
    try:
        with bar:  # (closed before any error is said: a terminal's bar held the line the error went on)
            result = perplexity(functools.partial(llm.logits, logits_to_keep=keep), tokens, ctx=args.ctx,
                                windows=args.windows, bos_id=bos, progress=show,
                                logits_many=functools.partial(llm.logits_many, logits_to_keep=keep), batch=batch)
    except (PerplexityInterrupted, SystemExit) as stop:  # Ctrl-C, SIGTERM: the windows scored so far (llama.cpp's
        partial = getattr(stop, "result", None) or getattr(stop, "perplexity_result", None)  # were printed as it went)
        if partial is not None:
            print(partial.line(), flush=True)
        else:  # (it ended without a word)
            print("pyllm perplexity: interrupted before the first window was scored", file=sys.stderr, flush=True)
        raise
    print(result.line())
    return 0


def cmd_bench(args) -> int:
    from .bench import bench_command

    return bench_command(args)


def cmd_list(args) -> int:
    from .model_cache import size_of, format_entries, list_entries, stale_temporaries

    print(format_entries(list_entries()))
    stale = stale_temporaries()
    if stale:  # not entries (never listed as models), but disk space the user may wonder about
        size = sum(size_of(p) for p in stale)
        print(f"and {size / 1e6:.1f} MB left by {len(stale)} interrupted download(s) or conversion(s), removed by "
              "the next one or by `pyllm rm`")
    return 0


def cmd_rm(args) -> int:
    from .model_cache import find_entries, remove_entries, remove_stale_temporaries

    # every name checked before anything is removed: a bad one in the list removes nothing
    matches = [e for name in args.names for e in find_entries(name)]
    for path in remove_entries(matches):
        print(f"removed {path}", file=sys.stderr)
    remove_stale_temporaries(sys.stderr)
    return 0


# Measured (docs/BENCHMARKS.md, "Conversion time"; AMD EPYC Zen 5, 2 idle cores): calibration and GPTQ took
# 51 s of SmolLM2-135M's 53.5 s int4 conversion, and 551 s (~1040 CPU-seconds) of the 1.1B shapes' 565 s:
# ~50 s wall and ~1.6 CPU-minutes per 100M parameters. A loaded machine takes several times that.
CALIBRATION_SECONDS_PER_100M = 50  # wall time on 2 idle cores
CALIBRATION_CPU_MINUTES_PER_100M = 1.6
CALIBRATION_HELP = ("GPTQ rounding calibrated on a text file: 'builtin' (English and Chinese prose, chat in the "
                    "model's template, docstrings and code; pyllm/convert/calibrate.py) or 'none' "
                    "(int4: scale search only; int8: min/max scales). Calibration (Hessians, then GPTQ) adds about "
                    f"{CALIBRATION_SECONDS_PER_100M} s per 100M parameters on 2 idle CPU cores "
                    f"({CALIBRATION_CPU_MINUTES_PER_100M} CPU-minutes per 100M; several times that on a busy machine) "
                    "(default: builtin for --quant int4 and int8, none otherwise)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="pyllm", description="Quantized LLM runtime: convert and run models.")
    parser.add_argument("--version", action="version", version=f"pyllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint or a GGUF file into a .pllm file")
    p.add_argument("source", help="Hugging Face model directory (config.json, safetensors or pytorch_model.bin) of a "
                                  "supported family (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, bloom, opt, "
                                  "gpt2, glm, glm4), or a GGUF file (llama.cpp's llama, qwen2, qwen3, gemma2, gemma3, "
                                  "phi3, bloom, gpt2, glm4, chatglm; a split model by any of its shards)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="output .pllm file (required)")
    p.add_argument("--quant", default=None, choices=QUANT_NAMES,
                   help="weight format of the linear layers (int4: every matrix int4_asym_dq g32 where that fits 4.6 "
                        "bits/weight, else, or with --bits, layouts chosen per matrix under the budget; embeddings and "
                        "lm_head of int8/int4 models are int8 g32) (default: f16 for Hugging Face checkpoints; for "
                        "GGUF the source formats, with block types pyllm has no layout for re-quantized to int8 or "
                        "int4_asym, with a notice)")
    p.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="weights per scale for int8/int4: a multiple of 32 (32, 64, 128, 256, ...); given with --quant int4, every matrix "
                        "keeps it (default: 32, or for --quant int4 chosen per matrix)")
    p.add_argument("--calib", metavar="FILE", default=None,
                   help=CALIBRATION_HELP)
    p.add_argument("--rtn", action="store_true",
                   help="int8/int4: plain round-to-nearest on min/max scales: no calibration, no scale search "
                        "(default: off)")
    p.add_argument("--keep-sensitive", type=int, default=0, metavar="N",
                   help="store the N matrices with the largest quantization error at int8 (default 0)")
    p.add_argument("--bits", type=float, default=None, metavar="BITS",
                   help="--quant int4: bits per weight budget over the linear layers (default 4.6)")
    p.add_argument("--awq", action="store_true",
                   help="int8/int4 with calibration: activation-aware per-channel scales (AWQ) folded into the norms, "
                        "up_proj and v_proj before GPTQ, chosen per input by the calibration error (default: off)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (default: shown)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print the quantization error of every tensor (default: the worst three)")
    p.add_argument("--lora", action="append", metavar="ADAPTER",
                   help="PEFT LoRA adapter directory merged into the weights in float32 before quantizing "
                        "(repeat to stack adapters, applied in order) (default: none)")
    p.add_argument("--adapter", action="append", metavar="[NAME=]DIR", default=[],
                   help="PEFT prompt-tuning, P-tuning or prefix-tuning adapter stored in the file under NAME "
                        "(default: the directory's name); repeat for several tasks on one base. Select one with "
                        "`pyllm run --adapter NAME`, LLM(adapter=NAME) or the model 'BASE:NAME' in pyllm serve "
                        "(default: none)")
    p.set_defaults(func=cmd_convert)

    from .train import TRAIN_REQUIREMENTS, add_arguments as add_train_arguments

    p = sub.add_parser("train", help="fine-tuning on Alpaca-format data: LoRA, prompt tuning, P-tuning or prefix tuning "
                                     f"(needs {TRAIN_REQUIREMENTS})")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("merge", help="merge LoRA adapters into a Hugging Face checkpoint (written as a new one)")
    p.add_argument("base", help="Hugging Face model directory (the adapters' base)")
    p.add_argument("--lora", action="append", required=True, metavar="ADAPTER",
                   help="PEFT LoRA adapter directory (required; repeat to stack adapters, applied in order)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="new Hugging Face model directory (required)")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32", help="weight dtype (default f32)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("verify", help="check every tensor and the header of a .pllm file against their checksums")
    p.add_argument("model", help="a .pllm file, or a cached model's name as `pyllm list` shows it")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("run", help="generate text, or chat when no prompt is given")
    _add_model(p)
    # `ollama run MODEL "Why is the sky blue?"`: the words after the model are the prompt (it was
    # "unrecognized arguments")
    p.add_argument("prompt_words", nargs="*", default=[], metavar="PROMPT",
                   help="the prompt after the model, as ollama run takes it: the same as -p, but text piped "
                        "into stdin comes before it (`cat notes.txt | pyllm run M summarize`) (default: none)")
    p.add_argument("-p", "--prompt", default=None, metavar="TEXT",
                   help="answer this prompt and exit (default: read it from piped stdin, or chat in a terminal)")
    p.add_argument("--raw", action="store_true",
                   help="treat the prompt as plain text to continue, not as a chat message (default: chat)")
    p.add_argument("--system", "--system-prompt", dest="system", default=None, metavar="TEXT",
                   help="system message for chat (default: the chat template's own, if any)")
    p.add_argument("--adapter", default=None, metavar="NAME",
                   help="a prompt-tuning / P-tuning / prefix-tuning adapter stored in the file (pyllm convert "
                        "--adapter) (default: none, the base model)")
    _add_chat_template(p)
    _add_threads(p)
    _add_context(p)
    _add_device(p)
    _add_kv_cache(p)
    _add_activation_quant(p)
    _add_sampling(p)
    p.set_defaults(func=cmd_run)

    from .limits import DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_PARALLEL

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (and Anthropic's /v1/messages)")
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", metavar="HOST", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, metavar="PORT", help="port (default 8000)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id clients see, and send as \"model\" (default: the file name)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests running or waiting before new ones get 503 (default 64)")
    p.add_argument("--parallel", "-np", type=int, default=None, metavar="N",
                   help="requests generated together (continuous batching; each has a KV-cache slot of the full "
                        "context, so the cache takes N times the memory: printed at start) "
                        f"(default {DEFAULT_PARALLEL}; 1 on CUDA: one at a time)")
    p.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS, metavar="N",
                   help="rows per engine step with --parallel: one per generating request, then prompt tokens "
                        "in chunks (at most 64 while requests generate), so long prompts do not stall running "
                        "streams (vLLM's name) "
                        f"(default {DEFAULT_MAX_NUM_BATCHED_TOKENS})")
    _add_server_limits(p)
    _add_threads(p)
    _add_context(p)
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every request but /health (default: $PYLLM_API_KEY, "
                        "else open)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let browser pages from ORIGIN call the API (repeat for several; '*' for any) (default: none)")
    p.add_argument("--reasoning-format", choices=("deepseek", "none"), default="deepseek",
                   help="where a reply's think block (<think>...</think> of Qwen3, DeepSeek-R1, SmolLM3; [THINK] of "
                        "Magistral) goes: 'deepseek' returns it as the message's reasoning_content, 'none' leaves "
                        "it in content; a request's reasoning_format overrides it (llama.cpp's flag) "
                        "(default deepseek)")
    _add_chat_template(p)
    _add_kv_cache(p)
    _add_activation_quant(p)
    _add_device(p)
    _add_sampling(p, serve=True)  # defaults for requests that leave these fields unset
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("perplexity", help="perplexity of a model on a text (llama.cpp's method)")
    _add_model(p)
    from .eval_texts import DOMAIN_NAMES

    p.add_argument("--text", "-f", "--file", dest="text", default=None, metavar="FILE|NAME",
                   help=f"UTF-8 text file, or an evaluation text of docs/QUALITY.md by name: {', '.join(DOMAIN_NAMES)} "
                        "(default: python-docs, Python's documentation topics)")
    p.add_argument("-c", "--ctx", "--ctx-size", "--context-length", "--n-ctx", dest="ctx", type=int, default=512,
                   metavar="TOKENS",
                   help="window length in tokens (default 512)")
    p.add_argument("--windows", "--chunks", dest="windows", type=int, default=None, metavar="N",
                   help="score only the first N windows (default: all the text holds)")
    _add_threads(p)
    p.add_argument("--parallel", type=int, default=4, metavar="N",
                   help="windows evaluated together, sharing each engine step (default 4; 1 on CUDA)")
    p.add_argument("--adapter", default=None, metavar="NAME",
                   help="score with a prompt-tuning / P-tuning / prefix-tuning adapter stored in the file (pyllm "
                        "convert --adapter): each window follows its virtual tokens (default: none, the base model)")
    _add_device(p)
    _add_kv_cache(p)
    _add_activation_quant(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("bench", help="prefill and decode speed, bandwidth bound, load time and memory (llama-bench style)")
    _add_model(p)
    p.add_argument("-p", "--n-prompt", type=int, default=512, metavar="N", help="prompt tokens of the prefill test (default 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, metavar="N", help="tokens of the decode test (default 128)")
    p.add_argument("-d", "--depth", type=int, default=0, metavar="N",
                   help="tokens already in the KV cache before each test, as llama-bench's -d (default 0)")
    p.add_argument("-r", "--repetitions", type=int, default=5, metavar="N", help="repetitions after one warm-up (default 5)")
    _add_threads(p)
    p.add_argument("--bandwidth-mib", type=int, default=1024, metavar="MIB",
                   help="buffer of the read-bandwidth probe in MiB (default 1024; 0 skips the probe)")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    _add_kv_cache(p)
    _add_activation_quant(p)
    _add_device(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("list", help="the models in the cache (converted GGUF files and directories, the default "
                                    "model) with sizes and sources")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rm", help="remove models from the cache")
    p.add_argument("names", nargs="+", metavar="NAME",
                   help="a cached file name as `pyllm list` shows it (with or without .pllm), or the source path")
    p.set_defaults(func=cmd_rm)
    return parser


STDOUT_COMMANDS = ("run", "perplexity", "bench", "list", "verify")  # those whose result goes to stdout


def main(argv: list[str] | None = None) -> int:
    """Runs one command. Every failure is one line on stderr and exit status 1 (130 for Ctrl-C);
    PYLLM_DEBUG=1 prints the traceback of failures that are not pyllm's own errors."""
    parser = build_parser()
    if sys.stderr is None:  # started with stderr closed (`2>&-`): print(file=None) wrote to stdout, into the output
        sys.stderr = open(os.devnull, "w", encoding="utf-8")
    args, extra = parser.parse_known_args(argv)
    # prompt words after an option (`pyllm run M -n 5 Why ...`): argparse gives a second positional only the
    # words before the first option; after "--" every word is the prompt's (`pyllm run M -- -5 degrees?`)
    words, after = (extra[:extra.index("--")], extra[extra.index("--") + 1:]) if "--" in extra else (extra, [])
    if args.command == "run" and extra and not any(e.startswith("-") for e in words):
        args.prompt_words += words + after
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if sys.stdout is None and args.command in STDOUT_COMMANDS:
        # started with stdout closed (`>&-`): Python sets it to None, print() then drops the output in
        # silence, and sys.stdout.write was "AttributeError: 'NoneType' object has no attribute 'write'"
        print(f"pyllm {args.command}: error: stdout is closed: nowhere to write the output", file=sys.stderr)
        return 1
    restore_sigterm = _exit_cleanly_on_sigterm()
    try:
        return report_errors(args.command, lambda: args.func(args))
    finally:
        restore_sigterm()


def report_errors(command: str, work) -> int:
    """work()'s exit status; a failure becomes one line on stderr ("pyllm COMMAND: error: ...") and
    status 1, Ctrl-C status 130, a closed stdout (`| head`) a quiet 141. Also `python -m pyllm.train`'s."""
    from .errors import PyllmError

    _output_that_cannot_fail()
    try:
        return work()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output left (`pyllm run ... | head`): quiet, as Unix tools are
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would fail again
        return 141  # 128 + SIGPIPE, what a shell reports for a tool the signal stopped
    except (PyllmError, ValueError, OSError, RuntimeError, IndexError, MemoryError) as e:
        print(f"pyllm {command}: error: {_message(e)}", file=sys.stderr)
        return 1
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # a library's own type (some derive from BaseException): still one line
        if os.environ.get("PYLLM_DEBUG", "0") not in ("", "0"):  # (as PYLLM_PROFILE: 0 is off)
            import traceback

            traceback.print_exc()
        print(f"pyllm {command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _message(e: BaseException) -> str:
    """One line for an error: an OSError of a file as "PATH: reason" (it read "[Errno 21] Is a directory:
    '/tmp'"), one without a message by what it is (a MemoryError printed "error: " and nothing)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{os.fsdecode(e.filename)}: {e.strerror}"
    if isinstance(e, MemoryError):
        return f"out of memory{f' ({e})' if str(e) else ''}"
    return str(e) or type(e).__name__


def _output_that_cannot_fail() -> None:
    """Text the terminal's encoding lacks is written as escapes (\\u6109): under a non-UTF-8 locale
    (latin-1, ascii, a Windows code page) a reply in Chinese or with an emoji stopped at its first
    such character with "'ascii' codec can't encode character", the rest of the reply lost."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None or not hasattr(stream, "reconfigure"):
            continue
        encoding = (stream.encoding or "").lower().replace("-", "").replace("_", "")
        if encoding not in ("utf8", "utf16", "utf32"):
            stream.reconfigure(errors="backslashreplace")


def _exit_cleanly_on_sigterm():
    """SIGTERM (kill, timeout, a process manager) becomes SystemExit(143) in the main thread, so
    `with` blocks and `finally` run: temporary directories (calibration's float copy of the
    model) are removed and partial outputs are not left behind. Python's default is to die on the
    spot. Only replaces the default handler (a host program's own stays); returns the undo."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None

    def terminate(signum, frame):
        # An exception raised inside a finalizer (__del__, e.g. tqdm's while a bar is collected) is
        # printed and swallowed by Python: the conversion went on and finished (seen once in CI).
        # There the signal is sent again shortly, to land outside the finalizer.
        at = frame
        while at is not None:
            if at.f_code.co_name == "__del__":
                retry = threading.Timer(0.01, os.kill, (os.getpid(), signum))
                retry.daemon = True
                retry.start()
                return
            at = at.f_back
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
