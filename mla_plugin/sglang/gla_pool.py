"""Size SGLang's MLA token pool per rank for the sharded latent: d_loc + d_R values per token.

SGLang sizes ``MLATokenToKVPool`` (one ``[tokens + page, 1, kv_lora_rank + rope]`` buffer per
layer) and its memory budget from ``model_config.kv_lora_rank`` inside its
``KVCacheConfigurator`` (``_build_mla_kv_pool``; the budget in ``pool_configurator``). After
the configurator is built (the model is loaded by then), this hook gives it a copy of the
model config whose ``kv_lora_rank`` is the width the model's sharded-latent layers cache per
rank, d_loc = d_c · g_loc / g, read from the layers themselves. The runner's own model config
is left as it is. Models without sharded-latent layers are not touched.
"""

import copy


def sharded_latent_width(model) -> int | None:
    """d_loc of the model's sharded-latent attention layers (None: it has none)."""
    from mla_plugin.sglang.gla_attention import ShardedLatentDeepseekAttention

    widths = {m.plan.local_latent_dim for m in model.modules() if isinstance(m, ShardedLatentDeepseekAttention)}
    if not widths:
        return None
    if len(widths) > 1:
        raise ValueError(f"sharded-latent layers disagree on the cached latent width: {sorted(widths)}")
    return widths.pop()


def size_pool_per_rank(result, configurator, *args, **kwargs):
    """AFTER hook of ``KVCacheConfigurator.__post_init__``."""
    model = getattr(configurator, "model", None)
    width = sharded_latent_width(model) if model is not None else None
    if width is None:
        return result
    config = copy.copy(configurator.model_config)
    config.kv_lora_rank = width
    configurator.model_config = config
    return result
