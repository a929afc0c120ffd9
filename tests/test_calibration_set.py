"""The built-in calibration set: disjoint from every evaluation text, every domain represented,
and the quantizer's choices on it deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from pyllm.convert.calibrate import (CALIBRATION_DOMAINS, builtin_calibration_texts, chat_calibration_text,
                                     interleaved_windows)
from pyllm.eval_texts import DOMAIN_NAMES, domain_text

SPAN = 64


def normalized(text: str) -> str:
    """Runs of whitespace as one space: a span then counts only characters of content (and a copy that
    was re-wrapped or re-indented is still found)."""
    return " ".join(text.split())


def shared_spans(text: str, spans: set[str], limit: int = 3) -> list[str]:
    """Up to `limit` SPAN-character spans of normalized `text` that are in `spans` (from spans_of)."""
    text, found = normalized(text), []
    for i in range(len(text) - SPAN + 1):
        if text[i:i + SPAN] in spans:
            found.append(text[i:i + SPAN])
            if len(found) == limit:
                break
    return found


def spans_of(text: str) -> set[str]:
    text = normalized(text)
    return {text[i:i + SPAN] for i in range(len(text) - SPAN + 1)}


@pytest.fixture(scope="module")
def calibration_spans():
    from conftest import CHATML

    texts = builtin_calibration_texts(CHATML, "<|im_start|>", "<|im_end|>")
    return spans_of("\n".join(texts.values()))


@pytest.mark.parametrize("domain", DOMAIN_NAMES)
def test_calibration_set_shares_no_64_character_span_with_an_evaluation_text(domain, calibration_spans):
    try:
        text = domain_text(domain)
    except FileNotFoundError as e:  # a Debian package the machine lacks (.ci/run installs them)
        pytest.skip(str(e))
    assert len(text) > 50_000  # 24 windows of 512 tokens need a long text
    assert shared_spans(text, calibration_spans) == []


def test_the_span_check_finds_a_shared_span():
    """The check above can fail: a sentence copied from one text into another is found."""
    a = "x" * 10 + "The quick brown fox jumps over the lazy dog while the cat watches from the wall." + "y" * 10
    b = "something else entirely; The quick brown fox jumps over the lazy dog while the cat watches"
    assert shared_spans(b, spans_of(a))
    assert not shared_spans(b[:60] + "z" * 80, spans_of(a))
    assert shared_spans(b.replace(" ", "\n    "), spans_of(a))  # re-wrapped


def test_every_calibration_domain_has_text():
    texts = builtin_calibration_texts()
    assert tuple(texts) == CALIBRATION_DOMAINS
    assert all(len(t) > 1000 for t in texts.values())
    assert sum(0x4E00 <= ord(c) <= 0x9FFF for c in texts["chinese-prose"]) > 1000


def test_chat_domain_is_rendered_with_the_models_template():
    from conftest import CHATML

    rendered = chat_calibration_text(CHATML)
    assert rendered.count("<|im_start|>assistant\n") >= 9 and "<|im_end|>" in rendered
    plain = chat_calibration_text("")  # no template: "role: content" lines, same dialogues
    assert "<|im_start|>" not in plain and plain.count("assistant: ") == rendered.count("<|im_start|>assistant\n")
    broken = chat_calibration_text("{{ raise_exception('no system role') }}")
    assert broken == plain


def test_interleaved_windows_take_every_domain_in_turn():
    domains = {"a": list(range(100)), "b": list(range(1000, 1030)), "c": [2000]}
    windows, names = interleaved_windows(domains, 10, 6, bos_id=None)
    assert names == ["a", "b", "a", "b", "a", "b"]  # c is shorter than a quarter window: left out
    assert windows[1].tolist() == list(range(1000, 1010)) and windows[2].tolist() == list(range(10, 20))
    windows, names = interleaved_windows(domains, 8, 100, bos_id=7)
    assert names.count("a") == 13 and names.count("b") == 4 and names.count("c") == 0
    assert all(w[0] == 7 for w in windows) and len(windows[-1]) == 4  # a's last, shorter window
    with pytest.raises(ValueError, match="no window"):
        interleaved_windows({"a": [1]}, 8, 4, bos_id=None)


def test_builtin_calibration_covers_every_domain(tiny_llama):
    from pyllm.convert.calibrate import Calibration
    from pyllm.convert.checkpoint import ArchitectureView, Checkpoint

    view = ArchitectureView(Checkpoint(tiny_llama))
    try:
        cal = Calibration(view, view.config, None, sequences=10, length=64, progress=False)
    finally:
        view.close()
    assert set(cal.domain_counts()) == set(CALIBRATION_DOMAINS) and len(cal.windows) == 10


def test_quantizer_choices_are_deterministic(tiny_llama, tmp_path):
    """Two default int4 conversions (built-in calibration, layouts per matrix, GPTQ) write the same file."""
    from pyllm.convert import convert_checkpoint
    from pyllm.convert import strategy

    paths = []
    for i in range(2):
        strategy._LAST_CALIBRATION.clear()  # calibrate again rather than reuse the first run's Hessians
        paths.append(str(tmp_path / f"m{i}.pllm"))
        convert_checkpoint(tiny_llama, paths[-1], quant="int4", progress=False)
    a, b = (np.fromfile(p, dtype=np.uint8) for p in paths)
    assert a.shape == b.shape and np.array_equal(a, b)


def test_encoding_a_prefix_gives_the_windows_of_the_whole_text(tiny_llama):
    """Calibration tokenizes only as much of each domain as its windows can use; the windows are those
    of the whole text."""
    from pyllm.convert.calibrate import encode_prefix
    from pyllm.convert.checkpoint import Checkpoint
    from pyllm.tokenizer import Tokenizer

    ckpt = Checkpoint(tiny_llama)
    tokenizer = Tokenizer(*ckpt.tokenizer())
    ckpt.close()
    texts = builtin_calibration_texts()
    for n in (64, 2000):
        for name, text in texts.items():
            whole = tokenizer.encode(text, add_special_tokens=False)
            prefix = encode_prefix(tokenizer, text, n)
            assert len(prefix) >= min(n, len(whole)) and prefix[:n] == whole[:n], name
            if n == 64:
                assert len(prefix) < len(whole) / 10, name  # a short prefix, not the whole text
