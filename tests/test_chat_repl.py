"""`pyllm run` interactive chat: commands, multi-line input, Ctrl-C, speed lines; in process and in a pty."""

from __future__ import annotations

import os
import signal
import sys

import pytest

import pyllm
from pyllm import repl


@pytest.fixture(scope="module")
def llm(tiny_llama_f32):
    with pyllm.LLM(tiny_llama_f32, n_threads=1) as model:
        yield model


def _script(lines):
    it = iter(lines)

    def fake_input(prompt=""):
        item = next(it)
        if isinstance(item, BaseException):
            raise item
        return item
    return fake_input


class ChatSpy:
    def __init__(self, llm):
        self.llm, self.seen = llm, []

    def __call__(self, messages, **kw):
        self.seen.append([(m["role"], m["content"]) for m in messages])
        return self.llm.__class__.chat(self.llm, messages, **kw)


def test_commands_and_multi_line_input(llm, monkeypatch, capsys):
    spy = ChatSpy(llm)
    monkeypatch.setattr(llm, "chat", spy)
    lines = ["hello", "/regen", "/system Be terse.", "/system", "line one\\", "line two", '"""', "a", "", "b", '"""',
             "/clear", "/help", "/nonsense", "again", "/exit"]
    assert repl.chat_loop(llm, "Be brief.", dict(max_new_tokens=3), input_fn=_script(lines)) == 0
    first = spy.seen[0]
    assert first == [("system", "Be brief."), ("user", "hello")]
    assert spy.seen[1] == first  # /regen asks again for the same turn
    assert spy.seen[2][0] == ("system", "Be terse.") and spy.seen[2][-1] == ("user", "line one\nline two")
    assert len(spy.seen[2]) == 4  # system, hello, its (regenerated) reply, the new message
    assert spy.seen[3][-1] == ("user", "a\n\nb")
    assert spy.seen[4] == [("system", "Be terse."), ("user", "again")]  # after /clear
    err = capsys.readouterr().err
    assert err.count("Generation:") == 5 and "system: Be terse." in err
    assert "/regen" in err and "unknown command /nonsense" in err


def test_ctrl_c_stops_the_reply_and_twice_at_the_prompt_exits(llm, monkeypatch, capsys):
    monkeypatch.setattr(llm.tokenizer, "eos_ids", [])  # the reply would run to max_new_tokens
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in a background job
    pieces_seen = []
    real_chat = llm.__class__.chat

    def chat(messages, **kw):
        stream = real_chat(llm, messages, **kw)
        inner_next = stream._pieces

        def interrupting():
            for i, piece in enumerate(inner_next):
                pieces_seen.append(piece)
                if i == 3:
                    signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C
                yield piece
        stream._pieces = interrupting()
        return stream

    monkeypatch.setattr(llm, "chat", chat)
    lines = ["tell me a long story", KeyboardInterrupt(), "still here?", KeyboardInterrupt(), KeyboardInterrupt()]
    assert repl.chat_loop(llm, None, dict(max_new_tokens=5000), input_fn=_script(lines)) == 0
    err = capsys.readouterr().err
    assert err.count("(stopped)") == 2  # both replies stopped at Ctrl-C, far short of 5000 tokens
    assert len(pieces_seen) < 20
    assert "Ctrl-C again to exit" in err
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored


def test_context_full_is_reported_and_the_chat_goes_on(tiny_llama_f32, capsys):
    with pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=40) as small:
        lines = ["word " * 60, "hi", "/exit"]
        assert repl.chat_loop(small, None, dict(max_new_tokens=2), input_fn=_script(lines)) == 0
    err = capsys.readouterr().err
    assert "context" in err and "/clear" in err and "Generation:" in err


def test_model_without_template_asks_for_one(llm, monkeypatch, capsys):
    monkeypatch.setattr(llm, "chat_template", "")
    assert repl.chat_loop(llm, None, {}, input_fn=_script(["hi"])) == 2
    assert "--chat-template" in capsys.readouterr().err


def test_repl_in_a_terminal(tiny_llama_f32):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "pyllm", "run", tiny_llama_f32, "-n", "4", "-t", "1",
                                           "--chat-template", "chatml", "--system", "Be brief."],
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, encoding="utf-8", timeout=60,
                          # a terminal's Ctrl-C, even when the suite itself runs with SIGINT ignored
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect("/help lists the commands")
    child.expect("> ")
    child.sendline("hello")
    child.expect(r"Generation: [0-9.]+ t/s \]")
    child.expect("> ")
    child.sendline("first line\\")
    child.expect(r"\. ")
    child.sendline("second line")
    child.expect(r"Generation: [0-9.]+ t/s \]")
    child.expect("> ")
    child.sendline("/help")
    child.expect("/regen")
    child.expect("> ")
    child.sendintr()
    child.expect("Ctrl-C again to exit")
    child.expect("> ")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
