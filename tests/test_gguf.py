"""GGUF import: a tiny Llama written as GGUF the way llama.cpp's converter writes it (q/k rows permuted,
Q8_0 / Q4_0 / Q4_1 / F16 / F32 tensors, a byte-level BPE vocabulary), converted by pyllm and compared
with transformers running the same (dequantized) weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import pyllm  # noqa: E402
from pyllm.convert import convert_checkpoint  # noqa: E402
from pyllm.formats.safetensors import FormatError  # noqa: E402

from conftest import make_tiny_llama, nmse  # noqa: E402

Q = gguf.GGMLQuantizationType


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (for its interleaved RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"


def write_gguf(hf_dir: str, path: str, matrix_type, embed_type=Q.Q8_0, eos="<|im_end|>", eot=None,
               eom=None, pre: str = "default", vocabulary=None) -> dict[str, np.ndarray]:
    """Writes hf_dir's model as GGUF; returns the HF-named f32 weights the GGUF actually holds.
    eos/eot/eom: the special tokens written as end of text, end of turn and end of message; pre: the
    byte-level BPE's pre-tokenizer name; vocabulary(writer): writes another tokenizer instead."""
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_vocab_size(cfg["vocab_size"])
    if vocabulary is not None:
        vocabulary(w)
    else:
        tok = json.load(open(os.path.join(hf_dir, "tokenizer.json")))
        vocab = tok["model"]["vocab"]
        specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
        tokens = [None] * cfg["vocab_size"]
        for t, i in {**vocab, **specials}.items():
            tokens[i] = t
        types = [3 if t in specials else 1 for t in tokens]
        tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(specials["<|im_start|>"])
        w.add_eos_token_id(specials[eos])
        if eot:
            w.add_eot_token_id(specials[eot])
        if eom:
            w.add_eom_token_id(specials[eom])
        w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")

    held = {}
    for name, tensor in model.state_dict().items():
        value = tensor.numpy().astype(np.float32)
        stored = value
        if "q_proj" in name:
            stored = permute(value, cfg["num_attention_heads"])
        elif "k_proj" in name:
            stored = permute(value, cfg["num_key_value_heads"])
        if value.ndim == 1:
            kind = Q.F32
        elif name == "model.embed_tokens.weight" or name == "lm_head.weight":
            kind = embed_type
        elif "down_proj" in name:
            kind = Q.F16  # one float matrix among the blocks
        else:
            kind = matrix_type
        if kind == Q.F32:
            data, back = stored, stored
        elif kind == Q.F16:
            data = stored.astype(np.float16)
            back = data.astype(np.float32)
        elif kind == Q.Q6_K:  # gguf-py cannot quantize to it: random blocks (super-scale 1e-3), read back
            data = random_q6_k_blocks(stored.shape, seed=len(held))
            back = gguf.quants.dequantize(data, kind).reshape(stored.shape)
        elif kind == Q.NVFP4:  # nor to this: random blocks, read back
            data = random_nvfp4_blocks(stored.shape, seed=len(held))
            back = gguf.quants.dequantize(data, kind).reshape(stored.shape)
        else:
            data = gguf.quants.quantize(stored, kind)
            back = gguf.quants.dequantize(data, kind).reshape(stored.shape)
        w.add_tensor(gguf_name(name), data, raw_dtype=kind)
        if "q_proj" in name:
            back = permute_back(back, cfg["num_attention_heads"])
        elif "k_proj" in name:
            back = permute_back(back, cfg["num_key_value_heads"])
        held[name] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def random_q6_k_blocks(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Q6_K blocks (ggml-common.h: 256 values in 210 bytes, ql[128] qh[64] scales[16] int8, d f16) of
    random codes and sub-scales under a super-scale d of 1e-3: uint8 [rows, cols / 256 * 210]."""
    rows, cols = shape
    assert cols % 256 == 0, "Q6_K rows are whole 256-value blocks"
    blocks = np.random.default_rng(seed).integers(0, 256, (rows, cols // 256, 210), dtype=np.uint8)
    blocks[..., 208:210] = np.frombuffer(np.float16(1e-3).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def random_nvfp4_blocks(shape: tuple[int, int], seed: int) -> np.ndarray:
    """NVFP4 blocks (64 values in 36 bytes: 4 unsigned e4m3 scales, one per 16 values, then 32 bytes of
    e2m1 nibbles) of random codes under scales of 2^-6..2^-3: uint8 [rows, cols / 64 * 36]."""
    rows, cols = shape
    assert cols % 64 == 0, "NVFP4 rows are whole 64-value blocks"
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, cols // 64, 36), dtype=np.uint8)
    blocks[..., :4] = (rng.integers(1, 5, (rows, cols // 64, 4)) << 3 | rng.integers(0, 8, (rows, cols // 64, 4)))
    return blocks.reshape(rows, -1)


def permute_back(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    # hidden 128 so every row is a whole number of 32-value blocks, as GGUF requires
    return make_tiny_llama(str(tmp_path_factory.mktemp("gguf_src")), seed=3, hidden_size=128, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2)


# Q5_0: its 5-bit values are int8 values at its own scale (they were re-quantized to int8 at max / 127
# scales: logits NMSE ~1e-3 where the file's own weights give ~1e-7)
# MXFP4: its e2m1 values (doubled) are int8 values at its power-of-two scale (they were stored as f16 without a word)
@pytest.mark.parametrize("matrix_type", [Q.Q4_1, Q.Q4_0, Q.Q8_0, Q.Q5_0, Q.MXFP4])
def test_gguf_import_matches_transformers_on_the_same_weights(hf_dir, tmp_path, matrix_type):
    gguf_path = str(tmp_path / "model.gguf")
    held = write_gguf(hf_dir, gguf_path, matrix_type)
    out = str(tmp_path / "model.pllm")
    report = convert_checkpoint(gguf_path, out, progress=False)
    # every Q8_0/Q4_x matrix is copied bit for bit (the F16 down projections are not block formats)
    n_layers = 2
    assert len(report.kept_exactly) == 6 * n_layers + 2  # q k v o gate up per layer, embeddings, lm_head

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in held.items()})
    ids = [int(i) for i in np.random.default_rng(5).integers(3, 400, 48)]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    llm = pyllm.LLM(out, n_threads=2)
    ours = llm.logits(ids)
    # same weights; the only difference is the activations' two-term int8 rounding (~1e-7)
    assert nmse(ours, ref) < 1e-5
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.95

    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in ["Hello world", "中文测试", "😀 emoji", "def f(x):\n    return 42", "<|im_start|>user\nhi<|im_end|>"]:
        assert llm.tokenize(text) == hf_tok.encode(text), text
    assert llm.model.chat_template.startswith("{% for m in messages %}")
    assert llm.tokenizer.eos_ids == [hf_tok.convert_tokens_to_ids("<|im_end|>")]


def test_gguf_requantized_to_another_group_size(hf_dir, tmp_path):
    gguf_path = str(tmp_path / "model.gguf")
    write_gguf(hf_dir, gguf_path, Q.Q4_1)
    out = str(tmp_path / "model-int8.pllm")
    report = convert_checkpoint(gguf_path, out, quant="int8", group_size=64, progress=False)
    # matrices change group size, so they are dequantized and requantized; the Q8_0 embeddings are
    # already what int8 models store for embeddings (int8, group 32) and stay bit for bit
    assert report.kept_exactly == ["model.embed_tokens", "lm_head"]
    assert max(report.nmse.values()) < 1e-3
    llm = pyllm.LLM(out, n_threads=2)
    assert set(fmt for fmt, _ in llm.model.linears.values()) == {"int8"}


def test_unsupported_tensor_type_is_refused(tmp_path):
    src = make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128)
    path = str(tmp_path / "odd.gguf")
    write_gguf(src, path, Q.Q8_0)
    # retag one tensor as a type no reader of ours implements (the bytes are irrelevant then): the last
    # one, whose data, fewer bytes as I8, still ends where the file does (the layout check passes)
    reader = gguf.GGUFReader(path)
    target = reader.tensors[-1]
    raw = bytearray(open(path, "rb").read())
    # the tensor info ends with: n_dims u32, dims u64 x n, type u32, offset u64
    name = target.name.encode()
    at = raw.index(len(name).to_bytes(8, "little") + name)
    type_at = at + 8 + len(name) + 4 + 8 * len(target.shape)
    assert int.from_bytes(raw[type_at:type_at + 4], "little") == target.tensor_type
    raw[type_at:type_at + 4] = int(Q.I8).to_bytes(4, "little")
    open(path, "wb").write(bytes(raw))
    with pytest.raises(FormatError, match="I8") as error:
        convert_checkpoint(path, str(tmp_path / "odd.pllm"), progress=False)
    print(error.value)
    assert not (tmp_path / "odd.pllm").exists()


@pytest.mark.parametrize("kind", [Q.Q8_K, Q.Q8_1])
def test_block_types_nothing_reads_are_refused_before_a_notice_or_a_write(tmp_path, capsys, kind):
    """Q8_K and Q8_1 (llama.cpp's activation types) were announced as "re-quantized to int8", then failed
    half-way as types "pyllm cannot read (supported: ... and the k-quants)", Q8_K being one: now refused
    when the file is opened, with the list of the types pyllm reads."""
    from gguf.constants import GGML_QUANT_SIZES

    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=256, intermediate_size=256, num_attention_heads=4,
                               num_key_value_heads=2), good, Q.Q8_0)
    block, size = GGML_QUANT_SIZES[kind]
    path = rewrite_gguf(good, str(tmp_path / "odd.gguf"),
                        tensors={"blk.0.ffn_up.weight": (np.zeros((256, 256 // block * size), np.uint8), kind)})
    capsys.readouterr()
    with pytest.raises(FormatError, match=re.escape(f"{path}: tensor 'blk.0.ffn_up.weight' has type {kind.name}, which "
                                                    "pyllm cannot read: llama.cpp's type for activations, not weights "
                                                    "(supported: F32, F16, BF16, Q8_0")) as error:
        convert_checkpoint(path, str(tmp_path / "odd.pllm"), progress=False)
    assert "Q4_K" in str(error.value) and "Q8_K" not in str(error.value).split("supported")[1]
    assert "re-quantized" not in capsys.readouterr().err
    assert not (tmp_path / "odd.pllm").exists()


def test_every_end_of_generation_id_of_a_gguf_ends_generation(hf_dir, tmp_path):
    """A ChatML GGUF whose EOS is <|endoftext|> and whose end of turn is <|im_end|> (as Qwen and
    Llama-3 files are) stops at the end of the turn instead of inventing the next ones."""
    import pyllm

    gguf_path = str(tmp_path / "eot.gguf")
    write_gguf(hf_dir, gguf_path, Q.Q8_0, eos="<|endoftext|>", eot="<|im_end|>", eom="<|im_start|>")
    out = str(tmp_path / "eot.pllm")
    convert_checkpoint(gguf_path, out, progress=False)
    with pyllm.LLM(out, n_threads=1) as llm:
        want = [llm.tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<|im_start|>")]
        assert llm.tokenizer.eos_ids == want
        for end in want:  # whichever of them the model picks ends the reply
            llm.generate("Paris", max_new_tokens=5, logit_bias={end: 100.0})
            assert llm.last_stats.finish_reason == "stop" and llm.last_stats.generated_tokens == 1


def test_bad_gguf_is_refused(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(FormatError):
        convert_checkpoint(str(bad), str(tmp_path / "x.pllm"), progress=False)
    assert not (tmp_path / "x.pllm").exists()
    truncated = tmp_path / "truncated.gguf"
    good = tmp_path / "good.gguf"
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), str(good), Q.Q8_0)
    truncated.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises((FormatError, ValueError)):
        convert_checkpoint(str(truncated), str(tmp_path / "y.pllm"), progress=False)
    assert not (tmp_path / "y.pllm").exists()


def _gguf_bytes(metadata: bytes = b"", n_metadata: int = 0, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    """A GGUF v3 file's bytes from raw metadata pairs and tensor infos (no data section)."""
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_metadata) + metadata + tensors


def _gguf_string(text: bytes, length: int | None = None) -> bytes:
    import struct

    return struct.pack("<Q", len(text) if length is None else length) + text


def _gguf_lies():
    """Files whose counts or lengths claim more than the file holds: gguf's reader trusted each (one
    looped for ever with memory growing, found by a review: an array of 2^60 uint32s in 49 bytes)."""
    import struct

    key = _gguf_string(b"k")
    array = lambda element_type, count, body=b"": key + struct.pack("<IIQ", 9, element_type, count) + body  # noqa: E731
    tensor = lambda n_dims, dims, ggml_type=0, offset=0: (_gguf_string(b"t") + struct.pack("<I", n_dims) +  # noqa: E731
                                                          b"".join(struct.pack("<Q", d) for d in dims) +
                                                          struct.pack("<IQ", ggml_type, offset))
    return {
        "array of 2^60 uint32": (_gguf_bytes(array(4, 2**60), 1), "2^60|elements"),
        "array of 2^40 strings": (_gguf_bytes(array(8, 2**40), 1), "elements"),
        "array of arrays, nested deep": (_gguf_bytes(key + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 40, 1),
                                         "nests arrays"),
        "string of 2^62 bytes": (_gguf_bytes(key + struct.pack("<I", 8) + struct.pack("<Q", 2**62), 1),
                                 "metadata 'k'"),
        "key of 2^62 bytes": (_gguf_bytes(_gguf_string(b"k", 2**62) + b"\0" * 16, 1), "metadata key 0"),
        "2^62 metadata pairs": (_gguf_bytes(b"", 2**62), "metadata pairs"),
        "2^62 tensors": (_gguf_bytes(b"", 0, b"", 2**62), "tensor infos"),
        "unknown value type": (_gguf_bytes(key + struct.pack("<I", 77) + b"\0" * 16, 1), "unknown value type 77"),
        "tensor of 5 dimensions": (_gguf_bytes(b"", 0, tensor(5, [1] * 5) + b"\0" * 32, 1), "5 dimensions"),
        "tensor of 2^40 x 2^40 f32": (_gguf_bytes(b"", 0, tensor(2, [2**40, 2**40]) + b"\0" * 32, 1),
                                      "runs past the end"),
        "tensor at offset 2^62": (_gguf_bytes(b"", 0, tensor(1, [32], 0, 2**62) + b"\0" * 32, 1), "runs past the end"),
        "tensor of unknown type": (_gguf_bytes(b"", 0, tensor(1, [32], 999) + b"\0" * 32, 1), "unknown ggml type 999"),
        "version 7": (b"GGUF" + struct.pack("<IQQ", 7, 0, 0), "version 7"),
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(_gguf_lies()))
def test_a_gguf_whose_lengths_run_past_its_end_is_refused_at_once(tmp_path, case):
    data, message = _gguf_lies()[case]
    path = tmp_path / "lie.gguf"
    path.write_bytes(data)
    with pytest.raises(FormatError, match=message) as error:
        convert_checkpoint(str(path), str(tmp_path / "x.pllm"), progress=False)
    assert str(path) in str(error.value)
    assert not (tmp_path / "x.pllm").exists()


def test_a_gguf_cut_anywhere_says_it_is_cut_short(tmp_path):
    """A real file cut at any point: the message says what runs past the end (it said numpy's
    'cannot reshape array of size ...' where the data was cut)."""
    good = tmp_path / "good.gguf"
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), str(good), Q.Q8_0)
    data = good.read_bytes()
    for cut in (24, 100, 1000, len(data) // 3, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(FormatError, match="runs past the end|cut short") as error:
            convert_checkpoint(str(path), str(tmp_path / "x.pllm"), progress=False)
        assert "reshape" not in str(error.value), (cut, str(error.value))
    from pyllm.formats.gguf_layout import check_gguf_layout

    assert check_gguf_layout(str(good)) is None  # the whole file passes


@pytest.mark.parametrize("key, value, message", [
    # the fuzzer's input (tools/fuzz/corpus/gguf/huge-block-count.gguf): minutes in the tensor table before
    ("llama.block_count", 4143972353, "llama.block_count: num_hidden_layers must be an integer in 1..1024"),
    ("llama.attention.head_count", 0, "llama.attention.head_count: num_attention_heads must be an integer"),
    ("llama.embedding_length", 1 << 31, "llama.embedding_length: hidden_size must be an integer in 1..65536"),
    ("llama.feed_forward_length", 0, "llama.feed_forward_length: intermediate_size must be an integer"),
    ("llama.context_length", 1 << 31, "llama.context_length: max_position_embeddings must be an integer"),
])
def test_sizes_out_of_bounds_are_refused_by_their_key(tmp_path, key, value, message):
    good = tmp_path / "good.gguf"
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), str(good), Q.Q8_0)
    raw = bytearray(good.read_bytes())
    # a metadata entry: key length u64, key, value type u32 (UINT32 = 4 for these), value u32
    name = key.encode()
    at = raw.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    assert int.from_bytes(raw[at:at + 4], "little") == 4
    raw[at + 4:at + 8] = value.to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=message):
        convert_checkpoint(str(bad), str(tmp_path / "x.pllm"), progress=False)
    assert not (tmp_path / "x.pllm").exists()


