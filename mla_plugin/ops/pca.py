"""Principal axes of a symmetric matrix: the one eigen-decomposition every basis uses.

The weight PCA of the latent (latent_basis.py), the activation PCA of the calibrated
converter and the RoRoPE / BKV-PCA rotations of gqa-to-mla all ask the same question:
the eigenvectors of a second moment, largest eigenvalue first, with signs fixed so the
answer is deterministic.
"""

import torch


def descending_eigenvectors(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric ``matrix`` [n, n] as columns [n, n], float64.

    Ordered by descending eigenvalue; each column has its largest-magnitude entry (the
    first one on ties) made positive. ``matrix`` is symmetrised first (``(M + Mᵀ) / 2``,
    a no-op on an exactly symmetric input), since ``eigh`` reads one triangle only.
    """
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"descending_eigenvectors needs a square matrix, got {tuple(matrix.shape)}")
    m = matrix.to(torch.float64)
    _, vectors = torch.linalg.eigh(0.5 * (m + m.T))  # ascending eigenvalues
    vectors = vectors.flip(-1)  # [n, n], descending
    pivot = vectors.abs().argmax(dim=0)  # [n]
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1])])  # [n]
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return vectors * signs.unsqueeze(0)
