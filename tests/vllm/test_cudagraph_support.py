"""What our metadata builders tell vLLM about CUDA graphs (no engine needed)."""

from types import SimpleNamespace

import pytest
import torch

from mla_plugin.ops.kernel_choice import KernelChoiceError
from mla_plugin.vllm import mla_backend
from mla_plugin.vllm.compat import AttentionCGSupport
from mla_plugin.vllm.gla_backend import ShardedLatentMetadataBuilder
from mla_plugin.vllm.mla_backend import MLAPluginMetadataBuilder

CONFIG = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16))
BUILDERS = [MLAPluginMetadataBuilder, ShardedLatentMetadataBuilder]


@pytest.fixture
def on_cuda(monkeypatch):
    monkeypatch.setattr(type(mla_backend.current_platform), "is_cuda_alike", lambda self: True)


@pytest.mark.parametrize("builder", BUILDERS)
def test_cpu_never_captures(builder, monkeypatch):
    monkeypatch.setenv("MLA_PLUGIN_KERNEL", "triton")
    assert not mla_backend.current_platform.is_cuda_alike()
    assert builder.get_cudagraph_support(CONFIG, None) == AttentionCGSupport.NEVER


@pytest.mark.parametrize("builder", BUILDERS)
def test_cuda_captures_single_token_decode_with_triton_only(builder, on_cuda, monkeypatch):
    monkeypatch.delenv("MLA_PLUGIN_KERNEL", raising=False)
    assert builder.get_cudagraph_support(CONFIG, None) == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    monkeypatch.setenv("MLA_PLUGIN_KERNEL", "torch")  # the torch code loops with a host bound
    assert builder.get_cudagraph_support(CONFIG, None) == AttentionCGSupport.NEVER
    monkeypatch.setenv("MLA_PLUGIN_KERNEL", "tritn")  # a typo fails at start-up, not later
    with pytest.raises(KernelChoiceError, match="not one of torch, triton"):
        builder.get_cudagraph_support(CONFIG, None)
