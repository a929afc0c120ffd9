"""Tokenizer parity with transformers: token ids, decoded text, BOS/EOS, and streamed decoding.

Conventions checked (transformers 5, AutoTokenizer.from_pretrained on the model directory):
* tokenizer.json is used as written (TokenizersBackend); with a tokenizer.json, add_bos_token and
  add_eos_token in tokenizer_config.json are ignored and the post-processor alone adds BOS/EOS.
* a directory with only tokenizer.model and a LlamaTokenizer config loads as transformers'
  LlamaTokenizer: the model's pieces become a `tokenizers` BPE with byte fallback and no normalizer,
  "▁" goes before the first chunk of text only (legacy=false, the default) or before every chunk
  between special tokens (legacy=true), and BOS is added only when the config says add_bos_token
  (the default is false in transformers 5).
* with only tokenizer.model and no tokenizer_config.json, a llama directory loads as TokenizersBackend,
  which imitates sentencepiece itself (the model's normalizer, legacy=true).
pyllm's converter rebuilds the same tokenizer (pyllm/convert/checkpoint.py, read_tokenizer).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil

import pytest

import pyllm
from pyllm.convert import convert_checkpoint
from pyllm.formats.packed import TokenizerSpec
from pyllm.formats.safetensors import FormatError
from pyllm.tokenizer import StreamDecoder, Tokenizer

from conftest import TRAINING_TEXT, scripted_reply

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. Paris is the capital of France!",
    "chinese_short": "中文测试",
    "chinese_long": "今天天气很好，我们去公园散步。大语言模型的指令微调需要高质量的数据。",
    "emoji": "Emoji 😀🎉 thumbs 👍🏽 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 done",
    "code": "def main():\n\tif x:\n\t\treturn 1\n    else:\n        print('hello, world')\n\n# end\n",
    "empty": "",
    "spaces": "  leading and trailing spaces  ",
    "one_space": " ",
    "newlines": "\n\nline\n",
    "special": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "special_glued": "a<|im_end|>b <|im_start|> c",
    "mixed": "Café naïve résumé — 中文 and 😀 in one line.",
}
# characters the small sentencepiece model has never seen: they go through byte fallback
SP_TEXTS = {
    **TEXTS,
    "unseen": "Ωμέγα ק 🦙 ∑ ☃",
    "bos_eos_text": "<s>hi</s> there",
}
STREAM_PROMPT = "Paris is the capital of France. 中文"


def _load_hf(directory):
    return transformers.AutoTokenizer.from_pretrained(directory)


def _convert(directory, out_dir, name):
    out = os.path.join(out_dir, f"{name}.pllm")
    convert_checkpoint(directory, out, quant="f32", progress=False)
    return out


def _copy_model(src, dst, drop=()):
    shutil.copytree(src, dst)
    for name in drop:
        path = os.path.join(dst, name)
        if os.path.exists(path):
            os.remove(path)
    return dst


def _assert_parity(tok, hf, texts):
    for name, text in texts.items():
        ids = tok.encode(text)
        assert ids == hf.encode(text), name
        assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), name
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (name, skip)


# -- 1. tokenizer.json (byte-level BPE) -----------------------------------------------------------

@pytest.fixture(scope="module")
def bpe(tiny_llama, tiny_llama_f32):
    with pyllm.LLM(tiny_llama_f32, n_threads=1) as llm:
        yield llm, _load_hf(tiny_llama)


@pytest.mark.parametrize("name", list(TEXTS))
def test_bpe_ids_and_decoding_match_transformers(bpe, name):
    llm, hf = bpe
    text = TEXTS[name]
    ids = llm.tokenize(text)
    assert ids == hf.encode(text)
    assert llm.tokenize(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert llm.detokenize(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    # byte-level BPE is lossless: the text comes back exactly, special tokens included
    assert llm.detokenize(ids, skip_special_tokens=False) == text


def test_bpe_special_tokens_map_to_single_ids(bpe):
    llm, hf = bpe
    ids = llm.tokenize(TEXTS["special"])
    start, end = hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 2 and ids.count(end) == 1
    assert llm.detokenize(ids) == "user\nhi\nassistant\n"
    assert llm.tokenizer.bos_id == hf.bos_token_id and llm.tokenizer.eos_ids[0] == hf.eos_token_id


# -- 2. BOS / EOS from the post-processor and the config -----------------------------------------

def _set_post_processor(directory, single):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    path = os.path.join(directory, "tokenizer.json")
    tok = HFTokenizer.from_file(path)
    if single is None:
        tok.post_processor = None
    else:
        specials = [(t, tok.token_to_id(t)) for t in ("<|im_start|>", "<|im_end|>") if t in single]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=f"{single} $B:1", special_tokens=specials)
    tok.save(path)


def _update_config(directory, **values):
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(values)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)


BOS_CASES = {
    # name: (post-processor single template or None, tokenizer_config.json updates, expect BOS, expect EOS)
    "template_bos": ("<|im_start|> $A", {}, True, False),
    "template_bos_eos": ("<|im_start|> $A <|im_end|>", {}, True, True),
    # transformers 5 drops add_bos_token/add_eos_token from the config when tokenizer.json exists
    "template_bos_config_false": ("<|im_start|> $A", {"add_bos_token": False}, True, False),
    "no_template_config_true": ("$A", {"add_bos_token": True, "add_eos_token": True}, False, False),
    "no_post_processor_config_true": (None, {"add_bos_token": True}, False, False),
}


@pytest.fixture(scope="module")
def bos_models(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("bos")
    models = {}
    for name, (single, updates, _, _) in BOS_CASES.items():
        d = _copy_model(tiny_llama, str(root / name))
        _set_post_processor(d, single)
        _update_config(d, **updates)
        models[name] = (pyllm.LLM(_convert(d, str(root), name), n_threads=1), _load_hf(d))
    yield models
    for llm, _ in models.values():
        llm.close()


@pytest.mark.parametrize("case", list(BOS_CASES))
def test_bos_eos_added_exactly_when_transformers_adds_them(bos_models, case):
    llm, hf = bos_models[case]
    _, _, want_bos, want_eos = BOS_CASES[case]
    bos, eos = hf.bos_token_id, hf.eos_token_id
    for text in ("hello world", TEXTS["chinese_short"], ""):
        ref = hf.encode(text)
        assert (ref[:1] == [bos]) is want_bos and (ref[-1:] == [eos]) is want_eos  # the premise
        assert llm.tokenize(text) == ref
        assert llm.tokenize(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert llm.tokenizer.spec.add_bos_token is want_bos and llm.tokenizer.spec.add_eos_token is want_eos
    _assert_parity(llm.tokenizer, hf, TEXTS)


# -- 3. sentencepiece tokenizer.model only ----------------------------------------------------------

@pytest.fixture(scope="module")
def sp_model_bytes():
    """A small byte-fallback BPE sentencepiece model trained like LLaMA's (identity normalization,
    digits split, no whitespace cleanup), with the chat markers as user-defined pieces."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 20), model_writer=buf, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    return buf.getvalue()


