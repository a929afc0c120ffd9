"""One vocabulary: transformers' names in Python with llama-cpp-python's as aliases, "did you mean" for
unknown keywords, the CLI's flag aliases, clear errors for wrong prompt types and missing files, and a
--help entry with text and a default for every option."""

from __future__ import annotations

import argparse
import os
import re
import io
import sys

import pytest

import pyllm
from pyllm import cli


@pytest.fixture(scope="module")
def llm(tiny_llama_f32):
    with pyllm.LLM(tiny_llama_f32, n_threads=1) as model:
        yield model


def test_transformers_stop_strings_is_stop(llm):
    """generate(stop_strings=[...]) (transformers' name) got "did you mean 'stop_token_ids'?"."""
    text = llm.generate("hello", max_new_tokens=12, temperature=0)
    stop = text[len(text) // 2:][:2]
    assert stop and llm.generate("hello", max_new_tokens=12, stop_strings=[stop]) == \
        llm.generate("hello", max_new_tokens=12, stop=[stop])
    assert llm.last_stats.stop_string == stop


def test_llama_cpp_names_are_aliases(tiny_llama_f32, llm):
    with pyllm.LLM(model_path=tiny_llama_f32, n_ctx=64, n_threads=1) as small:
        assert small.context_length == 64
    expected = llm.generate("hello", max_new_tokens=4, repetition_penalty=1.3)
    assert llm.generate("hello", max_tokens=4, repeat_penalty=1.3) == expected
    messages = [{"role": "user", "content": "hi"}]
    assert llm.chat(messages, max_tokens=3) == llm.chat(messages, max_new_tokens=3)


@pytest.mark.parametrize("call, message", [
    (lambda llm: llm.generate("hi", max_tokenz=2), "LLM.generate() got an unexpected keyword argument 'max_tokenz'; "
                                                   "did you mean 'max_tokens'?"),
    (lambda llm: llm.generate("hi", temprature=0.5), "did you mean 'temperature'?"),
    (lambda llm: llm.chat([{"role": "user", "content": "hi"}], top_kk=3), "did you mean 'top_k'?"),
    (lambda llm: llm.generate("hi", max_tokens=2, max_new_tokens=3), "got both 'max_new_tokens' and its alias"),
    (lambda llm: pyllm.LLM(llm.path, n_ctxx=5), "LLM() got an unexpected keyword argument 'n_ctxx'; did you mean "
                                                "'n_ctx'?"),
])
def test_unknown_keywords_suggest_the_nearest_name(llm, call, message):
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        call(llm)


@pytest.mark.parametrize("name, value, message", [
    ("min_new_tokens", 2, "a minimum reply length is not supported"),
    ("min_tokens", 2, "a minimum reply length is not supported"),
    ("max_length", 10, "transformers' max_length counts the prompt's tokens too; give max_new_tokens"),
    ("num_beams", 2, "beam search is not supported"),
    # it named only `pyllm serve`'s /v1/completions, while LLM.create_completion takes echo
    ("echo", True, "the returned text does not repeat the prompt \\(llama-cpp-python's echo\\): prepend it yourself, "
                   "or call create_completion\\(prompt, echo=True\\)"),
    ("eos_token_id", 2, "the model's own end-of-generation tokens always end the reply; stop_token_ids"),
    ("pad_token_id", 0, "generation pads nothing"),
])
def test_generation_names_pyllm_does_not_take_say_what_to_do(llm, name, value, message):
    """transformers' and llama-cpp-python's names that generate() does not take got a "did you mean" by
    spelling: min_new_tokens -> 'max_new_tokens' and max_length -> 'max_tokens' (the reply alone, where
    transformers counts the prompt too), each another meaning. They say what to do instead."""
    for call in (lambda: llm.generate("hi", **{name: value}),
                 lambda: llm.chat([{"role": "user", "content": "hi"}], **{name: value})):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}': {message}") as e:
            call()
        assert "did you mean" not in str(e.value)
    if name == "echo":  # what it points to works
        assert llm.create_completion("hi", max_tokens=1, echo=True)["choices"][0]["text"].startswith("hi")


