"""transformers code for converted checkpoints that are not an ordinary DeepSeek-V2.

Written by `mla-plugin convert` next to the weights of every checkpoint whose config.json
declares ``"architectures": ["MLAPluginDeepseekV2ForCausalLM"]``; load with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. It is transformers'
DeepseekV2ForCausalLM computing the function config.json declares under "mla_plugin":

- gqa-to-mla outputs: no latent RMSNorm (``latent_norm: false``), biases on q_proj and
  kv_a_proj_with_mqa, explicit rope inverse frequencies (``rope_inv_freq``);
- mla-to-gla outputs (and the same options on any DeepSeek-V2): the latent cut into
  ``shards`` = g slices, normalised over all of it (``rmsnorm: global``) or per slice
  (``local``), and attended with one softmax (``exact``), one softmax per slice whose
  outputs are summed (``partitioned``), or head group j over slice j only (``grouped``);
  each slice's partial latent logit times λ (``logit_scale``: a number, or "auto" = g for
  partitioned, 1 for grouped; converted checkpoints have λ folded into kv_b_proj and
  declare 1). Identity basis only (converted checkpoints have theirs folded in).
  With ``latent_projection: true`` (grouped softmax, global RMSNorm; `convert mla-to-gla
  --basis group-pca`) each layer has ``latent_projection.weight`` P = [B_0; …; B_{g−1}]
  [d_c, d_c] and head group j reads z^(j) = B_j ĉ (the slice j of z = P ĉ) instead of
  slice j of ĉ.

DeepSeek-V3-style checkpoints (model_type deepseek_v3: V3/R1, Kimi-K2 shapes; sigmoid
routing with a correction bias, interleaved rope) load as ``MLAPluginDeepseekV3ForCausalLM``:
transformers' DeepseekV3ForCausalLM with the same sharded-latent attention (V3's rope).
Both take the low-rank query (q_a_proj, q_a_layernorm, q_b_proj) as the stock models do.

Self-contained on purpose: it needs torch and transformers only, not the mla_plugin
package. Its attention does not go through transformers' pluggable attention functions,
so engines that substitute their own attention kernels (vLLM's Transformers backend)
refuse it rather than computing plain MLA.
"""

import torch
from torch import nn
from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2Attention,
    DeepseekV2RotaryEmbedding,
    apply_rotary_emb,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
)

SOFTMAX_MODES = ("exact", "partitioned", "grouped")
RMSNORM_MODES = ("global", "local")


class _ExplicitRotaryEmbedding(DeepseekV2RotaryEmbedding):
    @staticmethod
    def compute_default_rope_parameters(config, device=None, seq_len=None, **kwargs):
        freqs = torch.tensor(config.mla_plugin["rope_inv_freq"], dtype=torch.float, device=device)
        return freqs, 1.0


def _sharded_latent_options(options: dict) -> dict | None:
    """(g, softmax, rmsnorm, λ) when the options change the attention from MLA, else None."""
    softmax, rmsnorm = options.get("softmax", "exact"), options.get("rmsnorm", "global")
    if softmax not in SOFTMAX_MODES or rmsnorm not in RMSNORM_MODES:
        raise ValueError(f"mla_plugin: softmax {softmax!r} / rmsnorm {rmsnorm!r} not among "
                         f"{SOFTMAX_MODES} / {RMSNORM_MODES}")
    if softmax == "exact" and rmsnorm == "global":
        return None  # MLA itself, whatever the basis (a rotation does not change a global RMS)
    shards = options.get("shards")
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ValueError("mla_plugin.shards must be set (a positive integer) to load a sharded-latent "
                         "model with transformers")
    if options.get("basis", "identity") != "identity":
        raise NotImplementedError("mla_plugin: transformers loads the identity basis only; convert the "
                                  "checkpoint with `mla-plugin convert mla-to-gla` to fold the basis in")
    scale = options.get("logit_scale", "auto")
    if softmax == "exact":
        scale = 1.0
    elif scale == "auto":
        scale = float(shards) if softmax == "partitioned" else 1.0
    projection = options.get("latent_projection", False)
    if not isinstance(projection, bool):
        raise ValueError(f"mla_plugin.latent_projection must be true or false, got {projection!r}")
    if projection and (softmax != "grouped" or rmsnorm != "global"):
        raise ValueError("mla_plugin.latent_projection needs softmax 'grouped' and rmsnorm 'global' "
                         f"(got {softmax!r}, {rmsnorm!r})")
    return dict(shards=shards, softmax=softmax, rmsnorm=rmsnorm, logit_scale=float(scale),
                latent_projection=projection)


