"""The Python API as apps use it: streaming Chinese and emoji, stop strings, cancel() from another
thread (also during a long prefill), two threads on one LLM, the GIL released during compute, KV
reuse across chat turns, chat template overrides and generation defaults."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest

import pyllm
from pyllm.chat_template import BUILTIN_TEMPLATES, TemplateError
from pyllm.errors import PyllmError

CHINESE_EMOJI = "今天天气很好，我们去公园散步。😀🎉👍 中文测试 👨‍👩‍👧 done"


@pytest.fixture(scope="module")
def llm(tiny_llama_f32):
    # one thread: the tests measure progress between threads, and the machine's cores are shared
    with pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=10_200) as model:
        yield model


class ScriptedEngine:
    """Stands in for the C++ engine: the logits make a fixed token sequence the greedy choice, so the
    real generation loop (sampling, incremental decoding, stop strings) produces a chosen text."""

    def __init__(self, engine, prompt_len: int, script: list[int], vocab: int, eos: int):
        self.engine, self.prompt_len, self.script, self.vocab, self.eos = engine, prompt_len, script, vocab, eos
        self.calls: list[tuple[int, int]] = []  # (pos, n) of every forward

    def forward(self, tokens, pos, all_logits=False):
        self.calls.append((pos, len(tokens)))
        self.engine.forward(tokens, pos, all_logits)  # keep the real cache consistent
        i = pos + len(tokens) - self.prompt_len
        logits = np.zeros(self.vocab, dtype=np.float32)
        logits[self.script[i] if i < len(self.script) else self.eos] = 10.0
        return logits


def _scripted(llm, monkeypatch, prompt_ids, text):
    script = llm.tokenize(text, add_special_tokens=False)
    assert llm.detokenize(script) == text
    fake = ScriptedEngine(llm.engine, len(prompt_ids), script, llm.config.vocab_size, llm.tokenizer.eos_ids[0])
    monkeypatch.setattr(llm, "engine", fake)
    llm._cached = []
    return fake


def _utf8_clean(piece: str) -> bool:
    piece.encode("utf-8")  # strict: no lone surrogates
    return "\ufffd" not in piece


def test_streamed_chinese_and_emoji_join_to_the_full_text(llm, monkeypatch):
    prompt = llm.tokenize("中文测试")
    _scripted(llm, monkeypatch, prompt, CHINESE_EMOJI)
    pieces = list(llm.generate(prompt, max_new_tokens=200, stream=True))
    assert "".join(pieces).encode("utf-8") == CHINESE_EMOJI.encode("utf-8")
    assert all(_utf8_clean(p) for p in pieces)
    assert len(pieces) > 5  # really streamed, not one final piece
    ids = llm.tokenize(CHINESE_EMOJI, add_special_tokens=False)
    # the byte-level tokenizer splits characters across tokens: pieces were held back
    assert any(llm.detokenize(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    assert llm.generate(prompt, max_new_tokens=200) == CHINESE_EMOJI


@pytest.mark.parametrize("stop", ["公园散步", "😀🎉", "中文测", "公园X"])
def test_stop_strings_never_leak_a_partial_match(llm, monkeypatch, stop):
    prompt = llm.tokenize("中文测试")
    _scripted(llm, monkeypatch, prompt, CHINESE_EMOJI)
    expected = CHINESE_EMOJI[:CHINESE_EMOJI.find(stop)] if stop in CHINESE_EMOJI else CHINESE_EMOJI
    stream = llm.generate(prompt, max_new_tokens=200, stop=[stop], stream=True)
    emitted = ""
    for piece in stream:
        emitted += piece
        assert expected.startswith(emitted), "text past the cut was emitted"
    assert emitted == expected and all(_utf8_clean(p) for p in emitted)
    assert stream.stats.finish_reason == "stop"


def test_real_tiny_model_stream_equals_full_text(llm):
    for prompt in ("中文测试", "Emoji 😀🎉", "The quick brown fox"):
        full = llm.generate(prompt, max_new_tokens=40)
        pieces = list(llm.generate(prompt, max_new_tokens=40, stream=True))
        assert "".join(pieces) == full
        for p in pieces:
            p.encode("utf-8")


def test_seeded_sampling_is_identical_across_runs(llm):
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.1)
    a = llm.generate("Paris is", seed=11, **kw)
    b = llm.generate("Paris is", seed=11, **kw)
    assert a == b
    others = {llm.generate("Paris is", seed=s, **kw) for s in range(12, 16)}
    assert len(others | {a}) > 1  # the seed matters


def test_cancel_during_prefill_stops_at_the_next_chunk(llm, monkeypatch):
    from pyllm import llm as llm_module

    prompt = [int(i) for i in np.random.default_rng(0).integers(3, 400, 1000)]
    expected = llm.generate(prompt, max_new_tokens=3)  # uninterrupted, from a fresh cache below
    calls = []
    real = llm.engine

    class CancelOnFirstChunk:
        def forward(self, tokens, pos, all_logits=False):
            calls.append(len(tokens))
            out = real.forward(tokens, pos, all_logits)
            llm.cancel()  # as another thread would, while this chunk runs
            return out

    monkeypatch.setattr(llm, "engine", CancelOnFirstChunk())
    llm._cached = []
    stream = llm.generate(prompt, max_new_tokens=3, stream=True)
    assert list(stream) == []
    assert calls == [llm_module.PREFILL_CHUNK]  # one chunk of the 1000-token prompt ran
    assert stream.stats.finish_reason == "cancelled" and stream.stats.generated_tokens == 0
    monkeypatch.setattr(llm, "engine", real)
    # the cache kept the finished chunk: the next call resumes from it and gives the same text
    assert llm.generate(prompt, max_new_tokens=3) == expected
    assert llm.last_stats.cached_tokens == llm_module.PREFILL_CHUNK


def test_cancel_from_another_thread_ends_a_10000_token_generation(llm, monkeypatch):
    monkeypatch.setattr(llm.tokenizer, "eos_ids", [])  # a random model may otherwise end early
    stream = llm.generate("Once upon a time", max_new_tokens=10_000, stream=True)
    done = threading.Event()
    received = []

    def consume():
        for piece in stream:
            received.append(piece)
        done.set()

    worker = threading.Thread(target=consume)
    worker.start()
    while stream.stats.generated_tokens < 20:
        time.sleep(0.01)
    at_cancel = stream.stats.generated_tokens
    llm.cancel()
    assert done.wait(timeout=5), "cancel() did not stop the generation"
    worker.join()
    assert stream.stats.finish_reason == "cancelled"
    assert at_cancel <= stream.stats.generated_tokens <= at_cancel + 1  # within one token
    assert llm.generate("Hi", max_new_tokens=2) is not None  # the model is free again


def test_two_threads_on_one_llm_never_crash(llm):
    prompts = ["Berlin", "中文测试", "Emoji 😀", "The quick"]
    expected = {p: llm.generate(p, max_new_tokens=12) for p in prompts}
    errors, results = [], []

    def worker(i):
        try:
            for round_ in range(3):
                p = prompts[(i + round_) % len(prompts)]
                if round_ == 1:  # a stream abandoned half way, then closed
                    stream = llm.generate(p, max_new_tokens=12, stream=True)
                    next(stream, None)
                    stream.close()
                    llm.logits(llm.tokenize(p))
                else:
                    results.append((p, llm.generate(p, max_new_tokens=12)))
                llm.cancel()  # may hit another thread's call: that call ends early, nothing breaks
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for p, text in results:  # complete, or a cancelled prefix of the complete text
        assert expected[p].startswith(text)


def test_other_threads_run_during_a_long_engine_call(llm):
    ids = [int(i) for i in np.random.default_rng(1).integers(3, 400, 10_000)]  # long enough on a fast core (3000: 39 ms on Zen 5)
    ticks, stop = [], threading.Event()

    def counter():
        while not stop.is_set():
            ticks.append(time.perf_counter())

    thread = threading.Thread(target=counter)
    thread.start()
    time.sleep(0.05)
    start = time.perf_counter()
    llm.logits(ids)  # one engine call
    end = time.perf_counter()
    stop.set()
    thread.join()
    inside = [t for t in ticks if start <= t <= end]
    assert end - start > 0.05, "the engine call was too short to tell"
    # the counter thread kept running through the call (with the GIL held it would stall for all of it)
    assert inside and inside[-1] - inside[0] > 0.6 * (end - start)
    assert max(np.diff([start] + inside + [end])) < 0.3 * (end - start)


def test_second_chat_turn_prefills_only_the_new_tokens(llm):
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a city."}]
    stream = llm.chat(turn1, max_new_tokens=6, stream=True)
    reply = "".join(stream)
    ids1 = llm.chat_prompt_ids(turn1)
    assert stream.stats.prefill_tokens <= len(ids1)
    held = list(llm._cached)  # prompt and reply tokens whose keys/values the engine holds
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Another one?"}]
    ids2 = llm.chat_prompt_ids(turn2)
    common = next((i for i, (a, b) in enumerate(zip(held, ids2)) if a != b), min(len(held), len(ids2)))
    llm.chat(turn2, max_new_tokens=2)
    assert common >= len(ids1)  # the whole first prompt is reused
    assert llm.last_stats.prefill_tokens == len(ids2) - common
    assert llm.last_stats.cached_tokens == common


def test_context_full_is_a_clear_error_or_a_length_stop(tiny_llama_f32):
    with pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=32) as small:
        with pytest.raises(ValueError, match="context"):
            small.generate(list(range(3, 40)), max_new_tokens=4)
        with pytest.raises(ValueError, match="context"):
            small.generate(list(range(3, 35)), max_new_tokens=4)  # exactly full: no room for the reply
        small.tokenizer.eos_ids = []
        text = small.generate(list(range(3, 30)), max_new_tokens=100)
        assert small.last_stats.generated_tokens == 32 - 27 and small.last_stats.finish_reason == "length"
        assert isinstance(text, str)


def test_chat_template_override_and_missing_template(tiny_llama_f32):
    with pyllm.LLM(tiny_llama_f32, n_threads=1, chat_template="llama2") as model:
        messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
        assert model.apply_chat_template(messages) == "<|im_start|>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST]"
        assert model.chat_template == BUILTIN_TEMPLATES["llama2"]
        model.chat_template = ""
        with pytest.raises(TemplateError, match="--chat-template"):
            model.chat(messages, max_new_tokens=2)
    with pytest.raises(TemplateError, match="unknown chat template"):
        pyllm.LLM(tiny_llama_f32, n_threads=1, chat_template="vicuna-ish")


def test_llama_cpp_python_chat_format_names_in_the_api_and_cli(tiny_llama_f32):
    """LLM(path, chat_format="llama-2") (llama-cpp-python's keyword and name) was refused as an unknown
    chat template; `pyllm run/serve --chat-format` did not exist. Both take llama-cpp-python's names
    (llama-2, llama-3, mistral-instruct, zephyr, gemma, phi-3, qwen, chatml) as the same built-ins."""
    from pyllm import cli

    with pyllm.LLM(tiny_llama_f32, n_threads=1, chat_format="llama-2") as model:
        assert model.chat_template == BUILTIN_TEMPLATES["llama2"]
        model.chat_template = BUILTIN_TEMPLATES["llama3"]
        assert model.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
            "<|im_start|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert isinstance(model.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2), str)
    for command in ("run", "serve"):
        for flag in ("--chat-template", "--chat-format", "--chat_format"):
            args = cli.build_parser().parse_args([command, tiny_llama_f32, flag, "mistral-instruct"])
            assert args.chat_template == "mistral-instruct"


def test_a_builtin_chat_template_s_end_of_turn_stops_the_reply(tiny_llama_f32):
    """A built-in template chosen for a model whose end-of-sequence token is not the template's end of
    turn (chat_format="llama-3" here, where <|eot_id|> is no token) had the reply run past "<|eot_id|>"
    into the next turn; llama-cpp-python's formats stop there. The marker is a stop string of chat()
    (the caller's stop strings kept), and never of generate()."""
    from conftest import scripted_reply

    messages = [{"role": "user", "content": "Hi"}]
    with pyllm.LLM(tiny_llama_f32, n_threads=1, chat_format="llama-3") as model:
        reply = model.tokenizer.encode("Paris<|eot_id|><|start_header_id|>user", add_special_tokens=False)
        for stop in (None, "zzz", ["zzz"]):
            text = model.chat(messages, max_new_tokens=len(reply), stop=stop, logits_processors=[scripted_reply(reply)])
            assert (text, model.last_stats.stop_string) == ("Paris", "<|eot_id|>")
        streamed = model.chat(messages, max_new_tokens=len(reply), stream=True, logits_processors=[scripted_reply(reply)])
        assert "".join(streamed) == "Paris"
        text = model.generate("Hi", max_new_tokens=len(reply), logits_processors=[scripted_reply(reply)])
        assert text.startswith("Paris<|eot_id|>")  # plain generation: no template, no marker
        with pytest.raises(ValueError, match="stop must be a string or a list of strings"):
            model.chat(messages, stop=5)
    with pyllm.LLM(tiny_llama_f32, n_threads=1) as own:  # the model's own template: its own end of turn only
        assert own.chat_stop(None) is None and own.chat_stop("x") == "x"


def test_chat_template_given_as_a_path_or_another_type(tiny_llama_f32, tmp_path):
    """chat_template=pathlib.Path(file) (a path, as the model's own may be) was TypeError "argument of
    type 'PosixPath' is not iterable"; 5 the same for int, a list "unhashable type". A path is the
    file's template (FileNotFoundError when there is none); another type a TypeError naming the option."""
    import pathlib

    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}Q: {{ m.content }}\n{% endfor %}A:")
    no_suffix = tmp_path / "template"  # a path object is a file even without a template suffix
    no_suffix.write_text(template.read_text())
    for given in (template, no_suffix, pathlib.PurePath(template).as_posix()):
        path = pathlib.Path(given) if isinstance(given, str) else given
        with pyllm.LLM(tiny_llama_f32, n_threads=1, chat_template=path) as model:
            assert model.apply_chat_template([{"role": "user", "content": "Hi"}]) == "Q: Hi\nA:"
    for missing in (tmp_path / "none.jinja", tmp_path / "chatml", tmp_path):
        with pytest.raises(FileNotFoundError, match="chat template file"):
            pyllm.LLM(tiny_llama_f32, n_threads=1, chat_template=missing)
    for bad in (5, ["chatml"], {"chatml": 1}, b"chatml", 2.5):
        with pytest.raises(TypeError, match="chat_template must be"):
            pyllm.LLM(tiny_llama_f32, n_threads=1, chat_template=bad)


def _file_with_generation_config(tiny_llama, tmp_path, name: str, **settings) -> str:
    """tiny_llama converted to f32 with `settings` added to its generation_config.json (the edited
    checkpoint is kept at tmp_path / "model")."""
    from pyllm.convert import convert_checkpoint

    src = shutil.copytree(tiny_llama, tmp_path / "model")
    config_path = src / "generation_config.json"
    config = json.loads(config_path.read_text())
    config.update(settings)
    config_path.write_text(json.dumps(config))
    out = str(tmp_path / name)
    convert_checkpoint(str(src), out, quant="f32", progress=False)
    return out


def test_generation_defaults_come_from_the_generation_config(tiny_llama, tmp_path):
    out = _file_with_generation_config(tiny_llama, tmp_path, "gen.pllm", do_sample=True, temperature=0.6, top_p=0.9,
                                       max_new_tokens=5)
    with pyllm.LLM(out, n_threads=1) as model:
        params = model._sampling(None, None, None, None, None, seed=None)
        # what transformers' generate() would use: the config's values, its defaults (top_k 50) for the rest
        assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.6, 50, 0.9, 0.0)
        model.tokenizer.eos_ids = []
        model.generate("Hello", seed=0)
        assert model.last_stats.generated_tokens == 5
        assert model._sampling(0.0, None, None, None, None, None).temperature == 0.0  # the call wins