def test_generate_names_top_logprobs_and_chat_takes_openai_s_logprobs(llm):
    """chat(logprobs=True, top_logprobs=2) (OpenAI's chat form, llama-cpp-python's create_chat_completion's)
    was "logprobs must be an integer; got True"; generate(top_logprobs=) got "did you mean 'logprobs'"."""
    with pytest.raises(TypeError, match="'top_logprobs': logprobs=N records the N most likely tokens"):
        llm.generate("hi", top_logprobs=2)
    messages = [{"role": "user", "content": "hi"}]
    for kwargs, top in (({"logprobs": True, "top_logprobs": 2}, 2), ({"logprobs": True}, 0), ({"logprobs": 3}, 3)):
        stream = llm.chat(messages, max_new_tokens=3, stream=True, **kwargs)
        "".join(stream)
        assert stream.tokens and all(t.logprob is not None and len(t.top or []) == top for t in stream.tokens)
    stream = llm.chat(messages, max_new_tokens=3, stream=True, logprobs=False)
    "".join(stream)
    assert all(t.logprob is None for t in stream.tokens)
    with pytest.raises(ValueError, match="top_logprobs needs logprobs=True"):
        llm.chat(messages, top_logprobs=2, stream=True)


@pytest.mark.parametrize("name, message", [
    ("n_gpu_layers", "device='cuda' runs the whole model on the GPU"),
    ("seed", "give seed= to generate\\(\\) or chat\\(\\)"),
    # were "did you mean" nothing ("it takes: path, ..."): Llama(model_path=..., verbose=False) is the common call
    ("verbose", "pyllm writes no log"), ("n_batch", "pyllm sizes the chunks"), ("n_ubatch", "pyllm sizes the chunks"),
    ("use_mmap", "the model file is always memory-mapped"), ("type_k", "kv_cache="), ("type_v", "kv_cache="),
    ("n_threads_batch", "n_threads="), ("logits_all", "llm.logits"), ("embedding", "llm.embed"),
    ("flash_attn", "pyllm picks its attention kernels"),
])
def test_llama_cpp_python_constructor_names_pyllm_does_not_take_say_what_to_do(llm, name, message):
    """Llama(lora_path=...) as LLM(lora_path=...) got "did you mean 'model_path'?"."""
    with pytest.raises(TypeError, match=f"LLM\\(\\) got an unexpected keyword argument '{name}': {message}"):
        pyllm.LLM(llm.path, **{name: 1})


def test_llama_cpp_python_s_tokenize_names_are_aliases(llm):
    """llm.tokenize("Hi", add_bos=False) and special= (llama-cpp-python's Llama.tokenize) were
    "unexpected keyword argument"; a misspelt one says the nearest."""
    text = "Hi<|im_end|>"
    assert llm.tokenize(text, add_bos=False) == llm.tokenize(text, add_special_tokens=False)
    assert llm.tokenize(text, special=False) == llm.tokenize(text, parse_special=False) != llm.tokenize(text)
    with pytest.raises(TypeError, match="got both 'add_special_tokens' and its alias 'add_bos'"):
        llm.tokenize(text, add_bos=False, add_special_tokens=False)
    with pytest.raises(TypeError, match="did you mean 'parse_special'"):
        llm.tokenize(text, parse_specials=False)


@pytest.mark.parametrize("path", [3, None, 2.5])
def test_a_path_of_another_type_is_named(path):
    """LLM(3) said "expected str, bytes or os.PathLike object, not int", naming no argument."""
    with pytest.raises(TypeError, match=f"^path must be a model file or directory \\(a str or os.PathLike\\); got "
                                        f"{type(path).__name__}$"):
        pyllm.LLM(path)


