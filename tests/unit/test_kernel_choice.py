"""MLA_PLUGIN_KERNEL: which implementation of the attention seam runs, and its errors."""

import pytest
import torch

from mla_plugin.ops.kernel_choice import KERNEL_CALLS, KernelChoiceError, kernel_for
from mla_plugin.ops.paged_attention import paged_latent_attention

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def tiny_call(dtype=torch.float32, **kwargs):
    cache = torch.randn(2, 4, 8 + 4, dtype=dtype)
    return paged_latent_attention(torch.randn(1, 2, 8, dtype=dtype), torch.randn(1, 2, 4, dtype=dtype), cache,
                                  torch.tensor([0, 1]), torch.tensor([3]), torch.tensor([[1, 0]]), 0.5, **kwargs)


def test_default_is_torch_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("MLA_PLUGIN_KERNEL", raising=False)
    assert kernel_for(CPU, torch.bfloat16) == "torch"
    assert kernel_for(CUDA, torch.bfloat16) == "triton"  # triton is installed here
    assert kernel_for(CUDA, torch.float64) == "torch"  # the kernels compute in float32
    monkeypatch.setenv("MLA_PLUGIN_KERNEL", "torch")
    assert kernel_for(CUDA, torch.bfloat16) == "torch"


def test_the_seam_counts_the_kernel_it_ran(monkeypatch):
    monkeypatch.delenv("MLA_PLUGIN_KERNEL", raising=False)
    before = dict(KERNEL_CALLS)
    tiny_call()
    assert KERNEL_CALLS["torch"] == before.get("torch", 0) + 1
    assert KERNEL_CALLS["triton"] == before.get("triton", 0)


@pytest.mark.parametrize("value", ["cuda", "Triton2", "flashmla"])
def test_unknown_value_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv("MLA_PLUGIN_KERNEL", value)
    with pytest.raises(KernelChoiceError, match=r"MLA_PLUGIN_KERNEL=.* is not one of torch, triton; unset it"):
        tiny_call()


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("MLA_PLUGIN_KERNEL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelChoiceError, match="TRITON_INTERPRET=1"):
        tiny_call()


def test_triton_refuses_float64(monkeypatch):
    monkeypatch.delenv("MLA_PLUGIN_KERNEL", raising=False)
    with pytest.raises(KernelChoiceError, match="not float64"):
        tiny_call(torch.float64, kernel="triton")
    with pytest.raises(KernelChoiceError, match="kernel='cutlass' is not one of"):
        tiny_call(kernel="cutlass")