def _sp_directory(tiny_llama, directory, model_bytes, **config_updates):
    """tiny_llama's weights with only tokenizer.model and the tokenizer_config.json that
    transformers' LlamaTokenizer saves (its tokenizer.json is deleted)."""
    _copy_model(tiny_llama, directory, drop=("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"))
    model_path = os.path.join(directory, "tokenizer.model")
    with open(model_path, "wb") as f:
        f.write(model_bytes)
    transformers.LlamaTokenizer.from_pretrained(directory).save_pretrained(directory)
    for name in ("tokenizer.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))
    with open(model_path, "wb") as f:  # transformers 5 does not write tokenizer.model back
        f.write(model_bytes)
    _update_config(directory, **config_updates)
    return directory


def test_a_tokenizer_model_with_a_nan_score_is_refused(tiny_llama, sp_model_bytes, tmp_path):
    """Merges are ranked by piece score (unigram paths summed from them): a NaN sorted in no defined
    order, so ids differed from sentencepiece's and transformers' in silence."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model_bytes)
    proto.pieces[300].score = float("nan")
    d = _sp_directory(tiny_llama, str(tmp_path / "nan"), sp_model_bytes)
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(proto.SerializeToString())
    with pytest.raises(FormatError, match=re.escape(os.path.join(d, "tokenizer.model")) + ": piece 300 has score NaN"):
        convert_checkpoint(d, str(tmp_path / "nan.pllm"), quant="f32", progress=False)
    assert not (tmp_path / "nan.pllm").exists()


def test_a_tokenizer_model_listing_a_piece_twice_is_refused(tiny_llama, sp_model_bytes, tmp_path):
    """sentencepiece itself refuses such a model ("is already defined"); converted, one of the two ids
    decoded to no text (the vocabulary maps each piece to one id)."""
    from pyllm.convert.checkpoint import _proto_fields

    def field(number, value):  # a length-delimited protobuf field (ModelProto's top-level fields all are)
        def varint(n):
            out = bytearray()
            while True:
                out.append((n & 0x7F) | (0x80 if n >> 7 else 0))
                n >>= 7
                if not n:
                    return bytes(out)
        return varint(number << 3 | 2) + varint(len(value)) + value

    fields = list(_proto_fields(sp_model_bytes))
    pieces = [v for n, v in fields if n == 1]
    pieces[350] = pieces[300]
    damaged = b"".join(field(1, p) for p in pieces) + b"".join(field(n, v) for n, v in fields if n != 1)
    with pytest.raises(RuntimeError, match="already defined"):
        spm.SentencePieceProcessor(model_proto=damaged)
    d = _sp_directory(tiny_llama, str(tmp_path / "dup"), sp_model_bytes)
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(damaged)
    with pytest.raises(FormatError, match=r"tokenizer.model: the piece .* is listed twice \(ids 300 and 350\)") as error:
        convert_checkpoint(d, str(tmp_path / "dup.pllm"), quant="f32", progress=False)
    assert str(error.value).startswith(os.path.join(d, "tokenizer.model: "))
    assert not (tmp_path / "dup.pllm").exists()


SP_CASES = {
    # name: (tokenizer_config.json updates or None to delete the file, transformers class, expect BOS)
    "llama": ({}, "LlamaTokenizer", False),
    "llama_bos": ({"add_bos_token": True, "add_eos_token": False, "legacy": False}, "LlamaTokenizer", True),
    "llama_legacy": ({"add_bos_token": True, "legacy": True}, "LlamaTokenizer", True),
    "llama_no_prefix_space": ({"add_prefix_space": False, "add_eos_token": True}, "LlamaTokenizer", False),
    "no_tokenizer_config": (None, "TokenizersBackend", False),
    # a LLaMA-2 style tokenizer.json (Prepend/Replace normalizer, BOS template) beside tokenizer.model:
    # transformers keeps its vocabulary, merges and post-processor but rebuilds the rest as above
    "llama2_tokenizer_json": ({"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "legacy": False},
                              "LlamaTokenizer", True),
}


def _write_llama2_tokenizer_json(directory):
    tok = json.loads(transformers.LlamaTokenizer.from_pretrained(directory).backend_tokenizer.to_str())
    tok["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    tok["pre_tokenizer"] = None
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    tok["post_processor"] = {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f)


@pytest.fixture(scope="module")
def sp_models(tiny_llama, sp_model_bytes, tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    models = {}
    for name, (updates, _, _) in SP_CASES.items():
        d = _sp_directory(tiny_llama, str(root / name), sp_model_bytes, **(updates or {}))
        expected_files = ["tokenizer.model", "tokenizer_config.json"]
        if updates is None:
            os.remove(os.path.join(d, "tokenizer_config.json"))
            expected_files = ["tokenizer.model"]
        elif name == "llama2_tokenizer_json":
            _write_llama2_tokenizer_json(d)
            expected_files = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
        assert sorted(f for f in os.listdir(d) if f.startswith("tokenizer")) == expected_files
        models[name] = (pyllm.LLM(_convert(d, str(root), name), n_threads=1), _load_hf(d))
    yield models
    for llm, _ in models.values():
        llm.close()


@pytest.mark.parametrize("case", list(SP_CASES))
def test_sentencepiece_ids_and_decoding_match_transformers(sp_models, sp_model_bytes, case):
    llm, hf = sp_models[case]
    _, cls, want_bos = SP_CASES[case]
    assert type(hf).__name__ == cls  # the convention this case reproduces (see the module docstring)
    _assert_parity(llm.tokenizer, hf, SP_TEXTS)
    assert (llm.tokenize("hello")[:1] == [hf.bos_token_id]) is want_bos
    assert llm.tokenizer.spec.add_bos_token is want_bos
    # characters outside the model's vocabulary are encoded as their UTF-8 bytes and decode back
    sp = spm.SentencePieceProcessor(model_proto=sp_model_bytes)
    ids = llm.tokenize(SP_TEXTS["unseen"], add_special_tokens=False)
    assert sum(sp.is_byte(i) for i in ids) >= 8
    assert llm.detokenize(ids) == hf.decode(ids) == SP_TEXTS["unseen"]


def test_sentencepiece_llama_round_trip(sp_models):
    """With legacy=false, decode(encode(text)) gives the text back, but for one leading space."""
    llm, _ = sp_models["llama"]
    for name, text in SP_TEXTS.items():
        ids = llm.tokenize(text, add_special_tokens=False)
        assert llm.detokenize(ids, skip_special_tokens=False) == (text[1:] if text.startswith(" ") else text), name


def test_sentencepiece_plain_text_matches_sentencepiece_itself(sp_models, sp_model_bytes):
    """Away from leading spaces and special tokens, every convention is sentencepiece's own encoding."""
    sp = spm.SentencePieceProcessor(model_proto=sp_model_bytes)
    for case in SP_CASES:
        if case == "llama_no_prefix_space":  # no dummy prefix at all
            continue
        llm, _ = sp_models[case]
        for name in ("english", "chinese_long", "emoji", "code", "unseen", "mixed"):
            assert llm.tokenize(SP_TEXTS[name], add_special_tokens=False) == sp.encode(SP_TEXTS[name]), (case, name)


def test_sentencepiece_legacy_flag_changes_text_after_special_tokens(sp_models):
    """legacy=false (the default) puts no "▁" after a special token; legacy=true does, as sentencepiece."""
    for case, prefixed in (("llama", False), ("llama_legacy", True)):
        llm, hf = sp_models[case]
        ids = llm.tokenize("<|im_start|>user", add_special_tokens=False)
        assert ids == hf.encode("<|im_start|>user", add_special_tokens=False)
        assert hf.convert_ids_to_tokens(ids[0]) == "<|im_start|>"
        assert hf.convert_ids_to_tokens(ids[1]).startswith("\u2581") is prefixed, case


def test_parse_special_false_reads_special_token_strings_as_text(bpe, sp_models, sp_kind_tokenizer):
    """encode(parse_special=False) (llama.cpp's parse_special=false, what `pyllm perplexity` uses:
    the text is data) gives ordinary tokens for "<|im_end|>" written in the text, as transformers'
    split_special_tokens=True does, and decodes back to the string; by default it is the one token."""
    tokenizers = [(bpe[0].tokenizer, bpe[1]), (sp_models["llama"][0].tokenizer, sp_models["llama"][1]),
                  (sp_kind_tokenizer[0], None)]
    for tok, hf in tokenizers:
        text = "a<|im_end|>b <|im_start|> c" if tok.spec.kind == "hf" else "a</s>b <s> c"
        assert tok.special_ids & set(tok.encode(text, add_special_tokens=False))
        ids = tok.encode(text, add_special_tokens=False, parse_special=False)
        assert not tok.special_ids & set(ids), tok.spec.kind
        assert tok.decode(ids).replace(" ", "") == text.replace(" ", "")
        if hf is not None:
            assert ids == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            assert tok.encode(text, parse_special=False) == hf(text, split_special_tokens=True)["input_ids"]
        assert tok.encode("plain words", add_special_tokens=False, parse_special=False) == \
            tok.encode("plain words", add_special_tokens=False)


# -- sentencepiece kind (.pllm files from older converters embed tokenizer.model) ------------------

@pytest.fixture(scope="module")
def sp_kind_tokenizer(sp_model_bytes):
    sp = spm.SentencePieceProcessor(model_proto=sp_model_bytes)
    spec = TokenizerSpec(kind="sentencepiece", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                         bos_token_id=sp.bos_id(), eos_token_ids=[sp.eos_id()], add_bos_token=True)
    return Tokenizer(spec, sp_model_bytes), sp


def test_sentencepiece_kind_encodes_like_sentencepiece(sp_kind_tokenizer):
    tok, sp = sp_kind_tokenizer
    for name in ("english", "chinese_long", "emoji", "code", "unseen", "mixed", "spaces"):
        text = SP_TEXTS[name]
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text), name
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    # special tokens written in the text are split out; each chunk between them is its own sentence
    ids = tok.encode("<s>hi</s> there", add_special_tokens=False)
    assert ids == [sp.bos_id()] + sp.encode("hi") + [sp.eos_id()] + sp.encode(" there")
    assert tok.decode(ids) == sp.decode(sp.encode("hi") + sp.encode(" there"))
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hi</s>" + sp.decode(sp.encode(" there"))


