"""The interactive chat of `pyllm run` (no -p): a conversation kept as OpenAI-style messages.

Commands: /help, /exit (or Ctrl-D), /clear, /regen, /system [TEXT]. A line ending in a backslash
continues on the next line; a line of three double quotes (\"\"\") starts and ends a block of lines.
Ctrl-C stops the reply being written; Ctrl-C twice at the prompt exits. Each reply ends with its
speed on stderr. The KV cache of the conversation so far is reused, so a turn only runs its new
tokens.
"""

from __future__ import annotations

import signal
import sys
import threading

from .chat_template import TemplateError

HELP = """commands:
  /help            this text
  /exit            leave (also Ctrl-D, or Ctrl-C twice at the prompt)
  /clear           forget the conversation (the system message stays)
  /regen           write the last reply again
  /system [TEXT]   show, or set, the system message
input:
  end a line with \\ to continue on the next line, or put \"\"\" alone on a line to start and end a block
  Ctrl-C stops the reply being written"""


class ChatSession:
    """The conversation and the commands that edit it."""

    def __init__(self, llm, system: str | None, sampling: dict, out=None, err=None):
        self.llm = llm
        self.system = system
        self.sampling = sampling
        self.turns: list[dict] = []  # user and assistant messages, without the system message
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def command(self, line: str) -> bool:
        """Runs a /command; False when the session should end."""
        name, _, arg = line.strip().partition(" ")
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            print(HELP, file=self.err)
        elif name == "/clear":
            self.turns = []
            print("(conversation cleared)", file=self.err)
        elif name == "/system":
            if arg.strip():
                self.system = arg.strip()
                print("(system message set)", file=self.err)
            else:
                print(f"system: {self.system or '(none)'}", file=self.err)
        elif name == "/regen":
            if self.turns and self.turns[-1]["role"] == "assistant":
                self.turns.pop()
                self.reply()
            else:
                print("(nothing to regenerate)", file=self.err)
        else:
            print(f"unknown command {name}; /help lists them", file=self.err)
        return True

    def say(self, text: str) -> None:
        self.turns.append({"role": "user", "content": text})
        self.reply()

    def reply(self) -> None:
        """Streams the model's reply to the last user message; Ctrl-C stops it (the part written is kept)."""
        try:
            stream = self.llm.chat(self.messages(), stream=True, **self.sampling)
        except (ValueError, TemplateError) as e:  # the conversation no longer fits, or the template refused it
            self.turns.pop()
            print(f"error: {e}" + ("; /clear starts over" if "context" in str(e) else ""), file=self.err)
            return
        pieces = []
        restore = _on_interrupt(stream.cancel)
        try:
            for piece in stream:
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        finally:
            restore()
        self.out.write("\n")
        self.turns.append({"role": "assistant", "content": "".join(pieces)})
        note = " (stopped)" if stream.stats.finish_reason == "cancelled" else ""
        print(stream.stats.line() + note, file=self.err)


def _on_interrupt(handler):
    """Makes Ctrl-C call handler() instead of raising, until the returned function is called."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGINT, lambda signum, frame: handler())
    return lambda: signal.signal(signal.SIGINT, previous)


def read_message(input_fn=input) -> str | None:
    """One user message (continuation lines and triple-quoted blocks joined); None at end of input."""
    line = input_fn("> ")
    if line.strip() == '"""':
        lines = []
        while (line := input_fn(". ")).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input_fn(". ")
    return "\n".join(lines + [line])


def chat_loop(llm, system: str | None, sampling: dict, input_fn=input) -> int:
    if not llm.chat_template:
        print("this model has no chat template: pick one with --chat-template (chatml, llama2, alpaca, "
              "alpaca-stanford, or a Jinja file), or use -p --raw for plain completion", file=sys.stderr)
        return 2
    session = ChatSession(llm, system, sampling)
    print("chat with the model; /help lists the commands, /exit or Ctrl-D ends", file=sys.stderr)
    interrupted = False
    while True:
        try:
            text = read_message(input_fn)
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            if interrupted:
                print(file=sys.stderr)
                return 0
            interrupted = True
            print("\n(Ctrl-C again to exit)", file=sys.stderr)
            continue
        interrupted = False
        if not text.strip():
            continue
        if text.startswith("/"):
            if not session.command(text):
                return 0
            continue
        session.say(text)
