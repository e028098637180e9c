"""A vLLM v1 logits processor that makes each generated token the reference text's next token.

Decode-mode perplexity (``mla-plugin ppl --score decode``) sends a window's first token
as the prompt and generates the rest greedily. For a request whose
``SamplingParams.extra_args`` carry ``{REFERENCE_TOKENS_KEY: [t_1, ..., t_n]}``, this
processor sets every logit of step k to -inf except that of t_k (to 0), so greedy sampling
picks t_k and the next step attends to the reference text, while the logprob vLLM
reports is the *raw* one, computed before any logits processor runs (vLLM's default
``logprobs_mode="raw_logprobs"``): log p(t_k | t_0 .. t_{k-1}) from the decode path.
Requests without the key are left alone.

Pass it to vLLM by name, so spawned engine and TP worker processes import it themselves:
``LLM(..., logits_processors=[PROCESSOR_FQCN])``.
"""

import importlib
import os

import torch

from mla_plugin.vllm.compat import BatchUpdate, LogitsProcessor, MoveDirectionality

REFERENCE_TOKENS_KEY = "mla_plugin_reference_tokens"
PROCESSOR_FQCN = "mla_plugin.vllm.reference_tokens:ForceReferenceTokens"

# Test-only: "module:function" called once in each process that builds this processor
# (the vLLM model runner, so every TP worker), before the model first runs. The tests use
# it to instrument the decode from outside (count its rows, break it on purpose) in
# engine processes they cannot reach otherwise.
SCORING_HOOK_ENV = "MLA_PLUGIN_SCORING_HOOK"
_hook_ran_in_pid: int | None = None


def _run_scoring_hook() -> None:
    global _hook_ran_in_pid
    spec = os.environ.get(SCORING_HOOK_ENV)
    if not spec or _hook_ran_in_pid == os.getpid():
        return
    _hook_ran_in_pid = os.getpid()
    module, _, function = spec.partition(":")
    getattr(importlib.import_module(module), function)()


def reference_tokens_of(params) -> list[int] | None:
    """The reference tokens a request carries, or None."""
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(REFERENCE_TOKENS_KEY)


class ForceReferenceTokens(LogitsProcessor):
    """Greedy decoding that follows the reference tokens (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        tokens = reference_tokens_of(sampling_params)
        if tokens is None:
            return
        if not isinstance(tokens, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
            raise ValueError(f"extra_args[{REFERENCE_TOKENS_KEY!r}] must be a list of token ids")
        if sampling_params.max_tokens is not None and sampling_params.max_tokens > len(tokens):
            raise ValueError(f"max_tokens {sampling_params.max_tokens} exceeds the {len(tokens)} reference tokens")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        _run_scoring_hook()
        # persistent-batch row -> (reference tokens, the request's live list of output tokens)
        self.rows: dict[int, tuple[list[int], list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the greedy choice

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        # vLLM's order: removed, then added, then moved.
        for row in batch_update.removed:
            self.rows.pop(row, None)
        for row, params, _prompt_ids, output_ids in batch_update.added:
            tokens = reference_tokens_of(params)
            if tokens is None:
                self.rows.pop(row, None)  # a new request may reuse a row
            else:
                self.rows[row] = (list(tokens), output_ids)
        for a, b, direction in batch_update.moved:
            state_a, state_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if state_a is not None:
                self.rows[b] = state_a
            if direction == MoveDirectionality.SWAP and state_b is not None:
                self.rows[a] = state_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows, targets = [], []
        for row, (tokens, output_ids) in self.rows.items():
            step = len(output_ids)  # tokens generated so far (async placeholders included)
            if step < len(tokens):
                rows.append(row)
                targets.append(tokens[step])
        if rows:
            rows_t = torch.tensor(rows, device=logits.device)
            targets_t = torch.tensor(targets, device=logits.device)
            logits[rows_t] = float("-inf")  # [n_forced, V]
            logits[rows_t, targets_t] = 0.0
        return logits
