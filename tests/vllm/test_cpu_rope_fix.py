"""The CPU rotary-kernel fix: inactive it changes nothing, active it is right.

If test_kernel_is_wrong_without_the_fix starts failing, vLLM fixed its kernel and
mla_plugin/vllm/cpu_rope_fix.py can go.
"""

import pytest
import torch

from mla_plugin.vllm import cpu_rope_fix
from tests.vllm.engines import assert_matches_transformers, run_engine


@pytest.fixture
def rope():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from mla_plugin.vllm.registration import register

    register()  # installs the fix (inactive until our backend is selected)
    with set_current_vllm_config(VllmConfig()):
        return get_rope(
            64, max_position=512, is_neox_style=False,
            rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, dtype=torch.float32,
        )


def _rotate(rope, q, k):
    q, k = q.clone(), k.clone()
    out_q, out_k = rope.forward_cpu(torch.arange(q.shape[0]), q, k)
    assert out_q.data_ptr() == q.data_ptr()  # in place, as the kernel's contract says
    return q, k


def test_kernel_is_wrong_without_the_fix(rope, rng, monkeypatch):
    monkeypatch.setattr(cpu_rope_fix, "_active", False)
    nope = 32
    q = torch.randn(7, 4, nope + 64, generator=rng)[..., nope:]  # [T, H, d_R] view, as MLA passes
    k = torch.randn(7, 1, 64, generator=rng)
    ref_q, ref_k = rope.forward_native(torch.arange(7), q.clone(), k.clone())
    kernel_q, kernel_k = _rotate(rope, q, k)
    assert (kernel_q - ref_q).abs().max() > 0.1, "vLLM's kernel is right now: drop cpu_rope_fix"
    torch.testing.assert_close(kernel_k, ref_k)  # single-head keys were always right


def test_fix_matches_native_when_active(rope, rng, monkeypatch):
    monkeypatch.setattr(cpu_rope_fix, "_active", True)
    for q, k in [
        (torch.randn(7, 4, 96, generator=rng)[..., 32:], torch.randn(7, 1, 64, generator=rng)),
        (torch.randn(5, 3, 64, generator=rng), torch.randn(5, 3, 64, generator=rng)),
        (torch.randn(6, 4 * 64, generator=rng), torch.randn(6, 64, generator=rng)),  # 2-D: kernel path
    ]:
        ref_q, ref_k = rope.forward_native(torch.arange(q.shape[0]), q.clone(), k.clone())
        got_q, got_k = _rotate(rope, q, k)
        torch.testing.assert_close(got_q, ref_q)
        torch.testing.assert_close(got_k, ref_k)


def test_ours_is_right_with_vllm_custom_ops_enabled(tiny_ds_576):
    """The user's default eager path (custom ops on), not only custom_ops=none."""
    result = run_engine(tiny_ds_576, backend="mla_plugin", compilation_config={}, max_tokens=8)
    assert_matches_transformers(result, tiny_ds_576, atol=1e-4)
