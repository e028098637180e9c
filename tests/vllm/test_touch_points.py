"""Each vLLM touch point against the installed vLLM: it is there and has the expected
shape, and if vLLM removed it the plugin would stop with one clear message. Also the two
touch points that once failed silently: the checkpoint-format swap and the impl's MLA
arguments."""

import importlib
import inspect

import pytest
from torch import nn

from mla_plugin.vllm import compat, touch_points
from mla_plugin.vllm.touch_points import TOUCH_POINTS, VLLMTouchPointError, problems, resolve

POINTS = {point.name: point for point in TOUCH_POINTS}


def _no_attribute(name):
    raise AttributeError(name)


def _remove(monkeypatch, internal: str) -> None:
    """Make ``internal`` disappear from vLLM for this test, as a rename would."""
    module_name, _, qualname = internal.partition(":")
    parent, _, last = qualname.rpartition(".")
    holder = importlib.import_module(module_name)
    for part in filter(None, parent.split(".")):
        holder = getattr(holder, part)
    if inspect.isclass(holder):
        for owner in [k for k in holder.__mro__ if last in vars(k)]:  # inherited definitions too
            monkeypatch.delattr(owner, last)
    elif last in vars(holder):
        monkeypatch.delattr(holder, last)
    else:  # a module attribute vLLM resolves lazily (module __getattr__)
        monkeypatch.setattr(holder, "__getattr__", _no_attribute, raising=False)


@pytest.mark.parametrize("name", POINTS)
def test_touch_point_is_there_in_this_vllm(name):
    assert problems(POINTS[name]) == [], f"vLLM {compat.vllm_version()} moved {POINTS[name].internal}"


@pytest.mark.parametrize("name", POINTS)
def test_touch_point_gone_is_one_clear_error(name, monkeypatch):
    point = POINTS[name]
    _remove(monkeypatch, point.internal)
    with pytest.raises(VLLMTouchPointError) as err:
        touch_points.verify(point.stage)
    message = str(err.value)
    assert message.startswith(f"mla_plugin cannot run on vLLM {compat.vllm_version()}:"), message
    assert f"  - {point.name} ({point.internal}, " in message, message


def test_checks_see_through_the_plugins_own_patches():
    """After registration and the DeepSeek-V2 swap, vLLM's originals are what is checked."""
    from mla_plugin.vllm.registration import register

    register()
    deepseek_v2 = importlib.import_module(compat.DEEPSEEK_V2_MODULE)
    assert getattr(deepseek_v2.DeepseekV2MLAAttention, touch_points.ORIGINAL, None) is not None
    assert {name: problems(point) for name, point in POINTS.items() if problems(point)} == {}


def test_moved_touch_point_refuses_our_backends_in_one_line(monkeypatch):
    """What a request for our backends gets in such a vLLM (registration itself never raises:
    test_installed_harmless.py runs it in a fresh process)."""
    _remove(monkeypatch, POINTS["register_backend"].internal)
    assert [p.name for p in touch_points.moved(touch_points.REGISTRATION)] == ["register_backend"]
    with pytest.raises(touch_points.IncompatibleVLLMError) as err:
        touch_points.require_compatible(touch_points.REGISTRATION)
    message = str(err.value)
    assert "\n" not in message and "(register_backend)" in message, message
    assert f"tested with vLLM {' and '.join(touch_points.SUPPORTED_VLLM)}" in message, message


def test_reshaped_impl_signature_is_caught(monkeypatch):
    from mla_plugin.vllm.compat import MLACommonImpl

    def renamed(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                logits_soft_cap, attn_type, kv_sharing_target_layer_name, latent_rank, qk_nope_head_dim,
                qk_rope_head_dim, v_head_dim, kv_b_proj):
        pass

    monkeypatch.setattr(MLACommonImpl, "__init__", renamed)
    assert "kv_lora_rank" in problems(POINTS["MLA impl"])[0]


