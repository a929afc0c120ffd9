"""Random-weight models of pyllm's families at TinyLlama-1.1B-like shapes, for the speed tables.

    random_family_checkpoint(family, directory)             a transformers checkpoint (f16, SmolLM2's tokenizer)
    random_family_gguf(family, out, work, llama_cpp_src)    that checkpoint through llama.cpp's convert_hf_to_gguf.py

Shapes: hidden 2048, 22 layers, 32 query heads, SmolLM2's vocabulary (49152) and tokenizer; where
the family has them, 4 KV heads and a gated feed-forward of 5632 (TinyLlama-1.1B's). BLOOM, GPT-2
and OPT have neither grouped KV heads nor a gate: they keep multi-head attention and their 4 x
hidden feed-forward (8192), so they are larger (~1.5B parameters); each row of the table carries
its MB/token. The family's own options are on: Qwen2's q/k/v biases, Qwen3's per-head q/k norms,
Gemma 2's alternating local (window 512) and global layers with attention logits soft-capped at 50 and
final logits at 30, Gemma 3's local/global layers (five sliding layers of window 512 to one global, as
Gemma 3 1B); both Gemmas' (1 + w) norms, post norms and query_pre_attn_scalar = head_dim (64, as Gemma 2
2B and Gemma 3 1B have it at their head_dim of 256; llama.cpp assumes it for all but Gemma 2 27B),
Phi-3's fused qkv and gate/up, GLM-4's partial rotary, post norms and fused gate/up.

Weights: every matrix normal with std 0.02 (seeded per tensor, stored in f16, so that the F16 GGUF
holds them exactly), norms as the family's initialisation leaves them (1, or 0 under Gemma's 1 + w),
biases 0. The tokenizer is SmolLM2's (a byte-level BPE that llama.cpp's converter knows, pre-tokenizer
"smollm"): the families' own tokenizers would change only the vocabulary size, and the test is speed.
GLM's converters look up a "<|user|>" token; the GLM checkpoints rename one of SmolLM2's unused
special tokens to it. llama.cpp's Gemma 2 converter class reads only a SentencePiece tokenizer.model
(Gemma 3's falls back to tokenizer.json): for the families in BPE_VOCAB the converter runs with that
class's set_vocab replaced by the converter's own byte-level BPE path (_set_vocab_gpt2, what Gemma 3's
class calls without a tokenizer.model), so the GGUF holds SmolLM2's vocabulary of 49152 as a "gpt2"
tokenizer with pre-tokenizer "smollm". llama.cpp loads and runs such a file unchanged.

llama.cpp's converter is used as a user would (python convert_hf_to_gguf.py DIR --outtype f16) from
the llama.cpp source tree (llama_cpp_src; the sdist of llama-cpp-python 0.3.36 holds it under
vendor/llama.cpp). It needs torch and transformers (benchmark-only dependencies), as this module does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

VOCAB = 49152
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 2048, 22, 32, 4, 5632
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)  # SmolLM2's <|im_start|>, <|im_end|>
GATED = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
             num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=2048, **IDS)
GEMMA3_LAYERS = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(LAYERS)]
GEMMA2_LAYERS = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(LAYERS)]

# family -> (transformers config class, model class, config kwargs, llama.cpp runs it)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(GATED, tie_word_embeddings=False), True),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(GATED, head_dim=64, tie_word_embeddings=False), True),
    # query_pre_attn_scalar = head_dim, as in Gemma 2 2B and 9B (256 = their head_dim); llama.cpp scales
    # queries by 1/sqrt(head_dim) for every Gemma 2 but the 46-layer 27B, so 64 keeps both engines' logits equal
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(GATED, head_dim=64, query_pre_attn_scalar=64, sliding_window=512, layer_types=GEMMA2_LAYERS,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6), True),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(GATED, head_dim=64, query_pre_attn_scalar=64, sliding_window=512, layer_types=GEMMA3_LAYERS,
                    rms_norm_eps=1e-6), True),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(GATED, tie_word_embeddings=False), True),
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **IDS), True),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=2048,
                  n_ctx=2048, **IDS), True),  # llama.cpp's converter reads n_ctx, which transformers 5 no longer writes
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(GATED, head_dim=64, tie_word_embeddings=False), True),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(GATED, head_dim=64, tie_word_embeddings=False), True),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=4 * HIDDEN, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, max_position_embeddings=2048, word_embed_proj_dim=HIDDEN,
                 **IDS), False),
}
# llama.cpp's converters of GLM and GLM-4 look these tokens up by name
GLM_TOKENS = {"<|user|>": "<empty_output>"}


# families whose llama.cpp converter class reads only a SentencePiece tokenizer.model (Gemma 2's set_vocab)
BPE_VOCAB = {"gemma2"}

# convert_hf_to_gguf.py run as it is, except for two things. transformers 5 would give a qwen2 checkpoint
# Qwen2's own tokenizer class (its pre-tokenizer regex in place of the file's, which llama.cpp's converter
# then does not recognise): the family's model type maps to the class that reads tokenizer.json as is.
# For a family in BPE_VOCAB, the converter class of its transformers class (argv[2]; "" for none) reads
# tokenizer.json through the converter's own byte-level BPE path, _set_vocab_gpt2, as Gemma 3's class
# does when a checkpoint has no tokenizer.model
_CONVERT = """import os, runpy, sys
import transformers.models.auto.tokenization_auto as auto
model_type, bpe_class, script = sys.argv[1:4]
auto.TOKENIZER_MAPPING_NAMES[model_type] = "TokenizersBackend"
sys.argv = [script] + sys.argv[4:]
sys.path.insert(0, os.path.dirname(script))
if bpe_class:
    from conversion import get_model_class
    get_model_class(bpe_class).set_vocab = lambda self: self._set_vocab_gpt2()
