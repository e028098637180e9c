"""fp8 block (de)quantisation: the converter's reader against the fixture's independent expansion,
edge blocks included; the quantisation config both loaders read."""

import pytest
import torch

from mla_plugin.convert.fp8_blocks import BlockFp8, unquantised_config
from mla_plugin.convert.pipeline import ConversionError
from mla_plugin.fixtures.fp8_checkpoints import QUANTIZATION_CONFIG, dequantise_reference, quantise_block_fp8


@pytest.mark.parametrize("shape", [(576, 128), (300, 200), (64, 128), (128, 64), (129, 257)])
def test_dequantise_matches_the_reference_with_edge_blocks(rng, shape):
    weight = 0.08 * torch.randn(shape, generator=rng)
    fp8, scale_inv = quantise_block_fp8(weight)
    assert fp8.dtype == torch.float8_e4m3fn and list(scale_inv.shape) == [-(-shape[0] // 128), -(-shape[1] // 128)]
    ours = BlockFp8.of_config({"quantization_config": QUANTIZATION_CONFIG}, "x").dequantise(fp8, scale_inv, "w")
    assert ours.dtype == torch.float64
    # the reference multiplies in float32 (as loaders do): equal up to its rounding
    torch.testing.assert_close(ours, dequantise_reference(fp8, scale_inv).double(), rtol=2 ** -23, atol=0)
    # e4m3 keeps 3 mantissa bits: within 1/16 of each block's largest value, and not exact
    assert (ours - weight.double()).abs().max() <= weight.abs().max() / 16
    assert (ours - weight.double()).abs().max() > 0


def test_bad_scale_shapes_and_other_quantisations_are_clear_errors():
    fp8 = BlockFp8(128, 128)
    with pytest.raises(ConversionError, match=r"needs \[5, 1\]"):
        fp8.dequantise(torch.zeros(576, 128).to(torch.float8_e4m3fn), torch.ones(4, 1), "kv_a")
    assert BlockFp8.of_config({}, "x") is None
    with pytest.raises(ConversionError, match="not supported"):
        BlockFp8.of_config({"quantization_config": dict(QUANTIZATION_CONFIG, fmt="e5m2")}, "x")


def test_unquantised_config_lists_modules_under_both_keys():
    out = unquantised_config(dict(QUANTIZATION_CONFIG), {"model.layers.0.self_attn.kv_b_proj"})
    assert out["modules_to_not_convert"] == out["ignored_layers"] == ["lm_head", "model.layers.0.self_attn.kv_b_proj"]
    kept = unquantised_config(dict(QUANTIZATION_CONFIG, ignored_layers=["model.layers.0.mlp.gate"]), {"a"})
    assert kept["modules_to_not_convert"] == kept["ignored_layers"] == ["a", "model.layers.0.mlp.gate"]
    assert "modules_to_not_convert" not in QUANTIZATION_CONFIG  # the input is not changed
