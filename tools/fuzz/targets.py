"""Fuzz targets: each takes one input (bytes) and runs it through a part of pyllm that reads
untrusted data. An input may be refused with the error the part documents (EXPECTED); any other
exception, a crash, a hang or a sanitizer report is a bug.

  pllm       a .pllm file: the Python reader (PackedModel), then the C++ loader and one forward step
  gguf       a GGUF file: the converter's GGUF source (config, tokenizer, every tensor)
  tokenizer  an embedded tokenizer blob (first byte: 0 = tokenizer.json, 1 = sentencepiece model)
  template   a chat template (Jinja source) rendered with fixed messages under RenderLimits
  request    an HTTP request body to /v1/completions, /v1/chat/completions, /v1/responses or
             /v1/messages (the first byte picks: ENDPOINTS), parsed and started on a tiny model as `pyllm serve`
             does, up to the first piece

tools/fuzz/run.py drives them with atheris; tests/test_fuzz.py replays the seed corpus
(tools/fuzz/corpus/<target>/) through them.
"""

from __future__ import annotations

import atexit
import os
import tempfile

import numpy as np

from pyllm.errors import PyllmError

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
TARGETS = ("pllm", "gguf", "tokenizer", "template", "request")
# What each target may raise for a refused input: pyllm's error (ValueError is its base class, and
# the type of the C++ loader's refusals); MemoryError where an input may ask for more than there is.
EXPECTED = (PyllmError, ValueError, MemoryError)

_scratch = None


def _scratch_file(data: bytes) -> str:
    """data written to this process's scratch file (in /dev/shm when there is one)."""
    global _scratch
    if _scratch is None:
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, _scratch = tempfile.mkstemp(prefix="pyllm-fuzz-", dir=where)
        os.close(fd)
        atexit.register(os.unlink, _scratch)
    with open(_scratch, "wb") as f:
        f.write(data)
    return _scratch


def pllm(data: bytes) -> None:
    from pyllm import _core
    from pyllm.formats.packed import PackedModel

    path = _scratch_file(data)
    try:
        model = PackedModel(path)
    except EXPECTED:
        return
    try:
        engine = _core.Engine(path, model.file.data_offset, model.engine_tensors(), model.linears,
                              model.engine_config(), 8, 1, "auto")
        logits = engine.forward(np.zeros(2, dtype=np.int32), 0, False)
        assert logits.shape == (model.config.vocab_size,)
    except EXPECTED:
        pass
    finally:
        model.close()


def gguf(data: bytes) -> None:
    from pyllm.convert.gguf_source import GGUFSource

    path = _scratch_file(data)
    try:
        source = GGUFSource(path)
    except EXPECTED:
        return
    try:
        source.tokenizer()
        source.chat_template()
        source.generation_defaults()
        for name in list(source.tensors):
            source.load(name)  # block formats through load_native
    except EXPECTED:
        pass
    finally:
        source.close()


def tokenizer(data: bytes) -> None:
    from pyllm.formats.packed import TokenizerSpec
    from pyllm.tokenizer import Tokenizer

    if not data:
        return
    spec = TokenizerSpec(kind="sentencepiece" if data[0] % 2 else "hf", bos_token="<s>", eos_token="</s>",
                         added_tokens={"<|im_end|>": 7} if data[0] % 2 else {})
    try:
        tok = Tokenizer(spec, data[1:])
        ids = tok.encode("Hello <|im_end|> 你好 😀", add_special_tokens=True)
        tok.decode(ids, skip_special_tokens=False)
        tok.decode([i % max(tok.vocab_size, 1) for i in range(0, 1000, 7)])
        tok.encode_with_literal("a\uf0000b", {"\uf0000": "<s>"})
    except EXPECTED:
        pass


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|>"},
            {"role": "assistant", "content": "Hello!", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
            {"role": "tool", "content": "42"}, {"role": "user", "content": "中文"}]
TOOLS = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]


def template(data: bytes) -> None:
    from pyllm.chat_template import render_chat
    from pyllm.limits import RenderLimits

    source = data.decode("utf-8", errors="replace")
    try:
        render_chat(source, MESSAGES, bos_token="<s>", eos_token="</s>", tools=TOOLS,
                    limits=RenderLimits(max_output_chars=1 << 16, seconds=1.0))
    except EXPECTED:
        pass


_server = None


def _tiny_server():
    global _server
    if _server is None:
        import pyllm
        from pyllm.serve import Server

        llm = pyllm.LLM(os.path.join(CORPUS, "pllm", "tiny-int8.pllm"), n_threads=1, context_length=256)
        _server = Server(llm, "fuzz")
    return _server


# the request target's endpoints, by its first byte (modulo their count): (chat, the dialect's name)
ENDPOINTS = ((False, None), (True, None), (True, "responses"), (True, "messages"))


def request(data: bytes) -> None:
    from pyllm.serve import DIALECTS
    from pyllm.structured import GrammarUnavailable

    if not data:
        return
    server = _tiny_server()
    chat, dialect = ENDPOINTS[data[0] % len(ENDPOINTS)]
    try:
        parsed = server.parse(data[1:], chat, DIALECTS[dialect] if dialect else None)
        _, streams = server.start(parsed[0] if dialect else parsed, chat)
    except (*EXPECTED, GrammarUnavailable):  # what the server answers with 4xx
        return
    stream = streams[0]
    try:
        next(stream, None)
    except EXPECTED:
        pass
    finally:
        stream.close()


def run(name: str, data: bytes) -> None:
    """Runs target `name` on one input."""
    globals()[name](data)
