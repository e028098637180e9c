"""Run inside .venv-sglang: the mla_plugin SGLang backend on a hand-built pool (random page
assignment, page size 4, a cached prefix, then a decode step) against the float64 causal
absorbed attention, outputs and natural-log LSE."""

from types import SimpleNamespace

import torch

from mla_plugin.ops.reference import causal_absorbed_attention
from mla_plugin.sglang.mla_backend import FORWARD_CALLS, MLAPluginSGLangBackend

D_C, D_R, HEADS, PAGE = 24, 8, 3, 4


class Pool:
    """SGLang's MLA pool layout: one [size + page, 1, d_c + d_R] buffer; set_kv_buffer by slot."""

    def __init__(self, pages: int):
        self.buffer = torch.full((pages * PAGE, 1, D_C + D_R), float("nan"))

    def get_key_buffer(self, layer_id):
        return self.buffer

    def set_kv_buffer(self, layer, loc_info, k, v):
        self.buffer[loc_info.loc] = k


def mode(decode: bool):
    return SimpleNamespace(is_decode_or_idle=lambda: decode)


def test_prefill_with_prefix_then_decode_match_the_reference(rng):
    pages = torch.randperm(12, generator=rng) + 1  # page 0 stays unused, as SGLang's padded slot
    req_to_token = torch.zeros(4, 32, dtype=torch.int64)
    rows_of = {2: pages[:3], 0: pages[3:6]}  # request slot -> its pages, in order
    for slot, its_pages in rows_of.items():
        req_to_token[slot, : len(its_pages) * PAGE] = (its_pages.unsqueeze(1) * PAGE + torch.arange(PAGE)).reshape(-1)
    pool = Pool(13)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                             token_to_kv_pool=pool, page_size=PAGE)
    backend = MLAPluginSGLangBackend(runner)
    layer = SimpleNamespace(layer_id=0, v_head_dim=D_C, qk_head_dim=D_C + D_R, tp_q_head_num=HEADS, scaling=0.3)
    full = {2: torch.randn(9, D_C + D_R, generator=rng), 0: torch.randn(6, D_C + D_R, generator=rng)}
    prefix = {2: 5, 0: 0}
    for slot in (2, 0):  # the cached prefix is already in the pool
        pool.buffer[req_to_token[slot, : prefix[slot]], 0] = full[slot][: prefix[slot]]

    def step(lens, news, decode):
        order = [2, 0]
        fb = SimpleNamespace(
            forward_mode=mode(decode), req_pool_indices=torch.tensor(order),
            seq_lens=torch.tensor([lens[s] for s in order]), seq_lens_cpu=torch.tensor([lens[s] for s in order]),
            extend_seq_lens=torch.tensor([news[s] for s in order]), extend_seq_lens_cpu=[news[s] for s in order],
            out_cache_loc=torch.cat([req_to_token[s, lens[s] - news[s]: lens[s]] for s in order]),
            out_cache_loc_is_physical=False,
        )
        k = torch.cat([full[s][lens[s] - news[s]: lens[s]] for s in order]).unsqueeze(1)  # [T, 1, D]
        q = torch.randn(k.shape[0], HEADS, D_C + D_R, generator=rng)
        backend.init_forward_metadata(fb)
        call = backend.forward_decode if decode else backend.forward_extend
        out, lse = call(q.reshape(q.shape[0], -1), k, k[..., :D_C], layer, fb, return_lse=True)
        start = 0
        for s in order:
            rows = full[s][: lens[s]]
            mine = slice(start, start + news[s])
            ref_out, ref_lse = causal_absorbed_attention(q[mine, :, :D_C], q[mine, :, D_C:], rows[:, :D_C],
                                                         rows[:, D_C:], 0.3)
            assert torch.allclose(out[mine].double(), ref_out.reshape(news[s], -1), atol=1e-5)
            assert torch.allclose(lse[mine].double(), ref_lse, atol=1e-5)
            start += news[s]

    step({2: 8, 0: 5}, {2: 3, 0: 5}, decode=False)  # request 2 extends a 5-token prefix
    step({2: 9, 0: 6}, {2: 1, 0: 1}, decode=True)
    assert FORWARD_CALLS[("mla_plugin", "extend")] == 1 and FORWARD_CALLS[("mla_plugin", "decode")] == 1
