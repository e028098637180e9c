"""GQA/MHA attention rewritten as DeepSeek-style latent attention (TransMLA-style), one layer.

Plain torch, float64, no vLLM. Symbols as in docs/design.md (Glossary; section 7, "GQA/MHA
to MLA"): H query heads, K kv heads (head h reads kv head ⌊h / (H/K)⌋), head dim d_h with
Llama's RoPE layout (dims i and i + d_h/2 form the complex pair of frequency i), the stacked
keys and values y = [k; v] ∈ ℝ^{2K·d_h} and their second moment S = E[y yᵀ] on calibration
text; d_model is the hidden size.

1. **RoRoPE**: the d_h/2 frequencies fall into G = d_h/(2f) groups n of f neighbours (f = 1:
   none folded, FreqFold otherwise). In group n the f·K complex key components are rotated
   by one real orthogonal U_n (the same on real and imaginary parts, so it commutes with
   RoPE when f = 1), U_n from the PCA of Re·Reᵀ + Im·Imᵀ. The top m components of every
   group keep RoPE (with the group's first frequency), forming the shared rope key k^R of
   d_R = m·d_h/f dims; the rest lose it and become a shared no-rope key k^N of
   d_N = K·d_h − d_R dims. A_k is the whole key rotation; every query head gets it applied
   to its own kv head's block. With f = 1 and m = K nothing is dropped: the exact MLA form
   of GQA.
2. **BKV-PCA**: z = [α k^N; v] (α balances the two norms), compressed to its top d_c
   principal directions P: the latent c = Pᵀ z. k^N ≈ P_k c / α, v ≈ P_v c. With d_c = the
   full width the identity is used (exact).
3. DeepSeek form: q_proj rows per head [q^C (d_nope); q^R (d_R)], kv_a_proj_with_mqa
   rows [c (d_c); k^R (d_R)], kv_b_proj rows per head [W_UK (d_nope); W_UV (d_v = d_h)],
   o_proj as is. The softmax scale becomes 1/sqrt(d_nope + d_R); the ratio to 1/sqrt(d_h)
   is folded into q. d_nope = d_N with W_UK = P_k/α when d_N ≤ d_c, else d_nope = d_c with
   W_UK = I and P_k/α folded into q. d_nope is padded with zero rows to an even number ≥ 2
   (transformers views the rope half of q as complex pairs, which needs an even head
   stride); the padding changes nothing.

Rope key pair p = a·G + n (kept component a < m of frequency group n) is stored
interleaved, as DeepSeek does: dims 2p and 2p + 1 are its real and imaginary parts.
"""

from dataclasses import dataclass

import torch

from mla_plugin.ops.pca import descending_eigenvectors

F64 = torch.float64


