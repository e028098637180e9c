"""Plain-torch latent attention math. Never imports vLLM."""

from mla_plugin.ops.latent_cache import gather_sequence, write_latent_cache
from mla_plugin.ops.latent_decode import merge_partial_attention, paged_latent_decode

__all__ = [
    "gather_sequence",
    "merge_partial_attention",
    "paged_latent_decode",
    "write_latent_cache",
]