def test_compat_names_are_all_listed():
    """compat.py imports nothing that the touch-point list does not name."""
    listed = {id(resolve(point.internal)) for point in TOUCH_POINTS}
    not_vllm = {"DEEPSEEK_V2_MODULE", "SUPPORTED_VLLM", "vllm_version", "vllm_version_supported",
                "yarn_get_mscale"}
    unlisted = [name for name in compat.__all__ if name not in not_vllm and id(getattr(compat, name)) not in listed]
    assert not unlisted, f"add touch points for {unlisted} in mla_plugin/vllm/touch_points.py"
    assert compat.yarn_get_mscale(2.0, 1.0) == resolve(POINTS["yarn mscale"].internal)(2.0, 1.0)


# -- the impl forwards every MLA argument, or fails loudly ---------------------------


def test_impl_forwards_every_argument_vllm_passes():
    from mla_plugin.vllm.mla_backend import check_mla_args

    parameters = inspect.signature(compat.MLACommonImpl.__init__).parameters
    mla_args = {name: None for name in list(parameters)[11:]}  # everything after the ten by position
    assert {"kv_lora_rank", "kv_b_proj", "indexer"} <= set(mla_args)
    check_mla_args(mla_args, "MLA_PLUGIN")


def test_impl_refuses_an_argument_it_would_drop():
    from mla_plugin.vllm.mla_backend import check_mla_args

    with pytest.raises(TypeError, match=rf"vLLM {compat.vllm_version()}'s MLA layer passes \['new_mla_arg'\]"):
        check_mla_args({"kv_lora_rank": 512, "new_mla_arg": 1}, "MLA_PLUGIN")


# -- the checkpoint-format swap never skips a holder ---------------------------------


class _Config:
    q_lora_rank = None
    qk_rope_head_dim = 8
    rope_parameters = {"rope_type": "default"}
    mla_plugin = {"latent_norm": False}


def _layer(*, wrapper: bool = True, wrapper_norm: bool = True) -> nn.Module:
    layer = nn.Module()
    layer.kv_a_layernorm = nn.LayerNorm(4)
    if wrapper:
        layer.mla_attn = nn.Module()
        if wrapper_norm:
            layer.mla_attn.kv_a_layernorm = layer.kv_a_layernorm
    return layer


def test_format_swap_reaches_the_layer_and_its_wrapper():
    from mla_plugin.vllm.checkpoint_format_hook import apply_checkpoint_format

    layer = apply_checkpoint_format(_layer(), _Config(), "model.layers.0.self_attn")
    assert isinstance(layer.kv_a_layernorm, nn.Identity)
    assert layer.mla_attn.kv_a_layernorm is layer.kv_a_layernorm


@pytest.mark.parametrize("wrapper,wrapper_norm,missing", [
    (False, False, "has no 'mla_attn' wrapper"),
    (True, False, "Module.mla_attn has no 'kv_a_layernorm' to replace"),
])
def test_format_swap_fails_loudly_when_vllm_moved_a_module(wrapper, wrapper_norm, missing):
    """Before: a holder without the attribute was skipped, so a converted GQA checkpoint
    would have run with a latent norm it never had."""
    from mla_plugin.vllm.checkpoint_format_hook import apply_checkpoint_format

    layer = _layer(wrapper=wrapper, wrapper_norm=wrapper_norm)
    with pytest.raises(VLLMTouchPointError, match=missing) as err:
        apply_checkpoint_format(layer, _Config(), "model.layers.0.self_attn")
    assert f"vLLM {compat.vllm_version()}" in str(err.value)
    assert isinstance(layer.kv_a_layernorm, nn.LayerNorm)  # nothing half-swapped


def test_cpu_rope_fix_wraps_the_listed_kernel():
    from mla_plugin.vllm import cpu_rope_fix

    cpu_rope_fix.install()
    kernel = resolve(POINTS["CPU rotary kernel"].internal)
    assert getattr(kernel, "_mla_plugin_fix", False)
