"""The vLLM engine of the perplexity tool: one engine, both scoring modes.

prefill: each window is a prompt; its prompt logprobs (the model's prefill) are scored.
decode: the window's first token is the prompt and the rest is generated greedily,
``max_tokens = window - 1``, every step forced onto the reference token by the logits
processor ``mla_plugin.vllm.reference_tokens.ForceReferenceTokens``; the scored logprob
is the raw one (``logprobs_mode="raw_logprobs"``, before the processor), so every scored
token goes through the attention backend's decode path. A one-token prompt is itself a
decode step for vLLM's MLA (query length 1), so even the first scored token is.
"""

from mla_plugin.errors import MLAPluginInputError

# Loaded by name in each engine process (and each TP worker); see reference_tokens.py.
REFERENCE_TOKENS_PROCESSOR = "mla_plugin.vllm.reference_tokens:ForceReferenceTokens"
RAW_LOGPROBS = "raw_logprobs"


class ForcedDecodeDivergedError(RuntimeError):
    """vLLM generated something other than the reference tokens: the logprobs would not be the text's."""


class VLLMScorer:
    def __init__(self, model_path: str, *, window: int, dtype: str, attention_backend=None,
                 tensor_parallel_size: int = 1, hf_overrides=None, batch: int = 8, **engine_kwargs) -> None:
        from vllm import LLM

        mode = engine_kwargs.pop("logprobs_mode", RAW_LOGPROBS)
        if mode != RAW_LOGPROBS:
            raise MLAPluginInputError(f"logprobs_mode must be {RAW_LOGPROBS!r} for perplexity (the logprob of the "
                                      f"reference token before any logits processor), got {mode!r}")
        processors = list(engine_kwargs.pop("logits_processors", None) or []) + [REFERENCE_TOKENS_PROCESSOR]
        self.window = window
        self.batch = batch
        self.llm = LLM(
            model_path, dtype=dtype, attention_backend=attention_backend,
            tensor_parallel_size=tensor_parallel_size, hf_overrides=hf_overrides,
            max_model_len=window + 1, max_num_seqs=batch, seed=0,
            logits_processors=processors, logprobs_mode=RAW_LOGPROBS, **engine_kwargs,
        )

    def window_nlls(self, windows: list[list[int]], score: str, progress) -> list[float]:
        nlls = []
        for start in range(0, len(windows), self.batch):
            chunk = windows[start : start + self.batch]
            nlls += self._prefill(chunk) if score == "prefill" else self._decode(chunk)
            progress.update(len(chunk))
        return nlls

    def _prefill(self, chunk) -> list[float]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": w} for w in chunk], params, use_tqdm=False)
        nlls = []
        for out, w in zip(outs, chunk, strict=True):
            scored = [out.prompt_logprobs[t][w[t]].logprob for t in range(1, len(w))]
            nlls.append(-sum(scored) / len(scored))
        return nlls

    def _decode(self, chunk) -> list[float]:
        from vllm import SamplingParams

        from mla_plugin.vllm.reference_tokens import REFERENCE_TOKENS_KEY  # the plugin is loaded by now

        params = [SamplingParams(max_tokens=len(w) - 1, temperature=0, logprobs=0, detokenize=False,
                                 ignore_eos=True, extra_args={REFERENCE_TOKENS_KEY: list(w[1:])})
                  for w in chunk]
        outs = self.llm.generate([{"prompt_token_ids": w[:1]} for w in chunk], params, use_tqdm=False)
        nlls = []
        for out, w in zip(outs, chunk, strict=True):
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            if tokens != list(w[1:]):
                first = next((i for i, (a, b) in enumerate(zip(tokens, w[1:])) if a != b), min(len(tokens), len(w) - 1))
                raise ForcedDecodeDivergedError(
                    f"decode scoring generated {len(tokens)} tokens that leave the reference at step {first} "
                    f"(expected {len(w) - 1}); the reference-token logits processor did not take effect")
            scored = [step[tok].logprob for step, tok in zip(completion.logprobs, tokens, strict=True)]
            nlls.append(-sum(scored) / len(scored))
        return nlls

    def close(self) -> None:
        from mla_plugin.vllm.engine import release_engine

        self.llm = None
        release_engine()
