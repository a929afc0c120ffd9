"""Think blocks: chosen from the template, split from a reply as reasoning_content, the same streamed
in pieces of every size as read whole."""

from __future__ import annotations

import os
import random

import pytest

from pyllm.reasoning import THINK_TAGS, ReasoningStream, ThinkTags, split, think_tags

TEMPLATES = os.path.join(os.path.dirname(__file__), "data", "chat_templates")
THINK, MISTRAL = THINK_TAGS


def _template(name):
    with open(os.path.join(TEMPLATES, name + ".jinja"), encoding="utf-8") as f:
        return f.read()


def test_tags_are_chosen_from_the_template():
    assert think_tags(_template("qwen3-0.6b")) == THINK
    assert think_tags(_template("ministral-3-14b-reasoning-2512")) == MISTRAL
    for name in ("smollm2-135m-instruct", "qwen2.5-7b-instruct", "mistral-small-3.2-24b-instruct-2506"):
        assert think_tags(_template(name)) is None, name
    assert think_tags(None) is None


CASES = [  # (reply, prompt opened the block, reasoning, content)
    ("<think>\nI should say hi.\n</think>\n\nHello!", False, "I should say hi.", "Hello!"),
    ("  \n<think>a</think>b", False, "a", "b"),
    ("<think></think>Hello", False, "", "Hello"),
    ("<think>\n\n</think>\n\nHello", False, "", "Hello"),
    ("Hello <think>x</think>", False, None, "Hello <think>x</think>"),  # not where the reply opens
    ("Hello", False, None, "Hello"),
    ("  Hello  ", False, None, "  Hello  "),
    ("", False, None, ""),
    ("<think>cut before the end", False, "cut before the end", ""),  # max_tokens inside the block
    ("<thin", False, None, "<thin"),
    ("I think.\n</think>\n\nHi", True, "I think.", "Hi"),  # the prompt ended with <think>
    ("still thinking", True, "still thinking", ""),
    # the prompt opened the block and the model wrote the tag again: dropped, as vLLM's parsers drop it
    ("<think>\nI think.</think>Hi", True, "I think.", "Hi"),
    ("\n <think>I think.", True, "I think.", ""),
    ("<thi", True, "<thi", ""),
    ("I said here</think><think>Hi", True, "I said here", "<think>Hi"),
    ("a</think>b</think>c", True, "a", "b</think>c"),
    ("<think>a</think>b<think>c</think>", False, "a", "b<think>c</think>"),
    ("<think> a \n b </think>  c \n", False, "a \n b", "c \n"),
    ("<think>中文 😀</think>答案", False, "中文 😀", "答案"),
]


@pytest.mark.parametrize("text, opened, reasoning, content", CASES)
def test_split_reads_the_block_the_reply_opens_with(text, opened, reasoning, content):
    parts = split(text, THINK, opened)
    assert (parts.reasoning, parts.content) == (reasoning, content)
    mistral = text.replace("<think>", "[THINK]").replace("</think>", "[/THINK]")
    parts = split(mistral, MISTRAL, opened)
    want = content.replace("<think>", "[THINK]").replace("</think>", "[/THINK]")
    assert (parts.reasoning, parts.content) == (reasoning, want)


def _streamed(text, tags, opened, sizes):
    stream, reasoning, content, i = ReasoningStream(tags, opened), "", "", 0
    for size in sizes:
        r, c = stream.feed(text[i:i + size])
        reasoning, content, i = reasoning + r, content + c, i + size
        if i >= len(text):
            break
    r, c = stream.finish()
    return reasoning + r, content + c, stream.had_reasoning


@pytest.mark.parametrize("text, opened, reasoning, content", CASES)
def test_streamed_pieces_of_every_size_give_what_split_gives(text, opened, reasoning, content):
    for size in range(1, len(text) + 2):
        got = _streamed(text, THINK, opened, [size] * (len(text) + 1))
        assert got == (reasoning or "", content, reasoning is not None), (size, got)


def test_streamed_random_replies_match_split():
    """Random replies made of tag pieces, whitespace and words, cut at random places."""
    rng = random.Random(7)
    atoms = ["<think>", "</think>", "<th", "ink>", "</", "think", ">", " ", "\n", "a", "word", "<", "é", "😀"]
    for _ in range(3000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        opened = rng.random() < 0.3
        sizes = [rng.randint(1, 6) for _ in range(len(text) + 1)]
        parts = split(text, THINK, opened)
        assert _streamed(text, THINK, opened, sizes) == (parts.reasoning or "", parts.content,
                                                          parts.reasoning is not None), (text, opened, sizes)


def test_tags_that_are_special_tokens_are_seen_among_the_piece_tokens():
    """Streamed pieces leave special tokens out: a tag that is one ([THINK] of Mistral's tokenizers,
    ids 5 and 6 here) is seen among the piece's token ids."""
    stream = ReasoningStream(MISTRAL, False, {"[THINK]": 5, "[/THINK]": 6})
    out = [stream.feed("", [5]), stream.feed("Let me", [10]), stream.feed(" think.", [11]), stream.feed("", [6]),
           stream.feed("Answer", [12]), stream.finish()]
    assert "".join(r for r, _ in out) == "Let me think." and "".join(c for _, c in out) == "Answer"
    assert stream.in_content


@pytest.mark.parametrize("pieces", [
    # the stream merges a special token (no text) into the next token's piece
    [("", [5]), ("Let me", [10]), (" think.", [11]), ("Answer", [6, 12]), (" here", [13])],
    # both tags within one piece, text on each side
    [("Let me think.Answer", [5, 10, 11, 6, 12]), (" here", [13])],
    # a stop string's possible start held " think." back: it comes out after the closing tag's token
    [("", [5]), ("Let me", [10]), ("", [11]), (" think.Answer", [6, 12]), (" here", [13])],
])
def test_a_special_tag_is_placed_where_its_token_stood(pieces):
    """The closing [/THINK] comes in the piece of the token after it (a special token has no text):
    it was written after that piece's text, so the answer's first token was streamed as reasoning
    ("Let me think.Answer"). With the tokens' text (decode), a special tag goes where its token stood."""
    texts = {10: "Let me", 11: " think.", 12: "Answer", 13: " here", 5: "", 6: ""}

    def decode(ids):
        return "".join(texts[i] for i in ids)

    stream = ReasoningStream(MISTRAL, False, {"[THINK]": 5, "[/THINK]": 6}, decode)
    out = [stream.feed(text, ids) for text, ids in pieces] + [stream.finish()]
    assert ("".join(r for r, _ in out), "".join(c for _, c in out)) == ("Let me think.", "Answer here")


def test_custom_tags():
    tags = ThinkTags("<reasoning>", "</reasoning>")
    assert (split("<reasoning>x</reasoning>y", tags, False).reasoning, split("<reasoning>x", tags, False).content) == (
        "x", "")
