"""One engine with prefix caching and chunked prefill both on, set explicitly (vLLM decides both by
CPU features otherwise), and three requests that read cached latent context back:

1. ``chunked``: a prompt of LONG tokens, more than the token budget of a step (BUDGET), so it is
   prefilled over several steps, each later step reading the earlier steps' cache rows;
2. ``hit``: a prompt that shares its first SHARED tokens (several whole blocks) with the first
   one, so the scheduler serves them from the prefix cache (counted by vLLM's
   ``vllm:prefix_cache_hits``);
3. ``no_hit``: the same prompt with ``skip_reading_prefix_cache``, the caching-off reference
   computed by the same engine.

Subprocess use (TP=2, spawn):  python -m tests.vllm.cached_context '<json list of kwargs>' OUT.json
"""

import os

from mla_plugin.vllm.engine import exact_cpu_engine, release_engine
from tests.vllm.engines import run_from_command_line

BLOCK = 16
BUDGET = 32  # max_num_batched_tokens: tokens per scheduler step
LONG = 100  # tokens of the chunked prompt: four steps at BUDGET
SHARED = 4 * BLOCK  # tokens the second prompt shares with the first: four whole blocks
DECODE = 16


def prompt_ids(vocab: int, seed: int, length: int) -> list[int]:
    """Deterministic token ids in [10, vocab) (the fixtures' special tokens sit below 10)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (length,), generator=generator).tolist()


def _prefix_cache_hits(llm) -> int:
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits"))


def _one(llm, ids, max_tokens, **params) -> dict:
    from vllm import SamplingParams, TokensPrompt

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True, **params)
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sampling, use_tqdm=False)[0]
    completion = out.outputs[0]
    result = {"prompt_ids": list(out.prompt_token_ids), "tokens": list(completion.token_ids),
              "token_logprobs": [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)]}
    if out.prompt_logprobs is not None:
        ids = result["prompt_ids"]
        result["prompt_logprobs"] = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    return result


def run_cached_context(model: str, backend: str | None = None, trace_file: str | None = None,
                       **engine_overrides) -> dict:
    """The three requests above on one engine, with the settings the engine really ran with."""
    from vllm import LLM

    if trace_file is not None:  # inherited by the processes this engine spawns
        os.environ["MLA_PLUGIN_TRACE_FILE"] = str(trace_file)
    settings = dict(dtype="float32", max_model_len=256, max_num_seqs=4, seed=0, block_size=BLOCK,
                    enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=BUDGET,
                    disable_log_stats=False)
    llm = LLM(model, attention_backend=backend, **exact_cpu_engine(**{**settings, **engine_overrides}))
    try:
        vocab = llm.llm_engine.model_config.get_vocab_size()
        long_ids = prompt_ids(vocab, 1, LONG)
        shared_ids = long_ids[:SHARED] + prompt_ids(vocab, 2, 40)
        result = {"chunked": _one(llm, long_ids, 8, prompt_logprobs=0)}
        hits_before = _prefix_cache_hits(llm)
        result["hit"] = _one(llm, shared_ids, DECODE, skip_reading_prefix_cache=False)
        result["hit_tokens"] = _prefix_cache_hits(llm) - hits_before
        result["no_hit"] = _one(llm, shared_ids, DECODE, skip_reading_prefix_cache=True)
        result["no_hit_tokens"] = _prefix_cache_hits(llm) - hits_before - result["hit_tokens"]
        config = llm.llm_engine.vllm_config
        result["in_effect"] = {"prefix_caching": bool(config.cache_config.enable_prefix_caching),
                               "chunked_prefill": bool(config.scheduler_config.enable_chunked_prefill),
                               "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
                               "block_size": config.cache_config.block_size}
        return result
    finally:
        del llm
        release_engine()


if __name__ == "__main__":
    run_from_command_line(run_cached_context)
