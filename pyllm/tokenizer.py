"""Text <-> token ids, as transformers does it, from the tokenizer embedded in a .pllm file.

The tokenizer files come from untrusted model files and the texts from untrusted users: whatever
the tokenizers or sentencepiece library raises (a Rust panic included) becomes a PyllmError. Long
texts are encoded with Python's lock released, so other threads (a server's event loop) run on.
"""

from __future__ import annotations

import re
import threading

from .errors import library_errors
from .formats.packed import TokenizerSpec

GIL_FREE_CHARS = 4096  # texts at least this long go through encode_batch, which releases the GIL


class Tokenizer:
    """Wraps a Hugging Face tokenizer.json (tokenizers) or a sentencepiece model."""

    def __init__(self, spec: TokenizerSpec, blob: bytes):
        """FormatError when the library cannot read blob (a tokenizer.json or sentencepiece model)."""
        from .formats.safetensors import FormatError

        with library_errors("the tokenizer cannot be read", FormatError):
            self._load(spec, blob)

    def _load(self, spec: TokenizerSpec, blob: bytes) -> None:
        self.spec = spec
        if spec.kind == "hf":
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_str(blob.decode("utf-8"))
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            self.special_ids = {i for i, t in self._hf.get_added_tokens_decoder().items() if t.special}
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
        if self._hf is not None:
            self.special_tokens = [t.content for t in self._hf.get_added_tokens_decoder().values() if t.special]
        else:
            self.special_tokens = list(self._special_ids_by_text)
        self._blob = blob
        self._literal_hf = None  # a second HF tokenizer that reads special-token strings as text (made on demand)
        self._literal_lock = threading.Lock()

    def special_tokens_in(self, texts: list[str]) -> set[str]:
        """The special-token strings (the template's markers: "<|im_end|>", "<s>", ...) written in texts."""
        return {t for t in self.special_tokens if t and any(t in text for text in texts)}

    def _hf_encode(self, hf, text: str) -> list[int]:
        if len(text) >= GIL_FREE_CHARS:
            return hf.encode_batch([text], add_special_tokens=False)[0].ids
        return hf.encode(text, add_special_tokens=False).ids

    def encode_with_literal(self, text: str, literal: dict[str, str]) -> list[int]:
        """Token ids of text, where the special tokens written in text are special, and each
        placeholder character (a key of literal) stands for its string (the value) read as plain
        text: special-token strings in it become ordinary tokens. No special tokens are added."""
        pattern = "|".join(re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True) if t)
        pieces = re.split(f"({pattern})", text) if pattern else [text]
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if not piece:
                continue
            if i % 2:  # a special token the template wrote
                ids.append(self.token_to_id(piece))
                continue
            for c, value in literal.items():
                piece = piece.replace(c, value)
            with library_errors("cannot tokenize the text"):
                if self._hf is not None:
                    ids += self._hf_encode(self._literal(), piece)
                else:
                    ids += self._sp.encode(piece)
        return ids

    def _literal(self):
        with self._literal_lock:
            if self._literal_hf is None:
                from tokenizers import Tokenizer as HFTokenizer

                hf = HFTokenizer.from_str(self._blob.decode("utf-8"))
                hf.encode_special_tokens = True
                self._literal_hf = hf
            return self._literal_hf

    def token_to_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        if token in self.spec.added_tokens:
            return self.spec.added_tokens[token]
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; special tokens written in the text map to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"text to tokenize must be a str, not {type(text).__name__}")
        with library_errors("cannot tokenize the text"):
            return self._encode(text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._hf is not None:
            ids = self._hf_encode(self._hf, text)
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
        with library_errors("cannot decode the token ids"):
            return self._decode(ids, skip_special_tokens)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
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
