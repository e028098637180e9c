"""Plain-torch latent attention math. Never imports vLLM."""

from mla_plugin.ops.latent_basis import (
    basis_matrix,
    fold_gamma_and_rotate,
    fold_latent_weights,
    hadamard_matrix,
)
from mla_plugin.ops.latent_cache import gather_sequence, write_latent_cache
from mla_plugin.ops.latent_decode import merge_partial_attention, paged_latent_decode
from mla_plugin.ops.sharded_latent import latent_rmsnorm, paged_sharded_latent_attention

__all__ = [
    "basis_matrix",
    "fold_gamma_and_rotate",
    "fold_latent_weights",
    "gather_sequence",
    "hadamard_matrix",
    "latent_rmsnorm",
    "merge_partial_attention",
    "paged_latent_decode",
    "paged_sharded_latent_attention",
    "write_latent_cache",
]
