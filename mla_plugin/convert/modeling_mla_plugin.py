"""transformers code for checkpoints written by `mla-plugin convert gqa-to-mla`.

Copied next to the weights; load with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. It is
transformers' DeepseekV2ForCausalLM with the departures that config.json declares under
"mla_plugin": no latent RMSNorm (``latent_norm: false``), biases on q_proj and
kv_a_proj_with_mqa, explicit rope inverse frequencies. Self-contained on purpose: it
needs torch and transformers only, not the mla_plugin package.
"""

import torch
from torch import nn
from transformers import DeepseekV2ForCausalLM
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding


class _ExplicitRotaryEmbedding(DeepseekV2RotaryEmbedding):
    @staticmethod
    def compute_default_rope_parameters(config, device=None, seq_len=None, **kwargs):
        freqs = torch.tensor(config.mla_plugin["rope_inv_freq"], dtype=torch.float, device=device)
        return freqs, 1.0


class LatentConvertedDeepseekV2ForCausalLM(DeepseekV2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        fmt = getattr(config, "mla_plugin", None) or {}
        for layer in self.model.layers:
            attn = layer.self_attn
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
