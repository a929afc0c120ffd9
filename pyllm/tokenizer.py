"""Text <-> token ids, as transformers does it, from the tokenizer embedded in a .pllm file.

The tokenizer files come from untrusted model files and the texts from untrusted users: whatever
the tokenizers or sentencepiece library raises (a Rust panic included) becomes a PyllmError. Texts
are encoded with Python's lock released, so other threads (a server's event loop) run on.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import threading

from .errors import PyllmError, library_errors
from .formats.packed import TokenizerSpec



def check_text(text: str, what: str = "the text") -> str:
    """text itself when it is Unicode text; PyllmError naming the first lone UTF-16 surrogate
    otherwise (a Python str can hold one, from JSON's "\\ud800" escape or a surrogateescape decode,
    and no tokenizer or UTF-8 encoder takes it)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PyllmError(f"{what} contains a lone surrogate (U+{ord(text[e.start]):04X} at character "
                             f"{e.start}), which is not Unicode text") from None
    return text


class Tokenizer:
    """Wraps a Hugging Face tokenizer.json (tokenizers) or a sentencepiece model."""

    def __init__(self, spec: TokenizerSpec, blob: bytes):
        """FormatError when the library cannot read blob (a tokenizer.json or sentencepiece model)."""
        from .formats.safetensors import FormatError

        with library_errors("the tokenizer cannot be read", FormatError):
            self._load(spec, blob)
        self._check_added_ids(getattr(self, "_added", None))
        self._added = None

    def _check_added_ids(self, added) -> None:
        """FormatError for a tokenizer.json added token that the tokenizers library gives another id than
        the file's: it numbers added tokens after the vocabulary in its own order, and drops an empty
        one, so "<a>" written with id 4 after an empty token of id 3 became 3, in silence (the model's
        embedding of 4 belongs to it), and a token of id 5000 after 400 others became 400."""
        from .formats.safetensors import FormatError

        for n, entry in enumerate(added if isinstance(added, list) else []):
            content, wanted = (entry.get("content"), entry.get("id")) if isinstance(entry, dict) else (None, None)
            if not isinstance(wanted, int) or isinstance(wanted, bool):
                continue
            got = self._hf.token_to_id(content) if isinstance(content, str) else None
            if got != wanted:
                raise FormatError(f"tokenizer.json added_tokens[{n}] ({content!r:.40}) has id {wanted}, but the "
                                  "tokenizers library gives it " + ("no id" if got is None else f"id {got}")
                                  + " (an empty token, a gap in the ids, or text the vocabulary has under another id)")

    def _load(self, spec: TokenizerSpec, blob: bytes) -> None:
        self.spec = spec
        if spec.kind == "hf":
            config = json.loads(blob)
            for where in ("normalizer", "decoder"):  # before any text is encoded (the probe "a" below: a
                check_growth(config.get(where), where)  # Replace chain 8^9 times longer aborted the process)
            self._hf = hf_tokenizer(blob.decode("utf-8"))
            self._sp = None
            # the ids span 0 .. the largest (get_vocab_size counts them: a vocabulary holding id 100000 among
            # 400 tokens fitted 512 embeddings at load, then its text failed every generate())
            self.vocab_size = max(self._hf.get_vocab(with_added_tokens=True).values(), default=-1) + 1
            self.special_ids = {i for i, t in self._hf.get_added_tokens_decoder().items() if t.special}
            self._added = config.get("added_tokens")
            self.run_byte_ids = _byte_fallback_ids(self._hf, config.get("decoder"))
            self._byte_level = _decoder_has(config.get("decoder"), "ByteLevel")
            # a post-processor that adds tokens (a BOS, GLM's [gMASK]<sop> pair...) adds them itself;
            # otherwise the spec's add_bos_token / add_eos_token do (GGUF files, tokenizer.model sources)
            with_specials = self._hf.encode("a", add_special_tokens=True).ids if self._hf.post_processor else []
            self._post_processor_adds = bool(with_specials) and \
                with_specials != self._hf.encode("a", add_special_tokens=False).ids
            # the ids a post-processor adds are written in it, not looked up in the vocabulary: one adding
            # id 1,000,000 to a 3-token vocabulary loaded, then failed every generate() as "token ids must lie in"
            self.vocab_size = max([self.vocab_size] + [i + 1 for i in with_specials])
        elif spec.kind == "sentencepiece":
            import sentencepiece as spm

            from .formats.safetensors import FormatError

            self._hf = None
            self._sp = spm.SentencePieceProcessor(model_proto=blob)
            base = self._sp.get_piece_size()
            for i in range(base):  # as convert's tokenizer.model reader: merges (or unigram paths) ranked by a
                if math.isnan(self._sp.get_score(i)):  # NaN score came out in no defined order
                    raise FormatError(f"the sentencepiece tokenizer: piece {i} ({self._sp.id_to_piece(i)!r:.60}) "
                                      "has score NaN")
            self.vocab_size = max([base] + [i + 1 for i in spec.added_tokens.values()])
            self.special_ids = {i for i in range(base) if self._sp.is_control(i)} | set(spec.added_tokens.values())
            specials = [t for t in (spec.bos_token, spec.eos_token, *spec.added_tokens) if t]
            self._special_ids_by_text = {t: self.token_to_id(t) for t in specials}
            self._split = re.compile(f"({_alternation(specials)})") if specials else None
            self._added_by_id = {i: t for t, i in spec.added_tokens.items()}
            self.run_byte_ids = frozenset()  # sentencepiece decodes each invalid byte on its own
        else:
            raise ValueError(f"unknown tokenizer kind {spec.kind!r}")
        self.bos_id = spec.bos_token_id
        self.eos_ids = list(spec.eos_token_ids)
        if self._hf is not None:
            self.special_tokens = [t.content for t in self._hf.get_added_tokens_decoder().values() if t.special]
        else:
            self.special_tokens = list(self._special_ids_by_text)
        self._special_res = None  # _special_patterns(), made on demand
        self._blob = blob
        self._literal_hf = None  # a second HF tokenizer that reads special-token strings as text (made on demand)
        self._literal_lock = threading.Lock()

    def special_tokens_in(self, texts: list[str]) -> set[str]:
        """The special-token strings (the template's markers: "<|im_end|>", "<s>", ...) written in texts."""
        specials, _, ahead = self._special_patterns()
        if ahead is None:
            return set()
        # the longest special token beginning at each place in a text, and those that are its prefixes
        # (`t in text` for each of 6,000 specials, as Gemma 3 has, took 8 s over a 1 MB message)
        found = set()
        for text in texts:
            found.update(m.group(1) for m in ahead.finditer(text))
        return {t[:k] for t in found for k in range(1, len(t) + 1) if t[:k] in specials}

    def _special_patterns(self):
        """(the special-token strings, a regular expression splitting text at them, one finding each
        place one begins): the expressions are None without special tokens."""
        with self._literal_lock:
            if self._special_res is None:
                specials = frozenset(t for t in self.special_tokens if t)
                alternation = _alternation(specials)
                self._special_res = (specials, re.compile(f"({alternation})") if specials else None,
                                     re.compile(f"(?=({alternation}))") if specials else None)
            return self._special_res

    @staticmethod
    def _hf_encode(hf, text: str, add_special_tokens: bool = False) -> list[int]:
        # through encode_batch, which releases the GIL (encode holds it), for texts of any length: a
        # tokenizer.json's Split regex that backtracks spent seconds on each of a 4,000-character text's
        # words with the GIL held, a server's event loop standing still (25 us more than encode)
        return hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_with_literal(self, text: str, literal: dict[str, str]) -> list[int]:
        """Token ids of text, where the special tokens written in text are special, and each
        placeholder character (a key of literal) stands for its string (the value) read as plain
        text: special-token strings in it become ordinary tokens. No special tokens are added."""
        split = self._special_patterns()[1]
        pieces = split.split(text) if split else [text]
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
                hf = hf_tokenizer(self._blob.decode("utf-8"))
                hf.encode_special_tokens = True
                self._literal_hf = hf
            return self._literal_hf

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """The most characters one token's piece holds (its vocabulary string: a byte-level piece holds a
        character a byte, so no fewer than its text)."""
        if self._hf is not None:
            return max(map(len, self._hf.get_vocab(with_added_tokens=True)), default=1)
        return max((len(self._sp.id_to_piece(i)) for i in range(self._sp.get_piece_size())), default=1)

    def token_to_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        if token in self.spec.added_tokens:
            return self.spec.added_tokens[token]
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def is_silent(self, token_id: int) -> bool:
        """Whether decode() (skipping special tokens) gives no text for this id: a special token, or an
        id past the vocabulary (models often have more embeddings than tokens)."""
        i = int(token_id)
        if i in self.special_ids or i >= self.vocab_size:
            return True
        return self._hf.id_to_token(i) is None if self._hf is not None else False

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for in decoded text: part of a character for a byte-level or
        byte-fallback token, a special token's own text. b"" for an id without a token."""
        i = int(token_id)
        if self._hf is not None:
            piece = self._hf.id_to_token(i)
            if piece is None:
                return b""
            if i in self.special_ids or i in self._hf.get_added_tokens_decoder():
                return piece.encode("utf-8")
            if self._byte_level and all(c in _BYTE_DECODER for c in piece):
                return bytes(_BYTE_DECODER[c] for c in piece)
            if i in self.run_byte_ids:
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
        if i in self._added_by_id:
            return self._added_by_id[i].encode("utf-8")
        if i >= self._sp.get_piece_size():
            return b""
        if self._sp.is_byte(i):
            return bytes([int(self._sp.id_to_piece(i)[3:5], 16)])
        return self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of text; special tokens written in the text map to their ids, or with
        parse_special=False (llama.cpp's parse_special: text that is data, such as a file to evaluate)
        are read as plain text, ordinary tokens like any other string."""
        if not isinstance(text, str):
            raise TypeError(f"text to tokenize must be a str, not {type(text).__name__}")
        check_text(text, "the text to tokenize")
        with library_errors("cannot tokenize the text"):
            return self._encode(text, add_special_tokens, parse_special)

    def _encode(self, text: str, add_special_tokens: bool, parse_special: bool = True) -> list[int]:
        if self._hf is not None:
            hf = self._hf if parse_special else self._literal()
            if add_special_tokens and self._post_processor_adds:
                return self._hf_encode(hf, text, add_special_tokens=True)
            ids = self._hf_encode(hf, text)
        else:
            ids = []
            pieces = self._split.split(text) if self._split and parse_special else [text]
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
        if self._hf is not None:  # decode_batch releases the GIL, as _hf_encode (a decoder's Replace may backtrack)
            return self._hf.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
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


# the most characters one character may become in a normalizer or decoder step of each type (Unicode's
# bounds for its normal forms: NFKC/NFKD 18, for U+FDFA; a byte-level step writes one per UTF-8 byte;
# BertNormalizer spaces out CJK characters, lowercases and strips accents through NFD)
_GROWTH = {"NFC": 3, "NFD": 4, "NFKC": 18, "NFKD": 18, "Lowercase": 3, "ByteLevel": 4, "BertNormalizer": 36,
           "WordPiece": 2, "BPEDecoder": 2}


def hf_tokenizer(text: str):
    """A tokenizers.Tokenizer from tokenizer.json text, without the file's truncation and padding:
    transformers turns both off for every encode not asking for them, and pyllm never does (a file's
    "truncation": {"max_length": 2} cut every prompt to 2 tokens in silence, its padding filled prompts
    with pad tokens). The tokenizers library's errors pass (library_errors where it is called)."""
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_str(text)
    tok.no_truncation()
    tok.no_padding()
    return tok


def check_growth(step, where: str) -> None:
    """FormatError when a tokenizer.json normalizer or decoder (`where`) can make a text more than
    limits.MAX_TOKENIZER_GROWTH times longer, or longer by more than that many thousand characters:
    a Replace of "a" by 10,000 characters made a 20,000-character prompt 3 GB inside the tokenizers
    library, whose failed allocation aborts the process (a server with it)."""
    from .formats.safetensors import FormatError
    from .limits import MAX_TOKENIZER_GROWTH

    times, added, culprit = _growth(step)
    if times > MAX_TOKENIZER_GROWTH or added > 1000 * MAX_TOKENIZER_GROWTH:
        raise FormatError(f"the tokenizer.json {where} can make a text {times:g} times longer"
                          + (f" and {added} characters longer" if added else "") + f" ({culprit}), past "
                          f"limits.MAX_TOKENIZER_GROWTH ({MAX_TOKENIZER_GROWTH} times, {1000 * MAX_TOKENIZER_GROWTH} "
                          "characters)")


def _growth(step) -> tuple[float, int, str]:
    """(m, a, the step responsible): step makes a text of n characters at most m * n + a long."""
    if not isinstance(step, dict):
        return 1, 0, ""
    kind = step.get("type")
    if kind == "Sequence":
        times, added, steps = 1, 0, []
        for inner in [*(step.get("normalizers") or []), *(step.get("decoders") or [])]:
            m, a, c = _growth(inner)
            times, added = times * m, added * m + a
            if m > 1 or a:
                steps.append(c)
        return times, added, ", ".join(steps)
    if kind == "Replace":
        pattern, content = step.get("pattern") or {}, step.get("content")
        content = len(content) if isinstance(content, str) else 0
        literal = pattern.get("String") if isinstance(pattern, dict) else None
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        shortest = len(literal) if isinstance(literal, str) else _shortest_match(regex)
        culprit = f"Replace by {content} characters"
        if shortest:  # each match replaces at least this many characters
            return max(1, content / shortest), 0, culprit
        return 1 + content, content, culprit  # a match of nothing: content before every character
    if kind == "Prepend":
        prepend = step.get("prepend")
        return 1, len(prepend) if isinstance(prepend, str) else 0, "Prepend"
    if kind == "Precompiled":
        return _charsmap_growth(step.get("precompiled_charsmap")), 0, "Precompiled"
    return _GROWTH.get(kind, 1), 0, str(kind)


# the most characters Unicode's full case folding maps one character to (U+FB03 "ﬃ" folds to "ffi"):
# a case-insensitive Oniguruma pattern "ffi" also matches that one character
MAX_CASE_FOLD = 3


def _shortest_match(regex) -> int:
    """The fewest characters a match of regex (Oniguruma's syntax) takes, as Python's parser reads it,
    divided by MAX_CASE_FOLD (rounded up) when any part of it ignores case; 0 when it may match
    nothing or Python cannot read it (\\p{L}...)."""
    try:
        import re._parser as parser  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse as parser
    try:
        shortest = int(parser.parse(regex).getwidth()[0]) if isinstance(regex, str) else 0
    except (re.error, RecursionError, OverflowError, ValueError, TypeError):
        return 0
    if re.search(r"\(\?[A-Za-z]*i", regex):  # (?i), (?mi), (?i:...): Python's width counts no folding
        return -(-shortest // MAX_CASE_FOLD)
    return shortest


def _charsmap_growth(charsmap) -> int:
    """The longest text a sentencepiece normalization map (a Precompiled step) puts for one character:
    its blob is a 4-byte trie size, the trie, then the replacement texts, each ending in a NUL."""
    import base64
    import struct

    try:
        data = base64.b64decode(charsmap) if isinstance(charsmap, str) else bytes(charsmap or b"")
        (trie,) = struct.unpack_from("<I", data)
        texts = data[4 + trie:].split(b"\0")
    except (ValueError, TypeError, struct.error):
        return 1  # the tokenizers library refuses it
    return max([len(t.decode("utf-8", "replace")) for t in texts] + [1])


MAX_ALTERNATION_DEPTH = 32  # nested groups in _alternation's expression (Python's re parser recurses on each)


def _alternation(strings) -> str:
    """A regular expression matching any of strings, the longest one where several begin at the same
    place (as `|` of them sorted longest first), written as a trie: Python's re tries every branch
    of an alternation at every position, so one of 6,000 special tokens took 20 s over a 1 MB text,
    holding the GIL. Branches nest MAX_ALTERNATION_DEPTH deep at most; below that, the strings
    that remain are an alternation sorted longest first."""
    def node(items: list[str], depth: int) -> str:
        # items share what came before; "" among them: a string ends here
        ends = "" in items
        rest = sorted({t for t in items if t})
        if not rest:
            return ""
        if depth >= MAX_ALTERNATION_DEPTH:
            body = "|".join(re.escape(t) for t in sorted(rest, key=len, reverse=True))
            return f"(?:{body})" + ("?" if ends else "")
        branches, i = [], 0
        while i < len(rest):  # the strings beginning with one character: their longest common prefix, then what follows
            j = i
            while j < len(rest) and rest[j][0] == rest[i][0]:
                j += 1
            group = rest[i:j]
            prefix = os.path.commonprefix(group)
            branches.append(re.escape(prefix) + node([t[len(prefix):] for t in group], depth + 1))
            i = j
        body = branches[0] if len(branches) == 1 and not ends else f"(?:{'|'.join(branches)})"
        return body + ("?" if ends else "")

    return node(list(strings), 0)


def _incomplete_utf8(data: bytes) -> int:
    """How many bytes at the end of data begin a UTF-8 character they do not finish (0 to 3)."""
    for k in range(1, min(4, len(data)) + 1):
        byte = data[-k]
        if byte < 0x80:
            return 0
        if byte >= 0xC0:  # the lead byte: its character's length
            return k if k < (2 if byte < 0xE0 else 3 if byte < 0xF0 else 4) else 0
    return 0


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _bytes_to_unicode()


def _decoder_has(node, kind: str) -> bool:
    """Whether a tokenizer.json decoder (or a Sequence of them) has a step of this type."""
    if isinstance(node, dict):
        return node.get("type") == kind or any(_decoder_has(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_decoder_has(v, kind) for v in node)
    return False


def _byte_fallback_ids(hf, decoder) -> frozenset:
    """The <0xNN> token ids when the tokenizer.json decoder has a ByteFallback step, else none.

    That step decodes a run of consecutive byte tokens as UTF-8 when it is valid and otherwise as one
    U+FFFD per byte, so a later byte token can rewrite the text of the whole run before it."""
    if not _decoder_has(decoder, "ByteFallback"):
        return frozenset()
    ids = (hf.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


class StreamDecoder:
    """Turns generated ids, one at a time, into text pieces whose concatenation equals decode().

    Invariant (for every tokenizer kind): the pieces joined, flush() included, equal
    decode(context_tail + ids)[len(before):] where context_tail is the last 4 context ids (from the
    start of the run of byte tokens they begin inside, however far back it starts: with tokenizers'
    ByteFallback a run decoded from its middle is invalid, one U+FFFD per byte, the reply's too) and before
    is decode(context_tail) without the bytes of a character it leaves incomplete (token ids cut
    from an earlier reply can end so: the generated bytes that complete it open the text); with no
    context, exactly decode(ids), replacement characters (U+FFFD) included. One exception, with
    ByteFallback: a context ending in a run of byte tokens that the reply's bytes make invalid UTF-8
    (bytes that do not complete its last character, or a token closing the run before they do) is
    decoded as one U+FFFD per byte, its whole characters too: then before has those characters so
    rewritten (one U+FFFD per byte), and the pieces hold the U+FFFD of the bytes of the character
    the context left incomplete, then all the reply's text.

    Each step decodes a window: the ids from `start` on. `done` is the window's text already
    emitted (or belonging to the context). New text is emitted once it extends `done`; a trailing
    U+FFFD is held back while the next token may complete the character, as is the text of an open run
    of byte tokens that a later byte token can rewrite (Tokenizer.run_byte_ids: tokenizers'
    ByteFallback decoder), and text that later tokens rewrite otherwise is held until it settles. After each piece the
    window slides to the latest token whose decoding is exactly the tail of the window's text (a
    character boundary), so the work per token stays constant however long the generation runs
    (inside a run of byte tokens it grows with the run, decoded whole at each token).

    `begins` (after push or flush) says where the text of each of the last len(begins) tokens
    begins among the characters returned, held-back ones included (StopText lets each token out with
    its text by it): the pushed token's, and when it closes a run of byte tokens, those of the run's
    generated tokens too (inside an open run, a token's character is known when the run closes: the
    run's start until then).
    """

    MAX_SLIDE = 8  # window starts tried, newest first, when sliding

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int]):
        self.tokenizer = tokenizer
        context_ids = list(context_ids)
        first = max(0, len(context_ids) - 4)
        if tokenizer.run_byte_ids:
            def in_run(i: int) -> bool:
                return context_ids[i] in tokenizer.run_byte_ids or tokenizer.is_silent(context_ids[i])
            # the whole run (a fixed look-back started long runs in their middle): read once per stream
            while first > 0 and in_run(first) and in_run(first - 1):
                first -= 1
        self.ids: list[int] = context_ids[first:]  # context tail, then the generated ids
        self.start = 0  # window start
        self._full: str | None = tokenizer.decode(self.ids)  # decode() of the whole window (None: it is `done`)
        self.done = self._context_text()  # the window's text already accounted for
        # `done` should the reply make the context's last byte run invalid UTF-8 (None: it cannot)
        self._invalid_done = self._invalid_run_text()
        self.emitted = 0  # characters of the pieces returned so far
        self.begins: list[int] = []  # where in those characters the text of the last tokens begins
        self._first = len(self.ids)  # the first generated id

    def _context_text(self) -> str:
        """decode(context tail) without the bytes of a character it leaves incomplete (token ids cut
        mid-character): the generated bytes that complete it rewrite its U+FFFD, so with them in
        `done` no text would ever extend it. A U+FFFD the context's text itself holds stays."""
        tok = self.tokenizer
        text = self._full
        pending = _incomplete_utf8(b"".join(tok.token_bytes(i) for i in self.ids if not tok.is_silent(i)))
        if not pending:
            return text
        n, tail = 0, b""  # the last tokens, back to the incomplete character's first byte
        while n < len(self.ids) and len(tail) < pending:
            n += 1
            if not tok.is_silent(self.ids[-n]):
                tail = tok.token_bytes(self.ids[-n]) + tail
        if len(tail) == pending:  # byte tokens alone (byte fallback, sentencepiece): the text without them
            return tok.decode(self.ids[:-n])
        # a token with whole characters too (byte-level BPE): its UTF-8 decoding ends in one U+FFFD for the bytes
        return text[:-1] if text.endswith("\ufffd") else text

    def _invalid_run_text(self) -> str | None:
        """`done` as it reads when the run of byte tokens the context ends in turns out invalid UTF-8
        (ByteFallback then decodes the whole run as one U+FFFD per byte): its whole characters, which
        `done` holds as text, become a U+FFFD per byte. None when the context ends in no such run,
        or its bytes are invalid already (`done` holds their U+FFFD)."""
        tok = self.tokenizer
        if not tok.run_byte_ids:
            return None
        data, n = b"", len(self.ids)
        while n > 0 and (self.ids[n - 1] in tok.run_byte_ids or tok.is_silent(self.ids[n - 1])):
            n -= 1
            if not tok.is_silent(self.ids[n]):
                data = tok.token_bytes(self.ids[n]) + data
        whole = data[:len(data) - _incomplete_utf8(data)]  # what `done` holds of the run
        try:
            text = whole.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not text or not self.done.endswith(text):
            return None
        return self.done[:len(self.done) - len(text)] + "\ufffd" * len(whole)

    def _accounted(self, text: str) -> bool:
        """Whether text (of the window from `start`) extends `done`, switching `done` to the context's
        run decoded as invalid when the reply made it so (see the class docstring)."""
        if text.startswith(self.done):
            return True
        if self._invalid_done is not None and text.startswith(self._invalid_done):
            self.done, self._invalid_done = self._invalid_done, None
            return True
        return False

    def push(self, token_id: int) -> str:
        """The new text that token_id completes ("" while it is held back); sets `begins`."""
        before = self.done if self._full is None else self._full
        self.ids.append(int(token_id))
        end = self._settled()
        text = self.tokenizer.decode(self.ids[self.start:end])
        extends = self._accounted(text)
        base = self.emitted - len(self.done)  # the window's first character among those returned
        if end < len(self.ids):  # inside an open run of byte tokens, whose text begins after `text` (and
            self.begins = [max(base + len(text), self.emitted)]  # after what is out: a run the context opens)
        elif self._in_run(len(self.ids) - 2):  # it closes one
            self.begins = self._run_begins(base, len(self.ids) - 1)
        else:  # the first character its bytes change: a token completing a character begins where it does
            self.begins = [base + len(os.path.commonprefix([before, text]))]
        self._full = text
        if not extends:
            return ""
        piece = text[len(self.done):].rstrip("\ufffd")
        if not piece:
            return ""
        self.done += piece
        self.emitted += len(piece)
        self._invalid_done = None  # the context's run is closed: its decoding is final
        if self.done == text and end == len(self.ids):
            self._slide(text)
        return piece

    def _in_run(self, k: int) -> bool:
        """Whether ids[k], in the window, may be part of a run of byte tokens (a byte or a silent id)."""
        tok = self.tokenizer
        return bool(tok.run_byte_ids) and k >= self.start and (self.ids[k] in tok.run_byte_ids or
                                                                tok.is_silent(self.ids[k]))

    def _run_begins(self, base: int, close: int) -> list[int]:
        """begins of the generated ids of the run of byte tokens that ends before ids[close] (the
        token closing it, included when there is one), as ByteFallback decodes the run: its UTF-8
        characters when valid (a byte begins where its character does), else one U+FFFD per byte."""
        tok = self.tokenizer
        r = close
        while self._in_run(r - 1):
            r -= 1
        start = base + len(tok.decode(self.ids[self.start:r]))  # where the run's text begins
        offsets, data = [], b""
        for i in self.ids[r:close]:
            offsets.append(len(data))
            if i in tok.run_byte_ids:
                data += tok.token_bytes(i)
        try:
            data.decode("utf-8")
            leads = [0]  # leads[o]: characters begun in data[:o]
            for byte in data:
                leads.append(leads[-1] + ((byte & 0xC0) != 0x80))
            where = [leads[o] - (o < len(data) and (data[o] & 0xC0) == 0x80) for o in offsets] + [leads[-1]]
        except UnicodeDecodeError:
            where = offsets + [len(data)]
        begins = [start + w for w in where[:len(offsets) + (close < len(self.ids))]]
        return begins[max(0, self._first - r):]

    def _settled(self) -> int:
        """End of the ids whose text no later token can change: before an open run of byte tokens
        (silent ids do not close a run: decode() drops them first)."""
        tok, end = self.tokenizer, len(self.ids)
        if tok.run_byte_ids:
            while end > self.start and (self.ids[end - 1] in tok.run_byte_ids or tok.is_silent(self.ids[end - 1])):
                end -= 1
        return end

    def _slide(self, text: str) -> None:
        tok = self.tokenizer
        for k in range(len(self.ids) - 1, max(self.start, len(self.ids) - 1 - self.MAX_SLIDE), -1):
            if tok.run_byte_ids and (self.ids[k] in tok.run_byte_ids or tok.is_silent(self.ids[k])):
                continue  # a window must not start inside a byte run (or where one could reach)
            tail = tok.decode(self.ids[k:])
            if tail and not tail.startswith("\ufffd") and text.endswith(tail):
                self.start, self.done, self._full = k, tail, None
                return

    def flush(self) -> str:
        """The text held back at the end, replacement characters included (as decode() gives them)."""
        text = self.tokenizer.decode(self.ids[self.start:])
        piece = text[len(self.done):] if self._accounted(text) else ""
        # the generation ended inside a run of byte tokens: where its tokens begin is known now
        self.begins = self._run_begins(self.emitted - len(self.done), len(self.ids)) \
            if self._in_run(len(self.ids) - 1) else []
        self.ids, self.start, self.done = self.ids[-1:], 0, self.tokenizer.decode(self.ids[-1:])
        self.emitted += len(piece)
        self._full = self._invalid_done = None
        self._first = 1
        return piece
