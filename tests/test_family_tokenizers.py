"""Tokenizers of the model families pyllm converts: pyllm's ids and decoded text equal transformers'.

Model hubs are unreachable from the test machines, so each family's tokenizer is rebuilt here the way
its published tokenizer.json is structured (normalizer, pre-tokenizer, model options, decoder and
post-processor of that family), with a small vocabulary trained on the tests' text, beside the
family's tokenizer_config.json (tokenizer_class, special tokens, add_bos_token...) and a config.json
whose model_type decides, as in transformers, which tokenizer class loads the directory:

| stand-in | published original | transformers 5 loads it as |
|---|---|---|
| qwen2 | Qwen/Qwen2.5-*-Instruct: NFC, regex Split + ByteLevel(use_regex=false), ByteLevel post-processor | Qwen2Tokenizer (rebuilt from vocab and merges) |
| qwen3 | Qwen/Qwen3-*: same pipeline, <think> tokens, model_type qwen3 | Qwen2Tokenizer |
| gpt2 | openai-community/gpt2: ByteLevel pre-tokenizer, no tokenizer_class in the config | GPT2Tokenizer (rebuilt) |
| bloom | bigscience/bloom-*: regex Split + ByteLevel(use_regex=false), BloomTokenizerFast | TokenizersBackend (file as written) |
| gemma | google/gemma-3-*-it: SentencePiece-style BPE, spaces replaced by "▁" without a prefix, byte fallback, <bos> template | GemmaTokenizer (rebuilt) |
| llama2 | meta-llama/Llama-2-*-hf tokenizer.json: Prepend("▁") + Replace normalizer, byte fallback, <s> template | LlamaTokenizer (rebuilt) |
| glm4 | zai-org/GLM-4-9B-0414 / glm-4-9b-chat-hf: tiktoken-style regex Split + ByteLevel, PreTrainedTokenizerFast; a post-processor adding the two-token [gMASK]<sop> prefix that glm-4-9b-chat's own tokenizer prepends (pyllm must not reduce special tokens to one BOS) | TokenizersBackend |
| phi3 | microsoft/Phi-3-mini-4k-instruct: Llama-2's tokenizer.json, LlamaTokenizer declared | TokenizersBackend (phi3's hub class is overridden) |

Each directory is also converted to a .pllm file and read back through pyllm.LLM's tokenizer.
"""

from __future__ import annotations

import json
import os

import pytest

from pyllm.convert.checkpoint import read_tokenizer
from pyllm.tokenizer import StreamDecoder, Tokenizer

from conftest import TRAINING_TEXT

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. Paris is the capital of France!",
    "chinese": "今天天气很好，我们去公园散步。大语言模型的指令微调需要高质量的数据。",
    "emoji": "Emoji 😀🎉 thumbs 👍🏽 family 👨‍👩‍👧‍👦 done",
    "unseen": "Ωμέγα ק 🦙 ∑ ☃ ﬁ Å",  # never in the training text: byte fallback / byte-level
    "code": "def main():\n\tif x:\n\t\treturn 1\n    else:\n        print('hello, world')\n\n# end\n",
    "whitespace_runs": "a  b   c    d\t\t e \n\n\n f     ",
    "leading_spaces": "   three leading spaces",
    "one_space": " ",
    "empty": "",
    "digits": "1234567 + 89 = 1234656, 3.14159",
    "contractions": "I'm sure you'll see they've done it, haven't they? DON'T",
    "nfc": "Cafe\u0301 vs Café, A\u030a vs Å",  # decomposed accents: NFC normalizers compose them
    "mixed": "Café naïve résumé — 中文 and 😀 in one line.",
}

# Qwen2's pre-tokenizer regex (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX, the tokenizer.json's)
QWEN2_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# GLM-4's (tiktoken cl100k-style, digits in runs of up to three)
GLM4_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# BLOOM's
BLOOM_REGEX = " ?[^(\\s|[.,!?…。，、।۔،])]+"


def _train(tok, vocab_size: int, alphabet: list[str] | None = None, limit_alphabet: int | None = None):
    """tok's BPE model trained on the tests' text (tok holds its family's normalizer and pre-tokenizer)."""
    options = {"limit_alphabet": limit_alphabet} if limit_alphabet else {}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet or [], show_progress=False,
                                  **options)
    tok.train_from_iterator(TRAINING_TEXT * 20, trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _write(directory, tok, tok_config: dict, model_type: str, chat_template: str | None = None):
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    if chat_template:
        tok_config = dict(tok_config, chat_template=chat_template)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_config, f, ensure_ascii=False, indent=2)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_type": model_type}, f)
    return directory