runpy.run_path(script, run_name="__main__")
"""


def llama_cpp_runs(family: str) -> bool:
    """Whether llama.cpp has an architecture for `family` (OPT: no)."""
    return _family(family)[3]


def _family(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} ({', '.join(FAMILIES)})")
    return FAMILIES[family]


def _write_tokenizer(directory: str, family: str) -> None:
    """SmolLM2's tokenizer files, with the GLM token renamed where the family needs it."""
    from reference_checkpoint import default_reference_checkpoint

    source = default_reference_checkpoint()
    with open(os.path.join(source, "tokenizer.json"), encoding="utf-8") as f:
        tokenizer = json.load(f)
    # SmolLM2's own pre-tokenizer (digits split one by one, then GPT-2's byte-level split): its GGUF
    # keeps only the name "smollm", from which transformers' GGUF reader rebuilds GPT-2's, a
    # tokenizer llama.cpp's converter does not recognise
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    if family.startswith("glm"):
        for new, old in GLM_TOKENS.items():
            index = tokenizer["model"]["vocab"].pop(old)
            tokenizer["model"]["vocab"][new] = index
            for added in tokenizer["added_tokens"]:
                if added["content"] == old:
                    added["content"] = new
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    with open(os.path.join(source, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    # Phi-3's converter reads a BPE vocabulary only for this class (its default is SentencePiece)
    config["tokenizer_class"] = "GPT2Tokenizer"
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)


def random_family_checkpoint(family: str, directory: str, seed: int = 0) -> str:
    """A random `family` model at the module's shapes, saved by transformers in f16 with SmolLM2's
    tokenizer in `directory` (reused when it holds one already). About 2.2-3 GB on disk."""
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    import torch
    import transformers

    config_name, model_name, kwargs, _ = _family(family)
    tmp = directory + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"writing {directory} (random {family}, 1.1B-like shapes)", file=sys.stderr, flush=True)
    config = getattr(transformers, config_name)(**kwargs)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        model = getattr(transformers, model_name)(config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for index, (name, p) in enumerate(model.named_parameters()):
            if p.dim() >= 2:
                generator = torch.Generator().manual_seed(seed * 100003 + index)
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(0.02))
    model.save_pretrained(tmp)
    _write_tokenizer(tmp, family)
    os.replace(tmp, directory)
    return directory


def random_family_gguf(family: str, out: str, work: str, llama_cpp_src: str) -> str:
    """The F16 GGUF of random_family_checkpoint(family), written by llama.cpp's convert_hf_to_gguf.py
    found in llama_cpp_src; the checkpoint (under work) is deleted once the GGUF is written.
    Raises ValueError for a family llama.cpp cannot run, FileNotFoundError without the converter,
    RuntimeError when the converter fails."""
    if not llama_cpp_runs(family):
        raise ValueError(f"llama.cpp has no architecture for {family}")
    if os.path.exists(out):
        return out
    script = os.path.join(llama_cpp_src, "convert_hf_to_gguf.py")
    if not os.path.exists(script):
        raise FileNotFoundError(f"llama.cpp's converter is not at {script} (set --llama-cpp-src / LLAMA_CPP_SRC)")
    checkpoint = random_family_checkpoint(family, os.path.join(work, f"random-1.1b-{family}-hf"))
    print(f"converting {checkpoint} -> {out} with {script}", file=sys.stderr, flush=True)
    config_name, model_name, _, _ = _family(family)
    model_type = getattr(__import__("transformers"), config_name).model_type
    bpe_class = model_name if family in BPE_VOCAB else ""
    # the name is neutral: llama.cpp sets attributes of Phi-3's own special tokens (</s>, <unk>, <s>) on any
    # model whose name contains "phi3", and fails to load a vocabulary without them
    done = subprocess.run([sys.executable, "-c", _CONVERT, model_type, bpe_class, script, checkpoint,
                           "--outtype", "f16", "--model-name", "random-1.1b", "--outfile", out + ".partial"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {family}: {done.stderr[-2000:]}")
    os.replace(out + ".partial", out)
    shutil.rmtree(checkpoint)
    return out
