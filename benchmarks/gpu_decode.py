"""Decode speed of the Triton kernels, timed as vLLM calls them, beside vLLM's own Triton MLA kernel.

For each case (batch, heads, context, equal or varied lengths, bf16 or ``--cache-dtype fp8``
cache: e4m3 with a per-layer scale; block size 64, permuted block table) it checks our
kernels and vLLM's (``benchmarks/vllm_peer.py``: copied from the installed vLLM at run time,
never committed) against the plain-torch seam on a few requests, then times both as
CUDA-graph replays (``--no-graph``: eager) with the default split counts (ours:
``num_splits=None``, as vLLM runs our backend; vLLM's: its own formula) and reports:

- ms per call, GB/s (FlashMLA's convention: the KV rows the requests own, once, plus q and
  the output), % of a device-to-device copy and of a read-only pass (sum) measured in the
  same process;
- TFLOPS (2·H·(2·d_c + d_R) per query row and key) and % of a bf16 GEMM (8192³) measured in
  the same process: the measure at 128 heads, where decode is compute-bound;
- the 2-way-shard layout (one 256+64 slice per rank) as a fraction of the MLA time;
- MTP rows: 2-4 query tokens per request at 16 heads, as a ratio to the one-token time;
- a fixed-cost probe: context 64, where the time is launch and per-call overhead;
- our other schedule (split-K beside the default balanced one) and, for fp8, pointer loads
  beside TMA tile copies, in the same process ("split-K ms", "no-TMA ms").

    python benchmarks/gpu_decode.py --json out.json             # the issue's table
    python benchmarks/gpu_decode.py --sweep                      # launch configurations (TUNING)
    TRITON_INTERPRET=1 python benchmarks/gpu_decode.py --smoke   # end to end on CPU, tiny sizes

Run from a checkout; it needs only torch and triton (and vLLM's file in benchmarks/_peer/,
copied by ``python benchmarks/vllm_peer.py`` where vLLM is installed).
"""

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import vllm_peer  # noqa: E402

from mla_plugin.ops import LatentSlices, paged_latent_attention  # noqa: E402
from mla_plugin.ops import triton_paged_attention as kernels  # noqa: E402

BLOCK_SIZE = 64
LAYOUTS = {"mla 512+64": (512, 64), "shard 256+64": (256, 64)}
FP8_SCALE = 0.05  # σ of the fp8 cache: it holds value / σ
CHECK_REQUESTS = 8  # requests checked against the torch seam per row
TOLERANCE = 3e-2


class Clock:
    """Times a call: CUDA events over graph replays (or eager calls) on a GPU, wall time on CPU."""

    def __init__(self, device: str, reps: int, graphs: bool):
        self.device, self.reps, self.graphs = device, reps, graphs and device == "cuda"

    def ms(self, fn) -> float:
        if self.device != "cuda":
            start = time.perf_counter()
            for _ in range(self.reps):
                fn()
            return (time.perf_counter() - start) * 1e3 / self.reps
        fn()  # compile outside the capture
        torch.cuda.synchronize()
        if self.graphs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # as vLLM runs decode: launch overhead gone
                fn()
            fn = graph.replay
        fn(), fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        return times[len(times) // 2]


def roofs(clock: Clock, gigabytes: float) -> dict:
    """Copy (read + write) and read-only (sum) GB/s, and bf16 GEMM TFLOPS, in this process."""
    n = int(gigabytes * 1e9) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=clock.device).normal_()
    dst = torch.empty_like(src)
    copy_ms = clock.ms(lambda: dst.copy_(src))
    acc = torch.empty((), dtype=torch.float32, device=clock.device)
    read_ms = clock.ms(lambda: torch.sum(src, dim=0, dtype=torch.float32, out=acc))
    del src, dst
    size = 8192 if clock.device == "cuda" else 256
    a = torch.randn(size, size, dtype=torch.bfloat16, device=clock.device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=clock.device)
    out = torch.empty(size, size, dtype=torch.bfloat16, device=clock.device)
    gemm_ms = clock.ms(lambda: torch.matmul(a, b, out=out))
    return dict(copy_gbps=4 * n / (copy_ms * 1e-3) / 1e9, read_gbps=2 * n / (read_ms * 1e-3) / 1e9,
                gemm_tflops=2 * size**3 / (gemm_ms * 1e-3) / 1e12)