def _decoder_entries(tok) -> dict:
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


# -- byte-level families ------------------------------------------------------------------------

def _byte_level_tok(split_regex: str | None, normalizer=None, trim_offsets=True):
    tok = tokenizers.Tokenizer(models.BPE())
    steps = []
    if split_regex is not None:
        steps.append(pre_tokenizers.Split(Regex(split_regex), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=trim_offsets,
                                          use_regex=split_regex is None))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    if normalizer is not None:
        tok.normalizer = normalizer
    vocab, merges = _train(tok, 500, alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.model = models.BPE(vocab=vocab, merges=merges, ignore_merges=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def make_qwen2(directory, model_type="qwen2"):
    tok = _byte_level_tok(QWEN2_REGEX, normalizers.NFC(), trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|vision_pad|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    plain = ["<tool_call>", "</tool_call>"] + (["<think>", "</think>"] if model_type == "qwen3" else [])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    config = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": _decoder_entries(tok),
              "additional_special_tokens": specials[1:], "bos_token": None, "clean_up_tokenization_spaces": False,
              "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
              "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
              "unk_token": None}
    return _write(directory, tok, config, model_type)


def make_gpt2(directory):
    tok = _byte_level_tok(None)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=True)])
    # openai-community/gpt2's tokenizer_config.json names no class: config.json's model_type decides
    return _write(directory, tok, {"model_max_length": 1024}, "gpt2")


def make_bloom(directory):
    tok = tokenizers.Tokenizer(models.BPE())
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(BLOOM_REGEX), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT * 20, trainer)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=False)
    config = {"add_prefix_space": False, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
              "unk_token": "<unk>", "padding_side": "left", "tokenizer_class": "BloomTokenizerFast"}
    return _write(directory, tok, config, "bloom")


def make_glm4(directory):
    tok = _byte_level_tok(GLM4_REGEX)
    specials = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    gmask, sop = tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="[gMASK]:0 <sop>:0 $A:0", pair="[gMASK]:0 <sop>:0 $A:0 $B:1",
                                      special_tokens=[("[gMASK]", gmask), ("<sop>", sop)])])
    config = {"added_tokens_decoder": _decoder_entries(tok), "clean_up_tokenization_spaces": False,
              "do_lower_case": False, "eos_token": "<|endoftext|>", "extra_special_tokens": {},
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 128000,
              "pad_token": "<|endoftext|>", "padding_side": "left", "remove_space": False,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    return _write(directory, tok, config, "glm4")


# -- SentencePiece-style families (tokenizer.json with byte fallback) -------------------------------

BYTES = [f"<0x{b:02X}>" for b in range(256)]


def _spm_style_tok(specials: list[str], normalizer, pre_tokenizer, decoder_steps, bos: str):
    """A BPE over "▁"-escaped text with byte fallback, laid out like a sentencepiece export: the
    special tokens first, then the 256 byte pieces, then the learned pieces."""
    trainer_tok = tokenizers.Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    learned, merges = _train(trainer_tok, 420, limit_alphabet=120)
    vocab = {t: i for i, t in enumerate(specials + BYTES)}
    for token in sorted(learned, key=learned.get):
        vocab.setdefault(token, len(vocab))
    merges = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=specials[specials.index("<unk>")],
                                          fuse_unk=True, byte_fallback=True, ignore_merges=False))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Sequence(decoder_steps)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                       special_tokens=[(bos, vocab[bos])])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def make_gemma(directory):
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    tok = _spm_style_tok(specials, normalizers.Replace(" ", "▁"),
                         pre_tokenizers.Split(" ", behavior="merged_with_previous"),
                         [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()], "<bos>")
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": _decoder_entries(tok),
              "bos_token": "<bos>", "clean_up_tokenization_spaces": False, "eos_token": "<eos>",
              "extra_special_tokens": {"boi_token": "<start_of_turn>"}, "pad_token": "<pad>",
              "padding_side": "left", "spaces_between_special_tokens": False, "tokenizer_class": "GemmaTokenizer",
              "unk_token": "<unk>", "use_default_system_prompt": False}
    return _write(directory, tok, config, "gemma3_text")


def _llama2_tok(extra_specials=()):
    specials = ["<unk>", "<s>", "</s>", *extra_specials]
    return _spm_style_tok(specials, normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
                          None, [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                 decoders.Strip(content=" ", left=1, right=0)], "<s>")


