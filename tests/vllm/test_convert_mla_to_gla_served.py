"""Converted checkpoints through vLLM with the plugin, with no flags at all."""

import pytest

from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.vllm.mla_backend import DECODE_CALLS
from tests.vllm.engines import assert_same_logprobs, run_engine
from tests.vllm.helpers import gla


def test_exact_conversion_round_trip(tiny_ds_576, ours_576, tmp_path):
    """exact + hadamard, folded into the weights: still MLA, served as the sharded layout."""
    convert_mla_to_gla(tiny_ds_576, tmp_path / "exact", shards=2, softmax="exact", basis="hadamard",
                       show_progress=False)
    before = DECODE_CALLS.get("MLA_PLUGIN_GLA", 0)
    result = run_engine(str(tmp_path / "exact"))
    assert DECODE_CALLS.get("MLA_PLUGIN_GLA", 0) > before
    assert_same_logprobs(result, ours_576, atol=1e-4)


@pytest.mark.parametrize("softmax,rmsnorm,basis", [("partitioned", "global", "hadamard"),
                                                   ("grouped", "local", "pca")])
def test_converted_equals_load_time_options(tiny_ds_576, tmp_path, softmax, rmsnorm, basis):
    """Basis, norm weight and slice scale baked in by the converter = applied by the runtime."""
    convert_mla_to_gla(tiny_ds_576, tmp_path / "out", shards=2, softmax=softmax, rmsnorm=rmsnorm,
                       basis=basis, show_progress=False)
    converted = run_engine(str(tmp_path / "out"))
    at_load = run_engine(tiny_ds_576, backend="mla_plugin_gla", hf_overrides=gla(softmax, rmsnorm, basis))
    assert_same_logprobs(converted, at_load, atol=1e-4)