def make_case(batch, context, d_c, d_r, heads, varied, gen, device, cache_dtype="bf16", query_len=1):
    """A paged cache (every slot written) and bf16 queries (``query_len`` rows per request);
    lengths equal or uniform in [max(1, context / 10), context]."""
    if varied:
        lens = torch.randint(max(query_len, context // 10), context + 1, (batch,), generator=gen)
    else:
        lens = torch.full((batch,), context)
    blocks = [math.ceil(int(n) / BLOCK_SIZE) for n in lens]
    order = torch.randperm(sum(blocks), generator=gen)
    table = torch.zeros(batch, max(blocks), dtype=torch.int32)  # [B, max_blocks]
    used = 0
    for b, n in enumerate(blocks):
        table[b, :n] = order[used : used + n]
        used += n
    cache = torch.randn(sum(blocks), BLOCK_SIZE, d_c + d_r, generator=gen).to(torch.bfloat16).to(device)
    if cache_dtype == "fp8":
        cache = (cache.float() / FP8_SCALE).to(torch.float8_e4m3fn)
    q = torch.randn(batch * query_len, heads, d_c + d_r, generator=gen).to(torch.bfloat16).to(device)
    sigma = torch.tensor([FP8_SCALE] if cache_dtype == "fp8" else [1.0], device=device)
    starts = torch.arange(0, batch * query_len + 1, query_len, dtype=torch.int32, device=device)  # [B + 1]
    return dict(cache=cache, table=table.to(device), lens=lens.to(torch.int32).to(device), q=q, sigma=sigma,
                starts=starts, tokens=int(lens.sum()), fp8=cache_dtype == "fp8", query_len=query_len)


def _slices(layout: str) -> LatentSlices:
    # The one-slice shard: what one rank of a 2-way partitioned split computes (its slice, all heads).
    return LatentSlices() if layout.startswith("mla") else LatentSlices(num_shards=2, shards_local=1,
                                                                        softmax="partitioned")


def ours(case, d_c, layout, context, num_splits=None):
    q, sigma = case["q"], case["sigma"] if case["fp8"] else None
    return kernels.triton_paged_latent_attention(q[..., :d_c], q[..., d_c:], case["cache"], case["starts"],
                                                 case["lens"], case["table"], 1 / math.sqrt(192), _slices(layout),
                                                 None, context, False, num_splits=num_splits, cache_scale=sigma)


def reference(case, d_c, layout, context):
    """The plain-torch seam on the first CHECK_REQUESTS requests (float32)."""
    sub, rows = CHECK_REQUESTS, CHECK_REQUESTS * case["query_len"]
    q = case["q"]
    return paged_latent_attention(q[:rows, :, :d_c], q[:rows, :, d_c:], case["cache"], case["starts"][: sub + 1],
                                  case["lens"][:sub], case["table"][:sub], 1 / math.sqrt(192), slices=_slices(layout),
                                  max_query_len=case["query_len"], max_seq_len=context, kernel="torch",
                                  cache_scale=case["sigma"] if case["fp8"] else None).float()


def max_error(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    error = (got[: want.shape[0]].float() - want).abs().max().item()
    if not error < TOLERANCE:
        raise AssertionError(f"{what}: max abs error {error} against the torch seam")
    return error


def run_row(args, clock, peer, heads, context, layout, varied, cache_dtype, gen, query_len=1) -> dict:
    d_c, d_r = LAYOUTS[layout]
    case = make_case(args.batch, context, d_c, d_r, heads, varied, gen, clock.device, cache_dtype, query_len)
    what = f"{cache_dtype} {layout} H={heads} L={context} q={query_len}"
    want = reference(case, d_c, layout, context)
    row = dict(cache=cache_dtype, layout=layout, heads=heads, context=context, query_len=query_len,
               lengths="varied" if varied else "equal", batch=args.batch, tokens=case["tokens"])
    row["err"] = max_error(ours(case, d_c, layout, context), want, f"ours {what}")
    row["ms"] = clock.ms(lambda: ours(case, d_c, layout, context))
    # The same call with the other schedule (split-K where the default is balanced; the same
    # where split-K is the default) and, for fp8, with pointer loads instead of TMA copies.
    alternatives = {"split_ms": {"schedule": "split"}}
    if case["fp8"]:
        alternatives["pointer_ms"] = {"tma": False}
    for key, tuning in alternatives.items():
        kernels.TUNING.update(tuning)
        try:
            max_error(ours(case, d_c, layout, context), want, f"ours {what} {tuning}")
            row[key] = clock.ms(lambda: ours(case, d_c, layout, context))
        finally:
            kernels.TUNING.clear()
    sms = torch.cuda.get_device_properties(0).multi_processor_count if clock.device == "cuda" else 132
    inputs = vllm_peer.prepare(case["q"], case["cache"], case["lens"], case["table"], d_c, query_len, context, sms)
    scale = 1 / math.sqrt(192)
    row["vllm_err"] = max_error(vllm_peer.run(peer, inputs, scale, case["sigma"]), want, f"vLLM {what}")
    row["vllm_ms"] = clock.ms(lambda: vllm_peer.run(peer, inputs, scale, case["sigma"]))
    row["vllm_splits"] = inputs["splits"]
    rows_q = args.batch * query_len
    nbytes = case["tokens"] * (d_c + d_r) * case["cache"].element_size() + rows_q * heads * (2 * d_c + d_r) * 2
    flops = 2 * heads * (2 * d_c + d_r) * case["tokens"] * query_len  # every row of a request reads its keys
    row.update(gbps=nbytes / (row["ms"] * 1e-3) / 1e9, tflops=flops / (row["ms"] * 1e-3) / 1e12)
    return row


def print_row(row: dict, roof: dict) -> None:
    row["of_copy"] = row["gbps"] / roof["copy_gbps"]
    row["of_read"] = row["gbps"] / roof["read_gbps"]
    row["of_gemm"] = row["tflops"] / roof["gemm_tflops"]
    print(f"| {row['cache']} | {row['layout']} | {row['heads']} | {row['context']} | {row['lengths']} | "
          f"{row['query_len']} | {row['ms']:.3f} | {row['gbps']:.0f} | {row['of_copy']:.0%} | {row['of_read']:.0%} | "
          f"{row['tflops']:.1f} | {row['of_gemm']:.0%} | {row['split_ms']:.3f} | "
          f"{'%.3f' % row['pointer_ms'] if 'pointer_ms' in row else '-'} | "
          f"{row['vllm_ms']:.3f} ({row['vllm_splits']}) | "
          f"{row['vllm_ms'] / row['ms']:.2f} | {row.get('shard_over_mla', '')} | {row.get('over_one_token', '')} | "
          f"{max(row['err'], row['vllm_err']):.1e} |", flush=True)


def table_rows(args, clock, peer, gen, roof) -> list[dict]:
    print("| cache | layout | heads | context | lengths | q/req | ms | GB/s | of copy | of read | TFLOPS | of GEMM "
          "| split-K ms | no-TMA ms | vLLM ms (splits) | vLLM/ours | shard/MLA | /1-token | err |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for cache_dtype, heads, context, varied in itertools.product(args.cache_dtype, args.heads, args.contexts,
                                                                   (False, True)):
        mla = None
        for layout in LAYOUTS:
            row = run_row(args, clock, peer, heads, context, layout, varied, cache_dtype, gen)
            if mla is None:
                mla = row
            else:
                row["shard_over_mla"] = round(row["ms"] / mla["ms"], 2)
            print_row(row, roof)
            rows.append(row)
    for query_len in (1, *args.mtp):  # MTP verify: several query tokens per request, 16 heads
        row = run_row(args, clock, peer, 16, args.mtp_context, "mla 512+64", False, "bf16", gen, query_len)
        if query_len == 1:
            one = row
        else:
            row["over_one_token"] = round(row["ms"] / one["ms"], 2)
        print_row(row, roof)
        rows.append(row)
    for heads in args.heads:  # fixed cost: context 64
        row = run_row(args, clock, peer, heads, 64, "mla 512+64", False, "bf16", gen)
        row["probe"] = True
        print_row(row, roof)
        rows.append(row)
    return rows


SWEEP_TILES = {  # (block_h, block_n, num_warps, num_stages) per heads per stream; the MLA default first
    16: [(16, 16, 8, 5), (16, 16, 4, 5), (16, 32, 4, 5), (16, 32, 4, 2), (16, 16, 4, 6), (16, 32, 8, 5),
         (16, 64, 8, 2)],
    128: [(64, 16, 8, 5), (64, 32, 8, 5), (64, 64, 8, 2), (64, 16, 8, 6), (64, 32, 8, 4)],
}


def sweep(args, clock, gen) -> None:
    """Time launch configurations (kernels.TUNING) under the default schedule and split-K with
    1-8 splits; one line each, errors
    against the torch seam, failures (resources) reported per configuration."""
    for heads, layout, cache_dtype in itertools.product(args.heads, LAYOUTS, args.cache_dtype):
        context = args.contexts[-1]
        d_c, d_r = LAYOUTS[layout]
        case = make_case(args.batch, context, d_c, d_r, heads, False, gen, clock.device, cache_dtype)
        want = reference(case, d_c, layout, context)
        nbytes = case["tokens"] * (d_c + d_r) * case["cache"].element_size()
        for tiles, splits in itertools.product(SWEEP_TILES[16 if heads < 64 else 128], (None, 1, 2, 4, 8)):
            kernels.TUNING.clear()
            kernels.TUNING.update(zip(("block_h", "block_n", "num_warps", "num_stages"), tiles))
            label = f"{cache_dtype} {layout} H={heads} L={context} h{tiles[0]} n{tiles[1]} w{tiles[2]} s{tiles[3]} " \
                    f"{'split-K %d' % splits if splits else 'default schedule'}"
            try:
                error = max_error(ours(case, d_c, layout, context, splits), want, label)
                ms = clock.ms(lambda: ours(case, d_c, layout, context, splits))
            except Exception as exc:  # a configuration that does not compile or run (registers, shared memory)
                print(f"{label}: failed {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            finally:
                kernels.TUNING.clear()
            print(f"{label}: {ms:.3f} ms {nbytes / (ms * 1e-3) / 1e9:.0f} GB/s err {error:.1e}", flush=True)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--cache-dtype", choices=["bf16", "fp8"], nargs="+", default=["bf16", "fp8"])
    parser.add_argument("--mtp", type=int, nargs="*", default=[2, 3, 4], help="query tokens per request (MTP rows)")
    parser.add_argument("--mtp-context", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--sweep", action="store_true", help="time launch configurations instead (tuning)")
    parser.add_argument("--no-graph", action="store_true", help="time eager launches (default: CUDA-graph replays)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on CPU under TRITON_INTERPRET=1: checks the whole harness, times nothing real")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.contexts, args.heads, args.reps, args.mtp_context = 8, [80], [16], 1, 40
        args.mtp = args.mtp[:1]
    return args


def main(argv=None) -> int:
    args = parse(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (args.smoke and kernels.interpreting()):
        print("error: needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 set, to check the harness on CPU)",
              file=sys.stderr)
        return 2
    clock = Clock(device, args.reps, not args.no_graph)
    gen = torch.Generator().manual_seed(0)
    if args.sweep:
        sweep(args, clock, gen)
        return 0
    peer = vllm_peer.load()
    roof = roofs(clock, 4.0 if device == "cuda" else 0.001)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter: smoke test, not a timing)"
    print(f"# {name}, torch {torch.__version__}, triton {kernels.triton.__version__}; batch {args.batch}; "
          f"copy {roof['copy_gbps']:.0f} GB/s (read + write), read {roof['read_gbps']:.0f} GB/s, bf16 GEMM "
          f"{roof['gemm_tflops']:.0f} TFLOPS; {'eager' if args.no_graph else 'CUDA-graph replays'}; "
          f"ours with its default splits; vLLM = vLLM's Triton MLA kernel (copied from vLLM, splits in brackets)\n")
    rows = table_rows(args, clock, peer, gen, roof)
    if args.json:
        args.json.write_text(json.dumps(dict(device=name, triton=kernels.triton.__version__, **roof, rows=rows),
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