def rewrite_gguf(src: str, out: str, fields: dict | None = None, tensors: dict | None = None,
                 endianess=gguf.GGUFEndian.LITTLE, **writer_options) -> str:
    """src copied to out with metadata `fields` (key -> (value, GGUFValueType, array sub-type or None))
    and tensors `tensors` (GGUF name -> (array, GGMLQuantizationType), None to drop) put in;
    writer_options: GGUFWriter's (split_max_tensors...)."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else "llama"
    w = gguf.GGUFWriter(out, arch, endianess=endianess, **writer_options)
    fields = fields or {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in fields:
            continue
        kind = field.types[0]
        sub = {"sub_type": field.types[-1]} if kind == gguf.GGUFValueType.ARRAY else {}
        w.add_key_value(key, field.contents(), kind, **sub)
    for key, (value, kind, sub) in fields.items():  # general.architecture: the writer's own is replaced
        w.add_key_value(key, value, kind, **({"sub_type": sub} if sub is not None else {}))
    tensors = tensors or {}
    for t in reader.tensors:
        if t.name not in tensors:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    for name, replaced in tensors.items():
        if replaced is not None:
            w.add_tensor(name, replaced[0], raw_dtype=replaced[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


V = gguf.GGUFValueType


@pytest.mark.parametrize("key, value, kind, sub, message", [
    # float() / int() of a string or an array raised a bare ValueError / TypeError naming nothing
    ("llama.attention.layer_norm_rms_epsilon", "x", V.STRING, None, "layer_norm_rms_epsilon must be a number"),
    ("llama.rope.freq_base", [1.0], V.ARRAY, V.FLOAT32, "rope.freq_base must be a number"),
    ("llama.rope.freq_base", True, V.BOOL, None, "rope.freq_base must be a number"),
    ("llama.rope.dimension_count", "x", V.STRING, None, "rope.dimension_count must be an integer"),
    ("llama.rope.dimension_count", 8.5, V.FLOAT32, None, "rope.dimension_count must be an integer"),
    ("llama.rope.scaling.factor", "2", V.STRING, None, "rope.scaling.factor must be a number"),
    ("general.architecture", ["llama"], V.ARRAY, V.STRING, r"GGUF architecture \['llama'\] is not supported"),
    # a chat template that is not text was a bare ValueError from the writer, after the conversion
    ("tokenizer.chat_template", 5, V.UINT32, None, "'tokenizer.chat_template' must be a str"),
    ("tokenizer.chat_template", ["a"], V.ARRAY, V.STRING, "'tokenizer.chat_template' must be a str"),
    # bool("false") is True: the file's opposite, in silence
    ("tokenizer.ggml.add_bos_token", "false", V.STRING, None, "'tokenizer.ggml.add_bos_token' must be a bool"),
    ("tokenizer.ggml.add_eos_token", 1, V.UINT8, None, "'tokenizer.ggml.add_eos_token' must be a bool"),
    # the vocabulary's arrays: a bare "the GGUF tokenizer cannot be read: AttributeError" (numbers where
    # strings belong), or a string read as its characters
    ("tokenizer.ggml.merges", [1, 2, 3], V.ARRAY, V.INT32, r"'tokenizer.ggml.merges' must be an array of strings "
                                                           r"\('left right'\); entry 0 is 1"),
    ("tokenizer.ggml.merges", "a b", V.STRING, None, r"'tokenizer.ggml.merges' must be an array of strings .*got 'a b'"),
    ("tokenizer.ggml.merges", ["a b", "ab"], V.ARRAY, V.STRING, r"'tokenizer.ggml.merges' .*; entry 1 is 'ab'"),
    ("tokenizer.ggml.tokens", "abc", V.STRING, None, "'tokenizer.ggml.tokens' must be an array of strings, got 'abc'"),
    ("tokenizer.ggml.tokens", list(range(512)), V.ARRAY, V.INT32,
     "'tokenizer.ggml.tokens' must be an array of strings; entry 0 is 0"),
    ("tokenizer.ggml.scores", 1.5, V.FLOAT32, None, "'tokenizer.ggml.scores' must be an array of numbers, got 1.5"),
    ("tokenizer.ggml.token_type", 1, V.INT32, None, "tokenizer.ggml.token_type must hold one integer per token"),
    ("tokenizer.ggml.token_type", "1", V.STRING, None, "tokenizer.ggml.token_type must hold one integer per token"),
    ("tokenizer.ggml.model", 5, V.UINT32, None, "'tokenizer.ggml.model' must be a str"),
    ("tokenizer.ggml.pre", ["gpt2"], V.ARRAY, V.STRING, "'tokenizer.ggml.pre' must be a str"),
])
def test_metadata_of_the_wrong_type_is_refused_by_its_key(tmp_path, key, value, kind, sub, message):
    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    fields = {key: (value, kind, sub)}
    if key == "llama.rope.scaling.factor":
        fields["llama.rope.scaling.type"] = ("linear", V.STRING, None)
    bad = rewrite_gguf(good, str(tmp_path / "bad.gguf"), fields)
    with pytest.raises(FormatError, match=message) as error:
        convert_checkpoint(bad, str(tmp_path / "x.pllm"), progress=False)
    assert bad in str(error.value)
    assert not (tmp_path / "x.pllm").exists()


def test_a_big_endian_gguf_is_refused_naming_the_way_to_convert_it(tmp_path):
    """A big-endian GGUF (as gguf-convert-endian writes it for s390x: every number swapped, the fp16
    scales of Q8_0 blocks too) was read as little-endian: its scales NaN (refused as non-finite
    weights, naming no cause) or just wrong, a model of garbage converted without a word."""
    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    path = rewrite_gguf(good, str(tmp_path / "big.gguf"), endianess=gguf.GGUFEndian.BIG)
    raw = np.memmap(path, mode="r+")
    for t in gguf.GGUFReader(path).tensors:  # the writer swaps arrays of numbers; blocks are bytes to it
        if t.tensor_type == Q.Q8_0:
            blocks = raw[t.data_offset:t.data_offset + t.n_bytes].reshape(-1, 34)
            blocks[:, [0, 1]] = blocks[:, [1, 0]]
    raw.flush()
    del raw
    with pytest.raises(FormatError, match="big-endian GGUF file.*gguf-convert-endian") as error:
        convert_checkpoint(path, str(tmp_path / "x.pllm"), progress=False)
    assert path in str(error.value)
    assert not (tmp_path / "x.pllm").exists()


@pytest.mark.parametrize("fields, factor", [
    ({}, None),
    # llama.cpp's default type is linear, and rope.scale_linear the factor's older key: both were ignored,
    # positions 4x too far apart in silence
    ({"llama.rope.scaling.factor": (4.0, V.FLOAT32, None)}, 4.0),
    ({"llama.rope.scale_linear": (4.0, V.FLOAT32, None)}, 4.0),
    ({"llama.rope.scaling.type": ("linear", V.STRING, None), "llama.rope.scaling.factor": (4.0, V.FLOAT32, None)}, 4.0),
    # a factor of 0 is no scaling in llama.cpp (it was refused as "model config: ... got 0.0")
    ({"llama.rope.scaling.type": ("linear", V.STRING, None), "llama.rope.scaling.factor": (0.0, V.FLOAT32, None)}, None),
    ({"llama.rope.scaling.type": ("none", V.STRING, None), "llama.rope.scaling.factor": (4.0, V.FLOAT32, None)}, None),
])
def test_rope_scaling_is_read_by_llama_cpp_rules(tmp_path, fields, factor):
    from pyllm.convert.gguf_source import GGUFSource

    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    scaling = GGUFSource(rewrite_gguf(good, str(tmp_path / "scaled.gguf"), fields)).config.rope_scaling
    assert (scaling or {}).get("factor") == factor and (factor is None or scaling["rope_type"] == "linear")


@pytest.mark.parametrize("case", ["swapped", "overlapping", "misaligned"])
def test_tensor_data_must_follow_one_another_as_llama_cpp_reads_it(tmp_path, case):
    """Tensors whose data offsets were swapped or overlap converted into a model answering nonsense,
    in silence ("binxgbinxxxx"); llama.cpp refuses a tensor not right after the one before it."""
    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    path = str(tmp_path / f"{case}.gguf")
    shutil.copy(good, path)
    reader = gguf.GGUFReader(path, "r+")
    by_name = {t.name: t.field.parts[-1] for t in reader.tensors}  # each tensor info's offset, mapped writable
    q, o = by_name["blk.0.attn_q.weight"], by_name["blk.0.attn_output.weight"]  # both 64 x 64
    if case == "swapped":
        q[0], o[0] = int(o[0]), int(q[0])
        order = [t.name for t in reader.tensors]
        name = min("blk.0.attn_q.weight", "blk.0.attn_output.weight", key=order.index)  # the first one read
    elif case == "overlapping":
        q[0] = int(o[0])
        name = "blk.0.attn_q.weight"
    else:
        first = reader.tensors[0]
        by_name[first.name][0] = 3
        name = first.name
    del reader, q, o, by_name
    with pytest.raises(FormatError, match=re.escape(f"{path}: tensor '{name}' has data offset")):
        convert_checkpoint(path, str(tmp_path / "x.pllm"), progress=False)
    assert not (tmp_path / "x.pllm").exists()


def llama_cpp_rope_freqs(theta: float, dim: int, factor: float, low: float, high: float, old: int) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py writes it for llama3 rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs.astype(np.float64):
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 32.0,
          "original_max_position_embeddings": 2048}


def test_llama3_rope_freqs_of_llama_3_1_files_are_read_as_llama3_scaling(tmp_path):
    """Llama 3.1-3.3 GGUF files carry their llama3 rope scaling only as rope_freqs.weight (they were
    refused): read back into transformers' llama3 parameters, the logits are transformers' with them."""
    from pyllm.convert.gguf_source import GGUFSource

    src = make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128)  # head_dim 16
    good = str(tmp_path / "plain.gguf")
    held = write_gguf(src, good, Q.Q8_0)
    cfg = json.load(open(os.path.join(src, "config.json")))
    theta = cfg["rope_parameters"]["rope_theta"]
    freqs = llama_cpp_rope_freqs(theta, 16, factor=4.0, low=1.0, high=32.0, old=2048)
    assert 1 < freqs[4] < 4 and freqs[0] == 1 and freqs[-1] == 4  # ones, a smooth step, the factor
    scaled = rewrite_gguf(good, str(tmp_path / "llama31.gguf"), tensors={"rope_freqs.weight": (freqs, Q.F32)})
    assert GGUFSource(scaled).config.rope_scaling == {**LLAMA3, "high_freq_factor": pytest.approx(32.0)}

    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**{k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling")},
           "rope_parameters": {"rope_theta": theta, **LLAMA3}})).eval()
    reference.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in held.items()})
    ids = [int(i) for i in np.random.default_rng(7).integers(3, 400, 250)]
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0].numpy()
    logits = {}
    for name, path in (("plain", good), ("scaled", scaled)):
        convert_checkpoint(path, str(tmp_path / f"{name}.pllm"), progress=False)
        with pyllm.LLM(str(tmp_path / f"{name}.pllm"), n_threads=2) as llm:
            logits[name] = llm.logits(ids)
    assert nmse(logits["scaled"], ref) < 1e-5
    assert nmse(logits["plain"], ref) > 100 * nmse(logits["scaled"], ref)  # the scaling matters at these positions

    ones = rewrite_gguf(good, str(tmp_path / "ones.gguf"), tensors={"rope_freqs.weight": (np.ones(8, np.float32), Q.F32)})
    assert GGUFSource(ones).config.rope_scaling is None  # factors of 1: no scaling
    for bad, message in ((freqs[::-1].copy(), "not llama3 scaling's"), (np.ones(6, np.float32), "has 6 values"),
                         (np.where(np.arange(8) == 5, np.nan, freqs).astype(np.float32), "not positive finite")):
        path = rewrite_gguf(good, str(tmp_path / "bad.gguf"), tensors={"rope_freqs.weight": (bad, Q.F32)})
        with pytest.raises(FormatError, match="rope_freqs.weight.*" + message):
            convert_checkpoint(path, str(tmp_path / "bad.pllm"), progress=False)
    linear = rewrite_gguf(scaled, str(tmp_path / "both.gguf"), {"llama.rope.scaling.factor": (2.0, V.FLOAT32, None)})
    with pytest.raises(FormatError, match="beside linear rope scaling"):
        GGUFSource(linear)


@pytest.mark.parametrize("key, value, message", [
    ("llama.rope.freq_base", 0.0, "GGUF metadata llama.rope.freq_base: rope_theta must be a positive"),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"),
     "GGUF metadata llama.attention.layer_norm_rms_epsilon: norm_eps must be a positive"),
    ("llama.rope.scaling.factor", -2.0, "GGUF metadata llama.rope.scaling.factor: rope_scaling factor must be positive"),
    ("llama.attention.head_count_kv", 3, "GGUF metadata llama.attention.head_count / llama.attention.head_count_kv: "
                                         "num_attention_heads must be a multiple of num_key_value_heads"),
])
def test_values_the_model_config_refuses_name_the_file_and_key(tmp_path, key, value, message):
    """The family's config checks said "model config: rope_theta must be ..." of a GGUF file: neither
    the file nor the metadata key it came from."""
    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    kind = V.UINT32 if isinstance(value, int) else V.FLOAT32
    bad = rewrite_gguf(good, str(tmp_path / "bad.gguf"), {key: (value, kind, None)})
    with pytest.raises(FormatError, match=re.escape(f"{bad}: {message}")):
        convert_checkpoint(bad, str(tmp_path / "x.pllm"), progress=False)
    assert not (tmp_path / "x.pllm").exists()


def test_tensors_of_three_dimensions_and_an_empty_vocabulary_are_refused_by_name(tmp_path):
    """A [2, 32, 64] attn_q was read as 32 rows: a head size from nowhere, refused as "rope.dimension_count:
    rotary_dim must be ..." naming no tensor; a token_embd.weight of no rows was blamed on "the llama GGUF
    metadata". A trailing dimension of 1 stays accepted, as llama.cpp accepts it."""
    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    cases = [("blk.0.attn_q.weight", np.ones((2, 32, 64), np.float32),
              r"tensor 'blk.0.attn_q.weight' has shape \[2, 32, 64\]; the tensors of a llama GGUF file are vectors"),
             ("token_embd.weight", np.zeros((0, 64), np.float32),
              r"tensor 'token_embd.weight' \(its rows are the vocabulary\): vocab_size must be")]
    for name, value, message in cases:
        bad = rewrite_gguf(good, str(tmp_path / "bad.gguf"), tensors={name: (value, Q.F32)})
        with pytest.raises(FormatError, match=re.escape(bad) + ": " + message):
            convert_checkpoint(bad, str(tmp_path / "x.pllm"), progress=False)
        assert not (tmp_path / "x.pllm").exists()
    q = np.asarray(next(t for t in gguf.GGUFReader(good).tensors if t.name == "blk.0.attn_q.weight").data)
    fine = rewrite_gguf(good, str(tmp_path / "fine.gguf"), tensors={"blk.0.attn_q.weight": (q[None], Q.Q8_0)})
    convert_checkpoint(fine, str(tmp_path / "fine.pllm"), progress=False)


