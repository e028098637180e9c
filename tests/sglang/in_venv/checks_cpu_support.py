"""Run inside .venv-sglang with SGLANG_USE_CPU_ENGINE=1 (tests/sglang/test_in_sglang_venv.py):
the CPU stand-ins against plain references, on fresh random inputs."""

import os
import subprocess
import sys

import pytest
import torch

from mla_plugin.sglang import cpu_support


def test_assign_req_to_token_pool_matches_a_loop(rng):
    pool = torch.zeros(6, 40, dtype=torch.int32)
    rows = torch.randperm(6, generator=rng)[:3]
    starts = torch.randint(0, 10, (3,), generator=rng)
    ends = starts + torch.randint(0, 20, (3,), generator=rng)
    locs = torch.randint(1, 1000, (int((ends - starts).sum()),), generator=rng)
    expected = pool.clone()
    taken = 0
    for b in range(3):
        for pos in range(int(starts[b]), int(ends[b])):
            expected[rows[b], pos] = locs[taken]
            taken += 1
    cpu_support.assign_req_to_token_pool_cpu(rows, pool, starts, ends, locs, pool.shape[1])
    assert torch.equal(pool, expected)


def test_copy_all_layer_kv_cache_moves_rows_in_every_layer(rng):
    layers = [torch.randn(32, 1, 24, generator=rng), torch.randn(32, 3, 8, generator=rng).double()]
    before = [t.clone() for t in layers]
    src = torch.randperm(32, generator=rng)[:6]
    tgt = torch.cat([src[3:], torch.randperm(32, generator=rng)[:3]])  # overlaps the sources
    ptrs = torch.tensor([t.data_ptr() for t in layers], dtype=torch.uint64)
    strides = torch.tensor([t[0].nbytes for t in layers], dtype=torch.int64)
    cpu_support.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for now, old in zip(layers, before):
        expected = old.clone()
        expected[tgt] = old[src]
        assert torch.equal(now, expected)


def test_plain_rope_through_the_cpu_factory_is_plain_rope():
    from sglang.srt.layers.rotary_embedding import factory

    cpu_support.register_cpu_hooks()
    from mla_plugin.sglang.compat import HookRegistry

    HookRegistry.apply_hooks()
    rope = factory.get_rope_cpu(64, 64, 2048, 10000, False, None, torch.float32, 1.0, "cpu")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    angles = torch.outer(torch.arange(2048, dtype=torch.float32), inv_freq)  # [positions, 32]
    expected = torch.cat([angles.cos(), angles.sin()], dim=-1)
    assert torch.allclose(rope.cos_sin_cache.float(), expected, atol=1e-5)


def test_stand_ins_only_on_cpu_and_only_where_missing():
    probe = ("import importlib.util, sys; "
             "print(importlib.util.find_spec('sgl_kernel') is not None)")
    env = {k: v for k, v in os.environ.items() if k != cpu_support.CPU_SWITCH}
    off = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    on = subprocess.run([sys.executable, "-c", probe], env={**env, cpu_support.CPU_SWITCH: "1"},
                        capture_output=True, text=True, check=True)
    assert (off.stdout.strip(), on.stdout.strip()) == ("False", "True")
    import sgl_kernel

    assert sgl_kernel.__mla_plugin_stand_in__
    with pytest.raises(ImportError):
        exec("from sgl_kernel import fused_experts_cpu")
    with pytest.raises(NotImplementedError, match="speculative decoding"):
        sgl_kernel.verify_tree_greedy_cpu()


def test_torchvision_placeholder_is_for_sglang_only():
    from transformers.utils.import_utils import is_torchvision_available

    import sglang.srt.multimodal.internvl_utils as internvl  # imports torchvision.transforms

    assert not is_torchvision_available()
    with pytest.raises(ImportError, match="torchvision is not installed"):
        internvl.build_transform(32, mean=(0, 0, 0), std=(1, 1, 1))
