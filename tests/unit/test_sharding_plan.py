"""The sharding plan: parsed once, immutable, framework-neutral; the vocabularies the CLI
offers; one rank's folded up-projection."""

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from mla_plugin.gla_options import (
    BASES,
    CONVERTER_BASES,
    LAYOUTS,
    RMSNORM_MODES,
    SOFTMAX_MODES,
    ShardedLatentOptions,
    ShardingPlan,
    plan_for,
)
from mla_plugin.ops.latent_basis import fold_latent_weights
from mla_plugin.sharded_weights import fold_rank_up_projection


def _config(**options):
    return SimpleNamespace(q_lora_rank=None, kv_lora_rank=16, num_attention_heads=4, mla_plugin=options or None)


def test_plan_names_each_width():
    plans = [plan_for(_config(shards=4, softmax="partitioned"), tp_size=2, tp_rank=r) for r in range(2)]
    for rank, plan in enumerate(plans):
        assert (plan.latent_dim, plan.shards, plan.shard_dim, plan.shards_local) == (16, 4, 4, 2)
        assert plan.local_latent_dim == 8 and plan.shard_offset == 2 * rank
        assert plan.local_columns == slice(8 * rank, 8 * rank + 8)
        assert (plan.softmax, plan.rmsnorm, plan.basis, plan.logit_scale) == ("partitioned", "global", "identity", 4.0)
    single = plan_for(_config(shards=4), tp_size=1)
    assert single.local_latent_dim == single.latent_dim == 16 and single.local_columns == slice(0, 16)


