"""Independent float64 references for MLA attention (slow, obvious, for tests).

``expanded``: per head, keys ``[W_UK,h ĉ_t ; k^R_t]`` and values ``W_UV,h ĉ_t`` are
materialised and ordinary softmax attention is run, as a non-absorbed MLA does.
``absorbed``: MQA over the latent rows with the absorbed query. The two must agree.
"""

import torch


def expanded_attention(
    q_nope: torch.Tensor,  # [H, d_nope]
    q_rope: torch.Tensor,  # [H, d_R]
    latent: torch.Tensor,  # [L, d_c]   normalised latent ĉ
    k_rope: torch.Tensor,  # [L, d_R]
    w_uk: torch.Tensor,  # [H, d_nope, d_c]
    w_uv: torch.Tensor,  # [H, d_v, d_c]
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head attention with expanded keys/values. Returns (out[H, d_v], lse[H])."""
    f64 = torch.float64
    q_nope, q_rope, latent, k_rope = (t.to(f64) for t in (q_nope, q_rope, latent, k_rope))
    w_uk, w_uv = w_uk.to(f64), w_uv.to(f64)
    heads = q_nope.shape[0]
    outs, lses = [], []
    for h in range(heads):
        k_nope = latent @ w_uk[h].T  # [L, d_nope]
        keys = torch.cat([k_nope, k_rope], dim=-1)  # [L, d_nope + d_R]
        values = latent @ w_uv[h].T  # [L, d_v]
        query = torch.cat([q_nope[h], q_rope[h]])  # [d_nope + d_R]
        logits = (keys @ query) * scale  # [L]
        lse = torch.logsumexp(logits, dim=0)
        outs.append(torch.exp(logits - lse) @ values)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def absorbed_attention(
    q_latent: torch.Tensor,  # [H, d_c]
    q_rope: torch.Tensor,  # [H, d_R]
    latent: torch.Tensor,  # [L, d_c]
    k_rope: torch.Tensor,  # [L, d_R]
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MQA over latent rows. Returns (latent out[H, d_c], lse[H])."""
    f64 = torch.float64
    q = torch.cat([q_latent, q_rope], dim=-1).to(f64)  # [H, d_c + d_R]
    rows = torch.cat([latent, k_rope], dim=-1).to(f64)  # [L, d_c + d_R]
    logits = (q @ rows.T) * scale  # [H, L]
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    return probs @ latent.to(f64), lse
