"""Text <-> token ids, as transformers does it, from the tokenizer embedded in a .pllm file."""

from __future__ import annotations

import re

from .formats.packed import TokenizerSpec


class Tokenizer:
    """Wraps a Hugging Face tokenizer.json (tokenizers) or a sentencepiece model."""

    def __init__(self, spec: TokenizerSpec, blob: bytes):
        self.spec = spec
        if spec.kind == "hf":
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_str(blob.decode("utf-8"))
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            self.special_ids = {i for i, t in self._hf.get_added_tokens_decoder().items() if t.special}
            # a post-processor that adds tokens (a BOS, GLM's [gMASK]<sop> pair...) adds them itself;
            # otherwise the spec's add_bos_token / add_eos_token do (GGUF files, tokenizer.model sources)
            self._post_processor_adds = self._hf.post_processor is not None and (
                self._hf.encode("a", add_special_tokens=True).ids != self._hf.encode("a", add_special_tokens=False).ids)
        elif spec.kind == "sentencepiece":
            import sentencepiece as spm

            self._hf = None
            self._sp = spm.SentencePieceProcessor(model_proto=blob)
            base = self._sp.get_piece_size()
            self.vocab_size = max([base] + [i + 1 for i in spec.added_tokens.values()])
            self.special_ids = {i for i in range(base) if self._sp.is_control(i)} | set(spec.added_tokens.values())
            specials = [t for t in (spec.bos_token, spec.eos_token, *spec.added_tokens) if t]
            self._special_ids_by_text = {t: self.token_to_id(t) for t in specials}
            self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")") if specials else None
            self._added_by_id = {i: t for t, i in spec.added_tokens.items()}
        else:
            raise ValueError(f"unknown tokenizer kind {spec.kind!r}")
        self.bos_id = spec.bos_token_id
        self.eos_ids = list(spec.eos_token_ids)

    def token_to_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        if token in self.spec.added_tokens:
            return self.spec.added_tokens[token]
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; special tokens written in the text map to their ids."""
        if self._hf is not None:
            if add_special_tokens and self._post_processor_adds:
                return self._hf.encode(text, add_special_tokens=True).ids
            ids = self._hf.encode(text, add_special_tokens=False).ids
        else:
            ids = []
            pieces = self._split.split(text) if self._split else [text]
            for piece in pieces:
                if not piece:
                    continue
                if piece in self._special_ids_by_text:
                    ids.append(self._special_ids_by_text[piece])
                else:
                    ids.extend(self._sp.encode(piece))
        if add_special_tokens:
            if self.spec.add_bos_token and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self.spec.add_eos_token and self.eos_ids:
                ids = ids + [self.eos_ids[0]]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        out, run = [], []
        for i in ids:
            special = i in self.special_ids
            if i in self._added_by_id or (special and not skip_special_tokens):
                out.append(self._sp.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self._added_by_id.get(i) or self._sp.id_to_piece(i))
            elif not special:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)


class StreamDecoder:
    """Turns generated ids, one at a time, into text pieces that never split a UTF-8 character.

    Each step decodes only a short window: the tokens of the previous piece (so leading spaces and
    merges decode as in the full text) plus the tokens not yet emitted. Text ending in an incomplete
    character (U+FFFD) is held back until the next token completes it. The pieces joined equal the
    decoding of all the ids after the context. The work per token stays constant however long the
    generation runs.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context_ids[-4:])  # context, then the generated ids
        self.prefix = 0  # window start: the tokens of the last emitted piece
        self.read = len(self.ids)  # first id not yet emitted

    def _pending(self) -> tuple[str, str]:
        """(text of the window's emitted part, text of the whole window)."""
        decode = self.tokenizer.decode
        return decode(self.ids[self.prefix:self.read]), decode(self.ids[self.prefix:])

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done, text = self._pending()
        if text.endswith("\ufffd") or len(text) <= len(done) or not text.startswith(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """The text held back at the end. A character left incomplete (the reply was cut off inside
        it) is dropped rather than emitted broken."""
        done, text = self._pending()
        self.prefix = self.read = len(self.ids)
        return text[len(done):].rstrip("\ufffd") if text.startswith(done) else ""