def test_a_greedy_model_s_own_top_k_applies_when_the_caller_samples(tiny_llama, tmp_path):
    """A file with do_sample false and top_k 20, top_p 0.8: a caller's temperature 0.7 took its top_p but
    not its top_k (0: off), where transformers' generate(do_sample=True) takes both."""
    out = _file_with_generation_config(tiny_llama, tmp_path, "greedy.pllm", do_sample=False, top_k=20, top_p=0.8,
                                       typical_p=0.9)
    with pyllm.LLM(out, n_threads=1) as model:
        assert model._sampling(None, None, None, None, None, None).temperature == 0.0  # greedy by default
        params = model._sampling(0.7, None, None, None, None, None)
        assert (params.temperature, params.top_k, params.top_p, params.typical_p) == (0.7, 20, 0.8, 0.9)
        assert model._sampling(0.7, 0, None, None, None, None).top_k == 0  # the call wins
    hf = pytest.importorskip("transformers").GenerationConfig.from_pretrained(str(tmp_path / "model"))
    assert (hf.top_k, hf.top_p, hf.typical_p) == (20, 0.8, 0.9)


@pytest.fixture(scope="module")
def real(default_model_file):
    """The default model (SmolLM2-135M-Instruct)."""
    with pyllm.LLM(default_model_file, n_threads=1) as model:
        yield model


