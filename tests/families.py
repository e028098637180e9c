"""Tiny random checkpoints of the MLA families beyond DeepSeek that both transformers and vLLM
(0.32, CPU) build (issue 22 item 2).

Built: GLM-4.7-Flash (``glm4_moe_lite``): fp32, two layers (layer 0 dense, layer 1 four routed
experts, two per token, one shared), a low-rank query, a 512-wide latent with a 64-wide rope key,
and GLM's proportions (v_head_dim = qk_nope + qk_rope). Written with transformers' own model class,
so transformers is the reference and vLLM builds the model itself: only the attention backend is
ours. Config fields vLLM reads that transformers 5's config class does not write are set as the
released config.json carries them (``RELEASED``).

Looked at and not built (both libraries have the family, but vLLM 0.32 CPU cannot serve what
transformers writes):

- LongCat-Flash (``longcat_flash``): vLLM's router calls ``_moe_C.topk_softmax``, which the CPU
  build lacks (AttributeError at the first forward), whatever the attention backend.
- AXK1 (``axk1``): vLLM's model has a ``post_mlp_layernorm`` per layer that transformers' has not
  ("weights were not initialized from checkpoint").
- MiniCPM3 (``minicpm3``): vLLM computes its latent attention with plain attention (no MLA layer),
  so no MLA backend serves it.
"""

from pathlib import Path

from mla_plugin.fixtures.tiny_models import _token_ids, load_tokenizer, write_random_checkpoint

# family -> (transformers config class, architecture)
FAMILIES = {"glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM")}

# Fields the released config.json carries and vLLM reads: GLM-4.7-Flash's layer 0 is dense
# (first_k_dense_replace; transformers 5 writes mlp_layer_types instead), its router one group.
RELEASED = {"glm4_moe_lite": dict(first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="noaux_tc",
                                  scoring_func="sigmoid")}


def family_config(family: str, tokenizer=None, **overrides):
    import transformers

    config_name, architecture = FAMILIES[family]
    tokenizer = tokenizer or load_tokenizer()
    fields = dict(
        hidden_size=128, num_hidden_layers=2, intermediate_size=256, moe_intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=512,
        qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128,
        mlp_layer_types=["dense", "sparse"], n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        norm_topk_prob=True, routed_scaling_factor=1.8,
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="float32",
        **_token_ids(tokenizer),
    )
    fields.update(RELEASED[family], **overrides)
    config = getattr(transformers, config_name)(**fields)
    config.architectures = [architecture]
    return config


def make_family(dst, family: str, *, seed: int = 0, init_std: float = 0.08, **overrides) -> Path:
    """Write a random tiny ``family`` checkpoint (safetensors + tokenizer) to ``dst``."""
    tokenizer = load_tokenizer()
    config = family_config(family, tokenizer=tokenizer, **overrides)
    return write_random_checkpoint(dst, config, tokenizer, seed=seed, init_std=init_std)
