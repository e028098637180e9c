"""Run inside .venv-sglang (tests/sglang/test_graph_mode.py): graph mode of the SGLang backends
driven as SGLang's graph runners drive it, for mla_plugin and every mode of mla_plugin_gla.

A batch size is captured once (``init_cuda_graph_state``, ``init_forward_metadata_out_graph``
with ``in_capture=True``, ``_in_graph``, then a forward on the runner's static input buffers);
each replay pads a new batch into those buffers, refills the metadata with
``init_forward_metadata_out_graph`` under the host-sync detectors, and runs the forward with
the *captured* metadata object (a graph replays what it recorded: the same tensor addresses,
the same host integers). Every replay must equal the eager step of the same batch; the chain
verify step (top-k 1) also equals float64 causal attention. Tree drafts, the draft model's
steps and uncapturable modes are refused in one line."""

import copy
from types import SimpleNamespace

import pytest
import torch

from mla_plugin.ops.reference import causal_absorbed_attention
from tests.sglang.in_venv.checks_decode_sync import D_C, D_R, HEADS, PAGE, backend_and_layer, stand_in_all_reduce
from tests.unit.test_latent_decode import HostSyncDetector, forbid_host_reads

pytest.importorskip("sglang", reason="run by tests/sglang/test_graph_mode.py inside .venv-sglang")

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

SLOTS, CONTEXT = 6, 24  # request slots (slot 0: SGLang's padding slot, never a request), max context
# What eager and replay may differ by: the replay's static context bound changes only how the
# torch path chunks the context (the same values, merged in another order).
EAGER_ATOL = 1e-5


class Runner:
    """The graph runner's side: static input buffers for ``max_bs`` requests of ``q_len`` rows,
    padded as SGLang pads them (seq_len 1, request slot 0, cache slot 0)."""

    def __init__(self, max_bs: int, q_len: int, width: int, heads: int, mode):
        tokens = max_bs * q_len
        self.mode, self.q_len, self.max_bs = mode, q_len, max_bs
        self.req_pool_indices = torch.zeros(max_bs, dtype=torch.int64)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int64)
        self.out_cache_loc = torch.zeros(tokens, dtype=torch.int64)
        self.q = torch.zeros(tokens, heads * width)
        self.k = torch.zeros(tokens, 1, width)
        spec = SimpleNamespace(draft_token_num=q_len, topk=1) if mode == ForwardMode.TARGET_VERIFY else None
        self.batch = SimpleNamespace(forward_mode=mode, batch_size=max_bs, req_pool_indices=self.req_pool_indices,
                                     seq_lens=self.seq_lens, out_cache_loc=self.out_cache_loc,
                                     out_cache_loc_is_physical=False, spec_info=spec)

    def pad_in(self, slots, lens, locs, q, k) -> None:
        raw, rows = len(slots), q.shape[0]
        self.req_pool_indices.zero_()
        self.req_pool_indices[:raw] = torch.tensor(slots)
        self.seq_lens.fill_(1)
        self.seq_lens[:raw] = torch.tensor(lens)
        self.out_cache_loc.zero_()
        self.out_cache_loc[:rows] = locs
        self.q.zero_()
        self.q[:rows] = q
        self.k.zero_()
        self.k[:rows] = k


