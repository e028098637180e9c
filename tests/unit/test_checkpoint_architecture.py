"""Converted checkpoints name what their weights mean (no vLLM here).

Not an ordinary DeepSeek-V2 (sharded latent with partitioned / grouped softmax or the local
RMSNorm; every gqa-to-mla output) -> MLAPluginDeepseekV2ForCausalLM, an auto_map and the
modeling file beside the weights, which computes the declared function in transformers;
exact conversions stay DeepseekV2ForCausalLM.
"""

import json
import shutil

import pytest
import torch

from mla_plugin.checkpoint_format import (
    CONVERTED_ARCHITECTURE,
    CONVERTED_AUTO_MAP,
    REMOTE_CODE_FILE,
    STOCK_ARCHITECTURE,
    is_ordinary_deepseek_v2,
    sharded_latent_changes_function,
    transformers_loading_problem,
)
from mla_plugin.convert.declared_config import REMOTE_CODE
from mla_plugin.convert.gqa_to_mla import convert_gqa_to_mla
from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.convert.modeling_mla_plugin import LatentSliceAttention
from mla_plugin.fixtures import make_tiny_llama
from mla_plugin.ops.reference import sharded_latent_attention
from tests.converters import exact_settings, tiny_deepseek


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_deepseek(tmp_path_factory.mktemp("ds"))


def _written(path) -> tuple[dict, bool]:
    return json.loads((path / "config.json").read_text()), (path / REMOTE_CODE_FILE).is_file()


@pytest.mark.parametrize("softmax,rmsnorm,basis,ordinary", [
    ("exact", "global", "hadamard", True),
    ("exact", "global", "identity", True),
    ("partitioned", "global", "identity", False),
    ("grouped", "global", "hadamard", False),
    ("exact", "local", "identity", False),
])
def test_mla_to_gla_declares_what_it_wrote(source, tmp_path, softmax, rmsnorm, basis, ordinary):
    convert_mla_to_gla(source, tmp_path / "out", shards=2, softmax=softmax, rmsnorm=rmsnorm, basis=basis,
                       show_progress=False)
    config, has_code = _written(tmp_path / "out")
    assert config["model_type"] == "deepseek_v2"  # vLLM recognises MLA by it
    if ordinary:
        assert config["architectures"] == [STOCK_ARCHITECTURE] and "auto_map" not in config and not has_code
    else:
        assert config["architectures"] == [CONVERTED_ARCHITECTURE] and config["auto_map"] == CONVERTED_AUTO_MAP
        assert has_code
    assert is_ordinary_deepseek_v2(config) is ordinary


def test_gqa_to_mla_always_declares_the_converted_architecture(tmp_path):
    llama = make_tiny_llama(tmp_path / "llama", seed=5, num_heads=4, num_kv_heads=2)
    convert_gqa_to_mla(llama, tmp_path / "out", show_progress=False, **exact_settings(str(llama)))
    config, has_code = _written(tmp_path / "out")
    assert config["architectures"] == [CONVERTED_ARCHITECTURE] and config["auto_map"] == CONVERTED_AUTO_MAP
    assert has_code and not is_ordinary_deepseek_v2(config)


@pytest.mark.parametrize("options,tp,changes", [
    (None, None, False),
    ({"layout": "sharded_latent", "shards": 4}, None, False),  # exact + global: MLA
    ({"softmax": "partitioned", "shards": 2}, None, True),
    ({"softmax": "grouped"}, None, True),  # shards unset, TP unknown: assume it changes
    ({"softmax": "grouped"}, 1, False),  # one slice: MLA
    ({"softmax": "partitioned", "shards": 1, "logit_scale": 2.0}, None, True),
    ({"rmsnorm": "local", "shards": 2}, None, True),
    ({"rmsnorm": "local"}, 1, False),
])
def test_which_options_change_the_function(options, tp, changes):
    assert sharded_latent_changes_function(options, tp_size=tp) is changes


def test_old_style_sharded_checkpoint_is_refused_by_stock_transformers_code():
    old = {"model_type": "deepseek_v2", "architectures": [STOCK_ARCHITECTURE],
           "mla_plugin": {"layout": "sharded_latent", "shards": 2, "softmax": "grouped"}}
    assert "no auto_map" in transformers_loading_problem(old)
    assert transformers_loading_problem(dict(old, auto_map=CONVERTED_AUTO_MAP)) is None
    assert transformers_loading_problem(dict(old, mla_plugin={"layout": "sharded_latent", "shards": 2})) is None


@pytest.mark.parametrize("softmax,shards,scaled", [("exact", 2, False), ("partitioned", 4, True),
                                                   ("grouped", 2, False), ("grouped", 4, True)])
