"""fp8 latent cache on a GPU below compute capability 8.9 (A100, e4m3 not supported): refused at
start-up in one line, by the check that registration.validate_request (vLLM's config
validation) and our impls' __init__ run (no engine needed; the capability query of vLLM's
platform is replaced)."""

import pytest

from mla_plugin import GLA_BACKEND_NAME, MLA_BACKEND_NAME
from mla_plugin.vllm import mla_backend


@pytest.fixture
def cuda_gpu(monkeypatch):
    """vLLM's platform answers as a CUDA GPU of the capability the test sets."""
    from vllm.platforms.interface import DeviceCapability

    platform = type(mla_backend.current_platform)
    monkeypatch.setattr(platform, "is_cuda", lambda self: True)

    def set_capability(major, minor):
        monkeypatch.setattr(platform, "get_device_capability",
                            classmethod(lambda cls, device_id=0: DeviceCapability(major, minor)))

    return set_capability


@pytest.mark.parametrize("backend", [MLA_BACKEND_NAME, GLA_BACKEND_NAME])
@pytest.mark.parametrize("dtype", ["fp8", "fp8_e4m3"])
def test_fp8_refused_below_8_9_in_one_line(cuda_gpu, backend, dtype):
    cuda_gpu(8, 0)  # A100
    assert mla_backend.cuda_capability() == (8, 0)
    with pytest.raises(ValueError) as error:
        mla_backend.check_kv_cache_dtype(dtype, backend)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"--attention-backend {backend.lower()} --kv-cache-dtype {dtype}: ")
    assert "compute capability 8.9 or newer" in message and "this GPU is 8.0" in message
    assert "Leave out --kv-cache-dtype" in message


def test_fp8_accepted_from_8_9_and_unquantised_everywhere(cuda_gpu):
    cuda_gpu(8, 0)
    for dtype in ("auto", "bfloat16", "float16"):
        mla_backend.check_kv_cache_dtype(dtype, MLA_BACKEND_NAME)
    for major, minor in ((8, 9), (9, 0), (10, 0)):
        cuda_gpu(major, minor)
        mla_backend.check_kv_cache_dtype("fp8", MLA_BACKEND_NAME)


def test_fp8_on_cpu_is_not_a_gpu_question():
    assert not mla_backend.current_platform.is_cuda()
    assert mla_backend.cuda_capability() is None
    mla_backend.check_kv_cache_dtype("fp8", MLA_BACKEND_NAME)
