"""`pyllm run` interactive chat: commands, multi-line input, Ctrl-C, speed lines; in process and in a pty."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

import pyllm
from pyllm import repl
from pyllm.chat_template import BUILTIN_TEMPLATES


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
    # (it said "/clear starts over", which cannot help a message too long on its own: the earlier turns are
    # left out by themselves now)
    assert "exceed the context length of 40" in err and "--ctx" in err and "Generation:" in err


def test_regen_that_is_refused_keeps_the_turn(tiny_llama_f32, monkeypatch, capsys):
    """/regen after a /system the conversation no longer fits with (or the template refuses) said
    the error and dropped the last reply and its user message too: the next /regen had nothing
    to regenerate, the turn was gone. Now the conversation stays as it was."""
    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                 "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}assistant:")
    sessions = []
    real_session = repl.ChatSession
    monkeypatch.setattr(repl, "ChatSession", lambda *a, **k: sessions.append(real_session(*a, **k)) or sessions[-1])
    for template, system in ((None, "word " * 60), (no_system, "Be terse.")):
        with pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=48, chat_template=template) as small:
            first = small.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
            lines = ["hi", "/system " + system, "/regen", "/regen", "/exit"]
            assert repl.chat_loop(small, None, dict(max_new_tokens=2), input_fn=_script(lines)) == 0
            turns = sessions[-1].turns
            assert turns == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first}]
        err = capsys.readouterr().err
        assert err.count("error:") == 2 and "nothing to regenerate" not in err, err
        assert err.count("Generation:") == 1  # the first reply, kept through both refusals


def test_model_without_template_asks_for_one(llm, monkeypatch, capsys):
    monkeypatch.setattr(llm, "chat_template", "")
    assert repl.chat_loop(llm, None, {}, input_fn=_script(["hi"])) == 2
    assert "--chat-template" in capsys.readouterr().err


# The line editor (prompt_toolkit) turns bracketed paste on each time it waits for a line: the test's
# "the prompt is ready" (its rendering of "> " is cursor movements, not the characters).
READY = "\x1b[?2004h"
STATS = r"Generation: (?:[0-9.]+|-) t/s \]"


def spawn_chat(model, cache, *args):
    """`pyllm run MODEL` in a pseudo-terminal, with its cache (chat history) in `cache`."""
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(cache), "TERM": "xterm",
           "PROMPT_TOOLKIT_NO_CPR": "1"}  # no terminal answers cursor position requests here
    child = pexpect.spawn(sys.executable, ["-m", "pyllm", "run", model, "-t", "1", "--chat-template", "chatml", *args],
                          env=env, encoding="utf-8", timeout=60,
                          # a terminal's Ctrl-C, even when the suite itself runs with SIGINT ignored
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact(READY)
    return child


def reply_of(child, line):
    """Sends a line; returns the reply's text as the terminal showed it (after the editor let go)."""
    child.send(line + "\r")
    child.expect(STATS)
    text = child.before.split("\x1b[?2004l")[-1]  # bracketed paste off: the editor returned the line
    child.expect_exact(READY)
    return text.split("\r\n[reply cut")[0]


