"""gqa-to-mla and Qwen3: the per-head q/k RMSNorm has no exact MLA form, so the CLI refuses a
Qwen3 checkpoint with one line saying why, and writes nothing. The reason is checked too: the
normalised key is not a linear function of the layer input, which every MLA rope key is."""

import subprocess
import sys

import torch

from mla_plugin.fixtures import make_tiny_llama


def _tiny_qwen3(root):
    return make_tiny_llama(root / "qwen3", family="qwen3", seed=int(torch.randint(0, 10_000, ())),
                           num_heads=4, num_kv_heads=2, head_dim=32)


def test_cli_refuses_qwen3_with_one_line(tmp_path):
    src = _tiny_qwen3(tmp_path)
    dst = tmp_path / "out" / "mla"  # parents made by the converter: they must not be left behind
    proc = subprocess.run([sys.executable, "-m", "mla_plugin.cli", "convert", "gqa-to-mla", str(src), str(dst),
                           "--kv-lora-rank", "64", "--rope-dim", "64", "--dtype", "float32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for phrase in ("q_norm and k_norm", "RMSNorm over head_dim", "no exact MLA form",
                   "vLLM's own attention", "Llama, Mistral or Qwen2"):
        assert phrase in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen3"]  # nothing written, not even parents


def test_qwen3_key_is_not_linear_in_the_input(tmp_path):
    """The fact the refusal rests on: a Qwen3 key head k = g ⊙ W x / rms(W x) is unchanged when
    x doubles and no linear map of x fits it, while an MLA rope key is linear in x."""
    from safetensors.torch import load_file

    src = _tiny_qwen3(tmp_path)
    weights = load_file(str(src / "model.safetensors"))
    w_k = weights["model.layers.0.self_attn.k_proj.weight"].double()  # [K·d_h, d_model]
    g = weights["model.layers.0.self_attn.k_norm.weight"].double()  # [d_h]
    d_h = g.numel()

    def key(x):  # x [n, d_model] -> [n, K, d_h], as Qwen3Attention computes it before RoPE
        k = (x @ w_k.T).view(x.shape[0], -1, d_h)
        return g * k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6)

    x = torch.randn(4000, w_k.shape[1], dtype=torch.float64)
    assert torch.allclose(key(2 * x), key(x), atol=1e-6)  # scale-invariant, so not linear
    target = key(x).flatten(1)  # [n, K·d_h]
    fit = torch.linalg.lstsq(x, target).solution  # the best linear key, [d_model, K·d_h]
    residual = (x @ fit - target).norm() / target.norm()
    assert residual > 0.05, residual  # far from any linear function of x
