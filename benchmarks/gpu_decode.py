"""Decode speed of the Triton kernels on a CUDA GPU (torch + triton only, no vLLM).

For each case (bf16 queries and cache, or ``--cache-dtype fp8``: an e4m3 cache with a
per-layer scale, one byte per value; one query per request, block size 64, permuted
block table):
checks the Triton result against the plain-torch seam on a few requests, then times it
and prints time per call (replays of a captured CUDA graph, as vLLM decodes; ``--no-graph``
for eager launches), GB/s and the ratio to a device-to-device copy measured in the same run, plus the 2-way-shard time (one 256+64 slice, what each of 2 ranks reads) as a
fraction of the MLA time (512+64) at the same batch, heads and context.

Bytes follow FlashMLA's convention: the KV rows the requests own, counted once, plus q
and the output. The copy's bandwidth counts bytes read plus bytes written.

    python benchmarks/gpu_decode.py                       # the issue's table
    python benchmarks/gpu_decode.py --contexts 4096 --heads 16 --splits 0 4 8   # tuning

Run from a checkout (``PYTHONPATH=.``); it needs only torch and triton.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mla_plugin.ops import LatentSlices, paged_latent_attention  # noqa: E402
from mla_plugin.ops import triton_paged_attention as kernels  # noqa: E402

BLOCK_SIZE = 64
LAYOUTS = {"mla 512+64": (512, 64), "shard 256+64": (256, 64)}


def time_ms(fn, reps: int) -> float:
    """Median milliseconds per call from CUDA events (after two warm-up calls)."""
    fn(), fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(gigabytes: float, reps: int) -> float:
    """Device-to-device copy bandwidth in GB/s (read + written bytes)."""
    src = torch.empty(int(gigabytes * 1e9) // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9


FP8_SCALE = 0.05  # σ of the fp8 cache: it holds value / σ


def make_case(batch, context, d_c, d_r, heads, varied, gen, cache_dtype="bf16"):
    """A paged cache (every slot written) and bf16 queries; lengths equal or uniform in [1, context]."""
    if varied:
        lens = torch.randint(1, context + 1, (batch,), generator=gen)
    else:
        lens = torch.full((batch,), context)
    blocks = [math.ceil(int(n) / BLOCK_SIZE) for n in lens]
    width = max(blocks)
    num_blocks = sum(blocks)
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(batch, width, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        table[b, :n] = order[used : used + n]
        used += n
    cache = torch.empty(num_blocks, BLOCK_SIZE, d_c + d_r, dtype=torch.bfloat16, device="cuda").normal_()
    if cache_dtype == "fp8":
        cache = (cache.float() / FP8_SCALE).to(torch.float8_e4m3fn)
    q = torch.randn(batch, heads, d_c + d_r, generator=gen).to(torch.bfloat16).cuda()
    return cache, table.cuda(), lens.to(torch.int32).cuda(), q, int(lens.sum())


def run_case(batch, context, heads, layout, varied, splits, reps, gen, torch_baseline=False, graphs=True,
             cache_dtype="bf16"):
    d_c, d_r = LAYOUTS[layout]
    cache, table, lens, q, tokens = make_case(batch, context, d_c, d_r, heads, varied, gen, cache_dtype)
    sigma = torch.tensor([FP8_SCALE], device="cuda") if cache_dtype == "fp8" else None
    starts = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    scale = 1 / math.sqrt(192)
    # The one-slice shard of a 2-way exact/partitioned split reads the same bytes; run it as
    # what one rank of a partitioned 2-way split computes (its single slice, all heads).
    slices = LatentSlices() if layout.startswith("mla") else LatentSlices(num_shards=2, shards_local=1,
                                                                          softmax="partitioned")

    def triton_call(n):
        return kernels.triton_paged_latent_attention(q[..., :d_c], q[..., d_c:], cache, starts, lens, table,
                                                     scale, slices, None, context, False, num_splits=n,
                                                     cache_scale=sigma)

    # Correctness on the first requests against the plain-torch seam.
    sub = 8
    want = paged_latent_attention(q[:sub, :, :d_c], q[:sub, :, d_c:], cache, starts[: sub + 1], lens[:sub],
                                  table[:sub], scale, slices=slices, max_query_len=1, max_seq_len=context,
                                  kernel="torch", cache_scale=sigma).float()
    got = triton_call(None)[:sub].float()
    error = (got - want).abs().max().item()
    if not error < 3e-2:
        raise AssertionError(f"{layout} heads={heads} context={context}: max abs error {error} vs the torch seam")

    default = kernels.choose_num_splits(batch, kernels.triton.cdiv(heads, 16), torch.device("cuda"))
    def timed(n):
        if not graphs:
            return time_ms(lambda: triton_call(n), reps)
        triton_call(n)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # as vLLM runs decode: launch overhead gone
            triton_call(n)
        return time_ms(graph.replay, reps)

    results = {}
    for n in splits:
        n = n or default
        if n not in results:
            results[n] = timed(n)
    best = min(results, key=results.get)
    torch_ms = None
    if torch_baseline:  # the plain-torch seam on the whole batch, as the backends ran it before
        torch_ms = time_ms(lambda: paged_latent_attention(
            q[..., :d_c], q[..., d_c:], cache, starts, lens, table, scale, slices=slices, max_query_len=1,
            max_seq_len=context, kernel="torch", cache_scale=sigma), max(3, reps // 4))
    nbytes = tokens * (d_c + d_r) * cache.element_size() + batch * heads * (d_c + d_r) * 2 + batch * heads * d_c * 2
    return dict(layout=layout, cache_dtype=cache_dtype, heads=heads, context=context, lengths="varied" if varied else "equal",
                batch=batch, splits=default, ms=results[default], gbps=nbytes / (results[default] * 1e-3) / 1e9,
                best_splits=best, best_ms=results[best], max_abs_error=error, tokens=tokens, torch_ms=torch_ms)


def sweep(batch: int, reps: int, gen) -> None:
    """Time launch configurations (kernels.TUNING) on a few cases; prints one line each."""
    import itertools

    cases = [(16, 32768, "mla 512+64"), (16, 32768, "shard 256+64"), (128, 8192, "mla 512+64")]
    for heads, context, layout in cases:
        d_c, d_r = LAYOUTS[layout]
        cache, table, lens, q, tokens = make_case(batch, context, d_c, d_r, heads, False, gen)
        starts = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        slices = LatentSlices() if layout.startswith("mla") else LatentSlices(num_shards=2, shards_local=1,
                                                                              softmax="partitioned")
        nbytes = tokens * (d_c + d_r) * 2
        want = None
        block_hs = (16,) if heads == 16 else (16, 32, 64)
        results = []
        for block_h, block_n, warps, stages, splits in itertools.product(
                block_hs, (32, 64), (4, 8), (2, 3), (1, 2, 4, 8)):
            kernels.TUNING.clear()
            kernels.TUNING.update(block_h=block_h, block_n=block_n, num_warps=warps, num_stages=stages)
            try:
                def call():
                    return kernels.triton_paged_latent_attention(
                        q[..., :d_c], q[..., d_c:], cache, starts, lens, table, 0.1, slices, None, context, False,
                        num_splits=splits)
                out = call()
                if want is None:
                    want = out.float()
                error = (out.float() - want).abs().max().item()
                ms = time_ms(call, reps)
            except Exception as exc:  # a configuration that does not compile (registers, shared memory)
                print(f"{layout} H={heads} L={context} h{block_h} n{block_n} w{warps} s{stages} "
                      f"splits{splits}: failed {type(exc).__name__}", flush=True)
                continue
            results.append((ms, block_h, block_n, warps, stages, splits, error))
        kernels.TUNING.clear()
        results.sort()
        for ms, block_h, block_n, warps, stages, splits, error in results[:6]:
            print(f"{layout} H={heads} L={context}: h{block_h} n{block_n} w{warps} s{stages} splits{splits} "
                  f"{ms:.3f} ms {nbytes / (ms * 1e-3) / 1e9:.0f} GB/s err {error:.1e}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--splits", type=int, nargs="+", default=[0],
                        help="split-K counts to time (0: the kernel's own choice); the table shows the default "
                             "and the best")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--cache-dtype", choices=["bf16", "fp8"], nargs="+", default=["bf16"],
                        help="latent cache dtype(s): bf16, and/or fp8 (e4m3 with a per-layer scale)")
    parser.add_argument("--torch-baseline", action="store_true",
                        help="also time the plain-torch seam (what ran on CUDA before the kernels)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--sweep", action="store_true", help="time launch configurations instead (tuning)")
    parser.add_argument("--no-graph", action="store_true",
                        help="time eager launches (default: replay of a captured CUDA graph, as vLLM decodes)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU (this benchmark times the Triton kernels on the device)", file=sys.stderr)
        return 2

    gen = torch.Generator().manual_seed(0)
    if args.sweep:
        sweep(args.batch, args.reps, gen)
        return 0
    copy = copy_bandwidth(4.0, args.reps)
    name = torch.cuda.get_device_name()
    print(f"# {name}, torch {torch.__version__}, triton {kernels.triton.__version__}; "
          f"device-to-device copy {copy:.0f} GB/s (read + write); Triton timed as "
          f"{'eager launches' if args.no_graph else 'CUDA-graph replays'}, torch eager\n")
    rows = []
    print("| cache | layout | heads | context | lengths | splits | ms/call | GB/s | of copy | best splits: ms "
          "| shard/MLA | torch ms/call |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for cache_dtype, heads in [(c, h) for c in args.cache_dtype for h in args.heads]:
        for context in args.contexts:
            for varied in (False, True):
                mla = None
                for layout in LAYOUTS:
                    row = run_case(args.batch, context, heads, layout, varied, args.splits, args.reps, gen,
                                   args.torch_baseline, not args.no_graph, cache_dtype)
                    row["of_copy"] = row["gbps"] / copy
                    ratio = ""
                    if layout.startswith("mla"):
                        mla = row
                    else:
                        row["shard_over_mla"] = row["ms"] / mla["ms"]
                        ratio = f"{row['shard_over_mla']:.2f}"
                    rows.append(row)
                    print(f"| {cache_dtype} | {layout} | {heads} | {context} | {row['lengths']} | {row['splits']} | "
                          f"{row['ms']:.3f} | {row['gbps']:.0f} | {row['of_copy']:.0%} | "
                          f"{row['best_splits']}: {row['best_ms']:.3f} | {ratio} | "
                          f"{'' if row['torch_ms'] is None else format(row['torch_ms'], '.2f')} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(device=name, copy_gbps=copy, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