def test_repl_in_a_terminal(tiny_llama_f32, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(tiny_llama_f32, tmp_path, "-n", "4", "--system", "Be brief.")
    assert "tiny-f32.pllm: context 256 tokens" in child.before  # the banner names the model and its context
    assert "/help lists the commands" in child.before
    child.send("hello\r")
    child.expect(STATS)
    child.expect_exact(READY)
    child.send("first line\\\r")
    child.expect_exact(READY)  # the continuation line
    child.send("second line\r")
    child.expect(STATS)
    child.expect_exact(READY)
    child.send("/help\r")
    child.expect("/regen")
    child.expect_exact(READY)
    child.sendintr()
    child.expect("Ctrl-C again to exit")
    child.expect_exact(READY)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_line_editor_history_paste_and_long_lines(tiny_llama_f32, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(tiny_llama_f32, tmp_path, "-n", "2")
    # a 30,000-character line (pasted, as such lines come) reaches the model whole: the context error
    # counts all its characters (a terminal's own line discipline stops at 4095 characters)
    long = " ".join(f"w{i % 97}" for i in range(8000))[:30000]
    child.send("\x1b[200~" + long + "\x1b[201~")
    child.send("\r")
    child.expect(r"error: the prompt has (\d+) characters, more than the context's 256 tokens can hold")
    with pyllm.LLM(tiny_llama_f32, n_threads=1, chat_template="chatml") as llm:
        expected = len(llm.apply_chat_template([{"role": "user", "content": long}]))
    assert int(child.match.group(1)) == expected
    child.expect_exact(READY)
    child.send("first message\r")
    child.expect(STATS)
    child.expect_exact(READY)
    # a bracketed paste of three lines, then Enter: one turn (one reply), not three
    child.send("\x1b[200~line one\nline two\nline three\x1b[201~")
    child.send("\r")
    child.expect(STATS)
    child.expect_exact(READY)
    assert "Generation:" not in child.before
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    history = (tmp_path / "pyllm" / repl.HISTORY_FILE).read_text()
    assert "+line one\n+line two\n+line three\n" in history and "+" + long + "\n" in history

    # the next session recalls the earlier messages with the Up arrow (no ^[[A on the screen)
    child = spawn_chat(tiny_llama_f32, tmp_path, "-n", "2")
    child.send("\x1b[A\x1b[A")  # /exit, then the pasted block
    child.expect("line three")
    child.send("\r")
    child.expect(STATS)
    child.expect_exact(READY)
    assert "^[[A" not in child.before
    child.sendeof()
    child.expect(pexpect.EOF)


def test_a_history_that_cannot_be_saved_does_not_stop_the_chat(tiny_llama_f32, tmp_path):
    """A cache directory that cannot be made (a file in its way, a read-only disk) ended `pyllm run`
    in a terminal with "error: [Errno 20] Not a directory" before the first message; a directory in
    place of the history file likewise at its first line. The chat now goes on, the history kept in
    memory (Up recalls this session's messages), said once on stderr."""
    pexpect = pytest.importorskip("pexpect")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    in_place = tmp_path / "cache"
    (in_place / "pyllm" / repl.HISTORY_FILE).mkdir(parents=True)
    import io

    for cache in (blocked, in_place):
        child = spawn_chat(tiny_llama_f32, cache, "-n", "2")
        child.logfile_read = seen = io.StringIO()
        seen.write(child.before + child.buffer)  # (what came after the prompt is not logged again)
        for message in ("first message", "second message"):
            child.send(message + "\r")
            child.expect(STATS)
            child.expect_exact(READY)
        assert seen.getvalue().count("chat history not saved") == 1, seen.getvalue()  # said once
        child.send("\x1b[A\x1b[A")  # this session's history, in memory
        child.expect("first message")
        child.send("\r")
        child.expect(STATS)
        child.expect_exact(READY)
        child.send("/exit\r")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    assert blocked.read_text() == "not a directory"


def test_regen_with_seed_differs_and_sessions_repeat(tiny_llama_f32, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    sessions = []
    for _ in range(2):
        child = spawn_chat(tiny_llama_f32, tmp_path, "-n", "12", "--temperature", "1", "--seed", "7")
        sessions.append([reply_of(child, "hi"), reply_of(child, "/regen"), reply_of(child, "/regen")])
        child.sendeof()
        child.expect(pexpect.EOF)
    first, again = sessions
    assert first == again  # one seed per session: the same sequence each session
    assert len(set(first)) == 3, first  # /regen draws another reply


def test_length_marker_in_a_terminal_and_with_a_prompt(tiny_llama_f32, tmp_path, monkeypatch, capsys):
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(tiny_llama_f32, tmp_path, "-n", "3")
    child.send("hello\r")
    child.expect(r"\[reply cut at the limit of 3 new tokens: -n / --max-new-tokens raises it\]")
    child.expect(STATS)
    child.expect_exact(READY)  # the editor holds the terminal again: a ^D sent earlier is eaten by the tty
    child.sendeof()
    child.expect(pexpect.EOF)
    from pyllm import cli

    assert cli.main(["run", tiny_llama_f32, "-p", "hello", "-n", "3", "-t", "1", "--chat-template", "chatml"]) == 0
    assert "[reply cut at the limit of 3 new tokens" in capsys.readouterr().err


def test_context_full_marker(tiny_llama_f32, capsys):
    with pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=24, chat_template="chatml") as small:
        small.tokenizer.eos_ids = []  # the reply runs until the context is full
        repl.ChatSession(small, None, dict(max_new_tokens=100)).say("hi")
    err = capsys.readouterr().err
    assert "[reply cut: the context of 24 tokens is full; the next message leaves the oldest ones out]" in err


def test_system_command_shows_the_templates_default(llm, monkeypatch, capsys):
    monkeypatch.setattr(llm, "chat_template", "{% if messages[0]['role'] != 'system' %}system: Be kind.\n{% endif %}"
                        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    session = repl.ChatSession(llm, None, {})
    session.command("/system")
    assert "system: (the chat template's default) Be kind." in capsys.readouterr().err
    session.system = "Be terse."
    session.command("/system")
    assert "system: Be terse." in capsys.readouterr().err
    monkeypatch.setattr(llm, "chat_template", BUILTIN_TEMPLATES["chatml"])
    session.system = None
    session.command("/system")
    assert "system: (none)" in capsys.readouterr().err


def test_seed_is_drawn_once_per_session(llm, monkeypatch):
    spy = []
    real_chat = llm.__class__.chat
    monkeypatch.setattr(llm, "chat", lambda messages, **kw: spy.append(kw["seed"]) or real_chat(llm, messages, **kw))
    for _ in range(2):
        session = repl.ChatSession(llm, None, dict(max_new_tokens=2, seed=5))
        session.say("hi")
        session.command("/regen")
    assert spy[:2] == spy[2:] and spy[0] != spy[1]


def test_a_negative_seed_is_as_generate_takes_it(llm, monkeypatch):
    """`pyllm run --seed -1` (llama.cpp's "random") or --seed -5 ended the chat before it began: numpy's
    default_rng refuses negative seeds. -1 is unseeded, as generate() takes it; -5 seeds, as 2**64 - 5."""
    spy = []
    real_chat = llm.__class__.chat
    monkeypatch.setattr(llm, "chat", lambda messages, **kw: spy.append(kw.get("seed")) or real_chat(llm, messages,
                                                                                                     **kw))
    repl.ChatSession(llm, None, dict(max_new_tokens=2, seed=-1)).say("hi")
    assert spy == [None]
    for seed in (-5, 2**64 - 5):
        repl.ChatSession(llm, None, dict(max_new_tokens=2, seed=seed)).say("hi")
    assert spy[1] == spy[2] is not None


def test_end_of_input_inside_a_block_sends_what_was_typed(llm, monkeypatch, capsys):
    """Ctrl-D (end of input) inside a \"\"\" block or on the line after a trailing backslash ended the chat
    and silently dropped the lines typed: the message was lost. Now it is sent, then the chat ends."""
    spy = ChatSpy(llm)
    monkeypatch.setattr(llm, "chat", spy)
    for lines, expected in ((['"""', "first", "", "second", EOFError()], "first\n\nsecond"),
                            (["one\\", "two\\", EOFError()], "one\ntwo")):
        spy.seen.clear()
        assert repl.chat_loop(llm, None, dict(max_new_tokens=2), input_fn=_script(lines)) == 0
        assert spy.seen == [[("user", expected)]]
        assert capsys.readouterr().err.count("Generation:") == 1
    # nothing typed in the block: nothing sent
    spy.seen.clear()
    assert repl.chat_loop(llm, None, dict(max_new_tokens=2), input_fn=_script(['"""', EOFError()])) == 0
    assert spy.seen == []


@pytest.mark.parametrize("when", ["during the reply", "as the editor lets go"])
def test_ctrl_d_while_a_reply_is_written_ends_the_chat_after_it(tiny_llama_f32, tmp_path, when):
    """Ctrl-D pressed while a reply was being written was lost (the terminal, in line mode then, took it
    as end of an empty line that nobody read), and the prompt then waited for more. The keys pressed
    during a reply now reach the line editor: the chat ends once the reply is done. Also in the moment
    between the editor letting go of the terminal and the reply (made 0.5 s long here)."""
    pexpect = pytest.importorskip("pexpect")
    slow = tmp_path / "slow"
    slow.mkdir()  # each piece of a reply takes 50 ms in the child: time to press Ctrl-D during it
    slow_down = ("from pyllm import llm\nnext_piece = llm.TextStream.__next__\n"
                 "llm.TextStream.__next__ = lambda self: time.sleep(0.05) or next_piece(self)\n"
                 if when == "during the reply" else
                 "from prompt_toolkit import PromptSession\nprompt = PromptSession.prompt\n"
                 "PromptSession.prompt = lambda *a, **k: (prompt(*a, **k), time.sleep(0.5))[0]\n")
    (slow / "sitecustomize.py").write_text("import time\n" + slow_down)
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(slow) + (os.pathsep + path if path else "")
    try:
        child = spawn_chat(tiny_llama_f32, tmp_path / "cache", "-n", "40")
    finally:
        os.environ["PYTHONPATH"] = path
    child.send("hello\r")
    child.expect_exact("\x1b[?2004l")  # the editor let go of the line: the reply is being written
    if when == "as the editor lets go":
        time.sleep(0.2)  # (within the 0.5 s: the editor has given the terminal back by then)
    child.sendeof()
    child.expect(STATS)
    child.expect(pexpect.EOF, timeout=15)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("when", ["rendering the prompt", "before the first token"])
def test_ctrl_c_before_the_reply_begins_stops_it_not_the_chat(llm, monkeypatch, capsys, when):
    """Ctrl-C right after Enter, while the conversation was rendered or its prompt read (seconds for a long
    conversation on a large model), came before the reply's Ctrl-C handler: KeyboardInterrupt ended the
    whole chat (status 130, the conversation gone). Now it stops that reply; the chat goes on."""
    real_chat = llm.__class__.chat

    def chat(messages, **kw):
        if when == "rendering the prompt":
            signal.raise_signal(signal.SIGINT)
        stream = real_chat(llm, messages, **kw)
        if when == "before the first token":
            pieces = stream._pieces

            def interrupted_first():
                signal.raise_signal(signal.SIGINT)
                yield from pieces
            stream._pieces = interrupted_first()
        return stream

    monkeypatch.setattr(llm, "chat", chat)
    sessions = []
    real_session = repl.ChatSession
    monkeypatch.setattr(repl, "ChatSession", lambda *a, **k: sessions.append(real_session(*a, **k)) or sessions[-1])
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C (the suite may ignore it)
    try:
        status = repl.chat_loop(llm, None, dict(max_new_tokens=3), input_fn=_script(["hello", "/exit"]))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C before the reply began ended the chat")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status == 0
    err = capsys.readouterr().err
    assert "(stopped)" in err and "Ctrl-C again" not in err
    assert sessions[-1].turns == []  # stopped before a word: the message is not part of the conversation


def test_a_block_that_starts_with_a_slash_is_a_message(llm, monkeypatch, capsys):
    """A pasted or \"\"\" block of several lines that began with a path ("/etc/fstab has these lines: ...")
    was taken for a command: "unknown command /etc/fstab..." and the whole block was not sent. Several
    lines are a message unless they start with a known command (/system over several lines still is)."""
    spy = ChatSpy(llm)
    monkeypatch.setattr(llm, "chat", spy)
    lines = ["/etc/fstab holds:\nproc /proc proc defaults 0 0", '"""', "/usr/bin/env python3", "print(1)", '"""',
             "/system Be\\", "terse.", "/etc/fstab?", " /etc/fstab?", "/exit"]
    assert repl.chat_loop(llm, None, dict(max_new_tokens=2), input_fn=_script(lines)) == 0
    assert [seen[-1] for seen in spy.seen] == [("user", "/etc/fstab holds:\nproc /proc proc defaults 0 0"),
                                               ("user", "/usr/bin/env python3\nprint(1)"), ("user", " /etc/fstab?")]
    assert spy.seen[-1][0] == ("system", "Be\nterse.")
    err = capsys.readouterr().err
    assert err.count("unknown command") == 1 and "unknown command /etc/fstab?" in err  # one line: a typo is refused


def test_ctrl_c_as_the_editor_hands_the_line_over_stops_that_reply(llm, monkeypatch, capsys):
    """Ctrl-C just after Enter reached the line editor as a signal while it handed the terminal back: its
    handler failed ("Exception: Application is not running", a traceback on the screen), the Ctrl-C was
    lost and the reply ran to its end (or, with Python's handler, the line typed was dropped as if Ctrl-C
    had come at the prompt). Now the chat's handler takes it: the reply to that line is stopped."""
    spy = ChatSpy(llm)
    monkeypatch.setattr(llm, "chat", spy)
    monkeypatch.setattr(llm.tokenizer, "eos_ids", [])  # the reply would run to max_new_tokens

    def editor(lines):
        it = iter(lines)

        def read(prompt=""):
            line = next(it)
            if line.startswith("*"):  # the signal comes as the line is handed over
                signal.raise_signal(signal.SIGINT)
                line = line[1:]
            return line
        return read

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C (the suite may ignore it)
    try:
        status = repl.chat_loop(llm, None, dict(max_new_tokens=200), input_fn=editor(["*hello", "*/help", "again",
                                                                                      "/exit"]))
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C reached the prompt, not the reply")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status == 0
    err = capsys.readouterr().err
    assert [seen[-1] for seen in spy.seen] == [("user", "hello"), ("user", "again")]
    assert err.count("(stopped)") == 1 and "Ctrl-C again" not in err  # "again" (after /help) ran to its end
    assert "new tokens" in err


def test_ctrl_c_at_a_plain_input_prompt_still_exits(llm, monkeypatch, capsys):
    """In a terminal whose output is redirected (`pyllm run M > file`) the chat reads with input(), where
    Ctrl-C is a signal: it must still be Ctrl-C at the prompt (twice exits), not a stop of a reply."""
    import builtins

    calls = []

    def ctrl_c(prompt=""):
        calls.append(prompt)
        if len(calls) > 3:
            raise EOFError
        signal.raise_signal(signal.SIGINT)
        return "never read"

    monkeypatch.setattr(repl, "line_editor", lambda: None)
    monkeypatch.setattr(builtins, "input", ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert repl.chat_loop(llm, None, dict(max_new_tokens=2)) == 0
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert "Ctrl-C again to exit" in err and "Generation:" not in err and len(calls) == 2


def test_input_that_is_not_utf8_is_refused_with_its_own_position(llm, monkeypatch, capsys):
    """The line editor hands bytes that are not UTF-8 (a terminal in Latin-1, a stray byte) over as lone
    surrogates (surrogateescape). The error came from the tokenizer, with the character position in the
    whole rendered chat prompt (system message and template markers included), nothing the user could
    find in what they typed. Now the message is checked as typed: the byte position is counted in it,
    the chat goes on, and the turn is not kept. The same for /system, and for plain input()'s decode error."""
    spy = ChatSpy(llm)
    monkeypatch.setattr(llm, "chat", spy)
    bad = b"caf\xe9 ok".decode("utf-8", "surrogateescape")
    lines = [bad, "x\\", "ab" + bad, "/system " + bad,
             UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"), "hello",
             b"caf\xc3\xa9".decode("ascii", "surrogateescape"), "/exit"]
    assert repl.chat_loop(llm, "Be brief.", dict(max_new_tokens=2), input_fn=_script(lines)) == 0
    err = capsys.readouterr().err
    assert "your message is not UTF-8 text (byte 3: invalid continuation byte)" in err
    assert "your message is not UTF-8 text (byte 7: invalid continuation byte)" in err  # "x\n" + "ab" before it
    assert "the system message is not UTF-8 text (byte 3: invalid continuation byte)" in err
    assert "the line typed is not UTF-8 text (byte 2: invalid start byte)" in err
    assert "surrogate" not in err and "character" not in err
    assert spy.seen[0] == [("system", "Be brief."), ("user", "hello")]  # nothing bad sent, the system message kept
    assert len(spy.seen) == 2 and spy.seen[1][-1] == ("user", "café")  # UTF-8 bytes escaped one by one: made whole


def test_a_line_that_cannot_be_decoded_inside_a_block_keeps_the_block(llm, monkeypatch, capsys):
    """input()'s decode error (a terminal whose locale decodes strictly) on a line of a \"\"\" block or after
    a trailing backslash left read_message: the lines typed before it were dropped, and the block's
    later lines were sent as messages of their own (its closing \"\"\" opened a new block). Now that line
    alone is refused, with the same error, and the message goes on."""
    spy = ChatSpy(llm)
    monkeypatch.setattr(llm, "chat", spy)
    bad = UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte")
    lines = ['"""', "first", bad, "second", '"""', "one\\", bad, "two", "/exit"]
    assert repl.chat_loop(llm, None, dict(max_new_tokens=2), input_fn=_script(lines)) == 0
    err = capsys.readouterr().err
    assert err.count("the line typed is not UTF-8 text (byte 2: invalid start byte)") == 2, err
    assert [seen[-1] for seen in spy.seen] == [("user", "first\nsecond"), ("user", "one\ntwo")]


@pytest.mark.parametrize("when", ["read with the line", "before the editor leaves raw mode"])
def test_ctrl_c_right_after_enter_stops_the_reply(tiny_llama_f32, tmp_path, when):
    """Ctrl-C pressed just after Enter, while the line editor still held the terminal in raw mode, was
    a key, not a signal: the editor kept it for the next prompt (read in the same read() as the Enter),
    or it waited in the terminal (pressed before the editor gave raw mode up, a window made 0.5 s long
    here). The reply ran on, and the next prompt said "(Ctrl-C again to exit)": one more Ctrl-C, meant
    for the next reply, left the chat. Such a Ctrl-C now stops the reply, as one a moment later does;
    other keys typed then stay for the next prompt."""
    pexpect = pytest.importorskip("pexpect")
    site = tmp_path / "site"
    site.mkdir()
    if when == "before the editor leaves raw mode":
        (site / "sitecustomize.py").write_text(
            "import time\nfrom prompt_toolkit.input import vt100\nexit_ = vt100.raw_mode.__exit__\n"
            "vt100.raw_mode.__exit__ = lambda self, *a: (type(self) is vt100.raw_mode and time.sleep(0.5), "
            "exit_(self, *a))[1]\n")
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(site) + (os.pathsep + path if path else "")
    try:
        child = spawn_chat(tiny_llama_f32, tmp_path / "cache", "-n", "200", "--system", "Be brief.")
    finally:
        os.environ["PYTHONPATH"] = path
    if when == "read with the line":
        child.send("hello\r\x03ab")  # one write: the editor reads all of it at once
    else:
        child.send("hello\r")
        child.expect_exact("\x1b[?2004l")  # the editor is done with the line; raw mode for 0.5 s more
        child.sendintr()
        child.send("ab")
    child.expect_exact("(stopped)", timeout=20)
    assert "Generation:" not in child.before  # stopped before its first word
    child.expect_exact(READY)
    child.send("c\r")  # the next message is "abc": the keys typed after the Ctrl-C were kept
    child.expect(STATS)
    child.expect_exact(READY)
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = (tmp_path / "cache" / "pyllm" / repl.HISTORY_FILE).read_text()
    assert "\n+hello\n" in history and "\n+abc\n" in history


def test_a_block_opens_and_closes_with_text_beside_the_quotes(llm, monkeypatch, capsys):
    """`ollama run`'s own example of a block, \"\"\"Hello, / world!\"\"\", sent "\"\"\"Hello," at once as a message,
    then "world!\"\"\"" as another (the quotes only counted alone on a line). Now three quotes at the start
    of a typed line open a block, at the end of one close it, and \"\"\"text\"\"\" is one line's message; a
    pasted piece of several lines inside a block is taken whole."""
    spy = ChatSpy(llm)
    monkeypatch.setattr(llm, "chat", spy)
    lines = ['"""Hello,', "world!", 'bye"""', '"""one line"""', '"""', "a", '"""', '  """Indented', '"""',
             '"""', 'x = """doc"""\nprint(x)', "end", '"""', "/exit"]
    assert repl.chat_loop(llm, None, dict(max_new_tokens=2), input_fn=_script(lines)) == 0
    assert [seen[-1][1] for seen in spy.seen] == ["Hello,\nworld!\nbye", "one line", "a", "Indented",
                                                  'x = """doc"""\nprint(x)\nend']


def test_output_redirected_to_a_file_holds_only_the_replies(tiny_llama_f32, tmp_path):
    """`pyllm run M > replies.txt` in a terminal (no line editor: stdout is not one) chats with input(), which
    wrote its "> " prompt to stdout: the file held "> " before every reply. Now the prompts go to stderr,
    with the banner and speed lines, and the file holds the replies alone."""
    pexpect = pytest.importorskip("pexpect")
    import shlex

    out = tmp_path / "replies.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(tmp_path), "TERM": "xterm"}
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "pyllm", "run", tiny_llama_f32, "-t", "1",
                                                "--chat-template", "chatml", "-n", "3"])
    child = pexpect.spawn("/bin/sh", ["-c", f"{command} > {shlex.quote(str(out))}"], env=env, encoding="utf-8",
                          timeout=60)
    for message in ("hello", "again"):
        child.expect_exact("> ")  # the prompt, on the terminal
        child.send(message + "\r")
        child.expect(STATS)
    child.expect_exact("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    with pyllm.LLM(tiny_llama_f32, n_threads=1, chat_template="chatml") as llm:
        first = llm.chat([{"role": "user", "content": "hello"}], max_new_tokens=3)
    text = out.read_text()
    assert text.startswith(first + "\n") and text.count("\n") == 2 and ">" not in text, repr(text)


def test_a_conversation_that_outgrows_the_context_leaves_its_oldest_turns_out(tiny_llama_f32, monkeypatch, capsys):
    """Once a conversation outgrew the context every later message was refused ("the prompt has N tokens;
    the context holds M ... /clear starts over"): /clear, which forgot everything, was the only way on.
    As `ollama run` does, the oldest exchanges are now left out (said on stderr), down to half the
    context so the next turns reuse the KV cache; the system message and the new message always stay.
    A message too long on its own is still refused, the conversation kept."""
    with pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=96, chat_template="chatml") as small:
        spy = ChatSpy(small)
        monkeypatch.setattr(small, "chat", spy)
        session = repl.ChatSession(small, "Be brief.", dict(max_new_tokens=8))
        for i in range(12):
            session.say(f"message number {i} about the quick brown fox")
        err = capsys.readouterr().err
        assert "error" not in err and err.count("Generation:") == 12
        assert "oldest messages left out: the conversation outgrew the context of 96 tokens; the system message " \
               "is kept" in err
        assert all(seen[0] == ("system", "Be brief.") for seen in spy.seen)
        assert all(seen[1][0] == "user" for seen in spy.seen)  # whole exchanges left out
        assert spy.seen[-1][-1] == ("user", "message number 11 about the quick brown fox")
        assert len(spy.seen[-1]) < 2 * 12  # some were left out
        for seen in spy.seen:  # each prompt left the reply its room
            assert len(small.chat_prompt_ids([dict(role=r, content=c) for r, c in seen])) + 8 <= 96
        kept = list(session.turns)
        session.say("word " * 200)
        err = capsys.readouterr().err
        assert "error: " in err and "--ctx" in err and "/clear" not in err
        assert session.turns == kept
        # a reply stopped before its first word (Ctrl-C) leaves the conversation whole, the oldest turns too
        session.turns = [{"role": role, "content": f"turn {i} of a long talk"}
                         for i in range(12) for role in ("user", "assistant")]
        kept = list(session.turns)
        assert session.turns_left_out() > 0
        session._stop_requested = True
        session.say("one more")
        assert "(stopped)" in capsys.readouterr().err and session.turns == kept


def test_ollamas_set_and_show_commands(llm, monkeypatch, capsys):
    """ollama's /set parameter NAME VALUE, /set system TEXT, /show and /? were "unknown command": a sampling
    setting could only change by leaving the chat (and its conversation). Now /set parameter changes it for
    the next replies, checked as its flag is (a bad value or name is refused in one line, the setting kept),
    num_ctx says the context is set at load, and /show tells what the next reply is made with."""
    seen = []
    real_chat = llm.__class__.chat
    monkeypatch.setattr(llm, "chat", lambda messages, **kw: seen.append((messages, kw)) or real_chat(llm, messages,
                                                                                                     **kw))
    lines = ["/?", "/set", "/set verbose", "/set parameter", "/set parameter temperature hot",
             "/set parameter temperature -1", "/set parameter top_k 1.5", "/set parameter top_p 0.9",
             "/set parameter mirostat 1",
             "/set parameter num_ctx 8192", "/set parameter num_predict -2", "hi",
             "/set parameter temperature 0.7", "/set parameter top_k -1", "/set parameter num_predict 3",
             "/set parameter repeat_penalty 1.1", "/set parameter seed 4", "/set system Be terse.", "/show", "again",
             "/exit"]
    assert repl.chat_loop(llm, None, dict(max_new_tokens=2, temperature=0.0), input_fn=_script(lines)) == 0
    err = capsys.readouterr().err
    assert "unknown command" not in err and err.count("/set parameter NAME VALUE") == 1  # /? is /help
    assert err.count("/set takes parameter NAME VALUE, or system TEXT") == 2 and "got verbose" in err
    assert "/set parameter takes NAME VALUE" in err
    assert "/set parameter temperature hot: not a number" in err
    assert "/set parameter temperature -1: temperature must be a finite number >= 0" in err
    assert "/set parameter top_k 1.5: not an integer" in err
    assert "unknown parameter mirostat; one of temperature, top_k" in err
    assert "num_ctx: the context (256 tokens) is set when the model loads" in err and "--ctx" in err
    assert "/set parameter num_predict -2: must be >= 0" in err
    # top_k set while decoding was greedy (temperature 0) says it changes nothing; once it samples, no more
    assert "(set top_k to -1; --top-k sets it at the start)\n" in err
    assert "(set top_p to 0.9; --top-p sets it at the start; it changes nothing while decoding is greedy: " \
           "/set parameter temperature 0.7 samples)" in err
    first, second = seen[0][1], seen[1][1]
    assert first["temperature"] == 0.0 and first["max_new_tokens"] == 2  # the refused values changed nothing
    assert (second["temperature"], second["top_k"], second["max_new_tokens"], second["repetition_penalty"]) == \
        (0.7, 0, 3, 1.1) and second["seed"] is not None
    assert seen[1][0][0] == {"role": "system", "content": "Be terse."}
    assert ("sampling: temperature 0.7, top_k 0, top_p 0.9, min_p 0, typical_p 1, repetition_penalty 1.1, "
            "max_new_tokens 3; seeded") in err
    assert "system: Be terse." in err and "conversation: 2 messages" in err


def test_save_and_load_a_conversation(tiny_llama_f32, llm, tmp_path, capsys):
    """There was no way to keep a conversation past the session (/save and /load were "unknown command").
    /save FILE writes it as OpenAI's messages (JSON, the system message first; a temporary file renamed
    over FILE), /load FILE continues one (a /save, or a request body). Every bad file (missing, a
    directory, not UTF-8 or not JSON, too large, a message the chat cannot hold) is one line naming
    it, the conversation kept; one that outgrows a smaller context says so, and the next message
    leaves its oldest turns out."""
    import json

    session = repl.ChatSession(llm, "Be brief.", dict(max_new_tokens=3))
    session.say("hi")
    saved = tmp_path / "chat.json"
    assert session.command("/save " + str(saved)) and session.command("/save\t" + str(saved))  # again: replaced
    assert json.loads(saved.read_text()) == session.messages() and len(session.messages()) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]  # no temporary file left
    kept = session.messages()
    (tmp_path / "link.json").symlink_to(saved)
    saved.write_text("[]")
    assert session.command(f"/save {tmp_path}/link.json")
    assert (tmp_path / "link.json").is_symlink() and json.loads(saved.read_text()) == kept  # written through it
    capsys.readouterr()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "not-json").write_text('[{"role": "user"')
    (tmp_path / "latin1").write_bytes(b"caf\xe9")
    (tmp_path / "tool").write_text('[{"role": "tool", "content": "x"}]')
    (tmp_path / "late-system").write_text('[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]')
    (tmp_path / "object").write_text('{"model": "x"}')
    (tmp_path / "huge").write_bytes(b"[" + b" " * (64 << 20) + b"]")
    (tmp_path / "model.pllm").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b"\x00" * 64)
    (tmp_path / "notes.txt").write_text("my notes")
    for command, message in (
            # a file that is not a saved conversation is not replaced (`/save model.pllm` destroyed a model)
            (f"/save {tmp_path}/model.pllm", f"error: /save: {tmp_path}/model.pllm exists and is not a saved conversation"),
            (f"/save {tmp_path}/notes.txt", f"error: /save: {tmp_path}/notes.txt exists and is not a saved conversation"),
            ("/save", "/save takes a file name"), ("/load", "/load takes a file name"),
            (f"/load {tmp_path}/missing", f"error: /load: {tmp_path}/missing: No such file or directory"),
            (f"/load {tmp_path}", f"error: /load: {tmp_path}: Is a directory"),
            (f"/save {tmp_path}", f"error: /save: {tmp_path}: Is a directory"),
            (f"/save {tmp_path}/no/such/dir.json", f"error: /save: {tmp_path}/no/such/dir.json: No such file"),
            # (it was renamed over: as root, `/save /dev/stdout` replaced the device's link with a file)
            (f"/save {tmp_path}/fifo", f"error: /save: {tmp_path}/fifo: not a regular file"),
            (f"/load {tmp_path}/not-json", f"error: /load: {tmp_path}/not-json: not JSON: "),
            (f"/load {tmp_path}/latin1", f"error: /load: {tmp_path}/latin1 is not UTF-8 text (byte 3"),
            (f"/load {tmp_path}/tool", f"error: /load: {tmp_path}/tool: message 0: the chat holds system, user"),
            (f"/load {tmp_path}/late-system", "message 1: a system message comes first"),
            (f"/load {tmp_path}/object", f"error: /load: {tmp_path}/object: holds no messages"),
            (f"/load {tmp_path}/huge", f"error: /load: {tmp_path}/huge holds more than 67108864 bytes")):
        assert session.command(command)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (command, err)
        assert session.messages() == kept

    assert (tmp_path / "notes.txt").read_text() == "my notes"
    (tmp_path / "body.json").write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                                                 {"role": "assistant", "content": "b"}]}))
    session.command(f"/load {tmp_path}/body.json")  # no system message in it: the one set stays
    assert session.messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b"}]
    assert "(conversation loaded from" in capsys.readouterr().err
    # one that ends with the user's message: /regen writes its reply (it said "nothing to regenerate")
    (tmp_path / "asked.json").write_text(json.dumps([{"role": "user", "content": "a"}]))
    session.command(f"/load {tmp_path}/asked.json")
    assert "the last message is yours: /regen writes its reply" in capsys.readouterr().err
    session.command("/regen")
    assert "Generation:" in capsys.readouterr().err and [t["role"] for t in session.turns] == ["user", "assistant"]

    long = [{"role": "system", "content": "Be terse."}]
    for i in range(20):
        long += [{"role": "user", "content": f"question {i} about foxes"},
                 {"role": "assistant", "content": "an answer"}]
    (tmp_path / "long.json").write_text(json.dumps(long))
    with pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=64) as small:
        session = repl.ChatSession(small, None, dict(max_new_tokens=3))
        session.command(f"/load {tmp_path}/long.json")
        err = capsys.readouterr().err
        assert "40 messages, and its system message" in err and "outgrows the context of 64 tokens (" in err
        session.say("one more")
        err = capsys.readouterr().err
        assert "oldest messages left out" in err and "Generation:" in err
        assert session.system == "Be terse." and session.turns[-2]["content"] == "one more"


