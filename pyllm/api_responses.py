"""The JSON `pyllm serve` answers with: logprobs objects, choices and stream chunks, in OpenAI's
shapes (chat.completion, chat.completion.chunk, text_completion)."""

from __future__ import annotations

import codecs
import math


def _token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else -9999.0  # JSON has no -inf; OpenAI uses -9999


def chat_logprobs(tokenizer, tokens) -> dict:
    """{"content": [...], "refusal": null}: each generated token (pyllm.llm.TokenLogprob) with its text, bytes,
    log-probability and top alternatives."""
    content = []
    for t in tokens:
        text, raw = _token_text(tokenizer, t.id)
        top = []
        for i, lp in t.top or []:
            alt_text, alt_raw = _token_text(tokenizer, i)
            top.append({"token": alt_text, "logprob": _finite(lp), "bytes": alt_raw})
        content.append({"token": text, "logprob": _finite(t.logprob), "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


class TextOffsets:
    """Where each token of a choice starts in the choice's text, in characters from `start`: the
    characters that the bytes of the tokens before it decode to. A token continuing a character split
    across tokens starts where that character does; bytes left incomplete that a token does not
    continue count their U+FFFD before it. Invalid bytes count as Python's UTF-8 decoder replaces them
    (as byte-level BPE tokenizers do; tokenizers' ByteFallback and sentencepiece write one U+FFFD per
    invalid byte, so offsets after such bytes can differ from their text). One per choice, kept across
    a stream's chunks, so that streamed offsets are the unstreamed ones."""

    def __init__(self, start: int = 0):
        self.offset = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, raw: bytes) -> int:
        """The offset of the token whose bytes are raw, the tokens before it given in order."""
        held = self._decoder.getstate()[0]  # bytes of a character not complete yet
        at = self.offset
        if held and raw:
            probe = codecs.getincrementaldecoder("utf-8")(errors="replace")
            out = probe.decode(held + raw[:1])
            # the characters that end before raw's first byte: all of out when that byte is held again
            # (a new character begins), else all but the last (the character holding that byte)
            at += len(out) - (0 if probe.getstate()[0] else 1) if out else 0
        self.offset += len(self._decoder.decode(raw))
        return at


def completion_logprobs(tokenizer, tokens, offsets: TextOffsets | int = 0) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs ({text: logprob}) and
    text_offset (TextOffsets': characters from the start of the choice's text; an int: a choice whose
    first token starts there). A token whose
    logprob is None (the first prompt token, echoed) gets null. top_logprobs holds the token itself
    besides the `logprobs` most likely ones (OpenAI: "there may be up to logprobs+1 elements"; as
    llama-cpp-python does), so logprobs=0 gives each token's own."""
    offsets = TextOffsets(offsets) if isinstance(offsets, int) else offsets
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        text, raw = _token_text(tokenizer, t.id)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if t.logprob is None else _finite(t.logprob))
        top = None
        if t.top is not None:
            top = {_token_text(tokenizer, i)[0]: _finite(lp) for i, lp in t.top}
            if t.logprob is not None:
                top.setdefault(text, _finite(t.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offsets.advance(bytes(raw)))
    return out


def merge_completion_logprobs(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {key: a[key] + b[key] for key in a}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, reasoning_tokens: int = 0) -> dict:
    """OpenAI's usage object, with its details; cached_tokens: prompt tokens whose keys/values were
    reused, not computed; reasoning_tokens: completion tokens of think blocks returned as
    reasoning_content (none is hidden: they count in completion_tokens too, as OpenAI counts them).
    No token is audio or a prediction: those counts are 0."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": min(cached_tokens, prompt_tokens), "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def chat_choice(index: int, content: str | None, finish_reason: str, logprobs: dict | None = None,
                tool_calls: list | None = None, reasoning: str | None = None) -> dict:
    """reasoning: the reply's think block (pyllm/reasoning.py), as reasoning_content (llama.cpp's and
    DeepSeek's field; absent when None)."""
    message = {"role": "assistant", "content": content, "refusal": None}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = [call.as_openai() for call in tool_calls]
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_choice(index: int, text: str, finish_reason: str, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_delta(index: int, content: str | None = None, finish_reason: str | None = None, role: bool = False,
               logprobs: dict | None = None, tool_calls: list | None = None, reasoning: str | None = None) -> dict:
    delta: dict = {"role": "assistant", "content": "", "refusal": None} if role else {}
    if reasoning:
        delta["reasoning_content"] = reasoning
    if content:
        delta["content"] = content
    if tool_calls:
        delta["tool_calls"] = [call.as_openai(k) for k, call in enumerate(tool_calls)]
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_delta(index: int, text: str = "", finish_reason: str | None = None,
                     logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
