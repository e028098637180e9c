"""Exact CPU settings for SGLang's offline engine (tests, the perplexity tool, examples).

SGLang's CPU engine also needs ``SGLANG_USE_CPU_ENGINE=1`` in the environment before Python
starts (SGLang reads it at import; mla_plugin's CPU stand-ins too).
"""

EXACT_CPU_ENGINE = dict(
    device="cpu", dtype="float32", disable_cuda_graph=True, random_seed=0, skip_server_warmup=True,
    log_level="error",
)


def exact_cpu_engine(**overrides) -> dict:
    """``sglang.Engine`` keyword arguments: fp32, eager (no CUDA/CPU graphs), seeded, quiet."""
    return {**EXACT_CPU_ENGINE, **overrides}