def test_sentencepiece_kind_refuses_a_nan_score(sp_model_bytes):
    """A piece scored NaN: its merges were ranked in no defined order, in silence (convert's
    tokenizer.model reader refused it; the older .pllm files' sentencepiece kind did not)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model_bytes)
    proto.pieces[40].score = float("nan")
    sp = spm.SentencePieceProcessor(model_proto=sp_model_bytes)
    spec = TokenizerSpec(kind="sentencepiece", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                         bos_token_id=sp.bos_id(), eos_token_ids=[sp.eos_id()], add_bos_token=True)
    with pytest.raises(FormatError, match=r"piece 40 \(.*\) has score NaN"):
        Tokenizer(spec, proto.SerializeToString())


# -- 4. streamed decoding ------------------------------------------------------------------------

def _stream(tok, context, ids):
    dec = StreamDecoder(tok, context)
    return [dec.push(i) for i in ids] + [dec.flush()]


def _check_stream(tok, texts):
    context = tok.encode(STREAM_PROMPT)[-4:]
    split_chars = 0
    for name, text in texts.items():
        ids = tok.encode(text, add_special_tokens=False)
        pieces = _stream(tok, context, ids)
        assert all("\ufffd" not in p for p in pieces), (name, pieces)
        before, full = tok.decode(context), tok.decode(context + ids)
        assert full.startswith(before)
        assert "".join(pieces) == full[len(before):], name
        # count tokens that end inside a character: the held-back case this test is about
        split_chars += sum(tok.decode(context + ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    assert split_chars > 0


def test_stream_decoder_byte_level_bpe(bpe):
    llm, _ = bpe
    _check_stream(llm.tokenizer, TEXTS)


@pytest.mark.parametrize("case", ["llama", "llama_legacy", "no_tokenizer_config", "llama2_tokenizer_json"])
def test_stream_decoder_sentencepiece_byte_fallback(sp_models, case):
    llm, _ = sp_models[case]
    _check_stream(llm.tokenizer, SP_TEXTS)


def test_stream_decoder_sentencepiece_kind(sp_kind_tokenizer):
    tok, _ = sp_kind_tokenizer
    _check_stream(tok, SP_TEXTS)


def _random_ids(tok, rng, n):
    """Random ids, half of them byte tokens (<0x..>) where the vocabulary has them, so that
    characters are split, left incomplete and broken by other tokens."""
    byte_ids = [i for i in (tok.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None]
    vocab = [i for i in range(tok.vocab_size) if i not in tok.special_ids]
    return [int(rng.choice(byte_ids if byte_ids and rng.random() < 0.5 else vocab)) for _ in range(n)]


def _assert_stream_equals_decode(tok, seed, rounds=150):
    import numpy as np

    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        ids = _random_ids(tok, rng, int(rng.integers(1, 24)))
        assert "".join(_stream(tok, [], ids)) == tok.decode(ids), ids
        context = tok.encode(STREAM_PROMPT)
        before, full = tok.decode(context[-4:]), tok.decode(context[-4:] + ids)
        if full.startswith(before):
            assert "".join(_stream(tok, context, ids)) == full[len(before):], ids


def _assert_stream_after_a_cut_character(tok, seed, rounds=60):
    """A context that ends inside a character (token ids cut from an earlier reply mid-emoji): the
    reply's pieces are the text of its bytes from the first byte of that character on (the generated
    bytes complete it), no more (the context's own characters, a U+FFFD it holds, are not repeated)
    and no less. Its text was lost: every piece "", flush() too."""
    import numpy as np

    def whole(data: bytes) -> int:  # the length of the longest prefix of whole characters
        return next(n for n in range(len(data), len(data) - 4, -1) if _valid_utf8(data[:n]))

    rng = np.random.default_rng(seed)
    cut = 0
    for text in ("emoji 😀🎉", "中文测试", "Ωμέγα ק 🦙", "café", "what is \ufffd here"):
        ids = tok.encode(text + " and more", add_special_tokens=False)
        data = [tok.token_bytes(i) for i in ids]
        for k in range(1, len(ids)):
            context, reply = ids[:k], ids[k:]
            joined = b"".join(data)
            start = whole(b"".join(data[:k]))
            assert "".join(_stream(tok, context, reply)) == joined[start:].decode("utf-8"), (text, k)
            cut += start < len(b"".join(data[:k]))
    assert cut > 0  # some contexts did end inside a character
    checked = 0
    for _ in range(rounds):  # random contexts ending on a whole character, and replies
        context, extra = _random_ids(tok, rng, int(rng.integers(1, 6))), _random_ids(tok, rng, int(rng.integers(1, 12)))
        before, full = tok.decode(context), tok.decode(context + extra)
        ends_whole = _valid_utf8(b"".join(tok.token_bytes(i) for i in context)[-4:].lstrip(bytes(range(0x80, 0xC0))))
        if full.startswith(before) and ends_whole:
            assert "".join(_stream(tok, context, extra)) == full[len(before):], (context, extra)
            checked += 1
    assert checked > rounds // 4


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_stream_after_a_context_cut_inside_a_character_byte_level_bpe(bpe):
    llm, _ = bpe
    _assert_stream_after_a_cut_character(llm.tokenizer, seed=4)


@pytest.mark.parametrize("case", ["llama", "llama2_tokenizer_json"])
def test_stream_after_a_context_cut_inside_a_character_sentencepiece_byte_fallback(sp_models, case):
    llm, _ = sp_models[case]
    _assert_stream_after_a_cut_character(llm.tokenizer, seed=5)


@pytest.mark.parametrize("case", ["llama", "llama2_tokenizer_json"])
def test_reply_continuing_a_prompts_byte_run_is_not_replacement_characters(sp_models, case):
    """A prompt ending in characters the vocabulary lacks ("∑☃": a run of byte tokens, the 4-id
    context tail starting inside the first) and a reply whose bytes continue the run ("∑"): the
    reply came as U+FFFD, one per byte (the run decoded from its middle is invalid UTF-8)."""
    llm, _ = sp_models[case]
    for prompt, rest in (("∑☃", "∑ and more"), ("Ωμέ☃", "γα"), ("x ☃☃", "∑∑"),
                         ("x " + "∑" * 35 + "Ω", "∑ and more")):  # a run of 107 byte tokens
        ids = llm.tokenize(prompt + rest, add_special_tokens=False)
        k = next(k for k in range(len(ids)) if llm.detokenize(ids[:k]).endswith(prompt))
        assert all(i in llm.tokenizer.run_byte_ids for i in ids[k - 4:k + 2])
        stream = llm.generate(ids[:k], max_new_tokens=len(ids) - k, logits_processors=[scripted_reply(ids[k:])],
                              stream=True)
        assert "".join(stream) == rest, prompt
        assert [t.id for t in stream.tokens] == ids[k:]


@pytest.fixture(scope="module")
def fallback_tok():
    """A tiny Llama-style tokenizer.json: BPE over "▁"-escaped text whose only pieces are a few ASCII
    ones, so every other character is byte tokens (<0xNN>), and Llama's decoder (ByteFallback: a
    run of byte tokens is its UTF-8 text when valid, else one U+FFFD per byte)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers

    specials = ["<unk>", "<s>", "</s>"]
    pieces = ["\u2581", "a", "n", "d", "x", "\u2581a", "nd", "\u2581and", "\u2581x"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [("\u2581", "a"), ("n", "d"), ("\u2581a", "nd"), ("\u2581", "x")]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    spec = TokenizerSpec(kind="hf", bos_token="<s>", eos_token="</s>", unk_token="<unk>", bos_token_id=1,
                         eos_token_ids=[2])
    tok = Tokenizer(spec, hf.to_str().encode("utf-8"))
    assert len(tok.run_byte_ids) == 256
    return tok


def _bytes(tok, data: bytes) -> list[int]:
    return [tok.token_to_id(f"<0x{b:02X}>") for b in data]


def test_stream_decoder_reads_byte_runs_of_any_length(fallback_tok):
    """The context tail reached back at most 32 ids for the start of a byte run: a longer run was
    decoded from its middle (invalid UTF-8: one U+FFFD per byte), so a reply continuing it came as
    replacement characters. Runs of any length, in the context and in the reply, now decode whole."""
    tok = fallback_tok
    x, end = tok.encode("x", add_special_tokens=False), tok.encode(" and", add_special_tokens=False)
    for n in (3, 16, 17, 40, 60, 200):  # "é" is 2 byte tokens: runs of 6 to 400
        run = _bytes(tok, "é".encode() * n)
        cases = [(x + run[:-1], run[-1:] + end, "é and"),  # the reply completes the context's last character
                 (x + run, _bytes(tok, "中".encode()) + end, "中 and"),  # it continues a whole run
                 (x + run, end, " and"),
                 (x, run + end, "é" * n + " and"),  # a reply that is a long run
                 (x + run[:-1], run[-1:] + run + end, "é" * (n + 1) + " and")]
        for context, reply, expected in cases:
            pieces = _stream(tok, context, reply)
            assert "".join(pieces) == expected, (n, expected)
            assert not any("\ufffd" in p for p in pieces)


def _expected_reply_text(tok, context, reply):
    """The text a stream of reply after context gives, from decode() of the whole context: the
    reply's part of decode(context + reply) after the context's text without the bytes of a
    character it leaves incomplete; when the reply makes the context's last byte run invalid UTF-8
    (ByteFallback: one U+FFFD per byte), after that text with the run's whole characters so decoded."""
    data, n = b"", len(context)
    while n > 0 and context[n - 1] in tok.run_byte_ids | tok.special_ids:
        n -= 1
        data = tok.token_bytes(context[n]) + data if context[n] in tok.run_byte_ids else data
    pending = 0
    for k in range(1, min(4, len(data)) + 1):  # an incomplete last character: a lead byte short of its length
        if data[-k] >= 0xC0:
            pending = k if k < (2 if data[-k] < 0xE0 else 3 if data[-k] < 0xF0 else 4) else 0
            break
        if data[-k] < 0x80:
            break
    cut, seen = len(context), 0
    while seen < pending:
        cut -= 1
        seen += context[cut] in tok.run_byte_ids
    before, full = tok.decode(context[:cut]), tok.decode(context + reply)
    if not full.startswith(before):
        whole = data[:len(data) - pending].decode("utf-8")
        before = before[:len(before) - len(whole)] + "\ufffd" * len(whole.encode("utf-8"))
    assert full.startswith(before), (before, full)
    return full[len(before):]


def test_stream_after_a_byte_run_the_reply_completes_or_invalidates(fallback_tok):
    """A context ending in a run of byte tokens (a prompt, or a reply cut mid-character) and a
    reply whose first bytes complete its last character, or make the run invalid UTF-8 (a token
    closing it first, or bytes that do not fit): with whole characters in the run, the invalid run
    rewrote them as U+FFFD (one per byte), the decoder's text no longer began with the context's,
    and every piece of the reply was "" (its text lost). Streamed pieces now join to the reply's
    text, for emoji split across tokens and invalid sequences, at any length."""
    import numpy as np

    tok = fallback_tok
    x, end = tok.encode("x", add_special_tokens=False), tok.encode(" and", add_special_tokens=False)
    emoji, e = _bytes(tok, "😀".encode()), _bytes(tok, "é".encode())
    cases = [  # (context, reply, the reply's text)
        (x + e + emoji[:2], emoji[2:] + end, "😀 and"),  # completes the context's emoji
        (x + e + emoji[:2], emoji[2:3] + emoji[3:], "😀"),  # one byte at a time, the generation ending there
        (x + e + emoji[:2], end, "\ufffd\ufffd and"),  # closes the run first: the emoji's 2 bytes are invalid
        (x + e + emoji[:2], e + end, "\ufffd" * 4 + " and"),  # bytes that do not continue it
        (x + e + emoji[:2], e, "\ufffd" * 4),  # ... the generation ending inside the run
        (x + e + emoji[:1], emoji[1:2], "\ufffd\ufffd"),  # still incomplete at the end
        (x + e, _bytes(tok, b"\x80") + end, "\ufffd and"),  # a whole run made invalid by a lone continuation byte
        (x + e * 50 + emoji[:3], end, "\ufffd" * 3 + " and"),  # a long run
        (x + e * 50 + emoji[:3], emoji[3:] + e + end, "😀é and"),
        (e + emoji[:2], end, "\ufffd\ufffd and"),  # the run opens the context
        (x + e + emoji[:2] + [2], emoji[2:] + end, "😀 and"),  # a special token (no text) inside the run
    ]
    for context, reply, expected in cases:
        assert _expected_reply_text(tok, context, reply) == expected, (context, reply)
        assert "".join(_stream(tok, context, reply)) == expected, (context, reply)
    # random runs: whole characters, emoji cut anywhere, stray continuation and lead bytes, words
    rng = np.random.default_rng(7)
    parts = [e, _bytes(tok, "中".encode()), emoji, emoji[:1], emoji[:3], _bytes(tok, b"\x80"), end, x, [2]]
    checked = 0
    for _ in range(400):
        context = x + [i for k in rng.integers(0, len(parts), int(rng.integers(1, 6))) for i in parts[k]]
        context = context[:len(context) - int(rng.integers(0, 3))]
        reply = [i for k in rng.integers(0, len(parts), int(rng.integers(1, 5))) for i in parts[k]]
        reply = reply[int(rng.integers(0, 3)):] or end
        assert "".join(_stream(tok, context, reply)) == _expected_reply_text(tok, context, reply), (context, reply)
        checked += not tok.decode(context + reply).startswith(tok.decode(context).rstrip("\ufffd"))
    assert checked > 20  # runs made invalid by the reply were among them


def test_stop_strings_in_byte_runs_keep_the_tokens_of_the_text(fallback_tok):
    """With byte tokens, which token's text a stop string begins in is the byte's character (a byte
    run is decoded whole): the stream keeps exactly the tokens whose bytes begin before the stop
    string's, for stops anywhere in words, in runs of characters and emoji split across tokens, and
    after a context cut inside a character the reply completes."""
    from pyllm.llm import StopText

    tok = fallback_tok
    x = tok.encode("x", add_special_tokens=False)
    words = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    emoji = _bytes(tok, "😀".encode())
    reply = emoji[2:] + _bytes(tok, "éé中".encode()) + words(" and") + _bytes(tok, "😀é".encode()) + words(" xa")
    for context, first in ((x + emoji[:2], 2), (x, 0)):  # the context's bytes of the first character
        reply_ids = reply if first else emoji[:2] + reply
        data = [tok.token_bytes(i).replace(b"\xe2\x96\x81", b" ") for i in reply_ids]
        starts = [first + sum(len(d) for d in data[:k]) for k in range(len(data))]  # each token's first byte
        text = "".join(_stream(tok, context, reply_ids))
        assert text.encode() == "😀".encode()[:first] + b"".join(data)
        checked = 0
        for c in range(len(text)):
            stop = text[c:c + 2]
            if text.find(stop) != c:
                continue
            stream = StopText(StreamDecoder(tok, context), [stop])
            out = ""
            for i in reply_ids:
                out += stream.push(i)
                if stream.stopped:
                    break
            out += stream.finish()
            cut = len(text[:c].encode())
            assert out == text[:c] and stream.take_tokens() == [i for i, b in zip(reply_ids, starts) if b < cut], stop
            checked += 1
        assert checked > 10


@pytest.mark.parametrize("case", ["llama", "llama2_tokenizer_json"])
def test_reply_invalidating_a_prompts_byte_run_keeps_its_text(sp_models, case):
    """generate() from token ids cut inside a character after whole characters of a byte run
    ("Ω☃" then half of "∑"), and a reply that closes the run: its text was lost ("" for every
    token); it is the U+FFFD of the cut character's bytes and the reply's words."""
    llm, _ = sp_models[case]
    ids = llm.tokenize("x Ω☃∑", add_special_tokens=False)
    words = llm.tokenize("x Ω☃∑ and more", add_special_tokens=False)[len(ids):]
    assert all(i in llm.tokenizer.run_byte_ids for i in ids[-8:])
    for cut in (1, 2):  # "∑" (3 byte tokens) cut after 2 or 1 of them
        stream = llm.generate(ids[:-cut], max_new_tokens=len(words), logits_processors=[scripted_reply(words)],
                              stream=True)
        text = "".join(stream)
        assert text == _expected_reply_text(llm.tokenizer, ids[:-cut], words)
        assert text == "\ufffd" * (3 - cut) + " and more", text


def test_stream_after_a_context_cut_inside_a_character_sentencepiece_kind(sp_kind_tokenizer):
    tok, _ = sp_kind_tokenizer
    _assert_stream_after_a_cut_character(tok, seed=6)


def test_generate_from_ids_cut_inside_a_character_returns_its_text(bpe):
    """generate(ids) with ids ending inside a character (continuing a reply cut by max_new_tokens
    mid-emoji) returned "" for every token it generated, alone and in a batch."""
    llm, _ = bpe
    ids = llm.tokenize("Emoji 😀🎉 and more", add_special_tokens=False)
    cuts = [k for k in range(1, len(ids)) if llm.detokenize(ids[:k]).endswith("\ufffd")]
    assert cuts
    for k in cuts:
        stream = llm.generate(ids[:k], max_new_tokens=8, stream=True, stop_token_ids=[], logit_bias={
            i: 50.0 for i in ids[k:k + 1]})  # the first token completes the character
        text = "".join(stream)
        generated = [t.id for t in stream.tokens]
        before = llm.detokenize(ids[:k][-4:]).rstrip("\ufffd")
        assert text and text == llm.detokenize(ids[:k][-4:] + generated)[len(before):], (k, generated)
        assert llm.generate([ids[:k]], max_new_tokens=8, stop_token_ids=[], logit_bias={
            i: 50.0 for i in ids[k:k + 1]}) == [text]


def test_stream_equals_decode_on_random_ids_byte_level_bpe(bpe):
    llm, _ = bpe
    _assert_stream_equals_decode(llm.tokenizer, seed=1)


@pytest.mark.parametrize("case", ["llama", "llama2_tokenizer_json"])
def test_stream_equals_decode_on_random_ids_sentencepiece_byte_fallback(sp_models, case):
    llm, _ = sp_models[case]
    tok = llm.tokenizer
    _assert_stream_equals_decode(tok, seed=2)
    # the reported fault: a newline byte, a lead byte that never completes, then words
    ids = [tok.token_to_id("<0x0A>"), tok.token_to_id("<0xE5>")] + tok.encode(" the end", add_special_tokens=False)
    assert "".join(_stream(tok, [], ids)) == tok.decode(ids)
    assert tok.decode(ids).endswith("\ufffd the end")  # tokenizers' ByteFallback: one U+FFFD per byte of a bad run


def test_stream_equals_decode_on_random_ids_sentencepiece_kind(sp_kind_tokenizer):
    tok, _ = sp_kind_tokenizer
    _assert_stream_equals_decode(tok, seed=3)


def test_every_eos_id_of_generation_config_ends_generation(tiny_llama, tmp_path):
    """generation_config.json's eos_token_id list (Llama 3: end of text, end of turn, end of message)
    joins the tokenizer's EOS: each one ends generation."""
    d = _copy_model(tiny_llama, str(tmp_path / "multi_eos"))
    hf = _load_hf(d)
    ends = [hf.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|im_start|>")]
    path = os.path.join(d, "generation_config.json")
    config = json.load(open(path)) if os.path.exists(path) else {}
    config["eos_token_id"] = ends[1:]
    with open(path, "w") as f:
        json.dump(config, f)
    with pyllm.LLM(_convert(d, str(tmp_path), "multi_eos"), n_threads=1) as llm:
        assert sorted(llm.tokenizer.eos_ids) == sorted(ends)
        for end in ends:
            llm.generate("Paris", max_new_tokens=5, logit_bias={end: 100.0})
            assert llm.last_stats.finish_reason == "stop" and llm.last_stats.generated_tokens == 1


@pytest.mark.parametrize("case", ["llama", "llama2_tokenizer_json"])
def test_sampled_replies_stream_all_their_text_with_byte_fallback(sp_models, case):
    """The reported fault: sampled replies of a tiny Llama with a byte-fallback tokenizer lost text
    when streamed. Every reply's pieces now join to decode() of its ids."""
    llm, _ = sp_models[case]
    context = llm.tokenize("中文 Paris\n")[-4:]
    for seed in range(10):
        stream = llm.generate("中文 Paris\n", max_new_tokens=24, temperature=1.0, seed=seed, stream=True)
        text = "".join(stream)
        ids = [t.id for t in stream.tokens]
        before, full = llm.detokenize(context), llm.detokenize(context + ids)
        assert full.startswith(before) and text == full[len(before):], seed


# -- many special tokens ----------------------------------------------------------------------------

def _many_specials_tokenizer(specials):
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<unk>"] + [chr(c) for c in range(32, 127)])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    spec = TokenizerSpec(kind="hf", bos_token="<s>", eos_token="</s>", bos_token_id=hf.token_to_id("<s>"),
                         eos_token_ids=[hf.token_to_id("</s>")])
    return Tokenizer(spec, hf.to_str().encode("utf-8"))


def test_thousands_of_special_tokens_are_found_in_a_long_text_in_one_pass():
    """A model with thousands of special tokens (Gemma 3 has 6,000 <unusedN>): finding those written
    in a 1 MB chat message took `t in text` for each (8 s), and splitting the prompt at them one
    regex alternation of all of them, which Python's re tries branch by branch at every position
    (20 s), both holding the GIL, so a server's event loop stood still. Both are one pass now."""
    import time

    tok = _many_specials_tokenizer(["<s>", "</s>"] + [f"<unused{i}>" for i in range(6000)])
    text = "<s>" + "<unused1" * 130000 + "<unused17>"  # every place a near miss
    start = time.monotonic()
    assert tok.special_tokens_in([text]) == {"<s>", "<unused17>"}
    assert tok.encode_with_literal(text, {})[0] == tok.token_to_id("<s>")
    assert tok.encode_with_literal(text, {})[-1] == tok.token_to_id("<unused17>")
    assert time.monotonic() - start < 5  # 50 s before; well under a second now


@pytest.mark.parametrize("seed", range(6))
def test_special_tokens_found_and_split_as_by_each_string(seed):
    """The one-pass search (a trie of the special tokens as one regular expression) finds exactly the
    tokens `t in text` finds, and splits text where the longest-first alternation of them splits it,
    for tokens that are prefixes of one another, hold regex characters, or nest past its depth bound."""
    import random

    from pyllm.tokenizer import _alternation

    rng = random.Random(seed)
    alphabet = "ab<|>.*(\\é😀"
    specials = sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(40)})
    specials += ["a" * k for k in range(1, 45)] + ["<s>", "</s>"]  # a chain deeper than MAX_ALTERNATION_DEPTH
    tok = _many_specials_tokenizer(specials)
    naive = re.compile("(" + "|".join(re.escape(t) for t in sorted(set(specials), key=len, reverse=True)) + ")")
    assert re.compile(f"({_alternation(specials)})").split("a" * 50 + "b") == naive.split("a" * 50 + "b")
    for _ in range(200):
        text = "".join(rng.choice(alphabet + "xyz ") for _ in range(rng.randint(0, 60)))
        assert tok.special_tokens_in([text, "zz"]) == {t for t in specials if t in text}, text
        assert re.compile(f"({_alternation(specials)})").split(text) == naive.split(text), text


