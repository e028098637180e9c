"""Plain-torch latent attention math. Never imports vLLM."""

from mla_plugin.ops.latent_basis import (
    basis_matrix,
    fold_gamma_and_rotate,
    fold_latent_weights,
    hadamard_matrix,
)
from mla_plugin.ops.latent_cache import gather_sequence, write_latent_cache
from mla_plugin.ops.paged_attention import merge_partial_attention, paged_latent_attention
from mla_plugin.ops.sharded_latent import (
    NORM_MODES,
    ONE_SLICE,
    SOFTMAX_MODES,
    LatentSlices,
    latent_rmsnorm,
)

__all__ = [
    "NORM_MODES",
    "ONE_SLICE",
    "SOFTMAX_MODES",
    "LatentSlices",
    "basis_matrix",
    "fold_gamma_and_rotate",
    "fold_latent_weights",
    "gather_sequence",
    "hadamard_matrix",
    "latent_rmsnorm",
    "merge_partial_attention",
    "paged_latent_attention",
    "write_latent_cache",
]
