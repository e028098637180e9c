"""Run inside .venv-sglang: how SGLang's launcher picks (or refuses) the backend of a checkpoint
that declares a sharded latent, and that the plugin's hooks for mla_plugin_gla are in place."""

import json
import shutil

import pytest

from mla_plugin.fixtures import trained_fixture

pytest.importorskip("sglang", reason="run by tests/sglang/test_in_sglang_venv.py inside .venv-sglang")


@pytest.fixture(scope="module")
def plugins():
    from sglang.srt.plugins import load_plugins

    load_plugins()


def checkpoint(tmp_path, options: dict | None, architecture: str = "DeepseekV2ForCausalLM"):
    """The trained DeepSeek fixture with ``options`` as its config.json's mla_plugin entry."""
    src = trained_fixture("deepseek-v2-tiny")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = [architecture]
    if options is not None:
        config["mla_plugin"] = options
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def resolved_backend(model, **args):
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(model_path=str(model), device="cpu", **args)
    server_args.resolve_once()
    return server_args.attention_backend


PARTITIONED = {"shards": 2, "softmax": "partitioned", "layout": "sharded_latent", "logit_scale": 1.0}


def test_declared_sharded_latent_gets_mla_plugin_gla(plugins, tmp_path):
    model = checkpoint(tmp_path, PARTITIONED, "MLAPluginDeepseekV2ForCausalLM")
    assert resolved_backend(model) == "mla_plugin_gla"
    assert resolved_backend(model, attention_backend="mla_plugin_gla") == "mla_plugin_gla"


def test_options_given_at_load_time_pick_it_too(plugins, tmp_path):
    model = checkpoint(tmp_path, None)
    overrides = json.dumps({"mla_plugin": {"shards": 2, "softmax": "partitioned"}})
    assert resolved_backend(model, json_model_override_args=overrides) == "mla_plugin_gla"


def test_ordinary_checkpoint_keeps_sglang_default(plugins, tmp_path):
    assert resolved_backend(checkpoint(tmp_path, None)) not in ("mla_plugin_gla", "mla_plugin")


def test_another_backend_for_a_declared_sharded_latent_is_refused(plugins, tmp_path):
    from mla_plugin.sglang.gla_converted import WrongBackendError

    model = checkpoint(tmp_path, PARTITIONED, "MLAPluginDeepseekV2ForCausalLM")
    with pytest.raises(WrongBackendError, match="--attention-backend mla_plugin_gla"):
        resolved_backend(model, attention_backend="mla_plugin")


def test_converted_architecture_is_a_deepseek_v2_mla_model(plugins, tmp_path):
    from sglang.srt.configs.model_config import AttentionArch, ModelConfig
    from sglang.srt.models.deepseek_v2 import DeepseekV2ForCausalLM
    from sglang.srt.models.registry import ModelRegistry

    model = checkpoint(tmp_path, PARTITIONED, "MLAPluginDeepseekV2ForCausalLM")
    config = ModelConfig(str(model))
    assert config.attention_arch == AttentionArch.MLA and config.kv_lora_rank == 512
    assert config.hf_config.architectures == ["MLAPluginDeepseekV2ForCausalLM"]  # restored after the shapes
    cls, _ = ModelRegistry.resolve_model_cls(["MLAPluginDeepseekV2ForCausalLM"])
    assert issubclass(cls, DeepseekV2ForCausalLM)


def test_deepseek_attention_is_ours_only_under_mla_plugin_gla(plugins, monkeypatch):
    import sglang.srt.models.deepseek_v2 as deepseek
    from torch import nn

    from mla_plugin.sglang import gla_attention, gla_registration

    cls = deepseek.DeepseekV2AttentionMLA
    original = cls.mla_plugin_original
    assert original in cls.__mro__  # a subclass of SGLang's class: isinstance checks still hold
    built = []

    def record(name):
        def init(self, *args, **kwargs):
            nn.Module.__init__(self)
            built.append((name, kwargs["layer_id"]))
        return init

    monkeypatch.setattr(original, "__init__", record("sglang"))
    monkeypatch.setattr(gla_attention.ShardedLatentDeepseekAttention, "__init__", record("ours"))
    for requested, expected_type in ((False, cls), (True, gla_attention.ShardedLatentDeepseekAttention)):
        monkeypatch.setattr(gla_registration, "sharded_latent_requested", lambda r=requested: r)
        layer = cls(config=None, layer_id=int(requested))
        assert type(layer) is expected_type
    assert built == [("sglang", 0), ("ours", 1)]  # each constructor ran once


def test_deepseek_configs_from_transformers_5_get_the_fields_sglang_reads(plugins):
    """Configs saved by transformers 5 lack SGLang's MoE fields: where the plugin serves the model
    (here: a converted checkpoint's architecture), DeepSeek's own values are filled on that config (a
    checkpoint's own value wins), and V2's ungrouped "greedy" routing with n_group null gets one group
    (the same routing); grouped configs and other models are left alone. Where the plugin does not
    serve the model nothing is filled: checks_registration_scope.py."""
    from types import SimpleNamespace

    from transformers import DeepseekV2Config, DeepseekV3Config

    from mla_plugin.checkpoint_format import CONVERTED_ARCHITECTURE
    from mla_plugin.sglang.registration import fill_deepseek_fields

    def served(config):
        config.architectures = [CONVERTED_ARCHITECTURE]
        fill_deepseek_fields(SimpleNamespace(hf_config=config))
        return config

    v2 = served(DeepseekV2Config(topk_method="greedy", n_group=None, topk_group=None))
    assert (v2.scoring_func, v2.moe_layer_freq, v2.n_group, v2.topk_group) == ("softmax", 1, 1, 1)
    v3 = served(DeepseekV3Config())
    assert (v3.scoring_func, v3.topk_method, v3.moe_layer_freq) == ("sigmoid", "noaux_tc", 1)
    assert served(DeepseekV3Config(scoring_func="softmax")).scoring_func == "softmax"
    grouped = served(DeepseekV2Config(topk_method="group_limited_greedy", n_group=8, topk_group=3))
    assert (grouped.n_group, grouped.topk_group) == (8, 3)
    llama = served(SimpleNamespace(model_type="llama", topk_method="greedy", n_group=None, topk_group=None))
    assert (llama.n_group, llama.topk_group) == (None, None)