def split_gguf(whole: str, directory, max_tensors: int = 8, small_first_shard: bool = False) -> list[str]:
    """whole written again as gguf-split writes it (gguf-py's writer with a tensor limit): shards
    model-0000i-of-0000n.gguf in directory, the metadata in the first; their paths, first first."""
    rewrite_gguf(whole, str(directory / "model.gguf"), split_max_tensors=max_tensors,
                 small_first_shard=small_first_shard)
    return sorted(str(p) for p in directory.glob("model-*-of-*.gguf"))


def test_a_split_gguf_is_read_from_any_of_its_shards(tmp_path):
    """gguf-split's shards (split.count > 1; how large models are published, model-00001-of-00003.gguf...)
    were refused, the first as lacking the others' tensors, then with "merge the shards first". Now any
    shard given reads them all, as llama.cpp does: the same model as the merged file, tensor for tensor;
    also with the first shard holding metadata only (gguf-split --no-tensor-first-split)."""
    from pyllm.convert.gguf_source import GGUFSource

    whole = str(tmp_path / "whole.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), whole, Q.Q8_0)
    merged = GGUFSource(whole)
    for small_first in (False, True):
        directory = tmp_path / f"split-{small_first}"
        directory.mkdir()
        shards = split_gguf(whole, directory, small_first_shard=small_first)
        assert len(shards) >= 3 and shards[0].endswith(f"-00001-of-0000{len(shards)}.gguf")
        for given in (shards[0], shards[-1]):
            source = GGUFSource(given)
            assert source.files == shards and source.path == shards[0]
            assert source.config == merged.config and source.tokenizer() == merged.tokenizer()
            assert source.chat_template() == merged.chat_template()
            for name in merged.places:
                assert np.array_equal(source.load(name), merged.load(name)), name
            assert source.where("lm_head.weight").startswith(f"{source.tensor_files['output.weight']}: ")
    report = convert_checkpoint(shards[1], str(tmp_path / "split.pllm"), progress=False)
    assert report.source_bytes == sum(os.path.getsize(p) for p in shards)
    with pyllm.LLM(str(tmp_path / "split.pllm"), n_threads=1) as llm:
        ids = [1, 5, 9, 20]
        convert_checkpoint(whole, str(tmp_path / "whole.pllm"), progress=False)
        with pyllm.LLM(str(tmp_path / "whole.pllm"), n_threads=1) as reference:
            assert np.array_equal(llm.logits(ids), reference.logits(ids))
    with pytest.raises(FileExistsError, match="which this conversion reads"):  # a shard is an input too
        convert_checkpoint(shards[0], shards[2], progress=False)


def _broken_split(tmp_path, case: str) -> tuple[str, str]:
    """A split set damaged as `case` says: (shard to give, message expected)."""
    whole = str(tmp_path / "whole.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), whole, Q.Q8_0)
    shards = split_gguf(whole, tmp_path)
    n = len(shards)
    second = gguf.GGUFReader(shards[1])
    if case == "missing":
        os.unlink(shards[1])
        return shards[0], re.escape(f"{shards[0]}: shard 1 of a GGUF model split in {n} files; missing: {shards[1]}")
    if case == "a whole model as a shard":  # ("a split GGUF shard (it has split.* metadata)": it has none)
        shutil.copy(whole, shards[2])
        return shards[0], re.escape(f"{shards[2]}: not a shard of a split GGUF (it has no 'split.no' metadata)")
    if case == "copied over another":  # shard 2 copied as shard 3
        shutil.copy(shards[1], shards[2])
        return shards[0], re.escape(f"{shards[2]}: its GGUF metadata says shard 2 of {n}, its name shard 3 of {n}: "
                                    "the shards are not one split model")
    if case == "renamed":
        renamed = str(tmp_path / "model-part2.gguf")
        os.rename(shards[1], renamed)
        return renamed, re.escape(f"{renamed}: shard 2 of {n} of a split GGUF model, but not named as gguf-split "
                                  f"names its shards (PREFIX-00002-of-0000{n}.gguf): its other shards cannot be found")
    if case == "of another set":  # a shard of the same name from a split of another model
        total = second.fields["split.tensors.count"].contents()
        rewrite_gguf(shards[1], shards[1] + ".new", {"split.tensors.count": (total + 5, V.INT32, None)})
        os.replace(shards[1] + ".new", shards[1])
        return shards[-1], re.escape(f"{shards[1]}: GGUF metadata 'split.tensors.count' is {total + 5}, {total} in "
                                     f"{shards[-1]}: the shards are not one split model")
    if case == "of another architecture":
        rewrite_gguf(shards[1], shards[1] + ".new", {"general.architecture": ("qwen2", V.STRING, None)})
        os.replace(shards[1] + ".new", shards[1])
        return shards[0], re.escape(f"{shards[1]}: a shard of a qwen2 model, {shards[0]} of a llama one")
    if case == "a tensor twice":
        first = gguf.GGUFReader(shards[0]).tensors[0]
        rewrite_gguf(shards[1], shards[1] + ".new", tensors={first.name: (np.asarray(first.data), first.tensor_type)})
        os.replace(shards[1] + ".new", shards[1])
        return shards[0], re.escape(f"{shards[1]}: tensor '{first.name}' is also in {shards[0]}: the shards are "
                                    "not one split model")
    if case == "a tensor lost":
        total = second.fields["split.tensors.count"].contents()
        rewrite_gguf(shards[1], shards[1] + ".new", tensors={second.tensors[0].name: None})
        os.replace(shards[1] + ".new", shards[1])
        return shards[0], re.escape(f"{shards[0]}: GGUF metadata 'split.tensors.count' is {total}, but the {n} "
                                    f"shard(s) hold {total - 1} tensors")
    if case == "split.no out of range":
        rewrite_gguf(shards[1], shards[1] + ".new", {"split.no": (n, V.UINT16, None)})
        os.replace(shards[1] + ".new", shards[1])
        return shards[1], re.escape(f"{shards[1]}: GGUF metadata 'split.no' is {n}, not a shard of the {n} that "
                                    "'split.count' says")
    raise AssertionError(case)


def test_a_split_set_of_one_file_is_a_whole_model_and_split_keys_are_checked(tmp_path):
    """gguf-split of a small model writes one shard, with split.count 1: read as the whole model whatever its
    name. A shard without split.no (or with a split.count that is no count) is refused naming the key."""
    from pyllm.convert.gguf_source import GGUFSource

    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    n = len(gguf.GGUFReader(good).tensors)
    one = rewrite_gguf(good, str(tmp_path / "renamed.gguf"), {"split.no": (0, V.UINT16, None),
                                                             "split.count": (1, V.UINT16, None),
                                                             "split.tensors.count": (n, V.INT32, None)})
    assert GGUFSource(one).files == [one]
    for fields, message in (({"split.count": (2, V.UINT16, None)}, "without 'split.no'"),
                            ({"split.no": (0, V.UINT16, None), "split.count": ("2", V.STRING, None)},
                             "'split.count' must be a non-negative integer, got '2'"),
                            ({"split.no": (0, V.UINT16, None), "split.count": (1, V.UINT16, None),
                              "split.tensors.count": (n + 1, V.INT32, None)},
                             f"'split.tensors.count' is {n + 1}, but the 1 shard(s) hold {n} tensors")):
        bad = rewrite_gguf(good, str(tmp_path / "bad.gguf"), fields)
        with pytest.raises(FormatError, match=re.escape(bad) + ".*" + re.escape(message)):
            GGUFSource(bad)


@pytest.mark.parametrize("case", ["missing", "copied over another", "a whole model as a shard", "renamed", "of another set",
                                  "of another architecture", "a tensor twice", "a tensor lost",
                                  "split.no out of range"])
def test_a_broken_split_gguf_is_refused_naming_the_shard(tmp_path, case):
    """A split model read whole must be the shards of one split set, each once: a missing shard, a shard
    renamed or copied over another, one of another split (or model), a tensor in two shards or in none,
    are refused naming the shard, before anything is written."""
    given, message = _broken_split(tmp_path, case)
    with pytest.raises(FormatError, match=message):
        convert_checkpoint(given, str(tmp_path / "x.pllm"), progress=False)
    assert not (tmp_path / "x.pllm").exists()


def test_a_llama_cpp_lora_adapter_given_as_the_model_says_what_it_is(tmp_path):
    """convert_lora_to_gguf's output (general.type "adapter") given as the model was refused as a model
    that "lacks token_embd.weight"."""
    path = str(tmp_path / "lora.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 16.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((8, 64), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match=re.escape(f"{path}: a llama.cpp lora adapter, not a model; pyllm merges "
                                                    "LoRA adapters in PEFT's format: pyllm convert BASE_DIR --lora")):
        convert_checkpoint(path, str(tmp_path / "x.pllm"), progress=False)
    # and given as --lora, where it said only "is not a directory"
    base = make_tiny_llama(str(tmp_path / "base"), hidden_size=64, intermediate_size=128)
    with pytest.raises(FileNotFoundError, match=re.escape(f"LoRA adapter {path} is a GGUF file; pyllm reads adapters "
                                                          "in PEFT's format")):
        convert_checkpoint(base, str(tmp_path / "x.pllm"), progress=False, lora=[path])
    assert not (tmp_path / "x.pllm").exists()


def test_tensors_of_an_unexpected_rank(tmp_path):
    """A vector in Q8_0 / Q4_0 blocks (a norm) was an IndexError: it is read as one row of blocks; a
    token_embd.weight that is not a matrix (its rows are the vocabulary) was an IndexError too."""
    from pyllm.convert.gguf_source import GGUFSource

    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    norm = 1 + np.random.default_rng(0).standard_normal(64).astype(np.float32) / 4
    for kind in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0):
        blocks = gguf.quants.quantize(norm, kind)
        path = rewrite_gguf(good, str(tmp_path / f"norm-{kind.name}.gguf"), tensors={"blk.0.attn_norm.weight": (blocks, kind)})
        source = GGUFSource(path)
        held = source.load("model.layers.0.input_layernorm.weight")
        assert held.shape == (64,)
        np.testing.assert_array_equal(held, gguf.quants.dequantize(blocks, kind))
        convert_checkpoint(path, str(tmp_path / f"norm-{kind.name}.pllm"), progress=False)
    for shape in [(8192,), (2, 64, 64)]:
        path = rewrite_gguf(good, str(tmp_path / "embedding.gguf"),
                            tensors={"token_embd.weight": (np.zeros(shape, np.float32), Q.F32)})
        with pytest.raises(FormatError, match="token_embd.weight( must be a matrix|' has shape .* are vectors and "
                                              "matrices)"):
            convert_checkpoint(path, str(tmp_path / "embedding.pllm"), progress=False)
        assert not (tmp_path / "embedding.pllm").exists()


