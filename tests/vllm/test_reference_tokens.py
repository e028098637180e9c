"""The reference-token logits processor on its own (no engine): it follows vLLM's batch
updates (added, removed, moved and swapped rows), forces exactly the rows that carry
reference tokens onto their next token, and refuses malformed requests."""

import pytest
import torch
from vllm import SamplingParams

from mla_plugin.eval.scoring_vllm import REFERENCE_TOKENS_PROCESSOR
from mla_plugin.vllm.compat import BatchUpdate, MoveDirectionality
from mla_plugin.vllm.reference_tokens import REFERENCE_TOKENS_KEY, ForceReferenceTokens
from mla_plugin.vllm.touch_points import resolve

VOCAB = 50


def _params(tokens=None, max_tokens=None):
    extra = None if tokens is None else {REFERENCE_TOKENS_KEY: tokens}
    return SamplingParams(temperature=0, max_tokens=max_tokens or (len(tokens) if tokens else 4), extra_args=extra)


def _update(batch_size, removed=(), added=(), moved=()):
    return BatchUpdate(batch_size=batch_size, removed=list(removed), added=list(added), moved=list(moved))


def _forced(processor, logits):
    """row -> the one token left finite, for each forced row."""
    out = processor.apply(logits.clone())
    return {row: int(out[row].argmax()) for row in range(out.shape[0])
            if torch.isfinite(out[row]).sum() == 1 and out[row].max() == 0}


def test_processor_is_listed_by_name():
    assert resolve(REFERENCE_TOKENS_PROCESSOR) is ForceReferenceTokens
    assert ForceReferenceTokens(None, torch.device("cpu"), False).is_argmax_invariant() is False


def test_rows_follow_the_batch_and_are_forced_step_by_step(rng):
    proc = ForceReferenceTokens(None, torch.device("cpu"), False)
    ref_a = torch.randint(0, VOCAB, (5,), generator=rng).tolist()
    ref_b = torch.randint(0, VOCAB, (3,), generator=rng).tolist()
    out_a, out_b, out_plain = [], [], []
    proc.update_state(_update(3, added=[(0, _params(ref_a), [7], out_a), (1, _params(), [7], out_plain),
                                        (2, _params(ref_b), [8], out_b)]))
    logits = torch.randn(3, VOCAB, generator=rng)
    assert _forced(proc, logits) == {0: ref_a[0], 2: ref_b[0]}
    out = proc.apply(logits.clone())
    assert torch.equal(out[1], logits[1])  # a request without reference tokens is left alone

    out_a += ref_a[:2]  # vLLM appends the sampled tokens to these live lists
    out_b += ref_b[:2]
    assert _forced(proc, logits) == {0: ref_a[2], 2: ref_b[2]}

    # row 1 finishes; row 2 moves into it; then rows 0 and 1 swap
    proc.update_state(_update(2, removed=[1], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert _forced(proc, logits[:2]) == {0: ref_a[2], 1: ref_b[2]}
    proc.update_state(_update(2, moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert _forced(proc, logits[:2]) == {1: ref_a[2], 0: ref_b[2]}

    out_b.append(ref_b[2])  # b has generated all its reference tokens: no longer forced
    assert _forced(proc, logits[:2]) == {1: ref_a[2]}

    # a new request without reference tokens reuses row 0
    proc.update_state(_update(2, added=[(0, _params(), [9], [])]))
    assert _forced(proc, logits[:2]) == {1: ref_a[2]}
    proc.update_state(None)  # no change
    assert _forced(proc, logits[:2]) == {1: ref_a[2]}


@pytest.mark.parametrize("tokens,max_tokens,message", [
    ("12", 1, "must be a list of token ids"),
    ([1, -2], 2, "must be a list of token ids"),
    ([1, 2.0], 2, "must be a list of token ids"),
    ([1, 2], 3, "exceeds the 2 reference tokens"),
])
def test_malformed_requests_are_refused(tokens, max_tokens, message):
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    params.extra_args = {REFERENCE_TOKENS_KEY: tokens}
    with pytest.raises(ValueError, match=message):
        ForceReferenceTokens.validate_params(params)
    ForceReferenceTokens.validate_params(_params([1, 2]))  # a good one passes
    ForceReferenceTokens.validate_params(_params())  # and one without reference tokens
