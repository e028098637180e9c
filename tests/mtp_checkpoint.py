"""A tiny DeepSeek-V3 checkpoint with one multi-token-prediction (MTP) layer, as the released
V3/R1 checkpoints carry it (issue 23 item 2).

transformers writes the main model (``num_hidden_layers`` layers; its V3 class has no MTP
layer and ignores one), so transformers' greedy decode is the reference for the tokens.
The MTP layer is appended as the extra tensors ``model.layers.{N}.*`` (N = num_hidden_layers)
that vLLM's ``deepseek_mtp`` drafter loads: ``enorm``, ``hnorm``, ``eh_proj`` [h, 2h], a whole
decoder layer (its MLA attention and, since N >= first_k_dense_replace, an MoE block shaped
like layer N - 1's), ``shared_head.norm`` / ``shared_head.head`` and ``embed_tokens``
(the released checkpoints repeat the embedding there). Random like the rest, except that
``eh_proj`` passes the target's hidden state through and the block only nudges it, so the
MTP layer drafts the target's previous prediction again (a stand-in for a trained MTP head:
drafts are accepted where the greedy text repeats a token, rejected elsewhere).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mla_plugin.fixtures.tiny_models import make_tiny_deepseek_family

# vLLM reads these V3 routing fields; transformers' config class does not write them
# (tests/vllm/test_model_families.py RELEASED_ROUTING).
V3_ROUTING = dict(topk_method="noaux_tc", scoring_func="sigmoid")


def _mtp_tensors(tensors: dict, num_layers: int, gen: torch.Generator, init_std: float) -> dict:
    """The MTP layer's tensors: layer N - 1's decoder tensors renamed to N, fresh random values."""
    last, mtp = f"model.layers.{num_layers - 1}.", f"model.layers.{num_layers}."
    hidden = tensors["model.embed_tokens.weight"].shape[1]

    def fresh(shape, norm: bool) -> torch.Tensor:
        noise = torch.randn(shape, generator=gen)
        return 1.0 + 0.2 * noise if norm else init_std * noise

    extra = {mtp + name[len(last):]: fresh(t.shape, "norm" in name) for name, t in tensors.items()
             if name.startswith(last)}
    # The block's writes to the residual stream (attention o_proj, the MLP's down projections)
    # small: the block runs in full but nudges the hidden state only.
    for name in extra:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            extra[name] = extra[name] * 1e-3
    extra[mtp + "enorm.weight"] = fresh((hidden,), norm=True)
    extra[mtp + "hnorm.weight"] = torch.ones(hidden)
    extra[mtp + "shared_head.norm.weight"] = torch.ones(hidden)
    # [h, 2h]: [embedding | target hidden] -> the target's hidden state alone, so the draft is
    # (nearly) the target's own last prediction again: right where the greedy text repeats a token
    extra[mtp + "eh_proj.weight"] = torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1)
    extra[mtp + "shared_head.head.weight"] = fresh(tensors["lm_head.weight"].shape, norm=False)  # [V, h]
    extra[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    # the router's correction bias is a buffer of the V3 gate, written by transformers too
    return {name: t.contiguous() for name, t in extra.items()}


def make_tiny_v3_with_mtp(dst, *, seed: int = 0, init_std: float = 0.08) -> Path:
    """Write the tiny V3 (two layers: dense, MoE) plus one MTP layer to ``dst``."""
    dst = Path(dst)
    make_tiny_deepseek_family(dst, "deepseek_v3", seed=seed, init_std=init_std, q_lora_rank=64, moe=True,
                              num_nextn_predict_layers=1, **V3_ROUTING)
    config = json.loads((dst / "config.json").read_text())
    num_layers = config["num_hidden_layers"]
    files = sorted(dst.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"expected one safetensors file in {dst}, found {[f.name for f in files]}")
    tensors = load_file(files[0])
    tensors.update(_mtp_tensors(tensors, num_layers, torch.Generator().manual_seed(seed + 1), init_std))
    save_file(tensors, files[0], metadata={"format": "pt"})
    if config.get("num_nextn_predict_layers") != 1:
        raise RuntimeError(f"{dst}/config.json lost num_nextn_predict_layers: {config.get('num_nextn_predict_layers')}")
    return dst