def test_do_sample_is_transformers_switch_between_greedy_and_sampling(llm):
    """generate(do_sample=False) (transformers' greedy switch) was "unexpected keyword argument"."""
    greedy = llm.generate("hello", max_new_tokens=6, temperature=0)
    assert llm.generate("hello", max_new_tokens=6, do_sample=False) == greedy
    assert llm.generate("hello", max_new_tokens=6, do_sample=False, temperature=1.5, seed=1) == greedy
    sampled = {llm.generate("hello", max_new_tokens=6, do_sample=True, seed=s) for s in range(4)}
    assert llm.generate("hello", max_new_tokens=6, do_sample=True, seed=0) == \
        llm.generate("hello", max_new_tokens=6, temperature=1.0, top_k=50, seed=0)  # transformers' defaults
    assert len(sampled) > 1
    with pytest.raises(ValueError, match="do_sample must be True or False; got 'yes'"):
        llm.generate("hello", do_sample="yes")
    with pytest.raises(ValueError, match="do_sample=True samples, and temperature=0 decodes greedily"):
        llm.generate("hello", do_sample=True, temperature=0)


def test_prompt_types(llm):
    replies = llm.generate(["a", "b"], max_new_tokens=2)  # a list of prompts: one reply each (pyllm/batch.py)
    assert isinstance(replies, list) and len(replies) == 2 and all(isinstance(r, str) for r in replies)
    with pytest.raises(TypeError, match="prompt must be a str or a list of token ids"):
        llm.generate(3.5)
    with pytest.raises(TypeError, match="non-int items"):
        llm.generate([1, "b"])
    assert isinstance(llm.generate(llm.tokenize("hello"), max_new_tokens=2), str)
    # an empty prompt (no BOS added by this tokenizer) was PyllmError "expected a non-empty list of token ids"
    for empty in ("", []):
        with pytest.raises(ValueError, match="^prompt is empty: it has no tokens"):
            llm.generate(empty, max_new_tokens=2)
    with pytest.raises(ValueError, match="^prompt 1 of the list is empty"):
        llm.generate(["a", ""], max_new_tokens=2)


def _parse(*argv):
    return cli.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("flags", [
    ("-n", "7"), ("--max-tokens", "7"), ("--max-new-tokens", "7"), ("--n-predict", "7"),
])
def test_max_tokens_flag_aliases(flags):
    assert _parse("run", *flags).max_tokens == 7


