"""GPT-2 (GPT2LMHeadModel): learned absolute positions, pre-norm LayerNorm with biases, Conv1D weights
stored [in, out] (transposed here), q/k/v fused in c_attn (split here), GELU-tanh (gelu_new) MLP."""

from __future__ import annotations

from .base import Architecture, activation_from_hf, base_config, need, refuse, same, split_rows, transposed


def config_from_hf(cfg: dict):
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise refuse("scale_attn_by_inverse_layer_idx=true", "gpt2")
    if cfg.get("scale_attn_weights") is False:
        raise refuse("scale_attn_weights=false", "gpt2")
    hidden = need(cfg, "n_embd", "hidden_size")
    heads = need(cfg, "n_head", "num_attention_heads")
    return base_config(
        dict(cfg, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
             num_hidden_layers=need(cfg, "n_layer", "num_hidden_layers"),
             intermediate_size=cfg.get("n_inner") or 4 * hidden, rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
             max_position_embeddings=need(cfg, "n_positions", "max_position_embeddings"), rope_parameters=None,
             tie_word_embeddings=cfg.get("tie_word_embeddings", True)),
        "gpt2", norm_type="layer_norm", position_embedding="learned", ffn_type="plain",
        hidden_act=activation_from_hf(cfg.get("activation_function", "gelu_new"), "gpt2"),
        attention_bias=True, attention_out_bias=True, mlp_bias=True)


def tensors(config):
    t = "transformer."
    recipes = {"model.embed_tokens.weight": same(t + "wte.weight"),
               "model.embed_positions.weight": same(t + "wpe.weight")}
    for part in ("weight", "bias"):
        recipes[f"model.norm.{part}"] = same(t + f"ln_f.{part}")
    if not config.tie_word_embeddings:
        recipes["lm_head.weight"] = same("lm_head.weight")
    d = config.hidden_size
    for i in range(config.num_hidden_layers):
        src, p = f"{t}h.{i}.", f"model.layers.{i}."
        split_rows(recipes, src + "attn.c_attn",
                   {p + "self_attn.q_proj": d, p + "self_attn.k_proj": d, p + "self_attn.v_proj": d},
                   transpose=True, bias=True)
        for ours, theirs in (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                             ("mlp.down_proj", "mlp.c_proj")):
            recipes[p + ours + ".weight"] = transposed(src + theirs + ".weight")
            recipes[p + ours + ".bias"] = same(src + theirs + ".bias")
        for part in ("weight", "bias"):
            recipes[p + f"input_layernorm.{part}"] = same(src + f"ln_1.{part}")
            recipes[p + f"post_attention_layernorm.{part}"] = same(src + f"ln_2.{part}")
    return recipes


GPT2 = Architecture(
    name="gpt2", model_types=("gpt2",), hf_classes=("GPT2LMHeadModel",), gguf_name="gpt2",
    config_from_hf=config_from_hf, tensors=tensors,
    lora_targets=("c_attn", "c_proj", "c_fc"),
    hf_embedding="transformer.wte.weight",
    conv1d_modules=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    notes="LayerNorm, learned positions, Conv1D (transposed), fused qkv, GELU MLP, biases",
)
