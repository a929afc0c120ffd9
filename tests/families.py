"""The tiny random models of every supported family: one table, two configurations each, built with
transformers inside the tests (as vLLM's tests/models/registry.py lists its models).

Each configuration exercises the family's options: GQA and MHA, tied and untied output, biases,
partial rotary embedding, a sliding window shorter than the test prompt, local/global layers,
soft-capping. Sizes stay tiny (hidden 64, 2-3 layers) so a family's whole suite runs in seconds."""

from __future__ import annotations

from conftest import train_bpe_tokenizer

IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, **IDS)

# family -> (transformers config class, model class, {case name: config kwargs})
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {
        "gqa": dict(SMALL),
        "mha_tied_bias": dict(SMALL, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
                              mlp_bias=True),
    }),
    "mistral": ("MistralConfig", "MistralForCausalLM", {
        "window24": dict(SMALL, sliding_window=24),
        "mha_no_window": dict(SMALL, num_key_value_heads=4, sliding_window=None, tie_word_embeddings=True),
    }),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {
        "gqa": dict(SMALL),
        "tied_window": dict(SMALL, tie_word_embeddings=True, use_sliding_window=True, sliding_window=20,
                            max_window_layers=1, num_hidden_layers=3),
    }),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {
        "gqa_head32": dict(SMALL, head_dim=32),
        "mha_bias": dict(SMALL, num_key_value_heads=4, head_dim=16, attention_bias=True, tie_word_embeddings=True),
    }),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "softcap_window": dict(SMALL, head_dim=16, sliding_window=20, query_pre_attn_scalar=16,
                               attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
        "mha_3layers": dict(SMALL, num_hidden_layers=3, num_key_value_heads=4, head_dim=32, query_pre_attn_scalar=24,
                            sliding_window=40, final_logit_softcapping=None, attn_logit_softcapping=None,
                            tie_word_embeddings=False),
    }),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "local_global": dict(SMALL, head_dim=16, sliding_window=20, query_pre_attn_scalar=16,
                             layer_types=["sliding_attention", "full_attention"],
                             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                              "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
        "linear_global": dict(SMALL, num_hidden_layers=3, head_dim=32, sliding_window=24, query_pre_attn_scalar=32,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                               "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                  "rope_theta": 100000.0}},
                              tie_word_embeddings=False),
    }),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {
        "gqa_partial": dict(SMALL, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.5}),
        "mha_tied": dict(SMALL, num_key_value_heads=4, tie_word_embeddings=True),
    }),
    "bloom": ("BloomConfig", "BloomForCausalLM", {
        "heads4": dict(vocab_size=512, hidden_size=64, n_layer=2, n_head=4, **IDS),
        "heads6_untied": dict(vocab_size=512, hidden_size=96, n_layer=3, n_head=6, tie_word_embeddings=False, **IDS),
    }),
    "opt": ("OPTConfig", "OPTForCausalLM", {
        "relu": dict(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256, word_embed_proj_dim=64, **IDS),
        "gelu_untied": dict(vocab_size=512, hidden_size=64, ffn_dim=100, num_hidden_layers=3, num_attention_heads=2,
                            max_position_embeddings=200, word_embed_proj_dim=64, activation_function="gelu",
                            tie_word_embeddings=False, **IDS),
    }),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {
        "gelu_new": dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256, **IDS),
        "inner100_relu": dict(vocab_size=512, n_embd=64, n_layer=3, n_head=2, n_positions=160, n_inner=100,
                              activation_function="relu", **IDS),
    }),
    "glm": ("GlmConfig", "GlmForCausalLM", {
        "gqa_partial": dict(SMALL, head_dim=16),
        "mha_no_bias": dict(SMALL, num_key_value_heads=4, head_dim=32, attention_bias=False, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.75}),
    }),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {
        "gqa_partial": dict(SMALL, head_dim=16),
        "mha_3layers": dict(SMALL, num_hidden_layers=3, num_key_value_heads=4, head_dim=16),
    }),
}

CASES = [(family, case) for family, (_, _, cases) in FAMILIES.items() for case in cases]


def make_tiny_model(family: str, case: str, directory: str, seed: int = 0, **overrides) -> str:
    """Saves a random-initialised model of `family` configured as `case` (its config kwargs updated by
    `overrides`) (+ a BPE tokenizer) in directory."""
    import torch
    import transformers

    config_name, model_name, cases = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**cases[case], **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    # the default init (std 0.02) gives near-uniform logits; widen it so the tests compare distinct,
    # confident predictions (norm weights near 1, or near 0 where the family applies 1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = p.dim() == 1 and ("norm" in name or ".ln_" in name or "ln_f" in name)
            if is_norm and name.endswith("weight"):
                p.copy_((0.0 if family.startswith("gemma") else 1.0) + 0.1 * torch.randn_like(p))
            elif is_norm:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(directory)
    train_bpe_tokenizer(directory)
    return directory


def load_reference(family: str, directory: str):
    """The transformers model of `directory` in fp32 with eager attention (soft-capping needs it)."""
    import torch
    import transformers

    model_class = getattr(transformers, FAMILIES[family][1])
    return model_class.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