def test_run_takes_the_prompt_after_the_model_as_ollama_does(tiny_llama_f32, capsys):
    """`pyllm run MODEL Why is the sky blue` (`ollama run MODEL "..."`) was "unrecognized arguments"."""
    def run(*argv):
        capsys.readouterr()
        status = cli.main(["run", tiny_llama_f32, "-n", "3", "-t", "1", "--raw", *argv])
        out = capsys.readouterr()
        return status, out.out, out.err

    expected = run("-p", "Paris is the")
    assert expected[0] == 0
    for argv in (["Paris is the"], ["Paris", "is", "the"], ["Paris", "--temperature", "0", "is", "the"]):
        assert run(*argv)[:2] == expected[:2], argv
    status, _, err = run("-p", "x", "Paris")
    assert status == 1 and "the prompt is given twice: -p, and 'Paris' after the model" in err
    with pytest.raises(SystemExit):
        cli.main(["run", tiny_llama_f32, "Paris", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_words_after_a_double_dash_are_the_prompt(tiny_llama_f32, capsys):
    """`pyllm run MODEL -n 1 -- hello` was "unrecognized arguments: -- hello", so a prompt starting
    with "-" could not follow the options: after "--" every word is the prompt's."""
    def run(*argv):
        capsys.readouterr()
        status = cli.main(["run", tiny_llama_f32, "-t", "1", "--raw", *argv])
        return status, capsys.readouterr().out

    assert run("-n", "3", "--", "-5", "degrees") == run("-n", "3", "-p", "-5 degrees")
    assert run("-n", "3", "--", "hello") == run("-n", "3", "hello") == run("-n", "3", "-p", "hello")


def test_piped_text_comes_before_the_prompt_words_as_ollama_takes_it(tiny_llama_f32, tmp_path, monkeypatch, capsys):
    """`cat notes.txt | pyllm run MODEL summarize` (ollama's idiom: the piped text, then the words) answered
    "summarize" alone: the piped text was dropped in silence. It now comes first, a blank line between;
    stdin that is not a pipe or a file (a terminal, /dev/null, none) is not read, and -p reads none."""
    def run(*argv):
        capsys.readouterr()
        status = cli.main(["run", tiny_llama_f32, "-n", "3", "-t", "1", "--raw", *argv])
        return status, capsys.readouterr().out

    expected = run("-p", "Paris is\n\nthe capital")
    notes = tmp_path / "notes.txt"
    for text in ("Paris is\n", "Paris is"):
        notes.write_text(text)
        with open(notes) as piped:
            monkeypatch.setattr(sys, "stdin", piped)
            assert run("the", "capital") == expected
    with open(notes) as piped, open(os.devnull) as null:
        monkeypatch.setattr(sys, "stdin", null)
        alone = run("-p", "the capital")
        assert run("the", "capital") == alone != expected
        monkeypatch.setattr(sys, "stdin", piped)
        assert run("-p", "the capital") == alone
    notes.write_bytes(b"caf\xe9")
    with open(notes) as piped:
        monkeypatch.setattr(sys, "stdin", piped)
        assert cli.main(["run", tiny_llama_f32, "-n", "3", "the", "capital"]) == 1
    assert "stdin is not UTF-8 text (byte 3" in capsys.readouterr().err


def test_a_prompt_longer_than_the_context_says_what_to_do(tiny_llama_f32, capsys):
    """`pyllm run M -p ... -c 4` said "18 tokens exceed the context length of 4" and no more: the flag that
    sets the context went unnamed. It now says to shorten the prompt, or, while the model was trained on
    more, to give a larger -c / --ctx (as the chat does)."""
    assert cli.main(["run", tiny_llama_f32, "-p", "hi", "-c", "4", "-t", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyllm run: error: ") and err.count("\n") == 1
    assert "exceed the context length of 4: shorten the prompt, or give a larger -c / --ctx (the model was " \
           "trained on 256 tokens)" in err
    assert cli.main(["run", tiny_llama_f32, "--raw", "-p", "word " * 300, "-t", "1"]) == 1
    err = capsys.readouterr().err
    assert "exceed the context length of 256: shorten the prompt\n" in err and "--ctx" not in err


def test_other_flag_aliases():
    for flag in ("--repeat-penalty", "--repetition-penalty"):
        assert _parse("run", flag, "1.2").repeat_penalty == 1.2
    for flag in ("-c", "--ctx", "--ctx-size", "--context-length", "--n-ctx"):
        assert _parse("run", flag, "99").ctx == 99
        assert _parse("serve", flag, "99").ctx == 99
    for flag in ("-t", "--threads", "--n-threads"):
        assert _parse("bench", flag, "3").threads == 3
    assert _parse("run", "--temp", "0.3").temperature == 0.3
    assert _parse("perplexity", "-c", "128", "-f", "x.txt").ctx == 128


def test_missing_chat_template_file_says_not_found(tiny_llama_f32, capsys):
    assert cli.main(["run", tiny_llama_f32, "-p", "hi", "--chat-template", "./missing.jinja"]) == 1
    err = capsys.readouterr().err
    assert "chat template file ./missing.jinja not found" in err
    assert cli.main(["run", tiny_llama_f32, "-p", "hi", "--chat-template", "nonsense"]) == 1
    assert "unknown chat template 'nonsense'" in capsys.readouterr().err


def test_empty_prompts_are_refused_before_loading(tiny_llama_f32, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_open", lambda args: pytest.fail("the model was loaded for an empty prompt"))
    assert cli.main(["run", tiny_llama_f32, "-p", ""]) == 1
    assert "the prompt is empty" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    assert cli.main(["run", tiny_llama_f32]) == 1
    assert "stdin was empty" in capsys.readouterr().err


def _options(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for found in _options(sub):
                    yield (f"{name} {found[0]}", found[1])
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield ("/".join(action.option_strings) or action.dest, action)


def test_every_help_entry_has_text_and_a_default():
    missing = []
    for name, action in _options(cli.build_parser()):
        if not action.help:
            missing.append(f"{name}: no text")
        elif action.option_strings and not action.required and "default" not in action.help:
            missing.append(f"{name}: no default")
    assert not missing, "\n".join(missing)


def test_sampling_help_names_the_models_setting_as_the_default():
    """--typical's help said "(default: 1 = off)", but a model file's typical_p (its generation_config's,
    as the other sampling settings) is used when the flag is left out. Every sampling flag the model's
    settings fill in (formats.packed.GENERATION_NUMBERS) now says so."""
    from pyllm.formats.packed import GENERATION_NUMBERS

    for command in ("run", "serve"):
        actions = {a.dest: a for a in cli.build_parser()._subparsers._group_actions[0].choices[command]._actions}
        for field in GENERATION_NUMBERS:
            dest = cli.SAMPLING_FLAGS.get(field, (field,))[0] if field != "max_new_tokens" else "max_tokens"
            assert "the model's setting" in actions[dest].help, (command, dest, actions[dest].help)


def test_server_takes_the_same_names():
    pytest.importorskip("pydantic")
    from pyllm.api_schema import parse_request

    alias = parse_request({"prompt": "x", "max_tokens": 5, "repeat_penalty": 1.2}, chat=False)
    plain = parse_request({"prompt": "x", "max_tokens": 5, "repetition_penalty": 1.2}, chat=False)
    assert alias.generate_options() == plain.generate_options()
    assert alias.generate_options()["repetition_penalty"] == 1.2 and alias.limit == plain.limit == 5


def test_convert_help_says_what_calibration_costs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"adds about [1-9][0-9]* s per 100M parameters on 2 idle CPU cores \([0-9.]+ CPU-minutes", text)


def test_perplexity_reports_uncertainty_and_speed_and_warns_past_the_trained_context(tiny_llama_f32, capsys):
    assert cli.main(["perplexity", tiny_llama_f32, "--ctx", "300", "--windows", "1", "-t", "1"]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"perplexity [0-9.]+ ± [0-9.]+ over 1 windows of 300 tokens \(149 scored\), [0-9.]+ tokens/s",
                     out), out
    assert "--ctx 300 exceeds the 256 tokens the model was trained on" in err
    assert "perplexity: 100%" in err  # the bar leaves its final line
    assert cli.main(["perplexity", tiny_llama_f32, "--ctx", "64", "--windows", "1", "-t", "1"]) == 0
    assert "exceeds" not in capsys.readouterr().err


def test_run_and_serve_warn_past_the_trained_context_as_perplexity_does(tiny_llama_f32, capsys):
    """`pyllm run -c 100000` on a model trained on 256 positions answered without a word (only
    perplexity warned, and the chat's banner showed it), as did `pyllm serve -c 100000`."""
    assert cli.main(["run", tiny_llama_f32, "-c", "300", "-n", "1", "-t", "1", "--raw", "-p", "Paris is"]) == 0
    assert "pyllm run: warning: --ctx 300 exceeds the 256 tokens the model was trained on" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["serve", tiny_llama_f32, "--ctx", "1000", "-t", "1", "--parallel", "1"])
    with cli._open(args) as llm:
        assert llm.context_length == 1000
    err = capsys.readouterr().err
    assert "pyllm serve: warning: --ctx 1000 exceeds the 256 tokens" in err and err.count("exceeds") == 1
    for ctx in ([], ["-c", "256"]):
        assert cli.main(["run", tiny_llama_f32, *ctx, "-n", "1", "-t", "1", "--raw", "-p", "Paris is"]) == 0
        assert "exceeds" not in capsys.readouterr().err


def test_the_api_warns_past_the_trained_context(tiny_llama_f32):
    """LLM(context_length=...) past the trained positions ran without a word in Python (only the CLI
    warned): a ContextLengthWarning now, pointing at the caller's line; none within them."""
    import warnings

    import pyllm
    from pyllm.errors import ContextLengthWarning

    with pytest.warns(ContextLengthWarning, match="context_length 300 exceeds the 256 tokens the model was trained") as got:
        pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=300).close()
    assert got[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContextLengthWarning)
        pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=256).close()
        pyllm.LLM(tiny_llama_f32, n_threads=1).close()


@pytest.mark.parametrize("model", ["tiny", "default"])
def test_perplexity_windows_tokenize_only_the_prefix_they_need(model, tiny_llama_f32, request, tmp_path, capsys,
                                                              monkeypatch):
    """`pyllm perplexity --text FILE --windows N` tokenized the whole file before scoring N windows (a
    22 MB text: 33 s, 4 GB, Ctrl-C waiting for it). leading_tokens tokenizes a prefix, giving the
    same ids as the whole text's first ones (on English, code, CJK and emoji, a text with no line end),
    and the command the same perplexity; text_tokens, all of a text a piece at a time, its ids."""
    import pyllm.perplexity
    from pyllm.perplexity import default_text, leading_tokens, text_tokens

    path = tiny_llama_f32 if model == "tiny" else request.getfixturevalue("default_model_file")
    docs = default_text()
    cjk = "中文测试：今天天气很好，我们去公园散步。😀🎉 café\n"
    texts = [docs, docs.replace("\n", " "), cjk * 10000,
             "def main():\n    print('hello, world')\n\n\n    return 0\n" * 2000]
    with pyllm.LLM(path, n_threads=1, context_length=64) as llm:
        seen = []

        def tokenize(text):
            seen.append(len(text))
            return llm.tokenize(text, add_special_tokens=False, parse_special=False)

        for text in texts:
            whole = tokenize(text)
            for count in (1, 500, 4096, len(whole) // 2, len(whole), len(whole) + 10):
                seen.clear()
                assert leading_tokens(tokenize, text, count)[:count] == whole[:count], (text[:20], count)
                if count <= 4096:
                    assert max(seen) < len(text) // 2, (text[:20], count, seen)  # a prefix alone
            # without --windows: all of it, a piece at a time (tests/test_perplexity.py)
            seen.clear()
            assert list(text_tokens(tokenize, text, piece_chars=4000)) == whole, text[:20]
            assert max(seen) < 3 * 4000, (text[:20], max(seen))
    file = tmp_path / "docs.txt"
    file.write_text(docs)
    results = []
    for whole_text in (False, True):
        if whole_text:  # as before: the whole text tokenized
            monkeypatch.setattr(pyllm.perplexity, "leading_tokens", lambda tokenize, text, count: tokenize(text))
        assert cli.main(["perplexity", path, "-t", "1", "--text", str(file), "-c", "64", "--windows", "3"]) == 0
        results.append(capsys.readouterr().out.split(",")[0])
    assert results[0] == results[1] and "over 3 windows of 64 tokens" in results[0], results


def test_perplexity_uncertainty_is_llama_cpps():
    import math

    import numpy as np

    from pyllm.perplexity import perplexity

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 8)).astype(np.float32)
    tokens = list(rng.integers(0, 8, 32))
    result = perplexity(lambda ids: logits, tokens, ctx=16)
    nll = []
    for w in range(2):
        ids = tokens[w * 16:(w + 1) * 16]
        z = logits[8:15].astype(np.float64)
        log_z = np.log(np.exp(z).sum(axis=1))
        nll += list(log_z - z[np.arange(7), ids[9:16]])
    nll = np.array(nll)
    assert math.isclose(result.perplexity, math.exp(nll.mean()), rel_tol=1e-9)
    expected = math.exp(nll.mean()) * math.sqrt(nll.var() / (len(nll) - 1))
    assert math.isclose(result.uncertainty, expected, rel_tol=1e-9)


def test_perplexity_past_a_floats_range_is_inf_not_an_overflow_error():
    """A model sure of the wrong tokens (mean NLL above ~709.8, logits spread by thousands: a broken
    conversion) made perplexity() raise OverflowError ('math range error'), in the progress callback
    and at the end: `pyllm perplexity` printed that and no result. It is now inf."""
    import math

    import numpy as np

    from pyllm.perplexity import perplexity

    tokens = [0] * 64
    seen = []
    for spread in (710.0, 1000.0, 3e38):
        logits = np.zeros((16, 8), dtype=np.float32)
        logits[:, 1] = spread  # every target is 0; token 1 takes all the probability
        result = perplexity(lambda ids: logits, tokens, ctx=16, progress=lambda d, n, p: seen.append(p))
        assert result.perplexity == math.inf and seen[-1] == math.inf, spread
        assert result.line().startswith("perplexity inf ± inf over 4 windows")
    logits = np.zeros((16, 8), dtype=np.float32)
    logits[:, 1] = 700.0  # just inside the range: still a number
    assert math.isfinite(perplexity(lambda ids: logits, tokens, ctx=16).perplexity)


def _help_of(capsys, *command) -> str:
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_names_what_the_code_takes(capsys):
    """`pyllm convert --help` said the source could be "a llama GGUF file" (ten GGUF architectures
    convert) and --group-size "(32, 64, 128)" (256 too); `pyllm serve --help` said --seed was "set
    once per session", where it seeds every request that sends none."""
    from pyllm.arch import ARCHITECTURES
    from pyllm.convert.gguf_arch import GGUF_ARCHITECTURES
    from pyllm.quant import GROUP_SIZES

    text = _help_of(capsys, "convert")
    source = text[text.index("source "):text.index("options:")]
    for name in [*ARCHITECTURES, *GGUF_ARCHITECTURES]:
        assert re.search(rf"\b{name}\b", source), name
    group = text[text.index("--group-size N "):]
    assert ", ".join(str(g) for g in GROUP_SIZES) in group[:200]
    serve = _help_of(capsys, "serve")
    seed = serve[serve.index("--seed N "):]
    assert "requests that send none" in seed and "session" not in seed


def test_help_defaults_are_the_real_ones(capsys):
    """A number a help text gives as the default is the parser's default (they are written apart)."""
    wrong = []
    for name, action in _options(cli.build_parser()):
        m = re.search(r"\(default:? ([-0-9.e]+)[;:,) ]", action.help or "")
        if m and isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
            if float(m.group(1)) != float(action.default):
                wrong.append(f"{name}: help says {m.group(1)}, the default is {action.default}")
    assert not wrong, "\n".join(wrong)


def test_cli_errors_name_the_flag_or_file_the_user_gave(tiny_llama, tiny_llama_f32, tmp_path, capsys):
    """Errors that named the library's argument or said the wrong thing: an empty model path ("error:
    does not exist"), a file as merge's output ("not an empty directory"), a missing model for verify
    (its words listed GGUF files and directories, which verify refuses), a text too short for
    perplexity (the file unnamed); perplexity takes every spelling of the context flag run takes."""
    def error(*argv):
        capsys.readouterr()
        assert cli.main(list(argv)) == 1
        return capsys.readouterr().err.strip()

    assert error("convert", "", "-o", str(tmp_path / "x.pllm")) == \
        "pyllm convert: error: no model path given (it is empty)"
    existing = tmp_path / "keep.txt"
    existing.write_text("mine")
    assert "keep.txt exists (the output is a directory)" in error("merge", tiny_llama, "--lora", str(tmp_path),
                                                                  "-o", str(existing))
    assert existing.read_text() == "mine"
    assert error("verify", str(tmp_path / "nothere")).endswith(
        "nothere: no such .pllm file or cached model (`pyllm list` shows them)")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert f"--text {empty} has 0 tokens, fewer than one window of --ctx 32" in error(
        "perplexity", tiny_llama_f32, "--text", str(empty), "--n-ctx", "32", "-t", "1")


def test_bench_past_the_trained_positions_warns_in_one_line_of_its_own_words(tiny_llama_f32, capsys):
    """`pyllm bench -p 300` on a model trained on 256 positions printed Python's warning, with its
    source file, line and code; it is one line naming -d, -p and -n."""
    capsys.readouterr()
    assert cli.main(["bench", tiny_llama_f32, "-p", "300", "-n", "2", "-r", "1", "-t", "1", "--bandwidth-mib", "0",
                     "--json"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pyllm bench: warning: -d 0 + -p 300 + -n 2 = 302 tokens exceed the 256 the model was trained on "
                   "(speed is measured all the same)"], err