class LatentSliceAttention(nn.Module):
    """Every head's attention over the normalised latent cut into g slices (no parameters).

    Absorbed form: q̃_h = W_UK,hᵀ q_h^nope; slice j's partial logit is λ q̃_h^(j)·ĉ_t^(j).
    exact: one softmax over τ(Σ_j partial_j + q^R·k^R); partitioned: one per slice over
    τ(partial_j + q^R·k^R), filling output slice j; grouped: as partitioned, head h keeping
    only its group's slice j = h // (H / g). The output is W_UV,h ō_h.
    """

    def __init__(self, *, shards: int, softmax: str, logit_scale: float) -> None:
        super().__init__()
        self.shards, self.softmax, self.logit_scale = shards, softmax, logit_scale

    def forward(self, q_nope, q_pe, latent, k_pe, w_uk, w_uv, attention_mask, scaling: float):
        # q_nope [B, H, S, d_nope], q_pe [B, H, S, d_R], latent [B, T, d_c], k_pe [B, T, d_R],
        # w_uk [H, d_nope, d_c], w_uv [H, d_v, d_c]; returns [B, H, S, d_v]
        dtype = q_nope.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        q_nope, q_pe, latent, k_pe = (t.to(work) for t in (q_nope, q_pe, latent, k_pe))
        w_uk, w_uv = w_uk.to(work), w_uv.to(work)
        batch, heads, queries, _ = q_nope.shape
        keys, d_c = latent.shape[1], latent.shape[2]
        g = self.shards
        d_s = d_c // g
        q_latent = torch.einsum("bhsn,hnc->bhsc", q_nope, w_uk)  # [B, H, S, d_c]
        partial = torch.einsum("bhsgd,btgd->bhgst", q_latent.view(batch, heads, queries, g, d_s),
                               latent.view(batch, keys, g, d_s)) * self.logit_scale  # [B, H, g, S, T]
        rope = torch.einsum("bhsr,btr->bhst", q_pe, k_pe)  # [B, H, S, T]
        mask = _additive_mask(attention_mask, queries, keys, work, latent.device)  # [B or 1, 1 or H, S, T]
        if self.softmax == "exact":
            logits = (partial.sum(dim=2) + rope) * scaling + mask  # [B, H, S, T]
            probs = torch.softmax(logits, dim=-1)
            latent_out = probs @ latent.unsqueeze(1)  # [B, H, S, d_c]
        else:
            logits = (partial + rope.unsqueeze(2)) * scaling + mask.unsqueeze(2)  # [B, H, g, S, T]
            probs = torch.softmax(logits, dim=-1)
            slices = latent.view(batch, keys, g, d_s).permute(0, 2, 1, 3)  # [B, g, T, d_s]
            per_slice = probs @ slices.unsqueeze(1)  # [B, H, g, S, d_s]
            if self.softmax == "grouped":
                group = torch.arange(heads, device=latent.device) // (heads // g)  # [H]
                keep = group[:, None] == torch.arange(g, device=latent.device)[None, :]  # [H, g]
                per_slice = per_slice * keep[None, :, :, None, None].to(work)
            latent_out = per_slice.permute(0, 1, 3, 2, 4).reshape(batch, heads, queries, d_c)  # [B, H, S, d_c]
        return torch.einsum("bhsc,hvc->bhsv", latent_out, w_uv).to(dtype)


