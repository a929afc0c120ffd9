"""Reasoning in chat replies: the text a model writes in a think block before its answer, returned as
the message's `reasoning_content` apart from its `content` (llama.cpp's `--reasoning-format deepseek`,
the field DeepSeek's API and vLLM's reasoning parsers fill).

Tags, chosen from the chat template's own text (the template writes them around past reasoning, or
into the generation prompt):
  <think> ... </think>     Qwen3, QwQ, DeepSeek-R1 and its distills, SmolLM3
  [THINK] ... [/THINK]     Magistral, Ministral 3 (special tokens of Mistral's tokenizers)

A think block is reasoning only where the reply opens with it (after whitespace), or where the
prompt ends with the opening tag (templates that open the block for the model: DeepSeek-R1's,
Qwen3-thinking's); the text after the closing tag is the content. A reply cut (max_tokens) before
the closing tag is reasoning only, with content "". Tags anywhere else are content, as written.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tool_calls import partial_suffix

REASONING_FORMATS = ("deepseek", "none")  # llama.cpp's names: reasoning_content apart, or left in content


@dataclass(frozen=True)
class ThinkTags:
    open: str
    close: str


THINK_TAGS = (ThinkTags("<think>", "</think>"), ThinkTags("[THINK]", "[/THINK]"))


def think_tags(template: str | None) -> ThinkTags | None:
    """The think tags a chat template uses (its text holds the closing tag), or None."""
    return next((tags for tags in THINK_TAGS if tags.close in (template or "")), None)


@dataclass
class Split:
    """A reply read for reasoning: reasoning (None when the reply has no think block where one
    counts), the content after it (the whole reply otherwise), and whether the block was closed."""
    reasoning: str | None
    content: str
    closed: bool = True


def split(text: str, tags: ThinkTags, opened: bool) -> Split:
    """text (a whole reply) read for reasoning; opened: the prompt ended with tags.open, so the
    reply starts inside the block (an opening tag the model writes again is dropped, as vLLM's
    reasoning parsers drop it). The reasoning and the content lose the whitespace around them."""
    body = text.lstrip()
    if body.startswith(tags.open):
        text = body[len(tags.open):]
    elif not opened:
        return Split(None, text)
    end = text.find(tags.close)
    if end < 0:
        return Split(text.strip(), "", closed=False)
    return Split(text[:end].strip(), text[end + len(tags.close):].lstrip())


def reasoning_tokens(decode, n: int, tags: ThinkTags, opened: bool) -> int:
    """How many of a reply's n tokens belong to its think block (its tags included; all n when the
    block never closed, 0 without one): decode(k) is the text of its first k tokens. A binary search
    over k (a prefix has a closed block from the token that ends it on): O(log n) decodes."""
    def closed(k: int) -> bool:
        parts = split(decode(k), tags, opened)
        return parts.reasoning is not None and parts.closed

    if split(decode(n), tags, opened).reasoning is None:
        return 0
    low, high = 0, n  # the first k whose text holds the closed block lies in (low, high]
    if not closed(n):
        return n
    while high - low > 1:
        mid = (low + high) // 2
        if closed(mid):
            high = mid
        else:
            low = mid
    return high


class ReasoningStream:
    """Streams a reply as (reasoning, content) pieces, the same texts split() gives the whole reply.

    feed(piece, token_ids) returns the reasoning and the content this piece makes certain; what may
    yet be a tag (a piece ending "</thi") or whitespace whose place is not known yet is held until
    the next piece, or finish(). tag_ids: {tag: its token id} for tags that are special tokens
    (streamed pieces leave those out, so they are seen among the piece's token ids instead); decode:
    the text of token ids, special tokens left out (Tokenizer.decode), which places such a tag in
    its piece."""

    def __init__(self, tags: ThinkTags, opened: bool, tag_ids: dict | None = None, decode=None):
        self.tags = tags
        self.tag_ids = tag_ids or {}
        self.decode = decode
        self.ids: list[int] = []  # every token id fed, and the length of every piece's text fed
        self.fed_chars = 0
        self.state = "thinking" if opened else "start"  # start -> thinking -> content
        self.may_reopen = opened  # a block the prompt opened, whose tag the reply may write again (dropped)
        self.held = ""  # text not yet given out: leading whitespace, or a tag's possible start
        self.reasoning_started = False  # the reasoning's leading whitespace is dropped
        self.had_reasoning = opened

    @property
    def in_content(self) -> bool:
        """Whether the reply is past its think block (or had none): what comes now is content."""
        return self.state in ("content_start", "content")

    def feed(self, piece: str, token_ids=()) -> tuple[str, str]:
        token_ids = [int(i) for i in token_ids]
        inserts = []  # a special tag: written back into the text where its token stood
        for tag in (self.tags.open, self.tags.close):
            tag_id = self.tag_ids.get(tag)
            if tag_id is not None and tag_id in token_ids:
                inserts.append((self._tag_offset(piece, token_ids, token_ids.index(tag_id), tag), tag))
        self.ids += token_ids
        self.fed_chars += len(piece)
        for offset, tag in sorted(inserts, reverse=True):
            piece = piece[:offset] + tag + piece[offset:]
        return self._advance(self.held + piece)

    def _tag_offset(self, piece: str, token_ids: list[int], k: int, tag: str) -> int:
        """Where in the piece the special tag at token_ids[k] stood: after the text of every token
        before it (the stream's earlier pieces held some back where stop strings might begin). Without
        decode, or where that text does not end inside this piece, where the block's state puts it
        (an opening tag before the piece's text, a closing one after it)."""
        if self.decode is not None:
            offset = len(self.decode(self.ids + token_ids[:k])) - self.fed_chars
            if 0 <= offset <= len(piece):
                return offset
        return 0 if tag == self.tags.open else len(piece)

    def _advance(self, text: str) -> tuple[str, str]:
        reasoning = content = ""
        self.held = ""
        if self.state == "start":
            body = text.lstrip()
            if not body:
                self.held = text
                return "", ""
            if body.startswith(self.tags.open):
                self.state, self.had_reasoning, text = "thinking", True, body[len(self.tags.open):]
            elif self.tags.open.startswith(body):
                self.held = text  # maybe the opening tag, cut
                return "", ""
            else:
                self.state = "content"
                return "", text
        if self.state == "thinking" and self.may_reopen:
            body = text.lstrip()
            if not body or (self.tags.open.startswith(body) and body != self.tags.open):
                self.held = text  # whitespace, or maybe the opening tag written again, cut
                return "", ""
            self.may_reopen = False
            if body.startswith(self.tags.open):
                text = body[len(self.tags.open):]
        if self.state == "thinking":
            end = text.find(self.tags.close)
            if end < 0:
                keep = partial_suffix(text, self.tags.close)
                reasoning, self.held = text[:len(text) - keep], text[len(text) - keep:]
                stripped = reasoning.rstrip()  # trailing whitespace waits: it may end the reasoning
                self.held = reasoning[len(stripped):] + self.held
                reasoning = stripped
            else:
                reasoning = text[:end].rstrip()
                self.state, text = "content_start", text[end + len(self.tags.close):]
            if not self.reasoning_started:
                reasoning = reasoning.lstrip()
                self.reasoning_started = bool(reasoning)
            if self.state == "thinking":
                return reasoning, ""
        if self.state == "content_start":  # the content's leading whitespace is dropped
            content = text.lstrip()
            if content:
                self.state = "content"
            return reasoning, content
        return reasoning, text

    def finish(self) -> tuple[str, str]:
        """The held text: (reasoning, content) of the reply's end (a block never closed is reasoning)."""
        held, self.held = self.held, ""
        if self.state == "start":
            return "", held
        if self.state == "thinking":
            return (held.strip() if not self.reasoning_started else held.rstrip()), ""
        if self.state == "content_start":
            return "", held.lstrip()
        return "", held

