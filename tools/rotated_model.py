"""A second test model for int4 quality: SmolLM2 with weights moved off every 4-bit grid, same function.

SmolLM2-135M-Instruct was distributed as Q4_1, so its matrices already sit on an asymmetric
group-32 int4 grid and flatter any quantizer that uses that grid. This tool builds, from the fp32
Hugging Face reference checkpoint (tools/reference_checkpoint.py), a checkpoint computing the
same function with weights that never saw a grid:

1. fold every RMSNorm weight into the linears that read the normalised vector (q/k/v take the
   input_layernorm, gate/up the post_attention_layernorm, lm_head the final norm); the norms
   become ones;
2. rotate the residual stream by a random orthogonal matrix R (fixed seed): embeddings E -> E R^T,
   matrices reading the stream W -> W R^T, matrices writing it (o_proj, down_proj) W -> R W.
   RMSNorm with unit weights commutes with R (||R h|| = ||h||), so every logit is unchanged;
3. untie the embeddings and lm_head (they now differ by the folded final norm).

    python tools/rotated_model.py [--out DIR] [--seed 0] [--gguf FILE]

rotated_checkpoint(src, dst) is also used on tiny models by the tests. write_rotated_gguf gives
llama.cpp the same weights (F32 GGUF, tokenizer copied from the default model's GGUF).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tokenizer.model")


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal matrix [n, n] (QR of a Gaussian, signs fixed), in float64."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def rotated_tensors(load, hf_config: dict, seed: int = 0):
    """Yields (name, f32 array) of the transformed model. load(name) -> f32 array of the source."""
    layers = hf_config["num_hidden_layers"]
    tied = bool(hf_config.get("tie_word_embeddings", False))
    rot = random_orthogonal(hf_config["hidden_size"], seed)  # [d, d]

    def reads(w, norm=None):  # w [out, d]: W diag(norm) R^T
        w = w.astype(np.float64) * (1.0 if norm is None else norm.astype(np.float64)[None, :])
        return (w @ rot.T).astype(np.float32)

    def writes(w):  # w [d, in]: R W
        return (rot @ w.astype(np.float64)).astype(np.float32)

    embed = load("model.embed_tokens.weight")
    yield "model.embed_tokens.weight", reads(embed)
    ones = np.ones(hf_config["hidden_size"], dtype=np.float32)
    for i in range(layers):
        p = f"model.layers.{i}."
        g_in = load(p + "input_layernorm.weight")
        g_post = load(p + "post_attention_layernorm.weight")
        for m in ("q_proj", "k_proj", "v_proj"):
            yield p + f"self_attn.{m}.weight", reads(load(p + f"self_attn.{m}.weight"), g_in)
        yield p + "self_attn.o_proj.weight", writes(load(p + "self_attn.o_proj.weight"))
        for m in ("gate_proj", "up_proj"):
            yield p + f"mlp.{m}.weight", reads(load(p + f"mlp.{m}.weight"), g_post)
        yield p + "mlp.down_proj.weight", writes(load(p + "mlp.down_proj.weight"))
        yield p + "input_layernorm.weight", ones
        yield p + "post_attention_layernorm.weight", ones
    yield "model.norm.weight", ones
    head = embed if tied else load("lm_head.weight")
    yield "lm_head.weight", reads(head, load("model.norm.weight"))


def rotated_checkpoint(src: str, dst: str, seed: int = 0) -> str:
    """Writes the transformed Hugging Face checkpoint of `src` to `dst` (cached: kept if present)."""
    from safetensors.numpy import save_file

    from pyllm.convert.checkpoint import Checkpoint

    if os.path.exists(os.path.join(dst, "config.json")):
        return dst
    ckpt = Checkpoint(src)
    try:
        hf_config = dict(ckpt.hf_config)
        if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
            raise ValueError("models with biases are not supported by the rotation")
        tensors = dict(rotated_tensors(ckpt.load, hf_config, seed))
    finally:
        ckpt.close()
    tmp = dst + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    hf_config["tie_word_embeddings"] = False
    hf_config["_rotation_seed"] = seed
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(tmp, name))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def write_rotated_gguf(checkpoint_dir: str, out: str, tokenizer_from: str) -> str:
    """An F32 llama GGUF of a Hugging Face checkpoint (cached), for llama.cpp's quantizer."""
    from llama_gguf import write_llama_gguf

    from pyllm.convert.checkpoint import Checkpoint

    if os.path.exists(out):
        return out
    ckpt = Checkpoint(checkpoint_dir)
    try:
        names = sorted(ckpt.names())
        # transformers 5 keeps rope_theta under rope_parameters; write_llama_gguf reads the top-level key
        config = dict(ckpt.hf_config, rope_theta=ckpt.config.rope_theta)
        return write_llama_gguf(out, config, ((n, ckpt.load(n)) for n in names), tokenizer_from,
                                name="smollm2-rotated")
    finally:
        ckpt.close()


def default_rotated_checkpoint(seed: int = 0) -> str:
    """The rotated SmolLM2-135M-Instruct, cached beside the reference checkpoint."""
    from reference_checkpoint import default_reference_checkpoint

    from pyllm import default_model

    return rotated_checkpoint(default_reference_checkpoint(),
                              os.path.join(default_model.cache_dir(), "test-cache", f"smollm2-135m-rotated-s{seed}"),
                              seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf", default=None, help="also write an F32 GGUF of the rotated model here")
    args = ap.parse_args()
    out = default_rotated_checkpoint(args.seed)
    print(out)
    if args.gguf:
        from pyllm import default_model

        print(write_rotated_gguf(out, args.gguf, default_model.fetch_gguf()))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
