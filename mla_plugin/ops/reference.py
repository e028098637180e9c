"""Independent float64 references for latent attention (slow, obvious, for tests).

Every float64 oracle of the project lives here; none of them reads a paged cache.

``expanded``: per head, keys ``[W_UK,h ĉ_t ; k^R_t]`` and values ``W_UV,h ĉ_t`` are
materialised and ordinary softmax attention is run, as a non-absorbed MLA does.
``absorbed``: MQA over the latent rows with the absorbed query. The two must agree.
``causal_absorbed``: the same for a request's last q tokens, each seeing its prefix.
``sharded_latent``: per head, per slice loops over the three softmax modes of
``sharded_latent.py``.
"""

import torch

from mla_plugin.ops.sharded_latent import SOFTMAX_MODES, check_choice, check_grouped_heads, shard_width


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


def causal_absorbed_attention(
    q_latent: torch.Tensor,  # [q, H, d_c]  the request's last q tokens
    q_rope: torch.Tensor,  # [q, H, d_R]
    latent: torch.Tensor,  # [L, d_c]
    k_rope: torch.Tensor,  # [L, d_R]
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal MLA of one request whose queries are its last q tokens: query i sees
    positions ``0 .. L - q + i``. Returns (out[q, H, d_c], lse[q, H]) in float64."""
    length, q_len = latent.shape[0], q_latent.shape[0]
    outs, lses = [], []
    for i in range(q_len):
        visible = length - q_len + i + 1
        out, lse = absorbed_attention(q_latent[i], q_rope[i], latent[:visible], k_rope[:visible], scale)
        outs.append(out)
        lses.append(lse)
    if not outs:
        heads, d_c = q_latent.shape[1], q_latent.shape[2]
        return torch.zeros(0, heads, d_c, dtype=torch.float64), torch.zeros(0, heads, dtype=torch.float64)
    return torch.stack(outs), torch.stack(lses)


def sharded_latent_attention(
    q_latents: list[torch.Tensor],  # per request [q_len, H, d_c]
    q_ropes: list[torch.Tensor],  # per request [q_len, H, d_R]
    latents: list[torch.Tensor],  # per request [L, d_c]
    rope_keys: list[torch.Tensor],  # per request [L, d_R]
    scale: float,
    *,
    num_shards: int,
    softmax_mode: str,
    logit_scale: torch.Tensor | None = None,  # [H, num_shards]
) -> list[torch.Tensor]:
    """Slow, obvious float64 sharded-latent attention over all slices (the test oracle).

    The queries are each request's last q_len tokens (causal). Returns per request the
    latent output ``[q_len, H, d_c]`` in float64.
    """
    check_choice(softmax_mode, SOFTMAX_MODES, "softmax mode")
    f64 = torch.float64
    outs = []
    for q_lat, q_rp, lat, kr in zip(q_latents, q_ropes, latents, rope_keys):
        q_lat, q_rp, lat, kr = (t.to(f64) for t in (q_lat, q_rp, lat, kr))
        q_len, heads, d_c = q_lat.shape
        d_s = shard_width(d_c, num_shards)
        if softmax_mode == "grouped":
            check_grouped_heads(heads, num_shards)
        lam = torch.ones(heads, num_shards, dtype=f64) if logit_scale is None else logit_scale.to(f64)
        length = lat.shape[0]
        out = torch.zeros(q_len, heads, d_c, dtype=f64)
        for i in range(q_len):
            keys = slice(0, length - q_len + i + 1)  # causal prefix
            for h in range(heads):
                rope = kr[keys] @ q_rp[i, h]  # [n]
                parts = [
                    lat[keys, j * d_s : (j + 1) * d_s] @ q_lat[i, h, j * d_s : (j + 1) * d_s]
                    for j in range(num_shards)
                ]  # each [n]
                if softmax_mode == "exact":
                    logits = sum(lam[h, j] * parts[j] for j in range(num_shards)) + rope
                    out[i, h] = torch.softmax(scale * logits, dim=0) @ lat[keys]
                    continue
                if softmax_mode == "partitioned":
                    shards = range(num_shards)
                else:
                    shards = [h // (heads // num_shards)]
                for j in shards:
                    probs = torch.softmax(scale * (lam[h, j] * parts[j] + rope), dim=0)
                    out[i, h, j * d_s : (j + 1) * d_s] = probs @ lat[keys, j * d_s : (j + 1) * d_s]
        outs.append(out)
    return outs