# -- normalizers and decoders that lengthen text ----------------------------------------------------

@pytest.mark.parametrize("step", ["normalizer", "decoder", "sequence", "regex"])
def test_a_normalizer_or_decoder_that_lengthens_text_without_bound_is_refused(step):
    """A tokenizer.json Replace of "a" by 10,000 characters made a 20,000-character prompt 3 GB inside
    the tokenizers library, whose failed allocation aborts the process (a server with it); as a
    decoder, 100,000 generated ids decoded to 1 GB of text. Steps each within bounds multiply in a
    Sequence. Such a tokenizer is refused when read, naming limits.MAX_TOKENIZER_GROWTH."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers

    from pyllm.limits import MAX_TOKENIZER_GROWTH

    hf = HFTokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    if step == "normalizer":
        hf.normalizer = normalizers.Replace("a", "b" * 10000)
    elif step == "decoder":
        hf.decoder = decoders.Replace("b", "c" * 10000)
    elif step == "sequence":
        hf.normalizer = normalizers.Sequence([normalizers.Replace("a", "a" * 20)] * 5)
    else:  # a regex that may match nothing puts its content before every character
        hf.normalizer = normalizers.Replace(Regex("x*"), "b" * 100)
    where = "decoder" if step == "decoder" else "normalizer"
    with pytest.raises(FormatError, match=f"^the tokenizer.json {where} can make a text .* times longer .*"
                                          f"limits.MAX_TOKENIZER_GROWTH \\({MAX_TOKENIZER_GROWTH} times"):
        Tokenizer(TokenizerSpec(kind="hf"), hf.to_str().encode("utf-8"))


def test_a_case_insensitive_replace_counts_case_folding_in_its_growth(monkeypatch):
    """A Replace of "(?i)ffi" counted 3 characters a match, but Oniguruma's case folding also matches the
    one character U+FB03 ("ﬃ"): three such steps of 12 characters each were taken for 64 times longer,
    and made a text 1728 times longer (a 10,000-character prompt: an allocation of 830 MB that failed
    and aborted the process). A pattern that ignores case counts its shortest match divided by 3; and
    the check runs before the tokenizer encodes anything (it used to encode a probe "a" first)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, normalizers

    from pyllm.tokenizer import _shortest_match

    assert [_shortest_match(r) for r in ("(?i)ffi", "(?i:ab)c", "(?mi)abcd", "ffi", "(?-i:ab)", "x*")] == [1, 1, 2, 3, 2, 0]
    hf = HFTokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([normalizers.Replace(Regex("(?i)ffi"), "\ufb03" * 12)] * 3)
    assert len(hf.normalizer.normalize_str("\ufb03" * 10)) == 10 * 12 ** 3  # what the check must foresee
    blob = hf.to_str().encode("utf-8")
    encoded = []
    monkeypatch.setattr("pyllm.tokenizer.hf_tokenizer", lambda text: _Spy(HFTokenizer.from_str(text), encoded))
    with pytest.raises(FormatError, match=r"^the tokenizer.json normalizer can make a text 1728 times longer"):
        Tokenizer(TokenizerSpec(kind="hf"), blob)
    assert not encoded


