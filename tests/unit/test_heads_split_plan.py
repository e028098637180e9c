"""Grouped mode splits the heads with the latent: which heads, rows and columns a rank holds,
that the narrowed blocks fold to the blocks of the whole fold, and the per-group latent
projection option (docs/design.md section 4). No vLLM."""

from types import SimpleNamespace

import pytest
import torch

from mla_plugin.gla_options import plan_for
from mla_plugin.sharded_weights import (
    fold_rank_up_projection,
    rank_latent_projection_block,
    rank_up_projection_block,
    rank_up_projection_shape,
)

HEADS, NOPE, V, D_C = 8, 3, 5, 16


def _config(**options):
    return SimpleNamespace(q_lora_rank=None, kv_lora_rank=D_C, num_attention_heads=HEADS, mla_plugin=options)


def test_grouped_rank_holds_its_heads_exact_and_partitioned_hold_all():
    for rank in range(2):
        plan = plan_for(_config(shards=4, softmax="grouped"), tp_size=2, tp_rank=rank)
        assert plan.heads_split and plan.local_heads == 4 and plan.head_offset == 4 * rank
        assert plan.up_projection_columns == plan.local_columns == slice(8 * rank, 8 * rank + 8)
        assert rank_up_projection_shape(plan, nope_dim=NOPE, v_dim=V) == (4 * (NOPE + V), 8)
    for softmax in ("exact", "partitioned"):
        plan = plan_for(_config(shards=2, softmax=softmax), tp_size=2, tp_rank=1)
        assert not plan.heads_split and plan.local_heads == HEADS and plan.head_offset == 0
        assert plan.up_projection_columns == slice(0, D_C)
    # a basis applied at load mixes the columns: the rank keeps its heads' rows, all columns
    plan = plan_for(_config(shards=2, softmax="grouped", basis="hadamard"), tp_size=2, tp_rank=1)
    assert rank_up_projection_shape(plan, nope_dim=NOPE, v_dim=V) == (4 * (NOPE + V), D_C)


@pytest.mark.parametrize("basis,shards", [("identity", 2), ("identity", 4), ("hadamard", 4)])
def test_narrowed_blocks_fold_to_the_blocks_of_the_whole_fold(rng, basis, shards):
    kv_b = torch.randn(HEADS * (NOPE + V), D_C, generator=rng, dtype=torch.float64)
    gamma = torch.rand(D_C, generator=rng, dtype=torch.float64) + 0.5
    options = dict(shards=shards, softmax="grouped", basis=basis, logit_scale=1.5)
    whole = fold_rank_up_projection(plan_for(_config(**options), tp_size=1), kv_b, gamma, nope_dim=NOPE, v_dim=V)
    assert whole.w_uk.shape == (HEADS, NOPE, D_C)
    for rank in range(2):
        plan = plan_for(_config(**options), tp_size=2, tp_rank=rank)
        block = rank_up_projection_block(plan, kv_b, nope_dim=NOPE, v_dim=V)
        assert block.untyped_storage().data_ptr() == kv_b.untyped_storage().data_ptr()  # no copy
        part = fold_rank_up_projection(plan, block.clone(), gamma, nope_dim=NOPE, v_dim=V)
        heads, cols = slice(4 * rank, 4 * rank + 4), plan.local_columns
        torch.testing.assert_close(part.w_uk, whole.w_uk[heads][..., cols], rtol=0, atol=1e-12)
        torch.testing.assert_close(part.w_uv, whole.w_uv[heads][..., cols], rtol=0, atol=1e-12)


def test_fold_refuses_the_whole_matrix_where_a_block_is_expected(rng):
    plan = plan_for(_config(shards=2, softmax="grouped"), tp_size=2, tp_rank=0)
    with pytest.raises(ValueError, match="does not match the plan"):
        fold_rank_up_projection(plan, torch.zeros(HEADS * (NOPE + V), D_C), torch.ones(D_C), nope_dim=NOPE, v_dim=V)


def test_latent_projection_rows_of_a_rank(rng):
    projection = torch.randn(D_C, D_C, generator=rng)
    for rank in range(2):
        plan = plan_for(_config(shards=4, softmax="grouped", layout="sharded_latent", latent_projection=True),
                        tp_size=2, tp_rank=rank)
        assert plan.latent_projection
        torch.testing.assert_close(rank_latent_projection_block(plan, projection),
                                   projection[8 * rank: 8 * rank + 8], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"is not \[d_c, d_c\]"):
        rank_latent_projection_block(plan, projection[:8])


@pytest.mark.parametrize("options,tp_size,message", [
    (dict(softmax="grouped", basis="pca"), 2, "splits the heads over the ranks"),
    (dict(softmax="grouped", layout="sharded_latent", latent_projection="yes"), 1, "must be true or false"),
    (dict(softmax="partitioned", layout="sharded_latent", latent_projection=True), 1, "needs softmax 'grouped'"),
    (dict(softmax="grouped", rmsnorm="local", layout="sharded_latent", latent_projection=True), 1,
     "rmsnorm 'global'"),
    (dict(softmax="grouped", latent_projection=True), 1, "layout 'sharded_latent'"),
])
def test_bad_heads_split_options_are_clear_errors(options, tp_size, message):
    with pytest.raises(ValueError, match=message):
        plan_for(_config(shards=2, **options), tp_size=tp_size)


def test_grouped_pca_at_load_still_works_on_one_rank():
    plan = plan_for(_config(shards=2, softmax="grouped", basis="pca"), tp_size=1)
    assert plan.local_heads == HEADS and plan.up_projection_columns == slice(0, D_C)
