"""Make vLLM's DeepSeek-V2 attention honour a converted checkpoint's declared format.

vLLM builds every DeepSeek-V2 layer with a latent RMSNorm, no biases and DeepSeek's
default rope frequencies. A checkpoint from `mla-plugin convert gqa-to-mla` declares
otherwise (checkpoint_format.py); this swaps the affected submodules right after the
layer is built, in the layer and in the MLA wrapper that shares them, whatever
attention backend then serves it. Stock checkpoints are left untouched.
"""

import torch
from torch import nn

from mla_plugin.checkpoint_format import LatentCheckpointFormat, format_of


def _explicit_rope(freqs: tuple[float, ...], rope_dim: int, max_position: int):
    from mla_plugin.vllm.compat import RotaryEmbedding

    class ExplicitFrequencyRotaryEmbedding(RotaryEmbedding):
        """Interleaved (GPT-J style) RoPE with the checkpoint's own inverse frequencies."""

        def _compute_inv_freq(self, base: float) -> torch.Tensor:
            return torch.tensor(freqs, dtype=torch.float)

    return ExplicitFrequencyRotaryEmbedding(rope_dim, rope_dim, max_position, 10000.0, False,
                                            torch.get_default_dtype())


def _moved(what: str) -> None:
    from mla_plugin.vllm.touch_points import VLLMTouchPointError, vllm_version

    raise VLLMTouchPointError(
        f"mla_plugin cannot apply a converted checkpoint's format on vLLM {vllm_version()}: {what} "
        "(touch point 'MLA modules'). Serving it anyway would compute the wrong attention; use "
        "a vLLM version mla_plugin supports (see mla_plugin.vllm.touch_points.SUPPORTED_VLLM).")


def _holders(attn: nn.Module) -> dict[str, nn.Module]:
    """The layer and its MLA wrapper, which hold the same submodules."""
    wrapper = getattr(attn, "mla_attn", None)
    if wrapper is None:
        _moved(f"{type(attn).__name__} has no 'mla_attn' wrapper")
    return {"": attn, ".mla_attn": wrapper}


def apply_checkpoint_format(attn: nn.Module, config, prefix: str) -> nn.Module:
    """Rebuild the parts of a DeepseekV2MLAAttention that the checkpoint declares differently."""
    fmt: LatentCheckpointFormat = format_of(config)
    if fmt.is_stock:
        return attn
    from mla_plugin.vllm.compat import ColumnParallelLinear, ReplicatedLinear

    if getattr(config, "q_lora_rank", None) is not None and (fmt.q_bias or fmt.kv_a_bias):
        # A low-rank query has no q_proj, and vLLM fuses kv_a_proj_with_mqa with q_a_proj
        # (fused_qkv_a_proj); the norm and rope swaps below need neither.
        raise NotImplementedError("mla_plugin.q_bias / mla_plugin.kv_a_bias need q_lora_rank = null "
                                  "(convert gqa-to-mla writes full-rank queries)")
    if getattr(config.rope_parameters, "get", dict().get)("rope_type", "default") != "default" and fmt.rope_inv_freq:
        raise ValueError("mla_plugin.rope_inv_freq needs rope_type 'default'")
    holders = _holders(attn)

    def swap(name: str, module: nn.Module) -> None:
        for label, holder in holders.items():
            if getattr(holder, name, None) is None:
                _moved(f"{type(attn).__name__}{label} has no {name!r} to replace")
        for holder in holders.values():
            setattr(holder, name, module)

    if not fmt.latent_norm:
        swap("kv_a_layernorm", nn.Identity())
    if fmt.q_bias:
        old = attn.q_proj
        if type(old) is not ColumnParallelLinear:
            raise NotImplementedError(f"q_proj bias with {type(old).__name__} (decode context parallel?)")
        swap("q_proj", ColumnParallelLinear(old.input_size, old.output_size, bias=True, quant_config=None,
                                            prefix=f"{prefix}.q_proj"))
    if fmt.kv_a_bias:
        old = attn.kv_a_proj_with_mqa
        swap("kv_a_proj_with_mqa", ReplicatedLinear(old.input_size, old.output_size, bias=True,
                                                    quant_config=None, prefix=f"{prefix}.kv_a_proj_with_mqa"))
    if fmt.rope_inv_freq is not None:
        swap("rotary_emb", _explicit_rope(fmt.rope_inv_freq, config.qk_rope_head_dim,
                                          attn.max_position_embeddings))
    return attn
