"""The interactive chat of `pyllm run` (no -p): a conversation kept as OpenAI-style messages.

In a terminal the line is read with prompt_toolkit: editing keys, history (Up/Down, kept in the
cache directory, HISTORY_FILE), a bracketed paste of several lines is one message, and lines of any
length arrive whole (the terminal's own line discipline would cut them at 4095 bytes). Elsewhere
(piped input, tests) plain input() is used.

Commands: /help, /exit (or Ctrl-D), /clear, /regen, /system [TEXT], /save and /load FILE, and ollama's
/set and /show. A line ending in a backslash continues on the next line; three double quotes (\"\"\")
start a block of lines and end it, as in `ollama run` (at the start of the first line, and at the end
of the last).
Ctrl-C stops the reply being written; Ctrl-C twice at the prompt exits. Each reply ends with its
speed on stderr, and with a marker when the token limit or the context cut it. With a seed, the
session draws one seed per reply from it: /regen gives another reply, and the same session replays
the same replies. The KV cache of the conversation so far is reused, so a turn only runs its new
tokens. A conversation that outgrows the context leaves its oldest exchanges out, as `ollama run` does
(said on stderr; the system message stays: ChatSession.turns_left_out). In a terminal a reply's control
characters are shown, not obeyed (for_terminal).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading

import numpy as np

from .chat_template import TemplateError, builtin_template_names, default_system_message
from .errors import PyllmError, decode_text
from .tokenizer import check_text

HISTORY_FILE = "chat_history"  # in the cache directory (pyllm/model_cache.py)

# /set parameter NAME VALUE: ollama's names (its Modelfile's PARAMETER), and transformers' where they differ,
# -> the sampling option (generate()'s keyword) and the CLI flag that sets it at the start
PARAMETERS = {"temperature": ("temperature", "--temperature"), "top_k": ("top_k", "--top-k"),
              "top_p": ("top_p", "--top-p"), "min_p": ("min_p", "--min-p"), "typical_p": ("typical_p", "--typical"),
              "repeat_penalty": ("repetition_penalty", "--repeat-penalty"),
              "repetition_penalty": ("repetition_penalty", "--repeat-penalty"), "seed": ("seed", "--seed"),
              "num_predict": ("max_new_tokens", "-n"), "max_new_tokens": ("max_new_tokens", "-n")}
PARAMETER_NAMES = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "seed", "num_predict")

HELP = """commands:
  /help, /?        this text
  /exit, /bye      leave (also Ctrl-D, or Ctrl-C twice at the prompt)
  /clear           forget the conversation (the system message stays)
  /regen           write the last reply again (or the reply a /load's last message has not had)
  /system [TEXT]   show, or set, the system message (also /set system TEXT; several lines: /system \"\"\")
  /set parameter NAME VALUE
                   change a sampling setting for the next replies; NAME is one of
                   """ + ", ".join(PARAMETER_NAMES) + """
  /show            the model, its context, the sampling settings and the system message
  /save FILE       write the conversation to FILE (JSON: OpenAI's messages, the system message first;
                   an existing FILE only if it holds JSON, an earlier /save)
  /load FILE       continue the conversation in FILE (a /save, or a request body's messages) instead
input:
  Up/Down recall earlier messages (kept across sessions); a pasted block of lines is one message
  end a line with \\ to continue on the next line, or start a block with \"\"\" and end it with \"\"\"
  Ctrl-C stops the reply being written"""


class ChatSession:
    """The conversation and the commands that edit it."""

    def __init__(self, llm, system: str | None, sampling: dict, out=None, err=None):
        self.llm = llm
        self.system = system
        self.sampling = dict(sampling)
        seed = self.sampling.pop("seed", None)
        # one seed per session: each reply draws its own from it (so /regen differs, sessions repeat);
        # as generate() takes it: -1 is unseeded (llama.cpp's --seed -1), another negative one mod 2**64
        # (numpy's generators refuse negative seeds: `pyllm run --seed -1` ended with a ValueError)
        self.seeds = np.random.default_rng(seed % (1 << 64)) if seed not in (None, -1) else None
        self.turns: list[dict] = []  # user and assistant messages, without the system message
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._stream = None  # the reply being written
        self._stop_requested = False  # Ctrl-C since the message was sent (before the stream, or during it)
        self._longest_token = None  # bytes of the vocabulary's longest token (first_turn_that_may_fit)

    def context_room(self) -> int:
        """Tokens the conversation's prompt and reply may take: the context less the virtual tokens of the
        LLM's prompt-learning adapter (`pyllm run --adapter NAME`), which come before the prompt."""
        adapter = self.llm.adapters.get(self.llm.adapter) if self.llm.adapter else None
        return self.llm.context_length - (adapter.virtual_tokens if adapter is not None else 0)

    def messages(self, first_turn: int = 0) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns[first_turn:]

    def turns_left_out(self) -> int:
        """How many of the oldest turns the next prompt leaves out: none while the conversation leaves a
        reply its room (max_new_tokens, at most a quarter of the context); past that, whole exchanges from
        the oldest until the rest takes at most half the context (so the next turns reuse the KV cache
        again, as llama.cpp's context shift discards half), never the system message or the last user
        message. `ollama run` also leaves the oldest messages out; this chat refused every later message
        ("the context holds N"), and /clear, which forgot everything, was the only way on."""
        n_ctx = self.context_room()  # (the full context: messages within an adapter's virtual tokens of it were
        room = n_ctx // 4  # refused, "even without the earlier turns", where leaving those out made room)
        limit = self.sampling.get("max_new_tokens")
        if limit is not None and limit >= 0:
            room = min(room, limit)

        def length(first_turn: int) -> int:
            return len(self.llm.chat_prompt_ids(self.messages(first_turn)))

        first_possible = self.first_turn_that_may_fit()
        try:
            if first_possible == 0 and length(0) + room <= n_ctx:
                return 0
            starts = [i for i, turn in enumerate(self.turns) if turn["role"] == "user" and i > 0]
            starts = [i for i in starts if i >= first_possible] or starts[-1:]

            def first_start(fits) -> int:  # bisect: the first start whose rest fits (the rest get shorter)
                low, high = 0, len(starts)
                while low < high:
                    middle = (low + high) // 2
                    if fits(length(starts[middle])):
                        high = middle
                    else:
                        low = middle + 1
                return low

            found = first_start(lambda n: n <= n_ctx // 2)
            if found == len(starts):  # (a system message of half the context: as much as leaves the room)
                found = first_start(lambda n: n + room <= n_ctx)
        except (ValueError, TemplateError):  # refused as it is: the chat call says why
            return 0
        return starts[found] if found < len(starts) else (starts[-1] if starts else 0)

    def first_turn_that_may_fit(self) -> int:
        """The first turn of the newest ones whose characters alone may fit the context (each token stands
        for at most the longest token's bytes): 0 unless the conversation is far past the context (a /load
        of a long one), where the older turns are left out unrendered. Rendered whole, such a conversation
        took seconds per message, or passed the chat template's output limit: every message was refused."""
        n_ctx, sizes = self.context_room(), [len(turn["content"]) for turn in self.turns]
        if sum(sizes) <= 64 * n_ctx:  # (rendered in milliseconds)
            return 0
        if self._longest_token is None:
            tokenizer = self.llm.tokenizer
            self._longest_token = max(len(tokenizer.token_bytes(i)) for i in range(self.llm.config.vocab_size))
        bound, suffix = n_ctx * max(1, self._longest_token), 0
        for i in range(len(sizes) - 1, -1, -1):
            suffix += sizes[i]
            if suffix > bound:
                return i + 1
        return 0

    def command(self, line: str) -> bool:
        """Runs a /command; False when the session should end."""
        name, arg = (line.strip().split(None, 1) + [""])[:2]  # (a tab after the name too)
        if name in ("/exit", "/quit", "/bye", "/clear", "/regen") and arg:
            # "/clear the last answer" forgot the whole conversation, "/exit now" left it: refused, kept
            print(f"{name} takes nothing after it (got {arg!r:.40}); the conversation is kept", file=self.err)
            return True
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/set":  # ollama's: /set system TEXT, /set parameter NAME VALUE
            what, _, rest = arg.strip().partition(" ")
            if what == "system":
                name, arg = "/system", rest
            elif what == "parameter":
                self.set_parameter(rest)
                return True
            else:
                print("/set takes parameter NAME VALUE, or system TEXT" + (f"; got {what}" if what else ""),
                      file=self.err)
                return True
        if name in ("/help", "/?"):
            print(HELP, file=self.err)
        elif name == "/show":
            print(self.show(), file=self.err)
        elif name in ("/save", "/load"):
            path = os.path.expanduser(arg.strip())
            if not path:
                print(f"{name} takes a file name: {name} FILE", file=self.err)
                return True
            try:
                self.save(path) if name == "/save" else self.load(path)
            except (OSError, ValueError) as e:  # (PyllmError, TemplateError, json's errors are ValueErrors)
                from .cli import _message

                print(f"error: {name}: {_message(e)}", file=self.err)
        elif name == "/clear":
            self.turns = []
            print("(conversation cleared)", file=self.err)
        elif name == "/system":
            if arg.strip():
                try:
                    self.system = as_typed(arg.strip(), "the system message")
                except PyllmError as e:  # the one set stays (a bad one would refuse every later message)
                    print(f"error: {e}", file=self.err)
                    return True
                print("(system message set)", file=self.err)
            elif self.system:
                print(f"system: {self.system}", file=self.err)
            else:
                default = self.template_default_system()
                print(f"system: (the chat template's default) {default}" if default else "system: (none)",
                      file=self.err)
        elif name == "/regen":
            if self.turns and self.turns[-1]["role"] == "assistant":
                last = self.turns.pop()
                if not self.reply():  # refused (a longer /system no longer fits): the turn stays as it was
                    self.turns.append(last)
            elif self.turns:  # a /load that ends with the user's message: its reply is written
                self.reply()
            else:
                print("(nothing to regenerate)", file=self.err)
        else:
            print(f"unknown command {name}; /help lists them (a message that starts with / is sent when "
                  "it begins with a space, or as a \"\"\" block)", file=self.err)
        return True

    def set_parameter(self, text: str) -> None:
        """/set parameter NAME VALUE: checked as the CLI flag that sets it is (a bad value is refused in one
        line, the setting kept); the next replies use it."""
        from .sampling import SamplingParams

        words = text.split()
        if len(words) != 2:
            print(f"/set parameter takes NAME VALUE (such as /set parameter temperature 0.7); NAME is one of "
                  f"{', '.join(PARAMETER_NAMES)}", file=self.err)
            return
        name, value = words
        if name == "num_ctx":  # (ollama reloads the model for it)
            print(f"num_ctx: the context ({self.llm.context_length} tokens) is set when the model loads: start "
                  "again with -c / --ctx", file=self.err)
            return
        if name not in PARAMETERS:
            print(f"unknown parameter {name}; one of {', '.join(PARAMETER_NAMES)}", file=self.err)
            return
        option, flag = PARAMETERS[name]
        integer = option in ("top_k", "seed", "max_new_tokens")
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            print(f"/set parameter {name} {value}: not {'an integer' if integer else 'a number'}", file=self.err)
            return
        try:
            if option == "max_new_tokens":
                if number < -1:
                    raise ValueError("must be >= 0, or -1 (until the context is full)")
            elif option == "seed":
                number = None if number == -1 else number % (1 << 64)  # as --seed takes it
            else:
                number = 0 if option == "top_k" and number == -1 else number  # -1 is off, as 0
                SamplingParams(**{option: number}).validate()
        except ValueError as e:
            print(f"/set parameter {name} {value}: {e}", file=self.err)
            return
        if option == "seed":  # the session's draws start again from it
            self.seeds = np.random.default_rng(number) if number is not None else None
        else:
            self.sampling[option] = self.llm.context_length if option == "max_new_tokens" and number == -1 else number
        greedy = option in ("top_k", "top_p", "min_p", "typical_p", "seed") and self.llm._sampling(
            self.sampling.get("temperature"), None, None, None, None, None).temperature == 0
        # (as `pyllm run`'s note for such flags: nothing changed, and nothing said why)
        note = "; it changes nothing while decoding is greedy: /set parameter temperature 0.7 samples" if greedy else ""
        print(f"(set {name} to {value}; {flag} sets it at the start{note})", file=self.err)

    def save(self, path: str) -> None:
        """/save: the messages as JSON, written whole or not at all (a temporary file renamed over it: a
        full disk or a Ctrl-C leaves an earlier save as it was)."""
        import json

        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        # through a link to the file it names; never renamed over a device, FIFO or socket (/dev/stdout)
        target = os.path.realpath(path)
        if os.path.exists(target) and not os.path.isfile(target):
            raise ValueError(f"{path}: not a regular file (the conversation is saved in a file of its own)")
        if os.path.isfile(target) and not _holds_json(target):  # (a model file or notes were replaced)
            raise ValueError(f"{path} exists and is not a saved conversation (JSON): give another name, or remove it "
                             "first")
        tmp = f"{target}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # (the umask applies, as to any file)
        except OSError as e:  # named by the file asked for, not the temporary one
            raise OSError(e.errno, e.strerror, path) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.messages(), f, ensure_ascii=False, indent=1)
                f.write("\n")
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        print(f"(conversation saved to {path}: {len(self.messages())} messages)", file=self.err)

    def load(self, path: str) -> None:
        """/load: a /save's messages (or a request body holding "messages") replace the conversation, checked
        whole before anything changes: the file's system message replaces the one set, when it has one."""
        import json

        from .chat_template import normalize_messages
        from .errors import read_text
        from .limits import MAX_STDIN_BYTES

        text = read_text(path, limit=MAX_STDIN_BYTES)  # (errors name the file)
        try:
            data = json.loads(text)
            if isinstance(data, dict) and "messages" in data:
                data = data["messages"]
            if not isinstance(data, list):
                raise ValueError("holds no messages: give a /save file, a JSON list of {\"role\": ..., "
                                 "\"content\": ...}")
            messages = normalize_messages(data) if data else []
            system = None
            for n, m in enumerate(messages):
                if m["role"] not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                    raise ValueError(f"message {n}: the chat holds system, user and assistant messages of text "
                                     f"(got role {m['role']!r:.40})")
                if m["role"] == "system":
                    if n:
                        raise ValueError(f"message {n}: a system message comes first")
                    system = m["content"]
        except ValueError as e:  # (json's errors, TemplateError and PyllmError are ValueErrors)
            raise ValueError(f"{path}: {'not JSON: ' if isinstance(e, json.JSONDecodeError) else ''}{e}") from None
        turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        if system is not None:
            self.system = system
        self.turns = turns
        note, n_ctx = "", self.context_room()
        with contextlib.suppress(ValueError):
            far = sum(len(turn["content"]) for turn in turns) > 64 * n_ctx  # (not rendered: seconds, or refused)
            length = 0 if far or not self.messages() else len(self.llm.chat_prompt_ids(self.messages()))
            if far or length >= n_ctx:
                note = (f"; it outgrows the context of {n_ctx} tokens{f' ({length} tokens)' if length else ''}: "
                        "the next message leaves the oldest out")
        if turns and turns[-1]["role"] == "user":  # (a next message would follow it: two of the user's in a row)
            note += "; the last message is yours: /regen writes its reply"
        print(f"(conversation loaded from {path}: {len(turns)} messages"
              f"{', and its system message' if system is not None else ''}{note})", file=self.err)

    def show(self) -> str:
        """/show: what the next reply is made with."""
        from .llm import DEFAULT_MAX_NEW_TOKENS

        llm, given = self.llm, self.sampling
        # as the next reply takes them: the ones given, else the model's (its generation config), else off
        params = llm._sampling(given.get("temperature"), given.get("top_k"), given.get("top_p"), given.get("min_p"),
                               given.get("repetition_penalty"), None, given.get("typical_p"))
        limit = given.get("max_new_tokens")
        limit = int(llm.model.generation.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)) if limit is None else limit
        settings = ", ".join(f"{name} {getattr(params, name):g}" for name in (
            "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty")) + f", max_new_tokens {limit}"
        system = self.system or (f"(the chat template's default) {self.template_default_system()}"
                                 if self.template_default_system() else "(none)")
        return (f"{banner(llm).splitlines()[0]}\nsampling: {settings}{'; seeded' if self.seeds is not None else ''}"
                f"\nsystem: {system}\nconversation: {len(self.turns)} messages")

    def template_default_system(self) -> str | None:
        spec = self.llm.tokenizer.spec
        return default_system_message(self.llm.chat_template, bos_token=spec.bos_token or "",
                                      eos_token=spec.eos_token or "")

    def say(self, text: str) -> None:
        try:
            text = as_typed(text, "your message")
        except PyllmError as e:
            print(f"error: {e}", file=self.err)
            return
        self.turns.append({"role": "user", "content": text})
        if not self.reply():
            self.turns.pop()

    def reply(self) -> bool:
        """Streams the model's reply to the last user message; Ctrl-C stops it (the part written is kept).
        False (the error said, the conversation unchanged) when the conversation no longer fits or the
        template refuses it."""
        sampling = dict(self.sampling)
        if self.seeds is not None:
            sampling["seed"] = int(self.seeds.integers(1 << 62))
        pieces = []
        # from before the chat call: a Ctrl-C while the prompt is rendered or read (seconds for a long
        # conversation) stops this reply, as one during the reply does; it ended the whole chat before
        restore = _on_interrupt(self.stop)
        try:
            left_out = self.turns_left_out()
            try:
                stream = self.llm.chat(self.messages(left_out), stream=True, **sampling)
            except (ValueError, TemplateError) as e:  # the message does not fit, or the template refused it
                advice = too_long_advice(self.llm, "the message (or the system message)")
                print(f"error: {e}" + (f"; even without the earlier turns: {advice}" if "context" in str(e) else ""),
                      file=self.err)
                return False
            if left_out:
                print(f"(the {left_out} oldest messages left out: the conversation outgrew the context of "
                      f"{self.llm.context_length} tokens{'; the system message is kept' if self.system else ''})",
                      file=self.err)
            self._stream = stream
            if self._stop_requested:
                stream.cancel()
            for piece in stream:
                pieces.append(piece)
                self.out.write(for_terminal(piece, self.out))  # (the turn keeps the reply as generated)
                self.out.flush()
        finally:
            restore()
            self._stream, self._stop_requested = None, False
        if not pieces and stream.stats.finish_reason == "cancelled":  # stopped before a word: no turn
            print("(stopped)", file=self.err)
            return False
        self.out.write("\n")
        del self.turns[:left_out]  # (only with a reply: one stopped before a word leaves the conversation whole)
        self.turns.append({"role": "assistant", "content": "".join(pieces)})
        cut = cut_notice(stream.stats, self.llm.context_length)
        if cut:
            print(cut + ("; the next message leaves the oldest ones out" if not stream.stats.hit_token_limit
                         else "") + "]", file=self.err)
        note = " (stopped)" if stream.stats.finish_reason == "cancelled" else ""
        print(stream.stats.line() + note, file=self.err)
        return True

    def stop(self) -> None:
        """Ctrl-C: stops the reply being written, or the one about to be."""
        self._stop_requested = True
        if self._stream is not None:
            self._stream.cancel()


def _holds_json(path: str) -> bool:
    """Whether the file is empty or starts as JSON text does ("[" or "{"): an earlier /save, which
    /save may replace; anything else (a model, notes) it must not."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError:
        return False
    return not head or head[:1] in (b"[", b"{")


COMMANDS = ("/help", "/?", "/exit", "/quit", "/bye", "/clear", "/regen", "/system", "/set", "/show", "/save",
            "/load")


class Block(str):
    """The text of a \"\"\" block: a message, even when it starts with "/" (as /help's "unknown command" says)."""


def is_command(text: str) -> bool:
    """A /command: a line that starts with "/" (an unknown one is refused, as a typo), or several lines
    that start with a known command (/system over several lines). Other text of several lines (a pasted
    block, continued lines) is a message, even when it starts with a path, and so is a \"\"\" block (a
    Block) of any length: a one-line block "/etc/fstab?" was refused as an unknown command."""
    if isinstance(text, Block) or not text.startswith("/"):
        return False
    return "\n" not in text or text.split(None, 1)[0] in COMMANDS


def as_typed(text: str, what: str) -> str:
    """text as Unicode text; PyllmError counting the position in bytes of what was typed otherwise.

    The line editor (and input() in a C locale) hands bytes that are not UTF-8 (a terminal set to
    Latin-1, a stray byte) over as lone surrogates (surrogateescape): they are turned back into the
    bytes typed, which are decoded again (whole UTF-8 sequences the editor escaped become their
    characters). A surrogate no byte gave (U+D800..U+DC7F) is refused with its character position."""
    if text.isascii():
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return check_text(text, what)
    return decode_text(raw, what)


# Control characters of a reply as a terminal shows them: C0 (but tab, newline, carriage return) as their
# Unicode control pictures (ESC as U+241B), DEL as U+2421, C1 as \x9b-style text. Written raw, a reply held
# escape sequences the terminal obeyed: a model (or a prompt injected into what it reads) could clear the
# screen, retitle the window, fake the prompt or set the clipboard (OSC 52).
_TERMINAL_SAFE = {**{c: 0x2400 + c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)}, 0x7F: 0x2421,
                  **{c: f"\\x{c:02x}" for c in range(0x80, 0xA0)}}


def for_terminal(text: str, stream) -> str:
    """text as written to stream: its control characters made visible when stream is a terminal, unchanged
    for a file or a pipe (the reply as generated)."""
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError, OSError):
        terminal = False
    return text.translate(_TERMINAL_SAFE) if terminal else text