def test_plan_is_immutable():
    plan = plan_for(_config(), tp_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.shards = 4  # type: ignore[misc]
    assert plan.shards == 2  # g defaults to the TP size


@pytest.mark.parametrize("softmax,logit_scale,expected", [
    ("exact", "auto", 1.0), ("exact", 3.0, 1.0), ("partitioned", "auto", 2.0), ("grouped", "auto", 1.0),
    ("partitioned", 1.5, 1.5),
])
def test_logit_scale_is_resolved_once(softmax, logit_scale, expected):
    assert plan_for(_config(softmax=softmax, logit_scale=logit_scale), tp_size=2).logit_scale == expected


@pytest.mark.parametrize("options,tp_size,tp_rank,message", [
    ({"shards": 3}, 1, 0, "not divisible by mla_plugin.shards=3"),
    ({"shards": 2}, 4, 0, "must be a multiple of the TP size 4"),
    ({"softmax": "grouped", "shards": 8}, 1, 0, "heads divisible by shards=8"),
    ({}, 2, 2, "tp_rank 2 is outside 0..1"),
    ({"softmax": "fast"}, 1, 0, "softmax must be one of"),
    ({"softmx": "exact"}, 1, 0, "unknown mla_plugin option"),
])
def test_bad_plans_are_clear_errors(options, tp_size, tp_rank, message):
    with pytest.raises(ValueError, match=message):
        plan_for(_config(**options), tp_size=tp_size, tp_rank=tp_rank)


def test_q_lora_checkpoints_are_planned_and_bad_ranks_refused():
    """A low-rank query changes nothing in the plan (tests/unit/test_low_rank_query.py)."""
    plan = plan_for(SimpleNamespace(q_lora_rank=64, kv_lora_rank=16, num_attention_heads=4), tp_size=1)
    assert plan == plan_for(_config(), tp_size=1)
    with pytest.raises(ValueError, match="q_lora_rank must be null or a positive integer"):
        plan_for(SimpleNamespace(q_lora_rank=0, kv_lora_rank=16, num_attention_heads=4), tp_size=1)


def test_vocabularies_are_the_options_and_the_cli_choices():
    from mla_plugin.cli import build_parser

    fields = {f.name: f.default for f in dataclasses.fields(ShardedLatentOptions)}
    assert fields["softmax"] == SOFTMAX_MODES[0] and fields["rmsnorm"] == RMSNORM_MODES[0]
    assert fields["basis"] == BASES[0] and fields["layout"] == LAYOUTS[0]
    assert CONVERTER_BASES[: len(BASES)] == BASES
    parser = build_parser()
    convert = next(a for a in parser._subparsers._group_actions[0].choices["convert"]._actions
                   if a.dest == "converter")
    options = {a.dest: a.choices for a in convert.choices["mla-to-gla"]._actions}
    assert tuple(options["softmax"]) == SOFTMAX_MODES
    assert tuple(options["rmsnorm"]) == RMSNORM_MODES
    assert tuple(options["basis"]) == CONVERTER_BASES


def test_ops_use_the_same_vocabularies():
    from mla_plugin import ops
    from mla_plugin.ops import latent_basis

    assert ops.SOFTMAX_MODES is SOFTMAX_MODES and ops.NORM_MODES is RMSNORM_MODES
    assert latent_basis.BASES is BASES


def test_plan_module_imports_no_framework():
    code = ("import sys, mla_plugin.gla_options, mla_plugin.checkpoint_format; "
            "bad = sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- one rank's folded up-projection -------------------------------------------------


@pytest.mark.parametrize("basis", ["identity", "hadamard", "pca"])
def test_rank_folds_are_the_slices_of_the_whole_fold(basis, rng):
    heads, nope, v, d_c = 4, 3, 5, 16
    kv_b = torch.randn(heads * (nope + v), d_c, generator=rng, dtype=torch.float64)
    gamma = torch.rand(d_c, generator=rng, dtype=torch.float64) + 0.5
    options = {"shards": 4, "softmax": "partitioned", "basis": basis}
    whole = fold_rank_up_projection(plan_for(_config(**options), tp_size=1), kv_b, gamma, nope_dim=nope, v_dim=v)
    rotation, _, w_uk, w_uv = fold_latent_weights(kv_b, gamma, num_heads=heads, nope_dim=nope, v_dim=v,
                                                  basis=basis, logit_scale=4.0)
    torch.testing.assert_close(whole.w_uk, w_uk, rtol=0, atol=0)
    torch.testing.assert_close(whole.w_uv, w_uv, rtol=0, atol=0)
    assert (whole.rotation is None) == (basis == "identity")
    if whole.rotation is not None:
        torch.testing.assert_close(whole.rotation, rotation, rtol=0, atol=0)
    ranks = [fold_rank_up_projection(plan_for(_config(**options), tp_size=2, tp_rank=r), kv_b, gamma,
                                     nope_dim=nope, v_dim=v) for r in range(2)]
    for part in ("w_uk", "w_uv"):
        pieces = [getattr(rank, part) for rank in ranks]
        assert all(p.shape[-1] == 8 and p.is_contiguous() for p in pieces)  # [H, d, d_loc]
        torch.testing.assert_close(torch.cat(pieces, dim=-1), getattr(whole, part), rtol=0, atol=0)


def test_rank_fold_keeps_the_weight_dtype(rng):
    kv_b = torch.randn(4 * 8, 16, generator=rng).to(torch.bfloat16)
    folded = fold_rank_up_projection(plan_for(_config(), tp_size=2), kv_b, torch.ones(16), nope_dim=3, v_dim=5)
    assert folded.w_uk.dtype == folded.w_uv.dtype == torch.bfloat16
    assert folded.w_uk.shape == (4, 3, 8) and folded.w_uv.shape == (4, 5, 8)


def test_rank_fold_refuses_weights_of_another_shape(rng):
    with pytest.raises(ValueError, match="does not match the plan"):
        fold_rank_up_projection(plan_for(_config(), tp_size=1), torch.zeros(4 * 8, 12), torch.ones(12),
                                nope_dim=3, v_dim=5)


def test_plan_type_is_what_plan_for_returns():
    assert isinstance(plan_for(_config(), tp_size=1), ShardingPlan)
