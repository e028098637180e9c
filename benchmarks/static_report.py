"""Static report of the Triton decode kernels compiled for a GPU, on any machine (no GPU needed).

Compiles each stage-1 configuration that ``triton_paged_attention`` picks on a GPU for a
target (default sm_90, Hopper: ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``)
with the arguments a real decode call passes (the launcher's own argument list, captured,
specialised as Triton's JIT does), and reads from the result:

- registers per thread, spill stack and LDL/STL (local-memory) instructions
  (``cuobjdump -res-usage`` / ``-sass`` on the cubin; the Triton wheel ships cuobjdump);
- dynamic shared memory (the kernel's metadata) and CTAs per SM that registers and shared
  memory allow;
- the KV buffers of the software pipeline: the depth of the multi-buffered
  ``ttg.local_alloc`` of the key tile in the TTGIR (1 = loads not overlapped with compute),
  whether the latent tile is copied asynchronously, and the ``async_wait {num = N}`` values
  inside the key loop (0: every copy is waited for at the top of each tile);
- the MMA instruction the tile products use (wgmma or mma.sync).

    python benchmarks/static_report.py                 # the table (markdown)
    python benchmarks/static_report.py --json out.json
    python benchmarks/static_report.py --config mla-16-bf16 --tuning block_n=16 num_stages=6

Must run without ``TRITON_INTERPRET`` (the kernels must be JIT functions, not interpreted).
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from mla_plugin.ops import triton_paged_attention as kernels  # noqa: E402
from mla_plugin.ops.sharded_latent import LatentSlices  # noqa: E402

# The H100/H200 register file and shared memory per SM (bytes for shared memory).
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024
SMS = 132  # splits are chosen as on an H100/H200 (132 SMs)
BATCH = 128  # one decode token per request, as the benchmark's batch
BLOCK_SIZE = 64  # vLLM's MLA block size on a GPU


@dataclass(frozen=True)
class Config:
    """One production case: a layout, heads per rank, cache dtype and the exact-over-ranks path."""

    name: str
    d_c: int  # latent columns per rank (512 MLA; 256 one slice of a 2-way shard)
    heads: int
    cache: str  # "bf16" or "fp8"
    softmax: str  # "mla", "partitioned" (one local slice of a 2-way shard) or "exact" (logits over ranks)


CONFIGS = [
    Config(f"{layout}-{heads}-{cache}", d_c, heads, cache, softmax)
    for layout, d_c, softmax in (("mla", 512, "mla"), ("shard", 256, "partitioned"), ("exact", 256, "exact"))
    for heads in (16, 128)
    for cache in ("bf16", "fp8")
]


def _slices(config: Config) -> LatentSlices:
    if config.softmax == "mla":
        return LatentSlices()
    return LatentSlices(num_shards=2, shards_local=1, softmax=config.softmax)


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def stage1_call(config: Config, tuning: dict | None = None) -> tuple:
    """The stage-1 launch ``(kernel, args, kwargs)`` of a decode call of ``config`` on a GPU with
    ``SMS`` SMs, batch ``BATCH``, block size ``BLOCK_SIZE``: ``_balanced_attention`` (the default
    schedule) or ``_split_attention`` (the exact path over ranks, or ``schedule=split``). The
    tensors are small CPU stand-ins: only their dtype and alignment matter to the compile;
    strides are those of the real shapes."""
    d_r, heads = 64, config.heads
    dtype = torch.float8_e4m3fn if config.cache == "fp8" else torch.bfloat16
    blocks_per_request = 16  # the block table's width (a multiple of 16, as vLLM's usually is)
    q_latent = torch.zeros(BATCH, heads, config.d_c, dtype=torch.bfloat16)  # [T, H, d_loc]
    q_rope = torch.zeros(BATCH, heads, d_r, dtype=torch.bfloat16)  # [T, H, d_R]
    cache = torch.zeros(2, BLOCK_SIZE, config.d_c + d_r, dtype=dtype)  # [num_blocks, block, d_c + d_R]; never read
    starts = torch.arange(BATCH + 1, dtype=torch.int32)  # [B + 1]
    lens = torch.full((BATCH,), BLOCK_SIZE * blocks_per_request, dtype=torch.int32)  # [B]
    table = torch.zeros(BATCH, blocks_per_request, dtype=torch.int32)  # [B, max_blocks]
    slices = _slices(config)
    sigma = torch.ones(1) if config.cache == "fp8" else None
    rows = torch.zeros(BATCH, dtype=torch.int32)  # b(t), ctx_t [T] (launches we do not run here)
    cost_start = torch.zeros(BATCH + 1, dtype=torch.int32)  # [T + 1]
    plan = mock.patch.object(kernels, "_plan_of_tokens", lambda *_: (rows, rows, cost_start))
    split_rows = mock.patch.object(kernels, "_rows_of_tokens", lambda *_: (rows, rows))
    over_ranks = config.softmax == "exact"
    with plan, split_rows:
        launches = kernels._Launches(q_latent, q_rope, cache, starts, lens, table, 0.1, slices, sigma,
                                     None, placeholder=torch.zeros(1), schedule="split" if over_ranks else "balanced")
    # What the launcher picks on a GPU (the CPU process picks the interpreter's tiles).
    launches.config = {**kernels.gpu_launch_config(launches.streams.d_s, launches.streams.heads_per_stream,
                                                   launches.is_fp8),
                       **(tuning or {})}
    launches.head_blocks = triton.cdiv(launches.streams.heads_per_stream, launches.config["block_h"])
    stream_programs = launches.streams.num_slices * launches.head_blocks
    launches.num_splits = kernels.splits_on_gpu(SMS, BATCH, stream_programs)
    launches.workers = kernels.workers_on_gpu(SMS, stream_programs)
    if over_ranks or launches.config["schedule"] == "split":
        launches.schedule = "split"
        recorder = _Recorder(kernels._split_attention)
        partial_out, partial_lse = launches.partial_buffers()
        logits = torch.zeros(BATCH, heads, 256, dtype=torch.float32) if over_ranks else None
        with mock.patch.object(kernels, "_split_attention", recorder):
            launches.split_attention(partial_out, partial_lse, logits)
    else:
        launches.schedule = "balanced"
        launches.cost_start = torch.zeros(BATCH + 1, dtype=torch.int32)
        recorder = _Recorder(kernels._balanced_attention)
        out = torch.zeros(BATCH, heads, config.d_c, dtype=torch.bfloat16)
        with mock.patch.object(kernels, "_balanced_attention", recorder), \
                mock.patch.object(kernels, "_merge_pieces", _Recorder(kernels._merge_pieces)):
            launches.balanced_attention(out, torch.zeros(BATCH, heads), write_lse=False)
    (call,) = recorder.calls
    return (recorder.fn, *call), launches


def compile_call(fn, args: tuple, kwargs: dict, target: GPUTarget):
    """``triton.compile`` of ``fn`` specialised on ``args`` as the JIT would on a GPU of ``target``."""
    backend = make_backend(target)
    binder = triton.runtime.jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def cubin_usage(cubin: bytes) -> dict:
    """Registers, spill stack and local-memory instructions of a cubin (cuobjdump)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        dump = subprocess.run([_tool("cuobjdump"), "-res-usage", "-sass", str(path)], capture_output=True,
                              text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", dump).group(1))
    stack = int(re.search(r"STACK:(\d+)", dump).group(1))
    local = int(re.search(r"LOCAL:(\d+)", dump).group(1))
    return dict(regs=regs, spill_bytes=stack + local, ldl=len(re.findall(r"\bLDL\b", dump)),
                stl=len(re.findall(r"\bSTL\b", dump)),
                mma="wgmma" if "HGMMA" in dump else ("mma.sync" if re.search(r"\bHMMA\b", dump) else "none"))


def _loop_body(ttgir: str) -> str:
    """The lines of the key loop: the first ``scf.for`` of the kernel with a tile product in
    its body (the balanced kernel's row search is a loop too), up to its closing brace."""
    lines = ttgir.splitlines()
    for i, line in enumerate(lines):
        if "scf.for" in line:
            indent = len(line) - len(line.lstrip())
            body = lines[i:]
            for k in range(i + 1, len(lines)):
                if lines[k].strip().startswith("}") and len(lines[k]) - len(lines[k].lstrip()) == indent:
                    body = lines[i:k + 1]
                    break
            if any("dot" in b for b in body):
                return "\n".join(body)
    return ""


def pipeline_facts(ttgir: str, block_n: int, widths: dict[str, int]) -> dict:
    """Pipeline depth of each key-tile load, and the waits of the key loop, from the TTGIR.

    A tile ``name`` of ``[block_n, widths[name]]`` is pipelined when the loop fills a
    multi-buffered shared allocation ``!ttg.memdesc<S x block_n x width>`` with
    ``async_copy_global_to_local``; its depth is S (0: a synchronous ``tt.load`` in the
    loop, not overlapped with anything). ``kv_buffers`` is the least depth over the tiles."""
    depth = {}
    for stages, rows, width in re.findall(r"ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x(\d+)x(\d+)x", ttgir):
        if int(rows) == block_n:
            depth[int(width)] = max(depth.get(int(width), 0), int(stages))
    has_async = re.search(r"async(_tma)?_copy_global_to_local", ttgir) is not None
    tiles = {name: depth.get(width, 0) if has_async else 0 for name, width in widths.items()}
    body = _loop_body(ttgir)
    waits = sorted({int(n) for n in re.findall(r"async_wait[^\n]*\{num = (\d+) : i32\}", body)})
    return dict(kv_buffers=min(tiles.values()), tile_buffers=tiles, loop_waits=waits)


def report_row(config: Config, target: GPUTarget, tuning: dict | None = None) -> dict:
    (fn, args, kwargs), launches = stage1_call(config, tuning)
    kernel = compile_call(fn, args, kwargs, target)
    facts = cubin_usage(kernel.asm["cubin"])
    shared = kernel.metadata.shared
    block_n, warps = kwargs["BLOCK_N"], kwargs["num_warps"]
    widths = {"rope": kwargs["BLOCK_DR"], "latent": kwargs["BLOCK_DS"]}  # (the exact path over ranks reads
    # its logits from the all-reduced buffer, and the latent tile for the output)
    facts.update(pipeline_facts(kernel.asm["ttgir"], block_n, widths))
    ctas_regs = REGISTERS_PER_SM // max(1, facts["regs"] * 32 * warps)
    ctas_smem = SHARED_PER_SM // shared if shared else ctas_regs
    return dict(config=config.name, block_h=kwargs["BLOCK_H"], block_n=block_n, num_warps=warps,
                num_stages=kwargs["num_stages"], shared_bytes=shared,
                loads="tma" if kwargs["TMA_TILE"] else "pointer",
                schedule=(f"balanced, {launches.workers} workers" if launches.schedule == "balanced"
                          else f"split-K, {launches.num_splits} splits"),
                ctas_per_sm=min(ctas_regs, ctas_smem), **facts)


def report(target: GPUTarget, configs: list[Config], tuning: dict | None = None, jobs: int = 1) -> list[dict]:
    """``report_row`` of each config, ``jobs`` compiles at a time (forked worker processes)."""
    if jobs <= 1 or len(configs) <= 1:
        return [report_row(c, target, tuning) for c in configs]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return list(pool.map(report_row, configs, [target] * len(configs), [tuning] * len(configs)))


def table(rows: list[dict]) -> str:
    lines = ["| config | tiles h/n/warps/stages | schedule | tile loads | regs | spill B (LDL/STL) | smem KB | CTAs/SM "
             "| KV buffers (latent, rope) | loop waits | MMA |",
             "|---|---|---|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['block_h']}/{r['block_n']}/{r['num_warps']}/{r['num_stages']} "
            f"| {r['schedule']} | {r['loads']} "
            f"| {r['regs']} | {r['spill_bytes']} ({r['ldl']}/{r['stl']}) | {r['shared_bytes'] / 1024:.1f} "
            f"| {r['ctas_per_sm']} | {r['kv_buffers']} ({_tiles(r['tile_buffers'])}) "
            f"| {','.join(map(str, r['loop_waits'])) or '-'} | {r['mma']} |")
    return "\n".join(lines)


def _tiles(tiles: dict) -> str:
    return ", ".join(f"{tiles[name]}" if name in tiles else "-" for name in ("latent", "rope"))


def _parse_tuning(items: list[str]) -> dict:
    return {key: int(value) if value.isdigit() else value for key, value in (item.split("=", 1) for item in items)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", choices=[c.name for c in CONFIGS], help="default: all")
    parser.add_argument("--tuning", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override the launch configuration (block_h, block_n, num_warps, num_stages, "
                             "tma=0/1; schedule=split for split-K)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiles in parallel")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET (the report compiles the kernels, it does not interpret them)",
              file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    tuning = _parse_tuning(args.tuning)
    rows = report(target, [c for c in CONFIGS if not args.config or c.name in args.config], tuning, args.jobs)
    machine = "a GPU" if torch.cuda.is_available() else "a CPU"
    print(f"# Triton {triton.__version__}, compiled for sm_{args.arch} on {machine}; "
          f"batch {BATCH}, block {BLOCK_SIZE}, workers and splits as on {SMS} SMs\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(dict(triton=triton.__version__, arch=args.arch, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