def too_long_advice(llm, what: str) -> str:
    """What to do about a prompt longer than the context: a larger -c / --ctx while the model takes one."""
    trained = llm.config.max_position_embeddings
    return f"shorten {what}" + (f", or give a larger -c / --ctx (the model was trained on {trained} tokens)"
                                if llm.context_length < trained else "")


def cut_notice(stats, context_length: int) -> str | None:
    """The marker for a reply cut short by the token limit or a full context (without its closing
    bracket), or None when it ended by itself or was stopped."""
    if stats.finish_reason != "length":
        return None
    if stats.hit_token_limit:
        return f"[reply cut at the limit of {stats.max_new_tokens} new tokens: -n / --max-new-tokens raises it"
    return f"[reply cut: the context of {context_length} tokens is full"


def _on_interrupt(handler):
    """Makes Ctrl-C call handler() instead of raising, until the returned function is called."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGINT, lambda signum, frame: handler())
    return lambda: signal.signal(signal.SIGINT, previous)


class EndOfInput(EOFError):
    """End of input (Ctrl-D) inside a message: `text` is what was typed of it (sent before the chat ends)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def undecodable_line(e: UnicodeDecodeError) -> str:
    """The error said for a line input() could not decode (a terminal whose locale decodes strictly)."""
    return f"error: the line typed is not UTF-8 text (byte {e.start}: {e.reason})"