def make_llama2(directory):
    tok = _llama2_tok()
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": _decoder_entries(tok),
              "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
              "model_max_length": 1000000000000000019884624838656, "pad_token": None, "padding_side": "right",
              "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
              "use_default_system_prompt": False}
    return _write(directory, tok, config, "llama")


def make_phi3(directory):
    tok = _llama2_tok(["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"])
    config = {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": _decoder_entries(tok),
              "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
              "legacy": False, "model_max_length": 4096, "pad_token": "<|endoftext|>", "padding_side": "left",
              "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
              "use_default_system_prompt": False}
    return _write(directory, tok, config, "phi3")


def make_gemma_spm_only(directory):
    """A Gemma directory with only tokenizer.model (older exports): a byte-fallback BPE sentencepiece
    model without a dummy prefix, as Gemma's is; GemmaTokenizer builds its backend from the pieces."""
    import io

    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 20), model_writer=buf, model_type="bpe", vocab_size=420,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>", "tokenizer_class": "GemmaTokenizer"}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_type": "gemma2"}, f)
    return directory


def make_qwen2_with_gpt2_file(directory):
    """A Qwen2 directory whose tokenizer.json carries GPT-2's pipeline (no NFC, GPT-2's regex, which keeps
    digit runs together): Qwen2Tokenizer ignores the file's pipeline and uses its own."""
    make_gpt2(directory)
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(tokenizer_class="Qwen2Tokenizer", eos_token="<|endoftext|>", bos_token=None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_type": "qwen2"}, f)
    return directory


def make_gpt2_prefix_space_file(directory):
    """A GPT-2 tokenizer.json whose ByteLevel adds a prefix space: GPT2Tokenizer rebuilds it from the
    config's add_prefix_space (false by default)."""
    make_gpt2(directory)
    path = os.path.join(directory, "tokenizer.json")
    tok = tokenizers.Tokenizer.from_file(path)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.save(path)
    return directory


FAMILIES = {
    "qwen2": (make_qwen2, "Qwen2Tokenizer"),
    "qwen3": (lambda d: make_qwen2(d, "qwen3"), "Qwen2Tokenizer"),
    "gpt2": (make_gpt2, "GPT2Tokenizer"),
    "bloom": (make_bloom, "TokenizersBackend"),
    "gemma": (make_gemma, "GemmaTokenizer"),
    "llama2": (make_llama2, "LlamaTokenizer"),
    "glm4": (make_glm4, "TokenizersBackend"),
    "phi3": (make_phi3, "TokenizersBackend"),
    # files whose pipeline differs from the class's: transformers keeps only the vocabulary, merges and
    # post-processor
    "qwen2_gpt2_file": (make_qwen2_with_gpt2_file, "Qwen2Tokenizer"),
    "gpt2_prefix_space_file": (make_gpt2_prefix_space_file, "GPT2Tokenizer"),
    "gemma_spm_only": (make_gemma_spm_only, "GemmaTokenizer"),
}
# special tokens written in the text (each family's chat markers)
SPECIAL_TEXT = {
    "qwen2": "<|im_start|>user\nhi 你好<|im_end|>\n<|im_start|>assistant\n<tool_call>x</tool_call>",
    "qwen3": "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nok<|im_end|><|endoftext|>",
    "gpt2": "one<|endoftext|>two <|endoftext|> three",
    "bloom": "<s>hi</s> there <pad>",
    "gemma": "<bos><start_of_turn>user\nhi 你好<end_of_turn>\n<start_of_turn>model\n",
    "llama2": "<s>[INST] hi [/INST] ok </s><s>[INST] again",
    "glm4": "[gMASK]<sop><|system|>\nbe brief<|user|>\nhi 你好<|assistant|>",
    "phi3": "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n",
    "qwen2_gpt2_file": "one<|endoftext|>two <|endoftext|> 12345",
    "gpt2_prefix_space_file": "one<|endoftext|>two <|endoftext|> three",
    "gemma_spm_only": "<bos><start_of_turn>user\nhi 你好<end_of_turn>\n<start_of_turn>model\n",
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    directory = FAMILIES[name][0](str(tmp_path_factory.mktemp(f"tok_{name}")))
    spec, blob = read_tokenizer(directory)
    return name, Tokenizer(spec, blob), transformers.AutoTokenizer.from_pretrained(directory)


def test_transformers_loads_the_class_the_family_uses(family):
    """The premise: each stand-in goes through the tokenizer class its published original goes through."""
    name, _, hf = family
    assert type(hf).__name__ == FAMILIES[name][1]


def test_ids_and_decoding_equal_transformers(family):
    name, tok, hf = family
    texts = dict(TEXTS, special=SPECIAL_TEXT[name])
    for key, text in texts.items():
        for add in (True, False):
            assert tok.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add), (key, add)
        ids = hf.encode(text)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (key, skip)
    # the special tokens map to single ids, and BOS/EOS are transformers'
    assert tok.bos_id == hf.bos_token_id
    assert (tok.eos_ids[:1] or [None])[0] == hf.eos_token_id


def test_unseen_characters_are_encoded_losslessly(family):
    """Byte-level BPE and byte fallback both keep characters outside the vocabulary."""
    _, tok, hf = family
    text = TEXTS["unseen"]
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids)
    assert tok.decode(ids).strip() == text.strip()