@dataclass(frozen=True)
class LatentPlan:
    """Conversion settings resolved against one source model."""

    heads: int  # H
    kv_heads: int  # K
    head_dim: int  # d_h
    rope_dim: int  # d_R
    kv_lora_rank: int  # d_c
    freqfold: int  # f
    balance: bool = True

    @property
    def groups(self) -> int:  # G = d_h / (2f)
        return self.head_dim // (2 * self.freqfold)

    @property
    def rope_components(self) -> int:  # m: components kept under RoPE per frequency group
        return self.rope_dim // (2 * self.groups)

    @property
    def nope_key_dim(self) -> int:  # d_N = K·d_h − d_R
        return self.kv_heads * self.head_dim - self.rope_dim

    @property
    def full_rank(self) -> int:  # width of z = [k^N; v]: d_N + K·d_h
        return self.nope_key_dim + self.kv_heads * self.head_dim

    @property
    def nope_dim(self) -> int:  # d_nope of the DeepSeek layer: even and >= 2 (zero-padded)
        base = min(self.nope_key_dim, self.kv_lora_rank)
        return max(2, base + base % 2)

    @property
    def nope_folded_into_q(self) -> bool:
        return self.nope_key_dim > self.kv_lora_rank

    @property
    def exact(self) -> bool:
        return self.freqfold == 1 and self.rope_components == self.kv_heads and self.kv_lora_rank == self.full_rank

    def check(self) -> None:
        """Raise ValueError with a clear message for settings the source cannot take."""
        H, K, d_h, f = self.heads, self.kv_heads, self.head_dim, self.freqfold
        if H % K:
            raise ValueError(f"{H} query heads are not a multiple of {K} kv heads")
        if d_h % 2:
            raise ValueError(f"head_dim {d_h} is odd; RoPE needs pairs")
        if f < 1 or (d_h // 2) % f:
            raise ValueError(f"--freqfold {f} must divide the {d_h // 2} rope frequencies of a head")
        step = 2 * self.groups
        if self.rope_dim < step or self.rope_dim % step or self.rope_dim > K * d_h:
            raise ValueError(
                f"--rope-dim {self.rope_dim} must be a multiple of {step} (d_h / f = {d_h} / {f}: one rope "
                f"pair per frequency group and kept component) between {step} and {K * d_h} "
                f"(every key dim of the {K} kv heads)")
        if not 1 <= self.kv_lora_rank <= self.full_rank:
            raise ValueError(
                f"--kv-lora-rank {self.kv_lora_rank} must be between 1 and {self.full_rank}: the no-rope "
                f"keys ({self.nope_key_dim}) and values ({K * d_h}) left after --rope-dim {self.rope_dim}")


def _or_zeros(bias, n):
    return torch.zeros(n, dtype=F64) if bias is None else bias.to(F64)


def rorope_key_rotation(plan: LatentPlan, key_moment: torch.Tensor | None) -> torch.Tensor:
    """A_k [K·d_h, K·d_h] orthogonal: rows 0..d_R-1 give k^R (interleaved pairs), the rest k^N.

    ``key_moment`` is the keys' block of S [K·d_h, K·d_h]; None means no rotation (the
    original heads' order), the right choice for the exact form.
    """
    K, d_h, f, G, m = plan.kv_heads, plan.head_dim, plan.freqfold, plan.groups, plan.rope_components
    half = d_h // 2
    components = f * K  # complex components per group, ordered (u, kv): index u * K + kv
    rows = torch.zeros(K * d_h, K * d_h, dtype=F64)
    nope_row = plan.rope_dim
    for n in range(G):
        real = torch.tensor([kv * d_h + n * f + u for u in range(f) for kv in range(K)])  # [f·K]
        imag = real + half
        if key_moment is None:
            group_rotation = torch.eye(components, dtype=F64)
        else:
            block = key_moment[real][:, real] + key_moment[imag][:, imag]  # [f·K, f·K]
            group_rotation = descending_eigenvectors(block)  # U_n; columns: components, best first
        for a in range(components):
            if a < m:
                pair = a * G + n
                rows[2 * pair, real] = group_rotation[:, a]
                rows[2 * pair + 1, imag] = group_rotation[:, a]
            else:
                rows[nope_row, real] = group_rotation[:, a]
                rows[nope_row + 1, imag] = group_rotation[:, a]
                nope_row += 2
    return rows


def rope_frequencies(plan: LatentPlan, source_inv_freq: torch.Tensor) -> torch.Tensor:
    """Inverse frequency of every rope pair p = a·G + n: group n's first frequency."""
    group_first = source_inv_freq.to(F64)[:: plan.freqfold][: plan.groups]  # [G]
    return group_first.repeat(plan.rope_components)  # [d_R / 2]


def latent_basis(plan: LatentPlan, moment: torch.Tensor, key_rows: torch.Tensor):
    """(P [d_N + K·d_h, d_c], α): BKV-PCA of z = [α k^N; v] from the second moment S of [k; v]."""
    Kd = plan.kv_heads * plan.head_dim
    nope_rows = key_rows[plan.rope_dim:]  # [d_N, K·d_h]
    s_kn = nope_rows @ moment[:Kd, :Kd] @ nope_rows.T
    s_v = moment[Kd:, Kd:]
    alpha = 1.0
    if plan.balance and plan.nope_key_dim and float(s_kn.trace()) > 0:
        alpha = float((s_v.trace() / s_kn.trace()).sqrt())
    if plan.kv_lora_rank == plan.full_rank:
        return torch.eye(plan.full_rank, dtype=F64), alpha
    b = torch.zeros(plan.full_rank, 2 * Kd, dtype=F64)
    b[: plan.nope_key_dim, :Kd] = alpha * nope_rows
    b[plan.nope_key_dim:, Kd:] = torch.eye(Kd, dtype=F64)
    s_z = b @ moment @ b.T
    return descending_eigenvectors(s_z)[:, : plan.kv_lora_rank], alpha


@dataclass
class LatentLayer:
    """One converted layer's DeepSeek-V2 attention tensors (float64)."""

    q_proj: torch.Tensor  # [H·(d_nope + d_R), d_model]
    q_bias: torch.Tensor | None  # [H·(d_nope + d_R)]
    kv_a_proj_with_mqa: torch.Tensor  # [d_c + d_R, d_model]
    kv_a_bias: torch.Tensor | None  # [d_c + d_R]
    kv_b_proj: torch.Tensor  # [H·(d_nope + d_h), d_c]
    o_proj: torch.Tensor  # [d_model, H·d_h]  unchanged
    alpha: float


def convert_layer(plan: LatentPlan, *, w_q, b_q, w_k, b_k, w_v, b_v, w_o,
                  moment: torch.Tensor | None) -> LatentLayer:
    """The DeepSeek-form tensors of one GQA layer. ``moment``: S [2K·d_h, 2K·d_h] or None (exact)."""
    H, K, d_h, d_r, d_c = plan.heads, plan.kv_heads, plan.head_dim, plan.rope_dim, plan.kv_lora_rank
    Kd = K * d_h
    d_nope, d_N = plan.nope_dim, plan.nope_key_dim
    if moment is None:
        if not plan.exact:
            raise ValueError("only the exact form (f = 1, every key dim under RoPE, full rank) "
                             "converts without calibration statistics")
        moment = torch.eye(2 * Kd, dtype=F64)
        key_rows = rorope_key_rotation(plan, None)
    else:
        key_rows = rorope_key_rotation(plan, moment[:Kd, :Kd].to(F64))
    basis, alpha = latent_basis(plan, moment.to(F64), key_rows)
    p_k, p_v = basis[:d_N] / alpha, basis[d_N:]  # [d_N, d_c], [K·d_h, d_c]

    w_k, w_v, w_q = w_k.to(F64), w_v.to(F64), w_q.to(F64)
    b_k, b_v = _or_zeros(b_k, Kd), _or_zeros(b_v, Kd)
    has_kv_bias = bool(b_k.abs().sum() + b_v.abs().sum() > 0)
    # Latent c = Pᵀ [α k^N; v]; rope key k^R = top rows of A_k k.
    z_rows = torch.cat([alpha * key_rows[d_r:] @ w_k, w_v])  # [d_N + K·d_h, d_model]
    z_bias = torch.cat([alpha * key_rows[d_r:] @ b_k, b_v])
    kv_a = torch.cat([basis.T @ z_rows, key_rows[:d_r] @ w_k])  # [d_c + d_R, d_model]
    kv_a_bias = torch.cat([basis.T @ z_bias, key_rows[:d_r] @ b_k])

    heads_per_kv = H // K
    q_scale = ((d_nope + d_r) / d_h) ** 0.5  # DeepSeek divides by sqrt(d_nope + d_R), the source by sqrt(d_h)
    q_rows, q_bias_rows, kv_b_rows = [], [], []
    b_q64 = None if b_q is None else b_q.to(F64)
    for head in range(H):
        kv = head // heads_per_kv  # the kv head this query head reads
        embed = torch.zeros(Kd, d_h, dtype=F64)  # the head's kv block in the stacked keys
        embed[kv * d_h:(kv + 1) * d_h] = torch.eye(d_h, dtype=F64)
        rot = key_rows @ embed  # [K·d_h, d_h]: query components matching k^R (top d_R) and k^N
        w_head = w_q[head * d_h:(head + 1) * d_h]  # [d_h, d_model]
        if plan.nope_folded_into_q:
            q_nope_map = p_k.T @ rot[d_r:]  # [d_c, d_h]
            w_uk = torch.eye(d_c, dtype=F64)
        else:
            q_nope_map = rot[d_r:]  # [d_N, d_h]
            w_uk = p_k
        pad = d_nope - q_nope_map.shape[0]
        q_nope_map = torch.cat([q_nope_map, torch.zeros(pad, d_h, dtype=F64)])  # [d_nope, d_h]
        w_uk = torch.cat([w_uk, torch.zeros(pad, d_c, dtype=F64)])  # [d_nope, d_c]
        q_map = torch.cat([q_nope_map, rot[:d_r]]) * q_scale  # [d_nope + d_R, d_h]
        q_rows.append(q_map @ w_head)
        if b_q64 is not None:
            q_bias_rows.append(q_map @ b_q64[head * d_h:(head + 1) * d_h])
        kv_b_rows += [w_uk, p_v[kv * d_h:(kv + 1) * d_h]]  # [d_nope, d_c], [d_h, d_c]
    return LatentLayer(
        q_proj=torch.cat(q_rows), q_bias=torch.cat(q_bias_rows) if b_q is not None else None,
        kv_a_proj_with_mqa=kv_a, kv_a_bias=kv_a_bias if has_kv_bias else None,
        kv_b_proj=torch.cat(kv_b_rows), o_proj=w_o.to(F64), alpha=alpha,
    )