def _next_line(input_fn) -> str:
    """The next line of a message begun: one that cannot be decoded is refused (said on stderr) and
    the next asked for, so the lines typed before it stay in the message (the error used to leave
    read_message, dropping them, and the block's later lines became messages of their own)."""
    while True:
        try:
            return input_fn(". ")
        except UnicodeDecodeError as e:
            print(undecodable_line(e) + "; the message goes on without it", file=sys.stderr)


def read_message(input_fn=input) -> str:
    """One user message (continuation lines and triple-quoted blocks joined). EOFError at end of input
    before a message; EndOfInput, carrying the lines typed so far, at end of input inside a block or
    after a trailing backslash (that message is not lost). A line of a block or after a backslash that
    cannot be decoded is refused on its own (_next_line).

    Blocks as ollama takes them: a typed line that starts with \"\"\" opens one (the text after the
    quotes is its first line), a typed line that ends with \"\"\" closes it (the text before them is its
    last), and \"\"\"text\"\"\" is one line's message. A pasted piece of several lines is taken as it is.
    A block is a message (a Block), even when it starts with "/"; after `/system ` or `/set system ` it
    is that command's text (ollama's `/set system \"\"\"`)."""
    line = input_fn("> ")
    lines, head, in_block = [], "", False
    if "\n" not in line:
        stripped = line.lstrip()
        for prefix in ("/system ", "/set system "):
            if stripped.startswith(prefix) and stripped[len(prefix):].lstrip().startswith('"""'):
                head, line = prefix, stripped[len(prefix):].lstrip()  # (the quotes were the system message's)
                break

    def block(text: str) -> str:
        return head + text if head else Block(text)

    try:
        if "\n" not in line and line.lstrip().startswith('"""'):
            in_block, first = True, line.lstrip()[3:]
            if len(first.rstrip()) >= 3 and first.rstrip().endswith('"""'):  # \"\"\"text\"\"\" on one line
                return block(first.rstrip()[:-3])
            if first.strip():  # `\"\"\"Hello,` was sent at once as a message, the block's later lines each another
                lines.append(first)
            while True:
                line = _next_line(input_fn)
                if "\n" not in line and line.rstrip().endswith('"""'):
                    last = line.rstrip()[:-3]
                    if last.strip():  # `world!\"\"\"` closes the block with its last line
                        lines.append(last)
                    return block("\n".join(lines))
                lines.append(line)
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = _next_line(input_fn)
    except EOFError:
        raise EndOfInput(block("\n".join(lines)) if in_block else "\n".join(lines)) from None
    return "\n".join(lines + [line])