def test_streamed_decoding_equals_the_whole_decoding(family):
    _, tok, _ = family
    context = tok.encode("Paris is the capital of France.", add_special_tokens=False)[-4:]
    for key in ("chinese", "emoji", "unseen", "mixed"):
        ids = tok.encode(TEXTS[key], add_special_tokens=False)
        decoder = StreamDecoder(tok, context)
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert all("\ufffd" not in p for p in pieces), key
        assert "".join(pieces) == tok.decode(context + ids)[len(tok.decode(context)):], key


def test_converted_model_carries_the_same_tokenizer(tmp_path):
    """Through a .pllm file: a tiny Qwen2 model with the Qwen2.5-style tokenizer converts, and the
    engine's tokenizer gives transformers' ids."""
    import pyllm
    from pyllm.convert import convert_checkpoint

    from families import make_tiny_model

    directory = make_tiny_model("qwen2", "gqa", str(tmp_path / "model"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(directory, name))
    make_qwen2(str(tmp_path / "tok"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.replace(str(tmp_path / "tok" / name), os.path.join(directory, name))
    out = str(tmp_path / "m.pllm")
    convert_checkpoint(directory, out, quant="f32", progress=False)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert type(hf).__name__ == "Qwen2Tokenizer"
    with pyllm.LLM(out, n_threads=1) as llm:
        for key, text in dict(TEXTS, special=SPECIAL_TEXT["qwen2"]).items():
            assert llm.tokenize(text) == hf.encode(text), key


def test_spec_adds_bos_and_eos_when_the_post_processor_adds_nothing(tmp_path):
    """GGUF sources embed a tokenizer whose post-processor adds no token (ByteLevel) and say in the
    spec whether BOS/EOS are added (tokenizer.ggml.add_bos_token): the spec decides then."""
    from pyllm.formats.packed import TokenizerSpec

    directory = make_gpt2(str(tmp_path / "gpt2"))
    with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as f:
        blob = f.read().encode("utf-8")
    end = tokenizers.Tokenizer.from_str(blob.decode()).token_to_id("<|endoftext|>")
    plain = Tokenizer(TokenizerSpec(kind="hf"), blob).encode("hello world")
    for bos, eos in ((True, False), (False, True), (True, True)):
        spec = TokenizerSpec(kind="hf", bos_token="<|endoftext|>", eos_token="<|endoftext|>", bos_token_id=end,
                             eos_token_ids=[end], add_bos_token=bos, add_eos_token=eos)
        ids = Tokenizer(spec, blob).encode("hello world")
        assert ids == [end] * bos + plain + [end] * eos
        assert Tokenizer(spec, blob).encode("hello world", add_special_tokens=False) == plain


def test_broken_tokenizer_json_is_a_clear_error(tmp_path):
    from pyllm.formats.safetensors import FormatError

    directory = make_qwen2(str(tmp_path / "qwen2"))
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write('{"model": {"type": "BPE", "vocab": {')
    with pytest.raises(FormatError, match="tokenizer.json: invalid JSON"):
        read_tokenizer(directory)


# each family's published chat template (tests/data/chat_templates)
FAMILY_TEMPLATES = {"qwen2": "qwen2.5-7b-instruct", "qwen3": "qwen3-0.6b", "gemma": "gemma-2-2b-it",
                    "gemma_spm_only": "gemma-3-it", "llama2": "llama-2-chat", "glm4": "glm-4-9b-chat",
                    "phi3": "phi-3.5-mini-instruct"}
CHATS = {
    "one turn, no system": [{"role": "user", "content": "Hello! 你好 😀"}],
    "system, multi-turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": " 茶 (chá) "}, {"role": "user", "content": "  And coffee?\n"}],
    "multi-turn, no system": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                              {"role": "user", "content": "Again"}],
}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object", "properties": {
                                                    "city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.parametrize("chat", list(CHATS) + ["tools"])