def test_a_vocabulary_larger_than_the_embeddings_is_refused(tmp_path):
    """tokenizer.ggml.tokens longer than token_embd.weight's rows: converted, then refused by every load."""
    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    reader = gguf.GGUFReader(good)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    rows = int(reader.fields["llama.vocab_size"].contents())
    assert len(tokens) == rows
    for extra_type in (1, 3):  # plain tokens, control tokens
        bad = rewrite_gguf(good, str(tmp_path / "bad.gguf"), {
            "tokenizer.ggml.tokens": (tokens + [f"zz{i}" for i in range(5)], V.ARRAY, V.STRING),
            "tokenizer.ggml.token_type": (types + [extra_type] * 5, V.ARRAY, V.INT32)})
        with pytest.raises(FormatError, match=f"the tokenizer has {rows + 5} tokens but the model's embeddings only {rows}"):
            convert_checkpoint(bad, str(tmp_path / "x.pllm"), progress=False)
        assert not (tmp_path / "x.pllm").exists()


@pytest.mark.parametrize("key, value, kind, message", [
    # an id past the vocabulary, or negative, was ignored in silence: no BOS added, no end of turn
    ("tokenizer.ggml.bos_token_id", 10**6, V.UINT32, "'tokenizer.ggml.bos_token_id' is 1000000, not a token"),
    ("tokenizer.ggml.bos_token_id", -1, V.INT32, "'tokenizer.ggml.bos_token_id' is -1, not a token"),
    ("tokenizer.ggml.eos_token_id", 10**6, V.UINT32, "'tokenizer.ggml.eos_token_id' is 1000000, not a token"),
    ("tokenizer.ggml.eot_token_id", 2**32 - 1, V.UINT32, "'tokenizer.ggml.eot_token_id' is 4294967295, not a token"),
    ("tokenizer.ggml.eom_token_id", -5, V.INT64, "'tokenizer.ggml.eom_token_id' is -5, not a token"),
    # a float was truncated by int(), a string named no key
    ("tokenizer.ggml.bos_token_id", 1.5, V.FLOAT32, "'tokenizer.ggml.bos_token_id' must be a token id, got 1.5"),
    ("tokenizer.ggml.eos_token_id", "2", V.STRING, "'tokenizer.ggml.eos_token_id' must be a token id, got '2'"),
])
def test_special_token_ids_that_are_not_tokens_are_refused(tmp_path, key, value, kind, message):
    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    bad = rewrite_gguf(good, str(tmp_path / "bad.gguf"), {key: (value, kind, None)})
    with pytest.raises(FormatError, match=message):
        convert_checkpoint(bad, str(tmp_path / "x.pllm"), progress=False)
    assert not (tmp_path / "x.pllm").exists()


