"""Run inside .venv-sglang (tests/sglang/test_decode_sync.py): a whole step of the SGLang
backends (per-forward metadata, the pool write through the backend, the ops seam, for
decode and extend) reads no tensor value on the host, for mla_plugin and every mode of
mla_plugin_gla (exact over two ranks with a stand-in all-reduce, partitioned, grouped); and
an fp8 pool is refused at start-up below compute capability 8.9, in one line."""

import copy
from types import SimpleNamespace

import pytest
import torch

from mla_plugin.gla_options import ShardedLatentOptions
from tests.unit.test_latent_decode import HostSync, HostSyncDetector, forbid_host_reads

pytest.importorskip("sglang", reason="run by tests/sglang/test_decode_sync.py inside .venv-sglang")

D_C, D_R, HEADS, PAGE = 32, 8, 4, 4
TOLIST = torch._C.TensorBase.tolist  # the C method, which the tests' refusal does not replace


class HostCopy(torch.Tensor):
    """SGLang's ``*_cpu`` copies live in host memory: reading them is no device sync (on this
    CPU-only machine every tensor is a host tensor, so the copies are marked as such)."""

    def tolist(self):
        with torch._C.DisableTorchFunctionSubclass():
            return TOLIST(self)


class Pool:
    """SGLang's MLA pool layout ([size + page, 1, width]), written by slot as its set_kv_buffer does."""

    def __init__(self, pages: int, width: int):
        self.buffer = torch.full((pages * PAGE, 1, width), float("nan"))

    def get_key_buffer(self, layer_id):
        return self.buffer

    def set_kv_buffer(self, layer, loc_info, k, v):
        self.buffer[loc_info.loc] = k


def backend_and_layer(mode: str, pool_width: int, heads: int, req_to_token):
    from mla_plugin.sglang.gla_backend import MLAPluginGLASGLangBackend
    from mla_plugin.sglang.mla_backend import MLAPluginSGLangBackend

    runner = SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                             token_to_kv_pool=Pool(16, pool_width), page_size=PAGE, use_mla_backend=True,
                             kv_cache_dtype=torch.float32)
    layer = SimpleNamespace(layer_id=0, v_head_dim=pool_width - D_R, qk_head_dim=pool_width, tp_q_head_num=heads,
                            scaling=0.3)
    if mode == "mla":
        return MLAPluginSGLangBackend(runner), layer
    options = ShardedLatentOptions(shards=2, softmax=mode, logit_scale=1.0)
    layer.mla_plugin_plan = options.resolve(latent_dim=D_C, num_heads=HEADS, tp_size=2, tp_rank=1)
    return MLAPluginGLASGLangBackend(runner), layer


def forward_batch(decode: bool, lens, news, req_to_token, host_copies: bool):
    """A ForwardBatch's fields the backends read; without ``host_copies`` the ``*_cpu`` copies
    are absent and the device tensors are all there is (the backend must not read them)."""
    slots = [2, 0, 3]
    return SimpleNamespace(
        forward_mode=SimpleNamespace(is_decode_or_idle=lambda: decode),
        req_pool_indices=torch.tensor(slots), seq_lens=torch.tensor(lens),
        seq_lens_cpu=torch.tensor(lens).as_subclass(HostCopy) if host_copies else None,
        extend_seq_lens=torch.tensor(news), extend_seq_lens_cpu=list(news) if host_copies else None,
        out_cache_loc=torch.cat([req_to_token[s, n - q: n] for s, n, q in zip(slots, lens, news)]),
        out_cache_loc_is_physical=False,
    )


def stand_in_all_reduce(tensor):
    tensor.mul_(2.0)  # the sum over two ranks whose slices hold the same partial logits


@pytest.mark.parametrize("host_copies", [True, False], ids=["host-copies", "device-only"])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "extend"])
@pytest.mark.parametrize("mode", ["mla", "exact", "partitioned", "grouped"])
def test_a_step_reads_nothing_on_the_host(mode, decode, host_copies, monkeypatch, rng):
    import mla_plugin.sglang.gla_compat as gla_compat

    monkeypatch.setattr(gla_compat, "tensor_model_parallel_all_reduce", stand_in_all_reduce)
    pages = torch.randperm(15, generator=rng) + 1
    req_to_token = torch.zeros(4, 16, dtype=torch.int64)
    for slot, first in ((2, 0), (0, 4), (3, 8)):
        req_to_token[slot] = (pages[first:first + 4].unsqueeze(1) * PAGE + torch.arange(PAGE)).reshape(-1)
    d_loc = D_C if mode == "mla" else D_C // 2
    heads = HEADS // 2 if mode == "grouped" else HEADS  # grouped at TP 2: the heads are split too
    backend, layer = backend_and_layer(mode, d_loc + D_R, heads, req_to_token)
    pool = backend.pool
    pool.buffer[req_to_token[[2, 0, 3], :12].reshape(-1), 0] = torch.randn(36, d_loc + D_R, generator=rng)
    lens, news = ([9, 13, 2], [1, 1, 1]) if decode else ([9, 13, 5], [3, 1, 5])
    batch = forward_batch(decode, lens, news, req_to_token, host_copies)
    k = torch.randn(sum(news), 1, d_loc + D_R, generator=rng)
    q = torch.randn(sum(news), heads * (d_loc + D_R), generator=rng)
    call = backend.forward_decode if decode else backend.forward_extend

    def step():
        backend.init_forward_metadata(batch)
        return call(q, k, k[..., :d_loc], layer, batch)

    before = copy.deepcopy(pool.buffer)
    expected = step()
    pool.buffer.copy_(before)
    with monkeypatch.context() as m:
        forbid_host_reads(m)
        with HostSyncDetector():
            got = step()
    assert torch.equal(got, expected) and torch.isfinite(got).all()


def test_reading_the_device_lengths_is_caught(monkeypatch):
    """What the metadata did before without host copies (``seq_lens.tolist()``) fails here."""
    with monkeypatch.context() as m:
        forbid_host_reads(m)
        with HostSyncDetector(), pytest.raises(HostSync, match="Tensor.tolist"):
            max(torch.tensor([9, 13, 2]).tolist())


def test_fp8_pool_refused_below_8_9(monkeypatch):
    from mla_plugin.sglang.mla_backend import MLAPluginSGLangBackend

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    runner = SimpleNamespace(device="cuda", req_to_token_pool=SimpleNamespace(req_to_token=torch.zeros(1, 4)),
                             token_to_kv_pool=None, page_size=1, kv_cache_dtype=torch.float8_e4m3fn)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError) as error:
        MLAPluginSGLangBackend(runner)
    message = str(error.value)
    assert "\n" not in message and message.startswith("--attention-backend mla_plugin --kv-cache-dtype fp8_e4m3: ")
    assert "this GPU is 8.0" in message and "Leave out --kv-cache-dtype" in message
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    MLAPluginSGLangBackend(runner)  # Hopper: accepted