class _Spy:
    """A tokenizers.Tokenizer whose encode calls are recorded."""

    def __init__(self, tok, calls: list):
        self._tok, self._calls = tok, calls

    def encode(self, *args, **kwargs):
        self._calls.append(args)
        return self._tok.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_the_normalizers_of_real_tokenizers_are_within_the_growth_bound(sp_model_bytes):
    """Unicode's normal forms, sentencepiece normalization maps (nmt_nfkc: 18 characters for one at
    most) and the steps the converter builds for a tokenizer.model all load."""
    import base64

    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers

    from pyllm.tokenizer import _charsmap_growth

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TRAINING_TEXT * 20), model_writer=buf, model_type="bpe",
                                   vocab_size=300, normalization_rule_name="nmt_nfkc", minloglevel=2)
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    charsmap = proto.normalizer_spec.precompiled_charsmap
    assert _charsmap_growth(charsmap) == _charsmap_growth(base64.b64encode(charsmap).decode()) == 18
    hf = HFTokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([  # the converter's imitation of sentencepiece, legacy
        normalizers.Precompiled(charsmap), normalizers.Replace(Regex(r"\A +| +\z"), ""),
        normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(" ", "▁"), normalizers.Replace(Regex(r"\A▁"), "▁▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    Tokenizer(TokenizerSpec(kind="hf"), hf.to_str().encode("utf-8"))
    for normalizer in (normalizers.NFKC(), normalizers.BertNormalizer(), normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])):
        hf.normalizer = normalizer
        Tokenizer(TokenizerSpec(kind="hf"), hf.to_str().encode("utf-8"))


@pytest.mark.parametrize("case", ["empty", "gap", "in the vocabulary"])
def test_added_tokens_the_library_numbers_otherwise_are_refused(case):
    """The tokenizers library numbers added tokens after the vocabulary in its own order and drops an
    empty one: "<a>" written with id 4 after an empty token of id 3 got id 3, and a token of id 5000
    after three others id 3, in silence (the model's embedding of the file's id belongs to it)."""
    from tokenizers import Tokenizer as HFTokenizer, models

    hf = HFTokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    config = json.loads(hf.to_str())

    def added(i, content, special=True):
        return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": special}
    config["added_tokens"] = {"empty": [added(3, ""), added(4, "<a>")], "gap": [added(5000, "<a>")],
                              "in the vocabulary": [added(3, "a")]}[case]
    with pytest.raises(FormatError, match=r"tokenizer.json added_tokens\[0\] \(.*\) has id \d+, but the tokenizers "
                                          r"library gives it (no id|id \d)"):
        Tokenizer(TokenizerSpec(kind="hf"), json.dumps(config).encode("utf-8"))
    config["added_tokens"] = [added(3, "<a>"), added(4, "<a><b>", special=False)]  # numbered as written: loads
    tok = Tokenizer(TokenizerSpec(kind="hf"), json.dumps(config).encode("utf-8"))
    assert tok.encode("a<a><b><a>") == [1, 4, 3]


def test_ids_a_post_processor_adds_count_in_the_vocabulary_size():
    """A TemplateProcessing post-processor writes the ids it adds itself: one adding id 1,000,000 to a
    3-token vocabulary was read as a 3-token tokenizer, fitted a small model's embeddings at load, then
    failed every generate() with "token ids must lie in [0, 3)"; its ids count now, so the model's
    embedding size refuses it when the model is loaded or converted."""
    from tokenizers import Tokenizer as HFTokenizer, models, processors

    hf = HFTokenizer(models.WordLevel({"<unk>": 0, "a": 1, "<s>": 2}, unk_token="<unk>"))
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1_000_000)])
    tok = Tokenizer(TokenizerSpec(kind="hf"), hf.to_str().encode("utf-8"))
    assert tok.encode("a") == [1_000_000, 1] and tok.vocab_size == 1_000_001


