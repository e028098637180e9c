"""The low-rank query (q_lora_rank) in the sharded latent, without a framework: which weight
holds the per-head query rows, and the loader of the fused
[q_a_proj; kv_a_proj_with_mqa] parameter."""

from types import SimpleNamespace

import pytest
import torch

from mla_plugin.gla_options import query_projection_of
from mla_plugin.sharded_weights import stacked_rows_weight_loader


def _config(q_lora_rank, softmax="exact"):
    return SimpleNamespace(q_lora_rank=q_lora_rank, kv_lora_rank=16, num_attention_heads=4,
                           mla_plugin={"shards": 2, "softmax": softmax})


def test_query_projection_names_the_per_head_weight():
    low = query_projection_of(_config(24))
    assert (low.is_low_rank, low.per_head_weight) == (True, "q_b_proj")
    assert low.per_head_input_dim(128) == 24
    full = query_projection_of(_config(None))
    assert (full.is_low_rank, full.per_head_weight) == (False, "q_proj")
    assert full.per_head_input_dim(128) == 128
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="q_lora_rank must be null or a positive integer"):
            query_projection_of(_config(bad))


def test_stacked_loader_puts_each_tensor_in_its_rows():
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    q_a, kv_a = torch.randn(5, 8, generator=generator), torch.randn(3, 8, generator=generator)
    param = torch.nn.Parameter(torch.full((8, 8), float("nan")), requires_grad=False)
    loader = stacked_rows_weight_loader((5, 3), "TEST")
    loader(param, kv_a, 1)  # the loader's order is the checkpoint's, not the rows'
    loader(param, q_a, 0)
    assert torch.equal(param.data, torch.cat([q_a, kv_a]))
    with pytest.raises(ValueError, match=r"does not fit part 1 \(3, 8\)"):
        loader(param, q_a, 1)
    with pytest.raises(ValueError, match="got shard id None"):
        loader(param, q_a)  # an unmapped (whole-tensor) load is refused, not spread over the rows
    with pytest.raises(ValueError, match="got shard id 2"):
        loader(param, kv_a, 2)