@contextlib.contextmanager
def keys_kept_for_the_editor(fd: int):
    """The terminal on `fd` out of line mode (and without echo) while the line editor does not hold it
    (a reply being written), Ctrl-C still a signal. In line mode a Ctrl-D pressed then is taken by the
    terminal itself as the end of an empty line, which nobody reads: it was lost. Out of it the keys
    wait as bytes, and the line editor reads them when it takes the terminal again (Ctrl-D on an empty
    line ends the chat; typed text is kept)."""
    try:
        import termios
    except ImportError:  # not on Windows
        termios = None
    try:
        saved = termios.tcgetattr(fd) if termios else None
    except (termios.error, OSError, ValueError):  # not a terminal after all
        saved = None
    if saved is None:
        yield
        return
    mode = [*saved[:6], list(saved[6])]
    mode[3] &= ~(termios.ICANON | termios.ECHO)
    mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
    termios.tcsetattr(fd, termios.TCSANOW, mode)  # TCSANOW: keys already pressed are kept, not flushed
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def chat_history(FileHistory):
    """The line editor's history class: prompt_toolkit's FileHistory that says once, on stderr, when the
    file cannot be read or written, then keeps this session's messages in memory; and that appends each
    message in one write (the editor's own wrote 8 KiB at a time: two chats saving at once, in two
    terminals, interleaved the pieces, merging and garbling both messages)."""
    import datetime

    class History(FileHistory):
        failed = False

        def fail(self, error: OSError) -> None:
            if not self.failed:
                self.failed = True
                print(f"(chat history not saved: {error})", file=sys.stderr)

        def load_history_strings(self):
            try:
                return list(super().load_history_strings())
            except OSError as e:
                self.fail(e)
                return []

        def store_string(self, string: str) -> None:
            if self.failed:
                return
            # FileHistory's format: a "# time" line, then each line of the message after a "+"
            entry = f"\n# {datetime.datetime.now()}\n" + "".join(f"+{line}\n" for line in string.split("\n"))
            data = entry.encode("utf-8", errors="replace")
            try:
                fd = os.open(self.filename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    while data:  # (one write() unless interrupted: O_APPEND puts it whole at the end)
                        data = data[os.write(fd, data):]
                finally:
                    os.close(fd)
            except OSError as e:
                self.fail(e)

    return History


def line_editor():
    """input()'s replacement in a terminal: a prompt_toolkit session with its history in the cache
    directory. None when stdin or stdout is not a terminal. A history that cannot be read or written
    (a read-only or full disk, a file or directory in its way) keeps this session's messages in
    memory instead, said once on stderr: it never stops the chat."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return None
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    from .model_cache import cache_dir

    history = chat_history(FileHistory)(os.path.join(cache_dir(), HISTORY_FILE))
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        # readable by its owner alone, as a shell's history and ollama's are: it holds every message typed
        # (the editor's own open() made it readable by all)
        os.close(os.open(history.filename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    except OSError as e:
        history.fail(e)
    session = PromptSession(history=history)

    def read(prompt: str = "") -> str:
        # the editor reads Ctrl-C as a key; a SIGINT comes only as it hands the terminal back, where its own
        # handler lost it (a traceback "Application is not running", the reply not stopped): the chat's is used
        line = session.prompt(prompt, handle_sigint=False)
        if ctrl_c_after_enter(session.app.input):
            signal.raise_signal(signal.SIGINT)  # what a Ctrl-C a moment later is: the chat's handler stops the reply
        return line
    return read


def ctrl_c_after_enter(editor_input) -> bool:
    """Whether Ctrl-C was pressed after Enter while the editor still held the terminal in raw mode (the
    few milliseconds it takes to finish), where Ctrl-C is not a signal but a key: the editor kept it as
    type-ahead, or it still waits in the terminal. It was read at the next prompt as Ctrl-C there
    ("Ctrl-C again to exit"; once more left the chat) and the reply it was meant to stop ran on. Such
    Ctrl-Cs are taken out here; the other keys stay for the next prompt, in order."""
    import select

    from prompt_toolkit.input.typeahead import get_typeahead, store_typeahead
    from prompt_toolkit.keys import Keys

    keys = get_typeahead(editor_input)  # read with the line, after its Enter
    try:
        for _ in range(64):  # what the terminal holds (bounded: a stream of keys cannot keep this here)
            if editor_input.closed or not select.select([editor_input.fileno()], [], [], 0)[0]:
                break
            keys += editor_input.read_keys()
    except (OSError, ValueError):
        pass
    kept = [k for k in keys if k.key != Keys.ControlC]
    store_typeahead(editor_input, kept)
    return len(kept) != len(keys)


def plain_input(prompt: str = "") -> str:
    """input() with its prompt on stderr: without the line editor (stdout is not a terminal: `pyllm run M >
    reply.txt`), input() wrote each "> " into stdout, among the replies."""
    print(prompt, end="", file=sys.stderr, flush=True)
    return input()


def banner(llm) -> str:
    name = os.path.basename(llm.path)
    trained = llm.config.max_position_embeddings
    return (f"{name}: context {llm.context_length} tokens (trained on {trained}), {llm.n_threads} threads, "
            f"{llm.device}\nchat with the model; /help lists the commands, /exit or Ctrl-D ends")


def chat_loop(llm, system: str | None, sampling: dict, input_fn=None) -> int:
    """The chat: reads messages with input_fn(prompt) (default: the line editor in a terminal, else
    input()) until /exit or end of input; returns the exit status."""
    if not llm.chat_template:
        print(f"this model has no chat template: pick one with --chat-template ({builtin_template_names()}, or a "
              "Jinja file), or use -p --raw for plain completion", file=sys.stderr)
        return 2
    editor = None
    if input_fn is None:
        input_fn = editor = line_editor() or plain_input
    session = ChatSession(llm, system, sampling)
    print(banner(llm), file=sys.stderr)
    if editor is None or editor is plain_input:  # given an input function, or not in a terminal
        return converse(session, input_fn)
    # a terminal: out of line mode for the whole chat (the editor saves and restores that mode around
    # each line, so there is no moment in line mode between the editor letting go and a reply)
    with keys_kept_for_the_editor(sys.stdin.fileno()):
        return converse(session, input_fn)


def converse(session: ChatSession, input_fn) -> int:
    """chat_loop's loop: messages and commands until /exit or end of input."""
    interrupted = False
    while True:
        # with the line editor, a Ctrl-C signal while the line is handed over (the editor itself reads
        # Ctrl-C as a key) stops the reply to that line, as one a moment later does; input() (stdout not
        # a terminal) gets Ctrl-C as that signal: KeyboardInterrupt at the prompt, as before
        restore = _on_interrupt(session.stop) if input_fn not in (input, plain_input) else (lambda: None)
        try:
            text = read_message(input_fn)
        except EOFError as e:
            print(file=sys.stderr)
            text = getattr(e, "text", "")
            if text.strip():  # Ctrl-D inside a block or after a trailing backslash: what was typed is sent first
                session.command(text) if is_command(text) else session.say(text)
            return 0
        except UnicodeDecodeError as e:  # input() in a terminal whose locale decodes strictly
            print(undecodable_line(e), file=sys.stderr)
            continue
        except KeyboardInterrupt:
            if interrupted:
                print(file=sys.stderr)
                return 0
            interrupted = True
            print("\n(Ctrl-C again to exit)", file=sys.stderr)
            continue
        finally:
            restore()
        interrupted = False
        if not text.strip():
            session._stop_requested = False  # (no reply to stop: not kept for the next one)
            continue
        if is_command(text):
            try:
                going = session.command(text)  # (/regen's reply takes a Ctrl-C of the handover)
            except KeyboardInterrupt:  # a /load or /save stopped (it ended the chat): the conversation stays
                print("\n(stopped)", file=sys.stderr)
                going = True
            session._stop_requested = False
            if not going:
                return 0
            continue
        session.say(text)