def _additive_mask(mask, queries: int, keys: int, dtype, device) -> torch.Tensor:
    """The causal (and padding) mask as additive logits, [B or 1, 1 or H, S, T]."""
    if mask is None:
        offset = keys - queries  # the queries are the last S of the T positions
        allowed = torch.ones(queries, keys, dtype=torch.bool, device=device).tril(offset)
        return torch.zeros(1, 1, queries, keys, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
    if not isinstance(mask, torch.Tensor):
        raise NotImplementedError(f"mla_plugin attention takes tensor masks, not {type(mask).__name__} "
                                  "(load with attn_implementation='eager' or 'sdpa')")
    mask = mask[..., -keys:]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _latent_rmsnorm(latent: torch.Tensor, shards: int, mode: str, eps: float) -> torch.Tensor:
    """Weightless RMSNorm of [..., d_c], over all of it (global) or per slice (local), float32+."""
    x = latent.to(torch.float64 if latent.dtype == torch.float64 else torch.float32)
    if mode == "global":
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    slices = x.reshape(*x.shape[:-1], shards, x.shape[-1] // shards)  # [..., g, d_s]
    return (slices * torch.rsqrt(slices.pow(2).mean(dim=-1, keepdim=True) + eps)).reshape(x.shape)


class _ShardedLatentAttention:
    """The attention of the declared sharded latent, on a stock DeepSeek attention's weights and
    names (mixed into DeepseekV2Attention / DeepseekV3Attention, which differ in their rope)."""

    def __init__(self, config, layer_idx: int, options: dict) -> None:
        super().__init__(config, layer_idx)
        if self.kv_lora_rank % options["shards"]:
            raise ValueError(f"kv_lora_rank {self.kv_lora_rank} is not divisible by mla_plugin.shards "
                             f"{options['shards']}")
        if options["softmax"] == "grouped" and self.num_heads % options["shards"]:
            raise ValueError(f"grouped softmax needs the {self.num_heads} heads divisible by shards "
                             f"{options['shards']}")
        self.rmsnorm, self.eps = options["rmsnorm"], config.rms_norm_eps
        if options["latent_projection"]:  # P = [B_0; …; B_{g−1}]: z = P ĉ, group j reads z^(j)
            self.latent_projection = nn.Linear(self.kv_lora_rank, self.kv_lora_rank, bias=False)
        self.slices = LatentSliceAttention(shards=options["shards"], softmax=options["softmax"],
                                           logit_scale=options["logit_scale"])

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, position_embeddings=None,
                **kwargs):
        batch, queries = hidden_states.shape[:-1]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(batch, queries, -1, self.qk_head_dim).transpose(1, 2)  # [B, H, S, d_qk]
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_pe = torch.split(self.kv_a_proj_with_mqa(hidden_states),
                                   [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)  # [B, S, d_c], [B, S, d_R]
        normed = _latent_rmsnorm(latent, self.slices.shards, self.rmsnorm, self.eps)
        latent = self.kv_a_layernorm.weight.to(normed.dtype) * normed  # γ ĉ [B, S, d_c]
        if hasattr(self, "latent_projection"):
            latent = latent @ self.latent_projection.weight.to(latent.dtype).T  # rows z = P (γ ĉ), [B, S, d_c]
        latent = latent.to(hidden_states.dtype)
        latent = latent.view(batch, 1, queries, self.kv_lora_rank)
        k_pe = k_pe.view(batch, 1, queries, self.qk_rope_head_dim)
        q_pe, k_pe = self._rotate(q_pe, k_pe, position_embeddings)
        if past_key_values is not None:
            latent, k_pe = past_key_values.update(latent, k_pe, self.layer_idx)  # [B, 1, T, ...]
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim,
                                       self.kv_lora_rank)  # [H, d_nope + d_v, d_c]
        out = self.slices(q_nope, q_pe, latent[:, 0], k_pe[:, 0], w[:, :self.qk_nope_head_dim],
                          w[:, self.qk_nope_head_dim:], attention_mask, self.scaling)  # [B, H, S, d_v]
        out = out.transpose(1, 2).reshape(batch, queries, -1)
        return self.o_proj(out), None


class ShardedLatentDeepseekV2Attention(_ShardedLatentAttention, DeepseekV2Attention):
    """DeepseekV2Attention's weights and names; the attention of the declared sharded latent."""

    def _rotate(self, q_pe, k_pe, position_embeddings):
        # position_embeddings: complex rotations [B, S, d_R / 2]
        return apply_rotary_emb(q_pe, k_pe, position_embeddings.to(q_pe.device))


class ShardedLatentDeepseekV3Attention(_ShardedLatentAttention, DeepseekV3Attention):
    """DeepseekV3Attention's weights and names; the attention of the declared sharded latent."""

    def _rotate(self, q_pe, k_pe, position_embeddings):
        cos, sin = position_embeddings  # [B, S, d_R] each
        if self.config.rope_interleave:
            return apply_rotary_pos_emb_interleave(q_pe, k_pe, cos, sin)
        return apply_rotary_pos_emb(q_pe, k_pe, cos, sin)


def _gqa_format(fmt: dict) -> bool:
    return bool(not fmt.get("latent_norm", True) or fmt.get("q_bias") or fmt.get("kv_a_bias")
                or fmt.get("rope_inv_freq") is not None)


class MLAPluginDeepseekV3ForCausalLM(DeepseekV3ForCausalLM):
    """transformers' DeepseekV3ForCausalLM (V3's MoE routing) with the declared sharded latent."""

    _supports_attention_backend = False

    def __init__(self, config):
        super().__init__(config)
        fmt = getattr(config, "mla_plugin", None) or {}
        if _gqa_format(fmt):
            raise NotImplementedError("mla_plugin: gqa-to-mla format keys on a DeepSeek-V3 checkpoint are not "
                                      "supported")
        sharded = _sharded_latent_options(fmt)
        if sharded is not None:
            for index, layer in enumerate(self.model.layers):
                layer.self_attn = ShardedLatentDeepseekV3Attention(config, index, sharded)
        self.post_init()


class MLAPluginDeepseekV2ForCausalLM(DeepseekV2ForCausalLM):
    # Its attention is its own: engines must not swap in theirs (vLLM's Transformers backend).
    _supports_attention_backend = False

    def __init__(self, config):
        super().__init__(config)
        fmt = getattr(config, "mla_plugin", None) or {}
        sharded = _sharded_latent_options(fmt)
        if sharded is not None and _gqa_format(fmt):
            raise NotImplementedError("mla_plugin: a sharded latent with gqa-to-mla format keys is not supported")
        for index, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            if sharded is not None:
                layer.self_attn = ShardedLatentDeepseekV2Attention(config, index, sharded)
                continue
            if not fmt.get("latent_norm", True):
                attn.kv_a_layernorm = nn.Identity()
            if fmt.get("q_bias"):
                attn.q_proj = nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=True)
            if fmt.get("kv_a_bias"):
                old = attn.kv_a_proj_with_mqa
                attn.kv_a_proj_with_mqa = nn.Linear(old.in_features, old.out_features, bias=True)
        if fmt.get("rope_inv_freq") is not None:
            if config.rope_parameters.get("rope_type", "default") != "default":
                raise ValueError("mla_plugin.rope_inv_freq needs rope_type 'default'")
            self.model.rotary_emb = _ExplicitRotaryEmbedding(config)
        self.post_init()


# The name gqa-to-mla outputs used before they declared MLAPluginDeepseekV2ForCausalLM.
LatentConvertedDeepseekV2ForCausalLM = MLAPluginDeepseekV2ForCausalLM
