"""Helpers around vLLM's offline engine."""

import gc


def release_engine() -> None:
    """Free what an in-process LLM left behind, so another can start in this process."""
    gc.collect()
    try:
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # nothing was initialised, or vLLM already tore it down
        pass