def test_chat_prompt_ids_equal_transformers_apply_chat_template(family, chat):
    """pyllm's token ids of a rendered chat (LLM.chat_prompt_ids: the template rendered, its text
    tokenized, BOS added as the tokenizer adds it) equal transformers' apply_chat_template(tokenize=True)
    for each family's tokenizer and published template: one turn without a system message, several
    with and without one, and tools where the template takes them (only the string tests of chat
    templates compared renderings, and token parity was checked for one ChatML tokenizer)."""
    import functools
    import types

    from pyllm import LLM

    name, tok, hf = family
    if name not in FAMILY_TEMPLATES:
        pytest.skip("no published chat template for this family")
    with open(os.path.join(os.path.dirname(__file__), "data", "chat_templates", FAMILY_TEMPLATES[name] + ".jinja"),
              encoding="utf-8") as f:
        template = f.read()
    if chat == "tools" and "tools" not in template:
        pytest.skip("the template takes no tools")
    messages = CHATS["system, multi-turn" if chat == "tools" else chat]
    tools = CHAT_TOOLS if chat == "tools" else None
    llm = types.SimpleNamespace(tokenizer=tok, chat_template=template, chat_template_fault=None,
                                chat_template_origin=f"the {family} template", context_length=4096)
    llm.apply_chat_template = functools.partial(LLM.apply_chat_template, llm)
    llm._render = functools.partial(LLM._render, llm)
    llm._check_prompt_chars = functools.partial(LLM._check_prompt_chars, llm)
    try:
        expected = hf.apply_chat_template(messages, chat_template=template, tools=tools, add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
    except Exception as e:  # a template refusing these messages (roles that must alternate): pyllm refuses too
        with pytest.raises(Exception):
            LLM.chat_prompt_ids(llm, messages, tools=tools)
        pytest.skip(f"the template refuses these messages ({type(e).__name__})")
    if tok.spec.add_bos_token and expected[:1] != [tok.bos_id]:
        # a template that writes no BOS (Phi-3.5's) where the tokenizer adds one: pyllm adds it, as llama.cpp
        # does; transformers' apply_chat_template adds no special tokens
        expected = [tok.bos_id] + expected
    assert LLM.chat_prompt_ids(llm, messages, tools=tools) == expected


@pytest.mark.parametrize("make", ["gemma_spm_only", "bpe_tokenizer_json"])
def test_added_tokens_json_is_read_as_transformers_reads_it(tmp_path, make):
    """added_tokens.json (a slow tokenizer's token -> id file: a LLaMA fine-tune's "<pad>" beside
    tokenizer.model) with no added_tokens_decoder in tokenizer_config.json: transformers 5 adds its
    tokens (special when named as special tokens, else normalized); pyllm ignored the file, so the
    token was split into pieces and its id never produced."""
    from conftest import train_bpe_tokenizer
    from pyllm.formats.safetensors import FormatError

    directory = str(tmp_path / make)
    if make == "gemma_spm_only":
        make_gemma_spm_only(directory)
        size, special = 420, "<mask>"
    else:
        train_bpe_tokenizer(directory)
        size, special = 400, "<sp_a>"
    path = os.path.join(directory, "tokenizer_config.json")
    config = json.load(open(path))
    assert "added_tokens_decoder" not in config
    config["additional_special_tokens"] = [special]
    json.dump(config, open(path, "w"))
    with open(os.path.join(directory, "added_tokens.json"), "w") as f:
        json.dump({"<pad_2>": size, special: size + 1}, f)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    tok = Tokenizer(*read_tokenizer(directory))
    for text in (f"hi <pad_2> there{special}x", "<pad_2><pad_2> café", TEXTS["unseen"]):
        ids = hf.encode(text)
        assert size in ids or "<pad_2>" not in text
        assert tok.encode(text) == ids, text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    with open(os.path.join(directory, "added_tokens.json"), "w") as f:
        json.dump({"<pad_2>": "400"}, f)
    with pytest.raises(FormatError, match=r"added_tokens\.json: each entry must map a token to its id, got '<pad_2>'"):
        read_tokenizer(directory)
