"""The whole decode step (cache write + attention + LSE merge; exact over ranks with a
stand-in all-reduce; bf16 and fp8 caches) captured in one CUDA graph and replayed after
new lengths, slots (padded rows -1; then a batch of padding only), block tables, queries and
cache contents were copied into its static buffers: equal to an eager step bit for bit,
outputs and every cache byte. This is what vLLM's UNIFORM_SINGLE_TOKEN_DECODE capture of our
backends replays (``vllm/mla_backend.cudagraph_support``).

GPU only (``-m gpu``; ``scripts/gpu_checks.sh``); on CPU the same step runs under the
host-sync detector instead (test_latent_decode.py).
"""

import copy

import pytest
import torch

from mla_plugin.ops.kernel_choice import KERNEL_CALLS
from mla_plugin.ops.latent_cache import FP8_CACHE_DTYPE, fp8_cache_refusal
from tests.unit.decode_step import MODES, decode_step, fill, make_buffers

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]

BATCH, PADDED, HEADS, D_C, D_R, BLOCK, WIDTH = 8, 3, 16, 512, 64, 16, 8
CONTEXT = WIDTH * BLOCK  # 128: the block table's reach, the captured bound
SCENARIOS = [  # (seq_lens, the other part's lengths, every slot -1)
    ([5, 40, 1, 17, 64, 3, 9, 30], [10, 0, 128, 7, 1, 64, 33, 2], False),
    ([128, 2, 33, 1, 8, 100, 12, 7], [0, 0, 5, 128, 9, 1, 70, 40], False),
    ([6, 90, 3, 128, 1, 50, 21, 64], [3, 3, 3, 3, 0, 0, 0, 128], True),  # a batch of padding only
]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Bytes, so NaN compares equal to itself and fp8 compares as stored."""
    return t.contiguous().view(-1).view(torch.uint8)


def cuda_graph(step):
    """Capture ``step`` once (compiled on a side stream first); returns replay() -> its outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    def replay():
        graph.replay()
        torch.cuda.synchronize()
        return outputs

    return replay


def check_replays_equal_eager(mode, cache_dtype, rng, device="cuda", capture=cuda_graph):
    d_loc = D_C // 2 if mode in ("exact_tp", "grouped") else D_C
    buffers = make_buffers(BATCH, PADDED, HEADS, d_loc, D_R, BLOCK, WIDTH, cache_dtype=cache_dtype,
                           query_dtype=torch.bfloat16, device=device)
    fill(buffers, *SCENARIOS[0][:2], gen=rng)
    replay = capture(lambda: decode_step(buffers, mode, "triton", max_seq_len=CONTEXT))
    for seq_lens, other_lens, padding_only in SCENARIOS:
        fill(buffers, seq_lens, other_lens, gen=rng)
        if padding_only:
            buffers.slots.fill_(-1)
        eager_buffers = copy.deepcopy(buffers)
        filled = buffers.cache.clone()
        before = KERNEL_CALLS["triton"]
        replayed = [t.clone() for t in replay()]
        if device == "cuda":
            assert KERNEL_CALLS["triton"] == before, "the replay ran Python, not the graph"
            before = KERNEL_CALLS["triton"]
        eager = decode_step(eager_buffers, mode, "triton", max_seq_len=CONTEXT)
        assert KERNEL_CALLS["triton"] > before, "the eager step did not run the Triton kernels"
        assert torch.equal(as_bytes(buffers.cache), as_bytes(eager_buffers.cache)), "cache bytes differ"
        for got, want in zip(replayed, eager):
            assert torch.equal(as_bytes(got), as_bytes(want)), f"{mode}: replay != eager"
            assert torch.isfinite(got[:BATCH]).all()
        if padding_only:  # nothing written: every byte as fill() left it
            assert torch.equal(as_bytes(buffers.cache), as_bytes(filled))


@pytest.mark.parametrize("cache_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("mode", MODES)
def test_decode_step_in_one_cuda_graph_equals_eager(mode, cache_dtype, monkeypatch, rng):
    import mla_plugin.ops.triton_paged_attention as kernels

    if mode == "exact_tp":  # two chunks of context under capture: 64 keys of partial logits each
        monkeypatch.setattr(kernels, "LOGITS_BUDGET_BYTES", (BATCH + PADDED) * HEADS * 4 * 64)
        assert kernels.logits_chunk_keys(BATCH + PADDED, HEADS, CONTEXT) == 64
    refusal = fp8_cache_refusal(torch.cuda.get_device_capability(), "the backends refuse it at start-up.")
    if cache_dtype == "fp8" and refusal:
        pytest.skip(refusal)
    dtype = FP8_CACHE_DTYPE if cache_dtype == "fp8" else torch.bfloat16
    check_replays_equal_eager(mode, dtype, rng)
