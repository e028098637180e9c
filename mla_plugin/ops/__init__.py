"""The framework-neutral latent attention ops: never imports vLLM or SGLang.

- ``latent_cache``: the paged latent cache and its write (bf16/fp32 or fp8 e4m3 with σ);
- ``paged_attention``: the one attention seam every backend calls, in plain torch, which
  dispatches (``kernel_choice``) to the Triton kernels of ``triton_paged_attention``;
- ``sharded_latent``: the sharded-latent slices of one rank (``LatentSlices``) and their RMSNorm;
- ``latent_basis`` / ``pca``: weight folding and latent bases for the converters;
- ``reference``: float64 oracles for tests; ``trace``: the record of what ran.
"""

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