def test_the_history_file_is_readable_by_its_owner_alone(tmp_path, monkeypatch):
    """The chat history holds every message typed, and the line editor made it readable by everyone
    (0644 under the usual umask). It is now made 0600, as a shell's history and ollama's are."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(sys, "stdout", open(os.devnull, "w"))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    previous = os.umask(0o022)
    try:
        assert repl.line_editor() is not None
    finally:
        os.umask(previous)
        sys.stdin.close()
        sys.stdout.close()
    assert (tmp_path / "pyllm" / repl.HISTORY_FILE).stat().st_mode & 0o777 == 0o600


def test_a_command_that_takes_nothing_refuses_what_follows_it(llm, monkeypatch, capsys):
    """"/clear the last answer" forgot the whole conversation and "/exit now" left it, the words after the
    name ignored. They are now refused in one line, the conversation kept."""
    spy = ChatSpy(llm)
    monkeypatch.setattr(llm, "chat", spy)
    lines = ["hello", "/clear the last answer", "/regen please", "/exit now", "/bye\tbye", "again", "/exit"]
    assert repl.chat_loop(llm, None, dict(max_new_tokens=2), input_fn=_script(lines)) == 0
    err = capsys.readouterr().err
    assert "/clear takes nothing after it (got 'the last answer'); the conversation is kept" in err
    assert err.count("takes nothing after it") == 4 and err.count("Generation:") == 2
    assert len(spy.seen) == 2 and spy.seen[1][0] == ("user", "hello")  # not cleared, not regenerated


def test_a_conversation_far_past_the_context_goes_on(tiny_llama_f32, capsys):
    """A conversation far longer than the context (a /load of a long one) was rendered whole for every
    message: seconds each, and past the chat template's output limit (8 Mi characters) every message was
    refused ("the chat template's output exceeds ..."), /clear the only way on. The turns that cannot
    fit by their characters alone are now left out unrendered."""
    with pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=64, chat_template="chatml") as small:
        session = repl.ChatSession(small, "Be brief.", dict(max_new_tokens=3))
        session.turns = [{"role": role, "content": f"{role} turn {i} " + "fox " * 1100}
                         for i in range(2000) for role in ("user", "assistant")]
        session.say("one more")
        err = capsys.readouterr().err
        assert "error" not in err and "Generation:" in err, err[-300:]
        assert "oldest messages left out" in err and session.turns[-2]["content"] == "one more"


def test_ctrl_c_during_a_command_stops_it_not_the_chat(llm, monkeypatch, tmp_path, capsys):
    """Ctrl-C while /load read a long file (or /save wrote one) raised KeyboardInterrupt out of the chat:
    it ended, the conversation lost. It now stops that command; the conversation stays as it was."""
    import json

    saved = tmp_path / "chat.json"
    saved.write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]))
    real_loads = json.loads

    def slow_loads(text, *a, **k):
        signal.raise_signal(signal.SIGINT)  # pressed while the file is parsed
        return real_loads(text, *a, **k)

    sessions = []
    real_session = repl.ChatSession
    monkeypatch.setattr(repl, "ChatSession", lambda *a, **k: sessions.append(real_session(*a, **k)) or sessions[-1])
    monkeypatch.setattr(json, "loads", slow_loads)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C (the suite may ignore it)
    try:
        status = repl.chat_loop(llm, None, dict(max_new_tokens=2), input_fn=_script(["hello", f"/load {saved}",
                                                                                      "/exit"]))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during /load ended the chat")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status == 0 and "(stopped)" in capsys.readouterr().err
    assert [t["content"] for t in sessions[-1].turns][0] == "hello"


def test_control_characters_of_a_reply_are_shown_not_obeyed_by_a_terminal(llm, monkeypatch, capsys):
    """A reply was written to the terminal raw: escape sequences in it were obeyed (clear the screen, retitle
    the window, fake a prompt, set the clipboard with OSC 52), so a model, or a prompt injected into what
    it reads, could drive the user's terminal. In a terminal the control characters are now shown as
    their Unicode pictures (ESC as U+241B); the conversation, a file and a pipe keep the reply as
    generated. Both for the chat and for `pyllm run -p`."""
    import io

    from conftest import scripted_reply
    from pyllm import cli

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    evil = "\x1b]52;c;ZXZpbA==\x07\x1b[2J ok\tdone"
    ids = llm.tokenize(evil, add_special_tokens=False) + [llm.tokenizer.eos_ids[0]]
    for out, shown in ((Terminal(), "␛]52;c;ZXZpbA==␇␛[2J ok\tdone\n"), (io.StringIO(), evil + "\n")):
        session = repl.ChatSession(llm, None, dict(max_new_tokens=len(ids), logits_processors=[scripted_reply(ids)]),
                                   out=out)
        session.say("hi")
        assert out.getvalue() == shown and session.turns[-1]["content"] == evil
    capsys.readouterr()
    monkeypatch.setattr(llm.__class__, "chat", lambda self, messages, **kw: llm.generate(
        ids, stream=True, max_new_tokens=len(ids), logits_processors=[scripted_reply(ids)]))
    monkeypatch.setattr(cli, "model_path", lambda args: args.model)
    monkeypatch.setattr(cli, "_open", lambda args, path=None: llm)
    for stdout, shown in ((Terminal(), "␛]52;c;ZXZpbA==␇␛[2J ok\tdone\n"), (io.StringIO(), evil + "\n")):
        monkeypatch.setattr(sys, "stdout", stdout)
        assert cli.main(["run", "unused.pllm", "-p", "hi"]) == 0
        assert stdout.getvalue() == shown


def test_a_block_is_a_message_and_sets_a_system_message_as_ollama_does(llm, monkeypatch, capsys):
    """A \"\"\" block of one line that starts with "/" ("/etc/fstab?") was refused as an unknown command,
    though /help's own hint sends such a message as a \"\"\" block. A block is now always a message. And
    ollama's way to a system message of several lines, /set system \"\"\" ... \"\"\", set it to the line
    of quotes and sent the rest as messages; after /system or /set system a block is now its text."""
    spy = ChatSpy(llm)
    monkeypatch.setattr(llm, "chat", spy)
    lines = ['"""', "/etc/fstab?", '"""', '"""/x"""', '/set system """You are', 'a pirate."""', "hi",
             '/system """Be terse."""', "again", '/system """', "Be", "kind.", EOFError()]
    assert repl.chat_loop(llm, None, dict(max_new_tokens=2), input_fn=_script(lines)) == 0
    assert "unknown command" not in capsys.readouterr().err
    assert [seen[-1] for seen in spy.seen] == [("user", "/etc/fstab?"), ("user", "/x"), ("user", "hi"),
                                               ("user", "again")]
    assert spy.seen[2][0] == ("system", "You are\na pirate.") and spy.seen[3][0] == ("system", "Be terse.")
    sessions = []
    real_session = repl.ChatSession
    monkeypatch.setattr(repl, "ChatSession", lambda *a, **k: sessions.append(real_session(*a, **k)) or sessions[-1])
    assert repl.chat_loop(llm, None, {}, input_fn=_script(['/system """', "Be", "kind.", EOFError()])) == 0
    assert sessions[-1].system == "Be\nkind."  # end of input inside the block: the command still runs