def test_unknown_and_padding_ids_past_the_vocabulary_are_ignored_as_llama_cpp_does(tmp_path):
    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    odd = rewrite_gguf(good, str(tmp_path / "odd.gguf"), {"tokenizer.ggml.padding_token_id": (2**32 - 1, V.UINT32, None),
                                                         "tokenizer.ggml.unknown_token_id": (10**6, V.UINT32, None)})
    convert_checkpoint(odd, str(tmp_path / "odd.pllm"), progress=False)
    with pyllm.LLM(str(tmp_path / "odd.pllm"), n_threads=1) as llm:
        assert llm.tokenizer.spec.pad_token is None and llm.tokenizer.spec.unk_token is None


@pytest.mark.parametrize("case", ["q_twice_too_many_rows", "q_half_the_rows", "kv_heads_not_the_file's"])
def test_reordered_rows_must_be_exactly_the_tensor_rows(tmp_path, case):
    """llama's q/k rows are reordered (llama.cpp's permutation undone) by an index over the rows the
    model's shapes imply: a q with twice the rows converted from its first half in silence, one with
    half or a head_count_kv that disagrees with attn_k's rows was an IndexError."""
    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=2), good, Q.Q8_0)
    rng = np.random.default_rng(0)
    fields, tensors, name, rows = {}, {}, "blk.1.attn_q.weight", 64
    if case == "q_twice_too_many_rows":
        tensors[name] = (gguf.quants.quantize(rng.standard_normal((128, 64)).astype(np.float32), Q.Q8_0), Q.Q8_0)
        held = 128
    elif case == "q_half_the_rows":
        tensors[name] = (gguf.quants.quantize(rng.standard_normal((32, 64)).astype(np.float32), Q.Q8_0), Q.Q8_0)
        held = 32
    else:
        fields["llama.attention.head_count_kv"] = (4, V.UINT32, None)
        name, held = "blk.0.attn_k.weight", 32
    bad = rewrite_gguf(good, str(tmp_path / "bad.gguf"), fields, tensors)
    with pytest.raises(FormatError, match=f"{name} has {held} rows, expected {rows}"):
        convert_checkpoint(bad, str(tmp_path / "x.pllm"), progress=False)
    assert not (tmp_path / "x.pllm").exists()


