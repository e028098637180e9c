"""Bad requests give one clear error, early, never a hang or a silent fallback."""

import pytest

from tests.vllm.engines import run_engine


def test_model_without_mla(tiny_llama):
    with pytest.raises(ValueError, match="needs a model with multi-head latent attention"):
        run_engine(tiny_llama, backend="mla_plugin", max_tokens=1)


def test_kv_cache_dtype_that_is_not_a_latent_cache(tiny_ds_576):
    with pytest.raises(ValueError, match="does not support --kv-cache-dtype fp8_e5m2"):
        run_engine(tiny_ds_576, backend="mla_plugin", kv_cache_dtype="fp8_e5m2", max_tokens=1)


def test_unknown_backend_name_lists_ours(tiny_ds_576):
    with pytest.raises(ValueError, match="MLA_PLUGIN"):
        run_engine(tiny_ds_576, backend="mla_plugn", max_tokens=1)


def test_llama_without_request_is_untouched(tiny_llama):
    """The installed plugin does not get in the way of other models."""
    from tests.vllm.engines import assert_matches_transformers

    result = run_engine(tiny_llama, max_tokens=4)
    assert_matches_transformers(result, tiny_llama, atol=1e-4)