def test_slice_attention_equals_the_ops_oracle(rng, softmax, shards, scaled):
    """The modeling file's attention (self-contained) = mla_plugin.ops' float64 oracle."""
    heads, d_c, d_r, d_nope, d_v, length, queries = 4, 32, 8, 6, 5, 11, 11
    rand = lambda *shape: torch.randn(*shape, generator=rng, dtype=torch.float64)  # noqa: E731
    q_nope, q_pe = rand(1, heads, queries, d_nope), rand(1, heads, queries, d_r)
    latent, k_pe = rand(1, length, d_c), rand(1, length, d_r)
    w_uk, w_uv = rand(heads, d_nope, d_c), rand(heads, d_v, d_c)
    scale = 2.0 if scaled else 1.0
    ours = LatentSliceAttention(shards=shards, softmax=softmax, logit_scale=scale)(
        q_nope, q_pe, latent, k_pe, w_uk, w_uv, None, 0.3)  # [1, H, S, d_v]
    q_latent = torch.einsum("hsn,hnc->shc", q_nope[0], w_uk)  # [S, H, d_c]
    lam = torch.full((heads, shards), scale, dtype=torch.float64) if softmax != "exact" else None
    (oracle,) = sharded_latent_attention([q_latent], [q_pe[0].transpose(0, 1)], [latent[0]], [k_pe[0]], 0.3,
                                         num_shards=shards, softmax_mode=softmax, logit_scale=lam)
    expected = torch.einsum("shc,hvc->hsv", oracle, w_uv)  # [H, S, d_v]
    torch.testing.assert_close(ours[0], expected, rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def trained():
    from mla_plugin.fixtures import trained_fixture

    return trained_fixture("deepseek-v2-tiny")


def _remote_logits(path, ids, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=True).eval()
    with torch.no_grad():
        return model, model(ids, **kwargs)


def test_modeling_file_one_slice_is_stock_and_caches_consistently(trained, tmp_path, rng):
    """partitioned over one slice is MLA: through the modeling file's own attention it equals
    transformers' DeepseekV2; decoding with the cache equals the full forward."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 4096, (1, 24), generator=rng)
    path = tmp_path / "one-slice"
    shutil.copytree(trained, path)
    config = json.loads((path / "config.json").read_text())
    config.update(mla_plugin={"softmax": "partitioned", "shards": 1}, architectures=[CONVERTED_ARCHITECTURE],
                  auto_map=CONVERTED_AUTO_MAP)
    (path / "config.json").write_text(json.dumps(config))
    shutil.copy2(REMOTE_CODE, path / REMOTE_CODE_FILE)
    model, full = _remote_logits(path, ids)
    assert type(model.model.layers[0].self_attn).__name__ == "ShardedLatentDeepseekV2Attention"
    stock = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = stock(ids).logits
        prefix = model(ids[:, :-4], use_cache=True)
        steps = model(ids[:, -4:], past_key_values=prefix.past_key_values).logits
    torch.testing.assert_close(full.logits, reference, rtol=0, atol=2e-4)
    torch.testing.assert_close(steps, full.logits[:, -4:], rtol=0, atol=2e-5)
    assert not model.is_backend_compatible() and not type(model)._can_set_attn_implementation()


def test_modeling_file_computes_the_conversion_not_the_source(trained, tmp_path, rng):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 4096, (1, 24), generator=rng)
    convert_mla_to_gla(trained, tmp_path / "p", shards=2, softmax="partitioned", show_progress=False)
    _, converted = _remote_logits(tmp_path / "p", ids)
    stock_code = AutoModelForCausalLM.from_pretrained(tmp_path / "p", dtype=torch.float32).eval()
    with torch.no_grad():
        as_plain_mla = stock_code(ids).logits
    assert (converted.logits - as_plain_mla).abs().max() > 0.1


def test_backend_choice_for_declared_attention():
    """declared_backend.py (no vLLM needed): what a checkpoint picks, and which requests fail."""
    from types import SimpleNamespace

    from mla_plugin.vllm.declared_backend import (
        WrongBackendError,
        check_layer_backend,
        check_requested_backend,
        declared_backend,
    )

    partitioned = SimpleNamespace(qk_rope_head_dim=64, mla_plugin={"layout": "sharded_latent", "shards": 2,
                                                                   "softmax": "partitioned"})
    exact = SimpleNamespace(qk_rope_head_dim=64, mla_plugin={"layout": "sharded_latent", "shards": 2})
    gqa = SimpleNamespace(qk_rope_head_dim=64, mla_plugin={"layout": "mla", "latent_norm": False})
    stock = SimpleNamespace(qk_rope_head_dim=64)
    assert [declared_backend(c) for c in (partitioned, exact, gqa, stock)] == [
        "MLA_PLUGIN_GLA", "MLA_PLUGIN_GLA", "MLA_PLUGIN", None]
    for requested in ("MLA_PLUGIN", "CPU_MLA", "TRITON_MLA", "mla_plugin"):
        with pytest.raises(WrongBackendError, match="--attention-backend mla_plugin_gla"):
            check_requested_backend("m", partitioned, requested, tp_size=1)
        check_requested_backend("m", exact, requested, tp_size=1)  # exact = MLA: any backend
        check_requested_backend("m", gqa, requested, tp_size=1)
    check_requested_backend("m", partitioned, "MLA_PLUGIN_GLA", tp_size=2)
    check_requested_backend("m", partitioned, None, tp_size=1)
    with pytest.raises(WrongBackendError, match="--attention-backend mla_plugin, or leave out"):
        check_requested_backend("m", gqa, "MLA_PLUGIN_GLA", tp_size=1)
    with pytest.raises(WrongBackendError, match="only the MLA_PLUGIN_GLA backend computes"):
        check_layer_backend(partitioned, sharded_layer=False, tp_size=1)
    check_layer_backend(partitioned, sharded_layer=True, tp_size=1)
    check_layer_backend(exact, sharded_layer=False, tp_size=2)
