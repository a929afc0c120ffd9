"""Writes the seed corpus of the fuzz targets (tools/fuzz/corpus/<target>/): small valid inputs
from which the fuzzer mutates. Needs the test extras (torch, transformers: the tiny model is built
the way the tests build theirs). The corpus is committed; run this only to renew it:

    python tools/fuzz/make_corpus.py
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "tests")]

from conftest import make_tiny_llama  # noqa: E402

from pyllm.chat_template import BUILTIN_TEMPLATES  # noqa: E402
from pyllm.convert import convert_checkpoint  # noqa: E402

TINY = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=256)
REQUESTS = {
    "completion": (0, {"prompt": "Paris is", "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 3,
                       "stop": ["\n"], "stream": True}),
    "completion-ids": (0, {"prompt": [1, 2, 3], "max_tokens": 2, "top_k": 5, "min_p": 0.1}),
    "chat": (1, {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": [{"type": "text", "text": "Hi <|im_end|>"}]}],
                 "max_completion_tokens": 3, "repetition_penalty": 1.1, "stream_options": {"include_usage": True}}),
    "chat-tools": (1, {"messages": [{"role": "user", "content": "weather?"}],
                       "tools": [{"type": "function", "function": {"name": "w", "parameters": {}}}], "n": 1}),
    "chat-forced-call": (1, {"messages": [{"role": "user", "content": "weather?"}], "tool_choice": "required",
                             "tools": [{"type": "function", "function": {"name": "w", "parameters": {
                                 "type": "object", "properties": {"city": {"type": "string"}}}}}],
                             "parallel_tool_calls": False, "logprobs": True, "top_logprobs": 2, "max_tokens": 4}),
    "completion-options": (0, {"prompt": ["Paris", "Rome"], "n": 2, "echo": True, "logprobs": 2, "max_tokens": 2,
                               "logit_bias": {"5": -100}, "presence_penalty": 0.5, "stop_token_ids": [7],
                               "response_format": {"type": "regex", "regex": "[a-z ]+"}}),
    "responses": (2, {"instructions": "Be brief.", "max_output_tokens": 3, "stream": True, "top_logprobs": 2,
                      "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                                {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text",
                                                                                  "text": "Greet."}]},
                                {"role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
                                {"role": "user", "content": "Weather?"}],
                      "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}}}),
    "responses-calls": (2, {"input": [{"role": "user", "content": "weather?"},
                                      {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
                                      {"type": "function_call_output", "call_id": "c1", "output": "sunny"}],
                            "max_output_tokens": 4, "temperature": 0.5, "parallel_tool_calls": False}),
    "messages": (3, {"system": [{"type": "text", "text": "Be brief."}], "max_tokens": 3, "stream": True,
                     "stop_sequences": ["\n\n"], "thinking": {"type": "disabled"},
                     "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                  {"role": "assistant", "content": [{"type": "thinking", "thinking": "Greet.",
                                                                     "signature": ""},
                                                                    {"type": "text", "text": "Hello."}]},
                                  {"role": "user", "content": "Weather?"}]}),
    "messages-tool-results": (3, {"max_tokens": 4, "temperature": 0.5, "top_k": 5,
                                  "messages": [{"role": "user", "content": "weather?"},
                                               {"role": "assistant", "content": [
                                                   {"type": "tool_use", "id": "t1", "name": "w", "input": {}}]},
                                               {"role": "user", "content": [
                                                   {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                                                   {"type": "text", "text": "so?"}]}]}),
}


def main() -> None:
    corpus = os.path.join(HERE, "corpus")
    shutil.rmtree(corpus, ignore_errors=True)
    for target in ("pllm", "gguf", "tokenizer", "template", "request"):
        os.makedirs(os.path.join(corpus, target))
    with tempfile.TemporaryDirectory() as tmp:
        hf = make_tiny_llama(os.path.join(tmp, "hf"), **TINY)
        for quant in ("int8", "int4_asym"):
            convert_checkpoint(hf, os.path.join(corpus, "pllm", f"tiny-{quant.replace('_asym', '')}.pllm"),
                               quant=quant, group_size=32, progress=False)
        import gguf

        from test_gguf import write_gguf

        write_gguf(hf, os.path.join(corpus, "gguf", "tiny-q8.gguf"), gguf.GGMLQuantizationType.Q8_0)
        with open(os.path.join(hf, "tokenizer.json"), "rb") as f:
            blob = f.read()
        with open(os.path.join(corpus, "tokenizer", "hf.bin"), "wb") as f:
            f.write(b"\x00" + blob)
        import sentencepiece as spm

        text = os.path.join(tmp, "text.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.write("The quick brown fox jumps over the lazy dog. 你好 世界 " * 50)
        spm.SentencePieceTrainer.train(input=text, model_prefix=os.path.join(tmp, "sp"), vocab_size=60,
                                       model_type="bpe", character_coverage=1.0, minloglevel=2,
                                       normalization_rule_name="identity")
        with open(os.path.join(tmp, "sp.model"), "rb") as f, \
                open(os.path.join(corpus, "tokenizer", "sentencepiece.bin"), "wb") as out:
            out.write(b"\x01" + f.read())
    for path in glob.glob(os.path.join(ROOT, "tests", "data", "chat_templates", "*.jinja")):
        shutil.copyfile(path, os.path.join(corpus, "template", os.path.basename(path)))
    for name, source in BUILTIN_TEMPLATES.items():
        with open(os.path.join(corpus, "template", f"builtin-{name}.jinja"), "w", encoding="utf-8") as f:
            f.write(source)
    for name, (kind, body) in REQUESTS.items():  # kind: the endpoint (tools/fuzz/targets.py ENDPOINTS)
        with open(os.path.join(corpus, "request", f"{name}.bin"), "wb") as f:
            f.write(bytes([kind]) + json.dumps(body, ensure_ascii=False).encode())


if __name__ == "__main__":
    main()