def test_a_tensor_of_another_shape_is_refused_naming_file_and_tensor(tmp_path):
    """A shape error names the GGUF file and the GGUF tensor (it named pyllm's tensor name only)."""
    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    bad = rewrite_gguf(good, str(tmp_path / "bad.gguf"), tensors={"output_norm.weight": (np.ones(63, np.float32), Q.F32)})
    with pytest.raises(FormatError, match=re.escape(bad) + r": tensor 'output_norm\.weight' \(as 'model\.norm\.weight'\) "
                       r"has shape \[63\], the config implies \[64\]"):
        convert_checkpoint(bad, str(tmp_path / "x.pllm"), progress=False)
    assert not (tmp_path / "x.pllm").exists()


def test_a_non_finite_tensor_is_refused_naming_file_and_tensor(tmp_path):
    """NaN in a GGUF tensor: the message names the GGUF file and tensor (it named pyllm's tensor only)."""
    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    norm = np.ones(64, np.float32)
    norm[5] = np.nan
    bad = rewrite_gguf(good, str(tmp_path / "bad.gguf"), tensors={"output_norm.weight": (norm, Q.F32)})
    with pytest.raises(FormatError, match=re.escape(bad) + r": tensor 'output_norm\.weight' \(as 'model\.norm\.weight'\) "
                       r"holds 1 NaN or infinite value"):
        convert_checkpoint(bad, str(tmp_path / "x.pllm"), progress=False)
    assert not (tmp_path / "x.pllm").exists()
    # a Q8_0 block's f16 scale, kept bit for bit: named by its file and GGUF tensor (it was pyllm's
    # "model.embed_tokens.scales", with a hint about LoRA adapters that were not there)
    reader = gguf.GGUFReader(good)
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    blocks = np.array(embed.data)  # [rows, bytes of a row's Q8_0 blocks]
    blocks.reshape(-1, 34)[3, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # block 3's scale
    bad = rewrite_gguf(good, str(tmp_path / "bad_scale.gguf"), tensors={"token_embd.weight": (blocks, Q.Q8_0)})
    with pytest.raises(FormatError, match=re.escape(bad) + r": tensor 'token_embd\.weight' .*\(its blocks' scales, kept "
                       r"bit for bit\) holds 1 NaN or infinite value\(s\); nothing was written \(the file is damaged"):
        convert_checkpoint(bad, str(tmp_path / "x.pllm"), progress=False)
    assert not (tmp_path / "x.pllm").exists()


@pytest.mark.parametrize("copied, into", [(20, 500), (0, 511)])  # a plain token; a special one into the padding
def test_a_token_listed_twice_is_refused(tmp_path, copied, into):
    """A vocabulary maps each text to one id: the other id of a token listed twice converted, then
    decoded to no text at all (a generated token vanished from the reply)."""
    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    tokens = gguf.GGUFReader(good).fields["tokenizer.ggml.tokens"].contents()
    tokens[into] = tokens[copied]
    bad = rewrite_gguf(good, str(tmp_path / "bad.gguf"), {"tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING)})
    with pytest.raises(FormatError, match=f"holds .* twice \\(ids {copied} and {into}\\); one of them would decode"):
        convert_checkpoint(bad, str(tmp_path / "x.pllm"), progress=False)
    assert not (tmp_path / "x.pllm").exists()


@pytest.mark.parametrize("types, kind", [
    (lambda t: t[:-10], V.INT32),  # control tokens past its end were matched as text, in silence
    (lambda t: t + [1], V.INT32),
    (lambda t: [str(k) for k in t], V.STRING),  # '3' is not CONTROL: ignored in silence
])
def test_token_types_must_be_one_integer_per_token(tmp_path, types, kind):
    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    reader = gguf.GGUFReader(good)
    held = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(held) == 512 and 3 in held
    bad = rewrite_gguf(good, str(tmp_path / "bad.gguf"), {"tokenizer.ggml.token_type": (types(held), V.ARRAY, kind)})
    with pytest.raises(FormatError, match=r"tokenizer.ggml.token_type must hold one integer per token \(512\)"):
        convert_checkpoint(bad, str(tmp_path / "x.pllm"), progress=False)
    assert not (tmp_path / "x.pllm").exists()


def test_a_q6_k_file_is_requantized_to_int8_with_a_notice(tmp_path, capsys):
    """Q6_K (llama.cpp's default for output and many mixed files) has no pyllm layout: int8 g32, said
    once; the int8 copy stays close to the 6-bit values it was made from."""
    from pyllm.convert.gguf_source import requantized_format

    hf_dir = make_tiny_llama(str(tmp_path / "wide"), seed=4, hidden_size=256, intermediate_size=512,
                             num_attention_heads=4, num_key_value_heads=2)
    path = str(tmp_path / "model.gguf")
    write_gguf(hf_dir, path, Q.Q6_K)
    report = convert_checkpoint(path, str(tmp_path / "model.pllm"), progress=False, log=sys.stderr)
    err = capsys.readouterr().err
    assert "Q6_K tensor(s) re-quantized to int8 g32" in err and err.count("Q6_K") == 1
    layouts = pyllm.LLM(str(tmp_path / "model.pllm"), n_threads=1).model.linears
    q6 = [b for b in layouts if "down_proj" not in b and b not in ("model.embed_tokens", "lm_head")]
    assert q6 and all(layouts[b] == ("int8", 32) for b in q6)
    assert max(report.nmse[b] for b in q6) < 1e-3
    assert requantized_format("Q6_K")[:2] == ("int8", 32)


def test_an_nvfp4_file_is_stored_as_f16_exactly_with_a_notice(hf_dir, tmp_path, capsys):
    """NVFP4 (an fp8 scale per 16 values: no pyllm layout) was stored as f16 without a word, as every type
    pyllm had no row for. f16 holds its values exactly; the notice says so, and what it costs."""
    path = str(tmp_path / "model.gguf")
    held = write_gguf(hf_dir, path, Q.NVFP4)
    report = convert_checkpoint(path, str(tmp_path / "model.pllm"), progress=False, log=sys.stderr)
    err = capsys.readouterr().err
    assert "NVFP4 tensor(s) stored as f16, exactly" in err and err.count("NVFP4") == 1
    layers = {b for b in report.nmse if "down_proj" not in b and b not in ("model.embed_tokens", "lm_head")}
    assert layers and all(report.nmse[b] == 0 for b in layers)  # f16 of the file's values is the file's values
    with pyllm.LLM(str(tmp_path / "model.pllm"), n_threads=1) as llm:
        assert {llm.model.linears[b] for b in layers} == {("f16", 0)}
    for b in layers:
        values = held[b + ".weight"]
        assert np.array_equal(values.astype(np.float16).astype(np.float32), values), b


def test_mxfp4_scales_outside_fp16_are_refused_naming_the_block(hf_dir, tmp_path):
    """MXFP4's scales are 2^(e - 128) for any byte e; pyllm's int8 scales are fp16 (2^-24..2^15): a block
    whose scale is outside is refused naming tensor and block (a block of zeros holds at any scale)."""
    good = str(tmp_path / "good.gguf")
    write_gguf(hf_dir, good, Q.MXFP4)
    t = next(t for t in gguf.GGUFReader(good).tensors if t.name == "blk.0.ffn_up.weight")
    data = np.array(t.data)
    data[1, 17 * 2] = 0  # row 1, block 2: zeros at scale 2^-128
    data[1, 17 * 2 + 1:17 * 3] = 0
    fine = rewrite_gguf(good, str(tmp_path / "fine.gguf"), tensors={t.name: (data.copy(), Q.MXFP4)})
    report = convert_checkpoint(fine, str(tmp_path / "fine.pllm"), progress=False)
    assert "model.layers.0.mlp.up_proj" in report.kept_exactly
    data[3, 17 * 3] = 100  # row 3, block 3: 2^-28
    data[3, 17 * 3 + 1] = 0x11
    bad = rewrite_gguf(good, str(tmp_path / "bad.gguf"), tensors={t.name: (data, Q.MXFP4)})
    with pytest.raises(FormatError, match=re.escape(f"{bad}: tensor 'blk.0.ffn_up.weight' (as 'model.layers.0.mlp."
                                                    "up_proj.weight'): MXFP4 block 3 of row 3 has scale 2^-28, outside "
                                                    "pyllm's fp16 scales (2^-24..2^15)")):
        convert_checkpoint(bad, str(tmp_path / "bad.pllm"), progress=False)
    assert not (tmp_path / "bad.pllm").exists()


def random_q4_k_blocks(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Q4_K blocks (ggml-common.h: 256 values in 144 bytes: d, dmin f16, 12 bytes of 6-bit sub-block
    scales and mins, 128 bytes of nibbles) of random codes, d 1e-3 and dmin 5e-4, codes 1..14 (a Q4_K
    quantizer's grid rarely reaches both ends of a sub-block): uint8 [rows, cols / 256 * 144]."""
    rows, cols = shape
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
    blocks[..., 2:4] = np.frombuffer(np.float16(5e-4).tobytes(), np.uint8)
    codes = rng.integers(1, 15, (rows, cols // 256, 128, 2), dtype=np.uint8)
    blocks[..., 16:] = codes[..., 0] | codes[..., 1] << 4
    return blocks.reshape(rows, -1)


def test_q4_k_keeps_its_codes_in_int4_asym(tmp_path, capsys):
    """Q4_K (most of a Q4_K_M file, llama.cpp's usual download) is 8 sub-blocks of 32 values with their
    own scale and min: int4_asym g32's structure. It was dequantized and quantized again on a new grid
    (NMSE ~1e-3 against the file's values, a fifth of Q4_K's own error added); its codes are now kept,
    each sub-block's scale and min rounded to fp16 (NMSE below 1e-6), said in its notice."""
    from pyllm.convert.gguf_source import GGUFSource

    good = str(tmp_path / "good.gguf")
    hf_dir = make_tiny_llama(str(tmp_path / "src"), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=2)
    write_gguf(hf_dir, good, Q.Q8_0)
    reader = gguf.GGUFReader(good)
    tensors = {t.name: (random_q4_k_blocks((int(t.shape[1]), int(t.shape[0])), seed=i), Q.Q4_K)
               for i, t in enumerate(reader.tensors) if t.tensor_type == Q.Q8_0 and t.name.startswith("blk.")}
    path = rewrite_gguf(good, str(tmp_path / "q4k.gguf"), tensors=tensors)
    report = convert_checkpoint(path, str(tmp_path / "q4k.pllm"), progress=False, log=sys.stderr)
    err = capsys.readouterr().err
    assert "Q4_K tensor(s) kept as int4_asym g32: their codes, each sub-block's scale and min rounded to fp16" in err
    layers = [b for b in report.nmse if b.startswith("model.layers") and "down_proj" not in b]
    assert len(layers) == 12 and max(report.nmse[b] for b in layers) < 1e-6, report.nmse
    with pyllm.LLM(str(tmp_path / "q4k.pllm"), n_threads=1) as llm:
        assert {llm.model.linears[b] for b in layers} == {("int4_asym", 32)}
    # asked for by name, as a Q4_1 file's blocks are kept under --quant int4_asym
    report = convert_checkpoint(path, str(tmp_path / "asked.pllm"), quant="int4_asym", progress=False)
    assert max(report.nmse[b] for b in layers) < 1e-6, report.nmse
    source = GGUFSource(path)  # the codes are the file's: one row, against gguf's decoding
    packed = source.load_codes("model.layers.0.mlp.up_proj.weight")
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    file_values = gguf.quants.dequantize(tensors[t.name][0], Q.Q4_K)
    from pyllm.quant import dequantize
    np.testing.assert_allclose(dequantize(packed), file_values, rtol=0, atol=2e-3 * np.abs(file_values).max())


def random_iq4_blocks(kind, shape: tuple[int, int], seed: int) -> np.ndarray:
    """IQ4_NL blocks (32 values: f16 d, 16 bytes of codes) with d = +-1e-3, or IQ4_XS super-blocks (256
    values: f16 d, 6-bit sub-block scales, 128 bytes of codes) with d = 1e-4, of random codes and sub-block
    scales: uint8 [rows, bytes]."""
    rows, cols = shape
    block, size = gguf.constants.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d = (1e-3 * rng.choice([-1, 1], (rows, cols // block)) if kind == Q.IQ4_NL
         else np.full((rows, cols // block), 1e-4))
    blocks[..., 0:2] = d.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("kind, exact", [(Q.IQ4_NL, True), (Q.IQ4_XS, False)])
def test_iq4_files_keep_their_values_in_int8(tmp_path, capsys, kind, exact):
    """IQ4_NL and IQ4_XS (a non-uniform 16-value grid, integers -127..113, under a scale per 32 values)
    were re-quantized to int4_asym's uniform grid: 2/3 of their own error added (NMSE 4e-3 against the
    file's values, measured on llama-quantize's output). Their codes are int8 values at that scale: IQ4_NL
    is kept exactly, IQ4_XS with its sub-block scales rounded to fp16; the notice says so, and the size."""
    good = str(tmp_path / "good.gguf")
    hf_dir = make_tiny_llama(str(tmp_path / "src"), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=2)
    write_gguf(hf_dir, good, Q.Q8_0)
    tensors = {t.name: (random_iq4_blocks(kind, (int(t.shape[1]), int(t.shape[0])), seed=i), kind)
               for i, t in enumerate(gguf.GGUFReader(good).tensors)
               if t.tensor_type == Q.Q8_0 and t.name.startswith("blk.")}
    path = rewrite_gguf(good, str(tmp_path / "iq4.gguf"), tensors=tensors)
    report = convert_checkpoint(path, str(tmp_path / "iq4.pllm"), progress=False, log=sys.stderr)
    err = capsys.readouterr().err
    assert (f"{kind.name} tensor(s) stored as int8, exactly" if exact else f"{kind.name} tensor(s) kept as int8 g32: "
            "their codes as int8 values") in err and "at twice" in err
    layers = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                                   "self_attn.v_proj", "self_attn.o_proj",
                                                                   "mlp.gate_proj", "mlp.up_proj")]
    if exact:
        assert all(b in report.kept_exactly for b in layers)
    else:
        assert max(report.nmse[b] for b in layers) < 1e-6, report.nmse
    from pyllm.convert.gguf_source import GGUFSource
    from pyllm.quant import dequantize

    source = GGUFSource(path)  # against gguf's own decoding of the file
    packed = source.load_native(layers[5] + ".weight") if exact else source.load_codes(layers[5] + ".weight")
    assert packed.format == "int8" and (packed.scales >= 0).all()
    file_values = gguf.quants.dequantize(tensors["blk.0.ffn_up.weight"][0], kind)
    if exact:
        assert np.array_equal(dequantize(packed), file_values)
    else:
        np.testing.assert_allclose(dequantize(packed), file_values, rtol=0, atol=2e-3 * np.abs(file_values).max())
    with pyllm.LLM(str(tmp_path / "iq4.pllm"), n_threads=1) as llm:
        assert {llm.model.linears[b] for b in layers} == {("int8", 32)}


def test_every_gguf_type_has_a_row_saying_what_pyllm_does(tmp_path):
    """Types pyllm had no rule for went to f16 without a word (MXFP4, NVFP4), or failed half-way. Each
    type the gguf package knows has a row: kept exactly in a pyllm layout, re-quantized with a notice,
    or refused naming tensor and type (a type added to gguf after this table is refused until it has
    one). Each readable row is readable by this gguf package."""
    from gguf.constants import GGML_QUANT_SIZES

    from pyllm.convert.gguf_source import GGUF_TYPES

    from pyllm.convert.gguf_source import gguf_type

    # every type of the gguf package this table was written against; one a later gguf adds (gguf is not
    # pinned) is refused until it has a row, which must not fail a clean install's tests
    known_when_written = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K",
                          "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ4_NL", "IQ4_XS", "MXFP4"}
    assert known_when_written <= set(GGUF_TYPES)
    for kind in Q:
        if kind.name not in GGUF_TYPES:
            assert gguf_type(kind.name).layout is None and "no rule" in gguf_type(kind.name).why, kind.name
            continue
        row = GGUF_TYPES[kind.name]
        if row.layout is None:
            assert row.why and not row.exact, kind.name
        elif not row.exact:
            assert row.why and row.layout[0] in ("int8", "int4_asym"), kind.name
        if row.layout is not None and kind.name not in ("F32", "F16", "BF16"):  # decodable here
            block, size = GGML_QUANT_SIZES[kind]
            gguf.quants.dequantize(np.zeros((1, size), np.uint8), kind)


@pytest.mark.parametrize("block, expected", [(Q.Q5_1, "int8")])
def test_block_types_without_a_layout_are_requantized_with_a_notice(hf_dir, tmp_path, block, expected, capsys):
    from pyllm.convert.gguf_source import requantized_format

    path = str(tmp_path / "model.gguf")
    write_gguf(hf_dir, path, block)
    report = convert_checkpoint(path, str(tmp_path / "model.pllm"), progress=False, log=sys.stderr)
    err = capsys.readouterr().err
    assert f"re-quantized to {expected} g32" in err and block.name in err and err.count(block.name) == 1
    layers = {b: layout for b, layout in pyllm.LLM(str(tmp_path / "model.pllm"), n_threads=1).model.linears.items()
              if "down_proj" not in b and b not in ("model.embed_tokens", "lm_head")}
    assert set(layers.values()) == {(expected, 32)}
    assert report.layouts[f"{expected} g32"] >= len(layers)
    assert max(report.nmse[b] for b in layers) < 1e-3  # int8 of the 5-bit values: close to the source
    assert requantized_format("Q6_K")[0] == "int8" and requantized_format("Q4_K")[0] == "int4_asym"


PARITY_TEXTS = [
    "Hello world", " leading space", "The quick brown fox jumps over the lazy dog. 12345 67",
    "def main():\n    print('hello, world')\n\n\treturn 0", "中文测试：今天天气很好", "Emoji 😀🎉 café naïve",
    "it's we'll they'd I'M", "  two  spaces   three", "<|im_start|>user\nhi<|im_end|>", "", "\n\n\r\n x",
    "unseen: ζωή Ωmega ℵ 🙂",
    "x := 0\n    return 0",  # Llama 3's split keeps the space off the digit: ids differ from GPT-2's split
]


def transformers_gguf_tokenizer(path: str):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def assert_tokenizer_parity(gguf_path: str, tmp_path):
    out = str(tmp_path / "tok.pllm")
    convert_checkpoint(gguf_path, out, progress=False)
    ours = pyllm.LLM(out, n_threads=1)
    theirs = transformers_gguf_tokenizer(gguf_path)
    for text in PARITY_TEXTS:
        assert ours.tokenize(text) == theirs(text)["input_ids"], text
        ids = ours.tokenize(text, add_special_tokens=False)
        assert ours.detokenize(ids, skip_special_tokens=False) == theirs.decode(ids), text
    ours.close()


def test_llama3_bpe_tokenizer_matches_transformers(hf_dir, tmp_path):
    path = str(tmp_path / "llama3.gguf")
    write_gguf(hf_dir, path, Q.Q8_0, pre="llama-bpe")
    assert_tokenizer_parity(path, tmp_path)


def test_qwen2_bpe_vocabulary_splits_as_qwen2s_tokenizer(hf_dir, tmp_path):
    """A "qwen2" pre-tokenizer was read as GPT-2's split with single digits: newlines and indentation were
    cut otherwise than Qwen2's own tokenizer.json (and llama.cpp) cut them ("\\n    return" in code), other ids
    for the same text."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    path = str(tmp_path / "qwen2.gguf")
    write_gguf(hf_dir, path, Q.Q8_0, pre="qwen2")
    out = str(tmp_path / "qwen2.pllm")
    convert_checkpoint(path, out, progress=False)
    qwen2 = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    # the pre-tokenizer of Qwen2's tokenizer.json (transformers' Qwen2Converter writes the same)
    qwen2.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                                   r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    with pyllm.LLM(out, n_threads=1) as llm:
        for text in PARITY_TEXTS + ["(hello) x\n\n}\n\nfoo", "It'S done", "a.\n\nb"]:
            assert llm.tokenize(text, add_special_tokens=False) == qwen2.encode(text, add_special_tokens=False).ids, text


@pytest.mark.parametrize("pre, llama3", [("llama-bpe", True), ("llama3", True), ("smaug-bpe", False),
                                         ("default", False)])
def test_llama3_bpe_vocabularies_follow_llama_cpps_defaults(tmp_path, pre, llama3):
    """llama.cpp's LLAMA3 pre-tokenizer type adds BOS when the file does not say (a Llama 3 GGUF without
    tokenizer.ggml.add_bos_token ran without its BOS here) and ignores merges (a word that is a token is
    that token, as Llama 3's tokenizer.json says): "abc" was split "ab" + "c" by the merges."""
    from tokenizers.pre_tokenizers import ByteLevel

    letters = sorted(ByteLevel.alphabet())

    def vocabulary(w):
        tokens = letters + ["ab", "abc", "<|begin_of_text|>", "<|end_of_text|>"]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
        w.add_token_merges(["a b"])
        w.add_bos_token_id(len(tokens) - 2)
        w.add_eos_token_id(len(tokens) - 1)

    path = str(tmp_path / "model.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), path, Q.Q8_0,
               vocabulary=vocabulary)
    out = str(tmp_path / "model.pllm")
    convert_checkpoint(path, out, progress=False)
    with pyllm.LLM(out, n_threads=1) as llm:
        bos, ab, abc = len(letters) + 2, len(letters), len(letters) + 1
        assert llm.tokenize("abc") == ([bos, abc] if llama3 else [ab, letters.index("c")])


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    import sentencepiece as spm

    from conftest import TRAINING_TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TRAINING_TEXT * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   user_defined_symbols=["<tool>"], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
             else 4 if tokens[i] == "<tool>" else 1 for i in range(n)]

    def vocabulary(w):  # as llama.cpp's converter writes a SentencePiece vocabulary
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(sp.unk_id())
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())

    src = make_tiny_llama(str(tmp_path / "src"), vocab_size=n, hidden_size=64, intermediate_size=128,
                          bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id())
    path = str(tmp_path / "sp.gguf")
    write_gguf(src, path, Q.Q8_0, vocabulary=vocabulary)
    assert_tokenizer_parity(path, tmp_path)
    llm = pyllm.LLM(str(tmp_path / "tok.pllm"), n_threads=1)
    assert llm.tokenize("hi")[0] == sp.bos_id()  # BOS by default, as llama.cpp does for SentencePiece


@pytest.mark.parametrize("bad", [float("nan"), "x"])
def test_a_sentencepiece_score_that_is_not_a_number_is_refused(tmp_path, bad):
    """Merges of a SentencePiece vocabulary are ranked by score: a NaN sorted in no defined order (ids
    unlike llama.cpp's, in silence); a string was a bare "cannot be read: ValueError"."""
    tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 123)] + ["▁", "ab", "abc", "▁a"]
    scores = [0.0] * 3 + [-float(i) for i in range(len(tokens) - 3)]
    scores[30] = bad

    def vocabulary(w):
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        if isinstance(bad, str):
            w.add_key_value("tokenizer.ggml.scores", [str(x) for x in scores], V.ARRAY, sub_type=V.STRING)
        else:
            w.add_token_scores(scores)

    src = make_tiny_llama(str(tmp_path / "src"), vocab_size=len(tokens), hidden_size=64, intermediate_size=128,
                          bos_token_id=1, eos_token_id=2)
    path = str(tmp_path / "nan.gguf")
    write_gguf(src, path, Q.Q8_0, vocabulary=vocabulary)
    with pytest.raises(FormatError, match=re.escape(path) + r": tokenizer.ggml.scores\[(0|30)\] .* must be a number"):
        convert_checkpoint(path, str(tmp_path / "nan.pllm"), progress=False)
    assert not (tmp_path / "nan.pllm").exists()


def _sentencepiece_gguf(tmp_path, tokens: list[str], scores: list[float], name: str) -> str:
    """A tiny LLaMA written as a GGUF file with a SentencePiece ("llama") vocabulary of `tokens`
    (<unk>, <s>, </s> first) and their scores; its path."""
    def vocabulary(w):
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)

    src = make_tiny_llama(str(tmp_path / "src"), vocab_size=len(tokens), hidden_size=64, intermediate_size=128,
                          bos_token_id=1, eos_token_id=2)
    path = str(tmp_path / name)
    write_gguf(src, path, Q.Q8_0, vocabulary=vocabulary)
    return path


def test_a_very_long_sentencepiece_token_converts_quickly(tmp_path):
    """The merges of a SentencePiece vocabulary are every split of a token into two tokens: trying
    every cut of a 1,000,000-character token took minutes (each cut slices the whole token), so one
    such token in a GGUF file held `pyllm convert`. Only cuts into lengths tokens have are tried."""
    import time

    from pyllm.convert.checkpoint import _generate_merges
    from pyllm.convert.gguf_source import sentencepiece_merges

    tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 123)] + ["▁", "ab", "abc", "▁a", "a" * 1_000_000]
    scores = [0.0] * 3 + [-float(i) for i in range(len(tokens) - 3)]
    start = time.monotonic()
    merges = sentencepiece_merges(tokens, scores)
    assert ("a", "b") in merges and ("ab", "c") in merges and ("▁", "a") in merges
    assert ("a" * 999_999, "a") not in merges  # no such token
    assert _generate_merges({t: i for i, t in enumerate(tokens)})[:1] == [("a", "b")]
    assert time.monotonic() - start < 2

    path = _sentencepiece_gguf(tmp_path, tokens, scores, "long.gguf")
    start = time.monotonic()
    convert_checkpoint(path, str(tmp_path / "long.pllm"), progress=False)
    assert time.monotonic() - start < 20
    with pyllm.LLM(str(tmp_path / "long.pllm"), n_threads=1) as llm:
        assert llm.tokenizer.decode(llm.tokenize("abc")) == "abc"


def test_a_fifo_or_device_given_as_a_gguf_is_refused_without_reading_it(tmp_path):
    """`pyllm convert FIFO.gguf` waited for ever for a writer in open() (a FIFO given as the model, or as a
    shard of a split one); now refused at once, naming the path, as the safetensors reader refuses it."""
    import threading

    fifo = str(tmp_path / "model.gguf")
    os.mkfifo(fifo)
    good = str(tmp_path / "good.gguf")
    write_gguf(make_tiny_llama(str(tmp_path / "src"), hidden_size=64, intermediate_size=128), good, Q.Q8_0)
    shards = split_gguf(good, tmp_path)
    os.unlink(shards[1])
    os.mkfifo(shards[1])
    for given, message in ((fifo, f"{fifo} is not a regular file"),
                           (shards[0], f"{shards[1]} is not a regular file")):
        errors = []

        def convert():
            try:
                convert_checkpoint(given, str(tmp_path / "x.pllm"), progress=False)
            except Exception as e:
                errors.append(e)
        worker = threading.Thread(target=convert, daemon=True)
        worker.start()
        worker.join(timeout=5)
        if worker.is_alive():  # stuck in open(): a writer lets it go
            os.close(os.open(given if given == fifo else shards[1], os.O_WRONLY | os.O_NONBLOCK))
            worker.join(timeout=20)
            pytest.fail(f"reading {given} waited for a writer")
        assert len(errors) == 1 and isinstance(errors[0], FormatError) and message in str(errors[0]), errors


def test_a_vocabulary_of_endlessly_splittable_pieces_is_refused(tmp_path):
    """The pieces "a", "aa", ... of every length to 3,000 (a 4.5 MB vocabulary) split into two pieces
    in 4.5 million ways of 9 GB: finding the SentencePiece merges ran the converter out of memory. The
    characters sliced are bounded (limits.MAX_MERGE_SPLIT_CHARS), and the GGUF file is named."""
    from pyllm.convert.checkpoint import _generate_merges
    from pyllm.convert.gguf_source import sentencepiece_merges
    from pyllm.limits import MAX_MERGE_SPLIT_CHARS

    tokens = ["<unk>", "<s>", "</s>"] + ["a" * k for k in range(1, 3000)]
    scores = [0.0] * 3 + [-float(i) for i in range(len(tokens) - 3)]
    message = f"more than {MAX_MERGE_SPLIT_CHARS} characters' worth of ways .*limits.MAX_MERGE_SPLIT_CHARS"
    with pytest.raises(FormatError, match=message):
        sentencepiece_merges(tokens, scores)
    with pytest.raises(FormatError, match=message):
        _generate_merges({t: i for i, t in enumerate(tokens)})

    path = _sentencepiece_gguf(tmp_path, tokens, scores, "split.gguf")
    with pytest.raises(FormatError, match=re.escape(path) + ".*" + message):
        convert_checkpoint(path, str(tmp_path / "split.pllm"), progress=False)
    assert not (tmp_path / "split.pllm").exists()