def fill_pages(rng, req_to_token) -> None:
    """Each request slot 1.. gets its own random pages (page 0 is the padding slot's)."""
    pages = torch.randperm(req_to_token.shape[0] * CONTEXT // PAGE, generator=rng) + 1
    per_slot = CONTEXT // PAGE
    for slot in range(1, req_to_token.shape[0]):
        its = pages[slot * per_slot: (slot + 1) * per_slot]
        req_to_token[slot] = (its.unsqueeze(1) * PAGE + torch.arange(PAGE)).reshape(-1)


def make_backends(mode: str, rng):
    req_to_token = torch.zeros(SLOTS, CONTEXT, dtype=torch.int64)
    d_loc = D_C if mode == "mla" else D_C // 2
    heads = HEADS // 2 if mode == "grouped" else HEADS
    graph, layer = backend_and_layer(mode, d_loc + D_R, heads, req_to_token)
    pages = SLOTS * CONTEXT // PAGE + 1
    graph.pool.buffer = torch.full((pages * PAGE, 1, d_loc + D_R), float("nan"))
    eager, _ = backend_and_layer(mode, d_loc + D_R, heads, req_to_token)
    eager.pool = graph.pool  # one pool, as in SGLang (restored between the two runs)
    return graph, eager, layer, req_to_token, d_loc, heads


def new_batch(rng, req_to_token, pool, d_loc, heads, raw_bs, q_len):
    """``raw_bs`` requests on fresh pages: cached prefixes in the pool, q_len new rows each."""
    fill_pages(rng, req_to_token)
    slots = (torch.randperm(SLOTS - 1, generator=rng)[:raw_bs] + 1).tolist()
    prefixes = torch.randint(0, CONTEXT - q_len + 1, (raw_bs,), generator=rng).tolist()
    rows = {s: torch.randn(p + q_len, d_loc + D_R, generator=rng) for s, p in zip(slots, prefixes)}
    for s, p in zip(slots, prefixes):
        pool.buffer[req_to_token[s, :p], 0] = rows[s][:p]
    locs = torch.cat([req_to_token[s, p: p + q_len] for s, p in zip(slots, prefixes)])
    k = torch.cat([rows[s][p:] for s, p in zip(slots, prefixes)]).unsqueeze(1)  # [raw_bs q_len, 1, W]
    q = torch.randn(raw_bs * q_len, heads * (d_loc + D_R), generator=rng)
    return slots, prefixes, rows, locs, q, k


def eager_step(backend, layer, runner, slots, prefixes, locs, q, k, d_loc):
    decode = runner.mode == ForwardMode.DECODE
    lens = [p + 1 for p in prefixes] if decode else prefixes  # SGLang's verify seq_lens exclude the drafts
    batch = SimpleNamespace(forward_mode=runner.mode, batch_size=len(slots), req_pool_indices=torch.tensor(slots),
                            seq_lens=torch.tensor(lens), seq_lens_cpu=torch.tensor(lens), out_cache_loc=locs,
                            out_cache_loc_is_physical=False, spec_info=runner.batch.spec_info)
    backend.init_forward_metadata(batch)
    call = backend.forward_decode if decode else backend.forward_extend
    return call(q, k, k[..., :d_loc], layer, batch)


def capture(backend, layer, runner, d_loc, cpu_runner: bool):
    """SGLang's capture of one batch size: static state, out_graph (in capture), in_graph, one
    forward; or, as its CPU graph runner calls them, init_cpu_graph_state and
    init_forward_metadata_capture_cpu_graph (positional arguments as it passes them)."""
    tokens = runner.max_bs * runner.q_len
    if cpu_runner:
        backend.init_cpu_graph_state(runner.max_bs, tokens)
        b = runner.batch
        backend.init_forward_metadata_capture_cpu_graph(runner.max_bs, tokens, b.req_pool_indices, b.seq_lens,
                                                        b.out_cache_loc, None, b.forward_mode, b.spec_info)
    else:
        backend.init_cuda_graph_state(runner.max_bs, tokens)
        backend.init_forward_metadata_out_graph(runner.batch, in_capture=True)
        backend.init_forward_metadata_in_graph(runner.batch)
    captured = backend.forward_metadata
    call = backend.forward_decode if runner.mode == ForwardMode.DECODE else backend.forward_extend

    def replay_forward():
        backend.forward_metadata = captured  # what the graph recorded, whatever the fill set
        return call(runner.q, runner.k, runner.k[..., :d_loc], layer, runner.batch)

    replay_forward()  # the captured run
    return captured, replay_forward


def assert_same_addresses(now, captured) -> None:
    for name in ("query_start_loc", "seq_lens", "block_table"):
        a, b = getattr(now, name), getattr(captured, name)
        assert a.data_ptr() == b.data_ptr() and a.shape == b.shape, name
    assert (now.max_query_len, now.max_seq_len) == (captured.max_query_len, captured.max_seq_len)


def replay_metadata(backend, batch, cpu_runner: bool) -> None:
    """Before a replay: the CUDA runner calls out_graph then (in the graph) in_graph; the CPU
    runner calls init_forward_metadata on its padded batch."""
    if cpu_runner:
        backend.init_forward_metadata(batch)
    else:
        backend.init_forward_metadata_out_graph(batch)
        backend.init_forward_metadata_in_graph(batch)


def run_replays(mode, q_len, batch_sizes, monkeypatch, rng, cpu_runner=False):
    import mla_plugin.sglang.gla_compat as gla_compat

    monkeypatch.setattr(gla_compat, "tensor_model_parallel_all_reduce", stand_in_all_reduce)
    graph, eager, layer, req_to_token, d_loc, heads = make_backends(mode, rng)
    fb_mode = ForwardMode.DECODE if q_len == 1 else ForwardMode.TARGET_VERIFY
    runner = Runner(max(batch_sizes), q_len, d_loc + D_R, heads, fb_mode)
    captured, replay_forward = capture(graph, layer, runner, d_loc, cpu_runner)
    diffs = []
    for raw_bs in batch_sizes:
        slots, prefixes, rows, locs, q, k = new_batch(rng, req_to_token, graph.pool, d_loc, heads, raw_bs, q_len)
        before = copy.deepcopy(graph.pool.buffer)
        expected = eager_step(eager, layer, runner, slots, prefixes, locs, q, k, d_loc)
        graph.pool.buffer.copy_(before)
        runner.pad_in(slots, [p + 1 for p in prefixes] if q_len == 1 else prefixes, locs, q, k)
        with monkeypatch.context() as m:
            forbid_host_reads(m)
            with HostSyncDetector():
                replay_metadata(graph, runner.batch, cpu_runner)  # no host read
                assert_same_addresses(graph.forward_metadata, captured)
                got = replay_forward()
        real = got[: raw_bs * q_len]
        assert torch.isfinite(real).all() and torch.allclose(real, expected, atol=EAGER_ATOL, rtol=0)
        diffs.append(float((real - expected).abs().max()))
        yield raw_bs, slots, prefixes, rows, q, real
    print(f"{mode} q_len={q_len} {'CPU' if cpu_runner else 'CUDA'} runner: replays {batch_sizes} on one capture, max |replay - eager| {max(diffs):.1e}")


@pytest.mark.parametrize("cpu_runner", [False, True], ids=["cuda-runner", "cpu-runner"])
@pytest.mark.parametrize("mode", ["mla", "exact", "partitioned", "grouped"])
def test_captured_decode_replays_changing_batches_equal_to_eager(mode, cpu_runner, monkeypatch, rng):
    from mla_plugin.sglang.mla_backend import GRAPH_FILLS

    before = dict(GRAPH_FILLS)
    replays = list(run_replays(mode, 1, [4, 3, 1, 4], monkeypatch, rng, cpu_runner))  # captured at 4, padded below
    assert len(replays) == 4
    name = "mla_plugin" if mode == "mla" else "mla_plugin_gla"
    assert GRAPH_FILLS[(name, "capture", "DECODE")] == before.get((name, "capture", "DECODE"), 0) + 1
    assert GRAPH_FILLS[(name, "replay", "DECODE")] == before.get((name, "replay", "DECODE"), 0) + 4


def test_captured_chain_verify_equals_eager_and_causal_attention(monkeypatch, rng):
    """Target verify of 3 chained drafts per request: captured at 3 requests, replayed with 2 and 3."""
    scale = 0.3
    for raw_bs, slots, prefixes, rows, q, out in run_replays("mla", 3, [3, 2, 3], monkeypatch, rng):
        queries = q.view(raw_bs * 3, HEADS, D_C + D_R)
        for b, (s, p) in enumerate(zip(slots, prefixes)):
            mine = slice(3 * b, 3 * b + 3)
            ref, _ = causal_absorbed_attention(queries[mine, :, :D_C], queries[mine, :, D_C:], rows[s][:, :D_C],
                                               rows[s][:, D_C:], scale)
            assert torch.allclose(out[mine].double(), ref.reshape(3, -1), atol=1e-5)


def test_graph_mode_refusals_are_one_line(monkeypatch):
    import mla_plugin.sglang.mla_backend as mb

    def runner(algorithm="NONE", draft=False):
        spec = SimpleNamespace(is_none=lambda: algorithm == "NONE", name=algorithm)
        return SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=torch.zeros(2, 8)),
                               token_to_kv_pool=None, page_size=4, spec_algorithm=spec, is_draft_worker=draft)

    monkeypatch.setattr(mb, "resolve", lambda name: lambda: SimpleNamespace(speculative_eagle_topk=4))
    messages = []
    for args in (("NGRAM",), ("EAGLE",), ("EAGLE", True)):
        with pytest.raises(ValueError) as error:
            mb.MLAPluginSGLangBackend(runner(*args))
        messages.append(str(error.value))
    assert all("\n" not in m and m.startswith("--attention-backend mla_plugin ") for m in messages), messages
    assert "NGRAM drafts a tree" in messages[0] and "--speculative-eagle-topk 4 drafts a tree" in messages[1]
    assert "--speculative-draft-attention-backend" in messages[2]
    monkeypatch.setattr(mb, "resolve", lambda name: lambda: SimpleNamespace(speculative_eagle_topk=1))
    backend = mb.MLAPluginSGLangBackend(runner("EAGLE"))  # a chain: served
    backend.init_cuda_graph_state(2, 2)
    extend = SimpleNamespace(forward_mode=ForwardMode.EXTEND, req_pool_indices=torch.zeros(2, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="captures decode and chain-verify batches, not EXTEND"):
        backend.init_forward_metadata_out_graph(extend, in_capture=True)
    tree = SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY, spec_info=SimpleNamespace(draft_token_num=4, topk=2))
    with pytest.raises(NotImplementedError, match="chain drafts only"):
        backend.init_forward_metadata_out_graph(tree, in_capture=True)
