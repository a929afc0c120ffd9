"""OPT (OPTForCausalLM): learned absolute positions (table rows offset by 2), pre-norm LayerNorm with
biases, ReLU MLP (fc1/fc2), biases on every projection."""

from __future__ import annotations

from .base import Architecture, TensorRecipe, activation_from_hf, base_config, need, refuse, same

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding: position p reads row p + 2


def config_from_hf(cfg: dict):
    hidden = need(cfg, "hidden_size")
    if not cfg.get("do_layer_norm_before", True):
        raise refuse("post-norm layers (do_layer_norm_before=false, OPT-350m)", "opt")
    if cfg.get("_remove_final_layer_norm"):
        raise refuse("_remove_final_layer_norm=true", "opt")
    if cfg.get("word_embed_proj_dim", hidden) != hidden:
        raise refuse("project_in/project_out (word_embed_proj_dim != hidden_size)", "opt")
    if not cfg.get("layer_norm_elementwise_affine", True):
        raise refuse("LayerNorm without weights (layer_norm_elementwise_affine=false)", "opt")
    bias = bool(cfg.get("enable_bias", True))
    return base_config(
        dict(cfg, intermediate_size=need(cfg, "ffn_dim"), num_key_value_heads=cfg["num_attention_heads"],
             rms_norm_eps=1e-5, rope_parameters=None, tie_word_embeddings=cfg.get("tie_word_embeddings", True)),
        "opt", norm_type="layer_norm", position_embedding="learned", ffn_type="plain",
        hidden_act=activation_from_hf(cfg.get("activation_function", "relu"), "opt"),
        attention_bias=bias, attention_out_bias=bias, mlp_bias=bias)


def tensors(config):
    d = "model.decoder."
    recipes = {"model.embed_tokens.weight": same(d + "embed_tokens.weight"),
               "model.embed_positions.weight": TensorRecipe((d + "embed_positions.weight",),
                                                            lambda a: a[0][POSITION_OFFSET:])}
    for part in ("weight", "bias"):
        recipes[f"model.norm.{part}"] = same(d + f"final_layer_norm.{part}")
    if not config.tie_word_embeddings:
        recipes["lm_head.weight"] = same("lm_head.weight")
    names = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
             "self_attn.v_proj": "self_attn.v_proj", "self_attn.o_proj": "self_attn.out_proj",
             "mlp.up_proj": "fc1", "mlp.down_proj": "fc2"}
    for i in range(config.num_hidden_layers):
        src, p = f"{d}layers.{i}.", f"model.layers.{i}."
        for ours, theirs in names.items():
            recipes[p + ours + ".weight"] = same(src + theirs + ".weight")
        for part in ("weight", "bias"):
            recipes[p + f"input_layernorm.{part}"] = same(src + f"self_attn_layer_norm.{part}")
            recipes[p + f"post_attention_layernorm.{part}"] = same(src + f"final_layer_norm.{part}")
    for name in config.bias_names():
        ours = name[len("model.layers."):].split(".", 1)
        recipes[name] = same(f"{d}layers.{ours[0]}." + names[ours[1][:-len(".bias")]] + ".bias")
    return recipes


OPT = Architecture(
    name="opt", model_types=("opt",), hf_classes=("OPTForCausalLM",), gguf_name=None,
    config_from_hf=config_from_hf, tensors=tensors,
    lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    hf_embedding="model.decoder.embed_tokens.weight",
    notes="LayerNorm, learned positions (offset 2), ReLU MLP, biases",
)
