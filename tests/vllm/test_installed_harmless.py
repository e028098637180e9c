"""Installing mla_plugin breaks nothing (issue 22 item 1).

- Every module under vLLM's model packages imports with the plugin registered exactly as
  without it (before: GLM-4.7-Flash's module failed, ``class X(function)``).
- vLLM's DeepseekV2MLAAttention stays a class its models extend, routed to the sharded latent
  only for mla_plugin_gla and the exact class.
- A vLLM whose internals moved (simulated): registration warns once and raises nothing, a plain
  model is served as without the plugin, and only requests for our backends (or a declared
  layout) fail, in one line naming the versions tested.
"""

import json
import os
import subprocess
import sys

import pytest

from mla_plugin.vllm import touch_points
from tests.vllm.engines import REPO, assert_matches_transformers

MODELS_MODULE = "vllm.model_executor.models"
GLM_MODULES = ("glm4_moe_lite", "glm4_moe_lite_mtp", "glm_ocr_mtp")  # the three that failed before


def _import_all(tmp_path, mode: str) -> dict:
    out = tmp_path / f"imports_{mode}.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-m", "tests.vllm.import_all_models", mode, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def imports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imports")
    return {mode: _import_all(tmp, mode) for mode in ("with", "without")}


def test_every_model_module_imports_with_the_plugin_as_without(imports):
    with_plugin, without = imports["with"], imports["without"]
    assert "mla_plugin" in with_plugin["plugins"] and with_plugin["hooked"], "the plugin and its hook were not active"
    assert not without["hooked"]
    assert set(with_plugin["errors"]) == set(without["errors"])
    only_with_plugin = {name: error for name, error in with_plugin["errors"].items()
                        if error is not None and without["errors"][name] is None}
    assert only_with_plugin == {}
    for name in GLM_MODULES:
        assert with_plugin["errors"][f"{MODELS_MODULE}.{name}"] is None
    imported = sum(error is None for error in with_plugin["errors"].values())
    print(f"\nvLLM model modules: {len(with_plugin['errors'])} found, {imported} imported with mla_plugin registered "
          f"(the others fail alike without it: missing optional packages or CUDA)")
    assert imported > 400


@pytest.fixture(scope="module")
def deepseek_classes():
    import importlib

    from mla_plugin.vllm.registration import register

    register()
    deepseek_v2 = importlib.import_module(f"{MODELS_MODULE}.deepseek_v2")
    glm = importlib.import_module(f"{MODELS_MODULE}.glm4_moe_lite")
    return deepseek_v2.DeepseekV2MLAAttention, glm.Glm4MoeLiteMLAAttention


def test_deepseek_attention_stays_a_class_its_models_extend(deepseek_classes):
    from mla_plugin.vllm import deepseek_hook

    routing, glm_attention = deepseek_classes
    original = vars(routing)[touch_points.ORIGINAL]
    assert isinstance(routing, type) and issubclass(routing, original) and routing is not original
    assert issubclass(glm_attention, routing) and issubclass(glm_attention, original)
    assert routing.__qualname__ == original.__qualname__ == "DeepseekV2MLAAttention"
    module = sys.modules[f"{MODELS_MODULE}.deepseek_v2"]
    deepseek_hook.patch_deepseek_v2(module)  # idempotent
    assert module.DeepseekV2MLAAttention is routing


@pytest.fixture
def gla_requested():
    from vllm.config import AttentionConfig, VllmConfig, set_current_vllm_config

    from mla_plugin import GLA_BACKEND_NAME
    from mla_plugin.vllm.registration import backend_member

    config = VllmConfig(attention_config=AttentionConfig(backend=backend_member(GLA_BACKEND_NAME)))
    with set_current_vllm_config(config):
        yield


def test_a_subclass_is_refused_under_the_sharded_latent_in_one_line(deepseek_classes, gla_requested):
    from mla_plugin.vllm.deepseek_hook import NotShardableAttentionError, sharded_layout_requested

    _, glm_attention = deepseek_classes
    assert sharded_layout_requested()
    with pytest.raises(NotShardableAttentionError) as err:
        glm_attention(None, None)
    message = str(err.value)
    assert "\n" not in message and "Glm4MoeLiteMLAAttention" in message and "mla_plugin" in message


# -- a vLLM whose internals moved ----------------------------------------------------

GLA_DECLARED = {"mla_plugin": dict(shards=2, softmax="grouped", rmsnorm="local", basis="identity")}


def _moved_runs(tmp_path, point: str, runs: list[dict]) -> dict:
    out = tmp_path / "moved.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, "-m", "tests.vllm.moved_touch_point", point, json.dumps(runs), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return {**json.loads(out.read_text()), "log": log}


def _assert_refused_in_one_line(run: dict, moved_name: str) -> None:
    assert run.get("error") == "IncompatibleVLLMError", run
    message = run["message"]
    assert "\n" not in message, message
    tested = " and ".join(touch_points.SUPPORTED_VLLM)
    assert message.startswith(f"mla_plugin is tested with vLLM {tested};") and moved_name in message, message


def test_moved_registration_touch_point_refuses_only_our_backends(tmp_path, tiny_llama, tiny_ds_576):
    point = "MLA metadata builder"
    out = _moved_runs(tmp_path, point, [
        dict(model=tiny_llama, max_tokens=8),
        dict(model=tiny_ds_576, backend="mla_plugin", max_tokens=4),
        dict(model=tiny_ds_576, backend="mla_plugin_gla", max_tokens=4),
        dict(model=tiny_ds_576, hf_overrides=GLA_DECLARED, max_tokens=4),  # a layout only the plugin serves
    ])
    plain, *ours = out["runs"]
    assert "result" in plain, plain
    assert_matches_transformers(plain["result"], tiny_llama, atol=1e-4)
    for run in ours:
        _assert_refused_in_one_line(run, point)
    assert out["log"].count("mla_plugin is tested with vLLM") == 1, out["log"][-3000:]  # one warning, once
    assert not out["deepseek_hooked"]


def test_moved_deepseek_touch_point_leaves_deepseek_models_to_vllm(tmp_path, tiny_ds_576):
    point = "yarn mscale"
    out = _moved_runs(tmp_path, point, [
        dict(model=tiny_ds_576, backend="CPU_MLA", max_tokens=8),  # vLLM's own MLA backend, named
        dict(model=tiny_ds_576, backend="mla_plugin", max_tokens=4),
    ])
    plain, ours = out["runs"]
    assert "result" in plain, plain
    assert_matches_transformers(plain["result"], tiny_ds_576, atol=1e-4)
    _assert_refused_in_one_line(ours, point)
    assert not out["deepseek_hooked"], "the DeepSeek-V2 class was replaced although its touch points moved"

