"""A latent_projection checkpoint (docs/design.md section 4; the group-pca format) built from an
MLA checkpoint so that it computes exactly the same function: an independent reference is then
the source model itself.

Every bundled DeepSeek fixture has H (d_nope + d_v) = d_c, so group r's stacked up-projections
W̄_r = [W_UK,h diag(γ); W_UV,h diag(γ)]_{h in r} are [d_s, d_c]. With a fresh random invertible
A_r ([d_s, d_s]) take B_r = A_r W̄_r and give group r's heads the kv_b_proj columns of slice r
equal to A_r⁻¹ (zero elsewhere): their keys and values are A_r⁻¹ B_r ĉ = W̄_r ĉ, MLA's, and the
grouped softmax of unchanged per-head logits is MLA's softmax. A wrong row block of P, a wrong
norm, a transposed P or a missing P each break the equality.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mla_plugin.checkpoint_format import REMOTE_CODE_FILE, declare_architecture

MODELING_FILE = Path(__file__).resolve().parents[2] / "mla_plugin" / "convert" / REMOTE_CODE_FILE


def _well_conditioned(size: int, generator: torch.Generator) -> torch.Tensor:
    """A random [size, size] float64 matrix with singular values in [0.5, 2]: orthogonal x diag."""
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * (0.5 + 1.5 * torch.rand(size, generator=generator, dtype=torch.float64))


def make_projection_checkpoint(src: str | Path, dst: Path, *, shards: int, seed: int) -> Path:
    """Write ``dst``: ``src`` (a DeepSeek-V2 with H (d_nope + d_v) = d_c) as an exact
    grouped latent_projection checkpoint with ``shards`` groups; returns ``dst``."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    heads, d_c = config["num_attention_heads"], config["kv_lora_rank"]
    per_head = config["qk_nope_head_dim"] + config["v_head_dim"]
    d_s = d_c // shards
    if heads * per_head != d_c or d_c % shards or heads % shards:
        raise ValueError("the construction needs H (d_nope + d_v) = d_c and shards dividing H and d_c")
    generator = torch.Generator().manual_seed(seed)
    weights = load_file(str(src / "model.safetensors"))
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.self_attn"
        gamma = weights[f"{prefix}.kv_a_layernorm.weight"].double()  # [d_c]
        folded = weights[f"{prefix}.kv_b_proj.weight"].double() * gamma  # [H (d_nope + d_v), d_c]
        kv_b = torch.zeros_like(folded)
        projection = torch.empty(d_c, d_c, dtype=torch.float64)  # P = [B_0; …; B_{g−1}]
        for r in range(shards):
            rows = slice(r * d_s, (r + 1) * d_s)  # group r's heads' rows = slice r's width here
            mix = _well_conditioned(d_s, generator)  # A_r
            projection[rows] = mix @ folded[rows]  # B_r = A_r W̄_r, [d_s, d_c]
            kv_b[rows, rows] = torch.linalg.inv(mix)  # A_r⁻¹ in slice r's columns
        weights[f"{prefix}.kv_b_proj.weight"] = kv_b.float()
        weights[f"{prefix}.latent_projection.weight"] = projection.float()
        weights[f"{prefix}.kv_a_layernorm.weight"] = torch.ones(d_c)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config["mla_plugin"] = {"layout": "sharded_latent", "shards": shards, "softmax": "grouped",
                            "rmsnorm": "global", "latent_projection": True}
    config["dtype"] = "float32"
    if declare_architecture(config):
        shutil.copy(MODELING_FILE, dst / REMOTE_CODE_FILE)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