def test_real_model_second_turn_runs_only_its_new_tokens(real):
    turn1 = [{"role": "user", "content": "What is the capital of France?"}]
    stream = real.chat(turn1, max_new_tokens=40, stream=True)
    reply = "".join(stream)
    assert "Paris" in reply and stream.stats.finish_reason == "stop"
    ids1 = real.chat_prompt_ids(turn1)
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And of Germany?"}]
    ids2 = real.chat_prompt_ids(turn2)
    reply_ids = real.tokenize(reply, add_special_tokens=False)
    assert ids2[:len(ids1) + len(reply_ids)] == ids1 + reply_ids  # the reply re-tokenizes as generated
    second = real.chat(turn2, max_new_tokens=20, stream=True)
    "".join(second)
    # new: the end-of-turn token the model sampled but never ran, the template's newline, the new message
    assert second.stats.prefill_tokens == len(ids2) - len(ids1) - len(reply_ids)
    assert second.stats.prefill_tokens < 20 < len(ids2)


@pytest.mark.parametrize("prompt", ["中文：你好，世界！我爱北京。日本語：", "Emoji: 😀🎉👍😀🎉👍😀"])
def test_real_model_streams_chinese_and_emoji(real, prompt):
    for max_new_tokens in (7, 9, 24):  # cut-offs inside and between characters
        stream = real.generate(prompt, max_new_tokens=max_new_tokens, stream=True)
        pieces = list(stream)
        full = real.generate(prompt, max_new_tokens=max_new_tokens)
        assert "".join(pieces).encode("utf-8") == full.encode("utf-8")
        # no piece splits a character; a reply cut off inside one ends as decode() has it, in U+FFFD
        assert all(_utf8_clean(p) for p in pieces[:-1]) and _utf8_clean(pieces[-1].rstrip("\ufffd"))
    assert any(ord(c) > 0x3000 for c in full)  # the reply has CJK or emoji characters


def test_content_that_is_not_unicode_is_refused_with_its_position_in_the_message(llm):
    """A lone surrogate in a message's content (a str from a surrogateescape decode) was refused by the
    tokenizer with its character position in the whole rendered prompt: the error now names the
    message and the position in its content, for every message (system, parts joined) alike."""
    cases = [([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ab\udcffcd"}],
              "message 1's content contains a lone surrogate (U+DCFF at character 2)"),
             ([{"role": "system", "content": "x\ud800"}, {"role": "user", "content": "hi"}],
              "message 0's content contains a lone surrogate (U+D800 at character 1)"),
             ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "\udce9"}]}],
              "message 0's content contains a lone surrogate (U+DCE9 at character 2)")]
    for messages, message in cases:
        with pytest.raises(PyllmError) as info:
            llm.chat(messages, max_new_tokens=1)
        assert message in str(info.value)