def test_a_long_system_message_still_leaves_room_for_the_latest_turns(tiny_llama_f32, monkeypatch, capsys):
    """With a system message of more than half the context, leaving out turns "down to half the context"
    could not be met, and every turn but the new message was left out each time the conversation
    outgrew the context. Then as many of the latest turns stay as leave the reply its room."""
    with pyllm.LLM(tiny_llama_f32, n_threads=1, context_length=128, chat_template="chatml") as small:
        spy = ChatSpy(small)
        monkeypatch.setattr(small, "chat", spy)
        system = "word " * 32
        assert 64 < len(small.chat_prompt_ids([{"role": "system", "content": system}])) < 100
        session = repl.ChatSession(small, system, dict(max_new_tokens=4))
        for i in range(8):
            session.say(f"note {i}")
        assert "oldest messages left out" in capsys.readouterr().err
        assert all(len(seen) > 2 for seen in spy.seen[1:])  # earlier turns stayed with each new message
        for seen in spy.seen:
            assert len(small.chat_prompt_ids([dict(role=r, content=c) for r, c in seen])) + 4 <= 128


def _store_history(path, tag):
    from prompt_toolkit.history import FileHistory

    history = repl.chat_history(FileHistory)(path)
    for i in range(100):
        history.store_string(f"{tag}{i} " + tag * 30000 + "\nsecond line " + tag)


def test_two_chats_saving_their_history_at_once_keep_each_message_whole(tmp_path):
    """The line editor's history wrote a message 8 KiB at a time: two chats saving long messages at once
    (two terminals) interleaved the pieces, and the file held messages merged and garbled (this test with
    prompt_toolkit's FileHistory: 34-38 of the 300 messages wrong, in each of three runs). Each message is
    now appended in one write."""
    import multiprocessing

    from prompt_toolkit.history import FileHistory

    path = str(tmp_path / "chat_history")
    workers = [multiprocessing.get_context("fork").Process(target=_store_history, args=(path, tag)) for tag in "abc"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    expected = {f"{tag}{i} " + tag * 30000 + "\nsecond line " + tag for tag in "abc" for i in range(100)}
    assert set(FileHistory(path).load_history_strings()) == expected
    assert os.stat(path).st_mode & 0o777 == 0o600
