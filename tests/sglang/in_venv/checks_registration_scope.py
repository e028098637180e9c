"""Run inside .venv-sglang (tests/sglang/test_registration_scope.py starts it): the plugin's
registration changes nothing SGLang computes for a launch that is not ours. The DeepSeek config
fields transformers 5 does not save are filled on the config of a model the plugin serves (our
backend configured in the process, or one of our converted checkpoints), never on transformers'
classes nor on another launch's config, through the real hook on ModelConfig._derive_model_shapes."""

import json
import shutil

import pytest

from mla_plugin.fixtures import trained_fixture

pytest.importorskip("sglang", reason="run by tests/sglang/test_registration_scope.py inside .venv-sglang")

FIELDS = ("moe_layer_freq", "scoring_func", "n_group", "topk_group")


@pytest.fixture(scope="module")
def plugins():
    from sglang.srt.plugins import load_plugins

    load_plugins()


@pytest.fixture(scope="module")
def greedy_v2(tmp_path_factory):
    """The trained DeepSeek-V2 fixture saved as transformers 5 saves V2's ungrouped routing:
    topk_method "greedy", n_group / topk_group null, no moe_layer_freq / scoring_func."""
    dst = tmp_path_factory.mktemp("greedy_v2") / "model"
    shutil.copytree(trained_fixture("deepseek-v2-tiny"), dst)
    config = json.loads((dst / "config.json").read_text())
    for field in FIELDS:
        config.pop(field, None)
    config.update(topk_method="greedy", n_group=None, topk_group=None)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def model_config_under(model, backend: str, architecture: str | None = None):
    """SGLang's ModelConfig of ``model`` in a process whose published backend is ``backend``."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(model_path=str(model), device="cpu", attention_backend=backend)
    server_args.resolve_once()
    publish(server_args, role="tokenizer")
    return ModelConfig.from_server_args(server_args)


def test_transformers_config_classes_are_left_alone(plugins):
    from transformers import DeepseekV2Config, DeepseekV3Config

    from mla_plugin.sglang.registration import DEEPSEEK_CONFIG_DEFAULTS

    for cls in (DeepseekV2Config, DeepseekV3Config):
        patched = [f for f in DEEPSEEK_CONFIG_DEFAULTS[cls.__name__] if f in vars(cls)]
        assert patched == [], f"{cls.__name__} got class attributes {patched}"
        assert not hasattr(cls(), "moe_layer_freq")


def test_another_backend_gets_the_config_as_sglang_reads_it(plugins, greedy_v2):
    config = model_config_under(greedy_v2, "torch_native").hf_config
    assert (config.n_group, config.topk_group) == (None, None)
    assert not hasattr(config, "moe_layer_freq") and not hasattr(config, "scoring_func")


def test_our_backend_gets_the_fields_sglang_reads(plugins, greedy_v2):
    for backend in ("mla_plugin", "mla_plugin_gla"):
        config = model_config_under(greedy_v2, backend).hf_config
        assert (config.n_group, config.topk_group) == (1, 1), backend
        assert (config.moe_layer_freq, config.scoring_func) == (1, "softmax"), backend


def test_a_checkpoint_value_wins(plugins, greedy_v2, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(greedy_v2, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(topk_method="group_limited_greedy", n_group=2, topk_group=1, scoring_func="sigmoid")
    (dst / "config.json").write_text(json.dumps(config))
    hf_config = model_config_under(dst, "mla_plugin").hf_config
    assert (hf_config.n_group, hf_config.topk_group, hf_config.scoring_func) == (2, 1, "sigmoid")


def test_a_converted_checkpoint_gets_them_under_any_backend(plugins, greedy_v2):
    from types import SimpleNamespace

    from transformers import AutoConfig

    from mla_plugin.checkpoint_format import CONVERTED_ARCHITECTURE
    from mla_plugin.sglang.registration import fill_deepseek_fields

    model_config_under(greedy_v2, "torch_native")  # this process: another backend
    config = AutoConfig.from_pretrained(str(greedy_v2))
    config.architectures = [CONVERTED_ARCHITECTURE]
    fill_deepseek_fields(SimpleNamespace(hf_config=config))
    assert (config.n_group, config.moe_layer_freq) == (1, 1)