def _assert_other_threads_run_during(work):
    """Runs work() while a thread ticks every 10 ms, and checks the ticks went on (work that held the
    GIL left 1 or 2 ticks in 1.5 s); skips where the work took under 0.2 s (no backtracking here)."""
    import threading
    import time

    ticks, done = [0], threading.Event()

    def tick():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.01)
    ticker = threading.Thread(target=tick)
    ticker.start()
    start = time.monotonic()
    try:
        work()
    finally:
        done.set()
        ticker.join()
    took = time.monotonic() - start
    if took < 0.2:
        pytest.skip("this machine's Oniguruma does not backtrack here")
    assert ticks[0] >= took / 0.01 / 10


def test_a_backtracking_split_regex_leaves_other_threads_running():
    """A tokenizer.json Split regex that backtracks ((?:a*){3}[^a ], polynomial on each word, under
    Oniguruma's step limit) took seconds on a 4,000-character text; texts under 4,096 characters were
    encoded holding the GIL, so every other thread (a server's event loop) stood still meanwhile. The
    work is counted: a thread ticking every 10 ms ticks on while the text is encoded."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers

    hf = HFTokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("(?:a*){3}[^a ]"), "isolated")
    tok = Tokenizer(TokenizerSpec(kind="hf"), hf.to_str().encode("utf-8"))
    text = ("a" * 60 + " ") * 63
    _assert_other_threads_run_during(lambda: tok.encode(text))


def test_a_backtracking_decoder_regex_leaves_other_threads_running():
    """The same for decoding: a decoder's Replace regex runs over each token's text, and decode held
    the GIL for the seconds a backtracking one took on a long token (a /detokenize request names it)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models

    long_token = ("a" * 60 + " ") * 63
    hf = HFTokenizer(models.WordLevel({"<unk>": 0, "a": 1, long_token: 2}, unk_token="<unk>"))
    hf.decoder = decoders.Replace(Regex("(?:a*){3}[^a ]"), "")
    tok = Tokenizer(TokenizerSpec(kind="hf"), hf.to_str().encode("utf-8"))

    def decode():
        assert tok.decode([2]) == long_token
    _assert_other_threads_run_during(decode)
